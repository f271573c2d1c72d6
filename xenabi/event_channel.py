"""event_channel.h: EVTCHNOP_* numbers, their argument structures, port status values, and special domids.

Only the 2-level ABI is modelled; the FIFO ops exist here as numbers so a hypervisor can refuse them.
"""

from __future__ import annotations

import ctypes

from xenpv.xenabi.layout import XenStruct, XenUnion

EVTCHNOP_bind_interdomain = 0
EVTCHNOP_bind_virq = 1
EVTCHNOP_bind_pirq = 2
EVTCHNOP_close = 3
EVTCHNOP_send = 4
EVTCHNOP_status = 5
EVTCHNOP_alloc_unbound = 6
EVTCHNOP_bind_ipi = 7
EVTCHNOP_bind_vcpu = 8
EVTCHNOP_unmask = 9
EVTCHNOP_reset = 10
EVTCHNOP_init_control = 11
EVTCHNOP_expand_array = 12
EVTCHNOP_set_priority = 13

EVTCHNSTAT_closed = 0
EVTCHNSTAT_unbound = 1
EVTCHNSTAT_interdomain = 2
EVTCHNSTAT_pirq = 3
EVTCHNSTAT_virq = 4
EVTCHNSTAT_ipi = 5

# xen.h: domids >= DOMID_FIRST_RESERVED are never real domains.
DOMID_FIRST_RESERVED = 0x7FF0
DOMID_SELF = 0x7FF0
DOMID_IO = 0x7FF1
DOMID_XEN = 0x7FF2
DOMID_COW = 0x7FF3
DOMID_INVALID = 0x7FF4
DOMID_IDLE = 0x7FFF
DOMID_MASK = 0x7FFF
# Not in the hypervisor's headers: xenstore's "any domain" in a permission entry (xs_wire.h feature).
DOMID_ANY = 0x7FF5

# xen.h virtual IRQs bindable with EVTCHNOP_bind_virq.
VIRQ_TIMER = 0
VIRQ_DEBUG = 1
VIRQ_CONSOLE = 2
VIRQ_DOM_EXC = 3
VIRQ_TBUF = 4
VIRQ_DEBUGGER = 6
VIRQ_XENOPROF = 7
VIRQ_CON_RING = 8
VIRQ_PCPU_STATE = 9
VIRQ_MEM_EVENT = 10
VIRQ_ARGO = 11
VIRQ_ENOMEM = 12
VIRQ_XENPMU = 13
NR_VIRQS = 24

# 2-level ABI on x86_64: 64 selector bits x 64 pending bits.
EVTCHN_2L_NR_CHANNELS = 64 * 64


class EvtchnAllocUnbound(XenStruct):
    _xen_name_ = "struct evtchn_alloc_unbound"
    _fields_ = [
        ("dom", ctypes.c_uint16),
        ("remote_dom", ctypes.c_uint16),
        ("port", ctypes.c_uint32),
    ]


class EvtchnBindInterdomain(XenStruct):
    _xen_name_ = "struct evtchn_bind_interdomain"
    _fields_ = [
        ("remote_dom", ctypes.c_uint16),
        ("remote_port", ctypes.c_uint32),
        ("local_port", ctypes.c_uint32),
    ]


class EvtchnBindVirq(XenStruct):
    _xen_name_ = "struct evtchn_bind_virq"
    _fields_ = [
        ("virq", ctypes.c_uint32),
        ("vcpu", ctypes.c_uint32),
        ("port", ctypes.c_uint32),
    ]


class EvtchnBindPirq(XenStruct):
    _xen_name_ = "struct evtchn_bind_pirq"
    _fields_ = [
        ("pirq", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("port", ctypes.c_uint32),
    ]


class EvtchnBindIpi(XenStruct):
    _xen_name_ = "struct evtchn_bind_ipi"
    _fields_ = [
        ("vcpu", ctypes.c_uint32),
        ("port", ctypes.c_uint32),
    ]


class EvtchnClose(XenStruct):
    _xen_name_ = "struct evtchn_close"
    _fields_ = [("port", ctypes.c_uint32)]


class EvtchnSend(XenStruct):
    _xen_name_ = "struct evtchn_send"
    _fields_ = [("port", ctypes.c_uint32)]


class EvtchnStatusUnbound(XenStruct):
    _fields_ = [("dom", ctypes.c_uint16)]


class EvtchnStatusInterdomain(XenStruct):
    _fields_ = [
        ("dom", ctypes.c_uint16),
        ("port", ctypes.c_uint32),
    ]


class EvtchnStatusU(XenUnion):
    _fields_ = [
        ("unbound", EvtchnStatusUnbound),
        ("interdomain", EvtchnStatusInterdomain),
        ("pirq", ctypes.c_uint32),
        ("virq", ctypes.c_uint32),
    ]


class EvtchnStatus(XenStruct):
    _xen_name_ = "struct evtchn_status"
    _fields_ = [
        ("dom", ctypes.c_uint16),
        ("port", ctypes.c_uint32),
        ("status", ctypes.c_uint32),
        ("vcpu", ctypes.c_uint32),
        ("u", EvtchnStatusU),
    ]


class EvtchnBindVcpu(XenStruct):
    _xen_name_ = "struct evtchn_bind_vcpu"
    _fields_ = [
        ("port", ctypes.c_uint32),
        ("vcpu", ctypes.c_uint32),
    ]


class EvtchnUnmask(XenStruct):
    _xen_name_ = "struct evtchn_unmask"
    _fields_ = [("port", ctypes.c_uint32)]


class EvtchnReset(XenStruct):
    _xen_name_ = "struct evtchn_reset"
    _fields_ = [("dom", ctypes.c_uint16)]


class EvtchnSetPriority(XenStruct):
    _xen_name_ = "struct evtchn_set_priority"
    _fields_ = [
        ("port", ctypes.c_uint32),
        ("priority", ctypes.c_uint32),
    ]


# The argument structure of each 2-level EVTCHNOP_* the hypercall endpoint decodes.
EVTCHNOP_ARGUMENTS: dict[int, type[XenStruct]] = {
    EVTCHNOP_bind_interdomain: EvtchnBindInterdomain,
    EVTCHNOP_bind_virq: EvtchnBindVirq,
    EVTCHNOP_bind_pirq: EvtchnBindPirq,
    EVTCHNOP_close: EvtchnClose,
    EVTCHNOP_send: EvtchnSend,
    EVTCHNOP_status: EvtchnStatus,
    EVTCHNOP_alloc_unbound: EvtchnAllocUnbound,
    EVTCHNOP_bind_ipi: EvtchnBindIpi,
    EVTCHNOP_bind_vcpu: EvtchnBindVcpu,
    EVTCHNOP_unmask: EvtchnUnmask,
    EVTCHNOP_reset: EvtchnReset,
    EVTCHNOP_set_priority: EvtchnSetPriority,
}
