"""xenabi layout helpers and small protocol helpers (the numbers themselves are checked against the C headers
in tests/conformance/test_xenabi_headers.py)."""

from __future__ import annotations

import ctypes

import pytest

from xenpv.xenabi import blkif, grant_table, hvm, netif, unplug, xen
from xenpv.xenabi.layout import field_offsets, from_bytes, struct_of, to_dict
from xenpv.xenabi.xenbus import XenbusState


@pytest.mark.parametrize("layout", [
    blkif.BlkifRequest, blkif.BlkifResponse, blkif.BlkifX86_32Request, blkif.BlkifX86_32Response,
    blkif.BlkifRequestIndirect, blkif.BlkifX86_32RequestIndirect, netif.NetifTxRequest, netif.NetifRxResponse,
    netif.NetifExtraInfo, grant_table.GnttabCopy, xen.SharedInfo,
])
def test_struct_of_matches_ctypes(layout: type[ctypes.Structure]) -> None:
    codec = struct_of(layout)
    assert codec.size == ctypes.sizeof(layout)
    data = bytes((7 * i + 1) % 256 for i in range(codec.size))
    # A struct round trip zeroes only padding, so every ctypes field must survive it unchanged.
    repacked = codec.pack(*codec.unpack(data))
    assert to_dict(layout.from_buffer_copy(repacked)) == to_dict(layout.from_buffer_copy(data))


def test_struct_and_ctypes_agree_on_a_blkif_request() -> None:
    request = blkif.BlkifX86_32Request(operation=blkif.BLKIF_OP_WRITE, nr_segments=2, handle=51712, id=0x1122334455,
                                       sector_number=4096)
    request.seg[1].gref = 77
    request.seg[1].last_sect = 7
    values = blkif.BLKIF_X86_32.request_struct.unpack(bytes(request))
    assert values[:5] == (blkif.BLKIF_OP_WRITE, 2, 51712, 0x1122334455, 4096)
    assert values[5 + 3:5 + 6] == (77, 0, 7)


def test_field_offsets_name_c_member_designators() -> None:
    offsets = field_offsets(netif.NetifExtraInfo)
    assert offsets["u.gso.size"] == (2, 2)
    assert offsets["u.hash.value"] == (4, 4)
    assert field_offsets(blkif.BlkifRequest)["seg[0].last_sect"] == (29, 1)
    assert field_offsets(xen.SharedInfo)["vcpu_info[0].time.tsc_shift"] == (60, 1)


def test_from_bytes_copies_and_checks_size() -> None:
    data = bytearray(bytes(grant_table.GrantEntryV1(flags=grant_table.GTF_permit_access, domid=0, frame=0x1234)))
    entry = from_bytes(grant_table.GrantEntryV1, data)
    data[0] = 0
    assert to_dict(entry) == {"flags": grant_table.GTF_permit_access, "domid": 0, "frame": 0x1234}
    with pytest.raises(ValueError):
        from_bytes(grant_table.GrantEntryV1, bytes(7))


def test_blkif_protocol_selection() -> None:
    assert blkif.layouts_for_protocol(None) is blkif.BLKIF_NATIVE
    assert blkif.layouts_for_protocol("x86_64-abi") is blkif.BLKIF_NATIVE
    assert blkif.layouts_for_protocol("x86_32-abi") is blkif.BLKIF_X86_32
    with pytest.raises(ValueError):
        blkif.layouts_for_protocol("arm-abi")
    assert blkif.BLKIF_SEGS_PER_INDIRECT_FRAME == 512


def test_name_tables() -> None:
    assert grant_table.GNTST_NAMES[grant_table.GNTST_permission_denied] == "GNTST_permission_denied"
    assert xen.HYPERCALL_NUMBERS["event_channel_op"] == 32
    assert grant_table.GNTTABOP_ARGUMENTS[grant_table.GNTTABOP_copy] is grant_table.GnttabCopy


def test_xenbus_state_parse() -> None:
    assert XenbusState.parse(b"4") is XenbusState.Connected
    assert XenbusState.parse("6") is XenbusState.Closed
    assert XenbusState.parse(None) is XenbusState.Unknown
    assert XenbusState.parse("bogus") is XenbusState.Unknown
    assert XenbusState.parse("99") is XenbusState.Unknown
    assert XenbusState.InitWait.wire() == "2"


def test_hvm_callback_via() -> None:
    value = hvm.callback_via_pci_intx(0, 0, 3 << 3, 0)
    assert value == (1 << 56) | (0x18 << 8)
    assert hvm.callback_irq_type(value) == hvm.HVM_PARAM_CALLBACK_TYPE_PCI_INTX
    assert hvm.callback_irq_type(hvm.callback_via_vector(0xF3)) == hvm.HVM_PARAM_CALLBACK_TYPE_VECTOR
    assert hvm.callback_via_gsi(28) == 28


def test_unplug_constants() -> None:
    assert unplug.UNPLUG_MAGIC == 0x49D2 and unplug.UNPLUG_MAGIC_BLACKLISTED == 0xD249
    assert (unplug.UNPLUG_ALL_IDE_DISKS, unplug.UNPLUG_ALL_NICS, unplug.UNPLUG_AUX_IDE_DISKS,
            unplug.UNPLUG_NVME_DISKS) == (1, 2, 4, 8)
    assert unplug.PIIX4_ACPI_PCIHP_EJECT == 0xAE08
    assert unplug.eject_value(6) == 0x40
    with pytest.raises(ValueError):
        unplug.eject_value(32)
