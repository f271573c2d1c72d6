"""The hypervisor model: every domain of one host, and the operations on them.

Control operations (`control_*`) come from the toolstack over the control socket and are privileged;
traps come from a domain's vCPU and are not. Each domain is tied to its QEMU machine's RAM file and,
for the platform unplug model, to that machine's device-model QMP socket.
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

from xenpv.backends.xenhv.backlinks import BackendLink
from xenpv.backends.xenhv.control import FdReply
from xenpv.backends.xenhv.domain import Domain, DomainConfig, RunState
from xenpv.backends.xenhv.errors import GrantError, XenError
from xenpv.backends.xenhv.evtchn import EventChannelHub, EventChannels, PortState
from xenpv.backends.xenhv.gnttab import GrantTable, GrantTableHub
from xenpv.backends.xenhv.hypercall import Hypercalls, read_struct, write_struct
from xenpv.base.qmp import QmpSession
from xenpv.xenabi import event_channel as E
from xenpv.xenabi import grant_table as G
from xenpv.xenabi import xen as X
from xenpv.xenabi.trap import DOORBELL_PORTS, SHARED_INFO_FRAME
from xenpv.xenabi.unplug import XEN_PLATFORM_VENDOR_ID

log = logging.getLogger("xenhv")

MAX_DOMID = 0x7FEF  # DOMID_FIRST_RESERVED - 1
# SCHEDOP_shutdown(SHUTDOWN_suspend) returns 1 when the suspend was cancelled and the domain resumed in
# place (xc_domain_resume's modify_returncode); a domain restored elsewhere sees the 0 it was saved with.
SUSPEND_CANCELLED = 1
MAX_GNTTAB_BATCH = 4096
INVALID_GFN = (1 << 64) - 1
UNMODELLED_EVTCHNOPS = frozenset({E.EVTCHNOP_bind_pirq, E.EVTCHNOP_bind_vcpu, E.EVTCHNOP_reset,
                                  E.EVTCHNOP_set_priority})


def _transfer_flagged(frames: bytes, grant_frames: int) -> list[int]:
    """The grant references whose saved entry has GTF_reading or GTF_writing set (frames: shared_info then
    the grant frames, as the domain's hypervisor-frame memfd holds them)."""
    start = (SHARED_INFO_FRAME + 1) * 4096
    table = frames[start:start + grant_frames * 4096]
    entries = (G.GrantEntryV1 * (len(table) // ctypes.sizeof(G.GrantEntryV1))).from_buffer_copy(table)
    return [ref for ref, e in enumerate(entries) if e.flags & (G.GTF_reading | G.GTF_writing)]


class Hypervisor:
    def __init__(self) -> None:
        self.domains: dict[int, Domain] = {}
        self._dm: dict[int, QmpSession] = {}
        self.hypercalls = Hypercalls(self)
        self.evtchn = EventChannelHub()
        # dom0's ports are delivered out of band, to the back-ends' eventfds.
        self.dom0 = self.evtchn.create(0, privileged=True)
        self.gnttab = GrantTableHub(privileged=(0,))
        self.on_domain_created: Callable[[int], str] | None = None
        self.on_domain_destroyed: Callable[[int], None] | None = None
        self.on_shutdown: Callable[[Domain, int], None] | None = None
        self.on_unpause: Callable[[int], None] | None = None
        # The server answers a vCPU parked in SCHEDOP_shutdown(SHUTDOWN_suspend) with this value.
        self.on_resume: Callable[[int, int], None] | None = None
        # The server's selector, for the call eventfds of back-end channels.
        self.register_fd: Callable[[int, Callable[[], None]], None] = lambda fd, fn: None
        self.unregister_fd: Callable[[int], None] = lambda fd: None
        self.links: dict[tuple[str, int], BackendLink] = {}

    def domain(self, domid: int) -> Domain:
        if not isinstance(domid, int) or (dom := self.domains.get(domid)) is None:
            raise XenError(X.XEN_ESRCH, f"no domain {domid!r}")
        return dom

    # -- life cycle ----------------------------------------------------------------------------

    def control_create_domain(self, domid: int, name: str, ram_path: str, ram_size: int,
                              dm_qmp: str | None = None, max_grant_frames: int | None = None) -> dict[str, Any]:
        if not isinstance(domid, int) or not 1 <= domid <= MAX_DOMID:
            raise XenError(X.XEN_EINVAL, f"domid {domid!r} is not in 1..{MAX_DOMID:#x}")
        if domid in self.domains:
            raise XenError(X.XEN_EEXIST, f"domain {domid} exists")
        if not isinstance(ram_size, int) or ram_size <= 0 or ram_size % 4096:
            raise XenError(X.XEN_EINVAL, f"ram_size {ram_size!r} is not a positive multiple of 4096")
        config = DomainConfig(domid, name, Path(ram_path), ram_size)
        if max_grant_frames is not None:
            config.max_grant_frames = max_grant_frames
        dm = None
        if dm_qmp:
            dm = QmpSession(f"dm{domid}")
            try:
                dm.connect(dm_qmp)
            except Exception:
                dm.close()
                raise
            self._dm[domid] = dm
        try:
            dom = Domain.create(config, dm)
        except Exception:
            if dm is not None:
                self._dm.pop(domid).close()
            raise
        dom.platform.present = dm is not None and any(
            d["id"]["vendor"] == XEN_PLATFORM_VENDOR_ID for bus in dm.command("query-pci") for d in bus["devices"])
        self.domains[domid] = dom
        self.setup_domain(dom)
        sock = self.on_domain_created(domid) if self.on_domain_created else ""
        log.info("dom%d (%s) created: %d MiB from %s", domid, name, ram_size >> 20, ram_path)
        return {"domid": domid, "trap_socket": sock}

    def setup_domain(self, dom: Domain) -> None:
        """Per-domain state of the event channel and grant table models."""
        self.evtchn.create(dom.domid, upcall=dom.upcall, shared_info=dom.memory.hv_frame(SHARED_INFO_FRAME),
                           max_ports=dom.config.max_evtchn_ports + 1)

        def guest_frame(gfn: int) -> memoryview | None:
            try:
                return dom.memory.page(gfn)
            except XenError:
                return None

        table = GrantTable(dom.domid, lambda i: dom.memory.hv_frame(dom.grant_frame_index(i)), guest_frame,
                           max_frames=dom.config.max_grant_frames, ram_pages=dom.memory.ram_pages)
        self.gnttab.add(table)
        dom.memory.on_overlay_changed = table.publish_overlay

    def control_destroy_domain(self, domid: int) -> None:
        dom = self.domain(domid)
        self.teardown_domain(dom)
        del self.domains[domid]
        if self.on_domain_destroyed:
            self.on_domain_destroyed(domid)
        dom.close()
        if (dm := self._dm.pop(domid, None)) is not None:
            dm.close()
        log.info("dom%d destroyed", domid)

    def teardown_domain(self, dom: Domain) -> None:
        """Close the domain's event channels (remote ends revert) and release its grant table."""
        for key in [k for k in self.links if k[1] == dom.domid]:
            self._detach(self.links.pop(key))
        self.gnttab.remove(dom.domid)
        self.evtchn.destroy(dom.domid)

    def destroy_all(self) -> None:
        for domid in list(self.domains):
            self.control_destroy_domain(domid)

    # -- save and restore (the hooks the hibernation and migration work builds on) ---------------

    def control_save_domain(self, domid: int, path: str) -> None:
        """What Xen keeps for a domain outside its RAM (which QEMU's RAM file already holds): HVM params,
        where the guest placed its hypervisor frames, and their contents (shared_info, grant frames).
        Event channels are not saved: as on Xen, a resumed guest rebinds them."""
        dom = self.domain(domid)
        if dom.state is RunState.RUNNING:
            raise XenError(X.XEN_EBUSY, f"dom{domid} must be paused or shut down (suspended) to be saved")
        state = {"domid": domid, "params": {str(k): v for k, v in dom.params.items()},
                 "hv_frames": {str(i): g for i, g in dom.memory.hv_mappings().items()},
                 "grant_frames": self.grant_table(dom).nr_frames,
                 "frames": bytes(dom.memory.frames).hex()}
        tmp = Path(f"{path}.tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(path)

    def control_restore_domain(self, domid: int, path: str) -> None:
        """Load a saved state into a freshly created domain (same RAM size and grant-frame limit)."""
        dom = self.domain(domid)
        try:
            state = json.loads(Path(path).read_text())
            frames = bytes.fromhex(state["frames"])
        except (OSError, ValueError, KeyError) as exc:
            raise XenError(X.XEN_EINVAL, f"{path} is not a saved domain: {exc}") from None
        if len(frames) != len(dom.memory.frames):
            raise XenError(X.XEN_EINVAL, f"saved frames are {len(frames)} bytes, dom{domid} has {len(dom.memory.frames)}")
        if self.channels(dom).open_ports():
            raise XenError(X.XEN_EBUSY, f"dom{domid} already has event channels: restore into a new domain")
        self.grant_table(dom).grow(int(state["grant_frames"]))
        dom.memory.frames[:] = frames
        # GTF_reading/GTF_writing described mappings of the source's back-ends, which died with it: no
        # back-end of this domain maps anything yet, and a stale bit would make the guest's revoke of that
        # entry fail for ever (gnttab.c's end-of-access check).
        cleared = self.grant_table(dom).clear_transfer_flags(_transfer_flagged(frames, int(state["grant_frames"])))
        if cleared:
            log.info("dom%d restored: GTF_reading/GTF_writing cleared on %d entries", domid, cleared)
        for index, gfn in state["hv_frames"].items():
            dom.memory.map_hv_frame(int(index), int(gfn))
        dom.params = {int(k): int(v) for k, v in state["params"].items()}
        log.info("dom%d restored: %d hypervisor frames placed", domid, len(state["hv_frames"]))

    def control_pause(self, domid: int) -> None:
        self.domain(domid).state = RunState.PAUSED

    def control_resume_domain(self, domid: int) -> None:
        """xc_domain_resume(fast=1), the checkpoint and the cancelled suspend: the domain that shut down
        with SHUTDOWN_suspend runs on where it stopped, and its SCHEDOP_shutdown returns 1 (the guest's
        SchedShutdown turns that into STATUS_CANCELLED, so no resume callback runs)."""
        dom = self.domain(domid)
        if dom.state is not RunState.SHUTDOWN or dom.shutdown_reason != X.SHUTDOWN_suspend:
            raise XenError(X.XEN_EINVAL, f"dom{domid} is not suspended (state {dom.state.value}, "
                                         f"reason {dom.shutdown_reason})")
        dom.state = RunState.RUNNING
        dom.shutdown_reason = None
        log.info("dom%d resumed in place (suspend cancelled)", domid)
        if self.on_resume is not None:
            self.on_resume(domid, SUSPEND_CANCELLED)

    def control_unpause(self, domid: int) -> None:
        dom = self.domain(domid)
        if dom.state is RunState.SHUTDOWN:
            raise XenError(X.XEN_EINVAL, f"dom{domid} has shut down")
        dom.state = RunState.RUNNING
        if self.on_unpause:
            self.on_unpause(domid)

    def control_list_domains(self) -> list[dict[str, Any]]:
        return [{"domid": d.domid, "name": d.config.name, "state": d.state.value,
                 "shutdown_reason": d.shutdown_reason, "vcpu_parked": d.vcpu_parked}
                for d in self.domains.values()]

    def control_set_param(self, domid: int, index: int, value: int) -> None:
        self.domain(domid).params[index] = value

    def control_get_param(self, domid: int, index: int) -> int:
        return self.domain(domid).params.get(index, 0)

    def control_platform(self, domid: int) -> dict[str, Any]:
        p = self.domain(domid).platform
        return {"unplugged_mask": p.unplugged_mask, "product": p.product, "build": p.build,
                "log": p.log_lines, "nics": p.record.nics, "disks": p.record.disks, "kept": p.record.kept}

    def attach_vcpu(self, dom: Domain, upcall_fd: int) -> None:
        if dom.upcall_fd is not None:
            os.close(dom.upcall_fd)
        dom.upcall_fd = upcall_fd

    def shutdown(self, dom: Domain, reason: int) -> None:
        dom.state = RunState.SHUTDOWN
        dom.shutdown_reason = reason
        # A suspending vCPU does not come back from the hypercall until the domain is resumed (checkpoint,
        # cancel) or its saved state runs in another domain: the server keeps its trap unanswered.
        dom.vcpu_parked = reason == X.SHUTDOWN_suspend
        log.info("dom%d shut down, reason %d", dom.domid, reason)
        if self.on_shutdown:
            self.on_shutdown(dom, reason)

    # -- dom0: what back-ends and the toolstack ask for (their hypercalls) -------------------------

    def control_attach_backend(self, domid: int, name: str, socket: str) -> None:
        dom = self.domain(domid)
        old = self.links.get((name, domid))
        if old is not None:
            if not old.peer_gone():
                raise XenError(X.XEN_EEXIST, f"back-end {name} is already attached to dom{domid}")
            # A restarted back-end: its predecessor's channels go (the guest's ends revert to UNBOUND,
            # as when a dom0 back-end dies), then the new one attaches.
            log.info("back-end %s of dom%d was gone; replacing its link", name, domid)
            self._detach(self.links.pop((name, domid)))
        self.links[(name, domid)] = BackendLink.connect(name, socket, dom, self.dom0, self.register_fd,
                                                        self.unregister_fd, self._link_gone)

    def _link_gone(self, link: BackendLink) -> None:
        """The back-end closed its vhost-user link (it died): detach it now, not at its next attach."""
        key = (link.name, link.domain.domid)
        if self.links.get(key) is link:
            self._detach(self.links.pop(key))

    def control_detach_backend(self, domid: int, name: str) -> None:
        link = self.links.pop((name, domid), None)
        if link is None:
            raise XenError(X.XEN_ENOENT, f"back-end {name} is not attached to dom{domid}")
        self._detach(link)

    def _detach(self, link: BackendLink) -> None:
        """The back-end's channels go with it: dom0's ends are closed, so the guest's revert to UNBOUND; and
        so do the grant mappings it held of the domain, so the guest can revoke them."""
        for port in list(link.channels):
            link.unbind(port)
            self.dom0.close(port)
        link.close()
        if (table := self.gnttab.get(link.domain.domid)) is not None:
            self.gnttab.release_owner(0, link.domain.domid, link.name)
            table.unshare(link.name)

    def control_evtchn_alloc_unbound(self, dom: int, remote_dom: int) -> int:
        return self.dom0.alloc_unbound(dom, remote_dom)

    def control_evtchn_bind_interdomain(self, remote_dom: int, remote_port: int,
                                        backend: str | None = None) -> dict[str, int | None]:
        link = None
        if backend is not None:
            link = self.links.get((backend, remote_dom))
            if link is None:
                raise XenError(X.XEN_ENOENT, f"back-end {backend} is not attached to dom{remote_dom}")
        port = self.dom0.bind_interdomain(remote_dom, remote_port)
        try:
            index = link.bind(port, remote_port) if link is not None else None
        except BaseException:
            self.dom0.close(port)
            raise
        return {"port": port, "index": index}

    def control_evtchn_send(self, port: int) -> None:
        self.dom0.send(port)

    def control_evtchn_close(self, port: int) -> None:
        self._dom0_close(port)

    def _dom0_close(self, port: int) -> None:
        for link in self.links.values():
            if port in link.channels:
                link.unbind(port)
        self.dom0.close(port)

    def control_evtchn_status(self, dom: int, port: int) -> dict[str, Any]:
        st = self.dom0.status(dom, port)
        return {"state": st.state.name, "vcpu": st.vcpu, "remote_dom": st.remote_dom,
                "remote_port": st.remote_port, "virq": st.virq}

    def control_evtchn_is_pending(self, domid: int, port: int) -> bool:
        return self.channels(self.domain(domid)).is_pending(port)

    def doorbell(self, dom: Domain, port: int) -> tuple[int, int, int, list[int]]:
        """DOORBELL (xenabi/trap.py): (result, the port's generation, its vcpu, [kick, call] dups for the
        reply) when `port` is bound to a dom0 back-end's channel; -ENOENT if it is not, -EINVAL if it
        is not a port."""
        if not 0 <= port < min(DOORBELL_PORTS, self.channels(dom).max_ports):
            return -X.XEN_EINVAL, 0, 0, []
        generation = dom.doorbells.generation(port)
        st = self.channels(dom).status(E.DOMID_SELF, port)
        if st.state is PortState.INTERDOMAIN and st.remote_dom == 0 and st.remote_port is not None:
            for link in self.links.values():
                ch = link.channels.get(st.remote_port) if link.domain is dom else None
                if ch is not None:
                    link.hand_over(ch, port)
                    kick = os.dup(ch.kick)
                    try:
                        call = os.dup(ch.call)
                    except BaseException:
                        os.close(kick)
                        raise
                    log.debug("dom%d: doorbell of port %d handed over (%s channel %d)", dom.domid, port,
                              link.name, ch.index)
                    return 0, generation, st.vcpu, [kick, call]
        return -X.XEN_ENOENT, generation, 0, []

    # -- port I/O the vCPU routes here -----------------------------------------------------------

    def pio_read(self, dom: Domain, port: int, size: int) -> tuple[int, int]:
        if size not in (1, 2, 4) or not dom.platform.claims(port):
            return -X.XEN_EINVAL, 0
        return 0, dom.platform.read(port, size)

    def pio_write(self, dom: Domain, port: int, size: int, value: int) -> int:
        if size not in (1, 2, 4) or not dom.platform.claims(port) or value >> (8 * size):
            return -X.XEN_EINVAL
        dom.platform.write(port, size, value)
        return 0

    # -- event channels and grant tables -------------------------------------------------------

    def channels(self, dom: Domain) -> EventChannels:
        ch = self.evtchn.get(dom.domid)
        assert ch is not None, f"dom{dom.domid} has no event channels"
        return ch

    def event_channel_op(self, dom: Domain, cmd: int, arg: int) -> int:
        layout = E.EVTCHNOP_ARGUMENTS.get(cmd)
        if layout is None or cmd in UNMODELLED_EVTCHNOPS:
            raise XenError(X.XEN_ENOSYS, f"event_channel_op {cmd} is not modelled")
        op = read_struct(dom, layout, arg)
        ch = self.channels(dom)
        if cmd == E.EVTCHNOP_alloc_unbound:
            op.port = ch.alloc_unbound(op.dom, op.remote_dom)
        elif cmd == E.EVTCHNOP_bind_interdomain:
            op.local_port = ch.bind_interdomain(op.remote_dom, op.remote_port)
        elif cmd == E.EVTCHNOP_bind_virq:
            op.port = ch.bind_virq(op.virq, op.vcpu)
        elif cmd == E.EVTCHNOP_bind_ipi:
            op.port = ch.bind_ipi(op.vcpu)
        elif cmd == E.EVTCHNOP_send:
            ch.send(op.port)
            return 0
        elif cmd == E.EVTCHNOP_close:
            ch.close(op.port)
            dom.doorbells.revoke(op.port)
            for link in self.links.values():
                if link.domain is dom:
                    link.take_back(op.port)
            return 0
        elif cmd == E.EVTCHNOP_unmask:
            ch.unmask(op.port)
            return 0
        elif cmd == E.EVTCHNOP_status:
            ch.status(op.dom, op.port).fill(op)
        write_struct(dom, arg, op)
        return 0

    def grant_table(self, dom: Domain) -> GrantTable:
        table = self.gnttab.get(dom.domid)
        assert table is not None, f"dom{dom.domid} has no grant table"
        return table

    def grant_table_op(self, dom: Domain, cmd: int, arg: int, count: int) -> int:
        """GNTTABOP_* on `count` op structs at `arg`. Per-op failures are GNTST_* in each op's status
        field; the hypercall itself fails only for a bad command, count or pointer, as in Xen."""
        layout = G.GNTTABOP_ARGUMENTS.get(cmd)
        if layout is None or cmd not in (G.GNTTABOP_setup_table, G.GNTTABOP_query_size, G.GNTTABOP_copy):
            raise XenError(X.XEN_ENOSYS, f"grant_table_op {cmd} is not modelled (HVM guests map no grants here)")
        if not 0 <= count <= MAX_GNTTAB_BATCH:
            raise XenError(X.XEN_EINVAL, f"grant_table_op count {count} exceeds {MAX_GNTTAB_BATCH}")
        size = ctypes.sizeof(layout)
        for i in range(count):
            op = read_struct(dom, layout, arg + i * size)
            try:
                if cmd == G.GNTTABOP_setup_table:
                    self._setup_table(dom, op)
                elif cmd == G.GNTTABOP_query_size:
                    op.nr_frames, op.max_nr_frames = self.gnttab.query_size(dom.domid, self._dom(dom, op.dom))
                else:
                    self.gnttab.copy(dom.domid, op)
                op.status = G.GNTST_okay
            except GrantError as exc:
                log.info("dom%d: grant_table_op %d: %s", dom.domid, cmd, exc)
                op.status = exc.status
            write_struct(dom, arg + i * size, op)
        return 0

    @staticmethod
    def _dom(dom: Domain, domid: int) -> int:
        return dom.domid if domid == E.DOMID_SELF else domid

    def _setup_table(self, dom: Domain, op: Any) -> None:
        target = self._dom(dom, op.dom)
        self.gnttab.setup_table(dom.domid, target, op.nr_frames)
        # A translated guest gets the frames where it mapped them (XENMEM_add_to_physmap), or INVALID_GFN.
        owner = self.domain(target) if target in self.domains else dom
        for i in range(op.nr_frames):
            gfn = owner.memory.gfn_of(owner.grant_frame_index(i))
            try:
                write_struct(dom, op.frame_list + 8 * i, ctypes.c_uint64(INVALID_GFN if gfn is None else gfn))
            except XenError as exc:
                # Xen's gnttab_setup_table: a frame list it cannot copy to is the op's status, not the
                # hypercall's return (the table has grown all the same).
                raise GrantError(G.GNTST_bad_virt_addr, f"frame_list[{i}] at {op.frame_list + 8 * i:#x}: {exc}") from exc

    # -- grants for dom0's back-ends ---------------------------------------------------------------

    def control_gnttab_map(self, domid: int, ref: int, readonly: bool, backend: str | None = None) -> dict[str, int]:
        """A back-end's mapping (`backend` names it) lasts at most as long as its link to the domain."""
        self.domain(domid)
        if backend is not None and (backend, domid) not in self.links:
            raise XenError(X.XEN_ENOENT, f"back-end {backend} is not attached to dom{domid}")
        m = self.gnttab.map(0, domid, ref, bool(readonly), owner=backend)
        return {"handle": m.handle, "gfn": m.gfn}

    def control_gnttab_unmap(self, handle: int, backend: str | None = None) -> None:
        self.gnttab.unmap(0, handle, owner=backend)

    def control_gnttab_share(self, domid: int, backend: str) -> FdReply:
        """Let attached back-end `backend` pin and copy dom`domid`'s grants itself (xenabi.grant_pins): the
        reply carries the domain's hypervisor-frames memfd (its grant frames) and its pin table memfd."""
        dom = self.domain(domid)
        if (backend, domid) not in self.links:
            raise XenError(X.XEN_ENOENT, f"back-end {backend} is not attached to dom{domid}")
        party, generation = self.grant_table(dom).share(backend)
        return FdReply({"party": party, "generation": generation, "hv_frames": dom.memory.hv_frames,
                        "grant_frame_base": dom.grant_frame_index(0),
                        "max_grant_frames": dom.config.max_grant_frames},
                       [dom.memory.frames_fd, self.grant_table(dom).pins_fd])
