"""XENVIF/XENNET pieces without a machine: VIF tables and versions, header slots, PDO IDs, TCP."""
from __future__ import annotations

import dpkt
import pytest

from xenpv.stack.drivers.interface import INTERFACE_HEADER_SIZE, POINTER_SIZE
from xenpv.stack.drivers.revision import XENVIF_REVISIONS
from xenpv.stack.drivers.xennet.tcp import ACK, FIN, SYN, TcpConnection, TcpState, seq_lt
from xenpv.stack.drivers.xenvif.frontend import Frontend, format_mac, header_length, parse_mac
from xenpv.stack.drivers.xenvif.pdo import pdo_hardware_ids
from xenpv.stack.drivers.xenvif.vif import (GUID_XENVIF_VIF_INTERFACE, ReceiverQueueParameters, VifInterface,
                                      XenvifCallbackType, XenvifPacketChecksumFlags)
from xenpv.stack.kernel.status import STATUS_BUFFER_OVERFLOW, STATUS_NOT_SUPPORTED, STATUS_SUCCESS


def _vif() -> VifInterface:
    return Frontend(0, None).vif  # type: ignore[arg-type]  # the tables need no XENBUS interfaces


def test_vif_guid_versions_and_26_members() -> None:
    vif = _vif()
    assert str(GUID_XENVIF_VIF_INTERFACE).upper() == "76F279CD-CA11-418B-92E8-C57F77DE0E2E"
    assert list(vif.versions()) == [8, 9, 10]
    for version in (8, 9, 10):
        layout = vif.TABLES[version]
        assert len(layout.members) == 26
        assert layout.size == INTERFACE_HEADER_SIZE + 26 * POINTER_SIZE
        status, table = vif.get_interface(version, 4096)
        assert status == STATUS_SUCCESS and table.Version == version
        assert callable(table.VifTransmitterQueuePacket) and callable(table.VifMacQueryPermanentAddress)
        assert vif.get_interface(version, layout.size - 1)[0] == STATUS_BUFFER_OVERFLOW
    assert vif.get_interface(7, 4096)[0] == STATUS_NOT_SUPPORTED
    assert vif.get_interface(11, 4096)[0] == STATUS_NOT_SUPPORTED


@pytest.mark.parametrize("version", [8, 9, 10])
def test_callback_form_per_version(version: int) -> None:
    vif = _vif()
    vif.get_interface(version, 4096)
    calls = []
    vif.callback, vif.argument = (lambda *a: calls.append(a)), "arg"
    params = ReceiverQueueParameters(0, b"x" * 60, XenvifPacketChecksumFlags(), 0, 0, False, "cookie")
    vif.receiver_queue(params)
    if version == 8:
        assert calls[0][:3] == ("arg", XenvifCallbackType.XENVIF_RECEIVER_QUEUE_PACKET, 0)
    else:
        assert calls[0] == ("arg", XenvifCallbackType.XENVIF_RECEIVER_QUEUE_PACKET, params)
    params.Pause = True
    assert vif.receiver_queue(params) is (version < 10)


def test_net_pdo_hardware_ids_cover_every_xenvif_revision() -> None:
    ids = pdo_hardware_ids("XP0001")
    # XV pdo.c PdoQueryId: every revision newest first, then XENDEVICE.
    assert ids == [f"XENVIF\\VEN_XP0001&DEV_NET&REV_{r:08X}" for r in sorted(XENVIF_REVISIONS, reverse=True)] \
        + ["XENDEVICE"]


def test_mac_round_trip() -> None:
    assert parse_mac("00:16:3e:00:00:01") == bytes([0, 0x16, 0x3E, 0, 0, 1])
    assert format_mac(parse_mac("00:16:3E:0A:0b:FF")) == "00:16:3e:0a:0b:ff"
    with pytest.raises(ValueError):
        parse_mac("00:16:3e")


def _frame(l4: dpkt.Packet, proto: int, **ip) -> bytes:
    packet = dpkt.ip.IP(src=b"\x0a\0\0\x02", dst=b"\x0a\0\0\x01", p=proto, data=l4, **ip)
    return bytes(dpkt.ethernet.Ethernet(dst=b"\xff" * 6, src=b"\x02" * 6, type=dpkt.ethernet.ETH_TYPE_IP, data=packet))


def test_header_slot_lengths() -> None:
    assert header_length(_frame(dpkt.udp.UDP(sport=1, dport=2, data=b"x" * 100), dpkt.ip.IP_PROTO_UDP)) == 14 + 20 + 8
    tcp = dpkt.tcp.TCP(sport=1, dport=2, data=b"y" * 500)
    tcp.opts, tcp.off = b"\x02\x04\x05\xb4", 6
    assert header_length(_frame(tcp, dpkt.ip.IP_PROTO_TCP)) == 14 + 20 + 24
    arp = bytes(dpkt.ethernet.Ethernet(type=dpkt.ethernet.ETH_TYPE_ARP, data=dpkt.arp.ARP()))
    assert header_length(arp) == 14
    assert header_length(b"\0" * 10) == 10


def _connection():
    sent: list[dpkt.tcp.TCP] = []
    return TcpConnection(40000, 80, 1000, sent.append, mss=1000), sent


def test_tcp_handshake_data_and_fin() -> None:
    c, sent = _connection()
    c.open()
    assert c.state == TcpState.SYN_SENT and sent[0].flags == SYN and sent[0].seq == 1000
    c.input(dpkt.tcp.TCP(sport=80, dport=40000, seq=5000, ack=1001, flags=SYN | ACK, win=3000,
                         opts=b"\x02\x04\x02\x00", off=6))
    assert c.state == TcpState.ESTABLISHED and c.mss == 512 and sent[-1].flags == ACK and sent[-1].ack == 5001
    assert c.send(b"z" * 5000) == 3000  # the peer's window
    assert [len(s.data) for s in sent[2:]] == [512] * 5 + [440]
    c.input(dpkt.tcp.TCP(sport=80, dport=40000, seq=5001, ack=1001 + 3000, flags=ACK, win=3000))
    assert not c.unacked and c.send_window() == 3000
    # Out of order data waits for the gap to fill; then both are delivered in order.
    c.input(dpkt.tcp.TCP(sport=80, dport=40000, seq=5004, ack=4001, flags=ACK, win=3000, data=b"def"))
    assert c.received == b"" and c.ack_pending
    c.input(dpkt.tcp.TCP(sport=80, dport=40000, seq=5001, ack=4001, flags=ACK, win=3000, data=b"abc"))
    assert c.received == b"abcdef" and c.rcv_nxt == 5007
    c.input(dpkt.tcp.TCP(sport=80, dport=40000, seq=5007, ack=4001, flags=FIN | ACK, win=3000))
    assert c.peer_fin and c.state == TcpState.CLOSE_WAIT and sent[-1].ack == 5008
    c.close()
    assert c.state == TcpState.LAST_ACK and sent[-1].flags & FIN
    c.input(dpkt.tcp.TCP(sport=80, dport=40000, seq=5008, ack=4002, flags=ACK, win=3000))
    assert c.state == TcpState.CLOSED


def test_tcp_retransmits_unacknowledged_data(monkeypatch) -> None:
    import xenpv.stack.drivers.xennet.tcp as tcp_module
    c, sent = _connection()
    c.open()
    c.input(dpkt.tcp.TCP(sport=80, dport=40000, seq=1, ack=1001, flags=SYN | ACK, win=10000))
    c.send(b"q" * 1500)
    count = len(sent)
    now = tcp_module.time.monotonic()
    monkeypatch.setattr(tcp_module.time, "monotonic", lambda: now + 1.0)
    c.tick()
    assert [s.seq for s in sent[count:]] == [1001, 2001] and c.retransmits == 1
    assert seq_lt(0xFFFFFFF0, 5) and not seq_lt(5, 0xFFFFFFF0)
