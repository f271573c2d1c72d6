"""The host pool (issue 17, first part): the hosts file and the leases of its hosts' guest slots.

The hosts file (`--xenpv-hosts hosts.yaml`) is a YAML list, one mapping per host:

    - host: 10.0.0.7            # address or name sshd listens on
      port: 22                  # optional, default 22
      user: ci                  # the remote account
      key_file: keys/ci_ed25519 # private key; relative paths are taken from the hosts file's directory
      known_hosts: known_hosts  # the host's key, checked on every connection (never added on first use)
      max_guests: 2             # optional, default 1: how many guests may run there at once
      run_dir: /var/tmp/xenpv   # where the harness keeps its files on that host

An entry `- host: local` (with `max_guests`, nothing else) is this machine itself: its guests run in the
test's own process, as without a pool; its slots are leased the same way, so one pool spreads a run's
guests over this machine and the SSH hosts.

A host with `max_guests: N` has N slots. A slot is leased through one file per slot in the lease
directory, `<host>_<port>.<slot>.lease`, locked with flock(2) and holding its owner (`<pid>.<start>`,
base.owner). flock, not POSIX (lockf/F_SETLK) locks: those never conflict within one process and all go
when any descriptor of the file is closed, so two leases of one process would share a slot. The kernel
drops a flock with its last descriptor, so a lease ends with its process however it ends (SIGKILL too);
the next leaser finds the file unlocked, reads the dead owner in it and takes the slot over (logged).
A lock still held while the owner written in the file is dead (a child that inherited the descriptor
across fork outlived it) is broken: the file is removed and the next attempt makes a new one. Leasers
claim a slot under a shared lock of the directory (`.pool.lock`) and a breaker removes a file under its
exclusive lock, so a file is never removed while a leaser is claiming it.

When every slot of every usable host is leased, `lease()` waits, polling, up to its `timeout` (0: refuse
at once) and then raises PoolExhausted naming the holders. A host whose connection dropped (or that could
not be reached, or refused our key or showed another host key) is marked bad for the rest of the run —
this pool object's life — and is not leased again; when all hosts are bad, `lease()` says why each is.
Pools given a `bad_dir` (every xdist worker of one pytest session gets the session's) share the marks: a
mark is a file `<host>_<port>.bad` there holding the reason, so a host one worker lost is not leased by
the others either.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from xenpv.base.errors import ConfigError, HarnessError
from xenpv.base.owner import Owner

log = logging.getLogger("harness.hosts")

LEASE_DIR_ENV = "XENPV_LEASE_DIR"
DEFAULT_LEASE_DIR = Path("/tmp/xenpv-leases")
_POOL_LOCK = ".pool.lock"
GUARD_TIMEOUT = 10.0  # seconds; the directory lock is held for a few system calls at a time
_FIELDS = ("host", "port", "user", "key_file", "known_hosts", "max_guests", "run_dir")
LOCAL = "local"  # the host name of this machine's own entry
_LOCAL_FIELDS = ("host", "max_guests")


class HostsFileError(ConfigError):
    """The hosts file cannot be used; the message names the file, the entry and the field."""

    def __init__(self, path: Path, entry: str, field_: str, reason: str) -> None:
        self.path = path
        self.entry = entry
        self.field = field_
        self.reason = reason
        where = ": ".join(part for part in (str(path), entry, field_) if part)
        super().__init__(f"{where}: {reason}")


class PoolExhausted(HarnessError):
    """No slot of a usable host became free before the deadline, or every host is bad."""


@dataclass(frozen=True)
class HostSpec:
    """One entry of the hosts file, checked; paths are absolute."""

    host: str
    user: str
    key_file: Path
    known_hosts: Path
    run_dir: str
    port: int = 22
    max_guests: int = 1

    @property
    def name(self) -> str:
        return LOCAL if self.is_local else f"{self.user}@{self.host}:{self.port}"

    @property
    def is_local(self) -> bool:
        return self.host == LOCAL

    @classmethod
    def local(cls, max_guests: int = 1) -> "HostSpec":
        """This machine: no SSH, so no account, key or remote directory."""
        return cls(host=LOCAL, user="", key_file=Path(os.devnull), known_hosts=Path(os.devnull), run_dir="",
                   port=0, max_guests=max_guests)


def _entry_name(index: int, raw: Any) -> str:
    host = raw.get("host") if isinstance(raw, dict) else None
    return f"host {index + 1}" + (f" ({host})" if isinstance(host, str) and host else "")


def _parse_entry(path: Path, index: int, raw: Any) -> HostSpec:
    entry = _entry_name(index, raw)

    def fail(field_: str, reason: str) -> HostsFileError:
        return HostsFileError(path, entry, field_, reason)

    if not isinstance(raw, dict):
        raise fail("", f"must be a mapping of {', '.join(_FIELDS)}, got {type(raw).__name__}")
    local = raw.get("host") == LOCAL
    fields = _LOCAL_FIELDS if local else _FIELDS
    unknown = sorted(str(k) for k in raw if k not in fields)
    if unknown:
        if local and unknown[0] in _FIELDS:
            raise fail(unknown[0], "not for the local host (it takes only max_guests): its guests run here")
        raise fail(unknown[0], f"unknown field (the fields are {', '.join(_FIELDS)})")

    def text(name: str) -> str:
        if name not in raw:
            raise fail(name, "missing")
        value = raw[name]
        if not isinstance(value, str) or not value.strip():
            raise fail(name, f"must be a non-empty string, got {value!r}")
        return value.strip()

    def integer(name: str, default: int, low: int, high: int) -> int:
        value = raw.get(name, default)
        # bool is an int to Python; `port: yes` is a mistake, not port 1.
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise fail(name, f"must be an integer from {low} to {high}, got {value!r}")
        return value

    def file(name: str) -> Path:
        p = Path(os.path.expanduser(text(name)))
        p = p if p.is_absolute() else (path.parent / p)
        if not p.is_file():
            raise fail(name, f"{p}: no such file")
        if not os.access(p, os.R_OK):
            raise fail(name, f"{p}: not readable")
        return p.resolve()

    if local:
        return HostSpec.local(integer("max_guests", 1, 1, 1024))
    run_dir = text("run_dir")
    if not run_dir.startswith("/"):
        # A relative path would depend on the remote account's home and login shell.
        raise fail("run_dir", f"must be an absolute path on the remote host, got {run_dir!r}")
    return HostSpec(host=text("host"), user=text("user"), key_file=file("key_file"),
                    known_hosts=file("known_hosts"), run_dir=run_dir.rstrip("/") or "/",
                    port=integer("port", 22, 1, 65535), max_guests=integer("max_guests", 1, 1, 1024))


def load_hosts(path: Path) -> list[HostSpec]:
    """The hosts of the hosts file `path`, checked (HostsFileError names what is wrong)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise HostsFileError(path, "", "", f"cannot be read: {exc.strerror}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else ""
        raise HostsFileError(path, where, "", f"not valid YAML: {getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(doc, list) or not doc:
        raise HostsFileError(path, "", "", f"must be a non-empty list of hosts, got {type(doc).__name__}")
    hosts = [_parse_entry(path, i, raw) for i, raw in enumerate(doc)]
    seen: dict[tuple[str, int], int] = {}
    for i, h in enumerate(hosts):
        first = seen.setdefault((h.host, h.port), i)
        if first != i:
            # Two entries for one sshd would lease its slots twice over.
            raise HostsFileError(path, _entry_name(i, doc[i]), "host",
                                 f"{h.host}:{h.port} is also host {first + 1}")
    return hosts


def lease_dir_default() -> Path:
    """$XENPV_LEASE_DIR, else /tmp/xenpv-leases: one directory for every run on this machine, so that two
    runs share a host's slots instead of each filling it."""
    raw = os.environ.get(LEASE_DIR_ENV)
    return Path(raw) if raw else DEFAULT_LEASE_DIR


def _host_file(spec: HostSpec) -> str:
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', spec.host)}_{spec.port}"


def _slot_file(spec: HostSpec, slot: int) -> str:
    return f"{_host_file(spec)}.{slot}.lease"


def release_lock_file(fd: int) -> None:
    """Let go of an flock'd file that names its holder: emptied first, so that a reader never takes a
    released lock for one a live owner holds, then closed (which drops the flock)."""
    try:
        os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def flock_within(fd: int, how: int, timeout: float, poll: float) -> bool:
    """flock(2) `fd` (LOCK_SH or LOCK_EX), retrying every `poll` s for up to `timeout` s; False if it stayed
    taken. Polled, not blocking: a blocking flock has no deadline."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, how | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll)


def write_owner(fd: int, owner: Owner) -> None:
    """Name `owner` in a lock file just taken (a reader finds who holds it, or whose it was)."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{owner}\n".encode(), 0)


def _read_owner(fd: int) -> Owner | None:
    raw = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
    return Owner.parse(raw)


@dataclass(eq=False)
class HostLease:
    """One slot of one host, held until `release()` (or the end of the process)."""

    pool: "HostPool"
    spec: HostSpec
    slot: int
    path: Path
    fd: int | None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def release(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        release_lock_file(fd)
        self.pool._forget(self)
        log.info("%s slot %d released", self.spec.name, self.slot)

    def __enter__(self) -> "HostLease":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass
class HostPool:
    hosts: list[HostSpec]
    lease_dir: Path = field(default_factory=lease_dir_default)
    poll_interval: float = 0.1
    bad_dir: Path | None = None  # shared marks (module docstring); None: this pool's own only
    _bad: dict[str, str] = field(default_factory=dict, init=False)  # host name -> why
    _leases: list[HostLease] = field(default_factory=list, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def __post_init__(self) -> None:
        try:
            self.lease_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"lease directory {self.lease_dir}: cannot be made: {exc.strerror}") from None
        if not os.access(self.lease_dir, os.W_OK | os.X_OK):
            raise ConfigError(f"lease directory {self.lease_dir}: not writable")
        if self.bad_dir is not None:
            self.bad_dir.mkdir(parents=True, exist_ok=True)

    def mark_bad(self, spec: HostSpec, reason: str) -> None:
        with self._lock:
            if spec.name in self.bad:
                return
            log.warning("%s marked bad for the rest of the run: %s", spec.name, reason)
            self._bad[spec.name] = reason
            if self.bad_dir is not None:
                # Written whole under a temporary name: a reader sees no mark or all of it.
                final = self.bad_dir / f"{_host_file(spec)}.bad"
                tmp = final.with_name(f".{final.name}.{os.getpid()}")
                tmp.write_text(reason + "\n")
                os.replace(tmp, final)

    @property
    def bad(self) -> dict[str, str]:
        """Host name -> why it is bad: this pool's marks and, with a bad_dir, every other pool's."""
        marks = dict(self._bad)
        if self.bad_dir is not None:
            for spec in self.hosts:
                if spec.name not in marks:
                    try:
                        marks[spec.name] = (self.bad_dir / f"{_host_file(spec)}.bad").read_text().strip()
                    except FileNotFoundError:
                        pass
        return marks

    def usable(self) -> list[HostSpec]:
        bad = self.bad
        return [h for h in self.hosts if h.name not in bad]

    def lease(self, timeout: float = 0.0, host: str | None = None) -> HostLease:
        """A free slot of a usable host (first host first; only the host named `host`, when given), waiting
        up to `timeout` seconds for one."""
        if host is not None and host not in {h.name for h in self.hosts}:
            raise ConfigError(f"no host {host!r} in the pool (it has {', '.join(h.name for h in self.hosts)})")
        deadline = time.monotonic() + timeout
        while True:
            candidates = [h for h in self.usable() if host is None or h.name == host]
            if not candidates:
                bad = self.bad
                why = "; ".join(f"{n}: {r}" for n, r in bad.items() if host is None or n == host)
                raise PoolExhausted(f"no usable host in the pool ({why})")
            for spec in candidates:
                for slot in range(spec.max_guests):
                    lease = self._try_slot(spec, slot)
                    if lease is not None:
                        return lease
            if time.monotonic() >= deadline:
                raise PoolExhausted(f"every slot is leased after {timeout:.1f} s: {self._holders(candidates)}")
            time.sleep(self.poll_interval)

    def close(self) -> None:
        for lease in list(self._leases):
            lease.release()

    def __enter__(self) -> "HostPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _forget(self, lease: HostLease) -> None:
        with self._lock:
            if lease in self._leases:
                self._leases.remove(lease)

    def _holders(self, hosts: list[HostSpec]) -> str:
        parts = []
        for spec in hosts:
            for slot in range(spec.max_guests):
                try:
                    owner = (self.lease_dir / _slot_file(spec, slot)).read_text().strip() or "?"
                except OSError:
                    owner = "?"
                parts.append(f"{spec.name} slot {slot} by {owner}")
        return ", ".join(parts)

    def _guard(self, how: int) -> int:
        """The lease directory's own lock: shared while a leaser locks and claims a slot, exclusive while
        a stale file is broken, so a breaker never unlinks a file a leaser is claiming. Every holder keeps
        it for a few system calls only; one that keeps it for seconds was stopped in the middle."""
        fd = os.open(self.lease_dir / _POOL_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            if flock_within(fd, how, GUARD_TIMEOUT, 0.005):
                return fd
            raise HarnessError(f"{self.lease_dir / _POOL_LOCK}: still locked after {GUARD_TIMEOUT:.0f} s "
                               f"(a leaser stopped while claiming a slot?)")
        except BaseException:
            os.close(fd)
            raise

    def _try_slot(self, spec: HostSpec, slot: int) -> HostLease | None:
        path = self.lease_dir / _slot_file(spec, slot)
        stale: tuple[int, Owner] | None = None
        guard = self._guard(fcntl.LOCK_SH)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                        raise
                    holder = _read_owner(fd)
                    if holder is not None and not holder.alive():
                        stale = (os.fstat(fd).st_ino, holder)
                    os.close(fd)
                    fd = -1
                else:
                    previous = _read_owner(fd)
                    me = Owner.current()
                    if previous is not None and previous != me:
                        # Unlocked yet naming an owner: it ended without release() (killed, crashed).
                        log.info("%s slot %d taken over from %s, which is gone", spec.name, slot, previous)
                    write_owner(fd, me)
            except BaseException:
                if fd >= 0:
                    os.close(fd)
                raise
        finally:
            os.close(guard)
        if fd < 0:
            if stale is not None:
                self._break(path, *stale)
            return None
        lease = HostLease(self, spec, slot, path, fd)
        with self._lock:
            self._leases.append(lease)
        log.info("%s slot %d leased (%s)", spec.name, slot, path)
        return lease

    def _break(self, path: Path, inode: int, holder: Owner) -> None:
        """Remove a lease file whose lock outlived its owner (a descendant inherited the descriptor): the
        next attempt makes a new file. Checked again under the exclusive guard, where no leaser is busy."""
        guard = self._guard(fcntl.LOCK_EX)
        try:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                return
            try:
                if os.fstat(fd).st_ino != inode or _read_owner(fd) != holder:
                    return  # broken or claimed meanwhile
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return  # its holder let go meanwhile: an ordinary free slot now
                except OSError as exc:
                    if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                        raise
                os.unlink(path)
            finally:
                os.close(fd)
            log.warning("%s: still locked by a process that inherited it from %s, which is gone; removed",
                        path, holder)
        finally:
            os.close(guard)
