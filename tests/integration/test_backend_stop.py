"""A back-end that stops says so: its announcement (backends.serving) goes, and every device it still has
is left Closed (Linux's netback_remove -> set_backend_state(be, XenbusStateClosed); blkback's remove path
the same), so a frontend closing afterwards is answered at once instead of waiting out its close timeout.
A back-end killed with SIGKILL cannot say anything: its kind stays served (it is expected back) until the
next back-end of the kind starts and takes its dead predecessor's announcement away."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from xenpv.backends import serving
from xenpv.backends.blkback.launch import start_blkback
from xenpv.backends.host import HostServices
from xenpv.backends.netback.launch import start_netback
from xenpv.backends.xenstored.client import XsClient
from xenpv.base.process import Supervised, wait_for
from xenpv.base.rundir import make_run_dir, remove_run_dir
from xenpv.harness.netns import NetNamespace
from xenpv.xenabi.xenbus import XenbusState as S

pytestmark = pytest.mark.integration


@pytest.fixture
def xs(host: HostServices) -> Iterator[XsClient]:
    with XsClient(host.xenstored_socket) as c:
        yield c


@pytest.fixture
def launch(host: HostServices, artifacts: Path) -> Iterator[Callable[[str], Supervised]]:
    """`launch("vbd")` starts blkback, `launch("vif")` netback (in a namespace of its own)."""
    run = make_run_dir("bestop")
    namespaces: list[NetNamespace] = []
    started: list[Supervised] = []

    def start(kind: str) -> Supervised:
        if kind == "vbd":
            proc = start_blkback(host.run_dir, host.xenstored_socket, host.xenhv_socket,
                                 artifacts / f"blkback-{len(started)}.log")
        else:
            namespaces.append(NetNamespace.create("bs"))
            proc = start_netback(host.xenstored_socket, host.xenhv_socket, run / "netback.sock",
                                 namespaces[-1].name, artifacts / f"netback-{len(started)}.log")
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()
    for ns in namespaces:
        ns.close()
    remove_run_dir(run)


def _state(xs: XsClient, path: str) -> S | None:
    return S.parse(xs.read(f"{path}/state")) if xs.exists(f"{path}/state") else None


@pytest.mark.parametrize("kind, devid", [("vbd", 768), ("vif", 0)])
def test_a_stopping_back_end_leaves_its_devices_closed_and_withdraws(kind: str, devid: int, launch, xen_guest_factory,
                                                                     xs: XsClient) -> None:
    proc = launch(kind)
    assert serving.served(xs, kind)
    d = xen_guest_factory("default")
    backend = f"/local/domain/0/backend/{kind}/{d.domid}/{devid}"
    wait_for(lambda: _state(xs, backend) == S.InitWait, timeout=10, what=f"{kind} {devid} in InitWait",
             alive=[proc])
    assert proc.stop() == 0  # SIGTERM: the daemon's own stop path
    assert _state(xs, backend) == S.Closed
    assert not serving.served(xs, kind)


@pytest.mark.parametrize("kind", ["vbd", "vif"])
def test_a_killed_back_end_still_serves_until_the_next_one_takes_over(kind: str, launch, xs: XsClient) -> None:
    first = launch(kind)
    first.signal_group(9)
    first.stop()
    dead = xs.directory(serving.serving_root(kind))
    assert len(dead) == 1 and serving.served(xs, kind)  # expected back: its devices are still added
    second = launch(kind)
    alive = xs.directory(serving.serving_root(kind))
    assert len(alive) == 1 and alive != dead and str(second.pid) in alive[0]
