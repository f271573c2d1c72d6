"""The guest's Xen platform services as the PV drivers find them at boot (what XEN and XENBUS set up
before any child driver runs): the platform PCI device's BAR placed by the firmware step, shared_info
and grant table frames mapped into that BAR's hole with XENMEM_add_to_physmap, the event channel upcall
dispatcher, the grant table (guest side), the xenstore connection over the store ring, and a page
allocator over guest RAM.

The driver model (stack/drivers) uses these services; tests of back-ends use them directly as a
minimal frontend.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

from xenpv.stack.vcpu.grants import GrantTableFrontend
from xenpv.stack.vcpu.cpu import Vcpu
from xenpv.stack.vcpu.hypercalls import Hypercalls
from xenpv.stack.vcpu.pages import PageAllocator
from xenpv.stack.vcpu.pci import PciBus, PciFunction
from xenpv.stack.vcpu.upcall import UpcallDispatcher
from xenpv.stack.vcpu.xenstore import EventChannelDoorbell, GuestXenstore
from xenpv.xenabi import hvm
from xenpv.xenabi import xen as X
from xenpv.xenabi.grant_table import GNTTAB_NR_RESERVED_ENTRIES, GRANT_ENTRIES_V1_PER_FRAME

log = logging.getLogger("stack.vcpu.platform")

XEN_PLATFORM_VENDOR = 0x5853


class NotAXenGuest(Exception):
    pass


def _platform_functions(bus: PciBus) -> list[PciFunction]:
    """The Xen platform functions with their BARs placed. Where the firmware step already placed them (every
    boot does it first) only these functions are read, not the whole bus with every BAR sized again."""
    functions = [bus.function(slot, fn) for slot, fn, vendor in bus.present_functions()
                 if vendor == XEN_PLATFORM_VENDOR]
    if any(bar.address == 0 for f in functions for bar in f.bars):
        functions = [f for f in bus.assign_resources() if f.vendor_id == XEN_PLATFORM_VENDOR]
    return functions


@dataclass
class XenPlatform:
    vcpu: Vcpu
    device: PciFunction
    hypercalls: Hypercalls
    upcalls: UpcallDispatcher
    grants: GrantTableFrontend
    store: GuestXenstore
    pages: PageAllocator
    domid: int
    _cleanup: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    _free_refs: list[int] = field(default_factory=list)

    @classmethod
    def start(cls, vcpu: Vcpu, ram_pages: int, grant_frames: int = 4,
              pages: PageAllocator | None = None) -> "XenPlatform":
        """`pages`: the guest's page allocator when the kernel already has one (there must be one per guest)."""
        if vcpu.hv is None:
            raise NotAXenGuest("the vCPU has no hypervisor link")
        cleanup = contextlib.ExitStack()
        try:
            functions = _platform_functions(PciBus(vcpu))
            if not functions:
                raise NotAXenGuest("no Xen platform PCI device")
            device = functions[0]
            bar = next(b for b in device.bars if b.kind == "mem")
            hole = bar.address >> 12
            pages = pages if pages is not None else PageAllocator(ram_pages)
            hc = Hypercalls(vcpu, pages.alloc()[0] << 12)
            store_gfn = hc.get_param(hvm.HVM_PARAM_STORE_PFN)
            store_port = hc.get_param(hvm.HVM_PARAM_STORE_EVTCHN)
            pages.reserve(store_gfn)  # the toolstack's page: never the guest's to allocate
            hc.add_to_physmap(X.XENMAPSPACE_shared_info, 0, hole)
            for i in range(grant_frames):
                hc.add_to_physmap(X.XENMAPSPACE_grant_table, i, hole + 1 + i)
            shared = cleanup.enter_context(vcpu.page(hole))
            upcalls = UpcallDispatcher(vcpu.hv, shared)
            cleanup.callback(upcalls.close)
            grants = GrantTableFrontend([cleanup.enter_context(vcpu.page(hole + 1 + i)) for i in range(grant_frames)])
            cleanup.callback(grants.release)
            doorbell = EventChannelDoorbell(Hypercalls(vcpu, pages.alloc()[0] << 12), upcalls, store_port)
            cleanup.callback(doorbell.close)
            store = GuestXenstore(cleanup.enter_context(vcpu.page(store_gfn)), doorbell)
            cleanup.callback(store.close)
            domid = int(store.read("domid"))
        except BaseException:
            cleanup.close()
            raise
        log.info("dom%d: platform %s, BAR hole at gfn %#x, store gfn %#x port %d", domid, device, hole,
                 store_gfn, store_port)
        refs = list(range(grant_frames * GRANT_ENTRIES_V1_PER_FRAME - 1, GNTTAB_NR_RESERVED_ENTRIES - 1, -1))
        return cls(vcpu, device, hc, upcalls, grants, store, pages, domid, cleanup, refs)

    def grant(self, domid: int, gfn: int, readonly: bool = False) -> int:
        """A free grant ref giving `domid` access to `gfn`."""
        if not self._free_refs:
            raise RuntimeError("grant table full")
        ref = self._free_refs.pop()
        self.grants.grant_access(ref, domid, gfn, readonly)
        return ref

    def end_grant(self, ref: int) -> bool:
        """Revoke `ref`; False while the back-end still has it mapped (the ref is then kept)."""
        if not self.grants.end_foreign_access(ref):
            return False
        self._free_refs.append(ref)
        return True

    @property
    def hole(self) -> int:
        """The first frame of the platform BAR: where shared_info goes, the grant frames after it."""
        return next(b for b in self.device.bars if b.kind == "mem").address >> 12

    def map_shared_info(self) -> None:
        """XENMEM_add_to_physmap of shared_info at the hole (SharedInfoMap)."""
        self.hypercalls.add_to_physmap(X.XENMAPSPACE_shared_info, 0, self.hole)
        self.vcpu.forget_hypervisor_pages()

    def map_grant_frames(self) -> None:
        """XENMEM_add_to_physmap of every grant frame after shared_info (GnttabMap)."""
        for i in range(self.grants.nr_entries // GRANT_ENTRIES_V1_PER_FRAME):
            self.hypercalls.add_to_physmap(X.XENMAPSPACE_grant_table, i, self.hole + 1 + i)
        self.vcpu.forget_hypervisor_pages()

    def reconnect_store(self) -> int:
        """The store connection of the domain the guest runs in now: HVM_PARAM_STORE_EVTCHN read again,
        the doorbell moved to that port (unmasked), a partial reply dropped. Returns the port."""
        port = self.hypercalls.get_param(hvm.HVM_PARAM_STORE_EVTCHN)
        self.store.reset(port)
        self.hypercalls.evtchn_unmask(port)
        return port

    def close(self) -> None:
        self._cleanup.close()
