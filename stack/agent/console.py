"""The guest console: one command per line, output, then the prompt. A bugcheck prints the STOP screen,
the crash dump's path on a line of its own, and ends the guest (exit status STOP_EXIT). A deadline of the
harness that passed in the guest model (stack.timescale.HarnessTooSlow, on any thread) is no STOP: it
prints one line after TOO_SLOW_MARKER saying what was late, writes no dump, and ends the guest with
TOO_SLOW_EXIT.

The console is a `cmd.Cmd`. A bad line never ends the session: a line that does not parse (an unbalanced
quote), an unknown command, a command line its usage does not admit and a command that fails each answer
with a message and the prompt. Every command registers its usage lines (stack.agent.usage): `help NAME`
prints them, the console checks lines against them, and tab completes their words.

Two ways in:
- a program (the harness, over pexpect with echo off): the line protocol, no readline, so the output
  after a command is the command's and nothing else (no echo, no escape sequences);
- a person at a terminal that echoes (ConsoleShell.serve decides with `person_at_terminal`): readline's
  line editing, history (kept in `history` when given) and completion of command names and subcommands.
  `ConsoleShell(run_line=...)` is the same console in front of another executor, e.g. the harness's
  `GuestConsole.run` for `xenpv run --console`.
"""
from __future__ import annotations

import cmd
import importlib
import logging
import os
import shlex
import sys
import termios
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TextIO

from xenpv.stack.agent.hibernate import hibernate
from xenpv.stack.agent.runtime import GuestRuntime
from xenpv.stack.agent.usage import Usage, UsageError
from xenpv.stack.kernel import S0, S3, S4, S5, BugCheck, KeBugCheckEx
from xenpv.stack.kernel.bugcheck import bugcheck_name
from xenpv.stack.notmodelled import NotModelled
from xenpv.stack.timescale import HarnessTooSlow

__all__ = ["COMMANDS", "NOT_MODELLED_EXIT", "NOT_MODELLED_MARKER", "PROMPT", "STOP_EXIT", "STOP_MARKER", "TOO_SLOW_EXIT", "TOO_SLOW_MARKER", "ConsoleShell",
           "UsageError", "command", "run"]

log = logging.getLogger("stack.agent.console")

PROMPT = "guest> "
STOP_MARKER = "*** GUEST STOPPED"
STOP_EXIT = 3
TOO_SLOW_MARKER = "*** HARNESS TOO SLOW"
TOO_SLOW_EXIT = 4
# A path the harness does not model faithfully (stack.notmodelled): no STOP, no dump.
NOT_MODELLED_MARKER = "*** NOT MODELLED"
NOT_MODELLED_EXIT = 5
QUIT_WORDS = ("quit", "exit")
HISTORY_LENGTH = 1000

Command = Callable[[GuestRuntime, list[str]], str]


@dataclass(frozen=True)
class ConsoleCommand:
    name: str
    handler: Command
    summary: str
    usage: Usage
    details: str = ""  # more for `help NAME`: what the output means, what a placeholder takes

    def usage_text(self) -> str:
        lines = [f"{self.name} {line}".rstrip() for line in self.usage.lines]
        return "\n".join(["usage: " + lines[0], *("       " + line for line in lines[1:])])


COMMANDS: dict[str, ConsoleCommand] = {}

# Command groups that live beside the drivers they drive; each registers with @command when imported.
COMMAND_MODULES = ("xenpv.stack.agent.cmd_vbd", "xenpv.stack.agent.cmd_net", "xenpv.stack.agent.cmd_xs", "xenpv.stack.agent.cmd_pkg",
                   "xenpv.stack.agent.cmd_lifecycle", "xenpv.stack.agent.cmd_xenagent", "xenpv.stack.agent.cmd_iface",
                   "xenpv.stack.agent.cmd_monitor")


def command(name: str, summary: str, usage: tuple[str, ...] = ("",), details: str = "") -> Callable[[Command], Command]:
    """Register a console command. `usage`: its alternatives (stack.agent.usage), the empty line for a
    command without arguments. The handler raises UsageError for values its usage cannot express."""
    parsed = Usage(usage)

    def register(fn: Command) -> Command:
        COMMANDS[name] = ConsoleCommand(name, fn, summary, parsed, details.strip("\n"))
        return fn
    return register


def load_command_modules() -> None:
    for name in COMMAND_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # a module that exists but is broken is a bug, not an absent group
                raise


def run_command(rt: GuestRuntime, words: list[str]) -> str:
    """One command's output; a line its usage does not admit answers with the usage and runs nothing."""
    entry = COMMANDS.get(words[0])
    if entry is None:
        return f"unknown command {words[0]!r}; try help"
    if not entry.usage.accepts(words[1:]):
        return entry.usage_text()
    try:
        return entry.handler(rt, words[1:])
    except UsageError as exc:
        return (f"{words[0]}: {exc.detail}\n" if exc.detail else "") + entry.usage_text()


def split_line(line: str) -> list[str]:
    """The words of a command line, quoted as a POSIX shell does; `?` is `help`."""
    stripped = line.strip()
    if stripped.startswith("?"):
        stripped = "help " + stripped[1:]
    return shlex.split(stripped)


def parse_int(text: str, what: str, lo: int | None = None, hi: int | None = None) -> int:
    """A number in C notation (`0x10`, `16`); UsageError naming `what` otherwise."""
    try:
        value = int(text, 0)
    except ValueError:
        raise UsageError(f"{what} must be a number, got {text!r}") from None
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"at least {lo}" if hi is None else f"between {lo} and {hi}"
        raise UsageError(f"{what} must be {bounds}, got {value}")
    return value


# -- the built-in commands --------------------------------------------------------------------------

@command("help", "list the commands, or show one command's usage", ("[COMMAND]",))
def _help(rt: GuestRuntime, args: list[str]) -> str:
    if args:
        entry = COMMANDS.get(args[0])
        if entry is None:
            raise UsageError(f"no command {args[0]!r}")
        return "\n".join(p for p in (entry.usage_text(), entry.summary, entry.details) if p)
    rows = [f"{name:<12} {entry.summary}" for name, entry in sorted(COMMANDS.items())]
    rows.append(f"{'quit':<12} leave the console (also exit, EOF or the end of input)")
    return "\n".join(rows)


@command("pci", "the PCI bus as the firmware left it")
def _pci(rt: GuestRuntime, args: list[str]) -> str:
    out = []
    for f in rt.pci:
        out.append(str(f))
        out += [f"    {bar}" for bar in f.bars]
    return "\n".join(out)


@command("devices", "the device tree: instance paths, drivers, state, problems")
def _devices(rt: GuestRuntime, args: list[str]) -> str:
    with rt.kernel.cpu.lock:
        return rt.kernel.pnp.dump_tree()


@command("interfaces", "XENBUS interface reference counts")
def _interfaces(rt: GuestRuntime, args: list[str]) -> str:
    refs: dict[str, int] = {}
    for provider in rt.kernel.reference_providers.values():
        refs.update(provider())
    return "\n".join(f"{name} {count}" for name, count in sorted(refs.items())) or "(no interfaces)"


@command("registry", "dump a registry key (default HKLM)", ("[KEY]",),
         details="KEY: a path such as 'HKLM\\SYSTEM\\CurrentControlSet\\Services\\XEN' (quote it: the console "
                 "splits words as a shell does)")
def _registry(rt: GuestRuntime, args: list[str]) -> str:
    return rt.kernel.registry.dump(args[0] if args else "HKLM")


@command("log", "the last lines of the debug log (default 50)", ("[LINES]",))
def _log(rt: GuestRuntime, args: list[str]) -> str:
    lines = parse_int(args[0], "LINES", 1) if args else 50
    return "\n".join(rt.kernel.log.tail(lines))


@command("power", "change the system power state", ("S0|S3|S4|S5",))
def _power(rt: GuestRuntime, args: list[str]) -> str:
    if args[0] == "S4":
        return hibernate(rt)  # the real thing: the image is written, the machine powers off
    state = {"S0": S0, "S3": S3, "S4": S4, "S5": S5}[args[0]]
    with rt.kernel.cpu.lock:
        ok = rt.kernel.power.set_system_state(state)
    return f"power {args[0]}: {'done' if ok else 'vetoed'}"


@command("bugcheck", "stop the guest with a bugcheck (fault injection)", ("CODE [P1 [P2 [P3 [P4]]]]",))
def _bugcheck(rt: GuestRuntime, args: list[str]) -> str:
    code = parse_int(args[0], "CODE", 0, 0xFFFFFFFF)
    params = [parse_int(a, f"P{i}", 0, (1 << 64) - 1) for i, a in enumerate(args[1:], 1)]
    KeBugCheckEx(code, *params, module="agent")
    return ""


# -- the console itself ----------------------------------------------------------------------------

def person_at_terminal(stdin: TextIO, stdout: TextIO) -> bool:
    """Whether a person types at this console: stdin and stdout are a terminal that echoes input, and TERM
    names one readline can drive. A program driving the console through a pty (the harness's pexpect)
    turns echo off; readline would still echo every line back, and redraw it with escape sequences, so
    the program would no longer read just the command's output."""
    try:
        if not (stdin.isatty() and stdout.isatty()):
            return False
        if os.environ.get("TERM", "dumb") in ("", "dumb"):
            return False
        return bool(termios.tcgetattr(stdin.fileno())[3] & termios.ECHO)
    except (AttributeError, ValueError, OSError, termios.error):
        return False


class ConsoleShell(cmd.Cmd):
    """The console's line discipline around an executor: `run_line(line) -> output`.

    `interactive` (default: person_at_terminal) selects readline; `history` is the file readline's history
    is read from and saved to. Exceptions of `run_line` other than a bad line propagate (the harness's
    GuestBugcheck ends `xenpv run --console` with the dump)."""

    prompt = PROMPT

    def __init__(self, run_line: Callable[[str], str] | None = None, stdin: TextIO | None = None,
                 stdout: TextIO | None = None, *, interactive: bool | None = None,
                 history: Path | None = None) -> None:
        super().__init__(completekey="tab", stdin=stdin, stdout=stdout)
        self._run_line = run_line
        self.interactive = person_at_terminal(self.stdin, self.stdout) if interactive is None else interactive
        self.use_rawinput = self.interactive
        self.history = history
        self.exit_status: int | None = None
        self._readline = None  # the readline module once preloop set it up
        # A byte that is not UTF-8 must not end the session: it reads as U+FFFD.
        reconfigure = getattr(self.stdin, "reconfigure", None)
        if reconfigure is not None:
            try:
                reconfigure(errors="replace")
            except (ValueError, OSError) as exc:  # not a text stream we may change
                log.debug("stdin keeps its error handler: %s", exc)

    # -- running lines ---------------------------------------------------------------------------

    def execute(self, line: str) -> str:
        if self._run_line is None:
            raise NotImplementedError("ConsoleShell needs run_line or an execute() of its own")
        return self._run_line(line)

    def emptyline(self) -> bool:
        return False  # cmd.Cmd would repeat the last command: a stray Enter must not write a disk again

    def onecmd(self, line: str) -> bool:
        if line == "EOF":  # cmd.Cmd's word for the end of input
            if self.interactive:
                self.stdout.write("\n")
            return True
        stripped = line.strip()
        if not stripped:
            return self.emptyline()
        if stripped in QUIT_WORDS:
            return True
        out = self.execute(line)
        if out:
            self.stdout.write(out + "\n")
            self.stdout.flush()
        return self.exit_status is not None

    def serve(self) -> int:
        """Run until quit, the end of input or a stop; the exit status (0 unless the guest stopped)."""
        while True:
            try:
                self.cmdloop()
                return self.exit_status or 0
            except KeyboardInterrupt:
                if not self.interactive:
                    raise
                self.stdout.write("^C\n")  # a person's Ctrl-C drops the line, not the session

    # -- readline: history and completion ---------------------------------------------------------

    def preloop(self) -> None:
        if not self.interactive or self._readline is not None:  # serve() loops again after a Ctrl-C
            return
        try:
            import readline
        except ImportError:
            return  # input() without line editing
        self._readline = readline
        # Subcommands have dashes (irql-query-interface): only whitespace separates words.
        readline.set_completer_delims(" \t\n")
        readline.set_history_length(HISTORY_LENGTH)
        if self.history is not None:
            try:
                readline.read_history_file(self.history)
            except FileNotFoundError:
                pass
            except OSError as exc:
                self.stdout.write(f"(history {self.history} not read: {exc.strerror})\n")

    def postloop(self) -> None:
        if self._readline is not None and self.history is not None:
            try:
                self.history.parent.mkdir(parents=True, exist_ok=True)
                self._readline.write_history_file(self.history)
            except OSError as exc:
                self.stdout.write(f"(history {self.history} not saved: {exc.strerror})\n")

    # Completions end with a space, so a unique one leaves the cursor at the next word (Python's readline
    # appends nothing itself).
    def completenames(self, text: str, *ignored: object) -> list[str]:
        load_command_modules()
        return [n + " " for n in sorted([*COMMANDS, *QUIT_WORDS]) if n.startswith(text)]

    def completedefault(self, text: str, line: str, begidx: int, endidx: int) -> list[str]:  # type: ignore[override]
        try:
            words = split_line(line[:begidx])
        except ValueError:
            return []  # inside an open quote
        if not words:
            return self.completenames(text)
        if words[0] == "help":
            return self.completenames(text) if len(words) == 1 else []
        load_command_modules()
        entry = COMMANDS.get(words[0])
        return [w + " " for w in entry.usage.completions(words[1:], text)] if entry is not None else []


class AgentConsole(ConsoleShell):
    """The guest agent's console: each line runs on the guest runtime `rt`."""

    def __init__(self, rt: GuestRuntime, stdin: TextIO | None = None, stdout: TextIO | None = None,
                 **kwargs: object) -> None:
        super().__init__(None, stdin, stdout, **kwargs)  # type: ignore[arg-type]
        self.rt = rt
        load_command_modules()

    def execute(self, line: str) -> str:
        try:
            words = split_line(line)
        except ValueError as exc:
            return f"error: cannot split the line into words: {exc}"
        if not words:
            return ""
        self.rt.record_line(line.strip())
        try:
            self.rt.poll()
            return run_command(self.rt, words)
        except BugCheck as bugcheck:
            self.exit_status = stop(self.rt, bugcheck, self._emit)
            return ""
        except HarnessTooSlow as late:
            self.exit_status = too_slow(self.rt, late, self._emit)
            return ""
        except NotModelled as limit:
            self.exit_status = not_modelled(limit, self._emit)
            return ""
        except Exception as exc:  # a command's failure is reported; the guest keeps running
            log.info("%r failed", line, exc_info=True)
            return f"error: {type(exc).__name__}: {exc}"

    def _emit(self, text: str) -> None:
        self.stdout.write(text)
        self.stdout.flush()


def run(rt: GuestRuntime, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    return AgentConsole(rt, stdin, stdout).serve()


def stop(rt: GuestRuntime, bugcheck: BugCheck, emit: Callable[[str], None]) -> int:
    path = rt.write_dump(bugcheck)
    emit("\n" + rt.kernel.crash_dump(bugcheck).stop_screen() + "\n")
    emit(f"{STOP_MARKER} 0x{bugcheck.code:08X} {bugcheck_name(bugcheck.code)} dump={path} bucket={bugcheck.bucket}\n")
    return STOP_EXIT


def too_slow(rt: GuestRuntime | None, late: HarnessTooSlow, emit: Callable[[str], None]) -> int:
    """The harness gave up on the guest (`rt`, None before it had one): the processor stops, so no other
    thread runs driver code, and one line says what was late. No STOP screen, no crash dump: the drivers
    broke no rule."""
    log.error("%s", late, exc_info=late)
    if rt is not None:
        rt.kernel.cpu.give_up(late)
    emit(f"\n{TOO_SLOW_MARKER}: {late.describe()}\n")
    return TOO_SLOW_EXIT


def not_modelled(limit: NotModelled, emit: Callable[[str], None]) -> int:
    """The guest reached a path the harness does not model faithfully (raised on the console's thread, so
    the guest simply ends): one line says which. No STOP screen, no crash dump: what would follow says
    nothing about the drivers."""
    log.error("%s", limit)
    emit(f"\n{NOT_MODELLED_MARKER}: {limit.what}\n")
    return NOT_MODELLED_EXIT
