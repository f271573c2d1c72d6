"""The guest's CPU as the drivers see it: port I/O, MMIO and memory over qtest, guest RAM through the
mapping, hypercalls to xenhv, and the ports xenhv claims (the platform unplug ports) routed to it, as
Xen routes port I/O to an ioreq server.

The vCPU also plays the guest's ACPI OSPM for PCI hot-unplug: after xenhv has asked QEMU to remove
devices, the slots QEMU marks "down" are ejected through the PIIX4 hotplug registers, as Windows does
on the hotplug notification.
"""
from __future__ import annotations

import ctypes
import logging

from xenpv.stack.vcpu.guestmem import PAGE_SIZE, GuestMemory, GuestMemoryError
from xenpv.stack.vcpu.hypervisor import HypervisorLink
from xenpv.stack.vcpu.qtest import Qtest
from xenpv.stack.vcpu.relocation import Relocation
from xenpv.xenabi import event_channel as E
from xenpv.xenabi import unplug as unplug_abi
from xenpv.xenabi import xen as X

log = logging.getLogger("stack.vcpu")

_EVENT_CHANNEL_OP = X.HYPERCALL_NUMBERS["event_channel_op"]
_MEMORY_OP = X.HYPERCALL_NUMBERS["memory_op"]
# evtchn_send and evtchn_close both hold only the port, a little-endian u32.
_PORT_ARG_SIZE = ctypes.sizeof(E.EvtchnSend)
assert _PORT_ARG_SIZE == ctypes.sizeof(E.EvtchnClose) == E.EvtchnSend.port.size == 4


class Vcpu:
    def __init__(self, qtest: Qtest, memory: GuestMemory, hypervisor: HypervisorLink | None = None) -> None:
        self.qtest = qtest
        self.memory = memory
        self.hv = hypervisor
        self._hv_pages: dict[int, int | None] = {}
        # How the harness hands this vCPU another machine (a restore, a power-on after S4).
        self.relocation = Relocation()

    def _xenhv_port(self, port: int) -> bool:
        return self.hv is not None and self.hv.platform_ports and unplug_abi.UNPLUG_PORT_BASE <= port < (
            unplug_abi.UNPLUG_PORT_BASE + unplug_abi.UNPLUG_PORT_COUNT)

    def _in(self, port: int, size: int) -> int:
        if self._xenhv_port(port):
            return self.hv.pio_read(port, size)
        return {1: self.qtest.inb, 2: self.qtest.inw, 4: self.qtest.inl}[size](port)

    def _out(self, port: int, size: int, value: int) -> None:
        if self._xenhv_port(port):
            self.hv.pio_write(port, size, value)
            self.acpi_eject_pending()
            return
        {1: self.qtest.outb, 2: self.qtest.outw, 4: self.qtest.outl}[size](port, value)

    def out_in(self, out_port: int, value: int, in_port: int, in_size: int) -> int:
        """outl then a read, in one qtest round trip when neither port is xenhv's (PCI configuration)."""
        if self._xenhv_port(out_port) or self._xenhv_port(in_port):
            self._out(out_port, 4, value)
            return self._in(in_port, in_size)
        return self.qtest.out_in(out_port, value, in_port, in_size)

    def inb(self, port: int) -> int:
        return self._in(port, 1)

    def inw(self, port: int) -> int:
        return self._in(port, 2)

    def inl(self, port: int) -> int:
        return self._in(port, 4)

    def outb(self, port: int, value: int) -> None:
        self._out(port, 1, value)

    def outw(self, port: int, value: int) -> None:
        self._out(port, 2, value)

    def outl(self, port: int, value: int) -> None:
        self._out(port, 4, value)

    def acpi_eject_pending(self) -> int:
        """Eject every slot QEMU's PIIX4 hotplug controller has marked for removal; returns the mask."""
        self.qtest.outl(unplug_abi.PIIX4_ACPI_PCIHP_BUS_SELECT, 0)
        down = self.qtest.inl(unplug_abi.PIIX4_ACPI_PCIHP_DOWN)
        for slot in range(32):
            if down & (1 << slot):
                # One slot per write: QEMU ejects only the lowest bit of the value, as _EJ0 is per slot.
                log.info("OSPM: ejecting PCI slot %d", slot)
                self.qtest.outl(unplug_abi.PIIX4_ACPI_PCIHP_EJECT, unplug_abi.eject_value(slot))
        return down

    # -- hypercalls and guest-physical memory ----------------------------------------------------

    def hypercall(self, nr: int, *args: int) -> int:
        if self.hv is None:
            raise RuntimeError("this vCPU has no hypervisor: not a Xen guest")
        if nr == _MEMORY_OP:
            self._hv_pages.clear()  # the p2m may change
        elif nr == _EVENT_CHANNEL_OP and len(args) >= 2 and args[0] in (E.EVTCHNOP_send, E.EVTCHNOP_close):
            # The doorbell fast path, as KVM handles an ioeventfd write without a VM exit: a send on a
            # port bound to a back-end is an eventfd write. A close drops the port's doorbell first.
            try:
                port = int.from_bytes(self.read_phys(args[1], _PORT_ARG_SIZE), "little")
            except GuestMemoryError:
                port = None  # not readable guest memory: xenhv answers -EFAULT
            if port is not None:
                if args[0] == E.EVTCHNOP_close:
                    self.hv.doorbells.forget(port)
                elif self.hv.doorbells.send(port):
                    return 0
        return self.hv.hypercall(nr, *args)

    def send_by_doorbell(self, port: int) -> bool:
        """EVTCHNOP_send on `port` through its doorbell, for a caller that has the port in hand rather than in
        guest RAM (stack/vcpu/hypercalls.py); False when the port has none and the send must trap."""
        return self.hv is not None and self.hv.doorbells.send(port)

    def forget_hypervisor_pages(self) -> None:
        """The p2m is another domain's now (a restore or a power-on): where hypervisor frames sit is asked
        again."""
        self._hv_pages.clear()

    def _hv_offset(self, gfn: int) -> int | None:
        if self.hv is None:
            return None
        if gfn not in self._hv_pages:
            self._hv_pages[gfn] = self.hv.frame_offset(gfn)
        return self._hv_pages[gfn]

    def page(self, gfn: int) -> memoryview:
        """The page the guest sees at `gfn`: a hypervisor frame if one is mapped there, else RAM."""
        off = self._hv_offset(gfn)
        if off is not None:
            return self.hv.frames[off : off + PAGE_SIZE]
        return self.memory.page(gfn)

    def read_phys(self, gpa: int, length: int) -> bytes:
        off = gpa % PAGE_SIZE
        if 0 < length <= PAGE_SIZE - off:  # within one page: every hypercall argument
            return self.page(gpa // PAGE_SIZE)[off:off + length].tobytes()
        out = bytearray()
        while length > 0:
            off = gpa % PAGE_SIZE
            n = min(length, PAGE_SIZE - off)
            out += self.page(gpa // PAGE_SIZE)[off : off + n]
            gpa += n
            length -= n
        return bytes(out)

    def write_phys(self, gpa: int, data: bytes) -> None:
        off = gpa % PAGE_SIZE
        if 0 < len(data) <= PAGE_SIZE - off:
            self.page(gpa // PAGE_SIZE)[off:off + len(data)] = data
            return
        pos = 0
        while pos < len(data):
            off = gpa % PAGE_SIZE
            n = min(len(data) - pos, PAGE_SIZE - off)
            self.page(gpa // PAGE_SIZE)[off : off + n] = data[pos : pos + n]
            gpa += n
            pos += n
