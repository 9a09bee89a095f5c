"""SimNet topologies for Graceful Escalation: real TunnelEngines behind a PathMux, a relay (UDP port
and a "TCP" port), NATs. The test plays the lighthouse: it hands each host the other's endpoints
(observed public address first, then LAN addresses) and one relay session with minted tokens.

SimNet carries datagrams only, so the TCP relay rung is modelled as relay frames sent to the
relay's port 443 (what a UDP-blocking firewall lets through in these tests); the byte-stream
framing and reconnects are tested against the real relay service on loopback
(tests/escalation/test_relay_service.py).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from flatnet.escalation import EscalationSettings
from flatnet.node.paths import TCP, UDP, PathMux
from flatnet.pki.cert import TrustStore
from flatnet.proto.engine import TunnelEngine
from flatnet.proto.events import PacketReceived
from flatnet.proto.relay import mint_relay_token
from flatnet.testing.clock import FakeClock
from flatnet.testing.simnet import LinkProfile, SimNet
from lighthouse.relay_table import RelayTable
from tests.proto.harness import T0, ipv4_packet, make_ca, make_identity

RELAY_IP = "203.0.113.50"
RELAY_UDP = (RELAY_IP, 3478)
RELAY_TCP = (RELAY_IP, 443)
RELAY_SECRET = b"relay secret for the escalation tests"
PORT = 4242


class SimHost:
    """A TunnelEngine + PathMux in SimNet's protocol shape; records what arrives."""

    def __init__(self, name: str, ip: str, ca, trust, seed: int, settings: EscalationSettings | None = None):
        self.name, self.ip = name, ip
        cert, key = make_identity(ca, name, ip + "/16")
        rng = random.Random(seed)
        self.engine = TunnelEngine((cert, key), trust, rng=rng, strict=True)
        self.mux = PathMux(self.engine, key, settings, random_bytes=rng.randbytes)
        self.received: list[bytes] = []
        self.received_at: list[float] = []
        self.events: list = []
        self.path_events: list = []
        self.now = T0

    # SimNet protocol
    def receive_datagram(self, data, addr, now):
        self.now = now
        if tuple(addr) in (RELAY_UDP, RELAY_TCP):
            self.mux.receive_relay_frame(data, UDP if tuple(addr) == RELAY_UDP else TCP, RELAY_UDP if tuple(addr) == RELAY_UDP else RELAY_TCP, now)
        else:
            self.mux.receive_udp(data, addr, now)
        self._drain(now)

    def handle_timer(self, now):
        self.now = now
        self.mux.handle_timer(now)
        self._drain(now)

    def get_timer(self):
        return self.mux.get_timer()

    def datagrams_to_send(self, now):
        out = []
        for tx in self.mux.transmits(now):
            out.append((tx.data, RELAY_TCP if tx.transport == TCP else tx.addr))
        return out

    def _drain(self, now):
        while (event := self.mux.next_event(now)) is not None:
            self.events.append(event)
            if isinstance(event, PacketReceived):
                self.received.append(event.packet)
                self.received_at.append(now)
        while (change := self.mux.next_path_event()) is not None:
            self.path_events.append(change[1])

    def send(self, dst_ip: str, payload: bytes, now: float) -> bytes:
        packet = ipv4_packet(self.ip, dst_ip, payload)
        self.engine.send_packet(packet, now)
        return packet

    def rung(self, peer: SimHost):
        path = self.mux.peers[IPv4Address(peer.ip)].selector.current()
        return None if path is None else path.rung

    def selector(self, peer: SimHost):
        return self.mux.peers[IPv4Address(peer.ip)].selector


class RelayPort:
    """One port of the simulated relay; both ports share one RelayTable (as the real service does).
    TCP-port addresses are keyed ("tcp", addr) in the table, so the two transports never mix."""

    def __init__(self, table: RelayTable, transport: str, ports: dict):
        self.table, self.transport, self.ports = table, transport, ports
        self.outbox: list = []
        ports[transport] = self

    def receive_datagram(self, data, addr, now):
        key = (TCP, tuple(addr)) if self.transport == TCP else tuple(addr)
        for dst, frame in self.table.receive(data, key, now):
            if isinstance(dst[0], str) and dst[0] == TCP:
                self.ports[TCP].outbox.append((frame, dst[1]))
            else:
                self.ports[UDP].outbox.append((frame, dst))

    def handle_timer(self, now):
        self.table.tick(now)

    def get_timer(self):
        return self.table.next_deadline() if self.transport == UDP else None

    def datagrams_to_send(self):
        out, self.outbox = self.outbox, []
        return out


@dataclass
class World:
    net: SimNet
    a: SimHost
    b: SimHost
    relay: RelayTable
    nats: dict = field(default_factory=dict)
    sent: list = field(default_factory=list)

    @property
    def clock(self) -> FakeClock:
        return self.net.clock

    def start_traffic(self, count: int, interval: float = 0.05, payload_size: int = 200):
        """A sends *count* packets to B, one per *interval*, from the clock (never waiting on anything)."""

        def send(n=0):
            if n >= count:
                return
            self.sent.append(self.a.send(self.b.ip, b"%08d" % n + b"x" * payload_size, self.clock.now))
            self.net.flush()
            self.clock.call_later(interval, lambda: send(n + 1))

        self.clock.call_later(0, send)

    def all_received_intact(self) -> bool:
        """Everything B received was sent by A, byte for byte (no corruption, no invention)."""
        sent = set(self.sent)
        return bool(self.b.received) and all(p in sent for p in self.b.received)

    def received_between(self, start: float, end: float) -> int:
        return sum(1 for t in self.b.received_at if start <= t < end)


def build(
    *,
    nat_a: dict | None = None,
    nat_b: dict | None = None,
    same_lan: bool = False,
    relay: bool = True,
    seed: int = 1,
    link: LinkProfile = LinkProfile(latency=0.015),
    settings: EscalationSettings | None = None,
) -> World:
    """Two hosts A (10.87.1.1) and B (10.87.2.1). *nat_a*/*nat_b*: keyword arguments for
    SimNet.add_nat (None: a public address). *same_lan*: both on one LAN behind one NAT."""
    ca = make_ca()
    trust = TrustStore([ca[0]])
    clock = FakeClock(start=T0)
    net = SimNet(clock=clock, seed=seed, default_link=link)
    a = SimHost("alpha", "10.87.1.1", ca, trust, seed * 10 + 1, settings)
    b = SimHost("bravo", "10.87.2.1", ca, trust, seed * 10 + 2, settings)
    nats = {}
    if same_lan:
        nats["a"] = nats["b"] = net.add_nat("office", public_ip="198.51.100.1", **(nat_a or {}))
        a_addr, b_addr = ("192.168.1.10", PORT), ("192.168.1.20", PORT)
    else:
        if nat_a is not None:
            nats["a"] = net.add_nat("home-a", public_ip="198.51.100.1", **nat_a)
        if nat_b is not None:
            nats["b"] = net.add_nat("home-b", public_ip="198.51.100.2", **nat_b)
        a_addr = ("192.168.1.10", PORT) if nat_a is not None else ("203.0.113.1", PORT)
        b_addr = ("192.168.2.20", PORT) if nat_b is not None else ("203.0.113.2", PORT)
    net.add_node("alpha", a, a_addr, nat=nats.get("a"))
    net.add_node("bravo", b, b_addr, nat=nats.get("b"))
    table = RelayTable(RELAY_SECRET)
    ports: dict = {}
    net.add_node("relay-udp", RelayPort(table, UDP, ports), RELAY_UDP)
    net.add_node("relay-tcp", RelayPort(table, TCP, ports), RELAY_TCP)
    world = World(net, a, b, table, nats)
    introduce(world, relay=relay)
    return world


def observed_endpoint(world: World, host: SimHost):
    """What a lighthouse would observe for *host*: its NAT mapping for PORT (predicted: cone NATs
    give the first mapping port_base; we ask the NAT for a mapping towards the lighthouse)."""
    node = world.net.node(host.name)
    if node.nat is None:
        return node.addr
    mapped, _ = node.nat.outbound(node.addr, ("192.0.2.1", 4242), world.clock.now)  # the lighthouse
    return mapped


def introduce(world: World, relay: bool = True) -> None:
    """Play the lighthouse: endpoints (observed first, then LAN) and a relay session for both."""
    now = world.clock.now
    session = bytes(range(8))
    for me, other, side in ((world.a, world.b, 0), (world.b, world.a, 1)):
        other_node = world.net.node(other.name)
        me.mux.add_peer(other.ip, now)
        if relay:
            token = mint_relay_token(RELAY_SECRET, session, side)
            me.mux.add_relay(other.ip, session, side, token, [(UDP, RELAY_UDP), (TCP, RELAY_TCP)], now)
        endpoints = [observed_endpoint(world, other)]
        if other_node.nat is not None:
            endpoints.append(other_node.addr)
        me.mux.punch(other.ip, endpoints, now)


def lighthouse_punch(world: World, mover: SimHost) -> None:
    """What the lighthouses do after *mover* re-registers from a new address and queries its peer:
    a QueryReply to the mover (the peer's endpoints) and a PunchNotify to the peer (the mover's)."""
    now = world.clock.now
    other = world.b if mover is world.a else world.a
    for me, them in ((other, mover), (mover, other)):
        node = world.net.node(them.name)
        endpoints = [observed_endpoint(world, them)] + ([node.addr] if node.nat is not None else [])
        me.mux.punch(them.ip, endpoints, now)
    world.net.flush()


def block_udp(world: World, host: SimHost) -> list:
    """Block every UDP flow of *host* except towards the relay's TCP port (returns what to unblock)."""
    other = world.b if host is world.a else world.a
    other_node = world.net.node(other.name)
    pairs = [(host.name, RELAY_UDP), (host.name, other.name), (host.name, other_node.addr[0])]
    if other_node.nat is not None:
        pairs.append((host.name, other_node.nat.public_ip))
    for x, y in pairs:
        world.net.block(x, y)
    return pairs


def unblock(world: World, pairs) -> None:
    for x, y in pairs:
        world.net.unblock(x, y)


def move_host(world: World, host: SimHost, new_addr, nat=None) -> None:
    """Roaming: the host's underlay address changes (another LAN, another NAT). SimNet has no
    public API for this, so this edits its tables the way add_node fills them."""
    net = world.net
    node = net.node(host.name)
    if node.nat is None:
        del net._public[node.addr]
    else:
        del node.nat.inside[node.addr]
    node.addr, node.nat = (str(new_addr[0]), int(new_addr[1])), nat
    if nat is None:
        net._public[node.addr] = node
    else:
        nat.inside[node.addr] = node
