"""Two data planes with real tunnel engines, joined by in-memory TUN and UDP twins, on a fake clock."""

from __future__ import annotations

import ipaddress
import random
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from flatnet.firewall import Firewall, FirewallConfig
from flatnet.node import packet as P
from flatnet.node.dataplane import Dataplane, DataplaneSettings
from flatnet.node.service import DataplaneIO, pump
from flatnet.pki.cert import TrustStore, new_ca, sign_host
from flatnet.proto.engine import TunnelEngine
from flatnet.testing.tun_twin import TunTwin
from flatnet.testing.udp_twin import UdpNetwork

T0 = 1_800_000_000.0
FAR = 2**40
A_IP, B_IP = "10.87.1.1", "10.87.2.1"
A_NET, B_NET = "10.87.1.0/24", "10.87.2.0/24"
A_ADDR, B_ADDR = ("192.168.87.1", 4242), ("192.168.87.2", 4242)


@dataclass
class Side:
    name: str
    ip: str
    dataplane: Dataplane
    tun: TunTwin
    io: DataplaneIO
    engine: TunnelEngine


class Pair:
    def __init__(self, network: UdpNetwork | None = None, overlay_mtu: int = 1434, budget: int = 1472,
                 max_cap: int = 16, adaptive: bool = True, firewall_b: FirewallConfig | None = None, groups_a=("hosts",),
                 parity: str = "auto"):
        self.parity = parity
        self.now = T0
        self.network = network or UdpNetwork()
        ca_cert, ca_key = new_ca("team", not_after=FAR)
        self.ca = (ca_cert, ca_key)
        trust = TrustStore([ca_cert])
        self.a = self._side("a", A_IP, A_NET, A_ADDR, B_IP, B_ADDR, trust, overlay_mtu, budget, max_cap, adaptive, None, groups_a)
        self.b = self._side("b", B_IP, B_NET, B_ADDR, A_IP, A_ADDR, trust, overlay_mtu, budget, max_cap, adaptive, firewall_b, ("hosts",))

    def _side(self, name, ip, net, addr, peer_ip, peer_addr, trust, mtu, budget, cap, adaptive, fw, groups) -> Side:
        key = X25519PrivateKey.generate()
        cert = sign_host(self.ca[0], self.ca[1], f"host-{name}", f"{ip}/16", [net], list(groups),
                         key.public_key().public_bytes_raw(), 0, FAR)
        engine = TunnelEngine((cert, key), trust, rng=random.Random(name), strict=True)
        engine.add_peer(peer_ip, [peer_addr])
        settings = DataplaneSettings(
            local_ip=ipaddress.ip_address(ip),
            local_networks=(ipaddress.ip_network(f"{ip}/32"), ipaddress.ip_network(net)),
            overlay_mtu=mtu, datagram_budget=budget, max_cap=cap, adaptive_cap=adaptive, parity=self.parity,
        )
        dataplane = Dataplane(engine, Firewall(fw), settings, rng=random.Random(name))
        tun = TunTwin(name)
        io = DataplaneIO(dataplane, tun, self.network.endpoint(addr))
        return Side(name, ip, dataplane, tun, io, engine)

    def run(self, rounds: int = 20) -> None:
        for _ in range(rounds):
            moved = pump(self.a.io, self.now) + pump(self.b.io, self.now)
            if not moved and not self.a.io.udp.inbox and not self.b.io.udp.inbox:
                break

    def advance(self, seconds: float) -> None:
        self.now += seconds
        for side in (self.a, self.b):
            side.dataplane.handle_timer(self.now)
        self.run()

    def establish(self) -> None:
        """Handshake by sending one ping each way; the pings are delivered (queued while handshaking)."""
        self.a.tun.inject(frame(icmp_echo(A_IP, B_IP)))
        self.run()
        self.b.tun.written.clear()
        assert self.a.engine.session_for(ipaddress.ip_address(B_IP), self.now) is not None


def frame(pkt: bytes, vnet: bytes = P.ZERO_VNET_HDR) -> bytes:
    return vnet + pkt


def ipv4(src: str, dst: str, proto: int, body: bytes, df: bool = True, ident: int = 1) -> bytes:
    total = 20 + len(body)
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, ident, 0x4000 if df else 0, 64, proto, 0,
                                ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed))
    struct.pack_into("!H", hdr, 10, P.internet_checksum(hdr))
    return bytes(hdr) + body


def icmp_echo(src: str, dst: str, payload: bytes = b"ping" * 8, seq: int = 1) -> bytes:
    body = bytearray(struct.pack("!BBHHH", 8, 0, 0, 7, seq) + payload)
    struct.pack_into("!H", body, 2, P.internet_checksum(body))
    return ipv4(src, dst, 1, bytes(body))


def udp(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    body = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    pkt = bytearray(ipv4(src, dst, 17, body))
    P.complete_checksum(pkt, P.parse_flow(pkt))
    return bytes(pkt)


def tcp(src: str, dst: str, sport: int, dport: int, seq: int, payload: bytes, flags: int = 0x10, ack: int = 1,
        partial: bool = False) -> bytes:
    """A TCP packet; *partial*: checksum field holds the pseudo-header sum (as a NEEDS_CSUM TUN read)."""
    options = b"\x01\x01\x08\x0a" + struct.pack("!II", 1000, 2000)  # NOP NOP timestamps: 32-byte header
    th = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, (32 // 4) << 4, flags, 500, 0, 0) + options
    pkt = bytearray(ipv4(src, dst, 6, th + payload))
    flow = P.parse_flow(pkt)
    if partial:
        P.prepare_partial_checksum(pkt, flow)
    else:
        P.complete_checksum(pkt, flow)
    return bytes(pkt)


def tso_frame(pkt: bytes, mss: int) -> bytes:
    """A TUN read of a TCP super-packet: NEEDS_CSUM + GSO_TCPV4, as the kernel hands it with TSO."""
    hdr = P.VNET_HDR.pack(P.VNET_NEEDS_CSUM, P.GSO_TCPV4, 20 + 32, mss, 20, 16)
    return hdr + pkt


def finished_packets(frames: list[bytes]) -> list[bytes]:
    """What the kernel makes of TUN writes: checksums completed, super-packets cut at gso_size."""
    out = []
    for f in frames:
        flags, gso_type, hdr_len, gso_size, cstart, coff = P.VNET_HDR.unpack_from(f)
        pkt = bytearray(f[P.VNET_HDR_LEN:])
        flow = P.parse_flow(pkt)
        if gso_type != P.GSO_NONE:
            head, payload = pkt[:hdr_len], pkt[hdr_len:]
            seq = struct.unpack_from("!I", head, 24)[0]
            for i in range(0, len(payload), gso_size):
                seg = bytearray(head) + payload[i:i + gso_size]
                struct.pack_into("!H", seg, 2, len(seg))
                struct.pack_into("!H", seg, 10, P.ipv4_header_checksum(seg, 20))
                struct.pack_into("!I", seg, 24, (seq + i) & 0xFFFFFFFF)
                if i + gso_size < len(payload):
                    seg[33] &= ~(P.TCP_PSH | P.TCP_FIN)  # as tcp_gso_segment: only the last keeps them
                P.complete_checksum(seg, P.parse_flow(seg))
                out.append(bytes(seg))
        else:
            if flags & P.VNET_NEEDS_CSUM:
                P.complete_checksum(pkt, flow)
            out.append(bytes(pkt))
    return out
