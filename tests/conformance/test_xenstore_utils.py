"""Debian's xenstore-utils, unchanged, against the daemon as a real process over its real socket
(reference §11: XENSTORED_PATH selects the socket)."""
from __future__ import annotations

import os
import re
import select
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from xenpv.backends.xenstored.client import XsClient
from xenpv.backends.xenstored.launch import start_xenstored
from xenpv.base.process import Supervised

UTILS = ("xenstore-write", "xenstore-read", "xenstore-ls", "xenstore-list", "xenstore-exists", "xenstore-rm",
         "xenstore-chmod", "xenstore-watch")


@pytest.fixture(scope="module", autouse=True)
def _utils_installed() -> None:
    # ci/bootstrap.sh installs them: their absence is a broken set-up, not a reason to skip.
    missing = [u for u in UTILS if shutil.which(u) is None]
    if missing:
        pytest.fail(f"xenstore-utils is not installed (no {', '.join(missing)} on PATH); ci/bootstrap.sh "
                    "installs it", pytrace=False)


@pytest.fixture(scope="module")
def daemon() -> Iterator[tuple[Supervised, Path]]:
    rundir = Path(tempfile.mkdtemp(prefix="xsu", dir="/tmp"))  # short: AF_UNIX paths are limited to 108 bytes
    sock = rundir / "socket"
    proc = start_xenstored(sock, rundir / "xenstored.log")
    try:
        yield proc, sock
    finally:
        proc.stop()
        shutil.rmtree(rundir, ignore_errors=True)


@pytest.fixture
def xs(daemon: tuple[Supervised, Path]) -> Iterator["Utils"]:
    proc, sock = daemon
    u = Utils(proc, sock)
    yield u
    proc.check_alive("running xenstore-utils")


class Utils:
    def __init__(self, proc: Supervised, sock: Path) -> None:
        self.proc = proc
        self.sock = sock
        self.env = {**os.environ, "XENSTORED_PATH": str(sock)}

    def run(self, *argv: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(list(argv), env=self.env, capture_output=True, text=True, timeout=10)
        if ok:
            assert r.returncode == 0, f"{argv}: rc {r.returncode}: {r.stderr}"
        return r

    def client(self) -> XsClient:
        return XsClient(self.sock)


def parse_ls(text: str) -> dict[str, tuple[str, str | None]]:
    """xenstore-ls output as {path: (value, perms)}; indentation gives the nesting."""
    tree: dict[str, tuple[str, str | None]] = {}
    stack: list[str] = []
    for line in text.splitlines():
        m = re.fullmatch(r'( *)([^ ]+) = "(.*?)"(?:[ .]*\((.*)\))?', line)
        assert m, f"unparseable xenstore-ls line {line!r}"
        depth = len(m.group(1))
        del stack[depth:]
        stack.append(m.group(2))
        tree["/".join(stack)] = (m.group(3), m.group(4))
    return tree


def test_write_then_read(xs: Utils) -> None:
    xs.run("xenstore-write", "/u/rw/a", "hello", "/u/rw/b", "world")
    assert xs.run("xenstore-read", "/u/rw/a").stdout == "hello\n"
    assert xs.run("xenstore-read", "/u/rw/a", "/u/rw/b").stdout == "hello\nworld\n"
    with xs.client() as c:
        assert c.read("/u/rw/b") == b"world"


def test_read_missing_fails(xs: Utils) -> None:
    r = xs.run("xenstore-read", "/u/missing", ok=False)
    assert r.returncode != 0 and r.stdout == ""


def test_relative_paths_are_under_domain_0(xs: Utils) -> None:
    xs.run("xenstore-write", "relnode", "v")
    with xs.client() as c:
        assert c.read("/local/domain/0/relnode") == b"v"
    assert xs.run("xenstore-read", "relnode").stdout == "v\n"


def test_ls_tree(xs: Utils) -> None:
    xs.run("xenstore-write", "/u/ls/x", "1", "/u/ls/y/z", "two words", "/u/ls/y/w", "")
    tree = parse_ls(xs.run("xenstore-ls", "/u/ls").stdout)
    assert tree == {"x": ("1", None), "y": ("", None), "y/z": ("two words", None), "y/w": ("", None)}


def test_ls_whole_store(xs: Utils) -> None:
    tree = parse_ls(xs.run("xenstore-ls").stdout)
    assert tree["tool"] == ("", None) and tree["tool/xenstored"] == ("", None)


def test_ls_with_permissions(xs: Utils) -> None:
    xs.run("xenstore-write", "/u/lp/a", "v", "/u/lp/b", "w")
    with xs.client() as c:
        c.set_perms("/u/lp/b", ["n1", "r2", f"b{0x7FF5}"])
    tree = parse_ls(xs.run("xenstore-ls", "-p", "/u/lp").stdout)
    assert tree == {"a": ("v", "n0"), "b": ("w", "n1,r2,b32757")}


def test_list(xs: Utils) -> None:
    xs.run("xenstore-write", "/u/list/c", "", "/u/list/a", "", "/u/list/b", "")
    assert xs.run("xenstore-list", "/u/list").stdout.split() == ["c", "a", "b"]


def test_exists(xs: Utils) -> None:
    xs.run("xenstore-write", "/u/ex", "1")
    assert xs.run("xenstore-exists", "/u/ex").returncode == 0
    assert xs.run("xenstore-exists", "/u/ex-not", ok=False).returncode == 1


def test_rm(xs: Utils) -> None:
    xs.run("xenstore-write", "/u/rm/a/b", "1", "/u/rm/c", "2")
    xs.run("xenstore-rm", "/u/rm/a")
    assert xs.run("xenstore-list", "/u/rm").stdout.split() == ["c"]
    assert xs.run("xenstore-exists", "/u/rm/a/b", ok=False).returncode == 1


def test_chmod(xs: Utils) -> None:
    xs.run("xenstore-write", "/u/ch", "v")
    xs.run("xenstore-chmod", "/u/ch", "n0", "r5", "b7")
    with xs.client() as c:
        assert c.get_perms("/u/ch") == ["n0", "r5", "b7"]
    assert parse_ls(xs.run("xenstore-ls", "-p", "/u").stdout)["ch"] == ("v", "n0,r5,b7")


def test_watch(xs: Utils) -> None:
    xs.run("xenstore-write", "/u/wa", "")
    watcher = subprocess.Popen(["xenstore-watch", "-n", "4", "/u/wa"], env=xs.env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        assert watcher.stdout is not None
        # Its first line is the initial event: from then on the watch is registered.
        ready, _, _ = select.select([watcher.stdout], [], [], 10)
        assert ready, "xenstore-watch printed no initial event"
        first = watcher.stdout.readline()
        with xs.client() as c:
            c.write("/u/wa/x", "1")
            c.write("/u/wa/y/z", "2")
            c.rm("/u/wa/x")
        out, err = watcher.communicate(timeout=10)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
    assert watcher.returncode == 0, err
    assert (first + out).split() == ["/u/wa", "/u/wa/x", "/u/wa/y/z", "/u/wa/x"]
