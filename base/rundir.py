"""Short run directories for sockets and guest RAM.

AF_UNIX socket paths are limited to 108 bytes, and pytest's tmp_path is often longer, so every machine
and service gets a directory directly under /tmp (or $XENPV_RUNDIR_BASE) named
`xpv-<tag>-<pid>.<start>-<random>`: the middle part is its owner (base.owner), so that the run
directories of a run that died without cleaning up are found and removed by the next one
(harness.cleanup, `xenpv clean`).
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from xenpv.base.errors import ConfigError
from xenpv.base.owner import Owner

PREFIX = "xpv-"
ENV = "XENPV_RUNDIR_BASE"
# sun_path holds 108 bytes with the terminating NUL.
AF_UNIX_PATH_MAX = 107
# The longest name of a socket the harness puts in a run directory ("xenstored.vu.sock" is 17), with room.
LONGEST_SOCKET_NAME = 24
_RANDOM_LEN = 8  # tempfile.mkdtemp's random part
# The tag (any characters but "-" + owner + random), as resources_of() reads a name back.
_NAME_RE = re.compile(r"xpv-(?:.*-)?(\d+\.\d+)-[a-z0-9_]+")


def base_dir() -> Path:
    """$XENPV_RUNDIR_BASE (default /tmp), checked: an existing, writable directory short enough for the
    run directories' sockets. Raises ConfigError naming the variable and the reason."""
    raw = os.environ.get(ENV)
    base = Path(raw) if raw else Path("/tmp")
    what = f"{ENV}={raw}" if raw else "/tmp (the default of $XENPV_RUNDIR_BASE)"
    if not base.exists():
        raise ConfigError(f"{what}: no such directory")
    if not base.is_dir():
        raise ConfigError(f"{what}: not a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        # EROFS for a read-only mount, EACCES otherwise: access() reports both, even for root.
        reason = "read-only file system" if _read_only(base) else "not writable"
        raise ConfigError(f"{what}: {reason}")
    longest = len(str(base.resolve() / owned_prefix("x" * 8))) + _RANDOM_LEN + 1 + LONGEST_SOCKET_NAME
    if longest > AF_UNIX_PATH_MAX:
        raise ConfigError(f"{what}: too long for the sockets of a run directory: their paths would be up to "
                          f"{longest} bytes, AF_UNIX allows {AF_UNIX_PATH_MAX} "
                          f"(use a base of at most {len(str(base.resolve())) - (longest - AF_UNIX_PATH_MAX)} bytes)")
    return base.resolve()


def _read_only(path: Path) -> bool:
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)


def owned_prefix(tag: str, owner: Owner | None = None) -> str:
    """`xpv-<tag>-<pid>.<start>-`: the start of the name of a resource owned by `owner` (default: us)."""
    tag = re.sub(r"[^A-Za-z0-9_]", "", tag)[:8]
    return f"{PREFIX}{tag}{'-' if tag else ''}{owner or Owner.current()}-"


def make_run_dir(tag: str = "") -> Path:
    """A new run directory named after `tag` and its owner, the calling process."""
    base = base_dir()
    try:
        return Path(tempfile.mkdtemp(prefix=owned_prefix(tag), dir=base))
    except OSError as exc:
        raise ConfigError(f"{ENV}: cannot make a run directory in {base}: {exc.strerror}") from None


def remove_run_dir(path: Path) -> None:
    if path.name.startswith(PREFIX):
        shutil.rmtree(path, ignore_errors=True)


def owner_of(name: str) -> Owner | None:
    """The owner a run directory's or namespace's name records (None for a name without one)."""
    m = _NAME_RE.fullmatch(name)
    return Owner.parse(m.group(1)) if m else None


@dataclass(frozen=True)
class RunDir:
    path: Path
    owner: Owner


def run_dirs(base: Path | None = None) -> Iterator[RunDir]:
    """The run directories under `base` (default: base_dir()) that name their owner."""
    base = base or base_dir()
    for entry in os.scandir(base):
        if entry.name.startswith(PREFIX) and entry.is_dir(follow_symlinks=False):
            owner = owner_of(entry.name)
            if owner is not None:
                yield RunDir(Path(entry.path), owner)


def make_artifacts_dir(root: Path, what: str) -> Path:
    """A new directory of this run's own inside `root` (made if need be): <date>-<time>-<pid>, with a
    suffix if that exists; never one that another run made. `what` names the setting `root` came from,
    for the ConfigError that says why it cannot be used."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"{what} {root}: not a directory") from None
    except OSError as exc:
        raise ConfigError(f"{what} {root}: cannot be made: {exc.strerror}") from None
    if not root.is_dir():
        raise ConfigError(f"{what} {root}: not a directory")
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    for n in range(1000):
        path = root / (stamp if n == 0 else f"{stamp}-{n}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            raise ConfigError(f"{what} {root}: cannot make a directory in it: {exc.strerror}") from None
        return path
    raise ConfigError(f"{what} {root}: {stamp} and its next 999 names are all taken")
