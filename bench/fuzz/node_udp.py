"""Node UDP: what any host on the underlay can send to a node's port.

The target is the node's receive path as deployed: :class:`flatnet.node.dataplane.Dataplane`
(fragment reassembly, GRO trains, the batch parser, anti-spoofing, firewall, TCP merging) over a
real :class:`~flatnet.proto.engine.TunnelEngine` (handshakes, cookies, replay window). A second
engine ("alpha") holds a live session with it, so most inputs are *sealed with the real session*
around a mutated plaintext — batch records carrying scapy-crafted IPv4/IPv6/TCP/UDP/ICMP packets,
valid and mutated, spoofed and not — and so reach the code behind the AEAD. The rest are captured
handshake/cookie/data/fragment datagrams mutated byte-wise, and random bytes.

Contract checked: nothing raises out of ``udp_datagram``/``handle_timer``; afterwards a valid
packet from alpha still arrives (bad input broke nothing) and state stays bounded.
"""

from __future__ import annotations

import random
import struct
from ipaddress import IPv4Address, ip_network

from bench.fuzz.campaign import Surface, mutate_bytes, random_bytes
from bench.fuzz.identities import make_ca, make_identity
from flatnet.firewall import Firewall
from flatnet.node.dataplane import Dataplane, DataplaneSettings
from flatnet.node.packet import internet_checksum
from flatnet.pki.cert import TrustStore
from flatnet.proto import batch as B
from flatnet.proto.constants import MAX_QUEUED_PACKETS
from flatnet.proto.engine import TunnelEngine
from flatnet.proto.header import MessageType

A_IP, B_IP = "10.87.1.1", "10.87.2.1"
A_ADDR, B_ADDR = ("192.0.2.1", 4242), ("192.0.2.2", 4242)
T0 = 1_800_000_000.0
BUDGET = 1472


def scapy_packets(rng: random.Random, count: int) -> list[bytes]:
    """Inner packets as a peer might send them: mostly well-formed, some spoofed or odd."""
    from scapy.layers.inet import ICMP, IP, TCP, UDP, fragment
    from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
    from scapy.packet import Raw

    out = []
    for i in range(count):
        src = rng.choice(["10.87.1.1", "10.87.1.7", "10.87.1.200", "10.87.2.9", "10.87.3.1", "192.0.2.1", "0.0.0.0"])
        dst = rng.choice(["10.87.2.1", "10.87.2.5", "10.87.2.255", "10.87.1.1", "8.8.8.8", "255.255.255.255"])
        payload = Raw(rng.randbytes(rng.choice((0, 1, 10, 100, 1200, 3000))))
        kind = i % 7
        ip = IP(src=src, dst=dst, ttl=rng.choice((0, 1, 64)), flags=rng.choice((0, 2)), id=rng.randrange(65536))
        if kind == 0:
            pkt = ip / TCP(sport=rng.randrange(65536), dport=rng.choice((80, 443, 22)), seq=rng.randrange(2**32),
                           flags=rng.choice(("S", "SA", "A", "PA", "F", "R", "")),
                           options=rng.choice(([], [("MSS", 1360)], [("NOP", None), ("WScale", 7)]))) / payload
        elif kind == 1:
            pkt = ip / UDP(sport=rng.randrange(65536), dport=rng.randrange(65536)) / payload
        elif kind == 2:
            pkt = ip / ICMP(type=rng.choice((0, 3, 8, 11)), code=rng.choice((0, 4))) / payload
        elif kind == 3:
            frags = fragment(ip / UDP(dport=53) / Raw(rng.randbytes(2000)), fragsize=rng.choice((8, 200, 1000)))
            out.extend(bytes(f) for f in frags[:3])
            continue
        elif kind == 4:
            pkt = IP(src=src, dst=dst, ihl=rng.choice((5, 6, 15)), options=[], proto=rng.randrange(256)) / payload
        elif kind == 5:
            pkt = IPv6(src="fd87::1", dst="fd87::2") / ICMPv6EchoRequest() / payload
        else:
            pkt = ip / TCP(dport=80, flags="A", seq=1000 + 1360 * (i % 5)) / Raw(b"x" * 1360)
        out.append(bytes(pkt))
    return out


class NodeUdpSurface(Surface):
    name = "node-udp"
    description = "TunnelEngine.receive path + the data plane's batch/fragment parsers"

    def setup(self, rng: random.Random) -> None:
        ca = make_ca()
        trust = TrustStore([ca[0]])
        self.a = TunnelEngine(make_identity(ca, "alpha", A_IP + "/16", ["10.87.1.0/24"]), trust, rng=random.Random(1))
        self.b = TunnelEngine(make_identity(ca, "bravo", B_IP + "/16", ["10.87.2.0/24"]), trust, rng=random.Random(2))
        self.a.add_peer(B_IP, [B_ADDR])
        self.b.add_peer(A_IP, [A_ADDR])
        settings = DataplaneSettings(
            local_ip=IPv4Address(B_IP),
            local_networks=(ip_network(B_IP + "/32"), ip_network("10.87.2.0/24")),
            overlay_mtu=1400,
            datagram_budget=BUDGET,
        )
        self.dp = Dataplane(self.b, Firewall(), settings)
        self.now = T0
        self.inputs = 0
        self.tun_writes = 0
        self.seeds: list[bytes] = []  # datagrams captured on the wire between alpha and bravo
        self._capture = True
        self.a.send_packet(self._probe(0), self.now)
        self._exchange()
        if self.a.session_for(IPv4Address(B_IP), self.now) is None:
            raise RuntimeError("alpha and bravo did not complete their handshake")
        # a few data and batch messages, fragments too, as seeds
        self.packets = scapy_packets(rng, 400)
        for pkt in self.packets[:40]:
            self.seeds.append(self._seal(B.encode_record(pkt), MessageType.DATA_BATCH))
        big = self._seal(b"".join(B.encode_record(p) for p in self.packets[40:50] if len(p) < 4000), MessageType.DATA_BATCH)
        buffer, segment = B.encode_fragments(big, 7, BUDGET)
        self.seeds.extend(buffer[i : i + segment] for i in range(0, len(buffer), segment))
        self._capture = False
        self.dp.take_tun_writes()

    # -- the wire between alpha and bravo ---------------------------------------------------------

    @staticmethod
    def _probe(n: int) -> bytes:
        """An IPv4/UDP packet alpha -> bravo whose payload ends in ``probe-<n>``."""
        payload = b"probe-%d" % n
        udp = struct.pack("!HHHH", 40000, 7, 8 + len(payload), 0) + payload
        header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), n & 0xFFFF, 0, 64, 17, 0,
                                       IPv4Address(A_IP).packed, IPv4Address(B_IP).packed))
        struct.pack_into("!H", header, 10, internet_checksum(header))
        return bytes(header) + udp

    def _exchange(self, rounds: int = 10) -> None:
        for _ in range(rounds):
            moved = False
            for data, _addr in self.a.datagrams_to_send():
                moved = True
                if self._capture:
                    self.seeds.append(bytes(data))
                self.dp.udp_datagram(data, A_ADDR, self.now)
            for data, _addr, _segment in self.dp.take_udp_sends():
                moved = True
                if self._capture:
                    self.seeds.append(bytes(data))
                self.a.receive_datagram(bytes(data), B_ADDR, self.now)
            while self.a.next_event() is not None:
                pass
            if not moved:
                return

    def _seal(self, payload: bytes, msg_type: MessageType) -> bytes:
        session = self.a.session_for(IPv4Address(B_IP), self.now)
        if session is None:
            raise RuntimeError("alpha lost its session with bravo")
        return session.seal(payload, msg_type, self.now)

    # -- inputs -----------------------------------------------------------------------------------

    def generate(self, rng: random.Random):
        r = rng.random()
        if r < 0.45:  # sealed around a mutated batch: reaches the batch parser and the packet checks
            records = []
            for _ in range(rng.choice((1, 1, 2, 4))):
                pkt = rng.choice(self.packets)
                if rng.random() < 0.5:
                    pkt = mutate_bytes(pkt, rng)
                if not pkt:
                    continue
                flags = rng.choice((0, 0, B.FLAG_NEEDS_CSUM))
                gso = rng.choice((0, 0, 0, 1360, 1, 65535))
                records.append(B.RECORD_HEADER.pack(B.RECORD_IP_PACKET, flags, min(len(pkt), 65535), gso) + pkt[:65535])
            payload = b"".join(records)
            if rng.random() < 0.3:
                payload = mutate_bytes(payload, rng)
            return ("sealed", MessageType.DATA_BATCH, payload, rng.random() < 0.1, rng.random() < 0.05)
        if r < 0.55:
            pkt = rng.choice(self.packets)
            return ("sealed", MessageType.DATA, mutate_bytes(pkt, rng) if rng.random() < 0.5 else pkt,
                    False, rng.random() < 0.05)
        if r < 0.58:
            return ("sealed", rng.choice((MessageType.CONTROL, MessageType.RELAY)), random_bytes(rng), False, False)
        if r < 0.85:
            data = mutate_bytes(rng.choice(self.seeds), rng, self.seeds)
            return ("raw", data, rng.choice((0, 0, 0, 0, 64, BUDGET)), rng.random() < 0.05)
        data = random_bytes(rng, 1600)
        if data and rng.random() < 0.5:
            data = bytes([rng.choice((1, 2, 3, 4, 5, 6, 7, 8, B.FRAGMENT_TYPE))]) + data[1:]
        return ("raw", data, 0, rng.random() < 0.05)

    def feed(self, item) -> None:
        self.inputs += 1
        self.now += 0.0001
        if item[0] == "sealed":
            _, msg_type, payload, fragmented, elsewhere = item
            data = self._seal(payload, msg_type)
            addr = ("198.51.100.9", 999) if elsewhere else A_ADDR
            budget = max(64, len(data) // 3) if fragmented else BUDGET
            if len(data) > budget:
                try:  # the harness's own choice of budget may not fit the fragment count limits
                    buffer, segment = B.encode_fragments(data, self.inputs & 0xFFFFFFFF, budget)
                except ValueError:
                    buffer, segment = data, 0
                if segment and self.inputs % 2:  # as one GRO read, or fragment by fragment
                    for at in range(0, len(buffer), segment):
                        self.dp.udp_datagram(buffer[at : at + segment], addr, self.now)
                else:
                    self.dp.udp_datagram(buffer, addr, self.now, segment)
            else:
                self.dp.udp_datagram(data, addr, self.now)
        else:
            _, data, segment, elsewhere = item
            addr = ("198.51.100.9", 999) if elsewhere else A_ADDR
            self.dp.udp_datagram(data, addr, self.now, segment)
        self.tun_writes += len(self.dp.take_tun_writes())
        if self.inputs % 64 == 0:
            timer = self.dp.get_timer()
            if timer is not None and timer <= self.now:
                self.dp.handle_timer(self.now)
            self.a.handle_timer(self.now)
            self._exchange()
            if self.inputs % 4096 == 0:  # alpha keeps talking, so the session lives (keepalives, rekeys)
                self.a.send_packet(self._probe(self.inputs), self.now)
                self._exchange()

    # -- after ------------------------------------------------------------------------------------

    def check(self) -> list[str]:
        problems = []
        self.now += 1
        self.a.handle_timer(self.now)
        self.dp.handle_timer(self.now)
        self._exchange()
        self.dp.take_tun_writes()
        self.a.send_packet(self._probe(999_999), self.now)
        self._exchange()
        writes = self.dp.take_tun_writes()
        if not any(bytes(w).endswith(b"probe-999999") for w in writes):
            problems.append("a valid packet from alpha no longer reaches bravo's TUN after the campaign")
        if len(self.b._sessions) > 3 * len(self.b._peers):
            problems.append(f"bravo holds {len(self.b._sessions)} sessions for {len(self.b._peers)} peers")
        for peer in self.b._peers.values():
            if len(peer.queue) > MAX_QUEUED_PACKETS:
                problems.append(f"queue of {len(peer.queue)} packets")
        if len(self.dp.reassembly) > self.dp.reassembly.max_messages:
            problems.append(f"reassembly holds {len(self.dp.reassembly)} messages")
        return problems

    def stats(self) -> dict:
        drops = self.dp.drops + self.b.drops
        return {"tun_writes": self.tun_writes, "top_drops": dict(drops.most_common(8))}
