"""The cases of QEMU's tests/unit/test-xs-node.c (reference §10): dom0 is the toolstack, dom1 the guest."""
from __future__ import annotations

import pytest

from xenpv.backends.xenstored.core import XenstoreCore
from xenpv.xenabi.xs_wire import XsdSockmsgType as T

from .peers import Peer, peer

D1 = "/local/domain/1"


@pytest.fixture
def setup(core: XenstoreCore) -> tuple[Peer, Peer]:
    dom0 = Peer(core)
    dom0.write(D1, "")
    dom0.set_perms(D1, "n0", "r1")
    dom0.write(f"{D1}/some", "")
    dom0.set_perms(f"{D1}/some", "n1")
    return dom0, peer(core, 1)


def test_setup_creates_the_domain_path(setup: tuple[Peer, Peer]) -> None:
    dom0, guest = setup
    assert dom0.directory("/local/domain") == ["1"]
    assert dom0.get_perms(D1) == ["n0", "r1"]
    assert guest.directory(D1) == ["some"]


def test_simple(setup: tuple[Peer, Peer]) -> None:
    dom0, guest = setup
    guest.watch("some", "guestwatch")
    assert guest.take_events() == [("some", "guestwatch")], "relative watch fires at once, relative"
    dom0.watch(f"{D1}/some", "qemuwatch")
    assert dom0.take_events() == [(f"{D1}/some", "qemuwatch")]
    assert guest.err(T.READ, b"some/relative/path\0") == "ENOENT"
    guest.write("some/relative/path", "something")
    assert guest.take_events() == [("some/relative/path", "guestwatch")]
    assert dom0.take_events() == [(f"{D1}/some/relative/path", "qemuwatch")]
    assert dom0.read(f"{D1}/some/relative/path") == b"something"
    assert guest.read("some/relative/path") == b"something"
    assert guest.err(T.WRITE, b"/local/domain/badplace\0x") == "EACCES"
    guest.write("some/relative/path2", "something else")
    guest.take_events(), dom0.take_events()
    assert guest.directory("some/relative") == ["path", "path2"]
    gen1 = guest.ok(T.DIRECTORY_PART, b"some/relative\x000\0").split(b"\0")[0]
    guest.write("some/relative/path3", "")
    gen2 = guest.ok(T.DIRECTORY_PART, b"some/relative\x000\0").split(b"\0")[0]
    assert gen1 != gen2, "the generation count changes with the child list"
    guest.rm("some/relative/path3")
    guest.take_events(), dom0.take_events()
    assert guest.ok(T.UNWATCH, b"some\0guestwatch\0") == b"OK\0"
    assert guest.unwatch_err("some", "guestwatch") == "ENOENT"
    guest.watch("some/relative/path", "leafwatch")
    assert guest.take_events() == [("some/relative/path", "leafwatch")]
    guest.rm("some/relative")
    assert guest.take_events() == [("some/relative/path", "leafwatch")], "a removed descendant fires its own path"
    assert dom0.take_events() == [(f"{D1}/some/relative", "qemuwatch")], "the removed node fires for ancestors"


def test_tx_abort(setup: tuple[Peer, Peer]) -> None:
    dom0, guest = setup
    dom0.watch(f"{D1}/some", "w")
    dom0.take_events()
    tx = guest.tx_start()
    guest.write("some/relative/path", "x", tx)
    assert guest.read("some/relative/path", tx) == b"x"
    assert guest.tx_end(tx, commit=False) == "OK"
    assert guest.err(T.READ, b"some/relative/path\0") == "ENOENT"
    assert dom0.take_events() == [] and guest.take_events() == []


def test_tx_fail(setup: tuple[Peer, Peer]) -> None:
    dom0, guest = setup
    tx = guest.tx_start()
    guest.write("some/relative/path", "in tx", tx)
    dom0.write(f"{D1}/some/relative/path", "global")
    assert guest.tx_end(tx) == "EAGAIN"
    assert dom0.read(f"{D1}/some/relative/path") == b"global"


def test_tx_succeed(setup: tuple[Peer, Peer]) -> None:
    dom0, guest = setup
    dom0.watch(f"{D1}/some", "w")
    dom0.take_events()
    tx = guest.tx_start()
    guest.write("some/relative/path", "x", tx)
    assert guest.read("some/relative/path", tx) == b"x"
    assert guest.err(T.READ, b"some/relative/path\0") == "ENOENT", "not visible outside before commit"
    assert dom0.take_events() == [], "no events before commit"
    assert guest.tx_end(tx) == "OK"
    assert dom0.take_events() == [(f"{D1}/some/relative/path", "w")]
    assert guest.read("some/relative/path") == b"x"


def test_tx_sees_snapshot_not_later_writes(setup: tuple[Peer, Peer]) -> None:
    dom0, guest = setup
    dom0.write(f"{D1}/some/a", "old")
    tx = guest.tx_start()
    assert guest.read("some/a", tx) == b"old"
    dom0.write(f"{D1}/some/a", "new")
    assert guest.read("some/a", tx) == b"old"
    assert guest.tx_end(tx) == "EAGAIN"


def test_tx_rm(setup: tuple[Peer, Peer]) -> None:
    dom0, guest = setup
    guest.write("some/deep/dark/relative/path", "x")
    guest.watch("some/deep/dark", "w")
    guest.take_events()
    tx = guest.tx_start()
    guest.rm("some/deep/dark", tx)
    assert guest.read("some/deep/dark/relative/path") == b"x", "rm in a transaction is invisible outside"
    assert guest.err(T.READ, b"some/deep/dark\0", tx) == "ENOENT"
    assert guest.take_events() == []
    assert guest.tx_end(tx) == "OK"
    assert guest.take_events() == [("some/deep/dark", "w")]
    assert guest.err(T.READ, b"some/deep/dark\0") == "ENOENT"


def test_tx_resurrect(setup: tuple[Peer, Peer]) -> None:
    dom0, guest = setup
    guest.write("some/deep/dark/relative/path", "x")
    guest.watch("some/deep/dark", "dark")
    guest.watch("some/deep/dark/relative", "rel")
    guest.take_events()
    tx = guest.tx_start()
    guest.rm("some/deep", tx)
    guest.write("some/deep/dark/different/path", "y", tx)
    assert guest.take_events() == []
    assert guest.tx_end(tx) == "OK"
    assert set(guest.take_events()) == {
        ("some/deep/dark/different/path", "dark"),
        ("some/deep/dark", "dark"),
        ("some/deep/dark/relative", "rel"),
    }
    assert guest.directory("some/deep/dark") == ["different"]


def test_tx_resurrect2(setup: tuple[Peer, Peer]) -> None:
    dom0, guest = setup
    guest.write("some/deep/dark/relative/path", "x")
    guest.watch("some/deep/dark/relative", "rel")
    guest.take_events()
    tx = guest.tx_start()
    guest.rm("some/deep", tx)
    guest.write("some/deep/dark/relative/path", "again", tx)
    assert guest.tx_end(tx) == "OK"
    assert set(guest.take_events()) == {("some/deep/dark/relative", "rel"), ("some/deep/dark/relative/path", "rel")}
    assert guest.read("some/deep/dark/relative/path") == b"again"
