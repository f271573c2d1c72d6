"""The PC machine's registers the guest's power and boot paths use, beyond PCI config space: the PIIX4
power-management function's ACPI PM1a control block (sleep types: QEMU hw/acpi/core.c acpi_pm1_cnt_write,
hw/acpi/piix4.c) and the PIIX IDE controller's bus-master DMA (the SFF-8038i interface QEMU's hw/ide/piix.c
and bmdma.c implement), with the ATA commands the resume loader sends.

Not Xen ABI; kept here with the other layouts both the guest model and the harness use, so no offset is
written twice.
"""
from __future__ import annotations

import struct

# -- PIIX4 power management (function 3 of the PIIX device, 00:01.3 on QEMU's pc machine) ----------------
PIIX4_PM_DEVICE = 1
PIIX4_PM_FUNCTION = 3
PIIX4_PMBA = 0x40          # config: PM I/O base address (bit 0 reads 1: I/O space)
PIIX4_PMREGMISC = 0x80     # config: bit 0 PMIOSE enables the PM I/O space
PIIX4_PMIOSE = 1 << 0
PM_IO_BASE = 0xB000        # where the firmware step puts the PM registers
PM1A_CNT = 0x04            # 16-bit PM1a control register, from the PM base
SLP_TYP_SHIFT = 10
SLP_EN = 1 << 13
# QEMU's PIIX4 sleep types: 0 soft-off (S5), 1 suspend (S3), the device's s4_val (2 by default) hibernate:
# QEMU emits SUSPEND_DISK and shuts the machine down.
SLP_TYP_S5 = 0
SLP_TYP_S3 = 1
SLP_TYP_S4 = 2


def pm1_cnt_sleep(sleep_type: int) -> int:
    """The PM1a_CNT value that enters sleep type `sleep_type`."""
    return (sleep_type << SLP_TYP_SHIFT) | SLP_EN


# -- PIIX IDE bus-master DMA (function 1: BAR4 is the bus-master I/O block, 8 bytes per channel) ----------
BM_COMMAND = 0x0           # bit 0 start/stop, bit 3 direction: 1 = the device writes to memory (a read)
BM_STATUS = 0x2            # bit 0 active, bit 1 error, bit 2 interrupt (write 1 to clear 1 and 2)
BM_PRDT = 0x4              # 32-bit physical address of the PRD table
BM_CHANNEL_STRIDE = 0x8
BM_START = 1 << 0
BM_READ_TO_MEMORY = 1 << 3
BM_STATUS_ACTIVE, BM_STATUS_ERROR, BM_STATUS_IRQ = 1 << 0, 1 << 1, 1 << 2
PCI_COMMAND_IO, PCI_COMMAND_MASTER = 1 << 0, 1 << 2
# A physical region descriptor: base address, byte count (0 = 64 KiB), flags (bit 15: end of table).
PRD_ENTRY = struct.Struct("<IHH")
PRD_EOT = 1 << 15
PRD_MAX_BYTES = 1 << 16

# -- ATA -------------------------------------------------------------------------------------------------
ATA_READ_DMA = 0xC8
ATA_WRITE_SECTORS = 0x30
ATA_IDENTIFY_LBA28_SECTORS = 60  # IDENTIFY DEVICE words 60-61: user-addressable sectors (LBA28)
ATA_MAX_SECTORS = 256            # per LBA28 command (a count of 0 means 256)
