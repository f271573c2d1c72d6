"""The hosts file and the lease logic of harness.hosts, without sshd: real files, real flock(2), real
child processes holding and losing leases."""
from __future__ import annotations

import fcntl
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from xenpv.base.errors import ConfigError, HarnessError
from xenpv.base.owner import Owner, proc_stat
from xenpv.harness.hosts import HostPool, HostsFileError, HostSpec, PoolExhausted, load_hosts

GOOD = """\
- host: build-1.example
  user: ci
  key_file: id_ed25519
  known_hosts: known_hosts
  run_dir: /var/tmp/xenpv/
- host: 10.0.0.7
  port: 2222
  user: ci
  key_file: id_ed25519
  known_hosts: known_hosts
  max_guests: 3
  run_dir: /srv/xenpv
"""


@pytest.fixture
def hosts_dir(tmp_path: Path) -> Path:
    (tmp_path / "id_ed25519").write_text("key\n")
    (tmp_path / "known_hosts").write_text("")
    return tmp_path


def write(directory: Path, text: str) -> Path:
    path = directory / "hosts.yaml"
    path.write_text(text)
    return path


def test_good_file_with_defaults_and_relative_paths(hosts_dir: Path) -> None:
    a, b = load_hosts(write(hosts_dir, GOOD))
    assert a == HostSpec(host="build-1.example", user="ci", key_file=hosts_dir / "id_ed25519",
                         known_hosts=hosts_dir / "known_hosts", run_dir="/var/tmp/xenpv", port=22, max_guests=1)
    assert (b.port, b.max_guests, b.run_dir, b.name) == (2222, 3, "/srv/xenpv", "ci@10.0.0.7:2222")


@pytest.mark.parametrize("text, message", [
    ("[]", "hosts.yaml: must be a non-empty list of hosts"),
    ("host: a", "hosts.yaml: must be a non-empty list of hosts, got dict"),
    ("- [1, 2]", "hosts.yaml: host 1: must be a mapping"),
    ("- {host: a, user: u, key_file: id_ed25519, known_hosts: known_hosts, run_dir: /r, maxguests: 2}",
     "hosts.yaml: host 1 (a): maxguests: unknown field"),
    ("- {host: a, key_file: id_ed25519, known_hosts: known_hosts, run_dir: /r}", "host 1 (a): user: missing"),
    ("- {host: a, user: '', key_file: id_ed25519, known_hosts: known_hosts, run_dir: /r}",
     "host 1 (a): user: must be a non-empty string"),
    ("- {host: a, user: u, key_file: id_ed25519, known_hosts: known_hosts, run_dir: /r, port: yes}",
     "host 1 (a): port: must be an integer from 1 to 65535, got True"),
    ("- {host: a, user: u, key_file: id_ed25519, known_hosts: known_hosts, run_dir: /r, port: 70000}",
     "host 1 (a): port: must be an integer from 1 to 65535"),
    ("- {host: a, user: u, key_file: id_ed25519, known_hosts: known_hosts, run_dir: /r, max_guests: 0}",
     "host 1 (a): max_guests: must be an integer from 1 to 1024, got 0"),
    ("- {host: a, user: u, key_file: nokey, known_hosts: known_hosts, run_dir: /r}",
     "host 1 (a): key_file: {dir}/nokey: no such file"),
    ("- {host: a, user: u, key_file: id_ed25519, known_hosts: kh, run_dir: /r}",
     "host 1 (a): known_hosts: {dir}/kh: no such file"),
    ("- {host: a, user: u, key_file: id_ed25519, known_hosts: known_hosts, run_dir: xenpv}",
     "host 1 (a): run_dir: must be an absolute path on the remote host, got 'xenpv'"),
    ("- {host: a, user: u, key_file: id_ed25519, known_hosts: known_hosts, run_dir: /r}\n"
     "- {host: a, port: 22, user: v, key_file: id_ed25519, known_hosts: known_hosts, run_dir: /s}",
     "host 2 (a): host: a:22 is also host 1"),
    ("- {host: a\n", "hosts.yaml: line 2: not valid YAML"),
])
def test_errors_name_file_entry_and_field(hosts_dir: Path, text: str, message: str) -> None:
    with pytest.raises(HostsFileError) as info:
        load_hosts(write(hosts_dir, text))
    assert message.format(dir=hosts_dir) in str(info.value)
    assert str(info.value).startswith(str(hosts_dir / "hosts.yaml"))


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(HostsFileError, match=r"missing\.yaml: cannot be read: No such file"):
        load_hosts(tmp_path / "missing.yaml")


# ---- leases -----------------------------------------------------------------------------------------

def spec(host: str = "h1", max_guests: int = 1) -> HostSpec:
    # Leasing never reads the key or known_hosts; only connecting does.
    return HostSpec(host=host, user="u", key_file=Path("/nonexistent"), known_hosts=Path("/nonexistent"),
                    run_dir="/r", max_guests=max_guests)


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[HostPool]:
    p = HostPool([spec("h1", 2), spec("h2")], tmp_path / "leases", poll_interval=0.02)
    yield p
    p.close()


def test_slots_are_leased_in_order_and_refused_when_full(pool: HostPool) -> None:
    leases = [pool.lease() for _ in range(3)]
    assert [(lease.spec.host, lease.slot) for lease in leases] == [("h1", 0), ("h1", 1), ("h2", 0)]
    me = str(Owner.current())
    assert leases[2].path.read_text() == f"{me}\n"
    with pytest.raises(PoolExhausted, match=rf"every slot is leased after 0.0 s: u@h1:22 slot 0 by {me}"):
        pool.lease()
    leases[1].release()
    assert leases[1].path.read_text() == ""  # a released slot names no owner
    again = pool.lease()
    assert (again.spec.host, again.slot) == ("h1", 1)


def test_two_pools_of_one_process_do_not_share_a_slot(pool: HostPool) -> None:
    """flock, not POSIX locks: those never conflict within one process (two xdist-less leasers in one
    pytest process would both get the slot)."""
    other = HostPool([spec("h2")], pool.lease_dir)
    held = other.lease()
    try:
        with pytest.raises(PoolExhausted):
            other.lease()
        assert [lease.spec.host for lease in (pool.lease(), pool.lease())] == ["h1", "h1"]
        with pytest.raises(PoolExhausted):
            pool.lease()  # h2's one slot is the other pool's
    finally:
        held.release()


def test_a_waiting_lease_gets_the_slot_released_before_its_deadline(tmp_path: Path) -> None:
    pool = HostPool([spec()], tmp_path, poll_interval=0.02)
    first = pool.lease()
    timer = threading.Timer(0.3, first.release)
    timer.start()
    try:
        t0 = time.monotonic()
        second = pool.lease(timeout=10)
        assert 0.25 < time.monotonic() - t0 < 5
        assert second.slot == 0 and second.held and not first.held
    finally:
        timer.cancel()
        pool.close()


def test_bad_host_is_skipped_and_all_bad_says_why(pool: HostPool) -> None:
    pool.mark_bad(pool.hosts[0], "connection lost")
    pool.mark_bad(pool.hosts[0], "second reason is not kept")
    assert pool.lease().spec.host == "h2"
    pool.mark_bad(pool.hosts[1], "cannot connect: Connection refused")
    with pytest.raises(PoolExhausted, match=r"no usable host in the pool \(u@h1:22: connection lost; "
                                            r"u@h2:22: cannot connect: Connection refused\)"):
        pool.lease(timeout=5)  # no waiting for hosts that will not come back


def test_bad_marks_are_shared_through_the_bad_dir(tmp_path: Path) -> None:
    """Two pools of one run (two xdist workers): a host one lost is skipped by the other, with the reason;
    a pool of another run (its own bad_dir, or none) still leases it."""
    hosts = [spec("h1"), spec("h2")]
    worker0 = HostPool(hosts, tmp_path / "leases", bad_dir=tmp_path / "run1")
    worker1 = HostPool(hosts, tmp_path / "leases", bad_dir=tmp_path / "run1")
    other_run = HostPool(hosts, tmp_path / "leases", bad_dir=tmp_path / "run2")
    try:
        worker0.mark_bad(hosts[0], "connection lost")
        assert worker1.bad == {"u@h1:22": "connection lost"}
        assert worker1.lease().spec.host == "h2"
        assert other_run.bad == {} and other_run.lease().spec.host == "h1"
        worker1.mark_bad(hosts[1], "cannot connect")
        with pytest.raises(PoolExhausted, match=r"u@h1:22: connection lost; u@h2:22: cannot connect"):
            worker0.lease()
    finally:
        for pool in (worker0, worker1, other_run):
            pool.close()


def test_lease_of_a_named_host(pool: HostPool) -> None:
    assert pool.lease(host="u@h2:22").spec.host == "h2"
    with pytest.raises(PoolExhausted, match="every slot is leased after 0.0 s: u@h2:22 slot 0 by"):
        pool.lease(host="u@h2:22")  # h1's free slots are not h2's
    pool.mark_bad(pool.hosts[1], "connection lost")
    with pytest.raises(PoolExhausted, match=r"no usable host in the pool \(u@h2:22: connection lost\)"):
        pool.lease(host="u@h2:22", timeout=5)
    with pytest.raises(ConfigError, match=r"no host 'u@h3:22' in the pool \(it has u@h1:22, u@h2:22\)"):
        pool.lease(host="u@h3:22")


def test_local_entry_takes_only_max_guests(hosts_dir: Path) -> None:
    local, remote = load_hosts(write(hosts_dir, "- host: local\n  max_guests: 2\n" + GOOD.split("- host: 10.0.0.7")[0]))
    assert local == HostSpec.local(2) and local.is_local and local.name == "local"
    assert not remote.is_local
    with pytest.raises(HostsFileError, match=r"host 1 \(local\): user: not for the local host \(it takes only "
                                             r"max_guests\)"):
        load_hosts(write(hosts_dir, "- host: local\n  user: ci\n"))
    with pytest.raises(HostsFileError, match=r"host 1 \(local\): max_guests: must be an integer from 1"):
        load_hosts(write(hosts_dir, "- host: local\n  max_guests: 0\n"))


CHILD = """
import os, sys, time
from pathlib import Path
from xenpv.harness.hosts import HostPool, HostSpec
pool = HostPool([HostSpec("h1", "u", Path("/k"), Path("/kh"), "/r")], Path(sys.argv[1]))
lease = pool.lease()
if sys.argv[2] == "fork":
    pid = os.fork()
    if pid == 0:  # the grandchild inherits the locked descriptor and outlives its parent
        os.setsid()
        time.sleep(60)
        os._exit(0)
    print(pid, flush=True)
    os._exit(0)
print("leased", flush=True)
time.sleep(60)
"""


def child(lease_dir: Path, mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", CHILD, str(lease_dir), mode], stdout=subprocess.PIPE,
                            text=True, cwd=Path(__file__).resolve().parents[2])


def test_slot_of_a_killed_owner_is_taken_over(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    proc = child(tmp_path, "hold")
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "leased\n"
        owner = Owner.of(proc.pid)
        pool = HostPool([spec()], tmp_path)
        with pytest.raises(PoolExhausted, match=f"slot 0 by {owner}"):
            pool.lease()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    caplog.set_level(logging.INFO, "harness.hosts")
    with pool.lease() as lease:
        assert lease.path.read_text() == f"{Owner.current()}\n"
    assert f"u@h1:22 slot 0 taken over from {owner}, which is gone" in caplog.text


def test_lock_inherited_by_a_survivor_of_a_dead_owner_is_broken(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    proc = child(tmp_path, "fork")
    assert proc.stdout is not None
    grandchild = int(proc.stdout.readline())
    proc.wait(10)
    try:
        caplog.set_level(logging.INFO, "harness.hosts")
        pool = HostPool([spec()], tmp_path, poll_interval=0.02)
        with pool.lease(timeout=5) as lease:
            assert lease.slot == 0
        assert "still locked by a process that inherited it from" in caplog.text
    finally:
        os.kill(grandchild, signal.SIGKILL)
    # The grandchild is not our child (init reaps it): wait until it is no longer running.
    deadline = time.monotonic() + 10
    while (st := proc_stat(grandchild)) is not None and st.state not in "ZX" and time.monotonic() < deadline:
        time.sleep(0.02)


def test_lease_of_a_live_other_process_is_not_broken(tmp_path: Path) -> None:
    proc = child(tmp_path, "hold")
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "leased\n"
        pool = HostPool([spec()], tmp_path, poll_interval=0.02)
        with pytest.raises(PoolExhausted):
            pool.lease(timeout=0.3)
        assert Path(tmp_path / "h1_22.0.lease").read_text() == f"{Owner.of(proc.pid)}\n"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)


def test_break_rechecks_under_the_guard(tmp_path: Path) -> None:
    """_break acts on what it saw before taking the directory's exclusive lock; by then the slot may have
    been claimed by a live leaser, or let go: it must remove the file in neither case."""
    dead = Owner(1 << 22, 1)  # beyond pid_max's default: no such process
    pool = HostPool([spec()], tmp_path)
    proc = child(tmp_path, "hold")
    path = tmp_path / "h1_22.0.lease"
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "leased\n"
        pool._break(path, path.stat().st_ino, dead)  # claimed by a live owner meanwhile
        assert path.read_text() == f"{Owner.of(proc.pid)}\n"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    path.write_text(f"{dead}\n")  # its lock went with the process: free, only naming a dead owner
    pool._break(path, path.stat().st_ino, dead)
    assert path.exists()


def test_directory_lock_held_too_long_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Waiting on .pool.lock has a deadline: a leaser stopped (SIGSTOP, a debugger) while holding it must
    not hang every other run."""
    from xenpv.harness import hosts

    monkeypatch.setattr(hosts, "GUARD_TIMEOUT", 0.2)
    pool = HostPool([spec()], tmp_path)
    fd = os.open(tmp_path / ".pool.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(HarnessError, match=r"\.pool\.lock: still locked after 0 s"):
            pool.lease()
    finally:
        os.close(fd)
    with pool.lease() as lease:
        assert lease.slot == 0
