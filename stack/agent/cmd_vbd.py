"""`vbd list|pages|read|write|flush|discard`: the PV disks as XENVBD's targets, through the driver's disk API.

`vbd pages` prints the guest's free pages and the grant entries in use (what a leak would show).
`vbd read T LBA COUNT [hex]` prints the sha256 of the data (or its hex with `hex`); `vbd write T LBA PATTERN
COUNT` writes COUNT sectors of PATTERN (hex bytes, repeated; or `seq` for a pattern that differs in every
sector: the sector number as 8 little-endian bytes, repeated); both take `--timeout S`. Driver code runs
with the kernel lock held, as every console command does.
"""
from __future__ import annotations

import hashlib

from xenpv.stack.agent.console import command
from xenpv.stack.agent.runtime import GuestRuntime
from xenpv.stack.drivers.xenvbd.adapter import XenvbdAdapter
from xenpv.stack.drivers.xenvbd.target import IO_TIMEOUT_SECONDS, XenvbdIoError, XenvbdTarget
from xenpv.xenabi.grant_table import GTF_type_mask

USAGE = ("usage: vbd list | pages | read T LBA COUNT [hex] | write T LBA PATTERN COUNT | flush T | discard T LBA COUNT"
         "  [--timeout S]")


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


def _target(rt: GuestRuntime, text: str) -> XenvbdTarget:
    target_id = int(text, 0)
    for adapter in _adapters(rt):
        for target in adapter.targets.values():
            if target.target_id == target_id:
                return target
    raise RuntimeError(f"no target {target_id}")


@command("vbd", "vbd list|pages|read|write|flush|discard: the PV disks (XENVBD targets)")
def _vbd(rt: GuestRuntime, args: list[str]) -> str:
    timeout = IO_TIMEOUT_SECONDS
    if "--timeout" in args:
        at = args.index("--timeout")
        timeout = float(args[at + 1])
        args = args[:at] + args[at + 2:]
    if not args:
        return USAGE
    op, rest = args[0], args[1:]
    with rt.kernel.cpu.lock:
        if op == "list" and not rest:
            lines = []
            for adapter in _adapters(rt):
                lines += [t.describe() for t in adapter.targets.values()]
                lines += [f"vbd {devid} refused: {why}" for devid, why in sorted(adapter.refused.items())]
            return "\n".join(lines) or "(no targets)"
        if op == "pages" and not rest:
            assert rt.kernel.mm is not None
            gnttab = next((a.interfaces["GNTTAB"] for a in _adapters(rt) if "GNTTAB" in a.interfaces), None)
            if gnttab is None:
                return "XENVBD holds no GNTTAB interface"
            grants = gnttab.Context.platform.grants
            granted = sum(1 for ref in range(grants.nr_entries) if grants.entry(ref).flags & GTF_type_mask)
            return f"free {rt.kernel.mm.pages.available} granted {granted}"
        try:
            if op == "read" and len(rest) in (3, 4):
                data = _target(rt, rest[0]).TargetRead(int(rest[1], 0), int(rest[2], 0), timeout)
                if len(rest) == 4 and rest[3] == "hex":
                    return data.hex()
                return f"sha256 {hashlib.sha256(data).hexdigest()} bytes {len(data)}"
            if op == "write" and len(rest) == 4:
                target = _target(rt, rest[0])
                lba, count = int(rest[1], 0), int(rest[3], 0)
                data = sector_pattern(rest[2], lba, count, target.features.sector_size)
                target.TargetWrite(lba, data, timeout)
                return f"wrote {count} sectors at {lba} sha256 {hashlib.sha256(data).hexdigest()}"
            if op == "flush" and len(rest) == 1:
                how = _target(rt, rest[0]).TargetFlush(timeout)
                return f"flushed ({how or 'nothing to flush'})"
            if op == "discard" and len(rest) == 3:
                _target(rt, rest[0]).TargetDiscard(int(rest[1], 0), int(rest[2], 0), timeout)
                return f"discarded {int(rest[2], 0)} sectors at {int(rest[1], 0)}"
        except XenvbdIoError as exc:
            return f"failed: {exc}"
    return USAGE
