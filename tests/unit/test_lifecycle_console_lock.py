"""`xenpv run --console` serves `xenpv save|restore|migrate` from other shells on lifecycle.sock while its
own console reads commands: the two must take turns, or a save stops the vCPU under a half-done command."""
from __future__ import annotations

import builtins
import threading
from pathlib import Path
from typing import Any

import pytest

from xenpv.harness import commands
from xenpv.harness.lifecycle_cli import LifecycleServer, _ask


class _Console:
    pid = 1234

    def __init__(self, saving: threading.Event) -> None:
        self.saving = saving
        self.ran_during_save: list[bool] = []

    def run(self, line: str) -> str:
        self.ran_during_save.append(self.saving.is_set())
        return f"ran {line}"


class _Guest:
    """The server's view of a guest: save blocks until the test lets it finish."""
    state = "running"
    domain = None
    name = "lock-test"

    def __init__(self) -> None:
        self.saving = threading.Event()
        self.release = threading.Event()
        self.console = _Console(self.saving)

    def save(self, path: Path, *, checkpoint: bool = False) -> Any:
        self.saving.set()
        try:
            if not self.release.wait(10.0):
                raise AssertionError("the test never released the save")
        finally:
            self.saving.clear()
        raise KeyError("saved nothing (test guest)")


def test_a_console_command_waits_for_a_save_from_another_shell(tmp_path: Path, monkeypatch, capsys) -> None:
    guest = _Guest()
    server = LifecycleServer(guest, tmp_path)  # type: ignore[arg-type]
    try:
        client = threading.Thread(target=_ask, args=(server.path, {"op": "save", "path": str(tmp_path / "s")}, 10.0))
        client.start()
        assert guest.saving.wait(10.0), "the save request never reached the guest"
        lines = iter(["devices"])

        def fake_input(prompt: str = "") -> str:
            # the command is typed while the save runs; let the save finish a moment later
            threading.Timer(0.3, guest.release.set).start()
            try:
                return next(lines)
            except StopIteration:
                raise EOFError from None

        monkeypatch.setattr(builtins, "input", fake_input)
        commands._interactive(guest, server.lock)  # type: ignore[arg-type]
        client.join(10.0)
        assert not client.is_alive()
    finally:
        guest.release.set()
        server.close()
    assert guest.console.ran_during_save == [False]
    assert "ran devices" in capsys.readouterr().out
