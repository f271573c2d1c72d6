"""Guests on pool hosts (issue 17): this checkout installed on a real OpenSSH host from its wheels, the
guest's dom0, QEMU and agent running there, its console over the SSH session, its artifacts brought back;
then a run of two pool hosts (this machine and the sshd one) under pytest-xdist, with a host killed under
one test."""
from __future__ import annotations

import shlex
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.sshhost import SshHost, start_ssh_host
from xenpv.guests.schema import GUESTS_DIR
from xenpv.harness.cleanup import reap_stale
from xenpv.harness.hosts import HostPool
from xenpv.harness.remote import RemoteHost
from xenpv.harness.remote_guest import PROJECT_ROOT, RemoteGuest, RemoteGuestExited, Wheelhouse, install

pytest_plugins = ["pytester"]
pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Wheelhouse:
    before = {p.name for p in PROJECT_ROOT.iterdir()}
    built = Wheelhouse.build(tmp_path_factory.mktemp("wheels"))
    # Built from a copy: the checkout gains nothing (no build/, no egg-info of a second build).
    assert {p.name for p in PROJECT_ROOT.iterdir()} == before
    assert {w.name.split("-")[0] for w in built.path.glob("*.whl")} >= {"xenpv_harness", "paramiko", "pexpect"}
    return built


@pytest.fixture(scope="module")
def ssh_host() -> Iterator[SshHost]:
    """One SSH host for this module's tests, which run in file order: the first installs this build there and
    the others find it installed, as a pool host keeps it between runs (an install, a venv and a pip install
    from the wheels, took the two-host run from 30 s to 62 s on the 2-core CI machine; each test had a host
    of its own and paid for one). The last test kills the host: a test that needs it alive goes above it."""
    yield from start_ssh_host()


def test_guest_runs_on_a_pool_host_and_its_artifacts_come_back(ssh_host: SshHost, wheels: Wheelhouse,
                                                               tmp_path: Path) -> None:
    with HostPool([ssh_host.spec()], tmp_path / "leases") as pool, pool.lease() as lease, \
            RemoteHost.for_lease(lease) as remote:
        base = install(remote, wheels)
        assert base == f"{ssh_host.spec().run_dir}/xenpv-{wheels.digest}"
        # What runs there is what was built here, installed without an index.
        version = remote.run(f"{base}/.venv/bin/xenpv version", timeout=30, check=True).stdout
        assert "xenpv-harness 0.1.0" in version
        assert install(remote, wheels) == base  # made once: the second call finds it
        guest = RemoteGuest.boot(remote, base, GUESTS_DIR / "default.yaml", tmp_path / "console.log")
        try:
            assert guest.directory.startswith(ssh_host.spec().run_dir + "/guest-")
            devices = guest.console.run("devices")
            assert "XENBUS" in devices and "XENVBD" in devices, devices
            # The host's own xenhv made the domain: its processes run in the host's namespace, not here.
            in_ns = " ".join(remote.run("ps -eo args", timeout=30).stdout.splitlines())
            assert "xen-qemu-system-i386" in in_ns and "xenpv.backends.xenhv" in in_ns
            assert guest.console.run("bogus-command").startswith("unknown command")
        finally:
            guest.close(fetch_into=tmp_path / "fetched")
        fetched = tmp_path / "fetched" / "artifacts"
        logs = {p.name for p in fetched.rglob("*") if p.is_file()}
        assert {"qemu.log", "qtest.log"} <= logs, logs
        assert "devices" in (tmp_path / "console.log").read_text()
        assert remote.run(f"test -e {shlex.quote(guest.directory)}", timeout=30).status == 1  # removed there


def test_remote_guest_that_exits_is_reported_with_its_status(ssh_host: SshHost, wheels: Wheelhouse,
                                                             tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text((GUESTS_DIR / "default.yaml").read_text().replace("memory: 128M", "memory: lots"))
    with HostPool([ssh_host.spec()], tmp_path / "leases") as pool, pool.lease() as lease, \
            RemoteHost.for_lease(lease) as remote:
        base = install(remote, wheels)
        with pytest.raises(RemoteGuestExited, match=r"(?s)exited with status 2 during boot:.*bad.yaml: memory: must be a size") as info:
            RemoteGuest.boot(remote, base, bad, tmp_path / "console.log")
        assert info.value.status == 2
        assert not pool.bad  # the guest's fault, not the host's
        remote.run(f"rm -rf {shlex.quote(ssh_host.spec().run_dir)}/guest-*", timeout=30, check=True)


# ---- a run of two pool hosts, as a user runs one ------------------------------------------------------

# Pinned to the SSH host (one xdist worker runs this file, in order: --dist loadfile): a failure whose
# artifacts come back, then the host dropping under a test.
ON_REMOTE = """
import os, subprocess, time
from conftest import record

def test_fails_on_purpose(pool_guest):
    t0 = time.time()
    g = pool_guest("default", host=os.environ["POOL_REMOTE"])
    out = g.console.run("devices")
    record(g.host, t0)
    assert "NO SUCH DEVICE" in out, "failed on purpose on " + g.host

def test_host_killed(pool_guest):
    g = pool_guest("default", host=os.environ["POOL_REMOTE"])
    # The host dies: every process in its network namespace (sshd, this guest's dom0, QEMU, agent).
    for pid in subprocess.run(["ip", "netns", "pids", os.environ["POOL_REMOTE_NS"]], capture_output=True,
                              text=True, check=True).stdout.split():
        try:
            os.kill(int(pid), 9)
        except ProcessLookupError:
            pass  # it ended between the listing and the kill (a short-lived ssh session process)
    g.console.run("devices")

def test_after_the_kill(pool_guest):
    g = pool_guest("default")  # only local is left
    assert g.host == "local"
    assert "XENBUS" in g.console.run("devices")
"""

# Any host: the other worker runs these while the first file holds the SSH host.
ANYWHERE = """
import time
from conftest import record

def test_a(pool_guest):
    t0 = time.time()
    g = pool_guest("default")
    assert "XENBUS" in g.console.run("devices")
    # The unplug takes effect: the PV disk connects to that host's own blkback, wherever it runs.
    assert g.console.run("reboot", timeout=60).startswith("boot 2")
    deadline = time.monotonic() + 20
    while "connected backend Connected" not in (listing := g.console.run("vbd list")):
        assert time.monotonic() < deadline, listing
        time.sleep(0.2)
    record(g.host, t0)

def test_b(pool_guest):
    t0 = time.time()
    g = pool_guest("default")
    assert "XENBUS" in g.console.run("devices")
    record(g.host, t0)
"""

CONFTEST = """
import os, time

def record(host, t0):
    with open(os.environ["POOL_TIMES"], "a") as f:
        f.write(f"{host} {t0} {time.time()}\\n")
"""


@pytest.mark.exclusive("nested-runs")  # an inner pytest -n 2 with a guest per worker
def test_two_hosts_run_tests_in_parallel_and_a_killed_host_fails_one_test(
        ssh_host: SshHost, pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = ssh_host.spec()
    hosts = tmp_path / "hosts.yaml"
    hosts.write_text(textwrap.dedent(f"""\
        - host: local
        - host: {spec.host}
          port: {spec.port}
          user: {spec.user}
          key_file: {spec.key_file}
          known_hosts: {spec.known_hosts}
          run_dir: {spec.run_dir}
        """))
    times = tmp_path / "times"
    for name, value in (("POOL_REMOTE", spec.name), ("POOL_REMOTE_NS", ssh_host.ns.name), ("POOL_TIMES", str(times)),
                        ("XENPV_LEASE_DIR", str(tmp_path / "leases"))):
        monkeypatch.setenv(name, value)
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_on_remote=ON_REMOTE, test_anywhere=ANYWHERE)
    art = tmp_path / "art"
    try:
        result = pytester.runpytest_subprocess("-n", "2", "--dist", "loadfile", "-p", "no:cacheprovider",
                                               "--xenpv-hosts", str(hosts), "--xenpv-artifacts", str(art),
                                               "-rA", timeout=900)
    finally:
        reap_stale()  # what the killed host's own runs left on this machine (their owners are dead)
    out = result.stdout.str()
    assert result.parseoutcomes() == {"passed": 3, "failed": 2}, out
    result.stdout.fnmatch_lines([f"E * AssertionError: failed on purpose on {spec.name}",
                                 f"E *RemoteConnectionLost: {spec.name}: the guest console ('devices'): "
                                 f"connection lost",
                                 f"xenpv: pool host {spec.host}_{spec.port} was marked bad in this run: *"])
    # The failed remote test's artifacts came back: QEMU's log and the qtest transcript of the host's run.
    fetched = {p.name for p in art.rglob("*test_fails_on_purpose*/remote-*/artifacts/**/*") if p.is_file()}
    assert {"qemu.log", "qtest.log"} <= fetched, sorted(art.rglob("*"))
    # Both hosts ran guests, at the same time (from lease to the test's end).
    spans = [line.split() for line in times.read_text().splitlines()]
    remote = [(float(a), float(b)) for host, a, b in spans if host == spec.name]
    local = [(float(a), float(b)) for host, a, b in spans if host == "local"]
    assert remote and local, spans
    assert any(a0 < b1 and a1 < b0 for a0, b0 in remote for a1, b1 in local), spans
