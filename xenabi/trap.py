"""The trap protocol between a guest's vCPU (the agent) and xenhv, over a unix socket per domain.

This is the harness's stand-in for the VM exit, not Xen ABI: a fixed-size trap record carries the
hypercall number and its register arguments (guest-physical addresses of the Xen op structs, which
xenhv reads and writes in guest memory as Xen does), or a port access claimed by xenhv. The first
trap is HELLO, which carries the guest's upcall eventfd (SCM_RIGHTS); its reply carries the memfd that
holds the domain's hypervisor frames (shared_info, grant table frames), so the vCPU can see them at
the frames the guest maps them to with XENMEM_add_to_physmap.
"""
from __future__ import annotations

import enum
import struct

# kind, reserved, then six 64-bit argument registers.
TRAP = struct.Struct("<II6Q")
# result (a hypercall's return value, negative Xen errno on failure), then two values.
REPLY = struct.Struct("<q2Q")


class TrapKind(enum.IntEnum):
    HELLO = 1  # a0 = domid; fd: the upcall eventfd. Reply: v0 = size of the frames memfd, v1 = flags; fd: the memfd.
    HYPERCALL = 2  # a0 = hypercall number, a1..a5 = arguments.
    PIO_READ = 3  # a0 = port, a1 = size (1, 2, 4). Reply: v0 = value.
    PIO_WRITE = 4  # a0 = port, a1 = size, a2 = value.
    FRAME_OF = 5  # a0 = gfn. Reply: result 0 and v0 = offset in the frames memfd, or -ENOENT for RAM.


# HELLO reply flags.
HELLO_PLATFORM_PORTS = 1 << 0  # xenhv serves the unplug ports: the guest has a Xen platform device

# The config space of a Xen back-end over vhost-user: which domain this connection serves. xenhv writes
# it with SET_CONFIG right after the handshake, before any memory or channel.
BACKEND_CONFIG = struct.Struct("<HH")  # domid, reserved (0)
