"""Containers on two hosts, in memory: the scenario of tests/node/test_podman_cross_host.py, fast.

Host A (10.87.1.1, containers 10.87.1.0/24) and host B (10.87.2.1, containers 10.87.2.0/24) know
each other as static peers by Flatnet IP only; which subnets B owns, A learns from B's certificate.
"""

from __future__ import annotations

import os

from scapy.layers.inet import IP, TCP

from .harness import A_IP, B_IP, Pair, finished_packets, frame, icmp_echo, tcp, tso_frame

A_CONTAINER, B_CONTAINER = "10.87.1.2", "10.87.2.2"


def test_first_packet_to_a_remote_container_waits_for_the_route_and_arrives():
    pair = Pair()
    ping = icmp_echo(A_CONTAINER, B_CONTAINER, seq=1)
    pair.a.tun.inject(frame(ping))  # nothing was ever sent to B_IP: B's subnets are not known yet
    pair.run()
    # Held while B's certificate was fetched, then carried: nothing lost.
    assert not pair.a.engine.drops
    assert finished_packets(pair.b.tun.written) == [ping]
    reply = icmp_echo(B_CONTAINER, A_CONTAINER, seq=1)
    pair.b.tun.inject(frame(reply))
    pair.run()
    assert finished_packets(pair.a.tun.written) == [reply]


def test_containers_talk_tcp_both_ways_once_routes_are_learned_at_start():
    pair = Pair()
    pair.a.engine.learn_routes(pair.now)  # what TunnelComponent.start does
    pair.a.dataplane.handle_timer(pair.now)
    pair.run()
    syn = tcp(A_CONTAINER, B_CONTAINER, 40000, 80, 1000, b"", flags=0x02)
    pair.a.tun.inject(frame(syn))
    pair.run()
    assert finished_packets(pair.b.tun.written) == [syn]  # the very first packet arrives
    mss = 1380
    payload = os.urandom(mss * 20)
    pair.b.tun.inject(tso_frame(tcp(B_CONTAINER, A_CONTAINER, 80, 40000, 5000, payload, flags=0x18, partial=True), mss))
    pair.run()
    got = finished_packets(pair.a.tun.written)
    assert b"".join(bytes(IP(s)[TCP].payload) for s in got) == payload
    assert not pair.a.dataplane.drops and not pair.b.dataplane.drops


def test_gateway_traffic_masqueraded_at_a_reaches_a_container_on_b():
    # The gateway's packet left A's TUN with A's own address (nftables masquerade at the entry node).
    pair = Pair()
    pair.a.engine.learn_routes(pair.now)
    pair.a.dataplane.handle_timer(pair.now)
    pair.run()
    request = tcp(A_IP, B_CONTAINER, 33000, 80, 1, b"GET / HTTP/1.0\r\n\r\n", flags=0x18)
    pair.a.tun.inject(frame(request))
    pair.run()
    assert finished_packets(pair.b.tun.written) == [request]
    answer = tcp(B_CONTAINER, A_IP, 80, 33000, 9, b"HTTP/1.0 200 OK\r\n\r\n", flags=0x18)
    pair.b.tun.inject(frame(answer))
    pair.run()
    assert finished_packets(pair.a.tun.written) == [answer]
    assert pair.b.dataplane.status(pair.now)["peers"][A_IP]["rx_packets"] == 1
    assert B_IP in pair.a.dataplane.status(pair.now)["peers"]


def test_a_superpacket_sent_before_any_session_is_queued_whole_while_handshaking():
    # A TCP sender's first burst after the session ended while idle is often a TSO super-packet.
    pair = Pair()
    mss = 1380
    payload = os.urandom(mss * 10 + 100)
    pair.a.tun.inject(tso_frame(tcp(A_CONTAINER, B_IP, 40000, 80, 7000, payload, flags=0x18, partial=True), mss))
    pair.run()
    got = finished_packets(pair.b.tun.written)
    assert b"".join(bytes(IP(s)[TCP].payload) for s in got) == payload
    for s in got:
        parsed = IP(s)
        want = parsed[TCP].chksum
        del parsed[TCP].chksum
        assert IP(bytes(parsed))[TCP].chksum == want
    assert not pair.a.dataplane.drops and not pair.a.engine.drops
