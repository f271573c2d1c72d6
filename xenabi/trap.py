"""The trap protocol between a guest's vCPU (the agent) and xenhv, over a unix socket per domain.

This is the harness's stand-in for the VM exit, not Xen ABI: a fixed-size trap record carries the
hypercall number and its register arguments (guest-physical addresses of the Xen op structs, which
xenhv reads and writes in guest memory as Xen does), or a port access claimed by xenhv. The first
trap is HELLO, which carries the guest's upcall eventfd (SCM_RIGHTS); its reply carries the memfd that
holds the domain's hypervisor frames (shared_info, grant table frames), so the vCPU can see them at
the frames the guest maps them to with XENMEM_add_to_physmap, and the domain's doorbell table.

Doorbells are the KVM ioeventfd/irqfd pattern for event channels bound to a dom0 back-end: DOORBELL hands
the vCPU the channel's kick and call eventfds, so EVTCHNOP_send on that port is an eventfd write to the
back-end and the back-end's notification is delivered by the vCPU itself (xenabi/evtchn_2l.py), with
no trap and no xenhv in between. xenhv keeps bind, close and revocation: the doorbell table holds one
32-bit generation per port, which xenhv changes whenever what a doorbell of that port would be changes
(bound to a back-end, unbound, closed). A vCPU uses a doorbell only while the generation it got with it
is current, and asks again otherwise.
"""
from __future__ import annotations

import enum
import struct

from xenpv.xenabi.event_channel import EVTCHN_2L_NR_CHANNELS

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
    # a0 = port. Reply: result 0, v0 = the port's generation, v1 = the vcpu it notifies; fds: kick, call.
    # -ENOENT: the port is not bound to a dom0 back-end's channel (v0 = the generation all the same).
    DOORBELL = 6


# The hypervisor frames memfd: shared_info at frame 0, grant table frames after it.
SHARED_INFO_FRAME = 0


# HELLO reply flags.
HELLO_PLATFORM_PORTS = 1 << 0  # xenhv serves the unplug ports: the guest has a Xen platform device
# HELLO's reply carries these fds, in this order.
HELLO_FDS = ("frames", "doorbells")

# The doorbell table (a memfd the vCPU maps read-only): one generation per event channel port.
DOORBELL_GENERATION = struct.Struct("<I")
DOORBELL_PORTS = EVTCHN_2L_NR_CHANNELS
DOORBELL_TABLE_SIZE = DOORBELL_PORTS * DOORBELL_GENERATION.size

# The config space of a Xen back-end over vhost-user: which domain this connection serves. xenhv writes
# it with SET_CONFIG right after the handshake, before any memory or channel.
BACKEND_CONFIG = struct.Struct("<HH")  # domid, reserved (0)
