"""The pytest plugin of xenpv-harness (registered through the pytest11 entry point).

- markers: `integration` (real QEMU and dom0 processes), `conformance` (real peers: xenstore-utils,
  libxen-dev, QEMU's vhost-user), `slow` (under `--dist worksteal` these start first: harness.schedule);
- fixtures: `artifacts` (a per-test directory, kept when the test fails), `guest_factory` (launch a
  machine from a guest YAML; all are torn down after the test; `launcher: libvirt` guests, and with
  --xenpv-libvirt URI every guest without a Xen platform device, as libvirt domains of `libvirt_target`,
  harness.libvirt_launcher), `machine` (the default guest),
  `host_pool` (the remote hosts of --xenpv-hosts, harness.hosts; skipped without it);
- a failure report section naming the artifact directory with the tail of each machine's log;
- a test that fails on a guest's bugcheck (harness.agent.GuestBugcheck) reports the STOP line, the bucket,
  the crash dump and the tails of the console and agent log instead of the harness's traceback, and the
  dump and bucket are JUnit XML properties (`xenpv_crash_dump`, `xenpv_bucket`), as record_property makes,
  and so are a failed test's artifact directory and first line of its failure (`xenpv_artifacts`,
  `xenpv_failure`: the nightly history reads how a flaky test failed from it);
- every session has artifact directories of its own: <root>/<date>-<time>-<pid>/ (root: --xenpv-artifacts,
  default <rootdir>/artifacts), and under pytest-xdist one subdirectory per worker (.../gw0/), so two
  sessions from one checkout, or two workers, never write, keep or delete each other's files;
- at the start of a session, what runs that died left behind is removed (harness.cleanup); at its end,
  any process, network namespace or run directory the session made and did not remove is an error.
"""
from __future__ import annotations

import re
import shutil
import sys
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from xenpv.base.errors import ConfigError
from xenpv.base.owner import Owner
from xenpv.base.rundir import make_artifacts_dir, make_run_dir
from xenpv.guests.schema import GUESTS_DIR, GuestDefinition, load_guest
from xenpv.harness.agent import Guest, GuestBugcheck
from xenpv.harness.cleanup import reap, reap_stale
from xenpv.harness.dom0 import Dom0Backends
from xenpv.harness.forkserver import stop_shared
from xenpv.harness.hosts import HostLease, HostPool, HostSpec, lease_dir_default, load_hosts
from xenpv.harness.remote import RemoteHost
from xenpv.harness.remote_guest import RemoteGuest, Wheelhouse, install
from xenpv.harness.resources import ExclusiveResource
from xenpv.harness.schedule import worksteal_order
from xenpv.harness.libvirt_launcher import LibvirtMachine, LibvirtTarget, check_local_uri, session_target
from xenpv.harness.machine import Machine
from xenpv.base.process import read_tail, running
from xenpv.backends.host import HostServices
from xenpv.harness.xendomain import XenDomain

MARKERS = {
    "integration": "launches the real QEMU machine and dom0 processes",
    "conformance": "checks the harness against a real peer (xenstore-utils, libxen-dev headers, QEMU vhost-user)",
    "slow": "takes more than a few seconds (under --dist worksteal it starts first: harness.schedule)",
    "exclusive": "exclusive(name): never runs at the same time as another test marked with that name, in any "
                 "xdist worker or pytest session on this machine (harness.resources)",
}
EXCLUSIVE_TIMEOUT = 900.0  # seconds a test waits for its exclusive resources before it errors

_report_key = pytest.StashKey[dict[str, pytest.TestReport]]()
_artifacts_key = pytest.StashKey[Path]()
_machines_key = pytest.StashKey[list[Machine]]()
_session_artifacts_key = pytest.StashKey[Path]()
_run_artifacts_key = pytest.StashKey[Path]()  # the controller's session directory: the whole run's
_hosts_key = pytest.StashKey[list[HostSpec]]()
_exclusive_key = pytest.StashKey[list[ExclusiveResource]]()
_WORKERINPUT_KEY = "xenpv_session_artifacts"
_DIST_KEY = "xenpv_dist"
BAD_HOSTS_DIR = "bad-hosts"  # in the controller's session directory: the run's bad-host marks
# Sessions running in this process (pytester can nest one); only the outermost sweeps at its end.
_sessions = 0


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("xenpv")
    g.addoption("--xenpv-artifacts", default=None, metavar="DIR",
                help="where per-test artifact directories go (default: <rootdir>/artifacts)")
    g.addoption("--xenpv-keep-artifacts", action="store_true",
                help="keep artifact directories of passing tests too")
    g.addoption("--qemu-binary", default=None, metavar="PATH",
                help="QEMU to launch (default: $XENPV_QEMU or /usr/libexec/xen-qemu-system-i386)")
    g.addoption("--xenpv-libvirt", default=None, metavar="URI",
                help="launch every guest libvirt can run (no Xen platform device) as a domain of the libvirt "
                     "daemon at URI (qemu:///system, qemu:///system?socket=PATH; harness.libvirt_launcher); "
                     "guests with `launcher: libvirt` use it too (without it: qemu:///system if a daemon "
                     "answers, else a private libvirtd for the session)")
    g.addoption("--xenpv-hosts", default=None, metavar="HOSTS.yaml",
                help="remote hosts for the `host_pool` fixture (issue 17, first part; harness.hosts); "
                     "checked at start-up, leases under $XENPV_LEASE_DIR (default /tmp/xenpv-leases)")


def pytest_configure(config: pytest.Config) -> None:
    for name, help_ in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {help_}")
    libvirt_uri = config.getoption("--xenpv-libvirt", None)
    if libvirt_uri:
        try:
            check_local_uri(libvirt_uri)
        except ConfigError as exc:
            raise pytest.UsageError(str(exc)) from None
    hosts_file = config.getoption("--xenpv-hosts", None)
    if hosts_file:
        try:  # a mistake in the hosts file stops the session before any test, naming entry and field
            config.stash[_hosts_key] = load_hosts(Path(hosts_file))
        except ConfigError as exc:
            raise pytest.UsageError(str(exc)) from None
    workerinput: dict[str, Any] | None = getattr(config, "workerinput", None)
    if workerinput is not None and _WORKERINPUT_KEY in workerinput:
        # An xdist worker: a subdirectory of the session's directory, named after the worker.
        config.stash[_run_artifacts_key] = Path(workerinput[_WORKERINPUT_KEY])
        config.stash[_session_artifacts_key] = config.stash[_run_artifacts_key] / workerinput["workerid"]
    else:
        try:
            config.stash[_session_artifacts_key] = make_artifacts_dir(_artifacts_root(config), "--xenpv-artifacts")
            config.stash[_run_artifacts_key] = config.stash[_session_artifacts_key]
        except ConfigError as exc:
            raise pytest.UsageError(str(exc)) from None


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """pytest-xdist, in the controller: tell a worker the session's artifact directory, and the scheduler
    (a worker's own `dist` option is always "no")."""
    node.workerinput[_WORKERINPUT_KEY] = str(node.config.stash[_session_artifacts_key])
    node.workerinput[_DIST_KEY] = node.config.getoption("dist")


def session_artifacts(config: pytest.Config) -> Path:
    """This session's (or xdist worker's) own artifact directory; made on first use."""
    path = config.stash[_session_artifacts_key]
    path.mkdir(exist_ok=True)
    return path


def pytest_unconfigure(config: pytest.Config) -> None:
    # Nothing failed, nothing kept: the session's directory goes if it is empty (it is only ever ours).
    path = config.stash.get(_session_artifacts_key, None)
    if path is not None and not hasattr(config, "workerinput"):
        shutil.rmtree(path / BAD_HOSTS_DIR, ignore_errors=True)  # the run is over; the summary named them
    if path is not None:
        try:
            path.rmdir()
        except OSError:
            pass


def pytest_sessionstart(session: pytest.Session) -> None:
    global _sessions
    _sessions += 1
    if not hasattr(session.config, "workerinput"):  # the controller reaps once for all its workers
        reap_stale()


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    path = config.stash.get(_session_artifacts_key, None)
    bad = sorted(path.joinpath(BAD_HOSTS_DIR).glob("*.bad")) if path is not None else []
    for mark in bad:
        terminalreporter.write_line(f"xenpv: pool host {mark.stem} was marked bad in this run: "
                                    f"{mark.read_text().strip()}")
    if path is not None and path.is_dir() and any(path.iterdir()):
        terminalreporter.write_line(f"xenpv: this session's artifacts are kept in {path}")


@pytest.hookimpl(wrapper=True)
def pytest_collection(session: pytest.Session) -> Iterator[None]:
    """Collection keeps the test modules pytest rewrites (their assert statements) as .pyc files, even where
    PYTHONDONTWRITEBYTECODE is set, as ci/bootstrap.sh compiles the project's own modules: without a cached
    copy every xdist worker rewrites all of tests/ again (a collection of the suite: 6.3 s of CPU, 2.4 s
    with the cache; 4 workers on 2 cores). pytest writes each file atomically, so workers may race."""
    saved = sys.dont_write_bytecode
    sys.dont_write_bytecode = False
    try:
        return (yield)
    finally:
        sys.dont_write_bytecode = saved


@pytest.hookimpl(trylast=True)  # after `-m` and `-k` deselected: the shares are of what will run
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under `--dist worksteal`, in each xdist worker: the `slow` tests at the front of the workers' first
    shares (harness.schedule), so they start first instead of ending the run on one or two workers."""
    workerinput: dict[str, Any] | None = getattr(config, "workerinput", None)
    if workerinput is None or workerinput.get(_DIST_KEY) != "worksteal":
        return
    items[:] = worksteal_order(items, int(workerinput["workercount"]),
                               lambda item: item.get_closest_marker("slow") is not None,
                               lambda item: item.nodeid.split("::", 1)[0])


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    names = sorted({str(m.args[0]) for m in item.iter_markers("exclusive") if m.args})
    held: list[ExclusiveResource] = item.stash.setdefault(_exclusive_key, [])
    for name in names:  # in one order, so two tests with two names cannot hold one each and wait
        held.append(ExclusiveResource.acquire(lease_dir_default(), name, EXCLUSIVE_TIMEOUT))


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    for resource in reversed(item.stash.get(_exclusive_key, [])):
        resource.release()
    item.stash[_exclusive_key] = []


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report: pytest.TestReport = yield
    item.stash.setdefault(_report_key, {})[report.when] = report
    stop = call.excinfo.value if call.excinfo is not None else None
    if report.failed and isinstance(stop, GuestBugcheck):
        # The guest's failure, not the harness's: what a driver developer reads first is the STOP, the
        # bucket and where the dump is; the traceback would only show the console wait that saw it.
        for name, value in (("xenpv_crash_dump", str(stop.dump_path)), ("xenpv_bucket", stop.bucket)):
            if (name, value) not in item.user_properties:
                item.user_properties.append((name, value))
        report.user_properties = list(item.user_properties)
        report.longrepr = f"{item.nodeid}: {stop.report()}"
    crash = getattr(report.longrepr, "reprcrash", None)
    if report.failed and crash is not None:
        # pytest-rerunfailures' JUnit XML keeps the <failure> of a test's last attempt only; the nightly
        # history (harness.nightly.ingest) reads how a flaky test's earlier attempt failed from this.
        prop = ("xenpv_failure", crash.message.strip().split("\n", 1)[0][:500])
        if prop not in item.user_properties:
            item.user_properties.append(prop)
            report.user_properties = list(item.user_properties)
    if report.failed and _artifacts_key in item.stash:
        for m in item.stash.get(_machines_key, []):
            m.flush_logs()
        # For the nightly history (harness.nightly.ingest): where this failure's files are kept.
        prop = ("xenpv_artifacts", str(item.stash[_artifacts_key]))
        if prop not in item.user_properties:
            item.user_properties.append(prop)
            report.user_properties = list(item.user_properties)
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


def _file_name(text: str) -> str:
    """`text` (a test id, a host name) as one safe file-name component."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


@pytest.fixture
def artifacts(request: pytest.FixtureRequest) -> Iterator[Path]:
    """This test's artifact directory: removed when the test passes, kept (and named) when it fails."""
    name = _file_name(request.node.nodeid)[-120:]
    root = session_artifacts(request.config)
    path = root / name
    for n in range(1, 1000):  # the same test twice in one session: a directory each, nothing overwritten
        try:
            path.mkdir()
            break
        except FileExistsError:
            path = root / f"{name}-{n}"
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
    libvirt_uri = request.config.getoption("--xenpv-libvirt")

    def launch(spec: GuestSpec = "default", *, name: str | None = None) -> Machine:
        guest = resolve_guest(spec)
        if name is None:
            name = f"{guest.name}-{len(machines)}" if machines else guest.name
        if guest.launcher == "libvirt" or (libvirt_uri and not guest.platform):
            m: Machine = LibvirtMachine(guest, artifacts / name, target=request.getfixturevalue("libvirt_target"),
                                        name=name)
        else:
            m = Machine(guest, artifacts / name, binary=binary, name=name)
        machines.append(m)
        m.launch()
        m.write_replay_script()
        return m

    yield launch
    for m in reversed(machines):
        m.shutdown()


@pytest.fixture(scope="session")
def libvirt_target(request: pytest.FixtureRequest) -> Iterator[LibvirtTarget]:
    """The libvirt daemon of the session's libvirt machines (harness.libvirt_launcher.session_target)."""
    logs = session_artifacts(request.config) / "libvirtd"
    with session_target(request.config.getoption("--xenpv-libvirt"), logs) as target:
        yield target
    if not request.session.testsfailed and not request.config.getoption("--xenpv-keep-artifacts"):
        shutil.rmtree(logs, ignore_errors=True)


@pytest.fixture(scope="session")
def host(request: pytest.FixtureRequest) -> Iterator[HostServices]:
    """The dom0 services (xenhv, xenstored), shared by every test of the session."""
    logs = session_artifacts(request.config) / "host-services"
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


@pytest.fixture(scope="session")
def host_pool(pytestconfig: pytest.Config) -> Iterator[HostPool]:
    """The pool of --xenpv-hosts (this session's or xdist worker's own; leases are shared through the lease
    directory, bad-host marks through the run's session directory); skipped without the option."""
    hosts = pytestconfig.stash.get(_hosts_key, None)
    if hosts is None:
        pytest.skip("no --xenpv-hosts given")
    pool = HostPool(hosts, bad_dir=pytestconfig.stash[_run_artifacts_key] / BAD_HOSTS_DIR)
    yield pool
    pool.close()


@dataclass(eq=False)
class _PoolHosts:
    """The session's connections to pool hosts and what is installed on each (made on first use)."""

    pool: HostPool
    wheels_dir: Path
    wheels: Wheelhouse | None = None
    connections: dict[str, RemoteHost] = dataclass_field(default_factory=dict)
    installs: dict[str, str] = dataclass_field(default_factory=dict)

    def connect(self, lease: HostLease) -> tuple[RemoteHost, str]:
        name = lease.spec.name
        remote = self.connections.get(name)
        transport = remote.client.get_transport() if remote is not None else None
        if remote is None or transport is None or not transport.is_active():
            remote = self.connections[name] = RemoteHost.for_lease(lease)
        if name not in self.installs:
            if self.wheels is None:
                self.wheels = Wheelhouse.build(self.wheels_dir)
            self.installs[name] = install(remote, self.wheels)
        return remote, self.installs[name]

    def close(self) -> None:
        for remote in self.connections.values():
            remote.close()
        shutil.rmtree(self.wheels_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def _pool_hosts(host_pool: HostPool) -> Iterator[_PoolHosts]:
    hosts = _PoolHosts(host_pool, make_run_dir("whl"))
    yield hosts
    hosts.close()


@dataclass(eq=False)
class PooledGuest:
    """A guest on whichever pool host was free: `host` is its name ("local" or user@host:port); `guest` is
    the local Guest or the RemoteGuest, whose `console` runs commands the same way."""

    host: str
    guest: Guest | RemoteGuest

    @property
    def console(self) -> Any:
        return self.guest.console


@pytest.fixture
def pool_guest(request: pytest.FixtureRequest, artifacts: Path, guest_factory: Callable[..., Machine],
               _pool_hosts: _PoolHosts) -> Iterator[Callable[..., PooledGuest]]:
    """`pool_guest("default")` leases a slot of a --xenpv-hosts host (`host=NAME`: of that one; waiting up
    to `lease_timeout` s for one) and boots the guest there as `xenpv run` boots it, with dom0's blkback
    and netback: on `local`, in this process (the session's xenhv and xenstored, back-ends of the test's
    own); on an SSH host, with this checkout installed there (harness.remote_guest). A failed test gets
    each remote guest's artifacts copied back into its own artifact directory (remote-<host>/). Leases
    end with the test."""
    leases: list[HostLease] = []
    remotes: list[RemoteGuest] = []
    locals_: list[tuple[Guest, Dom0Backends]] = []
    binary = request.config.getoption("--qemu-binary")

    def boot_local(guest_def: GuestDefinition, timeout: float) -> Guest:
        host_services: HostServices = request.getfixturevalue("host")
        backends = Dom0Backends.start(host_services, artifacts / f"dom0-{len(locals_)}")
        try:
            g = Guest.boot(host_services, guest_factory(guest_def), timeout, backends=backends)
        except BaseException:
            backends.stop()
            raise
        locals_.append((g, backends))
        return g

    def boot(spec: GuestSpec = "default", *, host: str | None = None, lease_timeout: float = 300.0,
             timeout: float = 30.0) -> PooledGuest:
        guest_def = resolve_guest(spec)
        lease = _pool_hosts.pool.lease(timeout=lease_timeout, host=host)
        leases.append(lease)
        if lease.spec.is_local:
            local = boot_local(guest_def, timeout)
            return PooledGuest("local", local)
        remote, installed = _pool_hosts.connect(lease)
        g = RemoteGuest.boot(remote, installed, guest_def.path,
                             artifacts / f"remote-{_file_name(lease.spec.name)}-console.log",
                             qemu=binary)
        remotes.append(g)
        return PooledGuest(lease.spec.name, g)

    yield boot
    failed = any(r.failed for r in request.node.stash.get(_report_key, {}).values())
    try:
        for g in reversed(remotes):
            g.close(fetch_into=artifacts / f"remote-{_file_name(g.host)}" if failed else None)
        for local, backends in reversed(locals_):
            try:
                local.shutdown()
            finally:
                backends.stop()
    finally:
        for lease in leases:
            lease.release()


@pytest.fixture
def machine(guest_factory: Callable[..., Machine]) -> Machine:
    """The default guest, launched."""
    return guest_factory("default")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    global _sessions
    _sessions -= 1
    if _sessions == 0:
        stop_shared()  # the agent fork server is the session's, not a test's leftover
    left = running()
    if left:
        names = ", ".join(f"{p.name} (pid {p.pid})" for p in left)
        for p in left:
            p.stop(timeout=0.5)
        print(f"\nxenpv: processes left running by tests were killed: {names}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    if _sessions == 0:
        # Whatever else of ours is still there (an agent, a namespace, a run directory) was leaked by a test.
        swept = reap(only=Owner.current())
        if swept:
            print("\nxenpv: tests left these behind; removed:\n  " + "\n  ".join(swept.lines()))
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
