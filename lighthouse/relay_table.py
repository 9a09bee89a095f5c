"""The relay's forwarding table, sans-I/O: relay frames in, (address, frame) pairs out.

A relay session joins two nodes that cannot reach each other directly (a symmetric NAT, UDP
blocked). The lighthouse grants it (``RelayOffer`` with a token per side); each node then sends
BIND frames to the relay, and the relay forwards DATA frames from one side's bound address to the
other's. The frames' bodies are the nodes' own tunnel datagrams, encrypted end to end: the relay
can neither read nor forge them, it only decides *where* bytes go and *how many*.

Addresses are opaque hashable values chosen by the I/O layer: a UDP ``(host, port)`` or a TCP
connection's key. One table therefore serves both transports, and a session may have one side on
UDP and the other on TCP (the node behind a UDP-blocking firewall).

Rules (see ``flatnet/proto/relay.py`` for the frame format):

- BIND with a valid token creates the session if needed (up to ``max_sessions``) and binds that
  side to the sender's address; a later BIND from another address moves the side (roaming). The
  relay answers BIND_ACK. A BIND with a bad token is dropped and counted.
- DATA is forwarded only if it comes from the address bound to the side it names and the other
  side is bound; otherwise dropped and counted. Each session has a token bucket of bytes
  (``bytes_per_second``, ``burst_bytes``) so one pair cannot take the whole relay.
- A session with no BIND or DATA for ``idle_timeout`` seconds is forgotten by :meth:`tick`;
  nodes re-BIND every few seconds while they use the relay (which also keeps NATs open).

Counters: ``drop.<frame error reason>``, ``drop.bad-token``, ``drop.full``, ``drop.unknown-session``,
``drop.not-bound`` (DATA from an address not bound to that side), ``drop.peer-not-bound``,
``drop.rate-limited``, ``bind``, ``rebind``, ``forwarded``, ``forwarded.bytes``, ``expired``, and per
transport of the frame's arrival ``forwarded.bytes.udp`` / ``forwarded.bytes.tcp``. A TCP side's
address is ``(TCP_KEY, peer)`` (the relay service keys each stream so); anything else is UDP.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

from flatnet.proto.relay import (
    TYPE_BIND,
    TYPE_BIND_ACK,
    TYPE_DATA,
    RelayFrameError,
    check_relay_token,
    encode_relay_frame,
    parse_relay_frame,
)
from lighthouse.ratelimit import TokenBucket

TCP_KEY = "tcp"  # first item of a TCP stream's address key: ("tcp", (host, port))


def transport_of(addr: Hashable) -> str:
    """"tcp" for a relay TCP stream's key, "udp" for a datagram source address."""
    return "tcp" if type(addr) is tuple and addr and addr[0] == TCP_KEY else "udp"


@dataclass(frozen=True)
class RelayLimits:
    max_sessions: int = 10_000
    idle_timeout: float = 60.0
    bytes_per_second: float = 2_000_000.0  # per session, both directions together
    burst_bytes: float = 256_000.0


class RelaySession(TokenBucket):
    """Both sides' bound addresses; the bucket (inherited) meters the session's bytes."""

    __slots__ = ("session_id", "addresses", "last_seen")

    def __init__(self, session_id: bytes, burst: float, now: float) -> None:
        super().__init__(burst, now)
        self.session_id = session_id
        self.addresses: list[Hashable | None] = [None, None]
        self.last_seen = now


class RelayTable:
    def __init__(self, secret: bytes, limits: RelayLimits | None = None) -> None:
        if len(secret) < 16:
            raise ValueError("relay secret must be at least 16 bytes")
        self._secret = secret
        self.limits = limits or RelayLimits()
        self._sessions: OrderedDict[bytes, RelaySession] = OrderedDict()  # least recently seen first
        self.counters: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._sessions)

    def session(self, session_id: bytes) -> RelaySession | None:
        return self._sessions.get(session_id)

    def receive(self, data: bytes, addr: Hashable, now: float) -> list[tuple[Hashable, bytes]]:
        """One frame from *addr*; returns the frames to send and where. Never raises for bad input."""
        try:
            frame = parse_relay_frame(data)
        except RelayFrameError as exc:
            self.counters[f"drop.{exc.reason}"] += 1
            return []
        if frame.type == TYPE_BIND:
            return self._bind(frame.session_id, frame.side, frame.body, addr, now)
        if frame.type == TYPE_DATA:
            return self._forward(frame.session_id, frame.side, data, addr, now)
        self.counters["drop.unexpected-type"] += 1  # BIND_ACK travels relay -> node only
        return []

    def _bind(self, session_id: bytes, side: int, token: bytes, addr: Hashable, now: float):
        if not check_relay_token(self._secret, session_id, side, token):
            self.counters["drop.bad-token"] += 1
            return []
        session = self._sessions.get(session_id)
        if session is None:
            if len(self._sessions) >= self.limits.max_sessions:
                self.counters["drop.full"] += 1
                return []
            session = self._sessions[session_id] = RelaySession(session_id, self.limits.burst_bytes, now)
        previous = session.addresses[side]
        if previous != addr:
            session.addresses[side] = addr
            self.counters["bind" if previous is None else "rebind"] += 1
        self._touch(session, now)
        return [(addr, encode_relay_frame(TYPE_BIND_ACK, side, session_id))]

    def _forward(self, session_id: bytes, side: int, data: bytes, addr: Hashable, now: float):
        session = self._sessions.get(session_id)
        if session is None:
            self.counters["drop.unknown-session"] += 1
            return []
        if session.addresses[side] != addr:
            self.counters["drop.not-bound"] += 1
            return []
        destination = session.addresses[1 - side]
        if destination is None:
            self.counters["drop.peer-not-bound"] += 1
            return []
        if not session.take(now, self.limits.bytes_per_second, self.limits.burst_bytes, len(data)):
            self.counters["drop.rate-limited"] += 1
            return []
        self._touch(session, now)
        self.counters["forwarded"] += 1
        self.counters["forwarded.bytes"] += len(data)
        self.counters["forwarded.bytes." + transport_of(addr)] += len(data)
        return [(destination, data)]

    def _touch(self, session: RelaySession, now: float) -> None:
        session.last_seen = now
        self._sessions.move_to_end(session.session_id)

    def sessions_by_transport(self) -> dict[str, int]:
        """Sessions with at least one side bound over each transport (a mixed session counts in both)."""
        counts = {"udp": 0, "tcp": 0}
        for session in self._sessions.values():
            for transport in {transport_of(a) for a in session.addresses if a is not None}:
                counts[transport] += 1
        return counts

    def forget_address(self, addr: Hashable) -> None:
        """A TCP connection closed: unbind it wherever it was bound (O(sessions), rare)."""
        for session in self._sessions.values():
            for side in (0, 1):
                if session.addresses[side] == addr:
                    session.addresses[side] = None

    def tick(self, now: float) -> None:
        deadline = now - self.limits.idle_timeout
        sessions = self._sessions
        while sessions:
            session = next(iter(sessions.values()))
            if session.last_seen > deadline:
                break
            del sessions[session.session_id]
            self.counters["expired"] += 1

    def next_deadline(self) -> float | None:
        for session in self._sessions.values():
            return session.last_seen + self.limits.idle_timeout
        return None
