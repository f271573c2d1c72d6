"""Machine-wide exclusive resources for tests: `@pytest.mark.exclusive("name")` (harness.plugin).

Tests marked with one name never run at the same time, in any xdist worker or any pytest session on the
machine: each holds an flock(2) on `<lease dir>/<name>.exclusive` from its set-up to its teardown (the
lease directory of harness.hosts, shared by every run). The kernel drops the lock with its process, so a
killed run frees the resource; the file names the holder for a waiter's error message.
"""
from __future__ import annotations

import fcntl
import os
import re
from dataclasses import dataclass
from pathlib import Path

from xenpv.base.errors import HarnessError
from xenpv.base.owner import Owner
from xenpv.harness.hosts import flock_within, release_lock_file, write_owner

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass(eq=False)
class ExclusiveResource:
    name: str
    path: Path
    fd: int | None = None

    @classmethod
    def acquire(cls, lease_dir: Path, name: str, timeout: float, poll: float = 0.1) -> "ExclusiveResource":
        if not _NAME.match(name):
            raise HarnessError(f"exclusive resource name {name!r}: use 1-64 letters, digits, '_', '.', '-'")
        lease_dir.mkdir(parents=True, exist_ok=True)
        path = lease_dir / f"{name}.exclusive"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        if not flock_within(fd, fcntl.LOCK_EX, timeout, poll):
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise HarnessError(f"exclusive resource {name!r} still held by {holder} after {timeout:.0f} s ({path})")
        write_owner(fd, Owner.current())
        return cls(name, path, fd)

    def release(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        release_lock_file(fd)
