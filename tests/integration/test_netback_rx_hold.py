"""netback's data thread when the frontend stops taking frames: the frame with no rx buffer is held, then
dropped after RX_WAIT (counted), while the vif's tx keeps going: one thread serves both directions, so a
held frame must never block it."""
from __future__ import annotations

import socket

import pytest

from xenpv.backends.netback.vif import RX_WAIT
from xenpv.base.process import wait_for
from xenpv.xenabi import netif as N

from .test_netback import net_env  # noqa: F401  (the fixture: netback, a namespace and a domain)

pytestmark = pytest.mark.integration


def test_a_frontend_that_posts_no_rx_buffers_loses_frames_not_its_tx(net_env) -> None:  # noqa: F811
    env = net_env()
    nf, ip = env.front()
    a = env.addrs[0]
    ip.resolve(a.peer.ip)  # the kernel learns the guest's MAC from the request
    nf.stop_polling()
    with env.ns.entered():
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        # More datagrams than the ring has buffers: the rest wait in netback (one held) and the TAP.
        for i in range(N.NET_RX_RING_SIZE + 64):  # 64 holds of RX_WAIT: longer than the tx wait below
            sock.sendto(b"x%d" % i, (str(a.guest), 9))
        wait_for(lambda: env.stats()["rx_drops"] >= 1, timeout=10 * RX_WAIT + 5, what="a held frame dropped")
    before = env.stats()["tx_frames"]
    for i in range(5):  # the guest keeps sending while its rx is stuck
        ip.send_udp(a.peer.ip, 40000, 9, b"still here %d" % i)
    wait_for(lambda: env.stats()["tx_frames"] >= before + 5, timeout=5, what="tx while rx is held")
    env.netback.check_alive()
