"""Shared by the lifetime tests of rings and atomic memory."""
from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

ReleaseCheck = Callable[[Callable[[], object], Callable[[], object], str], None]


class Gate:
    """Holds a thread inside a call: the call reaches `enter()` (through a value it converts), which
    blocks until the test opens the gate."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.opened = threading.Event()

    def enter(self) -> None:
        self.entered.set()
        assert self.opened.wait(10), "the test never opened the gate"


@pytest.fixture
def gate() -> Gate:
    return Gate()


@pytest.fixture
def release_waits_for_user(gate: Gate) -> ReleaseCheck:
    """`check(use, release, what)`: with `use` (which passes through the gate) in progress on one thread,
    `release` on another must not return until `use` has finished; both then succeed."""

    def check(use: Callable[[], object], release: Callable[[], object], what: str) -> None:
        failures: list[BaseException] = []

        def run(fn: Callable[[], object]) -> None:
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - reported below
                failures.append(exc)

        user = threading.Thread(target=run, args=(use,))
        user.start()
        assert gate.entered.wait(5)
        releaser = threading.Thread(target=run, args=(release,))
        releaser.start()
        releaser.join(0.3)
        assert releaser.is_alive(), f"{what} returned while a user was still on the memory"
        gate.opened.set()
        user.join(5)
        releaser.join(5)
        assert not user.is_alive() and not releaser.is_alive() and failures == []

    return check
