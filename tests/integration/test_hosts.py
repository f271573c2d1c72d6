"""The host pool against a real OpenSSH server: Debian's sshd in a network namespace of its own, on a
veth pair (tests/integration/sshhost.py), reached through harness.hosts and harness.remote (paramiko)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.integration.sshhost import SshHost, keygen, ssh_host  # noqa: F401  (fixture)
from xenpv.base.owner import Owner
from xenpv.base.process import wait_for
from xenpv.harness.hosts import HostPool, PoolExhausted
from xenpv.harness.remote import (RemoteAuthFailed, RemoteConnectionLost, RemoteError, RemoteHost,
                                  RemoteHostKeyRejected, RemoteTimeout, RemoteUnreachable)

pytestmark = pytest.mark.integration
pytest_plugins = ["pytester"]


def test_lease_run_and_sftp_round_trip(ssh_host: SshHost, tmp_path: Path) -> None:
    with HostPool([ssh_host.spec()], tmp_path / "leases") as pool:
        lease = pool.lease()
        with RemoteHost.for_lease(lease) as remote:
            r = remote.run("ip -4 -o addr show dev eth0; echo to-stderr >&2; exit 7", timeout=20)
            # It ran in the namespace: the only address there is the one on its end of the veth.
            assert (r.status, r.stderr) == (7, "to-stderr\n")
            assert f"inet {ssh_host.address}/30" in r.stdout

            src = tmp_path / "src"
            (src / "sub").mkdir(parents=True)
            payload = bytes(range(256)) * 4096  # 1 MiB, every byte value
            (src / "blob.bin").write_bytes(payload)
            (src / "sub" / "run.sh").write_text("#!/bin/sh\necho ran\n")
            (src / "sub" / "run.sh").chmod(0o755)
            base = f"{lease.spec.run_dir}/t"
            remote.put(src / "blob.bin", f"{base}/one/blob.bin")
            remote.put(src, f"{base}/tree")
            assert remote.run(f"sha256sum {base}/one/blob.bin {base}/tree/blob.bin && {base}/tree/sub/run.sh",
                              timeout=20, check=True).stdout.splitlines()[2] == "ran"
            remote.get(f"{base}/one/blob.bin", tmp_path / "back.bin")
            remote.get(f"{base}/tree", tmp_path / "back")
            assert (tmp_path / "back.bin").read_bytes() == payload
            assert (tmp_path / "back" / "blob.bin").read_bytes() == payload
            assert (tmp_path / "back" / "sub" / "run.sh").stat().st_mode & 0o777 == 0o755
            with pytest.raises(RemoteError, match=rf"{ssh_host.address}:{ssh_host.port}: get {base}/nothing -> "
                                                  r".*: No such file"):
                remote.get(f"{base}/nothing", tmp_path / "nothing")
            with pytest.raises(RemoteError, match=r"put .* -> relative: the remote path must be absolute"):
                remote.put(src / "blob.bin", "relative")
            with pytest.raises(RemoteError, match=r"'false' exited with status 1"):
                remote.run("false", timeout=20, check=True)
            # A command past its deadline fails that call only: the host still answers, it is not bad.
            with pytest.raises(RemoteTimeout, match=r"'sleep 30' still running after 1.0 s"):
                remote.run("sleep 30", timeout=1)
            assert remote.run("echo still here", timeout=20).stdout == "still here\n"
            # Killed by a signal: sshd sends exit-signal, which paramiko does not read, so no status; the
            # connection stands, so that is not a lost host.
            killed = remote.run("echo before; kill -9 $$", timeout=20)
            assert (killed.status, killed.stdout) == (None, "before\n")
        assert not pool.bad


def test_wrong_or_missing_host_key_is_refused(ssh_host: SshHost, tmp_path: Path) -> None:
    other = " ".join(keygen(tmp_path / "other_host").split()[:2])
    wrong = tmp_path / "known_hosts.wrong"
    wrong.write_text(ssh_host.known_hosts_line(other))
    pool = HostPool([ssh_host.spec(known_hosts=wrong)], tmp_path / "leases")
    with pool.lease() as lease:
        with pytest.raises(RemoteHostKeyRejected, match=rf"root@{ssh_host.address}:{ssh_host.port}: host key "
                                                        rf"mismatch: .* {wrong} has SHA256:"):
            RemoteHost.for_lease(lease)
    assert "host key mismatch" in pool.bad[lease.spec.name]
    # A known_hosts without the host: refused, and nothing is added to it.
    empty = tmp_path / "known_hosts.empty"
    empty.write_text("")
    with pytest.raises(RemoteHostKeyRejected, match=rf"unknown host key: no entry for it in {empty}"):
        RemoteHost.connect(ssh_host.spec(known_hosts=empty))
    assert empty.read_text() == ""


def test_key_not_authorized_is_refused(ssh_host: SshHost, tmp_path: Path) -> None:
    keygen(tmp_path / "stranger")
    with pytest.raises(RemoteAuthFailed, match=rf"authentication as {ssh_host.user} with .*stranger failed"):
        RemoteHost.connect(ssh_host.spec(key_file=tmp_path / "stranger"))


def running_in(host: SshHost) -> list[str]:
    """The command names of the processes in the host's namespace (one may end while it is read)."""
    names = []
    for pid in host.ns.pids():
        try:
            names.append(Path(f"/proc/{pid}/comm").read_text().strip())
        except (FileNotFoundError, ProcessLookupError):
            pass
    return names


def test_host_dropping_mid_command_fails_that_call_and_is_marked_bad(ssh_host: SshHost, tmp_path: Path) -> None:
    pool = HostPool([ssh_host.spec()], tmp_path / "leases")
    lease = pool.lease()
    remote = RemoteHost.for_lease(lease)
    outcome: list[BaseException] = []

    def call() -> None:
        try:
            remote.run("echo started; exec sleep 60", timeout=40)
        except BaseException as exc:  # handed to the test's thread
            outcome.append(exc)

    worker = threading.Thread(target=call)
    worker.start()
    try:
        wait_for(lambda: "sleep" in running_in(ssh_host), timeout=20, what="the remote sleep")
        ssh_host.kill()
        worker.join(30)
        assert not worker.is_alive(), "run() did not return after the host dropped"
    finally:
        remote.close()
        worker.join(30)
        lease.release()
    assert len(outcome) == 1 and isinstance(outcome[0], RemoteConnectionLost), outcome
    # The echo's output may still be on its way when the sleep is seen, so "its output so far" is optional.
    assert re.fullmatch(rf"{re.escape(lease.spec.name)}: 'echo started; exec sleep 60' was cut off: "
                        r"connection lost(; its output so far: 'started\\n')?", str(outcome[0])), outcome[0]
    assert "connection lost" in pool.bad[lease.spec.name]
    with pytest.raises(PoolExhausted, match="no usable host in the pool .*connection lost"):
        pool.lease(timeout=5)
    # And the host is gone for a new connection too.
    with pytest.raises(RemoteUnreachable, match="cannot connect"):
        RemoteHost.connect(ssh_host.spec(), timeout=5)


def test_second_lease_of_a_one_guest_host_waits_then_is_refused(ssh_host: SshHost, tmp_path: Path) -> None:
    """The design: lease() waits up to its timeout for a slot, polling, then refuses naming the holder."""
    first = HostPool([ssh_host.spec(max_guests=1)], tmp_path / "leases")
    second = HostPool([ssh_host.spec(max_guests=1)], tmp_path / "leases", poll_interval=0.05)
    held = first.lease()
    with RemoteHost.for_lease(held) as remote:
        assert remote.run("true", timeout=20).status == 0
        with pytest.raises(PoolExhausted, match=rf"after 0.5 s: .* slot 0 by {Owner.current()}"):
            second.lease(timeout=0.5)
    timer = threading.Timer(0.5, held.release)
    timer.start()
    try:
        with second.lease(timeout=20) as lease, RemoteHost.for_lease(lease) as remote:
            assert remote.run("echo second", timeout=20).stdout == "second\n"
    finally:
        timer.cancel()
        first.close()


LEASER = """
import sys, time
from pathlib import Path
from xenpv.harness.hosts import HostPool, HostSpec
from xenpv.harness.remote import RemoteHost
spec = HostSpec(sys.argv[2], sys.argv[3], Path(sys.argv[4]), Path(sys.argv[5]), "/tmp", port=int(sys.argv[6]))
lease = HostPool([spec], Path(sys.argv[1])).lease()
remote = RemoteHost.for_lease(lease)
print(remote.run("echo busy", timeout=20).stdout, end="", flush=True)
time.sleep(60)
"""


def test_lease_of_a_dead_process_is_taken_over(ssh_host: SshHost, tmp_path: Path) -> None:
    spec = ssh_host.spec()
    leases = tmp_path / "leases"
    proc = subprocess.Popen([sys.executable, "-c", LEASER, str(leases), spec.host, spec.user, str(spec.key_file),
                             str(spec.known_hosts), str(spec.port)], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "busy\n"
        pool = HostPool([spec], leases)
        with pytest.raises(PoolExhausted, match=f"slot 0 by {Owner.of(proc.pid)}"):
            pool.lease()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    with pool.lease() as lease, RemoteHost.for_lease(lease) as remote:
        assert remote.run("echo mine", timeout=20).stdout == "mine\n"


# ---- --xenpv-hosts and the host_pool fixture, as a user meets them (an inner session) ------------------

INNER = '''
from xenpv.harness.remote import RemoteHost

def test_remote(host_pool):
    with host_pool.lease() as lease, RemoteHost.for_lease(lease) as remote:
        assert remote.run("echo inner", timeout=20).stdout == "inner\\n"
        assert lease.path.parent.name == "leases"
'''


def test_hosts_option_gives_the_fixture_its_pool(ssh_host: SshHost, pytester: pytest.Pytester, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    hosts = tmp_path / "hosts.yaml"
    hosts.write_text(f"- host: {ssh_host.address}\n  port: {ssh_host.port}\n  user: {ssh_host.user}\n"
                     f"  key_file: {ssh_host.client_key}\n  known_hosts: {ssh_host.known_hosts}\n"
                     f"  run_dir: /tmp/xenpv-remote\n")
    monkeypatch.setenv("XENPV_LEASE_DIR", str(tmp_path / "leases"))
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--xenpv-hosts={hosts}")
    result.assert_outcomes(passed=1)
    assert (tmp_path / "leases" / f"{ssh_host.address}_{ssh_host.port}.0.lease").read_text() == ""  # released


def test_hosts_option_checks_the_file_before_any_test(pytester: pytest.Pytester, tmp_path: Path) -> None:
    hosts = tmp_path / "hosts.yaml"
    hosts.write_text("- host: h\n  user: u\n  key_file: nokey\n  known_hosts: kh\n  run_dir: /r\n")
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--xenpv-hosts={hosts}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{hosts}: host 1 (h): key_file: {tmp_path}/nokey: no such file*"])


def test_without_hosts_option_the_fixture_skips(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*no --xenpv-hosts given*"])


def test_stalled_transfer_times_out_and_the_next_one_works(ssh_host: SshHost, tmp_path: Path) -> None:
    """SFTP requests have a deadline: with every process of the host stopped (SIGSTOP), a get fails with
    RemoteTimeout; once they run again, the next get (on a new SFTP session) works and the host is good."""
    pool = HostPool([ssh_host.spec()], tmp_path / "leases")
    (tmp_path / "f").write_text("payload\n")
    with pool.lease() as lease, RemoteHost.for_lease(lease) as remote:
        remote.put(tmp_path / "f", f"{lease.spec.run_dir}/f")
        stopped = ssh_host.ns.pids()
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        try:
            with pytest.raises(RemoteTimeout, match=rf"get {lease.spec.run_dir}/f -> .*: no answer within 1.0 s"):
                remote.get(f"{lease.spec.run_dir}/f", tmp_path / "back", timeout=1)
        finally:
            for pid in stopped:
                os.kill(pid, signal.SIGCONT)
        remote.get(f"{lease.spec.run_dir}/f", tmp_path / "back2")
        assert (tmp_path / "back2").read_text() == "payload\n"
    assert not pool.bad
