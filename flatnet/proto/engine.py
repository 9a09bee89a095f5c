"""The tunnel engine: every peer's handshakes, sessions and timers, sans-I/O.

Theory of operation
-------------------
Bytes and `now` (Unix seconds, float) go in; datagrams to send, one next deadline and events come
out. The caller (flatnet.node) owns the socket, the TUN and the clock:

    engine.send_packet(inner, now)            # from the TUN
    engine.receive_datagram(data, addr, now)  # from the UDP socket
    engine.handle_timer(now)                  # when get_timer() is reached
    then: datagrams_to_send(), next_event() until None, get_timer() to re-arm.

Per peer (keyed by its Flatnet IP, the address in its certificate) there are up to three sessions
(WireGuard's keypair slots): `current` (sends), `previous` (still receives, so nothing in flight is
lost across a rekey) and `next` (a session we answered as responder, unconfirmed until the
initiator's first transport message arrives on it). At most one handshake we initiated is
`pending`. The transitions, all here:

    event                                   | effect
    ----------------------------------------+--------------------------------------------------------
    packet to send, no usable current       | queue it (bounded); start a handshake if none pending
    packet to send, no peer owns its dst    | drop it ("no-route"); handshake with every peer whose
                                            | certificate (so whose subnets) is not known yet
    send on current we initiated, age >= 120s| start a handshake (keep sending on current)
      or counter >= REKEY_AFTER_MESSAGES    |
    receive on current we initiated,        | start a handshake
      age >= 165 s                          |
    pending, retry time reached             | new initiation (new ephemeral, jittered 5 s timer)
    pending, 90 s since the first attempt   | give up: HandshakeFailed, drop the queue
    valid response to pending               | new current (previous <- old current); flush queue or
                                            | send a keepalive (confirms us to the responder)
    valid initiation                        | answer; the new session waits in `next`
    valid initiation while pending          | lower static key keeps initiating: it drops theirs
      (simultaneous initiation)             | and retries its own after 1 s, not 5 s, if still
                                            | unanswered; higher key abandons its own, answers
    first transport message on `next`       | next becomes current (previous <- old current); flush
    session age >= 180 s (REJECT)           | forget it; if it was current: PeerDown
    received, nothing sent for 10 s         | keepalive (passive keepalive)
    sent data, nothing received for 15 s    | start a handshake (the peer may have lost state)

Error contract (as nebula's): a datagram that fails any check is dropped and counted in `drops`
under its reason, before any state changes; nothing from the network raises out of
`receive_datagram`/`open_data`. Misuse of the API raises.
"""

from __future__ import annotations

import os
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from flatnet.pki.cert import Certificate, CertificateError
from flatnet.proto import handshake
from flatnet.proto.constants import (
    COOKIE_MAX_AGE,
    KEEPALIVE_TIMEOUT,
    MAX_QUEUED_PACKETS,
    NEW_HANDSHAKE_AFTER_SILENCE,
    REJECT_AFTER_TIME,
    REKEY_AFTER_MESSAGES,
    REKEY_AFTER_TIME,
    REKEY_ATTEMPT_TIME,
    REKEY_ON_RECEIVE_AGE,
    REKEY_TIMEOUT,
    REKEY_TIMEOUT_JITTER_MAX,
    SIMULTANEOUS_INITIATION_RETRY,
    UNROUTED_HOLD_TIME,
)
from flatnet.proto.cookie_reply import encode_cookie_reply, parse_cookie_reply
from flatnet.proto.cookies import CookieChecker, NetworkMacs
from flatnet.proto.errors import MalformedMessage, NoiseError, UnknownPeerError
from flatnet.proto.events import (
    BatchReceived,
    ControlReceived,
    Event,
    HandshakeFailed,
    PacketReceived,
    PeerDown,
    PeerRoamed,
    PeerUp,
    Rekeyed,
    RelayReceived,
)
from flatnet.proto.handshake_messages import (
    encode_handshake_initiation_body,
    encode_handshake_response_body,
    parse_handshake_initiation,
    parse_handshake_response,
)
from flatnet.proto.header import MessageType, parse_prefix
from flatnet.proto.noise import HandshakeState, public_bytes
from flatnet.proto.ratelimit import HandshakeRateLimiter
from flatnet.proto.session import TransportSession
from flatnet.proto.transport_header import HEADER, TRANSPORT_OVERHEAD

Address = tuple  # (host, port): whatever the caller's socket uses; the engine only compares and returns it

_unpack_header = HEADER.unpack_from
_DATA, _BATCH, _CONTROL, _RELAY = MessageType.DATA, MessageType.DATA_BATCH, MessageType.CONTROL, MessageType.RELAY
_TRANSPORT_BY_INT = {int(t): t for t in (_DATA, _BATCH, _CONTROL, _RELAY)}  # a dict: MessageType(n) costs ~1 us


@dataclass
class PendingHandshake:
    """A handshake this node initiated and is waiting on."""

    state: HandshakeState
    local_index: int
    sent_at: float
    retry_at: float
    mac1: bytes  # of the initiation we sent: a cookie reply must be bound to it
    endpoint: Address


@dataclass(frozen=True)
class PeerStatus:
    ip: IPv4Address
    name: str | None  # from its certificate, once known
    endpoint: Address | None
    up: bool
    last_handshake_at: float | None  # engine clock; age = now - this
    rx_bytes: int
    tx_bytes: int
    queued_packets: int
    handshake_pending: bool


class Peer:
    """Everything the engine keeps about one other node."""

    def __init__(self, ip: IPv4Address, endpoints: list[Address], subnets: tuple[IPv4Network, ...] = ()):
        self.ip = ip
        self.endpoints = list(endpoints)
        self.endpoint: Address | None = self.endpoints[0] if self.endpoints else None
        self.route_hint = subnets  # routes before the certificate is known (static config)
        self.certificate: Certificate | None = None
        self.current: TransportSession | None = None
        self.previous: TransportSession | None = None
        self.next: TransportSession | None = None
        self.pending: PendingHandshake | None = None
        self.attempts_started_at: float | None = None  # first initiation of the current series
        self.attempts = 0
        self.cookie: bytes | None = None
        self.cookie_at = 0.0
        self.queue: deque[bytes] = deque()
        self.last_initiation_timestamp = -1  # theirs: replayed initiations are refused
        self.last_sent_at: float | None = None
        self.last_received_at: float | None = None
        # WireGuard's passive keepalive timer: set by the first data received since we last sent
        # anything, cleared by any send; at +KEEPALIVE_TIMEOUT we send an empty DATA.
        self.keepalive_from: float | None = None
        self.awaiting_reply_since: float | None = None
        self.last_handshake_at: float | None = None
        self.rx_bytes = 0
        self.tx_bytes = 0
        self.up = False

    def sessions(self) -> list[TransportSession]:
        return [s for s in (self.current, self.previous, self.next) if s is not None]


class TunnelEngine:
    """All tunnels of one node. See the module docstring for the model and the transition table."""

    def __init__(
        self,
        identity: tuple[Certificate, X25519PrivateKey],
        trust,
        rng=None,
        *,
        network_key: bytes | None = None,
        rate_limiter: HandshakeRateLimiter | None = None,
        strict: bool = False,
    ):
        """`identity`: this node's certificate and its X25519 private key. `trust`: a TrustStore.

        `rng`: randomness for session indices, ephemeral keys, cookie secrets and timer jitter —
        `random.Random(seed)` for reproducible tests, a `(n) -> bytes` callable, or None for
        os.urandom (production must use None or os.urandom).
        `network_key`: what mac1 and cookies are keyed on (default: our certificate's issuer).
        `strict`: re-raise internal errors on the receive path instead of counting them (tests).
        """
        certificate, static_key = identity
        if public_bytes(static_key) != certificate.public_key:
            raise ValueError("the private key does not match the certificate's public key")
        self.certificate = certificate
        self._static_key = static_key
        self._static_public = certificate.public_key
        self._certificate_bytes = certificate.encode()
        self._own_ip = certificate.ip.ip
        self.trust = trust
        if rng is None:
            self._random_bytes: Callable[[int], bytes] = os.urandom
        elif hasattr(rng, "randbytes"):
            self._random_bytes = rng.randbytes
        else:
            self._random_bytes = rng
        self._network_key_override = network_key
        self._macs = NetworkMacs(network_key if network_key is not None else certificate.issuer)
        self._cookies = CookieChecker(self._macs, self._random_bytes)
        self._accepted_macs = self._macs_accepted_under(trust)
        self._limiter = rate_limiter or HandshakeRateLimiter()
        self._strict = strict
        self._peers: dict[IPv4Address, Peer] = {}
        self._peer_by_int: dict[int, Peer] = {}  # the same peers by int(ip): the per-packet lookup
        self._routes: list[tuple[int, int, Peer]] = []  # (network, mask, peer), longest prefix first
        # Bumped whenever the routes change: a data plane caching "destination -> peer" compares it.
        self.route_generation = 0
        self._sessions: dict[int, TransportSession] = {}
        self._pending: dict[int, Peer] = {}
        self._outbox: list[tuple[bytes, Address]] = []
        self._events: deque[Event] = deque()
        self._unrouted: deque[tuple[float, bytes]] = deque()  # (deadline, packet): see _hold_unrouted
        self._last_own_timestamp = -1
        self.drops: Counter[str] = Counter()
        self.stats: Counter[str] = Counter()

    # ==== configuration ========================================================================

    def add_peer(self, flatnet_ip, endpoints: Iterable[Address] = (), subnets: Iterable = ()) -> None:
        """A static peer: its Flatnet IP, the (host, port) endpoints to try, and (optionally) the
        subnets to route to it before its certificate is known. Re-adding updates the endpoints."""
        ip = IPv4Address(flatnet_ip)
        if ip == self._own_ip:
            raise ValueError(f"{ip} is this node's own address")
        endpoints = [tuple(e) for e in endpoints]
        nets = tuple(IPv4Network(n) for n in subnets)
        peer = self._peers.get(ip)
        if peer is None:
            self._peers[ip] = Peer(ip, endpoints, nets)
        else:
            peer.endpoints = endpoints
            if endpoints and peer.endpoint is None:
                peer.endpoint = endpoints[0]
            peer.route_hint = nets
        self._rebuild_routes()

    def remove_peer(self, flatnet_ip) -> bool:
        """Forget a peer (a static peer taken out of the config): its sessions, pending handshake
        and queued packets go, PeerDown("removed") if it was up. False: no such peer."""
        peer = self._peers.pop(IPv4Address(flatnet_ip), None)
        if peer is None:
            return False
        for session in peer.sessions():
            self._retire(session)
        self._cancel_pending(peer)
        if peer.queue:
            self.drops["peer-removed"] += len(peer.queue)
            peer.queue.clear()
        if peer.up:
            peer.up = False
            self._events.append(PeerDown(peer.ip, "removed"))
        self._rebuild_routes()
        return True

    def set_identity(self, identity: tuple[Certificate, X25519PrivateKey], now: float) -> list[IPv4Address]:
        """Take a new own certificate and key (a reload; same Flatnet IP) and re-handshake every
        peer that has a session: the old sessions carry traffic until the new ones are confirmed.
        Returns the peers a handshake was started with."""
        certificate, static_key = identity
        if public_bytes(static_key) != certificate.public_key:
            raise ValueError("the private key does not match the certificate's public key")
        if certificate.ip.ip != self._own_ip:
            raise ValueError(f"a new identity must keep this node's address {self._own_ip}")
        if certificate.issuer != self.certificate.issuer:
            self._macs = NetworkMacs(certificate.issuer)
            self._cookies = CookieChecker(self._macs, self._random_bytes)
            self._accepted_macs = self._macs_accepted_under(self.trust)
        self.certificate = certificate
        self._static_key = static_key
        self._static_public = certificate.public_key
        self._certificate_bytes = certificate.encode()
        started = []
        for peer in self._peers.values():
            if peer.current is None:
                continue
            self._cancel_pending(peer)  # an initiation signed with the old identity
            peer.attempts_started_at = None
            self._begin_handshake(peer, now)
            started.append(peer.ip)
        return started

    def _macs_accepted_under(self, trust) -> tuple[NetworkMacs, ...]:
        """The mac1 keys a handshake message may carry: ours first, then every trusted CA's.

        We sign with our own issuer's key; we accept any trusted CA's, so that while the team
        rotates its CA (both CAs trusted) hosts on the old and the new CA still reach each other.
        Trying a few HMACs is cheap next to the DH work mac1 protects.
        """
        if self._network_key_override is not None:
            return (self._macs,)
        accepted = [self._macs]
        for ca in getattr(trust, "cas", ()):
            fingerprint = ca.fingerprint()
            if fingerprint != self.certificate.issuer:
                accepted.append(NetworkMacs(fingerprint))
        return tuple(accepted)

    def _mac1_key_of(self, mac1_input: bytes, mac1: bytes) -> NetworkMacs | None:
        for macs in self._accepted_macs:
            if macs.mac1_valid(mac1_input, mac1):
                return macs
        return None

    def set_trust(self, trust, now: float) -> list[IPv4Address]:
        """Replace the trust store (a reloaded blocklist or CA set) and cut off, at once, every peer
        whose certificate it no longer accepts: its sessions are forgotten, PeerDown("revoked").
        Returns those peers' addresses. Handshakes from then on are checked against `trust`."""
        self.trust = trust
        self._accepted_macs = self._macs_accepted_under(trust)
        revoked = []
        for peer in self._peers.values():
            sessions = peer.sessions()
            if not sessions:
                continue
            still_trusted = True
            for session in sessions:
                try:
                    trust.verify(session.certificate, now)
                except CertificateError:
                    still_trusted = False
            if still_trusted:
                continue
            for session in sessions:
                self._retire(session)
            peer.current = peer.previous = peer.next = None
            peer.keepalive_from = peer.awaiting_reply_since = None
            self._cancel_pending(peer)
            revoked.append(peer.ip)
            if peer.up:
                peer.up = False
                self._events.append(PeerDown(peer.ip, "revoked"))
        return revoked

    @property
    def peers(self) -> dict[IPv4Address, PeerStatus]:
        return {
            ip: PeerStatus(
                ip=ip,
                name=p.certificate.name if p.certificate else None,
                endpoint=p.endpoint,
                up=p.up,
                last_handshake_at=p.last_handshake_at,
                rx_bytes=p.rx_bytes,
                tx_bytes=p.tx_bytes,
                queued_packets=len(p.queue),
                handshake_pending=p.pending is not None,
            )
            for ip, p in self._peers.items()
        }

    # ==== outputs ==============================================================================

    def datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        out, self._outbox = self._outbox, []
        return out

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def has_output(self) -> bool:
        """Datagrams or events waiting: the data plane skips the drain on its hot path otherwise."""
        return bool(self._outbox or self._events)

    def get_timer(self) -> float | None:
        """The earliest time `handle_timer` has something to do (None: nothing scheduled)."""
        deadlines = []
        for peer in self._peers.values():
            for session in peer.sessions():
                deadlines.append(session.created_at + REJECT_AFTER_TIME)
            if peer.pending is not None:
                deadlines.append(peer.pending.retry_at)
            keepalive = self._keepalive_due(peer)
            if keepalive is not None:
                deadlines.append(keepalive)
            if peer.awaiting_reply_since is not None:
                deadlines.append(peer.awaiting_reply_since + NEW_HANDSHAKE_AFTER_SILENCE)
        if self._unrouted:
            deadlines.append(self._unrouted[0][0])
        return min(deadlines) if deadlines else None

    # ==== sending ==============================================================================

    def route(self, dst) -> Peer | None:
        """The peer owning destination `dst` (its Flatnet IP, or a subnet from cert or static config)."""
        value = _ip_int(dst)
        if value is None:
            return None
        peer = self._peer_by_int.get(value)
        if peer is not None:
            return peer
        for network, mask, candidate in self._routes:
            if value & mask == network:
                return candidate
        return None

    def session_for(self, dst_ip, now: float) -> TransportSession | None:
        """The session to seal packets for `dst_ip` with, or None (call send_packet to handshake)."""
        peer = self.route(dst_ip)
        if peer is None:
            return None
        session = peer.current
        return session if session is not None and session.can_send(now) else None

    def send_packet(self, inner: bytes, now: float, peer_ip=None) -> None:
        """Carry one inner IPv4 packet to the peer owning its destination (or `peer_ip`)."""
        if peer_ip is not None:
            peer = self._peers.get(IPv4Address(peer_ip))
            if peer is None:
                raise UnknownPeerError(str(peer_ip))
        else:
            if len(inner) < 20 or inner[0] >> 4 != 4:
                self.drops["not-ipv4"] += 1
                return
            peer = self.route(inner[16:20])
            if peer is None:
                self._hold_unrouted(inner, now)  # the owner may be a peer we have not heard from yet
                return
        session = peer.current
        if session is not None and session.can_send(now):
            self._outbox.append((session.seal(inner, _DATA, now), peer.endpoint))
            return
        if len(peer.queue) >= MAX_QUEUED_PACKETS:
            peer.queue.popleft()
            self.drops["queue-full"] += 1
        peer.queue.append(bytes(inner))
        self._begin_handshake(peer, now)

    def learn_routes(self, now: float) -> int:
        """Handshake with every peer whose certificate is not known yet; returns how many started.

        A static peer is configured by its Flatnet IP only: the container subnets it owns are in
        its certificate, which arrives with the first handshake. Until then a packet to one of its
        containers has no route. The node calls this at start, and :meth:`send_packet` on a packet
        with no route, so traffic to a peer's containers never depends on someone first sending to
        the peer's own address. At most one handshake per peer is pending (a series gives up after
        REKEY_ATTEMPT_TIME), so an unreachable peer costs one initiation per REKEY_TIMEOUT.
        """
        started = 0
        for peer in self._peers.values():
            if peer.certificate is None and peer.pending is None and peer.endpoint is not None:
                self._begin_handshake(peer, now)
                started += 1
        return started

    def _hold_unrouted(self, inner: bytes, now: float) -> None:
        """No peer owns the destination. If a peer's certificate is still being learned (a
        handshake is on its way), the packet waits for it (:meth:`_release_unrouted`); else it is
        dropped as "no-route"."""
        self.learn_routes(now)
        if not any(p.certificate is None and p.pending is not None for p in self._peers.values()):
            self.drops["no-route"] += 1
            return
        if len(self._unrouted) >= MAX_QUEUED_PACKETS:
            self._unrouted.popleft()
            self.drops["no-route"] += 1
        self._unrouted.append((now + UNROUTED_HOLD_TIME, bytes(inner)))

    def _release_unrouted(self, now: float) -> None:
        """Routes changed (a certificate was learned): held packets that now have an owner go to
        it; the others wait on while some certificate is still being learned, until they expire."""
        held, self._unrouted = self._unrouted, deque()
        learning = any(p.certificate is None and p.pending is not None for p in self._peers.values())
        for deadline, inner in held:
            if self.route(inner[16:20]) is not None:
                self.send_packet(inner, now)
            elif learning and now < deadline:
                self._unrouted.append((deadline, inner))
            else:
                self.drops["no-route"] += 1

    def send_control(self, payload: bytes, peer_ip, now: float, msg_type: MessageType = MessageType.CONTROL) -> bool:
        """Send a CONTROL/RELAY/DATA_BATCH payload on an established session; False if there is none."""
        peer = self._peers.get(IPv4Address(peer_ip))
        if peer is None:
            raise UnknownPeerError(str(peer_ip))
        session = peer.current
        if session is None or not session.can_send(now):
            self._begin_handshake(peer, now)
            return False
        self._outbox.append((session.seal(payload, msg_type, now), peer.endpoint))
        return True

    def _after_seal(self, session: TransportSession, size: int, is_data: bool, now: float) -> None:
        peer = session.peer
        peer.last_sent_at = now
        peer.keepalive_from = None
        peer.tx_bytes += size
        if is_data and peer.awaiting_reply_since is None:
            peer.awaiting_reply_since = now
        if (
            session.is_initiator
            and peer.pending is None
            and session is peer.current
            and (now - session.created_at >= REKEY_AFTER_TIME or session.send_counter >= REKEY_AFTER_MESSAGES)
        ):
            self._begin_handshake(peer, now)

    def _send_keepalive(self, peer: Peer, now: float) -> None:
        session = peer.current
        if session is not None and session.can_send(now) and peer.endpoint is not None:
            self._outbox.append((session.seal(b"", _DATA, now), peer.endpoint))
            self.stats["keepalive-sent"] += 1

    # ==== receiving ============================================================================

    def receive_datagram(self, data: bytes, addr: Address, now: float) -> None:
        """Handle one UDP datagram. Never raises for anything the network sends."""
        opened = self.open_data(data, addr, now)
        if opened is None:
            return
        session, msg_type, plaintext = opened
        peer_ip = session.peer.ip
        if msg_type is _DATA:
            if len(plaintext) < 20 or plaintext[0] >> 4 != 4:
                self.drops["bad-inner-packet"] += 1
            elif not session.allows_source(plaintext[12:16]):
                self.drops["spoofed-source"] += 1
            else:
                self._events.append(PacketReceived(plaintext, peer_ip))
        elif msg_type is _BATCH:
            self._events.append(BatchReceived(plaintext, peer_ip))
        elif msg_type is _CONTROL:
            self._events.append(ControlReceived(plaintext, peer_ip))
        else:
            self._events.append(RelayReceived(plaintext, peer_ip))

    def open_data(self, datagram: bytes, addr: Address, now: float):
        """The hot receive path: (session, msg_type, plaintext) for an authentic transport message.

        Anything else returns None: a handshake message or cookie reply is handled here as by
        receive_datagram (drain events/datagrams afterwards); a keepalive is consumed; a bad datagram
        is dropped and counted. The caller checks inner sources itself (`session.allows_source`).
        """
        try:
            if len(datagram) >= TRANSPORT_OVERHEAD:
                msg_type, version, reserved, index, counter = _unpack_header(datagram)
                transport_type = _TRANSPORT_BY_INT.get(msg_type)
                if transport_type is not None and version == 1 and reserved == 0:
                    # The transport message, inline: one call less on every packet's way.
                    session = self._sessions.get(index)
                    if session is None:
                        return self._drop("unknown-index")
                    if now - session.created_at >= REJECT_AFTER_TIME:
                        return self._drop("expired-key")
                    if not session.replay.check(counter):
                        return self._drop("replay")
                    plaintext = session.decrypt(datagram)
                    if plaintext is None:
                        return self._drop("decrypt-failed")
                    session.replay.update(counter)
                    peer = session.peer
                    if peer.endpoint != addr:  # roaming, as WireGuard: the last authenticated source address
                        self._roamed(peer, addr)
                    peer.last_received_at = now
                    peer.awaiting_reply_since = None
                    peer.rx_bytes += len(datagram)
                    if session is peer.next:
                        self._confirm_next(peer, now)
                    elif (
                        session is peer.current
                        and session.is_initiator
                        and peer.pending is None
                        and now - session.created_at >= REKEY_ON_RECEIVE_AGE
                    ):
                        self._begin_handshake(peer, now)
                    if not plaintext and transport_type is _DATA:
                        self.stats["keepalive-received"] += 1
                        return None
                    if peer.keepalive_from is None:
                        peer.keepalive_from = now
                    return session, transport_type, plaintext
            self._receive_other(datagram, addr, now)
        except Exception:
            if self._strict:
                raise
            self.drops["internal-error"] += 1
        return None

    def _drop(self, reason: str) -> None:
        self.drops[reason] += 1

    def _receive_other(self, data: bytes, addr: Address, now: float) -> None:
        try:
            msg_type = parse_prefix(data)
        except MalformedMessage as e:
            return self._drop(e.reason)
        if msg_type is MessageType.HANDSHAKE_INITIATION:
            self._on_initiation(data, addr, now)
        elif msg_type is MessageType.HANDSHAKE_RESPONSE:
            self._on_response(data, addr, now)
        elif msg_type is MessageType.COOKIE_REPLY:
            self._on_cookie_reply(data, now)
        elif msg_type is MessageType.PUNCH:
            self.stats["punch-received"] += 1
        else:  # a transport type that failed the fast path's checks: too short
            self._drop("truncated")

    # ==== handshakes: responder ================================================================

    def _verified_certificate(self, certificate_bytes: bytes, remote_static: bytes, now: float) -> Certificate | None:
        try:
            cert = Certificate.decode(certificate_bytes)
            self.trust.verify(cert, now)
        except CertificateError as e:
            self._drop(f"cert-{e.reason}")
            return None
        if cert.public_key != remote_static:
            self._drop("cert-key-mismatch")
            return None
        if cert.ip.ip == self._own_ip:
            self._drop("cert-own-ip")
            return None
        return cert

    def _on_initiation(self, data: bytes, addr: Address, now: float) -> None:
        try:
            msg = parse_handshake_initiation(data)
        except MalformedMessage as e:
            return self._drop(e.reason)
        sender_macs = self._mac1_key_of(msg.mac1_input, msg.mac1)
        if sender_macs is None:
            return self._drop("bad-mac1")
        # DoS gate (whitepaper §5.3): under load, demand a cookie before any DH or signature work.
        if self._limiter.under_load(now):
            if not self._cookies.mac2_valid(msg.mac2_input, msg.mac2, addr, now):
                # sealed under the key the initiator used, so it can open it
                reply = self._cookies.make_reply(msg.sender_index, msg.mac1, addr, now, macs=sender_macs)
                self._outbox.append((encode_cookie_reply(reply), addr))
                self.stats["cookie-sent"] += 1
                return self._drop("cookie-required")
            if not self._limiter.take_source(addr[0], now):
                return self._drop("rate-limited")
        else:
            self._limiter.take_global(now)
        self.stats["initiation-processed"] += 1
        try:
            state, payload, remote_static = handshake.read_initiation(self._static_key, msg.noise_message, self._new_ephemeral)
        except (NoiseError, MalformedMessage):
            return self._drop("bad-handshake")
        cert = self._verified_certificate(payload.certificate, remote_static, now)
        if cert is None:
            return None
        peer = self._peers.get(cert.ip.ip)
        if peer is not None:
            if payload.timestamp_us <= peer.last_initiation_timestamp:
                return self._drop("replayed-initiation")
            if peer.pending is not None and self._static_public < cert.public_key:
                # Simultaneous initiation: the lower static key stays initiator; the other side
                # yields when our initiation reaches it. Ours may have been lost (both nodes just
                # started, the peer was not listening yet): the peer is evidently there now, so
                # retry after SIMULTANEOUS_INITIATION_RETRY rather than REKEY_TIMEOUT if no
                # response comes. (Not at once: if ours did arrive, a second initiation would only
                # cost both sides a handshake and a dropped response.) Their timestamp is
                # remembered, so a replay of this initiation changes nothing.
                peer.last_initiation_timestamp = payload.timestamp_us
                self.stats["simultaneous-initiation-kept"] += 1
                peer.pending.retry_at = min(peer.pending.retry_at, now + SIMULTANEOUS_INITIATION_RETRY)
                return None
        try:
            noise_response = handshake.write_response(state, self._certificate_bytes)
        except NoiseError:
            return self._drop("bad-handshake")
        self.stats["handshake-dh"] += 1
        # -- every check passed: commit --
        if peer is None:
            peer = Peer(cert.ip.ip, [addr])
            self._peers[peer.ip] = peer
            self._rebuild_routes()
        if peer.pending is not None:
            self.stats["simultaneous-initiation-yielded"] += 1
            self._cancel_pending(peer)
        peer.last_initiation_timestamp = payload.timestamp_us
        send_key, recv_key = handshake.transport_keys(state)
        local_index = self._new_index()
        session = TransportSession(self, peer, cert, local_index, msg.sender_index, send_key, recv_key, now, False)
        if peer.next is not None:
            self._retire(peer.next)
        peer.next = session
        self._sessions[local_index] = session
        body = encode_handshake_response_body(local_index, msg.sender_index, noise_response)
        response, _ = self._macs.sign(body, None)
        self._outbox.append((response, addr))
        self.stats["response-sent"] += 1

    def _confirm_next(self, peer: Peer, now: float) -> None:
        """The initiator's first transport message arrived on `next`: it becomes current."""
        session = peer.next
        peer.next = None
        self._install_current(peer, session, now)

    # ==== handshakes: initiator ================================================================

    def _begin_handshake(self, peer: Peer, now: float) -> None:
        if peer.pending is not None:
            return
        if peer.endpoint is None:
            dropped = len(peer.queue)
            peer.queue.clear()
            self.drops["no-endpoint"] += dropped
            self._events.append(HandshakeFailed(peer.ip, "no-endpoint", dropped))
            return
        if peer.attempts_started_at is None:
            peer.attempts_started_at = now
            peer.attempts = 0
        self._send_initiation(peer, now)

    def _send_initiation(self, peer: Peer, now: float) -> None:
        if peer.pending is not None:
            self._pending.pop(peer.pending.local_index, None)
        timestamp = max(int(now * 1_000_000), self._last_own_timestamp + 1)
        self._last_own_timestamp = timestamp
        state, noise_message = handshake.begin_initiation(
            self._static_key, self._certificate_bytes, timestamp, self._new_ephemeral
        )
        local_index = self._new_index()
        cookie = peer.cookie if peer.cookie is not None and now - peer.cookie_at < COOKIE_MAX_AGE else None
        datagram, mac1 = self._macs.sign(encode_handshake_initiation_body(local_index, noise_message), cookie)
        # Try the configured endpoints in turn on retries; the learned one first.
        candidates = self.peer_endpoints(peer)
        endpoint = candidates[peer.attempts % len(candidates)]
        peer.attempts += 1
        jitter = self._uniform() * REKEY_TIMEOUT_JITTER_MAX
        peer.pending = PendingHandshake(state, local_index, now, now + REKEY_TIMEOUT + jitter, mac1, endpoint)
        self._pending[local_index] = peer
        self._outbox.append((datagram, endpoint))
        self.stats["initiation-sent"] += 1

    @staticmethod
    def peer_endpoints(peer: Peer) -> list[Address]:
        out = [peer.endpoint] if peer.endpoint is not None else []
        out += [e for e in peer.endpoints if e != peer.endpoint]
        return out

    def _on_response(self, data: bytes, addr: Address, now: float) -> None:
        try:
            msg = parse_handshake_response(data)
        except MalformedMessage as e:
            return self._drop(e.reason)
        peer = self._pending.get(msg.receiver_index)
        if peer is None:
            return self._drop("unknown-index")
        if self._mac1_key_of(msg.mac1_input, msg.mac1) is None:
            return self._drop("bad-mac1")
        pending = peer.pending
        state = pending.state.clone()  # a bad response must leave the pending handshake as it was
        try:
            certificate_bytes, remote_static = handshake.read_response(state, msg.noise_message)
        except NoiseError:
            return self._drop("bad-handshake")
        self.stats["handshake-dh"] += 1
        cert = self._verified_certificate(certificate_bytes, remote_static, now)
        if cert is None:
            return None
        if cert.ip.ip != peer.ip:
            return self._drop("cert-wrong-ip")
        # -- commit --
        self._cancel_pending(peer)
        peer.attempts_started_at = None
        send_key, recv_key = handshake.transport_keys(state)
        session = TransportSession(self, peer, cert, pending.local_index, msg.sender_index, send_key, recv_key, now, True)
        self._sessions[pending.local_index] = session
        if peer.next is not None:  # a crossing handshake we answered: superseded by ours
            self._retire(peer.next)
            peer.next = None
        if peer.endpoint != addr:
            self._roamed(peer, addr)
        peer.last_received_at = now
        peer.awaiting_reply_since = None
        flushed = self._install_current(peer, session, now)
        if not flushed:
            self._send_keepalive(peer, now)  # lets the responder confirm the session at once

    def _on_cookie_reply(self, data: bytes, now: float) -> None:
        try:
            reply = parse_cookie_reply(data)
        except MalformedMessage as e:
            return self._drop(e.reason)
        peer = self._pending.get(reply.receiver_index)
        if peer is None:
            return self._drop("unknown-index")
        cookie = self._macs.open_cookie(reply, peer.pending.mac1)
        if cookie is None:
            return self._drop("bad-cookie")
        peer.cookie, peer.cookie_at = cookie, now
        self.stats["cookie-received"] += 1

    # ==== session slots ========================================================================

    def _install_current(self, peer: Peer, session: TransportSession, now: float) -> int:
        """Make `session` current (old current -> previous); PeerUp if new; flush the queue."""
        if peer.previous is not None:
            self._retire(peer.previous)
        peer.previous, peer.current = peer.current, session
        session.confirmed = True
        peer.last_handshake_at = now
        self._cancel_pending(peer)  # a crossing handshake of ours is superseded by this one
        peer.attempts_started_at = None
        old_cert = peer.certificate
        peer.certificate = session.certificate
        routes_changed = old_cert is None or old_cert.subnets != session.certificate.subnets
        if routes_changed:
            self._rebuild_routes()
        if not peer.up or old_cert != session.certificate:  # up, or up again with a renewed certificate
            peer.up = True
            self._events.append(PeerUp(peer.ip, peer.endpoint, session.certificate))
        elif peer.previous is not None:
            self.stats["rekeyed"] += 1
            self._events.append(Rekeyed(peer.ip))
        flushed = 0
        while peer.queue and session.can_send(now):
            self._outbox.append((session.seal(peer.queue.popleft(), _DATA, now), peer.endpoint))
            flushed += 1
        if routes_changed and self._unrouted:
            self._release_unrouted(now)
        return flushed

    def _roamed(self, peer: Peer, addr: Address) -> None:
        if peer.endpoint is not None:
            self.stats["roamed"] += 1
            self._events.append(PeerRoamed(peer.ip, peer.endpoint, addr))
        peer.endpoint = addr

    def _retire(self, session: TransportSession) -> None:
        self._sessions.pop(session.local_index, None)

    def _cancel_pending(self, peer: Peer) -> None:
        if peer.pending is not None:
            self._pending.pop(peer.pending.local_index, None)
            peer.pending = None

    # ==== timers ===============================================================================

    @staticmethod
    def _keepalive_due(peer: Peer) -> float | None:
        if peer.current is None or peer.keepalive_from is None:
            return None
        return peer.keepalive_from + KEEPALIVE_TIMEOUT

    def handle_timer(self, now: float) -> None:
        if self._unrouted and (now >= self._unrouted[0][0] or not any(
                p.certificate is None and p.pending is not None for p in self._peers.values())):
            self._release_unrouted(now)  # expired, or nothing left to learn: dropped as no-route
        for peer in list(self._peers.values()):
            self._expire_sessions(peer, now)
            pending = peer.pending
            if pending is not None and now >= pending.retry_at:
                started = peer.attempts_started_at if peer.attempts_started_at is not None else pending.sent_at
                if now - started >= REKEY_ATTEMPT_TIME:
                    self._give_up(peer)
                else:
                    self.stats["initiation-retry"] += 1
                    self._send_initiation(peer, now)
            keepalive = self._keepalive_due(peer)
            if keepalive is not None and now >= keepalive:
                peer.keepalive_from = None
                self._send_keepalive(peer, now)
            if peer.awaiting_reply_since is not None and now >= peer.awaiting_reply_since + NEW_HANDSHAKE_AFTER_SILENCE:
                peer.awaiting_reply_since = None
                self.stats["handshake-after-silence"] += 1
                self._begin_handshake(peer, now)

    def _expire_sessions(self, peer: Peer, now: float) -> None:
        for slot in ("previous", "next", "current"):
            session = getattr(peer, slot)
            if session is not None and session.expired(now):
                self._retire(session)
                setattr(peer, slot, None)
                if slot == "current":
                    peer.keepalive_from = None
                    if peer.up:
                        peer.up = False
                        self._events.append(PeerDown(peer.ip, "expired"))
                    if peer.queue:
                        self._begin_handshake(peer, now)

    def _give_up(self, peer: Peer) -> None:
        self._cancel_pending(peer)
        peer.attempts_started_at = None
        dropped = len(peer.queue)
        peer.queue.clear()
        if dropped:
            self.drops["handshake-failed"] += dropped
        self._events.append(HandshakeFailed(peer.ip, "timeout", dropped))
        if peer.up and peer.current is None:
            peer.up = False
            self._events.append(PeerDown(peer.ip, "handshake-failed"))

    # ==== helpers ==============================================================================

    def _new_index(self) -> int:
        while True:
            index = int.from_bytes(self._random_bytes(4), "little")
            if index not in self._sessions and index not in self._pending:
                return index

    def _new_ephemeral(self) -> X25519PrivateKey:
        return X25519PrivateKey.from_private_bytes(self._random_bytes(32))

    def _uniform(self) -> float:
        return int.from_bytes(self._random_bytes(4), "little") / 2**32

    def _rebuild_routes(self) -> None:
        self.route_generation += 1
        self._peer_by_int = {int(ip): peer for ip, peer in self._peers.items()}
        routes = []
        for peer in self._peers.values():
            nets = set(peer.route_hint)
            if peer.certificate is not None:
                nets.update(peer.certificate.subnets)
            for net in nets:
                routes.append((int(net.network_address), int(net.netmask), peer, net.prefixlen))
        routes.sort(key=lambda r: -r[3])
        self._routes = [(n, m, p) for n, m, p, _ in routes]


def _ip_int(ip) -> int | None:
    if type(ip) is IPv4Address:
        return ip._ip
    if isinstance(ip, bytes | bytearray | memoryview):
        return int.from_bytes(ip, "big") if len(ip) == 4 else None
    if isinstance(ip, int):
        return ip
    return int(IPv4Address(ip))
