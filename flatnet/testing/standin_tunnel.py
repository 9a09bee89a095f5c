"""A stand-in for the tunnel engine's data API, for measuring and testing the data plane alone.

It does exactly the per-message work the real session does on the data path — one
ChaCha20-Poly1305 seal or open per message with a 16-byte header as associated data — and nothing
else: no handshake (both sides share keys from the start), no replay window, no timers. The data
plane codes against the same method names as ``flatnet.proto`` (``session_for``, ``seal``,
``open_data``, ``allows_source``), so the real engine drops in.

Header (associated data)::

    0        1                          4                                   8
    +--------+--------------------------+-----------------------------------+
    |  type  |         reserved         |          receiver index           |
    +--------+--------------------------+-----------------------------------+
    |                          counter (u64, the nonce)                     |
    +-----------------------------------------------------------------------+
"""

from __future__ import annotations

import ipaddress
import struct
from collections import Counter, deque
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

DATA = 4
DATA_BATCH = 5
HEADER = struct.Struct("<B3xIQ")
HEADER_LEN = HEADER.size
TAG_LEN = 16


@dataclass(frozen=True)
class PacketReceived:
    packet: bytes
    peer_ip: ipaddress.IPv4Address


@dataclass
class StandinSession:
    peer_ip: ipaddress.IPv4Address
    endpoint: tuple[str, int]
    send_key: bytes
    receive_key: bytes
    receiver_index: int
    allowed: list[ipaddress.IPv4Network]
    peer_name: str = ""
    peer_groups: tuple[str, ...] = ()
    counter: int = 0
    tx_bytes: int = 0
    rx_bytes: int = 0

    def __post_init__(self) -> None:
        self._seal = ChaCha20Poly1305(self.send_key).encrypt
        self._open = ChaCha20Poly1305(self.receive_key).decrypt

    def seal(self, payload, msg_type: int, now: float) -> bytes:
        counter = self.counter
        self.counter += 1
        header = HEADER.pack(msg_type, self.receiver_index, counter)
        nonce = b"\x00\x00\x00\x00" + counter.to_bytes(8, "little")
        out = header + self._seal(nonce, bytes(payload), header)
        self.tx_bytes += len(out)
        return out

    def allows_source(self, ip) -> bool:
        address = ipaddress.ip_address(ip)
        return any(address in net for net in self.allowed)


@dataclass
class StandinEngine:
    """One side of a pre-keyed pair made by :func:`standin_pair`."""

    local_ip: ipaddress.IPv4Address
    sessions: dict = field(default_factory=dict)  # peer Flatnet IP -> session
    by_index: dict = field(default_factory=dict)  # receiver index -> session
    drops: Counter = field(default_factory=Counter)
    _events: deque = field(default_factory=deque)
    _out: list = field(default_factory=list)

    @property
    def peers(self) -> dict:
        return self.sessions

    def session_for(self, dst_ip, now: float):
        for session in self.sessions.values():
            if session.allows_source(dst_ip):
                return session
        return None

    def open_data(self, datagram, addr, now: float):
        if len(datagram) < HEADER_LEN + TAG_LEN:
            self.drops["short"] += 1
            return None
        msg_type, index, counter = HEADER.unpack_from(datagram, 0)
        session = self.by_index.get(index)
        if session is None or msg_type not in (DATA, DATA_BATCH):
            self.drops["unknown_index"] += 1
            return None
        header = bytes(datagram[:HEADER_LEN])
        nonce = b"\x00\x00\x00\x00" + counter.to_bytes(8, "little")
        try:
            plaintext = session._open(nonce, bytes(datagram[HEADER_LEN:]), header)
        except Exception:
            self.drops["auth"] += 1
            return None
        session.rx_bytes += len(datagram)
        session.endpoint = addr
        return session, msg_type, plaintext

    def send_packet(self, inner, now: float) -> None:
        dst = ipaddress.ip_address(bytes(inner[16:20])) if len(inner) >= 20 else None
        session = self.session_for(dst, now) if dst else None
        if session is None:
            self.drops["no_route"] += 1
            return
        self._out.append((session.seal(inner, DATA, now), session.endpoint))

    def receive_datagram(self, data, addr, now: float) -> None:
        result = self.open_data(data, addr, now)
        if result is not None:
            session, msg_type, plaintext = result
            if msg_type == DATA:
                self._events.append(PacketReceived(plaintext, session.peer_ip))

    def handle_timer(self, now: float) -> None:
        pass

    def get_timer(self):
        return None

    def datagrams_to_send(self) -> list:
        out, self._out = self._out, []
        return out

    def next_event(self):
        return self._events.popleft() if self._events else None


def standin_pair(
    a_ip: str,
    a_nets: list[str],
    a_endpoint: tuple[str, int],
    b_ip: str,
    b_nets: list[str],
    b_endpoint: tuple[str, int],
    key_seed: bytes = b"flatnet-standin",
) -> tuple[StandinEngine, StandinEngine]:
    """Two engines with an established session between them (fixed keys: tests and benches only)."""
    import hashlib

    k1 = hashlib.sha256(key_seed + b"a->b").digest()
    k2 = hashlib.sha256(key_seed + b"b->a").digest()
    a = StandinEngine(ipaddress.ip_address(a_ip))
    b = StandinEngine(ipaddress.ip_address(b_ip))
    a_to_b = StandinSession(ipaddress.ip_address(b_ip), b_endpoint, k1, k2, 2, [ipaddress.ip_network(n) for n in b_nets], "b")
    b_to_a = StandinSession(ipaddress.ip_address(a_ip), a_endpoint, k2, k1, 1, [ipaddress.ip_network(n) for n in a_nets], "a")
    a.sessions[a_to_b.peer_ip] = a_to_b
    a.by_index[1] = a_to_b  # a receives with index 1 (b sends with receiver index 1)
    b.sessions[b_to_a.peer_ip] = b_to_a
    b.by_index[2] = b_to_a
    return a, b
