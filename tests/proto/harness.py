"""Two (or more) tunnel engines wired back to back in memory, on a fake clock: no sockets, no sleeps."""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from flatnet.pki.cert import TrustStore, new_ca, sign_host
from flatnet.proto.engine import TunnelEngine
from flatnet.proto.events import PacketReceived

T0 = 1_800_000_000.0  # engine clock = Unix seconds (certificates are checked against it)
FAR_FUTURE = 2**40


def make_ca(name: str = "team-ca"):
    return new_ca(name, not_after=FAR_FUTURE)


def make_identity(ca, name: str, ip: str, subnets=(), not_before: int = 0, not_after: int = FAR_FUTURE):
    ca_cert, ca_key = ca
    key = X25519PrivateKey.generate()
    cert = sign_host(
        ca_cert, ca_key, name, ip, list(subnets), ["hosts"], key.public_key().public_bytes_raw(), not_before, not_after
    )
    return cert, key


def ipv4_packet(src: str, dst: str, payload: bytes = b"", proto: int = 17) -> bytes:
    total = 20 + len(payload)
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0, 64, proto, 0, IPv4Address(src).packed, IPv4Address(dst).packed)
    return header + payload


@dataclass
class Node:
    name: str
    ip: str
    addr: tuple[str, int]
    engine: TunnelEngine
    received: list[bytes] = field(default_factory=list)
    events: list = field(default_factory=list)

    def drain_events(self) -> None:
        while (event := self.engine.next_event()) is not None:
            self.events.append(event)
            if isinstance(event, PacketReceived):
                self.received.append(event.packet)


class Wire:
    """Carries datagrams between nodes by address; optional loss, duplication, reordering, taps."""

    def __init__(self, seed: int = 1, loss: float = 0.0, duplicate: float = 0.0, reorder: float = 0.0):
        self.nodes: dict[tuple[str, int], Node] = {}
        self.rng = random.Random(seed)
        self.loss, self.duplicate, self.reorder = loss, duplicate, reorder
        self.now = T0
        self.log: list[tuple[float, tuple, tuple, bytes]] = []  # (time, src, dst, datagram): everything sent
        self.held: list[tuple[tuple, tuple, bytes]] = []
        self.delivered: list[tuple[tuple, tuple, bytes]] = []  # what reached a node (after impairments)

    def add(self, node: Node) -> Node:
        self.nodes[node.addr] = node
        return node

    def collect(self) -> list[tuple[tuple, tuple, bytes]]:
        out = []
        for node in self.nodes.values():
            for data, dst in node.engine.datagrams_to_send():
                out.append((node.addr, tuple(dst), bytes(data)))
        self.log.extend((self.now, *item) for item in out)
        return out

    def run(self, rounds: int = 20) -> None:
        """Deliver until quiet (with impairments applied per datagram)."""
        for _ in range(rounds):
            batch = self.collect() + self.held
            self.held = []
            if not batch:
                break
            deliver = []
            for item in batch:
                if self.rng.random() < self.loss:
                    continue
                deliver.append(item)
                if self.rng.random() < self.duplicate:
                    deliver.append(item)
            if self.reorder:
                self.rng.shuffle(deliver)
                keep = [d for d in deliver if self.rng.random() >= self.reorder]
                self.held = [d for d in deliver if d not in keep] if len(keep) < len(deliver) else []
                deliver = keep
            for src, dst, data in deliver:
                node = self.nodes.get(dst)
                if node is not None:
                    self.delivered.append((src, dst, data))
                    node.engine.receive_datagram(data, src, self.now)
            for node in self.nodes.values():
                node.drain_events()

    def advance(self, seconds: float, step: float | None = None) -> None:
        """Move the clock, firing every engine's timers at their deadlines on the way."""
        end = self.now + seconds
        while True:
            deadlines = [d for n in self.nodes.values() if (d := n.engine.get_timer()) is not None and d <= end]
            if step is not None:
                deadlines.append(min(end, self.now + step))
            upcoming = [d for d in deadlines if d >= self.now]
            if not upcoming:
                break
            t = min(upcoming)
            if t > end:
                break
            self.now = max(self.now, t)
            for node in self.nodes.values():
                timer = node.engine.get_timer()
                if timer is not None and timer <= self.now:
                    node.engine.handle_timer(self.now)
            self.run()
            if self.now >= end:
                break
        self.now = end
        for node in self.nodes.values():
            node.engine.handle_timer(self.now)
        self.run()


def make_node(wire: Wire, ca, name: str, ip: str, addr, subnets=(), trust=None, identity=None, seed=None, **kw) -> Node:
    identity = identity or make_identity(ca, name, ip, subnets)
    trust = trust or TrustStore([ca[0]])
    engine = TunnelEngine(identity, trust, rng=random.Random(seed if seed is not None else hash(name)), strict=True, **kw)
    return wire.add(Node(name, ip, addr, engine))


def pair(wire: Wire | None = None, ca=None, **kw) -> tuple[Wire, Node, Node]:
    wire = wire or Wire()
    ca = ca or make_ca()
    a = make_node(wire, ca, "alpha", "10.87.1.1/16", ("192.0.2.1", 4242), ["10.87.1.0/24"], seed=1)
    b = make_node(wire, ca, "bravo", "10.87.2.1/16", ("192.0.2.2", 4242), ["10.87.2.0/24"], seed=2)
    a.engine.add_peer("10.87.2.1", [b.addr])
    b.engine.add_peer("10.87.1.1", [a.addr])
    wire.ca = ca
    return wire, a, b


def snapshot(engine: TunnelEngine):
    """Everything about an engine that bad input must not change (counters excluded; rate-limiter
    tokens excluded: any mac1-valid initiation spends one, by design)."""

    def session_state(s):
        if s is None:
            return None
        return (s.local_index, s.remote_index, s.created_at, s.is_initiator, s.confirmed, s.send_counter,
                s.replay.highest, s.replay.bitmap, s.certificate.fingerprint())

    peers = {}
    for ip, p in engine._peers.items():
        pending = p.pending
        peers[ip] = (
            tuple(p.endpoints), p.endpoint, p.up, p.certificate.fingerprint() if p.certificate else None,
            session_state(p.current), session_state(p.previous), session_state(p.next),
            (pending.local_index, pending.retry_at, pending.state.handshake_hash) if pending else None,
            p.attempts_started_at, p.cookie, tuple(p.queue), p.last_initiation_timestamp, p.last_sent_at,
            p.last_received_at, p.keepalive_from, p.awaiting_reply_since, p.last_handshake_at, p.rx_bytes, p.tx_bytes,
        )
    return (
        peers,
        sorted(engine._sessions),
        sorted(engine._pending),
        list(engine._outbox),
        list(engine._events),
        engine.get_timer(),
    )
