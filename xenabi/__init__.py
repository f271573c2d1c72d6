"""The Xen public ABI as Python layouts and constants, shared by the guest model and the dom0 back ends.

One module per header family: ring (io/ring.h), blkif, netif, grant_table, event_channel, xen (hypercalls,
shared_info, memory/sched ops, errno), hvm (params, hvm_op), xenbus (states), xs_wire (xenstore), unplug
(emulated-device unplug ports).  Layouts are ctypes structures built with xenabi.layout; the conformance
test compares them with Debian's libxen-dev headers.
"""
