"""Conntrack forgets ended TCP connections soon (FIN/RST -> ``tcp_closing_timeout``), not after 12 min.

The regression behind the lab soak's node RSS slope (+3.6 MiB/h over 10 minutes): every HTTP
request the gateway relays is a new TCP connection, and each stayed tracked ``tcp_timeout`` (720 s)
after it ended, so the table grew for 12 minutes to rate x 720 s flows.
"""

from __future__ import annotations

import ipaddress

from flatnet.firewall import (
    INBOUND,
    OUTBOUND,
    TCP_ACK,
    TCP_FIN,
    TCP_RST,
    TCP_SYN,
    Firewall,
    FirewallConfig,
    FirewallRuleConfig,
    PeerIdentity,
)

LOCAL = ipaddress.ip_address("10.87.2.5").packed
PEER = PeerIdentity("alice-pc", frozenset({"hosts"}), ipaddress.ip_address("10.87.1.1"))
REMOTE = PEER.ip.packed
TCP = 6


def packet(fw, direction, sport, flags, now, dport=80):
    """A packet of the connection PEER:sport -> LOCAL:dport (inbound: from the peer; outbound: the reply)."""
    return fw.allow(direction, TCP, LOCAL, dport, REMOTE, sport, PEER, now, tcp_flags=flags)


def http_request(fw, sport, now):
    """One short connection as the gateway makes them: handshake, request, answer, FIN both ways."""
    steps = [(INBOUND, TCP_SYN), (OUTBOUND, TCP_SYN | TCP_ACK), (INBOUND, TCP_ACK), (INBOUND, TCP_ACK),
             (OUTBOUND, TCP_ACK), (OUTBOUND, TCP_FIN | TCP_ACK), (INBOUND, TCP_FIN | TCP_ACK), (OUTBOUND, TCP_ACK)]
    for i, (direction, flags) in enumerate(steps):
        assert packet(fw, direction, sport, flags, now + i * 0.001)


def test_table_stays_flat_under_the_soaks_connection_rate():
    fw = Firewall()
    sizes = {}
    now, sport = 0.0, 20000
    while now < 1800.0:  # a connection every 2 s for 30 minutes, ticked every 10 s as the data plane does
        http_request(fw, sport, now)
        sport += 1
        if now % 10.0 == 0.0:
            fw.tick(now)
        if now in (900.0, 1798.0):
            sizes[now] = len(fw.conntrack)
        now += 2.0
    closing = fw.config.tcp_closing_timeout
    # Ended connections live tcp_closing_timeout (+ one tick), not tcp_timeout: 60-65 flows, not 360.
    assert sizes[900.0] <= (closing + 10.0) / 2.0 + 1
    assert sizes[1798.0] <= (closing + 10.0) / 2.0 + 1
    assert fw.status()["closing_flows"] == len(fw.conntrack)
    assert len(fw._opened_by) <= len(fw.conntrack) + 5  # trimmed at each tick
    assert len(fw._pairs) == 1  # fragments: one entry per address pair, at its longest-lived flow's expiry


def test_reset_ends_a_flow_after_the_closing_timeout():
    fw = Firewall(FirewallConfig(inbound=[], tcp_timeout=720.0, tcp_closing_timeout=30.0))
    assert fw.allow(OUTBOUND, TCP, LOCAL, 40000, REMOTE, 80, PEER, 0.0, tcp_flags=TCP_SYN)
    assert fw.allow(INBOUND, TCP, LOCAL, 40000, REMOTE, 80, PEER, 1.0, tcp_flags=TCP_RST | TCP_ACK)
    assert fw.allow(INBOUND, TCP, LOCAL, 40000, REMOTE, 80, PEER, 20.0, tcp_flags=TCP_ACK)  # within 30 s of the RST
    assert not fw.allow(INBOUND, TCP, LOCAL, 40000, REMOTE, 80, PEER, 60.0, tcp_flags=TCP_ACK)  # > 30 s after the last
    fw.tick(60.0)
    assert fw.conntrack == {} and fw.status()["closing_flows"] == 0


def test_half_closed_connection_lives_while_it_talks():
    fw = Firewall(FirewallConfig(tcp_closing_timeout=30.0))
    assert packet(fw, INBOUND, 5000, TCP_SYN, 0.0)
    assert packet(fw, INBOUND, 5000, TCP_FIN | TCP_ACK, 1.0)  # the client is done sending
    for t in range(20, 600, 20):  # the server still streams its answer, every 20 s
        assert packet(fw, OUTBOUND, 5000, TCP_ACK, float(t))
    assert fw.conntrack[(TCP, LOCAL, 80, REMOTE, 5000)] == 580.0 + 30.0


def test_a_new_connection_on_the_same_ports_gets_the_full_timeout():
    fw = Firewall(FirewallConfig(tcp_closing_timeout=30.0))
    http_request(fw, 6000, 0.0)
    assert packet(fw, INBOUND, 6000, TCP_SYN, 5.0)  # reused 4-tuple while the old one is still tracked
    assert packet(fw, INBOUND, 6000, TCP_ACK, 10.0)
    assert fw.conntrack[(TCP, LOCAL, 80, REMOTE, 6000)] == 10.0 + fw.config.tcp_timeout
    http_request(fw, 6001, 0.0)
    fw.tick(100.0)  # the old flow expired, a stale closing mark must not shorten its successor
    assert packet(fw, INBOUND, 6001, TCP_ACK, 100.0)
    assert fw.conntrack[(TCP, LOCAL, 80, REMOTE, 6001)] == 100.0 + fw.config.tcp_timeout


def test_refused_reset_leaves_no_mark_and_no_flags_keeps_the_old_timeouts():
    fw = Firewall(FirewallConfig(inbound=[FirewallRuleConfig(proto="tcp", port="22")]))
    assert not packet(fw, INBOUND, 7000, TCP_RST, 0.0)  # no rule for port 80
    assert fw.status()["closing_flows"] == 0 and fw.conntrack == {}
    assert fw.allow(INBOUND, TCP, LOCAL, 22, REMOTE, 7001, PEER, 0.0)  # a caller that passes no flags
    assert fw.conntrack[(TCP, LOCAL, 22, REMOTE, 7001)] == fw.config.tcp_timeout


def test_tcp_flags_of_a_packet():
    from scapy.layers.inet import IP, UDP
    from scapy.layers.inet import TCP as ScapyTCP
    from scapy.layers.inet6 import IPv6

    from flatnet.node import packet as P

    def flags_of(pkt) -> int:
        raw = bytes(pkt)
        return P.tcp_flags(raw, P.parse_flow(raw))

    assert flags_of(IP(src="10.87.1.1", dst="10.87.2.5") / ScapyTCP(sport=1, dport=80, flags="FA")) == TCP_FIN | TCP_ACK
    assert flags_of(IPv6(src="fd00::1", dst="fd00::2") / ScapyTCP(flags="R")) == TCP_RST
    assert flags_of(IP() / UDP(sport=1, dport=2)) == 0
    head = bytes(IP(src="10.87.1.1", dst="10.87.2.5") / ScapyTCP(flags="S"))[:20 + 13]  # cut before the flags
    assert P.tcp_flags(head, P.parse_flow(head)) == 0
    later = bytes(IP(src="10.87.1.1", dst="10.87.2.5", frag=100) / ScapyTCP(flags="R"))  # not the first fragment
    assert P.tcp_flags(later, P.parse_flow(later)) == 0


def test_a_busy_flow_restarts_its_expiry_at_most_once_per_refresh_interval_and_never_expires():
    from flatnet.firewall import TRACK_REFRESH

    fw = Firewall(FirewallConfig())
    timeout = fw.config.tcp_timeout
    key = (TCP, LOCAL, 80, REMOTE, 40000)
    assert packet(fw, INBOUND, 40000, TCP_SYN, 0.0)
    assert fw.conntrack[key] == timeout
    packet(fw, INBOUND, 40000, TCP_ACK, TRACK_REFRESH / 2)
    assert fw.conntrack[key] == timeout  # refreshed just now: left as it is
    packet(fw, INBOUND, 40000, TCP_ACK, TRACK_REFRESH * 1.5)
    assert fw.conntrack[key] == TRACK_REFRESH * 1.5 + timeout
    # Traffic every 0.9 refresh intervals for longer than the timeout: the flow stays tracked.
    now = TRACK_REFRESH * 1.5
    while now < 2 * timeout:
        now += TRACK_REFRESH * 0.9
        assert packet(fw, INBOUND, 40000, TCP_ACK, now)
        assert fw.conntrack[key] >= now + timeout - TRACK_REFRESH
    # A FIN is never skipped: the flow is marked closing at once.
    packet(fw, INBOUND, 40000, TCP_FIN | TCP_ACK, now + 0.01)
    assert fw.conntrack[key] == now + 0.01 + fw.config.tcp_closing_timeout
