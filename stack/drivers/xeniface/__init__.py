"""xeniface.sys: XENBUS's IFACE child and its user-mode IOCTL surface (XI = xcp-ng/win-xeniface f12cbdb).

driver.py (DriverEntry, AddDevice), fdo.py (the FDO: interfaces, power, device interface, drivers/<n>),
ioctls.py (XenIfaceIoctl, XenIfaceCleanup, IoctlLog) with one module per handler group as the C files are
(ioctl_store, ioctl_evtchn, ioctl_gnttab, ioctl_suspend, ioctl_sharedinfo), abi.py (xeniface_ioctls.h:
the codes and layouts user mode shares with the driver). The user-mode xenagent is stack.agent.xenagent.
"""
