"""The README's main job, as a user runs it: `xenpv run` boots the default guest with its dom0 and shows
discovery, unplug and I/O; nothing is left behind."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_xenpv_run_shows_discovery_unplug_and_io() -> None:
    out = subprocess.run([sys.executable, "-m", "xenpv.harness.cli", "run", "guests/default.yaml"],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert "5853:0001" in text
    assert "XENBUS\\VEN_XP&DEV_VBD\\_ [started] service=XENVBD" in text
    assert "emulated disks (QMP): hda: unplugged, cd0: present" in text
    assert "emulated NICs (QMP): none left" in text
    written = re.search(r"wrote 16 sectors at 2048 sha256 (\w+)", text)
    read = re.search(r"^sha256 (\w+) bytes 8192$", text, re.M)
    assert written and read and written.group(1) == read.group(1)
    assert "3/3 replies" in text


def test_xenpv_version_and_help() -> None:
    out = subprocess.run([sys.executable, "-m", "xenpv.harness.cli", "version"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "xenpv-harness" in out.stdout and "QEMU emulator version" in out.stdout
    out = subprocess.run([sys.executable, "-m", "xenpv.harness.cli", "bench", "--help"], capture_output=True, text=True,
                         timeout=30)
    for name in ("machine", "boot", "xenstore", "evtchn", "blk", "net"):
        assert name in out.stdout
