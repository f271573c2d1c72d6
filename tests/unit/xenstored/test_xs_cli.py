"""`xenpv xs` against a daemon process."""
from __future__ import annotations

from typing import Iterator

import pytest

from xenpv.backends.xenstored.client import XsClient
from xenpv.harness.cli import main

from .daemon_fixture import RunningDaemon, running_daemon


@pytest.fixture(scope="module")
def daemon() -> Iterator[RunningDaemon]:
    yield from running_daemon("xsc")


def test_write_read_ls_rm(daemon: RunningDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    sock = str(daemon.sock)
    assert main(["xs", "--socket", sock, "write", "/c/a", "1", "/c/b/x", "two"]) == 0
    assert main(["xs", "--socket", sock, "read", "/c/a", "/c/b/x"]) == 0
    assert capsys.readouterr().out == "1\ntwo\n"
    assert main(["xs", "--socket", sock, "ls", "-p", "/c"]) == 0
    assert capsys.readouterr().out == 'a = "1"  (n0)\nb = ""  (n0)\n x = "two"  (n0)\n'
    assert main(["xs", "--socket", sock, "rm", "/c/b"]) == 0
    assert main(["xs", "--socket", sock, "read", "/c/b"]) == 1
    assert "ENOENT" in capsys.readouterr().err


def test_socket_from_environment(daemon: RunningDaemon, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("XENSTORED_PATH", str(daemon.sock))
    assert main(["xs", "write", "/env", "ok"]) == 0
    assert main(["xs", "read", "/env"]) == 0
    assert capsys.readouterr().out == "ok\n"


def test_watch_count_and_timeout(daemon: RunningDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    with XsClient(daemon.sock) as c:
        c.write("/w/pre", "")
    assert main(["xs", "--socket", str(daemon.sock), "watch", "-n", "1", "/w"]) == 0
    assert capsys.readouterr().out == "/w\n"
    assert main(["xs", "--socket", str(daemon.sock), "watch", "--timeout", "0.2", "/w"]) == 0
    assert capsys.readouterr().out == "/w\n"
