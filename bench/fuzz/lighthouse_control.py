"""Lighthouse control: what an authenticated node (any holder of a team certificate) can send.

Control messages reach :meth:`lighthouse.core.LighthouseCore.handle_control` after the tunnel has
authenticated the sender, so the attacker is a colleague's (or a stolen) certificate. Inputs: every
message type encoded, then mutated as msgpack values (a field removed, retyped, an edge-case value)
and as bytes, plus random bytes; senders are several real certificates, observed addresses vary.
Contract: ``handle_control`` never raises for any payload; records stay within ``max_nodes`` and
the stranger buckets within ``max_strangers``; every reply parses.
"""

from __future__ import annotations

import random
from ipaddress import IPv4Address, IPv4Network

import msgpack

from bench.fuzz.campaign import Surface, mutate_bytes, mutate_structure, random_bytes
from bench.fuzz.identities import make_ca, make_identity
from flatnet.proto import control as C
from lighthouse.core import LighthouseCore, LighthouseSettings

T0 = 1_800_000_000.0


def seed_messages() -> list[bytes]:
    ip = IPv4Address("10.87.1.1")
    ep = ("192.0.2.1", 4242)
    svc = C.Service("web", IPv4Address("10.87.1.5"), 8080)
    relay = C.Relay(C.TRANSPORT_UDP, ("192.0.2.100", 4243))
    cursor = C.CatalogueCursor(ip, 3)
    msgs = [
        C.Register(ip, (IPv4Network("10.87.1.0/24"),), (ep, ("10.0.0.5", 4242))),
        C.Register(ip),
        C.RegisterAck(ep, 60, True),
        C.Query(7, IPv4Address("10.87.2.5")),
        C.QueryReply(7, IPv4Address("10.87.2.5"), True, IPv4Address("10.87.2.1"), (ep,), (relay,), 60),
        C.PunchNotify(IPv4Address("10.87.2.1"), (ep,)),
        C.ServicePublish((svc, C.Service("db", IPv4Address("10.87.1.6"), 5432))),
        C.CatalogueQuery(9),
        C.CatalogueQuery(9, cursor),
        C.CatalogueReply(9, (C.CatalogueEntry("alpha", ip, svc),), cursor),
        C.RelayRequest(11, IPv4Address("10.87.2.1")),
        C.RelayOffer(11, IPv4Address("10.87.2.1"), bytes(8), 0, bytes(16), (relay,)),
        C.Refused(11, sorted(C.REFUSAL_REASONS)[0]),
    ]
    return [C.encode_control_message(m) for m in msgs]


class LighthouseControlSurface(Surface):
    name = "lighthouse-control"
    description = "parse_control_message + LighthouseCore.handle_control"

    def setup(self, rng: random.Random) -> None:
        ca = make_ca()
        self.certs = [make_identity(ca, f"host{n}", f"10.87.{n}.1/16", [f"10.87.{n}.0/24"])[0] for n in range(1, 6)]
        self.settings = LighthouseSettings(max_nodes=3, max_strangers=4, rate=1e9, burst=1e9)
        self.core = LighthouseCore(self.settings, relays=(C.Relay(C.TRANSPORT_UDP, ("192.0.2.100", 4243)),),
                                   relay_secret=b"s" * 32, random_bytes=rng.randbytes)
        self.seeds = seed_messages()
        self.decoded = [msgpack.unpackb(s, raw=False) for s in self.seeds]
        self.now = T0
        self.replies = 0

    def generate(self, rng: random.Random):
        r = rng.random()
        if r < 0.15:
            payload = rng.choice(self.seeds)
        elif r < 0.6:
            try:
                payload = msgpack.packb(mutate_structure(rng.choice(self.decoded), rng), use_bin_type=True)
            except (ValueError, TypeError, OverflowError):
                payload = rng.choice(self.seeds)
        elif r < 0.9:
            payload = mutate_bytes(rng.choice(self.seeds), rng, self.seeds)
        else:
            payload = random_bytes(rng, 600)
        addr = rng.choice((("192.0.2.1", 4242), ("10.0.0.5", 1), ("::1", 80), ("198.51.100.7", 65535)))
        return payload, rng.choice(self.certs), addr

    def feed(self, item) -> None:
        payload, cert, addr = item
        self.now += 0.01
        for out in self.core.handle_control(payload, cert, addr, self.now):
            C.parse_control_message(out.payload)  # what the lighthouse says must parse
            self.replies += 1
        if int(self.now * 100) % 1000 == 0:
            self.core.tick(self.now)

    def check(self) -> list[str]:
        problems = []
        if len(self.core) > self.settings.max_nodes:
            problems.append(f"{len(self.core)} records > max_nodes {self.settings.max_nodes}")
        if len(self.core._strangers) > self.settings.max_strangers:
            problems.append(f"{len(self.core._strangers)} stranger buckets")
        self.core.tick(self.now + 10_000)
        if len(self.core):
            problems.append("records outlived their ttl")
        return problems

    def stats(self) -> dict:
        return {"replies": self.replies, "top_counters": dict(self.core.counters.most_common(10))}
