"""The HVM emulated-device unplug protocol (docs/misc/hvm-emulated-unplug.pandoc, hvm/pvdrivers.h) and the
PIIX4 ACPI PCI hotplug eject register that completes a NIC unplug when no ACPI code runs.

Only the product numbers are in the public headers; the port layout and magic values come from the Xen
document and QEMU's xen_platform.c (reference/xen-abi.md section 9).
"""

from __future__ import annotations

import enum

# Fixed I/O ports served by the platform device, 16 bytes at 0x10.
UNPLUG_PORT_BASE = 0x10
UNPLUG_PORT_COUNT = 0x10
# read16: magic; write16: unplug mask; write32: driver build number; read8/write8: platform flags.
UNPLUG_PORT_MAGIC = 0x10
UNPLUG_PORT_MASK = 0x10
UNPLUG_PORT_BUILD = 0x10
UNPLUG_PORT_PLATFORM_FLAGS = 0x10
# read8: protocol version; write16: product number; write8: log byte.
UNPLUG_PORT_VERSION = 0x12
UNPLUG_PORT_PRODUCT = 0x12
UNPLUG_PORT_LOG = 0x12

UNPLUG_MAGIC = 0x49D2
# What the magic port reads after a blacklisted product/build registers (byte-swapped magic).
UNPLUG_MAGIC_BLACKLISTED = 0xD249
UNPLUG_PROTOCOL_VERSION = 1
# Reads of any other offset, by width.
UNPLUG_READ16_OTHER = 0xFFFF
UNPLUG_READ8_OTHER = 0xFF
# Platform flags bit 0: the option ROM area 0xC0000-0xFFFFF is read-only.
PFFLAG_ROM_LOCK = 1 << 0
# The log port buffers bytes until a newline or this many characters.
UNPLUG_LOG_LINE_MAX = 4095

UNPLUG_ALL_IDE_DISKS = 1 << 0
UNPLUG_ALL_NICS = 1 << 1
UNPLUG_AUX_IDE_DISKS = 1 << 2
UNPLUG_NVME_DISKS = 1 << 3
UNPLUG_ALL = UNPLUG_ALL_IDE_DISKS | UNPLUG_ALL_NICS
# Linux-only command-line states; never written to the port.
XEN_UNPLUG_UNNECESSARY = 1 << 16
XEN_UNPLUG_NEVER = 1 << 17


class PvdriversProduct(enum.IntEnum):
    """hvm/pvdrivers.h PVDRIVERS_PRODUCT_LIST: the number a driver writes to the product port."""

    XENSOURCE_WINDOWS = 0x0001
    GPLPV_WINDOWS = 0x0002
    LINUX = 0x0003
    XENSERVER_WINDOWS_V7_0 = 0x0004
    XENSERVER_WINDOWS_V7_2 = 0x0005
    EXPERIMENTAL = 0xFFFF


# The product names as written in the header (the xenstore blacklist path uses them).
PVDRIVERS_PRODUCT_NAMES: dict[PvdriversProduct, str] = {
    PvdriversProduct.XENSOURCE_WINDOWS: "xensource-windows",
    PvdriversProduct.GPLPV_WINDOWS: "gplpv-windows",
    PvdriversProduct.LINUX: "linux",
    PvdriversProduct.XENSERVER_WINDOWS_V7_0: "xenserver-windows-v7.0+",
    PvdriversProduct.XENSERVER_WINDOWS_V7_2: "xenserver-windows-v7.2+",
    PvdriversProduct.EXPERIMENTAL: "experimental",
}

# The platform PCI device (xen-platform / xen-pvdevice).
XEN_PLATFORM_VENDOR_ID = 0x5853
XEN_PLATFORM_DEVICE_ID = 0x0001
XEN_PLATFORM_CLASS = 0xFF80
XEN_PLATFORM_REVISION = 1
# Legacy BAR0 I/O registers (byte access): offset 4 write 1 unplugs disks and NICs (SUSE), offset 8 write
# 1 = disks, 2 = NICs, anything else is a log byte (old drivers).
XEN_PLATFORM_BAR0_FLAGS = 0
XEN_PLATFORM_BAR0_UNPLUG_ALL = 4
XEN_PLATFORM_BAR0_UNPLUG = 8

# PIIX4 ACPI PCI hotplug (QEMU docs/specs/acpi_pci_hotplug.rst): 32-bit registers, one bit per slot on
# the selected bus.  Writing 1 << slot to the eject register is what the guest's _EJ0 method does.
PIIX4_ACPI_PCIHP_BASE = 0xAE00
PIIX4_ACPI_PCIHP_UP = 0xAE00
PIIX4_ACPI_PCIHP_DOWN = 0xAE04
PIIX4_ACPI_PCIHP_EJECT = 0xAE08
PIIX4_ACPI_PCIHP_REMOVABLE = 0xAE0C
PIIX4_ACPI_PCIHP_BUS_SELECT = 0xAE10
ICH9_ACPI_PCIHP_BASE = 0x0CC0


def eject_value(slot: int) -> int:
    """The 32-bit value to write to PIIX4_ACPI_PCIHP_EJECT to eject the device in ``slot`` (0-31)."""
    if not 0 <= slot < 32:
        raise ValueError(f"PCI slot {slot} out of range")
    return 1 << slot
