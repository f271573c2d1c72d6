"""`vbd list|pages|read|write|flush|discard`: the PV disks as XENVBD's targets, through the driver's disk API.

`vbd pages` prints the guest's free pages and the grant entries in use (what a leak would show).
`vbd read T LBA COUNT [hex]` prints the sha256 of the data (or its hex with `hex`); `vbd write T LBA PATTERN
COUNT` writes COUNT sectors of PATTERN (hex bytes, repeated; or `seq` for a pattern that differs in every
sector: the sector number as 8 little-endian bytes, repeated); both take `--timeout S`. Driver code runs
with the kernel lock held, as every console command does.
"""
from __future__ import annotations

import hashlib

from xenpv.stack.agent.console import UsageError, command, parse_int
from xenpv.stack.agent.runtime import GuestRuntime
from xenpv.stack.drivers.xenvbd.adapter import XenvbdAdapter
from xenpv.stack.drivers.xenvbd.target import IO_TIMEOUT_SECONDS, XenvbdIoError, XenvbdTarget
from xenpv.xenabi.grant_table import GTF_type_mask

def sector_pattern(pattern: str, lba: int, count: int, sector_size: int) -> bytes:
    """The bytes `vbd write` writes: PATTERN's hex bytes repeated, or `seq` (each sector holds its LBA)."""
    if pattern == "seq":
        return b"".join((lba + i).to_bytes(8, "little") * (sector_size // 8) for i in range(count))
    unit = bytes.fromhex(pattern)
    if not unit:
        raise ValueError("empty pattern")
    total = count * sector_size
    return (unit * (total // len(unit) + 1))[:total]


def _adapters(rt: GuestRuntime) -> list[XenvbdAdapter]:
    driver = rt.kernel.pnp.drivers.get("XENVBD")
    if driver is None or driver.extension is None:
        raise RuntimeError("XENVBD is not loaded")
    return list(driver.extension.adapters)


def _target(rt: GuestRuntime, target_id: int) -> XenvbdTarget:
    for adapter in _adapters(rt):
        for target in adapter.targets.values():
            if target.target_id == target_id:
                return target
    raise RuntimeError(f"no target {target_id}")


_NUMBERS = {"read": ("T", "LBA", "COUNT"), "write": ("T", "LBA", None, "COUNT"), "flush": ("T",),
            "discard": ("T", "LBA", "COUNT")}  # the numeric arguments of each operation, by position


@command("vbd", "the PV disks (XENVBD targets)",
         ("list", "pages", "read T LBA COUNT [hex] [--timeout S]", "write T LBA PATTERN COUNT [--timeout S]",
          "flush T [--timeout S]", "discard T LBA COUNT [--timeout S]"),
         details="T: a target number (vbd list); LBA, COUNT: sectors; PATTERN: hex bytes, repeated, or seq "
                 "(each sector holds its LBA); read prints the data's sha256, or its hex with `hex`; "
                 "--timeout S: seconds to wait for the back-end")
def _vbd(rt: GuestRuntime, args: list[str]) -> str:
    timeout = IO_TIMEOUT_SECONDS
    if len(args) > 2 and args[-2] == "--timeout":
        try:
            timeout = float(args[-1])
        except ValueError:
            raise UsageError(f"S must be a number of seconds, got {args[-1]!r}") from None
        if not 0 < timeout < float("inf"):
            raise UsageError(f"S must be a positive number of seconds, got {args[-1]!r}")
        args = args[:-2]
    op, rest = args[0], args[1:]
    # Every value is checked before any driver code runs: T, LBA and COUNT are numbers, PATTERN hex or seq.
    numbers = [parse_int(value, name, 0) for value, name in zip(rest, _NUMBERS.get(op, ())) if name]
    if op == "write" and rest[2] != "seq":
        try:
            if not bytes.fromhex(rest[2]):
                raise ValueError("no bytes")
        except ValueError:
            raise UsageError(f"PATTERN must be hex bytes or seq, got {rest[2]!r}") from None
    with rt.kernel.cpu.lock:
        if op == "list":
            lines = []
            for adapter in _adapters(rt):
                lines += [t.describe() for t in adapter.targets.values()]
                lines += [f"vbd {devid} refused: {why}" for devid, why in sorted(adapter.refused.items())]
            return "\n".join(lines) or "(no targets)"
        if op == "pages":
            assert rt.kernel.mm is not None
            gnttab = next((a.interfaces["GNTTAB"] for a in _adapters(rt) if "GNTTAB" in a.interfaces), None)
            if gnttab is None:
                return "XENVBD holds no GNTTAB interface"
            grants = gnttab.Context.platform.grants
            granted = sum(1 for ref in range(grants.nr_entries) if grants.entry(ref).flags & GTF_type_mask)
            return f"free {rt.kernel.mm.pages.available} granted {granted}"
        target = _target(rt, numbers[0])
        try:
            if op == "read":
                data = target.TargetRead(numbers[1], numbers[2], timeout)
                if len(rest) == 4:  # the usage admits only `hex` there
                    return data.hex()
                return f"sha256 {hashlib.sha256(data).hexdigest()} bytes {len(data)}"
            if op == "write":
                lba, count = numbers[1], numbers[2]
                data = sector_pattern(rest[2], lba, count, target.features.sector_size)
                target.TargetWrite(lba, data, timeout)
                return f"wrote {count} sectors at {lba} sha256 {hashlib.sha256(data).hexdigest()}"
            if op == "flush":
                how = target.TargetFlush(timeout)
                return f"flushed ({how or 'nothing to flush'})"
            target.TargetDiscard(numbers[1], numbers[2], timeout)
            return f"discarded {numbers[2]} sectors at {numbers[1]}"
        except XenvbdIoError as exc:
            return f"failed: {exc}"
