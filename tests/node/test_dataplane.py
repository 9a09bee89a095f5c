"""The data plane in memory: two nodes with real tunnel engines, TUN/UDP twins, a fake clock."""

from __future__ import annotations

import ipaddress
import logging
import os
import struct

import pytest
from scapy.layers.inet import ICMP, IP, TCP

from flatnet.firewall import FirewallConfig, FirewallRuleConfig
from flatnet.node import packet as P
from flatnet.proto import batch as B
from flatnet.testing.udp_twin import UdpNetwork

from .harness import A_IP, B_IP, Pair, finished_packets, frame, icmp_echo, tcp, tso_frame, udp


def test_ping_crosses_after_on_demand_handshake():
    pair = Pair()
    ping = icmp_echo(A_IP, B_IP)
    pair.a.tun.inject(frame(ping))
    pair.run()
    assert finished_packets(pair.b.tun.written) == [ping]
    reply = icmp_echo(B_IP, A_IP)
    pair.b.tun.inject(frame(reply))
    pair.run()
    assert finished_packets(pair.a.tun.written) == [reply]
    status = pair.a.dataplane.status(pair.now)
    assert status["peers"][B_IP]["rx_packets"] == 1


@pytest.mark.parametrize("gro", [False, True])
def test_superpacket_is_cut_at_the_cap_and_merged_back_into_one_write(gro):
    pair = Pair(network=UdpNetwork(gro=gro), max_cap=4, adaptive=False)
    pair.establish()
    mss = 1380
    payload = os.urandom(mss * 10 + 500)  # 11 segments: 3 messages of <= 4 segments
    sent_before = pair.network.sent_datagrams
    pair.a.tun.inject(tso_frame(tcp(A_IP, B_IP, 40000, 80, 1000, payload, flags=0x18, partial=True), mss))
    pair.run()
    assert pair.a.dataplane.status(pair.now)["peers"][B_IP]["tx_messages"] == 3  # the ping went as DATA
    assert pair.network.sent_datagrams - sent_before >= 3
    assert len(pair.b.tun.written) == 1  # merged: one TUN write for the whole super-packet
    segments = finished_packets(pair.b.tun.written)
    assert b"".join(bytes(IP(s)[TCP].payload) for s in segments) == payload
    for s in segments:
        parsed = IP(s)
        want = parsed[TCP].chksum
        del parsed[TCP].chksum
        assert IP(bytes(parsed))[TCP].chksum == want  # the checksum the kernel completes is right
    assert IP(segments[-1])[TCP].flags == "PA" and all(IP(s)[TCP].flags == "A" for s in segments[:-1])
    assert len(pair.b.dataplane.reassembly) == 0 and not pair.b.dataplane.reassembly.drops
    assert pair.b.dataplane.stats["gro_trains_joined"] == (3 if gro else 0)
    assert pair.b.dataplane.stats["fragment_trains_in_order"] == (0 if gro else 3)  # one datagram per read


def test_small_packets_share_one_message():
    pair = Pair()
    pair.establish()
    before = pair.a.dataplane.status(pair.now)["peers"][B_IP]["tx_messages"]
    acks = [tcp(A_IP, B_IP, 40000, 80, 1, b"", ack=1000 + i) for i in range(20)]
    for ack in acks:
        pair.a.tun.inject(frame(ack))
    pair.run()
    assert pair.a.dataplane.status(pair.now)["peers"][B_IP]["tx_messages"] == before + 1
    assert finished_packets(pair.b.tun.written) == acks


def test_lost_fragment_loses_its_message_and_the_partial_expires():
    dropped = []

    def impair(datagram, src, dst):
        if datagram[0] == B.FRAGMENT_TYPE and datagram[1] == 2 and not dropped:
            dropped.append(datagram)
            return []
        return [datagram]

    pair = Pair(network=UdpNetwork(impair), adaptive=False)
    pair.establish()
    pair.a.tun.inject(tso_frame(tcp(A_IP, B_IP, 40000, 80, 1, os.urandom(1380 * 8), partial=True), 1380))
    pair.run()
    assert dropped and pair.b.tun.written == []
    pair.advance(5.0)
    assert pair.b.dataplane.status(pair.now)["drops"]["reassembly_timeout"] == 1


def test_spoofed_inner_source_is_dropped_and_counted():
    pair = Pair()
    pair.establish()
    session = pair.a.engine.session_for(ipaddress.ip_address(B_IP), pair.now)
    spoofed = udp("10.87.3.7", B_IP, 5000, 53, b"not yours")  # outside A's certificate
    honest = udp(A_IP, B_IP, 5000, 53, b"yours")
    payload = B.encode_record(spoofed) + B.encode_record(honest)
    pair.b.io.udp.inbox.append((bytes(session.seal(payload, 5, pair.now)), pair.a.io.udp.addr, 0))
    pair.run()
    assert finished_packets(pair.b.tun.written) == [honest]
    assert pair.b.dataplane.status(pair.now)["drops"]["rx_spoofed_source"] == 1


def test_sender_refuses_foreign_sources_and_unroutable_destinations():
    pair = Pair()
    pair.a.tun.inject(frame(udp("10.87.2.9", B_IP, 1, 2, b"x")))  # not A's to send from
    pair.run()
    assert pair.a.dataplane.drops["tun_source_not_local"] == 1
    pair.a.tun.inject(frame(udp(A_IP, "10.87.200.1", 1, 2, b"x")))  # nobody owns it
    pair.run()
    assert pair.a.engine.drops["no-route"] == 1


def test_packet_for_another_host_is_not_delivered():
    pair = Pair()
    pair.establish()
    session = pair.a.engine.session_for(ipaddress.ip_address(B_IP), pair.now)
    elsewhere = udp(A_IP, "10.87.1.20", 1, 2, b"loop")  # A's own subnet: B must not forward it
    pair.b.io.udp.inbox.append((bytes(session.seal(B.encode_record(elsewhere), 5, pair.now)), pair.a.io.udp.addr, 0))
    pair.run()
    assert pair.b.tun.written == []
    assert pair.b.dataplane.drops["rx_not_for_us"] == 1


def test_too_big_with_df_gets_icmp_fragmentation_needed():
    pair = Pair(overlay_mtu=1200)
    big = udp(A_IP, B_IP, 5000, 6000, os.urandom(1300))
    pair.a.tun.inject(frame(big))
    pair.run()
    assert pair.a.dataplane.drops["too_big"] == 1
    [reply] = finished_packets(pair.a.tun.written)
    icmp = IP(reply)
    assert icmp.src == A_IP and icmp.dst == A_IP
    assert icmp[ICMP].type == 3 and icmp[ICMP].code == 4 and icmp[ICMP].nexthopmtu == 1200
    want = icmp[ICMP].chksum
    del icmp[ICMP].chksum
    assert IP(bytes(icmp))[ICMP].chksum == want
    assert bytes(icmp[ICMP].payload)[:28] == big[:28]  # quotes the IP header and 8 bytes


def test_too_big_without_df_is_carried_in_fragments():
    pair = Pair(overlay_mtu=1200)
    pair.establish()
    big = bytearray(udp(A_IP, B_IP, 5000, 6000, os.urandom(1300)))
    struct.pack_into("!H", big, 6, 0)  # clear DF
    struct.pack_into("!H", big, 10, 0)
    struct.pack_into("!H", big, 10, P.internet_checksum(big[:20]))
    pair.a.tun.inject(frame(bytes(big)))
    pair.run()
    assert finished_packets(pair.b.tun.written) == [bytes(big)]


def test_icmp_too_big_is_never_sent_for_an_icmp_error():
    error = P.icmp_too_big(udp(A_IP, B_IP, 1, 2, b"x" * 100), 1000, ipaddress.ip_address(A_IP).packed)
    assert P.icmp_too_big(error, 500, ipaddress.ip_address(A_IP).packed) is None


def test_firewall_blocks_then_conntrack_lets_replies_back():
    only_web = FirewallConfig(inbound=[FirewallRuleConfig(proto="tcp", port="80")])
    pair = Pair(firewall_b=only_web)
    pair.a.tun.inject(frame(udp(A_IP, B_IP, 5000, 53, b"dns?")))
    pair.run()
    assert pair.b.tun.written == [] and pair.b.dataplane.drops["firewall_inbound"] == 1
    syn = tcp(A_IP, B_IP, 40000, 80, 1, b"", flags=0x02)
    pair.a.tun.inject(frame(syn))
    pair.run()
    assert finished_packets(pair.b.tun.written) == [syn]
    synack = tcp(B_IP, A_IP, 80, 40000, 1, b"", flags=0x12)
    pair.b.tun.inject(frame(synack))
    pair.run()
    assert finished_packets(pair.a.tun.written) == [synack]


def test_without_parity_a_retransmission_halves_the_cap_and_clean_traffic_grows_it_back():
    pair = Pair(max_cap=16, parity="never")
    pair.establish()
    mss = 1380
    pair.a.tun.inject(tso_frame(tcp(A_IP, B_IP, 40000, 80, 1, os.urandom(mss * 16), partial=True), mss))
    for i in range(8):  # past the decrease cooldown
        pair.a.tun.inject(frame(tcp(A_IP, B_IP, 40000, 80, 1 + mss * (16 + i), os.urandom(mss))))
    pair.run()
    pair.a.tun.inject(frame(tcp(A_IP, B_IP, 40000, 80, 1, os.urandom(mss))))  # seq behind: resent
    pair.run()
    path = pair.a.dataplane.paths[ipaddress.ip_address(B_IP)]
    assert path.retransmissions_seen == 1 and path.cap == 8
    seq = 1 + mss * 24
    for _ in range(40):
        pair.a.tun.inject(frame(tcp(A_IP, B_IP, 40000, 80, seq, os.urandom(mss))))
        seq += mss
        pair.run()
    assert path.cap == 9


def test_a_large_transfer_arrives_intact_with_loss_and_tampering():
    rng = __import__("random").Random(7)

    def impair(datagram, src, dst):
        if rng.random() < 0.02:
            return []
        if rng.random() < 0.02:
            tampered = bytearray(datagram)
            tampered[rng.randrange(len(tampered))] ^= 0x40
            return [bytes(tampered)]
        return [datagram]

    pair = Pair(network=UdpNetwork(impair), max_cap=8)
    pair.establish()
    mss = 1380
    data = os.urandom(mss * 200)
    received = {}
    for start in range(0, len(data), mss * 20):
        chunk = data[start : start + mss * 20]
        pair.a.tun.inject(tso_frame(tcp(A_IP, B_IP, 40000, 80, 1 + start, chunk, partial=True), mss))
        pair.run()
    for seg in finished_packets(pair.b.tun.written):
        parsed = IP(seg)
        received[parsed[TCP].seq - 1] = bytes(parsed[TCP].payload)
    # What arrived is exactly what was sent at those offsets: nothing corrupted got through.
    for offset, chunk in received.items():
        assert data[offset : offset + len(chunk)] == chunk
    assert len(received) > 0 and sum(map(len, received.values())) > len(data) // 2
    assert pair.b.dataplane.status(pair.now)["drops"].get("tunnel.decrypt-failed", 0) > 0  # tampering was seen


def test_parity_rebuilds_a_message_that_lost_one_fragment():
    dropped = []

    def impair(datagram, src, dst):
        if datagram[0] == B.FRAGMENT_TYPE and datagram[1] == 2 and not dropped:
            dropped.append(datagram)
            return []
        return [datagram]

    pair = Pair(network=UdpNetwork(impair), adaptive=False, parity="always")
    pair.establish()
    payload = os.urandom(1380 * 8)
    pair.a.tun.inject(tso_frame(tcp(A_IP, B_IP, 40000, 80, 1, payload, partial=True), 1380))
    pair.run()
    assert dropped
    assert b"".join(bytes(IP(s)[TCP].payload) for s in finished_packets(pair.b.tun.written)) == payload
    assert pair.b.dataplane.status(pair.now)["stats"]["messages_rebuilt_from_parity"] == 1


def test_parity_turns_on_when_loss_is_seen():
    pair = Pair()
    pair.establish()
    mss = 1380
    path_status = lambda: pair.a.dataplane.status(pair.now)["peers"][B_IP]["parity"]  # noqa: E731
    pair.a.tun.inject(tso_frame(tcp(A_IP, B_IP, 40000, 80, 1, os.urandom(mss * 4), partial=True), mss))
    pair.run()
    assert not path_status() and "parity_sent" not in pair.a.dataplane.stats
    pair.a.tun.inject(frame(tcp(A_IP, B_IP, 40000, 80, 1, os.urandom(mss))))  # a retransmission
    pair.a.tun.inject(tso_frame(tcp(A_IP, B_IP, 40000, 80, 1 + mss * 4, os.urandom(mss * 4), partial=True), mss))
    pair.run()
    assert path_status() and pair.a.dataplane.stats["parity_sent"] == 1
    assert pair.a.dataplane.paths[ipaddress.ip_address(B_IP)].cap == 16  # parity first, not smaller messages
    pair.now += 11.0
    assert not path_status()


def test_big_segments_are_cut_to_what_one_message_can_carry():
    # Small datagrams (600 bytes) and jumbo segments: 7 segments would need 107 fragments, more than
    # a message may have (64), so the super-packet is cut at 4 segments whatever the cap.
    pair = Pair(overlay_mtu=9000, budget=600, max_cap=16, adaptive=False)
    pair.establish()
    mss = 8948
    payload = os.urandom(mss * 7)
    pair.a.tun.inject(tso_frame(tcp(A_IP, B_IP, 40000, 80, 1, payload, partial=True), mss))
    pair.run()
    segments = finished_packets(pair.b.tun.written)
    assert b"".join(bytes(IP(s)[TCP].payload) for s in segments) == payload
    assert pair.a.dataplane.status(pair.now)["peers"][B_IP]["tx_messages"] == 2


def test_a_lone_ping_leaves_before_the_read_that_would_block_and_acks_still_gather():
    pair = Pair()
    pair.establish()
    before = pair.a.dataplane.status(pair.now)["peers"][B_IP]["tx_messages"]
    acks = [tcp(A_IP, B_IP, 40000, 80, 1, b"", ack=1000 + i) for i in range(3)]
    ping = icmp_echo(A_IP, B_IP, seq=9)
    for pkt in (ping, *acks):
        pair.a.tun.inject(frame(pkt))
    assert pair.a.io.read_tun(pair.now) == 4
    assert len(pair.b.io.udp.inbox) == 1  # the ping, sent as soon as it was read
    pair.b.io.read_udp(pair.now)
    assert finished_packets(pair.b.tun.written) == [ping]  # written before B's read would block
    pair.a.io.emit()
    pair.run()
    assert finished_packets(pair.b.tun.written) == [ping, *acks]  # the ACKs: one message
    assert pair.a.dataplane.status(pair.now)["peers"][B_IP]["tx_messages"] == before + 2  # the ping; the ACKs


def test_a_burst_that_starts_with_a_pure_ack_is_sent_together():
    pair = Pair()
    pair.establish()
    before = pair.a.dataplane.status(pair.now)["peers"][B_IP]["tx_messages"]
    ack = tcp(A_IP, B_IP, 40000, 80, 1, b"", ack=1000)
    ping = icmp_echo(A_IP, B_IP, seq=9)
    pair.a.tun.inject(frame(ack))
    pair.a.tun.inject(frame(ping))
    pair.a.io.read_tun(pair.now)
    assert not pair.b.io.udp.inbox
    pair.a.io.emit()
    pair.run()
    assert finished_packets(pair.b.tun.written) == [ack, ping]
    assert pair.a.dataplane.status(pair.now)["peers"][B_IP]["tx_messages"] == before + 1


@pytest.mark.parametrize("disorder", ["swap", "duplicate", "lose_last_with_parity", "interleave"])
def test_fragments_off_the_in_order_path_still_make_their_message(disorder):
    held = []

    def impair(datagram, src, dst):
        if datagram[0] != B.FRAGMENT_TYPE or dst != pair.b.io.udp.addr:
            return [datagram]
        index, count, flags = datagram[1], datagram[2], datagram[3]
        if disorder == "swap":
            if index == 1 and not flags and not held:
                held.append(datagram)
                return []
            if index == 2 and held:
                return [datagram, held.pop()]
        elif disorder == "duplicate" and index == 1:
            return [datagram, datagram]
        elif disorder == "lose_last_with_parity" and index == count - 1 and not flags and not held:
            held.append(datagram)
            return []
        elif disorder == "interleave":
            held.append(datagram)  # all of them, handed over mixed below
            return []
        return [datagram]

    pair = Pair(network=UdpNetwork(impair), max_cap=4, adaptive=False, parity="always")
    pair.establish()
    mss = 1380
    payload = os.urandom(mss * 8)  # two messages of 4 segments
    pair.a.tun.inject(tso_frame(tcp(A_IP, B_IP, 40000, 80, 1000, payload, partial=True), mss))
    pump_a_only = pair.a.io
    pump_a_only.read_tun(pair.now)
    pump_a_only.emit()
    if disorder == "interleave":
        first = [d for d in held if d[4:8] == held[0][4:8]]
        second = [d for d in held if d[4:8] != held[0][4:8]]
        for pair_of in zip(first, second, strict=True):
            for d in pair_of:
                pair.b.io.udp.inbox.append((d, pair.a.io.udp.addr, 0))
    pair.run()
    segments = sorted((IP(s) for s in finished_packets(pair.b.tun.written)), key=lambda p: p[TCP].seq)
    assert b"".join(bytes(p[TCP].payload) for p in segments) == payload  # a rebuilt message may come late
    assert len(pair.b.dataplane.reassembly) == 0


def test_ended_tcp_connections_leave_conntrack_and_the_retransmission_watch_soon():
    # The lab soak's node RSS slope: every gateway request is a new TCP connection, and without the
    # data plane passing TCP flags to the firewall each one stayed tracked for tcp_timeout (12 min).
    pair = Pair()
    pair.establish()
    for n in range(30):  # one short connection every 10 s for 5 minutes, as the gateway makes them
        port = 40000 + n
        for src, dst, sport, dport, flags, data in [
            (A_IP, B_IP, port, 80, 0x02, b""), (B_IP, A_IP, 80, port, 0x12, b""),
            (A_IP, B_IP, port, 80, 0x18, b"GET / HTTP/1.0\r\n\r\n"), (B_IP, A_IP, 80, port, 0x18, b"HTTP/1.0 200 OK\r\n\r\n"),
            (A_IP, B_IP, port, 80, 0x11, b""), (B_IP, A_IP, 80, port, 0x11, b""), (A_IP, B_IP, port, 80, 0x10, b""),
        ]:
            side = pair.a if src == A_IP else pair.b
            side.tun.inject(frame(tcp(src, dst, sport, dport, 1000, data, flags=flags)))
            pair.run()
        pair.advance(10.0)
    for side in (pair.a, pair.b):
        fw = side.dataplane.firewall.status()
        # closing flows live tcp_closing_timeout (120 s): ~12 connections, not all 30
        assert fw["tracked_flows"] <= 14, fw
        assert all(len(path.flows) == 0 for path in side.dataplane.paths.values())


def test_rekeys_and_roams_are_logged_as_events(caplog):
    """Two minutes of pings: the rekey is logged as session.rekeyed; a peer heard from a new address
    as peer.roamed (with old and new); both counted in the engine's stats for the metrics."""
    pair = Pair()
    pair.establish()
    caplog.set_level(logging.INFO, logger="flatnet.node.dataplane")
    for seq in range(130):
        pair.a.tun.inject(frame(icmp_echo(A_IP, B_IP, seq=seq)))
        pair.advance(1.0)
    rekeyed = [r for r in caplog.records if getattr(r, "event", None) == "session.rekeyed"]
    assert rekeyed and pair.a.engine.stats["rekeyed"] >= 1
    # Host a's underlay address changes (WSL2 restarted): b follows its authenticated traffic.
    new_addr = ("192.168.87.11", 4242)
    pair.a.io.udp = pair.network.endpoint(new_addr)
    pair.a.tun.inject(frame(icmp_echo(A_IP, B_IP, seq=999)))
    pair.run()
    roamed = [r for r in caplog.records if getattr(r, "event", None) == "peer.roamed"]
    assert len(roamed) == 1 and pair.b.engine.stats["roamed"] == 1
    assert roamed[0].new == "192.168.87.11:4242" and roamed[0].old == "192.168.87.1:4242"
