"""The pytest plugin of xenpv-harness (registered through the pytest11 entry point).

- markers: `integration` (real QEMU and dom0 processes), `conformance` (real peers: xenstore-utils,
  libxen-dev, QEMU's vhost-user), `slow`;
- fixtures: `artifacts` (a per-test directory, kept when the test fails), `guest_factory` (launch a
  machine from a guest YAML; all are torn down after the test), `machine` (the default guest);
- a failure report section naming the artifact directory with the tail of each machine's log;
- at the end of the session, any process the harness started and did not stop is an error.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Callable, Iterator

import pytest

from xenpv.guests.schema import GUESTS_DIR, GuestDefinition, load_guest
from xenpv.harness.agent import Guest
from xenpv.harness.machine import Machine
from xenpv.base.process import read_tail, running
from xenpv.backends.host import HostServices
from xenpv.harness.xendomain import XenDomain

MARKERS = {
    "integration": "launches the real QEMU machine and dom0 processes",
    "conformance": "checks the harness against a real peer (xenstore-utils, libxen-dev headers, QEMU vhost-user)",
    "slow": "takes more than a few seconds",
}

_report_key = pytest.StashKey[dict[str, pytest.TestReport]]()
_artifacts_key = pytest.StashKey[Path]()
_machines_key = pytest.StashKey[list[Machine]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("xenpv")
    g.addoption("--xenpv-artifacts", default=None, metavar="DIR",
                help="where per-test artifact directories go (default: <rootdir>/artifacts)")
    g.addoption("--xenpv-keep-artifacts", action="store_true",
                help="keep artifact directories of passing tests too")
    g.addoption("--qemu-binary", default=None, metavar="PATH",
                help="QEMU to launch (default: $XENPV_QEMU or /usr/libexec/xen-qemu-system-i386)")


def pytest_configure(config: pytest.Config) -> None:
    for name, help_ in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {help_}")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report: pytest.TestReport = yield
    item.stash.setdefault(_report_key, {})[report.when] = report
    if report.failed and _artifacts_key in item.stash:
        for m in item.stash.get(_machines_key, []):
            m.flush_logs()
        report.sections.append(("xenpv artifacts", _describe_artifacts(item.stash[_artifacts_key])))
    return report


def _describe_artifacts(path: Path) -> str:
    lines = [f"artifacts kept in {path}"]
    for f in sorted(path.rglob("*")):
        if f.is_file():
            lines.append(f"  {f.relative_to(path)} ({f.stat().st_size} bytes)")
    for log in sorted(path.rglob("qemu.log")):
        tail = read_tail(log, 10)
        if tail:
            lines += [f"--- last lines of {log.relative_to(path)} ---", tail]
    return "\n".join(lines)


def _artifacts_root(config: pytest.Config) -> Path:
    opt = config.getoption("--xenpv-artifacts")
    return Path(opt) if opt else config.rootpath / "artifacts"


@pytest.fixture
def artifacts(request: pytest.FixtureRequest) -> Iterator[Path]:
    """This test's artifact directory: removed when the test passes, kept (and named) when it fails."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.nodeid)[-120:]
    path = _artifacts_root(request.config) / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    request.node.stash[_artifacts_key] = path
    yield path
    reports = request.node.stash.get(_report_key, {})
    failed = any(r.failed for r in reports.values())
    if not failed and not request.config.getoption("--xenpv-keep-artifacts"):
        shutil.rmtree(path, ignore_errors=True)


GuestSpec = str | Path | GuestDefinition


def resolve_guest(spec: GuestSpec) -> GuestDefinition:
    if isinstance(spec, GuestDefinition):
        return spec
    p = Path(spec)
    if not p.exists() and (GUESTS_DIR / p.name).exists():
        p = GUESTS_DIR / p.name
    if not p.suffix:
        p = GUESTS_DIR / f"{p}.yaml"
    return load_guest(p)


@pytest.fixture
def guest_factory(request: pytest.FixtureRequest, artifacts: Path) -> Iterator[Callable[..., Machine]]:
    """`guest_factory("vendor-c000")` launches a fresh machine; every one is shut down after the test."""
    machines: list[Machine] = []
    request.node.stash[_machines_key] = machines
    binary = request.config.getoption("--qemu-binary")

    def launch(spec: GuestSpec = "default", *, name: str | None = None) -> Machine:
        guest = resolve_guest(spec)
        if name is None:
            name = f"{guest.name}-{len(machines)}" if machines else guest.name
        m = Machine(guest, artifacts / name, binary=binary, name=name)
        machines.append(m)
        m.launch()
        m.write_replay_script()
        return m

    yield launch
    for m in reversed(machines):
        m.shutdown()


@pytest.fixture(scope="session")
def host(request: pytest.FixtureRequest) -> Iterator[HostServices]:
    """The dom0 services (xenhv, xenstored), shared by every test of the session."""
    logs = _artifacts_root(request.config) / "host-services"
    services = HostServices.start(logs)
    yield services
    services.stop()
    if not request.session.testsfailed and not request.config.getoption("--xenpv-keep-artifacts"):
        shutil.rmtree(logs, ignore_errors=True)


@pytest.fixture
def xen_guest_factory(host: HostServices, guest_factory: Callable[..., Machine]) -> Iterator[Callable[..., XenDomain]]:
    """`xen_guest_factory("default")` launches a machine and makes it a domain of the session's xenhv."""
    domains: list[XenDomain] = []

    def launch(spec: GuestSpec = "default", *, name: str | None = None) -> XenDomain:
        d = XenDomain.create(host, guest_factory(spec, name=name))
        domains.append(d)
        return d

    yield launch
    for d in reversed(domains):
        d.destroy()
    host.check_alive("after the test")


@pytest.fixture
def boot_guest(host: HostServices, guest_factory: Callable[..., Machine]) -> Iterator[Callable[..., Guest]]:
    """`boot_guest("vendor-c000")` launches the machine, creates its domain and boots the guest agent;
    `guest.console.run("devices")` talks to it. Everything is torn down after the test."""
    guests: list[Guest] = []

    def boot(spec: GuestSpec = "default", *, name: str | None = None, timeout: float = 30.0) -> Guest:
        g = Guest.boot(host, guest_factory(spec, name=name), timeout)
        guests.append(g)
        return g

    yield boot
    for g in reversed(guests):
        g.shutdown()
    host.check_alive("after the test")


@pytest.fixture
def machine(guest_factory: Callable[..., Machine]) -> Machine:
    """The default guest, launched."""
    return guest_factory("default")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    left = running()
    if left:
        names = ", ".join(f"{p.name} (pid {p.pid})" for p in left)
        for p in left:
            p.stop(timeout=0.5)
        print(f"\nxenpv: processes left running by tests were killed: {names}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
