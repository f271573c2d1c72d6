"""The hibernation image ("hiberfile") as the model's Windows writes it and its resume loader reads it.

It lies in the hiberfile area, the last quarter of the system disk (hiberfile_area: both the writer, which
knows the disk from its PV backend, and the loader, which knows it from ATA IDENTIFY, find it there).
Sector 0 of the area is the header; the records follow from sector 1: each a RECORD header (guest-physical
address, length) then that many bytes of guest RAM - the pages in use when the guest hibernated (the free
ones hold nothing Windows needs). A loader takes the image only if every header field holds, the header's
and the records' CRC-32 match and every record lies in guest RAM; after a resume it clears the magic, as
Windows marks its hiberfile used.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

SECTOR = 512
MAGIC = b"HIBRxpv\x00"  # hiberfil.sys of a resumable system starts with "HIBR"
VERSION = 1
# magic, version, page size, RAM size, records' bytes, record count, records' CRC-32, DMA scratch gfn and
# pages (free RAM when the image was made: the loader reads into it), header CRC-32 (of the header with
# this field 0)
HEADER = struct.Struct("<8sIIQQQIQII")
RECORD = struct.Struct("<QI")  # guest-physical address, length
MAX_RECORD = 64 << 10


class HiberfileError(ValueError):
    """Not a usable hibernation image; says why (the loader then boots afresh)."""


@dataclass(frozen=True)
class HiberHeader:
    ram_size: int
    data_bytes: int
    records: int
    data_crc: int
    scratch_gfn: int
    scratch_pages: int
    page_size: int = 4096
    version: int = VERSION

    def pack(self) -> bytes:
        raw = HEADER.pack(MAGIC, self.version, self.page_size, self.ram_size, self.data_bytes, self.records,
                          self.data_crc, self.scratch_gfn, self.scratch_pages, 0)
        crc = zlib.crc32(raw)
        return HEADER.pack(MAGIC, self.version, self.page_size, self.ram_size, self.data_bytes, self.records,
                           self.data_crc, self.scratch_gfn, self.scratch_pages, crc).ljust(SECTOR, b"\0")

    @classmethod
    def unpack(cls, sector: bytes, ram_size: int, area_bytes: int) -> "HiberHeader":
        """The header of an image for a guest with `ram_size` bytes of RAM in an area of `area_bytes`."""
        if len(sector) < HEADER.size:
            raise HiberfileError("the header sector is short")
        magic, version, page, ram, data_bytes, records, data_crc, gfn, pages, crc = HEADER.unpack_from(sector)
        if magic != MAGIC:
            raise HiberfileError("no hibernation image (no HIBR signature)")
        if zlib.crc32(HEADER.pack(magic, version, page, ram, data_bytes, records, data_crc, gfn, pages, 0)) != crc:
            raise HiberfileError("the header fails its checksum")
        if version != VERSION or page != 4096:
            raise HiberfileError(f"version {version} with {page}-byte pages, not {VERSION} with 4096")
        if ram != ram_size:
            raise HiberfileError(f"made for {ram} bytes of RAM, this machine has {ram_size}")
        if data_bytes > area_bytes - SECTOR or records * RECORD.size > data_bytes:
            raise HiberfileError(f"{data_bytes} bytes of records ({records}) do not fit the hiberfile area")
        if pages < 2 or (gfn + pages) * 4096 > ram_size:
            raise HiberfileError(f"scratch pages {gfn:#x}+{pages} are not in RAM")
        return cls(ram, data_bytes, records, data_crc, gfn, pages, page, version)


def hiberfile_area(disk_sectors: int) -> tuple[int, int]:
    """(first sector, sectors) of the hiberfile area on a system disk of `disk_sectors` 512-byte sectors."""
    sectors = disk_sectors // 4
    return disk_sectors - sectors, sectors


def pack_records(chunks: list[tuple[int, bytes]]) -> bytes:
    return b"".join(RECORD.pack(gpa, len(data)) + data for gpa, data in chunks)


def unpack_records(data: bytes, header: HiberHeader) -> list[tuple[int, bytes]]:
    """The records, each checked against the header and guest RAM; HiberfileError on anything wrong."""
    if len(data) < header.data_bytes:
        raise HiberfileError(f"{len(data)} bytes of records read, the header says {header.data_bytes}")
    data = data[:header.data_bytes]
    if zlib.crc32(data) != header.data_crc:
        raise HiberfileError("the records fail their checksum")
    out: list[tuple[int, bytes]] = []
    at = 0
    while at < len(data):
        if at + RECORD.size > len(data):
            raise HiberfileError("a record header runs past the records")
        gpa, length = RECORD.unpack_from(data, at)
        at += RECORD.size
        if not 0 < length <= MAX_RECORD or gpa % 4096 or gpa + length > header.ram_size or at + length > len(data):
            raise HiberfileError(f"a record of {length} bytes at {gpa:#x} is not in RAM or runs past the records")
        out.append((gpa, data[at:at + length]))
        at += length
    if len(out) != header.records:
        raise HiberfileError(f"{len(out)} records, the header says {header.records}")
    return out
