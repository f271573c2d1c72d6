"""XENBUS: the bus driver on the Xen platform PCI device and the interfaces it serves its children
(reference windows-pv-drivers.md 0-3, 7)."""
