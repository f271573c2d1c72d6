"""The guest console as a unit: a bad line never ends the session, help shows what each command accepts,
and readline (editing, history, completion) serves a person at a terminal but never a program."""
from __future__ import annotations

import io
import threading
import itertools
import os
import pty
import signal
import sys
import termios
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import pexpect
import pytest

from xenpv.stack.agent import console
from xenpv.stack.agent.console import COMMANDS, PROMPT, ConsoleShell, person_at_terminal, run_command
from xenpv.stack.agent.runtime import GuestRuntime
from xenpv.stack.agent.usage import Group, Literal, Placeholder, Usage
from xenpv.stack.kernel import BugCheck
from xenpv.stack.kernel.irql import Processor
from xenpv.stack.timescale import HarnessTooSlow

console.load_command_modules()

# A value of each placeholder the usage lines use, valid for the command's own checks.
SAMPLES = {
    "COMMAND": "vbd", "LINES": "20", "KEY": r"HKLM\SOFTWARE\Harness", "CODE": "0xD1", "P1": "0x10", "P2": "2",
    "P3": "0", "P4": "0", "PATH": "data/x", "VALUE": "v", "T": "0", "LBA": "8", "COUNT": "2", "PATTERN": "a55a",
    "S": "5", "VIF": "0", "ADDR": "10.200.0.1", "PORT": "7", "SIZE": "64", "BYTES": "4096", "NAME": "xenvif",
    "VERSION": "9.1.0.10", "DATA": "1", "CLASS": "VBD", "INTERFACE": "STORE", "DOMID": "0", "QTEST": "/tmp/qtest.sock", "RAM": "/tmp/ram", "HV": "/tmp/hv-1.sock", "NEWDOMID": "5",
    "SECONDS": "0", "PAGES": "1", "REQUESTID": "1",
}


class Reached(Exception):
    """The command went past its argument checks to the guest."""


class Untouchable:
    """A guest runtime that stops any command reaching it: what came before was argument parsing."""

    def __getattr__(self, name: str) -> object:
        raise Reached(name)

    def poll(self) -> None:
        pass


class Quiet:
    """Just enough runtime for the console loop: commands that touch more fail with a message."""

    def __init__(self) -> None:
        self.polls = 0
        self.recorded: list[str] = []

    def poll(self) -> None:
        self.polls += 1

    def record_line(self, line: str) -> None:
        self.recorded.append(line)


def expansions(items: tuple, values: dict[str, str]) -> Iterator[list[str]]:
    """Every word list an alternative admits: each group with and without, each choice, samples for
    placeholders."""
    if not items:
        yield []
        return
    head, rest = items[0], items[1:]
    if isinstance(head, Literal):
        heads: list[list[str]] = [[w] for w in head.words]
    elif isinstance(head, Placeholder):
        heads = [[values[head.name]]]
    else:
        assert isinstance(head, Group)
        heads = [[], *expansions(head.items, values)]
    for h, r in itertools.product(heads, list(expansions(rest, values))):
        yield h + r


def _serve(text: str | bytes) -> tuple[int, str, Quiet]:
    rt = Quiet()
    stdin = io.TextIOWrapper(io.BytesIO(text if isinstance(text, bytes) else text.encode()), encoding="utf-8")
    stdout = io.StringIO()
    status = console.run(rt, stdin, stdout)  # type: ignore[arg-type]
    return status, stdout.getvalue(), rt


def test_a_line_that_does_not_split_is_a_message_and_the_session_goes_on() -> None:
    status, out, rt = _serve('xs write "unbalanced\nhelp\nquit\nhelp\n')
    assert status == 0
    replies = out.split(PROMPT)
    assert replies[0] == ""
    assert replies[1] == "error: cannot split the line into words: No closing quotation\n"
    assert replies[2].startswith("bugcheck ") and "\nxs " in replies[2]  # the session answered the next line
    assert len(replies) == 4 and replies[3] == ""  # quit: nothing after the last prompt
    assert rt.polls == 1  # only the command that ran polled the guest


def test_bytes_that_are_not_utf8_are_a_message_too() -> None:
    status, out, _ = _serve(b"\xff\xfe\nhelp vbd\n")
    assert status == 0
    assert "unknown command '\ufffd\ufffd'; try help" in out
    assert "usage: vbd list\n" in out  # and the session went on to the end of input


def test_empty_lines_repeat_nothing_and_unknown_commands_are_named() -> None:
    status, out, rt = _serve("\n   \nfrobnicate now\n?\n")
    assert status == 0
    assert out.split(PROMPT)[1:4] == ["", "", "unknown command 'frobnicate'; try help\n"]
    assert "help " in out.split(PROMPT)[4]  # `?` is help
    assert rt.polls == 2


def test_a_failing_command_is_a_message(monkeypatch: pytest.MonkeyPatch) -> None:
    status, out, _ = _serve("devices\npci\n")  # the runtime has no kernel: each command fails on its own
    assert status == 0
    assert out.count("error: AttributeError: ") == 2


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_usage_line_is_what_the_command_accepts(name: str) -> None:
    entry = COMMANDS[name]
    assert entry.usage.placeholders() <= SAMPLES.keys(), "a placeholder without a sample value"
    for alternative in entry.usage._grammar:  # type: ignore[attr-defined]
        for words in expansions(alternative, SAMPLES):
            try:
                out = run_command(Untouchable(), [name, *words])  # type: ignore[arg-type]
            except (Reached, BugCheck):
                continue  # accepted: it went on to the guest
            assert entry.usage_text() not in out, f"{name} {' '.join(words)}: refused although its help shows it"
    # And what no usage line shows is refused before the guest is touched.
    for words in (["zz-not-a-word", "zz-not-a-word"], ["zz-not-a-word"] * 9):
        out = run_command(Untouchable(), [name, *words])  # type: ignore[arg-type]
        assert entry.usage_text() in out, out


def test_values_are_checked_before_the_guest_is_touched() -> None:
    cases = {
        "vbd read 0 zero 1": "vbd: LBA must be a number, got 'zero'",
        "vbd write 0 8 xyz 1": "vbd: PATTERN must be hex bytes or seq, got 'xyz'",
        "vbd flush 0 --timeout never": "vbd: S must be a number of seconds, got 'never'",
        "net ping 10.200.0.300": "net: ADDR must be an IPv4 address, got '10.200.0.300'",
        "net udp-echo 10.200.0.1 70000 8": "net: PORT must be between 1 and 65535, got 70000",
        "log 0": "log: LINES must be at least 1, got 0",
        "bugcheck stop": "bugcheck: CODE must be a number, got 'stop'",
        "reg add K /v N /t REG_DWORD /d lots": "reg: DATA must be a number, got 'lots'",
        "fault grant dom0": "fault: DOMID must be a number, got 'dom0'",
        "help nothing": "help: no command 'nothing'",
    }
    for line, message in cases.items():
        words = line.split()
        out = run_command(Untouchable(), words)  # type: ignore[arg-type]
        assert out == message + "\n" + COMMANDS[words[0]].usage_text(), out


def test_help_shows_each_commands_usage() -> None:
    listing = run_command(Untouchable(), ["help"])  # type: ignore[arg-type]
    assert [line.split()[0] for line in listing.splitlines()] == [*sorted(COMMANDS), "quit"]
    for name, entry in COMMANDS.items():
        assert run_command(Untouchable(), ["help", name]).startswith(entry.usage_text() + "\n")  # type: ignore[arg-type]
    fault = run_command(Untouchable(), ["help", "fault"])  # type: ignore[arg-type]
    assert "fault leak-ref INTERFACE" in fault and "STORE or XENBUS.STORE" in fault


def _completions(line: str) -> list[str]:
    shell = ConsoleShell(lambda _line: "", io.StringIO(), io.StringIO(), interactive=False)
    begidx = len(line) - len(line.split(" ")[-1])
    if not line[:begidx].strip():
        offered = shell.completenames(line[begidx:])
    else:
        offered = shell.completedefault(line[begidx:], line, begidx, len(line))
    assert all(w.endswith(" ") for w in offered)  # a unique completion moves on to the next word
    return [w[:-1] for w in offered]


def test_completion_offers_command_names_and_the_words_the_usage_allows_next() -> None:
    assert _completions("") == sorted([*COMMANDS, "exit", "quit"])
    assert _completions("re") == ["reboot", "reg", "registry"]
    assert _completions("fault ") == ["grant", "irql-query-interface", "leak-ref", "revoke-in-use"]
    assert _completions("fault irql") == ["irql-query-interface"]
    assert _completions("vbd read 0 8 2 ") == ["--timeout", "hex"]
    assert _completions("net -i 1 ") == ["ping", "tcp-get", "tcp-put", "udp-echo"]
    assert _completions("power S") == ["S0", "S3", "S4", "S5"]
    assert _completions("help v") == ["vbd"]
    assert _completions('xs write "open ') == []


def test_usage_grammar() -> None:
    u = Usage(("read T LBA COUNT [hex] [--timeout S]", "write PATH [VALUE...]", "S0|S3"))
    assert u.accepts(["read", "0", "1", "2"]) and u.accepts(["read", "0", "1", "2", "hex", "--timeout", "3"])
    assert u.accepts(["read", "0", "1", "2", "--timeout", "3"]) and not u.accepts(["read", "0", "1"])
    assert not u.accepts(["read", "0", "1", "2", "3"]) and not u.accepts(["read", "0", "1", "2", "--timeout"])
    assert u.accepts(["write", "p"]) and u.accepts(["write", "p", "a", "b", "c"]) and not u.accepts(["write"])
    assert u.accepts(["S3"]) and not u.accepts(["S4"]) and not u.accepts([])
    assert Usage(("",)).accepts([]) and not Usage(("",)).accepts(["x"])
    with pytest.raises(ValueError, match="unbalanced"):
        Usage(("read [T",))


@pytest.fixture
def terminal() -> Iterator[tuple[io.TextIOWrapper, io.TextIOWrapper]]:
    controller, tty = pty.openpty()
    stdin = open(tty, "r", closefd=True)
    stdout = open(os.dup(tty), "w", closefd=True)
    yield stdin, stdout
    stdin.close()
    stdout.close()
    os.close(controller)


def _set_echo(f: io.TextIOWrapper, on: bool) -> None:
    attrs = termios.tcgetattr(f.fileno())
    attrs[3] = attrs[3] | termios.ECHO if on else attrs[3] & ~termios.ECHO
    termios.tcsetattr(f.fileno(), termios.TCSANOW, attrs)


def test_readline_only_for_a_person_at_a_terminal(terminal, monkeypatch: pytest.MonkeyPatch) -> None:
    stdin, stdout = terminal
    monkeypatch.setenv("TERM", "xterm")
    _set_echo(stdin, True)
    assert person_at_terminal(stdin, stdout)
    _set_echo(stdin, False)  # what pexpect's echo=False does: a program drives the console
    assert not person_at_terminal(stdin, stdout)
    _set_echo(stdin, True)
    for term in ("dumb", ""):  # a terminal readline cannot drive (Emacs's shell, no TERM at all)
        monkeypatch.setenv("TERM", term)
        assert not person_at_terminal(stdin, stdout)
    monkeypatch.setenv("TERM", "xterm")
    assert not person_at_terminal(io.StringIO(), stdout)


SHELL = """
import sys
from pathlib import Path
from xenpv.stack.agent.console import ConsoleShell
ConsoleShell(lambda line: f"ran {line!r}", history=Path(sys.argv[1]) if len(sys.argv) > 1 else None).serve()
"""


def _as_a_terminal_session_starts() -> None:
    """In the child: the signal state a login session gives its shell. An ignored or blocked SIGINT survives
    exec, and a pytest-xdist worker that ran the harness's in-process signal handling before this test may
    hold one: the console would then never see the person's Ctrl-C (seen twice in full-suite runs)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})


def _spawn(echo: bool, *args: str) -> pexpect.spawn:
    """The console in a pty, once its first prompt is out (which may take a minute on a loaded machine);
    each exchange after it gets 20 s. pexpect ends a wait at once if the child dies."""
    env = {**os.environ, "TERM": "xterm"}
    child = pexpect.spawn(sys.executable, ["-c", SHELL, *args], env=env, echo=echo, encoding="utf-8", timeout=20,
                          preexec_fn=_as_a_terminal_session_starts)
    try:
        child.expect_exact(PROMPT, timeout=60)
    except BaseException:
        child.close(force=True)
        raise
    return child


def test_a_program_driving_the_console_reads_only_the_output(tmp_path: Path) -> None:
    child = _spawn(False)
    try:
        assert child.before == ""
        child.sendline("fault leak-ref STORE")
        child.expect_exact(PROMPT)
        assert child.before == "ran 'fault leak-ref STORE'\r\n"  # no echo, no escape sequence
        child.sendline("quit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_a_person_gets_completion_history_and_ctrl_c(tmp_path: Path) -> None:
    history = tmp_path / "history"
    child = _spawn(True, str(history))
    try:
        child.send("fau\tle\t\r")  # tab completes the command, then its subcommand
        child.expect_exact("ran 'fault leak-ref '")
        child.expect_exact(PROMPT)
        child.send("\x1b[A\r")  # up arrow: the last line again
        child.expect_exact("ran 'fault leak-ref '")
        child.expect_exact(PROMPT)
        child.send("vbd li\x03")  # Ctrl-C drops the line, not the session
        child.expect_exact("^C")
        child.expect_exact(PROMPT)
        child.send("quit\r")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    assert history.read_text().splitlines()[-2:] == ["fault leak-ref ", "quit"]


class Late:
    """A runtime whose processor the harness gave up on (stack.timescale) while the console was idle."""

    poll = GuestRuntime.poll
    record_line = GuestRuntime.record_line

    def __init__(self) -> None:
        self.kernel = SimpleNamespace(cpu=Processor())
        self.drivers = self.stopped = self.journal = None
        self.power_lock = threading.RLock()  # GuestRuntime.poll waits for a power transition first

    def write_dump(self, bugcheck: BugCheck) -> Path:
        raise AssertionError("no crash dump for the harness being too slow")


def test_a_deadline_passed_in_a_command_ends_the_guest_without_a_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    late = HarnessTooSlow("no reply from xenstored to READ device/vbd", 5.0)

    def command(rt: object, args: list[str]) -> str:
        raise late

    monkeypatch.setitem(COMMANDS, "slow", console.ConsoleCommand("slow", command, "", Usage(("",))))
    rt = Late()
    stdout = io.StringIO()
    status = console.run(rt, io.StringIO("slow\nlog\n"), stdout)  # type: ignore[arg-type]
    assert status == console.TOO_SLOW_EXIT == 4
    out = stdout.getvalue()
    assert out.endswith(f"\n{console.TOO_SLOW_MARKER}: no reply from xenstored to READ device/vbd within 5s "
                        "(XENPV_TIME_SCALE=1)\n")  # and the session ended: `log` did not run
    assert "STOP" not in out and console.STOP_MARKER not in out
    assert rt.kernel.cpu.too_slow is late  # the other threads of the guest stop too


def test_a_give_up_on_another_thread_is_reported_at_the_next_command() -> None:
    rt = Late()
    rt.kernel.cpu.give_up(HarnessTooSlow("no answer from xenhv to HYPERCALL for dom3", 10.0))
    stdout = io.StringIO()
    assert console.run(rt, io.StringIO("help\n"), stdout) == console.TOO_SLOW_EXIT  # type: ignore[arg-type]
    assert stdout.getvalue() == (f"{PROMPT}\n{console.TOO_SLOW_MARKER}: no answer from xenhv to HYPERCALL for dom3 "
                                 "within 10s (XENPV_TIME_SCALE=1)\n")
