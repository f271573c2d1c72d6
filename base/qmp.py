"""A synchronous QMP session over the `qemu.qmp` library, with every event kept and logged.

qemu.qmp is asyncio-based; the harness is synchronous (tests read like the test plan), so each session
runs its own event loop in a daemon thread. Events are appended to a JSON-lines log (an artifact) and to
an in-memory history that `wait_event` searches, so no event is lost between a command and a wait.
"""
from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterable

from qemu.qmp import ExecuteError, QMPClient

from xenpv.base.errors import HarnessError, WaitTimeout
from xenpv.base.process import Supervised

log = logging.getLogger("harness.qmp")


class QmpError(HarnessError):
    """A QMP command failed; carries the command and QEMU's error class and description."""

    def __init__(self, command: str, arguments: dict[str, Any] | None, error_class: str, desc: str) -> None:
        self.command = command
        self.arguments = arguments
        self.error_class = error_class
        self.desc = desc
        super().__init__(f"QMP {command} {json.dumps(arguments or {})} failed: {error_class}: {desc}")


def _matches(event: dict[str, Any], match: dict[str, Any] | None) -> bool:
    """Recursive sub-dict match, as QEMUMachine.event_match does."""
    if match is None:
        return True
    for key, want in match.items():
        have = event.get(key)
        if isinstance(want, dict):
            if not isinstance(have, dict) or not _matches(have, want):
                return False
        elif have != want:
            return False
    return True


class QmpSession:
    def __init__(self, name: str, event_log: Path | None = None) -> None:
        self.name = name
        self._client = QMPClient(name)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"qmp-{name}", daemon=True)
        self._thread.start()
        self._events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._event_log = open(event_log, "a") if event_log else None
        self._pump: asyncio.Task[None] | None = None

    def _run(self, coro: Any, timeout: float) -> Any:
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout)
        except TimeoutError:
            fut.cancel()
            raise

    def connect(self, address: socket.socket | str, timeout: float = 5.0) -> None:
        self._run(self._connect(address), timeout)

    async def _connect(self, address: socket.socket | str) -> None:
        await self._client.connect(address)
        self._pump = asyncio.get_running_loop().create_task(self._pump_events())

    async def _close(self) -> None:
        try:
            await self._client.disconnect()
        finally:
            if self._pump is not None:
                self._pump.cancel()
                await asyncio.gather(self._pump, return_exceptions=True)

    async def _pump_events(self) -> None:
        async for event in self._client.events:
            self.add_event(dict(event))

    def add_event(self, record: dict[str, Any]) -> None:
        """Log an event and make it visible to wait_event: QEMU's own, and those another source reports
        about the same machine (the libvirt launcher's LIBVIRT_LIFECYCLE, LIBVIRT_DEVICE_REMOVED)."""
        with self._cond:
            if self._event_log is not None:
                self._event_log.write(json.dumps(record) + "\n")
                self._event_log.flush()
            self._events.append(record)
            self._cond.notify_all()

    def command(self, cmd: str, timeout: float = 10.0, **arguments: Any) -> Any:
        args = {k.replace("_", "-"): v for k, v in arguments.items()} or None
        try:
            return self._run(self._client.execute(cmd, args), timeout)
        except ExecuteError as exc:
            err = exc.error.error
            raise QmpError(cmd, args, err.class_, err.desc) from None

    @property
    def events(self) -> list[dict[str, Any]]:
        with self._cond:
            return list(self._events)

    def wait_event(
        self,
        name: str,
        *,
        timeout: float,
        match: dict[str, Any] | None = None,
        alive: Iterable[Supervised] = (),
        after: int = 0,
    ) -> dict[str, Any]:
        """The first event named `name` (matching `match`) at index >= `after` in the history."""
        deadline = time.monotonic() + timeout
        procs = list(alive)
        with self._cond:
            while True:
                for ev in self._events[after:]:
                    if ev.get("event") == name and _matches(ev.get("data", {}), match):
                        return ev
                after = len(self._events)
                for p in procs:
                    p.check_alive(during=f"waiting for QMP event {name}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise WaitTimeout(f"no QMP event {name} {match or ''} within {timeout:.1f}s")
                self._cond.wait(min(remaining, 0.05))

    def close(self, timeout: float = 1.0) -> None:
        try:
            self._run(self._close(), timeout)
        except Exception as exc:  # the peer may already be gone; closing must not fail teardown
            log.debug("%s: disconnect: %s", self.name, exc)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._loop.close()
        if self._event_log is not None:
            self._event_log.close()
