"""Fuzz the real daemon over its socket for a bounded time with random and mutated messages.

Each message must get exactly one reply echoing its ids (or, for an oversize length, a disconnect);
a rejected request must leave the tree (values and permissions) unchanged and be refused by a rule, not
by a defect: EIO (what the daemon answers when it contains an internal exception) fails the fuzz, and so
does a non-zero internal-error count at the end; the daemon stays up and a bystander connection keeps
working and receiving its watch events throughout.
"""
from __future__ import annotations

import os
import random
import time
from typing import Iterator

import pytest

from xenpv.backends.xenstored.client import XsClient, XsConnectionError
from xenpv.xenabi.xs_wire import XSD_SOCKMSG, XsdSockmsgType as T

from .daemon_fixture import RunningDaemon, running_daemon

FUZZ_SECONDS = float(os.environ.get("XS_FUZZ_SECONDS", "5"))
MIN_MESSAGES = 250
MAX_SECONDS = 120.0
SEED = int(os.environ.get("XENPV_SEED", "20240611"))

VALID: list[tuple[int, bytes]] = [
    (T.READ, b"/fz/a\0"), (T.WRITE, b"/fz/a\0value"), (T.WRITE, b"fz/rel\0v"), (T.MKDIR, b"/fz/d/e\0"),
    (T.RM, b"/fz/d\0"), (T.DIRECTORY, b"/fz\0"), (T.DIRECTORY_PART, b"/fz\x000\0"), (T.GET_PERMS, b"/fz\0"),
    (T.SET_PERMS, b"/fz/a\0n0\0r1\0"), (T.WATCH, b"/fz\0tok\0"), (T.UNWATCH, b"/fz\0tok\0"),
    (T.WATCH, b"/fz\0tok\x001\0"), (T.TRANSACTION_START, b"\0"), (T.TRANSACTION_END, b"T\0"),
    (T.TRANSACTION_END, b"F\0"), (T.GET_DOMAIN_PATH, b"3\0"), (T.IS_DOMAIN_INTRODUCED, b"3\0"),
    (T.INTRODUCE, b"3\x001\x002\0"), (T.RELEASE, b"3\0"), (T.RESUME, b"3\0"), (T.SET_TARGET, b"3\x004\0"),
    (T.RESET_WATCHES, b"\0"), (T.GET_FEATURE, b""), (T.CONTROL, b"print\0hello\0"),
]
ALPHABET = b"/\0@-_azAZ09.*\xff "


def mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        choice = rng.random()
        if choice < 0.3 and b:
            b[rng.randrange(len(b))] = rng.choice(ALPHABET)
        elif choice < 0.55:
            b.insert(rng.randint(0, len(b)), rng.choice(ALPHABET))
        elif choice < 0.8 and b:
            del b[rng.randrange(len(b))]
        else:
            b += bytes(rng.choice(ALPHABET) for _ in range(rng.randint(1, 40)))
    return bytes(b)


def next_message(rng: random.Random, tx_ids: list[int]) -> tuple[int, int, bytes]:
    r = rng.random()
    if r < 0.15:
        mtype = rng.choice([rng.randrange(40), rng.randrange(1 << 32), 0xFFFF])
        payload = bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
    elif r < 0.85:
        mtype, payload = rng.choice(VALID)
        payload = mutate(rng, payload)
        if rng.random() < 0.1:
            mtype = rng.randrange(30)
    else:
        mtype, payload = rng.choice(VALID)
    tx = rng.choice([0, 0, 0, rng.randrange(1 << 32), *tx_ids[-2:]])
    return mtype, tx, payload[:4096]


def internal_errors(c: XsClient) -> int:
    """The daemon's count of contained internal errors (XS_CONTROL internal-errors, dom0 only)."""
    return int(c.request(T.CONTROL, b"internal-errors\0")[:-1])


def dump(c: XsClient, path: str = "/") -> dict[str, tuple[bytes, tuple[str, ...]]]:
    out = {path: (c.read(path), tuple(c.get_perms(path)))}
    for name in c.directory(path):
        out.update(dump(c, f"{path.rstrip('/')}/{name}"))
    return out


@pytest.fixture
def daemon() -> Iterator[RunningDaemon]:
    yield from running_daemon("xsf")


def test_fuzz(daemon: RunningDaemon) -> None:
    rng = random.Random(SEED)
    observer = XsClient(daemon.sock, timeout=5)
    bystander = XsClient(daemon.sock, timeout=5)
    fuzz = XsClient(daemon.sock, timeout=5)
    try:
        observer.write("/fz/a", "start")
        bystander.watch("/bystander", "b")
        assert bystander.read_event() == ("/bystander", "b")
        snapshot = dump(observer)
        tx_ids: list[int] = []
        sent = rejected = disconnects = 0
        # At least FUZZ_SECONDS and at least MIN_MESSAGES: on a loaded machine (the stress run, mutation testing
        # beside a suite) a second holds few messages, and the fuzz must still reach its depth.
        start = time.monotonic()
        while time.monotonic() - start < FUZZ_SECONDS or sent < MIN_MESSAGES:
            assert time.monotonic() - start < MAX_SECONDS, f"only {sent} messages in {MAX_SECONDS:.0f} s"
            if rng.random() < 0.01:
                fuzz.send_raw(XSD_SOCKMSG.pack(rng.randrange(30), 0, 0, rng.randrange(4097, 1 << 32)) + b"junk")
                with pytest.raises(XsConnectionError):
                    fuzz.read_message(2)  # dropped: only this connection, and nothing else changes
                fuzz.close()
                fuzz = XsClient(daemon.sock, timeout=5)
                tx_ids.clear()
                disconnects += 1
                assert dump(observer) == snapshot
                continue
            mtype, tx, payload = next_message(rng, tx_ids)
            req_id = rng.randrange(1 << 32)
            fuzz.send_raw(XSD_SOCKMSG.pack(mtype, req_id, tx, len(payload)) + payload)
            sent += 1
            while True:
                rtype, rreq, rtx, body = fuzz.read_message(2)
                if rtype != T.WATCH_EVENT:
                    break
            context = f"seed {SEED}, message {sent}: type {mtype} tx {tx} payload {payload!r} -> {rtype} {body!r}"
            assert (rreq, rtx) == (req_id, tx), context
            assert rtype in (mtype, T.ERROR), context
            if rtype == T.ERROR:
                rejected += 1
                assert body.endswith(b"\0") and body[:-1].isupper(), context
                assert body != b"EIO\0", f"the daemon contained an internal error (see its log): {context}"
                assert dump(observer) == snapshot, f"rejected request changed the tree: {context}"
            else:
                if mtype == T.TRANSACTION_START:
                    tx_ids.append(int(body[:-1]))
                snapshot = dump(observer)
        daemon.proc.check_alive("fuzzing")
        assert internal_errors(observer) == 0, f"internal errors: see {daemon.rundir / 'xenstored.log'}"
        bystander.write("/bystander/still", "here")
        assert bystander.read_event() == ("/bystander/still", "b")
        with XsClient(daemon.sock) as fresh:
            assert fresh.read("/bystander/still") == b"here"
        print(f"fuzz: {sent} messages, {rejected} rejected, {disconnects} disconnects (seed {SEED})")
        assert sent > 200 and rejected > 50, (sent, rejected, disconnects)
    finally:
        for c in (observer, bystander, fuzz):
            c.close()
