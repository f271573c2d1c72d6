"""hvm/params.h and hvm/hvm_op.h: HVM parameters (how a PV-on-HVM guest finds xenstore and sets up its
event channel upcall) and the HVMOP_* commands that read and write them."""

from __future__ import annotations

import ctypes

from xenpv.xenabi.layout import XenStruct

HVMOP_set_param = 0
HVMOP_get_param = 1
HVMOP_flush_tlbs = 5
HVMOP_pagetable_dying = 9
HVMOP_get_time = 10
HVMOP_get_mem_type = 15
HVMOP_set_evtchn_upcall_vector = 23

HVM_PARAM_CALLBACK_IRQ = 0
HVM_PARAM_STORE_PFN = 1
HVM_PARAM_STORE_EVTCHN = 2
HVM_PARAM_PAE_ENABLED = 4
HVM_PARAM_IOREQ_PFN = 5
HVM_PARAM_BUFIOREQ_PFN = 6
HVM_PARAM_VIRIDIAN = 9
HVM_PARAM_TIMER_MODE = 10
HVM_PARAM_HPET_ENABLED = 11
HVM_PARAM_IDENT_PT = 12
HVM_PARAM_DM_DOMAIN = 13
HVM_PARAM_ACPI_S_STATE = 14
HVM_PARAM_VM86_TSS = 15
HVM_PARAM_VPT_ALIGN = 16
HVM_PARAM_CONSOLE_PFN = 17
HVM_PARAM_CONSOLE_EVTCHN = 18
HVM_PARAM_ACPI_IOPORTS_LOCATION = 19
HVM_PARAM_NESTEDHVM = 24
HVM_PARAM_BUFIOREQ_EVTCHN = 26
HVM_PARAM_PAGING_RING_PFN = 27
HVM_PARAM_MONITOR_RING_PFN = 28
HVM_PARAM_SHARING_RING_PFN = 29
HVM_PARAM_TRIPLE_FAULT_REASON = 31
HVM_PARAM_IOREQ_SERVER_PFN = 32
HVM_PARAM_NR_IOREQ_SERVER_PAGES = 33
HVM_PARAM_VM_GENERATION_ID_ADDR = 34
HVM_PARAM_ALTP2M = 35
HVM_PARAM_X87_FIP_WIDTH = 36
HVM_PARAM_VM86_TSS_SIZED = 37
HVM_PARAM_MCA_CAP = 38
HVM_NR_PARAMS = 39

# HVM_PARAM_CALLBACK_IRQ value: the delivery type in bits 63:56, its argument below.
HVM_PARAM_CALLBACK_IRQ_TYPE_MASK = 0xFF00000000000000
HVM_PARAM_CALLBACK_IRQ_TYPE_SHIFT = 56
HVM_PARAM_CALLBACK_TYPE_GSI = 0
HVM_PARAM_CALLBACK_TYPE_PCI_INTX = 1
HVM_PARAM_CALLBACK_TYPE_VECTOR = 2


def callback_irq_type(value: int) -> int:
    """The HVM_PARAM_CALLBACK_TYPE_* of an HVM_PARAM_CALLBACK_IRQ value."""
    return (value & HVM_PARAM_CALLBACK_IRQ_TYPE_MASK) >> HVM_PARAM_CALLBACK_IRQ_TYPE_SHIFT


def callback_via_gsi(gsi: int) -> int:
    return (HVM_PARAM_CALLBACK_TYPE_GSI << HVM_PARAM_CALLBACK_IRQ_TYPE_SHIFT) | gsi


def callback_via_pci_intx(domain: int, bus: int, devfn: int, intx: int) -> int:
    """Type PCI_INTX: domain in bits 47:32, bus 31:16, devfn 15:8, INTx pin (0=A) in 1:0."""
    return ((HVM_PARAM_CALLBACK_TYPE_PCI_INTX << HVM_PARAM_CALLBACK_IRQ_TYPE_SHIFT)
            | (domain & 0xFFFF) << 32 | (bus & 0xFFFF) << 16 | (devfn & 0xFF) << 8 | (intx & 3))


def callback_via_vector(vector: int) -> int:
    return (HVM_PARAM_CALLBACK_TYPE_VECTOR << HVM_PARAM_CALLBACK_IRQ_TYPE_SHIFT) | (vector & 0xFF)


class XenHvmParam(XenStruct):
    _xen_name_ = "struct xen_hvm_param"
    _fields_ = [
        ("domid", ctypes.c_uint16),
        ("pad", ctypes.c_uint16),
        ("index", ctypes.c_uint32),
        ("value", ctypes.c_uint64),
    ]
