"""XENVBD's target rules as the real driver's (xcp-ng/win-xenvbd 583bd7f): src/xenvbd/adapter.c
__AdapterHiddenTarget, AdapterIsTargetEmulated and __AdapterEnumerate's reboot request, src/xenvbd/target.c
TargetCreate. The adapter runs its real enumeration over a xenstore `device/vbd` held in a dict, XENBUS's
real UNPLUG v3 table on a real xen.sys (registry, boot options, Config) and XENFILT's real EMULATED; only the
target itself is a stand-in that records its creation (no ring, no backend here)."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

import xenpv.stack.drivers.xenvbd.adapter as adapter_module
from xenpv.stack.drivers.xen import Xen
from xenpv.stack.drivers.xenbus.unplug import UnplugInterface
from xenpv.stack.drivers.xenfilt.emulated import Emulated, EmulatedStatus
from xenpv.stack.drivers.xenvbd.adapter import XenvbdAdapter, strtoul_base2
from xenpv.stack.kernel import Registry
from xenpv.stack.kernel.debuglog import DebugLog
from xenpv.stack.kernel.irql import Processor, set_current_processor
from xenpv.stack.kernel.status import STATUS_SUCCESS, STATUS_UNSUCCESSFUL

CONTROL_KEY = r"HKLM\SYSTEM\CurrentControlSet\Control"
HDA, HDB, HDC = 3 << 8, (3 << 8) | (1 << 6), 22 << 8  # targets 0, 1, 2
XVDE = (202 << 8) | (4 << 4)  # target 4
UNKNOWN_MAJOR = 7 << 8  # no Linux disk major XENVBD knows


@pytest.fixture(autouse=True)
def cpu() -> Iterator[Processor]:
    processor = Processor()
    previous = set_current_processor(processor)
    yield processor
    set_current_processor(previous)


@dataclass
class Buffer:
    Value: bytes


@dataclass
class DictStore:
    """STORE's Directory/Read/Free over `device/vbd/<id>/<key>` values."""

    values: dict[str, str] = field(default_factory=dict)

    def StoreDirectory(self, transaction: object, prefix: str | None, node: str) -> tuple[int, Buffer | None]:
        names = sorted({k[len(node) + 1:].split("/")[0] for k in self.values if k.startswith(node + "/")})
        return STATUS_SUCCESS, Buffer("\0".join(names).encode() + b"\0")

    def StoreRead(self, transaction: object, prefix: str | None, node: str) -> tuple[int, Buffer | None]:
        path = f"{prefix}/{node}" if prefix else node
        if path not in self.values:
            return 0xC0000034, None  # STATUS_OBJECT_NAME_NOT_FOUND, as ENOENT maps
        return STATUS_SUCCESS, Buffer(self.values[path].encode())

    def StoreFree(self, buffer: Buffer) -> None:
        pass

    def vbd(self, devid: int, **keys: str) -> None:
        self.values.update({f"device/vbd/{devid}/{k.replace('_', '-')}": v for k, v in keys.items()})


@dataclass
class Created:
    """Stands in for XenvbdTarget: TargetCreate got past every refusal."""

    adapter: XenvbdAdapter
    devid: int
    target_id: int

    def TargetStart(self) -> int:
        return STATUS_SUCCESS


class FailingEmulated(Emulated):
    def setup(self) -> int:
        return STATUS_UNSUCCESSFUL


def _adapter(monkeypatch: pytest.MonkeyPatch, store: DictStore, *, emulated: Emulated | None = None,
             boot_options: str = "") -> tuple[XenvbdAdapter, Xen]:
    monkeypatch.setattr(adapter_module, "XenvbdTarget", Created)
    registry = Registry()
    if boot_options:
        registry.set_sz(CONTROL_KEY, "SystemStartOptions", boot_options)
    xen = Xen(registry, DebugLog(), None)
    adapter = XenvbdAdapter(device=None, lower=None, registry=registry)  # type: ignore[arg-type]
    adapter.interfaces["STORE"] = store  # type: ignore[assignment]
    adapter.interfaces["UNPLUG"] = UnplugInterface(xen).get_interface(3, 4096)[1]  # type: ignore[assignment]
    if emulated is not None:
        adapter.interfaces["EMULATED"] = emulated.get_interface(2, 4096)[1]  # type: ignore[assignment]
    return adapter, xen


def _emulated(*instance_ids: str) -> Emulated:
    emulated = Emulated()
    for instance_id in instance_ids:
        emulated.EmulatedAddObject("IDE", r"IDE\DiskQEMU_HARDDISK", instance_id, [], EmulatedStatus.NEUTRAL)
    return emulated


def _created(adapter: XenvbdAdapter) -> dict[int, int]:
    return {devid: target.target_id for devid, target in adapter.targets.items()}


def test_targets_above_3_are_never_emulated(monkeypatch) -> None:
    """adapter.c AdapterIsTargetEmulated: `if (TargetId > 3) return FALSE;` before EMULATED is asked."""
    store = DictStore()
    store.vbd(XVDE, device_type="disk")
    adapter, _ = _adapter(monkeypatch, store)  # no EMULATED at all
    adapter.AdapterEnumerate()
    assert _created(adapter) == {XVDE: 4} and adapter.refused == {}


def test_without_emulated_targets_0_to_3_count_as_emulated(monkeypatch) -> None:
    """AdapterIsTargetEmulated: `Absence indicates emulated cannot be unplugged` -> TRUE, and TargetCreate
    returns STATUS_RETRY: the same disk is never live twice; __AdapterEnumerate requests the reboot."""
    store = DictStore()
    store.vbd(HDA, device_type="disk")
    adapter, xen = _adapter(monkeypatch, store)
    adapter.AdapterEnumerate()
    assert _created(adapter) == {} and adapter.refused == {HDA: "STATUS_RETRY"}
    assert xen.config.reboot_requested("XENVBD")


def test_emulated_whose_acquire_fails_counts_as_emulated(monkeypatch) -> None:
    """AdapterIsTargetEmulated: `Acquire failed, assume emulated`."""
    store = DictStore()
    store.vbd(HDB, device_type="disk")
    adapter, _ = _adapter(monkeypatch, store, emulated=FailingEmulated())
    adapter.AdapterEnumerate()
    assert adapter.refused == {HDB: "STATUS_RETRY"}


def test_emulated_answers_for_targets_0_to_3(monkeypatch) -> None:
    store = DictStore()
    store.vbd(HDA, device_type="disk")
    store.vbd(HDB, device_type="disk")
    adapter, xen = _adapter(monkeypatch, store, emulated=_emulated("0.0.0"))
    adapter.AdapterEnumerate()
    assert _created(adapter) == {HDB: 1} and adapter.refused == {HDA: "STATUS_RETRY"}
    assert xen.config.reboot_requested("XENVBD")


@pytest.mark.parametrize("keys,why", [
    ({"device_type": "cdrom"}, "a CD-ROM stays with the emulated drive"),
    ({}, "no device-type"),
    ({"device_type": "disk", "ejected": "1"}, "ejected"),
    ({"device_type": "disk", "ejected": " 10"}, "strtoul(, 2): 2"),
])
def test_hidden_vbds_are_skipped_without_refusal_or_reboot(monkeypatch, keys: dict[str, str], why: str) -> None:
    """adapter.c __AdapterHiddenTarget: ejected, device-type missing, or device-type not "disk"."""
    store = DictStore()
    store.vbd(HDC, virtual_device=str(HDC), **keys)
    adapter, xen = _adapter(monkeypatch, store, emulated=_emulated())
    adapter.AdapterEnumerate()
    assert _created(adapter) == {} and adapter.refused == {}, why
    assert not xen.config.reboot_requested("XENVBD")


def test_an_ejected_value_that_reads_zero_does_not_hide(monkeypatch) -> None:
    store = DictStore()
    store.vbd(HDC, device_type="disk", ejected="0")
    adapter, _ = _adapter(monkeypatch, store, emulated=_emulated())
    adapter.AdapterEnumerate()
    assert _created(adapter) == {HDC: 2}


def test_target_0_under_boot_emulated_is_unsuccessful_and_asks_no_reboot(monkeypatch) -> None:
    """target.c TargetCreate: `if (TargetId == 0 && AdapterBootEmulated(Adapter)) return STATUS_UNSUCCESSFUL;`
    (no reboot would unplug the primary master: BOOT_EMULATED keeps it)."""
    store = DictStore()
    store.vbd(HDA, device_type="disk")
    adapter, xen = _adapter(monkeypatch, store, emulated=_emulated(), boot_options="/XEN:BOOT_EMULATED=TRUE")
    adapter.AdapterEnumerate()
    assert adapter.refused == {HDA: "STATUS_UNSUCCESSFUL"}
    assert not xen.config.reboot_requested("XENVBD")


def test_a_vdev_with_no_target_is_retry_with_a_reboot_request(monkeypatch) -> None:
    """target.c TargetCreate: `if (TargetId >= XENVBD_MAX_TARGETS) return STATUS_RETRY;` (__ParseVbd's
    0xFFFFFFFF for an unknown major, or an extended target 255)."""
    store = DictStore()
    store.vbd(UNKNOWN_MAJOR, device_type="disk")
    store.vbd((1 << 28) | (255 << 8), device_type="disk")
    adapter, xen = _adapter(monkeypatch, store, emulated=_emulated())
    adapter.AdapterEnumerate()
    assert adapter.refused == {UNKNOWN_MAJOR: "STATUS_RETRY", (1 << 28) | (255 << 8): "STATUS_RETRY"}
    assert xen.config.reboot_requested("XENVBD")


@pytest.mark.parametrize("text,value", [("1", 1), ("0", 0), ("", 0), ("true", 0), ("  101x", 5), ("+1", 1),
                                        ("-1", 0xFFFFFFFF), ("2", 0)])
def test_strtoul_base2(text: str, value: int) -> None:
    assert strtoul_base2(text) == value
