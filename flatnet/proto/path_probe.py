"""Wire format of path probes (PING/PONG between two nodes, on one candidate path). Sans-I/O.

Graceful Escalation (``flatnet/escalation.py``) needs to know, per candidate path to a peer (a
LAN address, a punched public address, a relay session), whether a datagram sent on it comes
back. A probe is a PING with a fresh random nonce; the peer answers a PONG echoing the nonce on
the path the PING arrived on. Probes travel outside the tunnel's sessions (they must work on a
path before the tunnel uses it, and the tunnel engine sends only to one endpoint per peer), so
they carry their own MAC::

     0       1       2       3       4               8                      16
    +-------+-------+-------+-------+---------------+----------------------+------------------+
    | 0xFC  |version| kind  |   0   | sender IPv4   |   nonce (8 bytes)    |  mac (16 bytes)  |
    +-------+-------+-------+-------+---------------+----------------------+------------------+

    0xFC     PROBE_TYPE: not a tunnel message type (those are 1..8, the data plane's fragment
             envelope is 0xFB), so the node's socket layer demultiplexes probes before the engine
    kind     1 PING, 2 PONG (echoes the PING's nonce)
    sender   the sender's Flatnet IP: tells the receiver which key to check the MAC with
    mac      HMAC-SHA256(probe key, bytes 0..15 | receiver IPv4)[:16]

probe key = HKDF-SHA256(X25519(own static key, peer's static key from its certificate),
info = "flatnet path probe v1" | lower IPv4 | higher IPv4). Both ends derive the same key from
their certificates' keys (the static-static DH of Noise IX, used here for this one purpose under its
own label). An off-path attacker can neither forge a PONG (it lacks the key, and the nonce is
fresh) nor make a node take an address it has not confirmed: a PING from a new address only makes
the receiver probe that address itself, and only its own authenticated PONG confirms it.

Errors: :func:`parse_path_probe` raises :class:`PathProbeError` (``reason``); callers count and drop.
"""

from __future__ import annotations

import hmac as _stdlib_hmac
import struct
from dataclasses import dataclass
from ipaddress import IPv4Address

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.hmac import HMAC
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PROBE_TYPE = 0xFC
PROBE_VERSION = 1
KIND_PING = 1
KIND_PONG = 2
NONCE_SIZE = 8
PROBE_MAC_SIZE = 16
PROBE_SIZE = 32

_HEADER = struct.Struct("!BBBx4s8s")  # 16 bytes, then the MAC
_KEY_LABEL = b"flatnet path probe v1"

REASONS = frozenset({"size", "unsupported-version", "unknown-kind"})


class PathProbeError(Exception):
    def __init__(self, reason: str) -> None:
        assert reason in REASONS, reason
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True, slots=True)
class PathProbe:
    kind: int
    sender: IPv4Address
    nonce: bytes
    mac: bytes
    signed: bytes  # bytes 0..15, what the MAC covers (with the receiver's address)


def is_path_probe(data: bytes) -> bool:
    return len(data) > 0 and data[0] == PROBE_TYPE


def derive_probe_key(
    own_key: X25519PrivateKey, own_ip: IPv4Address, peer_public: bytes, peer_ip: IPv4Address
) -> bytes:
    shared = own_key.exchange(X25519PublicKey.from_public_bytes(peer_public))
    low, high = sorted((IPv4Address(own_ip), IPv4Address(peer_ip)))
    return HKDF(hashes.SHA256(), 32, salt=None, info=_KEY_LABEL + low.packed + high.packed).derive(shared)


def _mac(key: bytes, signed: bytes, receiver: IPv4Address) -> bytes:
    mac = HMAC(key, hashes.SHA256())
    mac.update(signed + receiver.packed)
    return mac.finalize()[:PROBE_MAC_SIZE]


def encode_path_probe(kind: int, sender: IPv4Address, receiver: IPv4Address, nonce: bytes, key: bytes) -> bytes:
    if kind not in (KIND_PING, KIND_PONG) or len(nonce) != NONCE_SIZE:
        raise ValueError("bad probe kind or nonce")
    signed = _HEADER.pack(PROBE_TYPE, PROBE_VERSION, kind, IPv4Address(sender).packed, nonce)
    return signed + _mac(key, signed, IPv4Address(receiver))


def parse_path_probe(data: bytes) -> PathProbe:
    if len(data) != PROBE_SIZE or data[0] != PROBE_TYPE:
        raise PathProbeError("size")
    _, version, kind, sender, nonce = _HEADER.unpack_from(data)
    if version != PROBE_VERSION:
        raise PathProbeError("unsupported-version")
    if kind not in (KIND_PING, KIND_PONG):
        raise PathProbeError("unknown-kind")
    return PathProbe(kind, IPv4Address(sender), nonce, bytes(data[16:]), bytes(data[:16]))


def check_path_probe(probe: PathProbe, key: bytes, receiver: IPv4Address) -> bool:
    return _stdlib_hmac.compare_digest(_mac(key, probe.signed, IPv4Address(receiver)), probe.mac)
