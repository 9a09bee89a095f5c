"""PathMux alone (two muxes wired by hand, no SimNet): virtual endpoints, handshake spraying,
probe authentication, relay framing, and bad input dropped and counted."""

from __future__ import annotations

import random
from ipaddress import IPv4Address

from flatnet.escalation import Rung
from flatnet.node.paths import TCP, UDP, PathMux, Transmit, virtual_endpoint
from flatnet.pki.cert import TrustStore
from flatnet.proto.engine import TunnelEngine
from flatnet.proto.events import PacketReceived
from flatnet.proto.path_probe import KIND_PONG, encode_path_probe
from flatnet.proto.relay import TYPE_DATA, encode_relay_frame, mint_relay_token, parse_relay_frame
from tests.proto.harness import T0, ipv4_packet, make_ca, make_identity

A_ADDR, B_ADDR = ("192.168.1.10", 4242), ("192.168.1.20", 4242)
RELAY = ("203.0.113.50", 3478)
SECRET = b"0123456789abcdef0123456789abcdef"


def make_pair():
    ca = make_ca()
    trust = TrustStore([ca[0]])
    muxes = []
    for name, ip, seed in (("alpha", "10.87.1.1", 1), ("bravo", "10.87.2.1", 2)):
        cert, key = make_identity(ca, name, ip + "/16")
        rng = random.Random(seed)
        muxes.append(PathMux(TunnelEngine((cert, key), trust, rng=rng, strict=True), key, random_bytes=rng.randbytes))
    return muxes


def test_handshake_is_sprayed_on_every_path_and_data_follows_the_selector():
    a, b = make_pair()
    a.add_candidate("10.87.2.1", B_ADDR, T0)
    a.add_candidate("10.87.2.1", ("198.51.100.2", 40000), T0)
    a.add_relay("10.87.2.1", b"S" * 8, 0, mint_relay_token(SECRET, b"S" * 8, 0), [(UDP, RELAY)], T0)
    a.transmits(T0)  # the BIND
    a.engine.send_packet(ipv4_packet("10.87.1.1", "10.87.2.1", b"hi"), T0)
    out = a.transmits(T0)
    destinations = {(t.transport, t.addr) for t in out}
    assert destinations == {(UDP, B_ADDR), (UDP, ("198.51.100.2", 40000)), (UDP, RELAY)}
    relayed = next(t for t in out if t.addr == RELAY)
    frame = parse_relay_frame(relayed.data)
    assert frame.type == TYPE_DATA and frame.body == next(t.data for t in out if t.addr == B_ADDR)
    # B knows A's LAN address: the initiation from it is handed to B's engine as from A's peer
    b.add_candidate("10.87.1.1", A_ADDR, T0)
    b.receive_udp(next(t.data for t in out if t.addr == B_ADDR), A_ADDR, T0)
    while b.next_event(T0) is not None:
        pass
    response = b.transmits(T0)
    assert [t.addr for t in response if t.data[0] == 2] == [A_ADDR]  # the response, on B's one path
    a.receive_udp(next(t.data for t in response if t.data[0] == 2), B_ADDR, T0 + 0.01)
    events = []
    while (e := a.next_event(T0 + 0.01)) is not None:
        events.append(e)
    assert a.peers[IPv4Address("10.87.2.1")].probe_key is not None  # PeerUp set it
    # the queued packet went out on the selector's current path only (the relay: nothing confirmed)
    data_out = [t for t in a.transmits(T0 + 0.01) if t.addr == RELAY and parse_relay_frame(t.data).body[0] == 4]
    assert len(data_out) == 1
    b_engine_peer = b.engine.peers[IPv4Address("10.87.1.1")]
    assert b_engine_peer.endpoint == virtual_endpoint("10.87.1.1")


def connected_pair():
    """A and B on one LAN, tunnel up, probes keyed."""
    a, b = make_pair()
    a.add_candidate("10.87.2.1", B_ADDR, T0)
    b.add_candidate("10.87.1.1", A_ADDR, T0)
    now = T0
    a.engine.send_packet(ipv4_packet("10.87.1.1", "10.87.2.1", b"hi"), now)
    for _ in range(6):
        for me, other, my_addr in ((a, b, A_ADDR), (b, a, B_ADDR)):
            for tx in me.transmits(now):
                other.receive_udp(tx.data, my_addr, now)
            while other.next_event(now) is not None:
                pass
    assert all(m.peers[next(iter(m.peers))].probe_key for m in (a, b))
    return a, b, now


def test_forged_and_garbage_probes_are_dropped_and_counted():
    a, b, now = connected_pair()
    peer = a.peers[IPv4Address("10.87.2.1")]
    nonce = next(iter(peer.selector.tick(now + 5))).nonce
    a.transmits(now + 5)
    pongs_before = peer.selector.counters["pong"]
    wrong_key = b"k" * 32
    a.receive_udp(encode_path_probe(KIND_PONG, IPv4Address("10.87.2.1"), a.own_ip, nonce, wrong_key), B_ADDR, now + 5)
    a.receive_udp(b"\xfc\x01", B_ADDR, now + 5)
    a.receive_udp(encode_path_probe(KIND_PONG, IPv4Address("10.87.9.9"), a.own_ip, nonce, wrong_key), B_ADDR, now + 5)
    assert a.counters["probe.drop.bad-mac"] == 1
    assert a.counters["probe.drop.size"] == 1
    assert a.counters["probe.drop.unknown-sender"] == 1
    assert peer.selector.counters["pong"] == pongs_before and nonce  # no forged PONG counted


def test_a_real_pong_confirms_and_a_ping_from_a_new_address_becomes_a_candidate():
    a, b, now = connected_pair()
    peer_b = a.peers[IPv4Address("10.87.2.1")]
    pings = [t for t in a.transmits(now) if t.data[0] == 0xFC]
    a.handle_timer(now + 0.5)
    pings += [t for t in a.transmits(now + 0.5) if t.data[0] == 0xFC]
    assert pings
    for ping in pings:
        b.receive_udp(ping.data, ("198.51.100.1", 40007), now + 0.6)  # A seen from a new address
    assert b.counters["probe.new-address"] == 1
    paths = b.peers[IPv4Address("10.87.1.1")].selector.paths()
    assert any(p.address == ("198.51.100.1", 40007) and p.rung == Rung.PUNCHED for p in paths)
    pongs = [t for t in b.transmits(now + 0.6) if t.data[0] == 0xFC and t.addr == ("198.51.100.1", 40007)]
    assert len(pongs) >= len(pings)  # every PING answered where it came from (plus B's own PINGs)
    for pong in pongs:
        a.receive_udp(pong.data, B_ADDR, now + 0.62)
    assert a.counters["probe.pong-accepted"] >= 1
    assert peer_b.selector.confirmed and peer_b.selector.current().address == B_ADDR


def test_relay_frames_for_unknown_sessions_or_garbage_are_dropped_and_counted():
    a, b, now = connected_pair()
    a.receive_relay_frame(b"\x01\x03", UDP, RELAY, now)
    a.receive_relay_frame(encode_relay_frame(TYPE_DATA, 1, b"X" * 8, b"data"), UDP, RELAY, now)
    sid = b"S" * 8
    a.add_relay("10.87.2.1", sid, 0, mint_relay_token(SECRET, sid, 0), [(UDP, RELAY)], now)
    a.receive_relay_frame(encode_relay_frame(TYPE_DATA, 1, sid, b"data"), TCP, RELAY, now)  # wrong transport
    a.receive_relay_frame(encode_relay_frame(TYPE_DATA, 1, sid, b"\x04garbage"), UDP, RELAY, now)
    assert a.counters["relay.drop.short"] == 1
    assert a.counters["relay.drop.unknown-session"] == 2  # no such session; not on that transport
    assert sum(a.engine.drops.values()) >= 1  # the garbage body reached the engine, which dropped it
    assert not any(isinstance(e, PacketReceived) for e in iter(lambda: a.next_event(now), None))


def test_udp_relay_fails_over_to_tcp_and_comes_back():
    a, _, now = connected_pair()
    sid = b"S" * 8
    binding = a.add_relay("10.87.2.1", sid, 0, mint_relay_token(SECRET, sid, 0), [(UDP, RELAY), (TCP, RELAY)], now)
    t = now
    for _ in range(40):  # the relay answers TCP BINDs only (UDP is blocked on the way)
        t = a.get_timer()
        a.handle_timer(t)
        for tx in a.transmits(t):
            if tx.transport == TCP and parse_relay_frame(tx.data).type == 1:
                a.receive_relay_frame(encode_relay_frame(2, 0, sid), TCP, RELAY, t + 0.01)
        if binding.transport == TCP:
            break
    assert binding.transport == TCP and a.counters["relay.failover-to-tcp"] == 1
    assert t - now < 10
    # TCP BINDs are acknowledged; later a trial UDP BIND is acknowledged too: back to UDP
    a.receive_relay_frame(encode_relay_frame(2, 0, sid), TCP, RELAY, t)
    trial_at = binding.next_udp_trial_at
    a.handle_timer(trial_at)
    sent = a.transmits(trial_at)
    assert any(tx == Transmit(encode_relay_frame(1, 0, sid, binding.token), UDP, RELAY) for tx in sent)
    a.receive_relay_frame(encode_relay_frame(2, 0, sid), UDP, RELAY, trial_at + 0.05)
    assert binding.transport == UDP and a.counters["relay.back-to-udp"] == 1


def test_flatnet_status_shows_the_rung_per_peer():
    from flatnet.node.cli import format_peers

    status = {
        "running": True,
        "peers": {"10.87.2.1": {"name": "host-b", "up": True}, "10.87.3.1": {"name": "host-c", "up": False}},
        "escalation": {
            "peers": {
                "10.87.2.1": {"rung": "punched", "path": "punched ('100.64.2.1', 4242)", "confirmed": True,
                              "bytes_sent": {"punched": 900, "udp-relay": 100}},
                "10.87.3.1": {"rung": "udp-relay", "path": "udp-relay udp://x", "confirmed": False, "bytes_sent": {}},
            }
        },
    }
    lines = format_peers(status).splitlines()
    assert "punched " in lines[1] and "host-b" in lines[1] and "punched 900, udp-relay 100" in lines[1]
    assert "udp-relay?" in lines[2] and " no " in lines[2]


def test_peer_rung_metric_follows_the_selector():
    from flatnet.node.discovery import observe_escalation
    from flatnet.observability import Metrics

    a, _, now = connected_pair()
    metrics = Metrics()
    observe_escalation(metrics, a, now)
    assert metrics.sample("peer_rung", peer="10.87.2.1") == int(Rung.DIRECT_LAN)
    # time and bytes per rung (issue: "metrics count time and bytes per rung")
    selector = a.peers[IPv4Address("10.87.2.1")].selector
    seconds = selector.rung_seconds(now + 5)
    observe_escalation(metrics, a, now + 5)
    for rung, value in seconds.items():
        assert metrics.sample("peer_rung_seconds", peer="10.87.2.1", rung=rung.label) == value
    sent = selector.bytes_sent
    assert sent  # the pair exchanged probes and data
    for rung, value in sent.items():
        assert metrics.sample("peer_rung_bytes_total", peer="10.87.2.1", rung=rung.label) == value
    observe_escalation(metrics, a, now + 5)  # idempotent: a second scrape adds nothing
    for rung, value in sent.items():
        assert metrics.sample("peer_rung_bytes_total", peer="10.87.2.1", rung=rung.label) == value


def test_candidates_per_peer_are_bounded():
    from flatnet.node.paths import MAX_PATHS_PER_PEER

    a, _ = make_pair()
    for port in range(100):
        a.add_candidate("10.87.2.1", ("198.51.100.2", 40000 + port), T0)
    assert len(a.peers[IPv4Address("10.87.2.1")].selector.paths()) == MAX_PATHS_PER_PEER
    assert a.counters["candidate-over-limit"] == 100 - MAX_PATHS_PER_PEER


def bind_frames(sent, transport=None):
    return [tx for tx in sent if tx.addr == RELAY and parse_relay_frame(tx.data).type == 1
            and (transport is None or tx.transport == transport)]


def run_relay(a, start, end, answer):
    """Run A's timers from *start* to *end*; the relay answers the BINDs on transports in *answer*
    (a callable of the time). Returns the BINDs sent, with their times."""
    t, sent = start, []
    while (deadline := a.get_timer()) is not None and deadline <= end:
        t = max(t, deadline)
        a.handle_timer(t)
        for tx in bind_frames(a.transmits(t)):
            sent.append((t, tx))
            if tx.transport in answer(t):
                a.receive_relay_frame(encode_relay_frame(2, 0, parse_relay_frame(tx.data).session_id), tx.transport, RELAY, t + 0.01)
    return sent


def test_a_relay_down_on_both_transports_is_not_mistaken_for_blocked_udp():
    """A relay that restarts answers neither UDP nor TCP for a while: the session stays on UDP,
    BINDs are repeated every second while unanswered, and the first ACK after the restart has
    the relay path probed at once (issue 7, relay restart)."""
    a, _, now = connected_pair()
    sid = b"S" * 8
    binding = a.add_relay("10.87.2.1", sid, 0, mint_relay_token(SECRET, sid, 0), [(UDP, RELAY), (TCP, RELAY)], now)
    both = {UDP, TCP}
    run_relay(a, now, now + 20, lambda t: both)
    assert binding.transport == UDP and binding.unacked == 0
    down_at, back_at = now + 20, now + 30
    sent = run_relay(a, down_at, back_at, lambda t: set())
    udp_binds = [t for t, tx in sent if tx.transport == UDP]
    assert udp_binds and max(b - x for x, b in zip([down_at, *udp_binds], udp_binds, strict=False)) <= 5.0
    assert back_at - udp_binds[-1] <= 1.0  # unanswered: once a second
    assert binding.transport == UDP and a.counters["relay.failover-to-tcp"] == 0
    assert any(tx.transport == TCP for _, tx in sent)  # it did ask whether TCP would do
    probes_before = a.peers[IPv4Address("10.87.2.1")].selector.counters["probe"]
    sent = run_relay(a, back_at, back_at + 2, lambda t: both)
    assert sent and sent[0][0] - back_at <= 1.0  # re-bound within a second of the relay's return
    assert binding.transport == UDP and binding.unacked == 0 and a.counters["relay.back"] >= 1
    assert a.peers[IPv4Address("10.87.2.1")].selector.counters["probe"] > probes_before


def test_a_quiet_relay_path_is_rebound_before_the_keepalive_bind():
    """The relay restarted between two keepalive BINDs (nothing unanswered yet): the relay path
    carrying the traffic stops answering probes, and is re-bound after suspect_after, not up to
    rebind_interval later."""
    from flatnet.escalation import Path
    from flatnet.node.paths import RelayRoute

    a, _ = make_pair()
    sid = b"S" * 8
    now = T0
    binding = a.add_relay("10.87.2.1", sid, 0, mint_relay_token(SECRET, sid, 0), [(UDP, RELAY)], now)
    a.transmits(now)
    a.receive_relay_frame(encode_relay_frame(2, 0, sid), UDP, RELAY, now + 0.01)
    selector = a.peers[IPv4Address("10.87.2.1")].selector
    path = Path(Rung.UDP_RELAY, RelayRoute(UDP, RELAY, sid))
    assert selector.current() == path
    selector.state(path).last_pong_at = now + 0.5  # (a PONG; the selector is tested on its own)
    a.handle_timer(now + 3.0)
    assert not bind_frames(a.transmits(now + 3.0))
    a.handle_timer(now + 3.6)  # no PONG for suspect_after (3 s)
    assert bind_frames(a.transmits(now + 3.6), UDP)
    assert binding.next_bind_at < now + 5.0


async def test_the_tcp_connection_to_a_replaced_relay_is_closed():
    """A peer's only relay session died and a session on another relay replaced it: the TCP
    connection to the dead relay is closed (it would otherwise reconnect forever)."""
    import asyncio

    from flatnet.node.paths import EscalatingEndpoint
    from flatnet.testing.udp_twin import UdpNetwork

    accepted = []
    servers = [await asyncio.start_server(lambda r, w: accepted.append(w), "127.0.0.1", 0) for _ in range(2)]
    dead, live = (tuple(s.sockets[0].getsockname()[:2]) for s in servers)
    a, _ = make_pair()
    twin = UdpNetwork().endpoint(A_ADDR)
    twin.address = A_ADDR
    endpoint = EscalatingEndpoint(twin, a, lambda: T0)
    try:
        a.add_relay("10.87.2.1", b"1" * 8, 0, mint_relay_token(SECRET, b"1" * 8, 0), [(TCP, dead)], T0)
        endpoint.add_relay_address(TCP, dead)
        doomed = endpoint._relay_tcp[dead]
        assert a.peers_with_dead_relays(T0 + a.relay_dead_after) == [IPv4Address("10.87.2.1")]
        a.add_relay("10.87.2.1", b"2" * 8, 0, mint_relay_token(SECRET, b"2" * 8, 0), [(TCP, live)], T0 + 20)
        endpoint.add_relay_address(TCP, live)
        endpoint.forget_unused_relays()
        assert list(endpoint.relay_status()) == [f"{live[0]}:{live[1]}"]
        assert endpoint.counters["tcp.relay-forgotten"] == 1 and a.counters["relay.removed"] == 1
        assert list(a.peers[IPv4Address("10.87.2.1")].relays) == [b"2" * 8]
        await asyncio.gather(doomed._task, return_exceptions=True)
        assert not doomed.connected
    finally:
        await endpoint.stop()
        for writer in accepted:
            writer.close()
        for server in servers:
            server.close()
            await server.wait_closed()
