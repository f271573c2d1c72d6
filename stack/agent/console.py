"""The guest console: one command per line, output, then the prompt. A bugcheck prints the STOP screen,
the crash dump's path on a line of its own, and ends the guest (exit status STOP_EXIT)."""
from __future__ import annotations

import importlib
import shlex
import sys
from typing import Callable, TextIO

from xenpv.stack.agent.runtime import GuestRuntime
from xenpv.stack.kernel import S0, S3, S4, S5, BugCheck, KeBugCheckEx
from xenpv.stack.kernel.bugcheck import bugcheck_name

PROMPT = "guest> "
STOP_MARKER = "*** GUEST STOPPED"
STOP_EXIT = 3

Command = Callable[[GuestRuntime, list[str]], str]
COMMANDS: dict[str, tuple[Command, str]] = {}

# Command groups that live beside the drivers they drive; each registers with @command when imported.
COMMAND_MODULES = ("xenpv.stack.agent.cmd_vbd", "xenpv.stack.agent.cmd_net", "xenpv.stack.agent.cmd_xs", "xenpv.stack.agent.cmd_pkg")


def command(name: str, help_: str) -> Callable[[Command], Command]:
    def register(fn: Command) -> Command:
        COMMANDS[name] = (fn, help_)
        return fn
    return register


@command("help", "list the commands")
def _help(rt: GuestRuntime, args: list[str]) -> str:
    return "\n".join(f"{name:<12} {help_}" for name, (_, help_) in sorted(COMMANDS.items()))


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


@command("interfaces", "interface reference counts")
def _interfaces(rt: GuestRuntime, args: list[str]) -> str:
    refs: dict[str, int] = {}
    for provider in rt.kernel.reference_providers.values():
        refs.update(provider())
    return "\n".join(f"{name} {count}" for name, count in sorted(refs.items())) or "(no interfaces)"


@command("registry", "registry [KEY]: dump a key (default HKLM)")
def _registry(rt: GuestRuntime, args: list[str]) -> str:
    return rt.kernel.registry.dump(args[0] if args else "HKLM")


@command("log", "log [N]: the last N lines of the debug log")
def _log(rt: GuestRuntime, args: list[str]) -> str:
    return "\n".join(rt.kernel.log.tail(int(args[0]) if args else 50))


@command("power", "power S0|S3|S4|S5: change the system power state")
def _power(rt: GuestRuntime, args: list[str]) -> str:
    states = {"S0": S0, "S3": S3, "S4": S4, "S5": S5}
    if len(args) != 1 or args[0].upper() not in states:
        return "usage: power S0|S3|S4|S5"
    with rt.kernel.cpu.lock:
        ok = rt.kernel.power.set_system_state(states[args[0].upper()])
    return f"power {args[0].upper()}: {'done' if ok else 'vetoed'}"


@command("bugcheck", "bugcheck CODE [P1..P4]: stop the guest (fault injection)")
def _bugcheck(rt: GuestRuntime, args: list[str]) -> str:
    if not args:
        return "usage: bugcheck CODE [P1 P2 P3 P4]"
    code, *params = (int(a, 0) for a in args)
    KeBugCheckEx(code, *params, module="agent")
    return ""


def load_command_modules() -> None:
    for name in COMMAND_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # a module that exists but is broken is a bug, not an absent group
                raise


def run(rt: GuestRuntime, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    load_command_modules()
    def emit(text: str) -> None:
        stdout.write(text)
        stdout.flush()

    emit(PROMPT)
    for line in stdin:
        words = shlex.split(line)
        if not words:
            emit(PROMPT)
            continue
        if words[0] in ("quit", "exit"):
            return 0
        entry = COMMANDS.get(words[0])
        try:
            rt.poll()
            out = entry[0](rt, words[1:]) if entry else f"unknown command {words[0]!r}; try help"
        except BugCheck as bugcheck:
            return stop(rt, bugcheck, emit)
        except Exception as exc:  # a command's failure is reported; the guest keeps running
            out = f"error: {type(exc).__name__}: {exc}"
        emit((out + "\n" if out else "") + PROMPT)
    return 0


def stop(rt: GuestRuntime, bugcheck: BugCheck, emit: Callable[[str], None]) -> int:
    path = rt.write_dump(bugcheck)
    emit("\n" + rt.kernel.crash_dump(bugcheck).stop_screen() + "\n")
    emit(f"{STOP_MARKER} 0x{bugcheck.code:08X} {bugcheck_name(bugcheck.code)} dump={path}\n")
    return STOP_EXIT
