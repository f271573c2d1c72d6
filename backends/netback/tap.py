"""A Linux TAP device as netback's wire: frames with a virtio_net_hdr in front (IFF_VNET_HDR), so
checksum-blank and GSO frames from the guest are finished by the kernel instead of by Python.

The TAP devices are created (persistent, addressed) by the harness inside the test's namespace;
netback only attaches to them, so a netback restart finds the same device and addresses."""
from __future__ import annotations

import fcntl
import os
import socket
import struct
from dataclasses import dataclass

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000

# struct virtio_net_hdr (Linux include/uapi/linux/virtio_net.h), the 10-byte form TAP uses by default.
VNET_HDR = struct.Struct("<BBHHHH")
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_F_DATA_VALID = 2
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_TCPV6 = 4

# A 64 KiB GSO frame plus its header is the largest thing a read can return.
MAX_READ = VNET_HDR.size + 65536 + 14


class TapError(Exception):
    pass


def tap_name(domid: int, devid: int) -> str:
    """The TAP device of vif `devid` of `domid` (Xen's vifD.N convention; <= 15 bytes for IFNAMSIZ)."""
    name = f"vif{domid}.{devid}"
    if len(name) > 15:
        raise TapError(f"{name}: longer than IFNAMSIZ allows")
    return name


@dataclass(frozen=True)
class VnetHdr:
    flags: int = 0
    gso_type: int = VIRTIO_NET_HDR_GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0

    def pack(self) -> bytes:
        return VNET_HDR.pack(self.flags, self.gso_type, self.hdr_len, self.gso_size, self.csum_start,
                             self.csum_offset)

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> "VnetHdr":
        return cls(*VNET_HDR.unpack_from(data))


class Tap:
    """An attached TAP fd in the calling process's network namespace."""

    def __init__(self, name: str) -> None:
        try:
            socket.if_nametoindex(name)
        except OSError as exc:
            # TUNSETIFF on a missing name would create a new, unaddressed device: refuse instead.
            raise TapError(f"TAP {name} does not exist in this namespace (the harness creates it)") from exc
        self.name = name
        # Non-blocking: a reader takes what the TAP has ready and gets BlockingIOError when it runs dry
        # (netback's rx batches stop there); a blocking read would sit on the frames it already took.
        self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            ifr = struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
            fcntl.ioctl(self.fd, TUNSETIFF, ifr)
        except OSError as exc:
            os.close(self.fd)
            raise TapError(f"cannot attach to TAP {name}: {exc}") from exc

    def write(self, hdr: VnetHdr, frame: bytes | bytearray) -> None:
        os.writev(self.fd, [hdr.pack(), frame])

    def read(self) -> tuple[VnetHdr, bytes]:
        data = os.read(self.fd, MAX_READ)
        if len(data) < VNET_HDR.size:
            raise TapError(f"{self.name}: short read of {len(data)} bytes")
        return VnetHdr.unpack(data), data[VNET_HDR.size:]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
