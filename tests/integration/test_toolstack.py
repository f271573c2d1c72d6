"""The toolstack against the real host services: the xenstore tree it builds (read back with Debian's
xenstore-ls and with the client), the domain watches, xenhv's view, and a destroy that leaves nothing."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from xenpv.backends import serving
from xenpv.backends.toolstack import Toolstack, ToolstackError
from xenpv.backends.toolstack import domain as toolstack_domain
from xenpv.backends.toolstack.layout import vm_uuid
from xenpv.backends.xenhv.control import XenhvError
from xenpv.backends.xenstored.client import XsClient
from xenpv.guests.schema import GUESTS_DIR, PvDisk, load_guest
from xenpv.backends.host import HostServices
from xenpv.xenabi.hvm import HVM_PARAM_STORE_EVTCHN, HVM_PARAM_STORE_PFN
from xenpv.xenabi.xs_wire import XenstoreDomainInterface
from xenpv.xenabi.xs_wire import XsdSockmsgType as T

pytestmark = pytest.mark.integration

Tree = dict[str, tuple[str, str]]  # path -> (value, perms as xenstore-ls prints them)


@pytest.fixture
def toolstack(host: HostServices) -> Iterator[Toolstack]:
    ts = Toolstack(host)
    yield ts
    ts.close()


@pytest.fixture
def xs(host: HostServices) -> Iterator[XsClient]:
    with XsClient(host.xenstored_socket) as c:
        yield c


@pytest.fixture
def backends_serving(xs: XsClient) -> Iterator[None]:
    """This test process stands in for blkback and netback: the toolstack adds a backend directory only for
    a device kind a live back-end announced (backends.serving)."""
    nodes = [serving.announce(xs, kind) for kind in ("vbd", "vif")]
    yield
    for node in nodes:
        serving.withdraw(xs, node)


def client_tree(xs: XsClient, path: str = "/") -> Tree:
    out: Tree = {}
    for child in xs.directory(path):
        p = f"{path.rstrip('/')}/{child}"
        out[p] = (xs.read(p).decode(), ",".join(xs.get_perms(p)))
        out.update(client_tree(xs, p))
    return out


_LS_LINE = re.compile(r'^(/\S*) = "(.*)"[ .]*\(([^)]*)\)$')


def xenstore_ls(host: HostServices) -> Tree:
    """`xenstore-ls -f -p /` (full paths, so the parse does not depend on indentation)."""
    assert shutil.which("xenstore-ls"), "xenstore-utils is not installed (ci/bootstrap.sh installs it)"
    res = subprocess.run(["xenstore-ls", "-f", "-p", "/"], capture_output=True, text=True, timeout=10,
                         env={**os.environ, "XENSTORED_PATH": str(host.xenstored_socket)})
    assert res.returncode == 0, res.stderr
    out: Tree = {}
    for line in res.stdout.splitlines():
        m = _LS_LINE.match(line)
        assert m, f"unexpected xenstore-ls line {line!r}"
        out[m.group(1)] = (m.group(2), m.group(3))
    return out


def is_introduced(xs: XsClient, domid: int) -> bool:
    return xs.request(T.IS_DOMAIN_INTRODUCED, b"%d\0" % domid) == b"T\0"


def domain_part(tree: Tree, domid: int, vm: str) -> Tree:
    """The nodes that belong to one domain: its directory, its /vm directory and its backend directories."""
    be = re.compile(rf"^/local/domain/0/backend/[a-z]+/{domid}/")
    return {p: v for p, v in tree.items()
            if p == f"/local/domain/{domid}" or p.startswith(f"/local/domain/{domid}/")
            or p == vm or p.startswith(vm + "/") or be.match(p)}


def expected_default(domid: int, vm: str, uuid: str, image: str, port: int, gfn: int) -> Tree:
    d, ro, rw = f"/local/domain/{domid}", f"n0,r{domid}", f"n{domid}"
    fe, bep = f"n{domid},b0", f"n0,r{domid}"
    vbd, vif = f"/local/domain/0/backend/vbd/{domid}/768", f"/local/domain/0/backend/vif/{domid}/0"
    tree: Tree = {
        d: ("", ro), f"{d}/vm": (vm, ro), f"{d}/name": ("default", ro),
        f"{d}/cpu": ("", ro), f"{d}/cpu/0": ("", ro), f"{d}/cpu/0/availability": ("online", ro),
        f"{d}/memory": ("", ro), f"{d}/memory/static-max": ("131072", ro), f"{d}/memory/target": ("131072", ro),
        f"{d}/device": ("", ro), f"{d}/device/suspend": ("", ro), f"{d}/device/suspend/event-channel": ("", rw),
        f"{d}/device/vbd": ("", ro), f"{d}/device/vbd/768": ("", fe),
        f"{d}/device/vbd/768/backend": (vbd, fe), f"{d}/device/vbd/768/backend-id": ("0", fe),
        f"{d}/device/vbd/768/state": ("1", fe), f"{d}/device/vbd/768/virtual-device": ("768", fe),
        f"{d}/device/vbd/768/device-type": ("disk", fe),
        f"{d}/device/vif": ("", ro), f"{d}/device/vif/0": ("", fe),
        f"{d}/device/vif/0/backend": (vif, fe), f"{d}/device/vif/0/backend-id": ("0", fe),
        f"{d}/device/vif/0/state": ("1", fe), f"{d}/device/vif/0/handle": ("0", fe),
        f"{d}/device/vif/0/mac": ("00:16:3e:00:00:01", fe), f"{d}/device/vif/0/mtu": ("1500", fe),
        f"{d}/control": ("", ro), f"{d}/hvmloader": ("", ro),
        f"{d}/control/platform-feature-multiprocessor-suspend": ("1", ro),
        f"{d}/control/platform-feature-xs_reset_watches": ("1", ro),
        f"{d}/domid": (str(domid), ro), f"{d}/store": ("", ro),
        f"{d}/store/port": (str(port), ro), f"{d}/store/ring-ref": (str(gfn), ro),
        vm: ("", ro), f"{vm}/uuid": (uuid, ro), f"{vm}/name": ("default", ro),
        vbd: ("", bep), vif: ("", bep),
    }
    for sub in ("shutdown", "feature-poweroff", "feature-reboot", "feature-suspend", "feature-s3", "feature-s4",
                "sysrq"):
        tree[f"{d}/control/{sub}"] = ("", rw)
    for sub in ("data", "drivers", "feature", "attr", "error"):
        tree[f"{d}/{sub}"] = ("", rw)
    for k, v in {"frontend": f"{d}/device/vbd/768", "frontend-id": str(domid), "online": "1", "removable": "0",
                 "bootable": "1", "state": "1", "dev": "hda", "type": "qdisk", "mode": "w", "device-type": "disk",
                 "params": f"raw:{image}", "hotplug-status": "connected"}.items():
        tree[f"{vbd}/{k}"] = (v, bep)
    for k, v in {"frontend": f"{d}/device/vif/0", "frontend-id": str(domid), "online": "1", "state": "1",
                 "mac": "00:16:3e:00:00:01", "handle": "0", "type": "vif", "mtu": "1500",
                 "hotplug-status": "connected"}.items():
        tree[f"{vif}/{k}"] = (v, bep)
    return tree


def xenhv_domids(host: HostServices) -> list[int]:
    ctl = host.xenhv_control()
    try:
        return [d["domid"] for d in ctl.call("list_domains")]
    finally:
        ctl.close()


def test_default_guest_tree_watches_and_teardown(host, guest_factory, toolstack, xs, backends_serving) -> None:
    m = guest_factory("default")
    gfn = (128 << 20) // 4096 - 1
    m.memory.write(gfn << 12, b"\xff" * 4096)  # what a previous boot may have left in the page
    before = client_tree(xs)
    xs.watch("@introduceDomain", "intro")
    xs.watch("@releaseDomain", "release")
    assert {xs.read_event(1), xs.read_event(1)} == {("@introduceDomain", "intro"), ("@releaseDomain", "release")}

    d = toolstack.create(m)
    try:
        assert xs.read_event(2) == ("@introduceDomain", "intro")
        ls = xenstore_ls(host)
        assert ls == client_tree(xs)  # the C client and ours read the same store
        uuid = vm_uuid(m.guest, d.domid)
        assert d.vm_path == f"/vm/{uuid}"
        assert d.store_gfn == gfn
        assert domain_part(ls, d.domid, d.vm_path) == expected_default(
            d.domid, d.vm_path, uuid, str(m.paths.run_dir / "hda.img"), d.store_evtchn, gfn)
        # Nothing else changed but the empty parents the new directories needed (those an earlier test of
        # the session's shared xenstored left behind were there already).
        assert {p for p in ls if p not in before and p not in domain_part(ls, d.domid, d.vm_path)} == {
            "/local", "/local/domain", "/local/domain/0", "/local/domain/0/backend",
            "/local/domain/0/backend/vbd", f"/local/domain/0/backend/vbd/{d.domid}",
            "/local/domain/0/backend/vif", f"/local/domain/0/backend/vif/{d.domid}", "/vm"} - set(before)

        assert xs.get_domain_path(d.domid) == f"/local/domain/{d.domid}"
        assert is_introduced(xs, d.domid)
        ctl = host.xenhv_control()
        try:
            dom = next(x for x in ctl.call("list_domains") if x["domid"] == d.domid)
            assert (dom["name"], dom["state"]) == ("default", "running")
            assert ctl.call("get_param", domid=d.domid, index=HVM_PARAM_STORE_PFN) == gfn
            assert ctl.call("get_param", domid=d.domid, index=HVM_PARAM_STORE_EVTCHN) == d.store_evtchn
            status = ctl.call("evtchn_status", dom=d.domid, port=d.store_evtchn)
            assert (status["state"], status["remote_dom"]) == ("INTERDOMAIN", 0)  # xenstored bound it on INTRODUCE
        finally:
            ctl.close()
        # The ring page starts zeroed; once introduced, xenstored has advertised its features in it.
        page = m.memory.read((gfn << 12), 4096)
        features = XenstoreDomainInterface.server_features.offset
        assert page[:features] == bytes(features) and page[features + 4:] == bytes(4096 - features - 4)
        assert int.from_bytes(page[features:features + 4], "little") != 0
    finally:
        toolstack.destroy(d.domid)

    assert xs.read_event(2) == ("@releaseDomain", "release")
    assert not is_introduced(xs, d.domid)
    assert client_tree(xs) == before
    assert d.domid not in xenhv_domids(host)


def test_two_disks_two_nics(host, guest_factory, toolstack, xs, backends_serving) -> None:
    m = guest_factory("two-disks-two-nics")
    before = client_tree(xs)
    d = toolstack.create(m)
    try:
        assert d.devices == [("vbd", 768), ("vbd", 832), ("vif", 0), ("vif", 1)]
        ls = xenstore_ls(host)
        fe, be = f"/local/domain/{d.domid}/device", "/local/domain/0/backend"
        for devid, name in ((768, "hda"), (832, "hdb")):
            assert ls[f"{fe}/vbd/{devid}"] == ("", f"n{d.domid},b0")
            assert ls[f"{fe}/vbd/{devid}/virtual-device"] == (str(devid), f"n{d.domid},b0")
            assert ls[f"{be}/vbd/{d.domid}/{devid}"] == ("", f"n0,r{d.domid}")
            assert ls[f"{be}/vbd/{d.domid}/{devid}/dev"][0] == name
            assert ls[f"{be}/vbd/{d.domid}/{devid}/params"][0] == f"raw:{m.paths.run_dir / (name + '.img')}"
        for i, mac in enumerate(("00:16:3e:00:01:01", "00:16:3e:00:01:02")):
            assert ls[f"{fe}/vif/{i}/mac"] == (mac, f"n{d.domid},b0")
            assert ls[f"{be}/vif/{d.domid}/{i}/mac"] == (mac, f"n0,r{d.domid}")
            assert ls[f"{be}/vif/{d.domid}/{i}/handle"][0] == str(i)
            assert ls[f"{fe}/vif/{i}/backend"][0] == f"{be}/vif/{d.domid}/{i}"
    finally:
        toolstack.destroy(d.domid)
    assert client_tree(xs) == before
    assert d.domid not in xenhv_domids(host)


def test_a_pv_only_qcow2_disk_gets_a_scratch_image(host, guest_factory, toolstack, xs, backends_serving) -> None:
    xvda = 202 << 8
    g = dataclasses.replace(load_guest(GUESTS_DIR / "default.yaml"), name="qcow2-pv",
                            pv_disks=(PvDisk(vdev=xvda, size=8 << 20, format="qcow2"),))
    m = guest_factory(g)
    d = toolstack.create(m)
    try:
        image = m.paths.run_dir / "pv-xvda.qcow2"
        be = f"/local/domain/0/backend/vbd/{d.domid}/{xvda}"
        assert (xs.read(f"{be}/params").decode(), xs.read(f"{be}/dev").decode()) == (f"qcow2:{image}", "xvda")
        info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(image)], check=True,
                                         capture_output=True, text=True).stdout)
        assert (info["format"], info["virtual-size"]) == ("qcow2", 8 << 20)
    finally:
        toolstack.destroy(d.domid)


def test_backends_are_told_before_their_directories_go(host, guest_factory, toolstack, xs, backends_serving) -> None:
    m = guest_factory("default")
    d = toolstack.create(m)
    be = f"/local/domain/0/backend/vbd/{d.domid}/768"
    try:
        xs.watch(be, "be")
        assert xs.read_event(1) == (be, "be")
    finally:
        toolstack.destroy(d.domid)
    seen: list[str] = []
    while be not in seen:
        seen.append(xs.read_event(1)[0])
    # online=0 and state=Closing (one transaction) reached the backend's watch before its directory went.
    assert set(seen[:-1]) == {f"{be}/online", f"{be}/state"}


def test_failed_create_names_the_step_and_leaves_nothing(host, guest_factory, toolstack, xs, monkeypatch) -> None:
    m = guest_factory("default")
    before = client_tree(xs)

    def refuse(ctl, domid: int, backend_domid: int) -> int:
        raise XenhvError("evtchn_alloc_unbound", "refused by the test", 28)

    monkeypatch.setattr(toolstack_domain, "alloc_store_evtchn", refuse)
    with pytest.raises(ToolstackError) as info:
        toolstack.create(m, domid=4000)
    assert (info.value.domid, info.value.step) == (4000, "allocating the store event channel")
    assert "refused by the test" in str(info.value)
    assert client_tree(xs) == before
    assert 4000 not in xenhv_domids(host)
    assert not is_introduced(xs, 4000)


def test_a_kind_no_back_end_serves_is_added_offline(host, guest_factory, toolstack, xs) -> None:
    """The device is there, its backend Closed and offline with no hotplug-status: a frontend gives up at
    once instead of waiting for a back-end that is not running, and the guest can read why (a backend path
    that did not exist would answer it EACCES)."""
    for kind in ("vbd", "vif"):
        serving.forget_dead(xs, kind)  # what an earlier test's killed back-end left
        assert not serving.served(xs, kind)
    m = guest_factory("default")
    before = client_tree(xs)
    d = toolstack.create(m)
    try:
        tree = client_tree(xs)
        for kind, devid in (("vbd", 768), ("vif", 0)):
            be = f"/local/domain/0/backend/{kind}/{d.domid}/{devid}"
            assert tree[f"/local/domain/{d.domid}/device/{kind}/{devid}/backend"][0] == be
            assert (tree[f"{be}/online"][0], tree[f"{be}/state"][0]) == ("0", "6")
            assert f"{be}/hotplug-status" not in tree
            assert tree[f"{be}/frontend-id"][0] == str(d.domid)
    finally:
        toolstack.destroy(d.domid)
    assert client_tree(xs) == before
