"""The project's one native helper: xenabi/_atomic_ops.c, built into a shared object next to it.

ci/bootstrap.sh builds it (``python -m xenpv.xenabi.native``).  A process that finds it missing or older
than its source builds it at first use, saying so in a log line (gcc is one of bootstrap's packages); a
machine without gcc gets an ImportError naming the command to run.  Builds go to a temporary name and are
renamed into place, so processes starting at the same time never load a half-written object.
"""
from __future__ import annotations

import ctypes
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

log = logging.getLogger("xenabi.native")

SOURCE = Path(__file__).with_name("_atomic_ops.c")
LIBRARY = Path(__file__).with_name("_atomic_ops.so")
CFLAGS = ("-O2", "-shared", "-fPIC", "-Wall", "-Werror")


class NativeHelperMissing(ImportError):
    """The atomic helper is not built and cannot be built here."""


def stale() -> bool:
    return not LIBRARY.exists() or LIBRARY.stat().st_mtime < SOURCE.stat().st_mtime


def build() -> Path:
    """Compile the helper if it is missing or older than its source; returns its path."""
    if not stale():
        return LIBRARY
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise NativeHelperMissing(f"{LIBRARY.name} is not built and there is no C compiler: run ci/bootstrap.sh "
                                  "(it installs gcc and builds it)")
    fd, tmp = tempfile.mkstemp(prefix=".atomic_ops.", suffix=".so", dir=LIBRARY.parent)
    os.close(fd)
    try:
        try:
            done = subprocess.run([cc, *CFLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True)
        except OSError as exc:
            raise NativeHelperMissing(f"building {LIBRARY.name}: cannot run {cc}: {exc}") from exc
        if done.returncode:
            raise NativeHelperMissing(f"building {LIBRARY.name} with {cc} failed:\n{done.stderr.strip()}")
        os.replace(tmp, LIBRARY)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return LIBRARY


def load_atomic_ops() -> ctypes.CDLL:
    """The helper with its functions' signatures set, built first if needed (with a log line)."""
    if stale():
        log.warning("%s is missing or older than its source: building it now (ci/bootstrap.sh builds it at set-up)",
                    LIBRARY.name)
        build()
    lib = ctypes.CDLL(str(LIBRARY))
    addr, width, u64, u32 = ctypes.c_size_t, ctypes.c_int, ctypes.c_uint64, ctypes.c_uint32
    for name, args, result in (
            ("xpv_load", (addr, width), u64),
            ("xpv_store", (addr, width, u64), None),
            ("xpv_exchange", (addr, width, u64), u64),
            ("xpv_cmpxchg", (addr, width, u64, u64), u64),
            ("xpv_fetch_and", (addr, width, u64), u64),
            ("xpv_fetch_or", (addr, width, u64), u64),
            ("xpv_test_and_set_bit", (addr, width, ctypes.c_int), ctypes.c_int),
            ("xpv_test_and_clear_bit", (addr, width, ctypes.c_int), ctypes.c_int),
            ("xpv_evtchn_2l_set_pending", (addr, ctypes.c_uint, addr, addr, addr, addr), ctypes.c_int),
            ("xpv_pins_size", (), ctypes.c_size_t),
            ("xpv_pins_set_hook", (ctypes.c_void_p,), None),
            ("xpv_pin", (addr, addr, addr, u64, u64), u64),
            ("xpv_pin_finish", (addr, addr, addr, u64, u64, u32, ctypes.c_int), u64),
            ("xpv_unpin", (addr, addr, addr, u64, u64), u64)):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, result
    return lib


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    print(build())
    sys.exit(0)
