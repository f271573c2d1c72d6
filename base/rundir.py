"""Short run directories for sockets and guest RAM.

AF_UNIX socket paths are limited to 108 bytes, and pytest's tmp_path is often longer, so every machine
and service gets a directory directly under /tmp (or $XENPV_RUNDIR_BASE) named xpv-<random>.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

PREFIX = "xpv-"


def base_dir() -> Path:
    return Path(os.environ.get("XENPV_RUNDIR_BASE", "/tmp"))


def make_run_dir(tag: str = "") -> Path:
    return Path(tempfile.mkdtemp(prefix=f"{PREFIX}{tag[:8]}{'-' if tag else ''}", dir=base_dir()))


def remove_run_dir(path: Path) -> None:
    if path.name.startswith(PREFIX):
        shutil.rmtree(path, ignore_errors=True)
