"""Discovery in the loop, in memory: a real LighthouseCore behind a real TunnelEngine on SimNet, two
hosts (TunnelEngine + PathMux + NodeDiscovery) that know only the lighthouse. They register, find
each other, get a relay session granted over the tunnel, punch, and end on the right rung."""

from __future__ import annotations

import random
from ipaddress import IPv4Address

from flatnet.escalation import Rung
from flatnet.node.discovery import NodeDiscovery
from flatnet.node.paths import TCP, UDP, PathMux
from flatnet.pki.cert import TrustStore
from flatnet.proto.control import TRANSPORT_TCP, TRANSPORT_UDP, Relay
from flatnet.proto.engine import TunnelEngine
from flatnet.proto.events import ControlReceived, PacketReceived, PeerUp
from flatnet.testing.clock import FakeClock
from flatnet.testing.simnet import SYMMETRIC, LinkProfile, SimNet
from lighthouse.client import ClientSettings
from lighthouse.core import LighthouseCore
from lighthouse.relay_table import RelayTable
from tests.escalation.topology import RELAY_SECRET, RELAY_TCP, RELAY_UDP, RelayPort
from tests.proto.harness import T0, ipv4_packet, make_ca, make_identity

LH_IP, LH_ADDR = "10.87.255.1", ("203.0.113.10", 4242)
RELAY2_UDP, RELAY2_TCP = ("203.0.113.51", 3478), ("203.0.113.51", 443)  # a second relay
RELAY_TRANSPORTS = {RELAY_UDP: UDP, RELAY_TCP: TCP, RELAY2_UDP: UDP, RELAY2_TCP: TCP}


class SimLighthouse:
    """LighthouseService's logic without asyncio: engine in, core, engine out."""

    def __init__(self, ca, trust):
        cert, key = make_identity(ca, "lighthouse", LH_IP + "/16")
        self.engine = TunnelEngine((cert, key), trust, rng=random.Random(99), strict=True)
        relays = (Relay(TRANSPORT_UDP, RELAY_UDP), Relay(TRANSPORT_TCP, RELAY_TCP))
        self.core = LighthouseCore(relays=relays, relay_secret=RELAY_SECRET, random_bytes=random.Random(98).randbytes)
        self.certificates = {}

    def receive_datagram(self, data, addr, now):
        self.engine.receive_datagram(data, addr, now)
        self._events(addr, now)

    def handle_timer(self, now):
        self.engine.handle_timer(now)
        self.core.tick(now)
        self._events(None, now)

    def get_timer(self):
        times = [t for t in (self.engine.get_timer(), self.core.next_deadline()) if t is not None]
        return min(times) if times else None

    def datagrams_to_send(self):
        return self.engine.datagrams_to_send()

    def _events(self, addr, now):
        while (event := self.engine.next_event()) is not None:
            if isinstance(event, PeerUp):
                self.certificates[event.peer_ip] = event.certificate
            elif isinstance(event, ControlReceived) and addr is not None:
                for out in self.core.handle_control(event.payload, self.certificates[event.peer_ip], addr, now):
                    self.engine.send_control(out.payload, out.peer_ip, now)


class DiscoveringHost:
    def __init__(self, name, ip, ca, trust, seed, wanted, lan_endpoint):
        cert, key = make_identity(ca, name, ip + "/16", [ip.rsplit(".", 1)[0] + ".0/24"])
        rng = random.Random(seed)
        self.name, self.ip = name, ip
        self.engine = TunnelEngine((cert, key), trust, rng=rng, strict=True)
        self.mux = PathMux(self.engine, key, random_bytes=rng.randbytes)
        self.discovery = NodeDiscovery(
            self.mux, {LH_IP: [LH_ADDR]}, [wanted], [lan_endpoint],
            ClientSettings(retry_interval=1.0), now=T0,
        )
        self.received = []

    def receive_datagram(self, data, addr, now):
        if tuple(addr) in RELAY_TRANSPORTS:
            self.mux.receive_relay_frame(data, RELAY_TRANSPORTS[tuple(addr)], tuple(addr), now)
        else:
            self.mux.receive_udp(data, addr, now)
        self._drain(now)

    def handle_timer(self, now):
        self.discovery.tick(now)
        self.mux.handle_timer(now)
        self._drain(now)

    def get_timer(self):
        times = [t for t in (self.mux.get_timer(), self.discovery.next_deadline()) if t is not None]
        return min(times)

    def datagrams_to_send(self, now):
        return [(tx.data, tx.addr) for tx in self.mux.transmits(now)]  # (TCP: the relay's port 443)

    def _drain(self, now):
        while (event := self.mux.next_event(now)) is not None:
            if self.discovery.take_event(event, now):
                continue
            if isinstance(event, PacketReceived):
                self.received.append(event.packet)

    def rung(self, other):
        path = self.mux.peers[IPv4Address(other.ip)].selector.current()
        return None if path is None else path.rung


def world(nat_a: dict, nat_b: dict, seed: int = 1):
    ca = make_ca()
    trust = TrustStore([ca[0]])
    net = SimNet(clock=FakeClock(start=T0), seed=seed, default_link=LinkProfile(latency=0.015))
    lh = SimLighthouse(ca, trust)
    net.add_node("lighthouse", lh, LH_ADDR)
    table = RelayTable(RELAY_SECRET)
    ports: dict = {}
    net.add_node("relay-udp", RelayPort(table, UDP, ports), RELAY_UDP)
    net.add_node("relay-tcp", RelayPort(table, TCP, ports), RELAY_TCP)
    nat_1 = net.add_nat("home-a", public_ip="198.51.100.1", **nat_a)
    nat_2 = net.add_nat("home-b", public_ip="198.51.100.2", **nat_b)
    a = DiscoveringHost("alpha", "10.87.1.1", ca, trust, 1, "10.87.2.1", ("192.168.1.10", 4242))
    b = DiscoveringHost("bravo", "10.87.2.1", ca, trust, 2, "10.87.1.1", ("192.168.2.20", 4242))
    net.add_node("alpha", a, ("192.168.1.10", 4242), nat=nat_1)
    net.add_node("bravo", b, ("192.168.2.20", 4242), nat=nat_2)
    return net, lh, a, b


def test_hosts_that_know_only_the_lighthouse_find_each_other_and_punch():
    net, lh, a, b = world({}, {})
    net.run_until(lambda: a.rung(b) == Rung.PUNCHED and b.rung(a) == Rung.PUNCHED, max_time=10)
    assert len(lh.core) == 2
    assert a.discovery.counters["relay-offered"] == 1 and b.discovery.counters["relay-offered"] == 1
    packet = ipv4_packet(a.ip, b.ip, b"found through the lighthouse")
    a.engine.send_packet(packet, net.clock.now)
    net.run_for(1)
    assert b.received == [packet]


def test_behind_a_symmetric_nat_the_granted_relay_carries_the_traffic():
    net, lh, a, b = world({"mapping": SYMMETRIC, "filtering": SYMMETRIC}, {})
    net.run_until(lambda: a.rung(b) == Rung.UDP_RELAY and b.rung(a) == Rung.UDP_RELAY, max_time=10)
    net.run_for(20)
    assert a.rung(b) == Rung.UDP_RELAY and a.mux.peers[IPv4Address(b.ip)].selector.confirmed
    packet = ipv4_packet(a.ip, b.ip, b"through the relay")
    a.engine.send_packet(packet, net.clock.now)
    net.run_for(1)
    assert b.received == [packet]


def test_a_relay_that_dies_for_good_is_replaced_by_another():
    """Issue 7: the pair's relay dies and stays dead; the lighthouse now offers another relay (as a
    second lighthouse with its own relay would). Once every session of the peer has gone
    unacknowledged for relay_dead_after, the lower IP asks for a session again and both move to
    the new relay; the dead session is dropped."""
    net, lh, a, b = world({"mapping": SYMMETRIC, "filtering": SYMMETRIC}, {})
    net.run_until(lambda: a.rung(b) == Rung.UDP_RELAY and b.rung(a) == Rung.UDP_RELAY, max_time=10)
    net.run_for(10)
    table2 = RelayTable(RELAY_SECRET)
    ports2: dict = {}
    net.add_node("relay2-udp", RelayPort(table2, UDP, ports2), RELAY2_UDP)
    net.add_node("relay2-tcp", RelayPort(table2, TCP, ports2), RELAY2_TCP)
    lh.core.relays = (Relay(TRANSPORT_UDP, RELAY2_UDP), Relay(TRANSPORT_TCP, RELAY2_TCP))
    received_at = []

    def send(n=0):
        a.engine.send_packet(ipv4_packet(a.ip, b.ip, b"%06d" % n), net.clock.now)
        net.flush()
        received_at.extend([net.clock.now] * (len(b.received) - len(received_at)))
        if n < 600:
            net.clock.call_later(0.1, lambda: send(n + 1))

    send()
    net.run_for(5)
    died_at = net.clock.now
    for host in ("alpha", "bravo"):
        net.block(host, RELAY_UDP[0])  # relay 1 is gone for good
    net.run_for(45)
    for me, other in ((a, b), (b, a)):
        peer = me.mux.peers[IPv4Address(other.ip)]
        assert me.rung(other) == Rung.UDP_RELAY and peer.selector.confirmed
        assert peer.selector.current().address.relay == RELAY2_UDP
        assert len(peer.relays) == 1  # the dead session was dropped
    assert a.discovery.counters["relay-dead"] == 1 and a.mux.counters["relay.removed"] == 1
    assert len(table2) == 1
    gap = max(y - x for x, y in zip(received_at, received_at[1:], strict=False) if y > died_at)
    # relay_dead_after (15 s) from the last ACK (a keepalive BIND every 5 s), plus a round trip to
    # the lighthouse, the new session's BINDs and a probe
    assert gap < a.mux.relay_dead_after + a.mux.rebind_interval + 2.0, gap
    print(f"relay failover outage {gap:.2f}s")
