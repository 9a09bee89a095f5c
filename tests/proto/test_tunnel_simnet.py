"""The tunnel on the shared simulated network: one host behind a symmetric NAT, a lossy, jittery,
duplicating, bit-flipping path, 200 s on a fake clock (so a rekey happens on the way)."""

from __future__ import annotations

from ipaddress import IPv4Address

from flatnet.proto.events import PacketReceived
from flatnet.proto.header import MessageType
from flatnet.testing.clock import FakeClock
from flatnet.testing.simnet import SYMMETRIC, LinkProfile, SimNet, flip_bits
from tests.proto.harness import T0, ipv4_packet, make_ca, make_identity

A_IP, B_IP = "10.87.1.1", "10.87.2.1"


class EchoingNode:
    """A TunnelEngine in SimNet's protocol shape; optionally answers every packet it receives."""

    def __init__(self, engine, echo: bool):
        self.engine, self.echo = engine, echo
        self.received: list[bytes] = []

    def receive_datagram(self, data, addr, now):
        self.engine.receive_datagram(data, addr, now)
        self._drain(now)

    def handle_timer(self, now):
        self.engine.handle_timer(now)
        self._drain(now)

    def get_timer(self):
        return self.engine.get_timer()

    def datagrams_to_send(self):
        return self.engine.datagrams_to_send()

    def _drain(self, now):
        while (event := self.engine.next_event()) is not None:
            if isinstance(event, PacketReceived):
                self.received.append(event.packet)
                if self.echo:
                    p = event.packet
                    self.engine.send_packet(ipv4_packet(B_IP, A_IP, b"echo:" + p[20:]), now)


def describe(data: bytes) -> str:
    try:
        return MessageType(data[0]).name
    except ValueError:
        return f"type {data[0]}"


def test_through_symmetric_nat_with_loss_jitter_duplication_and_bit_flips():
    import random

    from flatnet.pki.cert import TrustStore
    from flatnet.proto.engine import TunnelEngine

    ca = make_ca()
    trust = TrustStore([ca[0]])
    a = EchoingNode(TunnelEngine(make_identity(ca, "alpha", A_IP + "/16"), trust, rng=random.Random(1), strict=True), False)
    b = EchoingNode(TunnelEngine(make_identity(ca, "bravo", B_IP + "/16"), trust, rng=random.Random(2), strict=True), True)
    a.engine.add_peer(B_IP, [("203.0.113.7", 4242)])  # bravo does not know where alpha is

    clock = FakeClock(start=T0)
    net = SimNet(clock=clock, seed=5, describe=describe,
                 default_link=LinkProfile(latency=0.02, jitter=0.01, loss=0.1, duplicate=0.05, reorder=0.1))
    nat = net.add_nat("home", public_ip="198.51.100.1", mapping=SYMMETRIC)
    net.add_node("alpha", a, ("192.168.1.10", 4242), nat=nat)
    net.add_node("bravo", b, ("203.0.113.7", 4242))
    net.add_tamper(flip_bits(probability=0.02))

    sent = []

    def send(n=0):
        if n >= 2000:
            return
        p = ipv4_packet(A_IP, B_IP, b"%06d" % n)
        sent.append(p)
        a.engine.send_packet(p, clock.now)
        clock.call_later(0.1, lambda: send(n + 1))

    send()
    net.run_for(210)

    assert len(b.received) == len(set(b.received)) and set(b.received) <= set(sent)
    assert len(b.received) > 0.8 * len(sent)  # 10% loss, and the first packets wait for a handshake
    echoes = {p[20:] for p in a.received}
    assert len(echoes) == len(a.received) > 0.7 * len(sent)
    # bravo learned alpha's public (NAT-mapped) endpoint from authenticated packets.
    assert b.engine.peers[IPv4Address(A_IP)].endpoint[0] == "198.51.100.1"
    # Flipped bits were caught and counted, never delivered.
    tampered = a.engine.drops["decrypt-failed"] + b.engine.drops["decrypt-failed"]
    assert tampered > 0
    assert a.engine.stats["initiation-sent"] >= 2  # rekeyed on the way (after 120 s)
    assert a.engine.peers[IPv4Address(B_IP)].up
