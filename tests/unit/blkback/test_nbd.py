"""The NBD client against QEMU's own qemu-nbd serving a qcow2 image."""
from __future__ import annotations

import subprocess
from pathlib import Path

from xenpv.backends.blkback.image import NbdImage


def test_qcow2_over_qemu_nbd(tmp_path: Path) -> None:
    img = tmp_path / "n.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "4M"], check=True)
    n = NbdImage(img, "qcow2", tmp_path / "n.sock", tmp_path / "n.log")
    try:
        assert n.size == 4 << 20 and n.can_discard
        n.write(65536, [memoryview(b"x" * 4096), memoryview(b"y" * 512)])
        out = [memoryview(bytearray(4608))]
        n.read_into(65536, out)
        assert bytes(out[0]) == b"x" * 4096 + b"y" * 512
        n.flush()
        n.discard(0, 65536)
    finally:
        n.close()
    assert not (tmp_path / "n.sock").exists()
    info = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x79 69632 512", str(img)],
                          capture_output=True, text=True)
    assert info.returncode == 0 and "Pattern verification failed" not in info.stdout
    subprocess.run(["qemu-img", "check", "-q", str(img)], check=True)
