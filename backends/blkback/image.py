"""The images behind virtual block devices: raw files served with pread/pwrite, and every other format
through an NBD export by qemu-nbd (QEMU's own code reads and writes qcow2; blkback never parses it)."""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from xenpv.backends.blkback.nbd import NbdClient, NbdError
from xenpv.base.process import Supervised

log = logging.getLogger("blkback.image")

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]

RAW_FORMATS = ("raw", "aio", "file")
QEMU_NBD_START_SECONDS = 30.0


class ImageError(Exception):
    """An image cannot be opened or served; names the image."""


class _ImageLocked(Exception):
    """qemu-nbd could not take the image's lock (another process still has the image open)."""


class Image(Protocol):
    size: int
    readonly: bool
    can_discard: bool

    def read_into(self, offset: int, views: list[memoryview]) -> None: ...
    def write(self, offset: int, views: list[memoryview]) -> None: ...
    def flush(self) -> None: ...
    def discard(self, offset: int, length: int) -> None: ...
    def close(self) -> None: ...


@dataclass
class RawImage:
    path: Path
    readonly: bool = False
    can_discard: bool = True
    fd: int = -1
    size: int = 0

    def __post_init__(self) -> None:
        try:
            self.fd = os.open(self.path, (os.O_RDONLY if self.readonly else os.O_RDWR) | os.O_CLOEXEC)
        except OSError as exc:
            raise ImageError(f"cannot open raw image {self.path}: {exc}") from exc
        self.size = os.fstat(self.fd).st_size

    def read_into(self, offset: int, views: list[memoryview]) -> None:
        want = sum(map(len, views))
        got = os.preadv(self.fd, views, offset)
        if got != want:
            raise OSError(errno.EIO, f"{self.path}: short read ({got} of {want} bytes at {offset})")

    def write(self, offset: int, views: list[memoryview]) -> None:
        want = sum(map(len, views))
        done = os.pwritev(self.fd, views, offset)
        if done != want:
            raise OSError(errno.EIO, f"{self.path}: short write ({done} of {want} bytes at {offset})")

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def discard(self, offset: int, length: int) -> None:
        # KEEP_SIZE: a punched hole must not shrink the disk when it reaches the end of the file.
        if _libc.fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{self.path}: punching {offset}+{length}: {os.strerror(err)}")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class NbdImage:
    """An image of any format QEMU reads, exported by a supervised qemu-nbd on a unix socket."""

    path: Path
    fmt: str
    socket_path: Path
    log_path: Path
    readonly: bool = False
    size: int = 0
    can_discard: bool = False
    process: Supervised | None = None
    client: NbdClient | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.path.exists():
            raise ImageError(f"{self.fmt} image {self.path} does not exist")
        argv = ["qemu-nbd", f"--format={self.fmt}", f"--socket={self.socket_path}", "--persistent",
                "--discard=unmap", "--cache=writeback", str(self.path)]
        if self.readonly:
            argv.insert(1, "--read-only")
        # The qemu-nbd of a blkback that was killed dies with it, but a process killed in the middle of
        # an fdatasync only exits (and lets go of the image's lock) once the sync returns: a new one
        # waits for that, within QEMU_NBD_START_SECONDS.
        deadline = time.monotonic() + QEMU_NBD_START_SECONDS
        while True:
            self.socket_path.unlink(missing_ok=True)
            log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
            self.process = Supervised(f"qemu-nbd-{self.path.name}", argv, self.log_path).start()
            try:
                self.client = self._connect(deadline, log_start)
                break
            except _ImageLocked as exc:
                self.process.stop()
                if time.monotonic() >= deadline:
                    raise ImageError(f"{self.path} stayed locked by another process for "
                                     f"{QEMU_NBD_START_SECONDS:g}s: {exc}") from None
                log.info("%s: still locked by another process; trying again", self.path)
                time.sleep(0.1)
            except BaseException:
                self.process.stop()
                raise
        self.size = self.client.export.size
        self.can_discard = self.client.export.can_trim
        log.info("%s: %s exported by qemu-nbd pid %d, %d bytes", self.path, self.fmt, self.process.pid, self.size)

    def _connect(self, deadline: float, log_start: int) -> NbdClient:
        """The NBD connection once qemu-nbd serves the export. qemu-nbd creates its socket before it opens
        the image, so a socket is not yet an export: the handshake is the readiness probe."""
        assert self.process is not None
        delay = 0.002
        while True:
            if not self.process.alive():
                text = self._log_since(log_start)
                if "lock" in text:
                    raise _ImageLocked(text.strip())
                raise ImageError(f"qemu-nbd exited ({self.process.returncode}) before exporting {self.path}: "
                                 f"{text.strip()[-2000:]}")
            if self.socket_path.is_socket():
                try:
                    return NbdClient(self.socket_path)
                except (ConnectionRefusedError, FileNotFoundError, NbdError) as exc:
                    log.debug("%s: qemu-nbd not serving yet: %s", self.path, exc)
            if time.monotonic() >= deadline:
                raise ImageError(f"qemu-nbd did not export {self.path} within {QEMU_NBD_START_SECONDS:g}s")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read(16384).decode(errors="replace")
        except OSError:
            return ""

    def read_into(self, offset: int, views: list[memoryview]) -> None:
        assert self.client is not None
        self.client.read_into(offset, views)

    def write(self, offset: int, views: list[memoryview]) -> None:
        assert self.client is not None
        self.client.write(offset, views)

    def flush(self) -> None:
        assert self.client is not None
        self.client.flush()

    def discard(self, offset: int, length: int) -> None:
        assert self.client is not None
        self.client.trim(offset, length)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.process is not None:
            self.process.stop()
            self.process = None
        self.socket_path.unlink(missing_ok=True)


def parse_params(params: str) -> tuple[str, Path]:
    """libxl's ``params`` of a qdisk: ``<format>:<path>``, or a bare path meaning raw."""
    fmt, sep, path = params.partition(":")
    if not sep:
        return "raw", Path(params)
    if not path:
        raise ImageError(f"params {params!r} names no image path")
    return fmt, Path(path)


def open_image(params: str, *, readonly: bool, run_dir: Path, name: str) -> Image:
    fmt, path = parse_params(params)
    if fmt in RAW_FORMATS:
        return RawImage(path, readonly)
    if fmt in ("qcow2", "qcow", "vmdk", "vpc", "vhdx", "qed"):
        return NbdImage(path, fmt, run_dir / f"{name}.nbd", run_dir / f"{name}.qemu-nbd.log", readonly)
    raise ImageError(f"unsupported image format {fmt!r} in params {params!r}")



