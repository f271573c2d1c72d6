"""xen.h, arch-x86/xen*.h, memory.h, sched.h, errno.h: hypercall numbers, shared_info/vcpu_info (x86_64),
memory_op/sched_op arguments and the errno values hypercalls return (negated)."""

from __future__ import annotations

import ctypes

from xenpv.xenabi.layout import XenStruct

__HYPERVISOR_set_trap_table = 0
__HYPERVISOR_mmu_update = 1
__HYPERVISOR_set_gdt = 2
__HYPERVISOR_stack_switch = 3
__HYPERVISOR_set_callbacks = 4
__HYPERVISOR_fpu_taskswitch = 5
__HYPERVISOR_sched_op_compat = 6
__HYPERVISOR_platform_op = 7
__HYPERVISOR_set_debugreg = 8
__HYPERVISOR_get_debugreg = 9
__HYPERVISOR_update_descriptor = 10
__HYPERVISOR_memory_op = 12
__HYPERVISOR_multicall = 13
__HYPERVISOR_update_va_mapping = 14
__HYPERVISOR_set_timer_op = 15
__HYPERVISOR_event_channel_op_compat = 16
__HYPERVISOR_xen_version = 17
__HYPERVISOR_console_io = 18
__HYPERVISOR_physdev_op_compat = 19
__HYPERVISOR_grant_table_op = 20
__HYPERVISOR_vm_assist = 21
__HYPERVISOR_update_va_mapping_otherdomain = 22
__HYPERVISOR_iret = 23
__HYPERVISOR_vcpu_op = 24
__HYPERVISOR_set_segment_base = 25
__HYPERVISOR_mmuext_op = 26
__HYPERVISOR_xsm_op = 27
__HYPERVISOR_nmi_op = 28
__HYPERVISOR_sched_op = 29
__HYPERVISOR_callback_op = 30
__HYPERVISOR_xenoprof_op = 31
__HYPERVISOR_event_channel_op = 32
__HYPERVISOR_physdev_op = 33
__HYPERVISOR_hvm_op = 34
__HYPERVISOR_sysctl = 35
__HYPERVISOR_domctl = 36
__HYPERVISOR_kexec_op = 37
__HYPERVISOR_tmem_op = 38
__HYPERVISOR_argo_op = 39
__HYPERVISOR_xenpmu_op = 40
__HYPERVISOR_dm_op = 41
__HYPERVISOR_hypfs_op = 42

# Python mangles names starting with two underscores inside classes, so code elsewhere uses this table.
HYPERCALL_NUMBERS: dict[str, int] = {
    name.removeprefix("__HYPERVISOR_"): value
    for name, value in globals().items() if name.startswith("__HYPERVISOR_")
}

XEN_LEGACY_MAX_VCPUS = 32

# memory_op (XENMEM_*) commands this project uses, and add_to_physmap spaces.
XENMEM_increase_reservation = 0
XENMEM_decrease_reservation = 1
XENMEM_maximum_ram_page = 2
XENMEM_current_reservation = 3
XENMEM_maximum_reservation = 4
XENMEM_populate_physmap = 6
XENMEM_add_to_physmap = 7
XENMEM_memory_map = 9
XENMEM_maximum_gpfn = 14
XENMEM_remove_from_physmap = 15
XENMEM_add_to_physmap_batch = 23

XENMAPSPACE_shared_info = 0
XENMAPSPACE_grant_table = 1
XENMAPSPACE_gmfn = 2
XENMAPSPACE_gmfn_range = 3
XENMAPSPACE_gmfn_foreign = 4
XENMAPSPACE_dev_mmio = 5
# OR-ed into idx with XENMAPSPACE_grant_table to map a v2 status frame instead of a shared frame.
XENMAPIDX_grant_table_status = 0x80000000

SCHEDOP_yield = 0
SCHEDOP_block = 1
SCHEDOP_shutdown = 2
SCHEDOP_poll = 3
SCHEDOP_remote_shutdown = 4
SCHEDOP_shutdown_code = 5
SCHEDOP_watchdog = 6
SCHEDOP_pin_override = 7

SHUTDOWN_poweroff = 0
SHUTDOWN_reboot = 1
SHUTDOWN_suspend = 2
SHUTDOWN_crash = 3
SHUTDOWN_watchdog = 4
SHUTDOWN_soft_reset = 5
SHUTDOWN_MAX = 5

# errno.h: hypercalls return -XEN_Exxx.  EINTR and ERESTART are hypervisor-internal and never returned.
XEN_EPERM = 1
XEN_ENOENT = 2
XEN_ESRCH = 3
XEN_EIO = 5
XEN_ENXIO = 6
XEN_E2BIG = 7
XEN_ENOEXEC = 8
XEN_EBADF = 9
XEN_ECHILD = 10
XEN_EAGAIN = 11
XEN_EWOULDBLOCK = 11
XEN_ENOMEM = 12
XEN_EACCES = 13
XEN_EFAULT = 14
XEN_EBUSY = 16
XEN_EEXIST = 17
XEN_EXDEV = 18
XEN_ENODEV = 19
XEN_ENOTDIR = 20
XEN_EISDIR = 21
XEN_EINVAL = 22
XEN_ENFILE = 23
XEN_EMFILE = 24
XEN_ENOSPC = 28
XEN_EROFS = 30
XEN_EMLINK = 31
XEN_EDOM = 33
XEN_ERANGE = 34
XEN_EDEADLK = 35
XEN_EDEADLOCK = 35
XEN_ENAMETOOLONG = 36
XEN_ENOLCK = 37
XEN_ENOSYS = 38
XEN_ENOTEMPTY = 39
XEN_ENODATA = 61
XEN_ETIME = 62
XEN_EBADMSG = 74
XEN_EOVERFLOW = 75
XEN_EILSEQ = 84
XEN_ENOTSOCK = 88
XEN_EMSGSIZE = 90
XEN_EOPNOTSUPP = 95
XEN_EADDRINUSE = 98
XEN_EADDRNOTAVAIL = 99
XEN_ENOBUFS = 105
XEN_EISCONN = 106
XEN_ENOTCONN = 107
XEN_ETIMEDOUT = 110
XEN_ECONNREFUSED = 111

XEN_PVCLOCK_TSC_STABLE_BIT = 1 << 0
XEN_PVCLOCK_GUEST_STOPPED = 1 << 1


class VcpuTimeInfo(XenStruct):
    """Seqlock-style: ``version`` is odd while the hypervisor updates the record."""

    _xen_name_ = "struct vcpu_time_info"
    _fields_ = [
        ("version", ctypes.c_uint32),
        ("pad0", ctypes.c_uint32),
        ("tsc_timestamp", ctypes.c_uint64),
        ("system_time", ctypes.c_uint64),
        ("tsc_to_system_mul", ctypes.c_uint32),
        ("tsc_shift", ctypes.c_int8),
        ("flags", ctypes.c_uint8),
        ("pad1", ctypes.c_uint8 * 2),
    ]


class ArchVcpuInfo(XenStruct):
    _xen_name_ = "struct arch_vcpu_info"
    _fields_ = [
        ("cr2", ctypes.c_uint64),
        ("pad", ctypes.c_uint64),
    ]


class VcpuInfo(XenStruct):
    _xen_name_ = "struct vcpu_info"
    _fields_ = [
        ("evtchn_upcall_pending", ctypes.c_uint8),
        ("evtchn_upcall_mask", ctypes.c_uint8),
        ("evtchn_pending_sel", ctypes.c_uint64),
        ("arch", ArchVcpuInfo),
        ("time", VcpuTimeInfo),
    ]


class ArchSharedInfo(XenStruct):
    _xen_name_ = "struct arch_shared_info"
    _fields_ = [
        ("max_pfn", ctypes.c_uint64),
        ("pfn_to_mfn_frame_list_list", ctypes.c_uint64),
        ("nmi_reason", ctypes.c_uint64),
        ("p2m_cr3", ctypes.c_uint64),
        ("p2m_vaddr", ctypes.c_uint64),
        ("p2m_generation", ctypes.c_uint64),
    ]


# 2-level event channels: one xen_ulong_t of pending/mask bits per selector bit.
EVTCHN_WORDS = 64
EVTCHN_WORD_BITS = 64


class SharedInfo(XenStruct):
    """The shared_info page (x86_64); the pending/mask bitmaps are what event channel code operates on."""

    _xen_name_ = "struct shared_info"
    _fields_ = [
        ("vcpu_info", VcpuInfo * XEN_LEGACY_MAX_VCPUS),
        ("evtchn_pending", ctypes.c_uint64 * EVTCHN_WORDS),
        ("evtchn_mask", ctypes.c_uint64 * EVTCHN_WORDS),
        ("wc_version", ctypes.c_uint32),
        ("wc_sec", ctypes.c_uint32),
        ("wc_nsec", ctypes.c_uint32),
        ("wc_sec_hi", ctypes.c_uint32),
        ("arch", ArchSharedInfo),
    ]


class XenAddToPhysmap(XenStruct):
    _xen_name_ = "struct xen_add_to_physmap"
    _fields_ = [
        ("domid", ctypes.c_uint16),
        ("size", ctypes.c_uint16),
        ("space", ctypes.c_uint32),
        ("idx", ctypes.c_uint64),
        ("gpfn", ctypes.c_uint64),
    ]


class XenRemoveFromPhysmap(XenStruct):
    _xen_name_ = "struct xen_remove_from_physmap"
    _fields_ = [
        ("domid", ctypes.c_uint16),
        ("gpfn", ctypes.c_uint64),
    ]


class SchedShutdown(XenStruct):
    _xen_name_ = "struct sched_shutdown"
    _fields_ = [("reason", ctypes.c_uint32)]


class SchedPoll(XenStruct):
    """``ports`` is a guest handle (address) of ``nr_ports`` evtchn_port_t; ``timeout`` in ns of system time."""

    _xen_name_ = "struct sched_poll"
    _fields_ = [
        ("ports", ctypes.c_uint64),
        ("nr_ports", ctypes.c_uint32),
        ("timeout", ctypes.c_uint64),
    ]


class SchedRemoteShutdown(XenStruct):
    _xen_name_ = "struct sched_remote_shutdown"
    _fields_ = [
        ("domain_id", ctypes.c_uint16),
        ("reason", ctypes.c_uint32),
    ]
