"""`xenpv bench net`'s timed run on a real netback: the frames it does not count still reach the guest's
stack, so a run longer than the namespace's neighbour timeout keeps its replies."""
from __future__ import annotations

import subprocess

import pytest

from xenpv.harness.bench.net import _echo_frame, _through_netback

from .test_netback import net_env  # noqa: F401  (the fixture: netback, a namespace and a domain)

pytestmark = pytest.mark.integration


def test_a_timed_run_answers_the_kernels_arp_request_and_keeps_its_replies(net_env) -> None:  # noqa: F811
    env = net_env()
    nf, ip = env.front()
    a = env.addrs[0]
    peer_mac = ip.resolve(a.peer.ip)
    assert ip.ping(a.peer.ip, 1)
    # What a stale neighbour entry comes to: the kernel must ask for the guest's MAC before it replies.
    subprocess.run(env.ns.exec_argv("ip", "neigh", "flush", "dev", a.tap), check=True)
    answered = ip.answered["arp"]
    frame = _echo_frame(64, ip.mac, peer_mac, a.guest.packed, a.peer.ip.packed)
    rate, frames = _through_netback(nf, frame, 0.5)
    assert ip.answered["arp"] > answered
    assert frames > 0
    assert nf.on_frame == ip._frame  # the guest's stack has its frames back after the run
