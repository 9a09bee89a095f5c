"""The express paths (a lone small ICMP/UDP packet sealed or delivered with a fraction of the full
path's calls): same packets out, same checks, and the full path whenever the cache does not hold."""

from __future__ import annotations

import ipaddress
import os

from flatnet.firewall import FirewallConfig, FirewallRuleConfig, identity_of
from flatnet.proto import batch as B

from .harness import A_IP, B_IP, Pair, finished_packets, frame, icmp_echo, tcp, udp


def ping_round(pair: Pair, seq: int) -> tuple[bytes, bytes]:
    ping, reply = icmp_echo(A_IP, B_IP, seq=seq), icmp_echo(B_IP, A_IP, seq=seq)
    pair.a.tun.inject(frame(ping))
    pair.run()
    pair.b.tun.inject(frame(reply))
    pair.run()
    return ping, reply


def test_pings_after_the_first_take_the_express_path_both_ways_and_arrive_unchanged():
    pair = Pair()
    pair.establish()
    sent = [ping_round(pair, seq) for seq in range(1, 5)]
    assert finished_packets(pair.b.tun.written) == [ping for ping, _ in sent]
    assert finished_packets(pair.a.tun.written) == [reply for _, reply in sent]
    # The first of each direction went the full way and filled the caches; the others took the express.
    assert pair.a.dataplane.stats["express_out"] >= 3 and pair.b.dataplane.stats["express_out"] >= 3
    assert pair.a.dataplane.stats["express_in"] >= 3 and pair.b.dataplane.stats["express_in"] >= 3
    peer = pair.b.dataplane.status(pair.now)["peers"][A_IP]
    assert (peer["rx_packets"], peer["tx_packets"]) == (5, 4)  # establish's ping too; express counts as full


def test_udp_takes_the_express_path_tcp_does_not():
    pair = Pair()
    pair.establish()
    queries = [udp(A_IP, B_IP, 5353, 53, b"query %d" % i) for i in range(3)]
    for query in queries:
        pair.a.tun.inject(frame(query))
        pair.run()
    assert finished_packets(pair.b.tun.written) == queries
    # The caches hold address pairs: at B the handshake's ping already filled A_IP -> B_IP.
    assert pair.a.dataplane.stats["express_out"] == 2 and pair.b.dataplane.stats["express_in"] == 3
    pair.b.tun.written.clear()
    segments = [tcp(A_IP, B_IP, 40000, 80, 1 + 10 * i, b"0123456789", flags=0x18) for i in range(3)]
    for segment in segments:
        pair.a.tun.inject(frame(segment))
        pair.run()
    assert finished_packets(pair.b.tun.written) == segments
    assert pair.a.dataplane.stats["express_out"] == 2  # TCP keeps the full path (loss watch, merging)


def test_the_firewall_still_judges_every_express_packet():
    pair = Pair()
    pair.establish()
    ping_round(pair, 1)
    ping_round(pair, 2)
    assert pair.b.dataplane.stats["express_in"] >= 1
    only_web = FirewallConfig(inbound=[FirewallRuleConfig(proto="tcp", port="80")])
    pair.b.dataplane.firewall.replace_rules(only_web, lambda remote: identity_of(pair.b.engine.route(remote)))
    pair.b.tun.written.clear()
    before = pair.b.dataplane.stats["express_in"]
    pair.a.tun.inject(frame(icmp_echo(A_IP, B_IP, seq=3)))
    pair.run()
    assert pair.b.tun.written == []
    assert pair.b.dataplane.drops["firewall_inbound"] == 1
    assert pair.b.dataplane.stats["express_in"] == before  # judged on the express path, not delivered
    only_web_out = FirewallConfig(outbound=[FirewallRuleConfig(proto="tcp", port="80")])
    pair.a.dataplane.firewall.replace_rules(only_web_out, lambda remote: identity_of(pair.a.engine.route(remote)))
    sent = pair.a.dataplane.status(pair.now)["peers"][B_IP]["tx_messages"]
    pair.a.tun.inject(frame(icmp_echo(A_IP, B_IP, seq=4)))
    pair.run()
    assert pair.a.dataplane.drops["firewall_outbound"] == 1
    assert pair.a.dataplane.status(pair.now)["peers"][B_IP]["tx_messages"] == sent


def test_a_spoofed_source_never_takes_the_express_path():
    pair = Pair()
    pair.establish()
    honest = udp(A_IP, B_IP, 5000, 53, b"yours")
    session = pair.a.engine.session_for(ipaddress.ip_address(B_IP), pair.now)
    for _ in range(2):  # the handshake's ping filled B's cache for A_IP -> B_IP: both take the express path
        pair.b.io.udp.inbox.append((bytes(session.seal(B.encode_record(honest), 5, pair.now)), pair.a.io.udp.addr, 0))
        pair.run()
    assert pair.b.dataplane.stats["express_in"] == 2
    spoofed = udp("10.87.3.7", B_IP, 5000, 53, b"not yours")  # outside A's certificate
    pair.b.io.udp.inbox.append((bytes(session.seal(B.encode_record(spoofed), 5, pair.now)), pair.a.io.udp.addr, 0))
    pair.run()
    assert finished_packets(pair.b.tun.written) == [honest, honest]
    assert pair.b.dataplane.drops["rx_spoofed_source"] == 1
    assert pair.b.dataplane.stats["express_in"] == 2


def test_a_route_change_or_a_new_session_sends_the_next_packet_the_full_way():
    pair = Pair()
    pair.establish()
    ping_round(pair, 1)
    dp = pair.a.dataplane
    ping = frame(icmp_echo(A_IP, B_IP, seq=2))
    assert dp.express_out(ping, pair.now)  # cached
    pair.a.engine._rebuild_routes()  # what a learned certificate or a reload does
    assert dp.express_out(ping, pair.now) is None
    pair.a.tun.inject(ping)
    pair.run()  # the full path refills the cache
    assert dp.express_out(ping, pair.now)
    peer = pair.a.engine.route(ipaddress.ip_address(B_IP).packed)
    peer.current = None  # the session is gone (expired, peer removed): never sealed with a stale one
    assert dp.express_out(ping, pair.now) is None


def test_after_a_quiet_spell_a_lone_packet_skips_the_read_that_would_block():
    pair = Pair()
    pair.establish()
    ping_round(pair, 1)
    io = pair.a.io
    pings = [icmp_echo(A_IP, B_IP, seq=s) for s in (2, 3)]
    for ping in pings:
        pair.a.tun.inject(frame(ping))
    later = pair.now + 1.0
    assert io.read_tun(later) == 1  # the express ping, and back to the loop (level-triggered readiness)
    assert len(pair.b.io.udp.inbox) == 1
    assert io.read_tun(later) == 1  # straight after: a burst, so it drains until the read would block
    assert io.read_tun(later) == 0
    pair.run()
    assert finished_packets(pair.b.tun.written)[-2:] == pings


async def test_datagrams_read_ahead_by_a_batched_receive_are_not_stranded_by_an_early_return():
    """A quiet spell's lone message returns early; a batched receive may already hold more: the
    service comes straight back for them (readiness does not show them), with no new traffic."""
    import asyncio
    import socket

    from flatnet.node.service import DataplaneIO, DataplaneService
    from flatnet.node.udp import RECV_BATCH, DatagramEndpoint

    pair = Pair()
    pair.establish()
    session = pair.a.engine.session_for(ipaddress.ip_address(B_IP), pair.now)
    quiet_r, quiet_w = os.pipe()  # the TUN twin's "fd" for the loop: never readable
    pair.b.tun.fileno = lambda: quiet_r
    endpoint = DatagramEndpoint("127.0.0.1", 0, recv_batch=RECV_BATCH)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.bind(("127.0.0.1", 0))
    service = None
    try:
        queries = [udp(A_IP, B_IP, 5000, 53, b"query %d" % i) for i in range(5)]
        for query in queries:  # all waiting before the loop first looks
            sender.sendto(session.seal(B.encode_record(query), 5, pair.now), endpoint.address)
        service = DataplaneService(DataplaneIO(pair.b.dataplane, pair.b.tun, endpoint), clock=lambda: pair.now)
        service.start()
        for _ in range(100):
            if len(pair.b.tun.written) == len(queries):
                break
            await asyncio.sleep(0.01)
        assert finished_packets(pair.b.tun.written) == queries
        assert pair.b.dataplane.stats["express_in"] >= 1  # the first went the early-return way
    finally:
        if service is not None:
            service.close()
        endpoint.close()
        sender.close()
        os.close(quiet_r)
        os.close(quiet_w)


def test_a_udp_packet_with_its_checksum_left_to_the_kernel_arrives_with_the_same_request():
    """A NEEDS_CSUM read (the sender's kernel left the UDP checksum partial) takes the express path
    out; B hands it to its kernel as partial again (the full path in: a checksum still to do)."""
    from flatnet.node import packet as P

    pair = Pair()
    pair.establish()
    sent = []
    for i in range(2):
        pkt = bytearray(udp(A_IP, B_IP, 5353, 53, b"query %d" % i))
        start, offset = P.prepare_partial_checksum(pkt, P.parse_flow(pkt))
        sent.append(bytes(pkt))
        pair.a.tun.inject(P.VNET_HDR.pack(P.VNET_NEEDS_CSUM, P.GSO_NONE, 0, 0, start, offset) + bytes(pkt))
        pair.run()
    assert pair.a.dataplane.stats["express_out"] == 1  # the second; the first filled the cache
    for frame_written, pkt in zip(pair.b.tun.written, sent, strict=True):
        flags, gso_type, _hdr_len, _gso_size, csum_start, csum_offset = P.VNET_HDR.unpack_from(frame_written)
        assert flags & P.VNET_NEEDS_CSUM and (csum_start, csum_offset) == (20, P.UDP_CHECKSUM_OFFSET)
        assert frame_written[P.VNET_HDR_LEN :] == pkt


async def test_an_answer_the_local_stack_gives_at_once_leaves_in_the_same_wakeup():
    """After a quiet spell's lone packet is written to the TUN, the TUN is read at once: a ping's
    echo reply (queued by the kernel before the write returned) leaves without waiting for the
    TUN's readiness, which this test's TUN never signals."""
    import asyncio
    import socket

    from flatnet.node.service import DataplaneIO, DataplaneService
    from flatnet.node.udp import DatagramEndpoint

    pair = Pair()
    pair.establish()
    ping_round(pair, 1)  # both caches filled: B's reply will take the express path out
    session = pair.a.engine.session_for(ipaddress.ip_address(B_IP), pair.now)
    quiet_r, quiet_w = os.pipe()
    tun = pair.b.tun
    tun.fileno = lambda: quiet_r
    plain_write = tun.write

    def write_and_answer(frame_written):  # the kernel answering an echo request during the write
        plain_write(frame_written)
        tun.inject(frame(icmp_echo(B_IP, A_IP, seq=7)))

    tun.write = write_and_answer
    endpoint = DatagramEndpoint("127.0.0.1", 0)
    peer_socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer_socket.bind(("127.0.0.1", 0))
    peer_socket.setblocking(False)
    service = DataplaneService(DataplaneIO(pair.b.dataplane, tun, endpoint), clock=lambda: pair.now + 1.0)
    try:
        service.start()
        record = B.encode_record(icmp_echo(A_IP, B_IP, seq=7))
        peer_socket.sendto(session.seal(record, 5, pair.now), endpoint.address)
        loop = asyncio.get_running_loop()
        reply = await asyncio.wait_for(loop.sock_recv(peer_socket, 2048), 2.0)
        opened = pair.a.engine.open_data(reply, endpoint.address, pair.now)
        assert opened is not None and bytes(opened[2][B.RECORD_HEADER_LEN :]) == icmp_echo(B_IP, A_IP, seq=7)
    finally:
        service.close()
        endpoint.close()
        peer_socket.close()
        os.close(quiet_r)
        os.close(quiet_w)
