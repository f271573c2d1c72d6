"""The cases of Xen's tools/tests/xenstore/test-xenstore.c (reference §10), over a dom0 connection with
the relative TEST_PATH the C test uses."""
from __future__ import annotations

import os

import pytest

from xenpv.backends.xenstored.core import XenstoreCore

from .peers import Peer

TP = f"xenstore-test/{os.getpid()}"
ABS = f"/local/domain/0/{TP}"
CHILDREN = [chr(ord("a") + i) for i in range(10)]


@pytest.fixture
def xs(core: XenstoreCore) -> Peer:
    p = Peer(core)
    for c in CHILDREN:
        p.write(f"{TP}/{c}", c)
    return p


def test_relative_test_path_lands_under_dom0(xs: Peer) -> None:
    assert xs.read(f"{ABS}/a") == b"a"


def test_read_1(xs: Peer) -> None:
    assert xs.read(f"{TP}/b") == b"b"


def test_read_2000(xs: Peer) -> None:
    data = bytes(ord("a") + i % 26 for i in range(2000))
    xs.write(f"{TP}/big", data)
    assert xs.read(f"{TP}/big") == data


@pytest.mark.parametrize("size", [1, 2000])
def test_write_exact_bytes(xs: Peer, size: int) -> None:
    data = bytes((i * 7) % 256 for i in range(size))
    xs.write(f"{TP}/a", data)
    assert xs.read(f"{TP}/a") == data


def test_dir_exactly_ten_children(xs: Peer) -> None:
    assert xs.directory(TP) == CHILDREN


def test_rm_node(xs: Peer) -> None:
    xs.rm(f"{TP}/a")
    assert xs.err(2, f"{TP}/a\0".encode()) == "ENOENT"
    assert xs.directory(TP) == CHILDREN[1:]


def test_rm_dir(xs: Peer) -> None:
    xs.rm(TP)
    assert xs.err(1, f"{TP}\0".encode()) == "ENOENT"


def test_ta_empty(xs: Peer) -> None:
    while True:
        tx = xs.tx_start()
        result = xs.tx_end(tx)
        if result != "EAGAIN":
            break
    assert result == "OK"


def test_ta_empty_abort(xs: Peer) -> None:
    assert xs.tx_end(xs.tx_start(), commit=False) == "OK"


def test_ta_rmw(xs: Peer) -> None:
    tx = xs.tx_start()
    assert xs.read(f"{TP}/a", tx) == b"a"
    xs.write(f"{TP}/a", "b", tx)
    assert xs.read(f"{TP}/a", tx) == b"b"
    assert xs.read(f"{TP}/a") == b"a"
    assert xs.tx_end(tx) == "OK"
    assert xs.read(f"{TP}/a") == b"b"


def test_ta_rmw_abort(xs: Peer) -> None:
    tx = xs.tx_start()
    assert xs.read(f"{TP}/a", tx) == b"a"
    xs.write(f"{TP}/a", "b", tx)
    assert xs.read(f"{TP}/a", tx) == b"b"
    assert xs.tx_end(tx, commit=False) == "OK"
    assert xs.read(f"{TP}/a") == b"a"


def test_ta_err(xs: Peer) -> None:
    tx = xs.tx_start()
    assert xs.read(f"{TP}/a", tx) == b"a"
    xs.write(f"{TP}/a", "b")
    assert xs.read(f"{TP}/a", tx) == b"a", "a transaction reads its snapshot"
    xs.write(f"{TP}/a", "c", tx)
    assert xs.read(f"{TP}/a", tx) == b"c"
    assert xs.tx_end(tx) == "EAGAIN"
    assert xs.read(f"{TP}/a") == b"b"


def test_cleanup_loop(xs: Peer) -> None:
    xs.rm(TP)
    while True:
        tx = xs.tx_start()
        if not xs.directory("xenstore-test", tx):
            xs.rm("xenstore-test", tx)
        if xs.tx_end(tx) != "EAGAIN":
            break
    assert xs.err(2, b"xenstore-test\0") == "ENOENT"
