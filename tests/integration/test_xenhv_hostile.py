"""Hostile vCPUs and toolstack requests against the real xenhv process: each bad request gets Xen's
error or its connection dropped; xenhv and the other domains carry on. No QEMU is needed: a domain's
RAM is any file, here a sparse one."""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Iterator

import pytest

from xenpv.backends.xenhv.control import XenhvError
from xenpv.xenabi.trap import REPLY, TRAP, TrapKind
from xenpv.stack.vcpu.hypervisor import HypervisorLink
from xenpv.xenabi import event_channel as E
from xenpv.xenabi import xen as X

pytestmark = pytest.mark.integration

RAM = 16 << 20


@pytest.fixture
def domain(host, tmp_path: Path) -> Iterator[tuple[int, str, Path]]:
    ram = tmp_path / "ram"
    ram.write_bytes(b"")
    os.truncate(ram, RAM)
    domid = host.allocate_domid()
    ctl = host.xenhv_control()
    info = ctl.call("create_domain", domid=domid, name=f"hostile{domid}", ram_path=str(ram), ram_size=RAM)
    ctl.call("unpause", domid=domid)  # a paused domain's vCPU gets no answer to its HELLO
    yield domid, info["trap_socket"], ram
    ctl.call("destroy_domain", domid=domid)
    ctl.close()
    host.check_alive("after the hostile test")


def raw(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(path)
    return s


def closed_by_peer(s: socket.socket) -> bool:
    try:
        return s.recv(64) == b""
    except ConnectionResetError:
        return True


@pytest.mark.parametrize("payload", [
    b"\x01\x02\x03",  # a short trap
    TRAP.pack(TrapKind.HYPERCALL, 0, 0, 0, 0, 0, 0, 0),  # before HELLO
], ids=["short trap", "trap before HELLO"])
def test_malformed_traps_drop_the_connection(domain, host, payload: bytes) -> None:
    domid, path, _ = domain
    s = raw(path)
    s.sendall(payload)
    if len(payload) < TRAP.size:
        s.shutdown(socket.SHUT_WR)
    assert closed_by_peer(s)
    s.close()
    link = HypervisorLink(path, domid)  # the domain is still served
    assert link.hypercall(X.HYPERCALL_NUMBERS["sched_op"], X.SCHEDOP_yield, 0) == 0
    link.close()


def test_hello_for_another_domain_is_refused(domain) -> None:
    domid, path, _ = domain
    s = raw(path)
    fd = os.eventfd(0)
    socket.send_fds(s, [TRAP.pack(TrapKind.HELLO, 0, domid + 1, 0, 0, 0, 0, 0)], [fd])
    os.close(fd)
    assert closed_by_peer(s)
    s.close()


def test_fds_on_a_hypercall_are_closed_not_kept(domain) -> None:
    domid, path, _ = domain
    link = HypervisorLink(path, domid)
    r, w = os.pipe()
    socket.send_fds(link.sock, [TRAP.pack(TrapKind.HYPERCALL, 0, X.HYPERCALL_NUMBERS["sched_op"],
                                          X.SCHEDOP_yield, 0, 0, 0, 0)], [w])
    os.close(w)
    result, *_ = REPLY.unpack(link.sock.recv(REPLY.size))
    assert result == 0
    assert os.read(r, 1) == b""  # xenhv closed its copy: the pipe has no writer left
    os.close(r)
    link.close()


@pytest.mark.parametrize("args,errno", [
    ((X.XENMEM_add_to_physmap, RAM + 4096), X.XEN_EFAULT),  # argument beyond RAM
    ((X.XENMEM_add_to_physmap, (1 << 52) - 8), X.XEN_EFAULT),
    ((0x7777, 0), X.XEN_ENOSYS),  # unknown memory_op
], ids=["pointer past RAM", "pointer past the address space", "unknown memory_op"])
def test_bad_memory_op_arguments(domain, args, errno) -> None:
    domid, path, _ = domain
    link = HypervisorLink(path, domid)
    assert link.hypercall(X.HYPERCALL_NUMBERS["memory_op"], *args) == -errno
    link.close()


def test_bad_ports_and_domains(domain) -> None:
    domid, path, _ = domain
    link = HypervisorLink(path, domid)
    nr = X.HYPERCALL_NUMBERS["event_channel_op"]

    def op(cmd: int, st) -> int:
        os.pwrite(ram_fd, bytes(st), 0x1000)
        return link.hypercall(nr, cmd, 0x1000)

    # Op structs go straight into the RAM file (guest-physical == file offset).
    ram_fd = os.open(domain[2], os.O_RDWR)
    try:
        assert op(E.EVTCHNOP_send, E.EvtchnSend(port=0)) == -X.XEN_EINVAL
        assert op(E.EVTCHNOP_close, E.EvtchnClose(port=1 << 31)) == -X.XEN_EINVAL
        assert op(E.EVTCHNOP_unmask, E.EvtchnUnmask(port=5000)) == -X.XEN_EINVAL
        assert op(E.EVTCHNOP_bind_interdomain, E.EvtchnBindInterdomain(remote_dom=0x7FF4, remote_port=1)) == -X.XEN_ESRCH
        assert op(E.EVTCHNOP_alloc_unbound, E.EvtchnAllocUnbound(dom=0, remote_dom=0)) == -X.XEN_EPERM
        assert op(99, E.EvtchnSend(port=1)) == -X.XEN_ENOSYS
    finally:
        os.close(ram_fd)
        link.close()


def test_toolstack_requests_are_checked(host) -> None:
    ctl = host.xenhv_control()
    try:
        for args, fragment in [
            ({"domid": 0, "name": "x", "ram_path": "/dev/null", "ram_size": 4096}, "not in 1.."),
            ({"domid": 9, "name": "x", "ram_path": "/nonexistent", "ram_size": 4096}, "No such file"),
            ({"domid": 9, "name": "x", "ram_path": "/dev/null", "ram_size": 100}, "multiple of 4096"),
        ]:
            with pytest.raises(XenhvError, match=fragment):
                ctl.call("create_domain", **args)
        with pytest.raises(XenhvError, match="unknown control op"):
            ctl.call("frobnicate")
        with pytest.raises(XenhvError, match="no domain"):
            ctl.call("destroy_domain", domid=4242)
        ctl.sock.sendall(b"not json\n")
        assert b"error" in ctl._file.readline()
        assert ctl.call("list_domains") is not None
    finally:
        ctl.close()


def test_a_paused_domains_vcpu_waits_for_unpause(host, tmp_path: Path) -> None:
    import threading

    ram = tmp_path / "ram"
    ram.write_bytes(b"")
    os.truncate(ram, RAM)
    domid = host.allocate_domid()
    ctl = host.xenhv_control()
    info = ctl.call("create_domain", domid=domid, name=f"paused{domid}", ram_path=str(ram), ram_size=RAM)
    try:
        got: list[HypervisorLink] = []
        t = threading.Thread(target=lambda: got.append(HypervisorLink(info["trap_socket"], domid)))
        t.start()
        t.join(0.3)
        assert t.is_alive() and not got  # HELLO unanswered while the domain is paused
        ctl.call("unpause", domid=domid)
        t.join(5)
        assert got and got[0].hypercall(X.HYPERCALL_NUMBERS["sched_op"], X.SCHEDOP_yield, 0) == 0
        got[0].close()
    finally:
        ctl.call("destroy_domain", domid=domid)
        ctl.close()
