"""Between the tunnel engine and the sockets: a peer's paths, probes and relay framing.

``PathMux`` is the (clock-free, socket-free) glue that lets one :class:`TunnelEngine` use Graceful
Escalation (``flatnet/escalation.py``); :class:`RelayStreamConnection` and :class:`PathIO` are
its asyncio edge.

How the engine is fooled, on purpose
------------------------------------
The engine treats addresses as opaque and sends each peer's datagrams to one endpoint. The mux
gives it one *virtual endpoint* per peer, ``("peer", "10.87.2.1")``, and decides for every
datagram addressed there which real path carries it: the path the peer's
:class:`~flatnet.escalation.PathSelector` says (a UDP address, or a relay session over UDP or
TCP). Handshake messages (initiation, response, cookie reply: rare and small) go out on *every*
path at once, so a tunnel comes up over whichever path works first and never waits for discovery.
Datagrams arriving on any known path of a peer are handed to the engine as coming from the
virtual endpoint, so the engine's own roaming never fights the selector; a datagram from an
address nobody announced is handed over with its real address (a peer we do not know yet) and
answered there.

Probes (``flatnet/proto/path_probe.py``) are demultiplexed here before the engine sees anything:
an authenticated PING is answered with a PONG on the path it came by, and if it came from an
address that is not yet a candidate of that peer, the address becomes one (the peer roamed, or
punched from a port the lighthouse never saw) - confirmed only by our own PINGs to it.

Relay paths: a :class:`RelayRoute` (transport, relay endpoint, session id). Tunnel datagrams are
wrapped in DATA frames (``flatnet/proto/relay.py``); the session is (re)bound every
``rebind_interval`` seconds with the token from the lighthouse's ``RelayOffer`` (sooner while
unanswered, and at once when the relay path goes quiet: see :class:`RelaySessionBinding`; a relay
that restarted re-creates the session from the BIND). A peer whose sessions all go unanswered for
``relay_dead_after`` is reported by :meth:`PathMux.peers_with_dead_relays` (discovery asks a
lighthouse for a new one; :meth:`PathMux.add_relay` drops the dead ones).

Outputs are :class:`Transmit` values: UDP datagrams to an address, or frames for the TCP
connection to a relay (the I/O layer adds the length prefix). Bad input is dropped and counted in
``counters``; nothing from the network raises.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, ip_address

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from flatnet.escalation import EscalationSettings, Path, PathChanged, PathSelector, Rung
from flatnet.proto.events import PeerUp
from flatnet.proto.header import MessageType
from flatnet.proto.path_probe import (
    KIND_PING,
    KIND_PONG,
    PROBE_TYPE,
    PathProbeError,
    check_path_probe,
    derive_probe_key,
    encode_path_probe,
    is_path_probe,
    parse_path_probe,
)
from flatnet.proto.relay import (
    TYPE_BIND,
    TYPE_BIND_ACK,
    TYPE_DATA,
    RelayFrameError,
    StreamFrameDecoder,
    encode_relay_frame,
    encode_stream_frame,
    parse_relay_frame,
)

log = logging.getLogger("flatnet.node.paths")

UDP = "udp"
TCP = "tcp"
_HANDSHAKE_TYPES = frozenset({MessageType.HANDSHAKE_INITIATION, MessageType.HANDSHAKE_RESPONSE, MessageType.COOKIE_REPLY})
MAX_PATHS_PER_PEER = 16  # candidates (LAN, punched, learned) and relay sessions of one peer
MAX_RELAYS_PER_PEER = 4  # relay sessions of one peer (a new one beyond this drops the oldest)
INITIATION_RESENDS = (0.2, 0.5, 1.0, 2.0)  # seconds after an initiation: its copies on every path
_RFC1918 = tuple(IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"))


def is_lan_address(addr) -> bool:
    """RFC 1918 private address: a peer there is on our LAN (or a LAN we route to), not behind a NAT."""
    try:
        ip = ip_address(addr[0])
    except ValueError:
        return False
    return any(ip in net for net in _RFC1918) if ip.version == 4 else False


def virtual_endpoint(peer_ip) -> tuple[str, str]:
    return ("peer", str(peer_ip))


@dataclass(frozen=True, slots=True)
class RelayRoute:
    """The address of a relay path: one session on one relay over one transport."""

    transport: str  # UDP | TCP
    relay: tuple[str, int]
    session_id: bytes

    def __str__(self) -> str:
        return f"{self.transport}://{self.relay[0]}:{self.relay[1]}/{self.session_id.hex()}"


@dataclass(frozen=True, slots=True)
class Transmit:
    data: bytes  # a UDP datagram, or (TCP) one relay frame without its length prefix
    transport: str  # UDP | TCP
    addr: tuple[str, int]


class RelaySessionBinding:
    """One relay session of a peer. A session's side is bound to one address at a time, so the
    node binds it over one transport: UDP while the relay acknowledges UDP BINDs, else TCP, with a
    trial UDP BIND every ``udp_retry_interval`` seconds to come back when UDP works again.

    Relay sessions are soft state: a relay that restarts has forgotten them all, and a BIND with
    the token the node already holds makes it create the session again (the lighthouse is not
    asked for anything). So a BIND is repeated ``unacked_rebind_interval`` after it went out
    until its ACK comes (the ACK moves the next one to ``rebind_interval``), and a relay path that
    carries the traffic and goes quiet is re-bound at once. A relay that answers neither UDP nor
    TCP is down, not behind a UDP-blocking firewall: the session moves to TCP only once a trial
    TCP BIND is acknowledged while UDP BINDs are not (and one more UDP BIND after that TCP ACK
    goes unanswered), and a TCP binding whose BINDs go unanswered tries UDP at the same pace."""

    __slots__ = ("session_id", "side", "token", "routes", "transport", "unacked", "next_bind_at",
                 "next_udp_trial_at", "acked_at", "last_bind_at", "tcp_answered_at", "created_at")

    def __init__(self, session_id: bytes, side: int, token: bytes, routes: dict[str, RelayRoute], now: float) -> None:
        self.session_id = session_id
        self.side = side
        self.token = token
        self.routes = routes  # transport -> route
        self.transport = UDP if UDP in routes else TCP
        self.unacked = 0  # BINDs on the current transport without a BIND_ACK since
        self.next_bind_at = now
        self.next_udp_trial_at: float | None = None
        self.acked_at: float | None = None
        self.last_bind_at: float | None = None  # the last BIND on self.transport
        self.tcp_answered_at: float | None = None  # a trial TCP BIND was acknowledged while UDP was not
        self.created_at = now

    def dead(self, now: float, dead_after: float) -> bool:
        """No BIND_ACK (on any transport) for *dead_after* seconds: its relay is gone."""
        return now - (self.acked_at if self.acked_at is not None else self.created_at) >= dead_after


class PeerPaths:
    """One peer: its selector, its probe key, its relay bindings."""

    def __init__(self, ip: IPv4Address, selector: PathSelector) -> None:
        self.ip = ip
        self.selector = selector
        self.probe_key: bytes | None = None
        self.peer_public: bytes | None = None
        self.probing = True
        # The last handshake initiation, re-sent on every path a few times while punching opens
        # the NATs (a copy lost to a not-yet-open NAT would otherwise cost REKEY_TIMEOUT, 5 s).
        self.initiation: bytes | None = None
        self.initiation_resends: list[float] = []
        self.relays: dict[bytes, RelaySessionBinding] = {}  # session id -> binding


class PathMux:
    def __init__(
        self,
        engine,
        static_key: X25519PrivateKey,
        settings: EscalationSettings | None = None,
        random_bytes: Callable[[int], bytes] | None = None,
        rebind_interval: float = 5.0,
        unacked_rebind_interval: float = 1.0,
        udp_failover_after: int = 3,
        udp_retry_interval: float = 30.0,
        relay_dead_after: float = 15.0,
    ) -> None:
        self.engine = engine
        self.own_ip = engine.certificate.ip.ip
        self._static_key = static_key
        self.settings = settings or EscalationSettings()
        self._random_bytes = random_bytes
        self.rebind_interval = rebind_interval
        self.unacked_rebind_interval = unacked_rebind_interval
        self.udp_failover_after = udp_failover_after
        self.udp_retry_interval = udp_retry_interval
        self.relay_dead_after = relay_dead_after
        self.peers: dict[IPv4Address, PeerPaths] = {}
        self._by_address: dict[object, IPv4Address] = {}  # UDP address or RelayRoute -> peer
        self._out: list[Transmit] = []
        self._path_events: deque[tuple[IPv4Address, PathChanged]] = deque(maxlen=256)  # bounded: may go unread
        self.counters: Counter[str] = Counter()

    # ---- configuration (from config, lighthouse answers, punch notices, relay offers) -----

    def add_peer(self, peer_ip, now: float, subnets=(), probing: bool = True) -> PeerPaths:
        """*probing* False: a peer that runs no mux (a lighthouse): its paths are used as given."""
        ip = IPv4Address(peer_ip)
        peer = self.peers.get(ip)
        if peer is None:
            selector = PathSelector(self.settings, self._random_bytes, now)
            peer = self.peers[ip] = PeerPaths(ip, selector)
            peer.probing = probing
            self.engine.add_peer(ip, [virtual_endpoint(ip)], subnets)
        return peer

    def add_candidate(self, peer_ip, addr, now: float, rung: Rung | None = None) -> None:
        """A direct UDP address of the peer. *rung*: DIRECT_LAN for a private address by default."""
        peer = self.add_peer(peer_ip, now)
        addr = (str(addr[0]), int(addr[1]))
        if rung is None:
            rung = Rung.DIRECT_LAN if is_lan_address(addr) else Rung.PUNCHED
        owner = self._by_address.get(addr)
        if owner is not None and owner != peer.ip:
            self.counters["candidate-claimed-by-other-peer"] += 1
            return
        if owner is None and len(peer.selector.paths()) >= MAX_PATHS_PER_PEER:
            self.counters["candidate-over-limit"] += 1  # bounded memory, whatever a peer claims
            return
        self._by_address[addr] = peer.ip
        if peer.selector.add_path(Path(rung, addr), now):
            self._drain_selector(peer)

    def punch(self, peer_ip, endpoints, now: float) -> None:
        """The lighthouse says *peer_ip* is trying to reach us at *endpoints*: probe them all now
        (the PINGs are the punch: our NAT opens a mapping towards each)."""
        for i, endpoint in enumerate(endpoints):
            self.add_candidate(peer_ip, endpoint, now, None if i else self._observed_rung(endpoint))
        self.peers[IPv4Address(peer_ip)].selector.probe_now(now)

    @staticmethod
    def _observed_rung(endpoint) -> Rung:
        return Rung.DIRECT_LAN if is_lan_address(endpoint) else Rung.PUNCHED

    def add_relay(self, peer_ip, session_id: bytes, side: int, token: bytes, relays, now: float) -> RelaySessionBinding:
        """A relay session the lighthouse granted (``RelayOffer``); *relays*: ``(transport,
        (host, port))`` pairs of one relay (its UDP and/or TCP endpoint)."""
        peer = self.add_peer(peer_ip, now)
        routes = {}
        for transport, relay in relays:
            if transport not in (UDP, TCP):
                raise ValueError(f"unknown relay transport {transport!r}")
            routes[transport] = RelayRoute(transport, (str(relay[0]), int(relay[1])), bytes(session_id))
        if not routes:
            raise ValueError("a relay session needs at least one relay endpoint")
        # A new session replaces the ones whose relay is gone (discovery asks for one when every
        # session of the peer is dead); the number of sessions is bounded whatever is offered.
        for old in list(peer.relays.values()):
            if old.session_id != bytes(session_id) and old.dead(now, self.relay_dead_after):
                self.remove_relay(peer.ip, old.session_id, now)
        while len(peer.relays) >= MAX_RELAYS_PER_PEER and bytes(session_id) not in peer.relays:
            self.remove_relay(peer.ip, next(iter(peer.relays)), now)
        binding = RelaySessionBinding(bytes(session_id), side, bytes(token), routes, now)
        peer.relays[binding.session_id] = binding
        for route in routes.values():
            self._by_address[route] = peer.ip
        self._bind(binding, binding.transport, now)
        # Only the transport the session is bound on is a path (the other cannot carry anything).
        if peer.selector.add_path(self._relay_path(routes[binding.transport]), now):
            self._drain_selector(peer)
        return binding

    def remove_relay(self, peer_ip, session_id: bytes, now: float) -> None:
        """Forget one relay session of a peer (its paths leave the selector)."""
        peer = self.peers.get(IPv4Address(peer_ip))
        binding = peer.relays.pop(bytes(session_id), None) if peer is not None else None
        if binding is None:
            return
        self.counters["relay.removed"] += 1
        for route in binding.routes.values():
            if self._by_address.get(route) == peer.ip:
                del self._by_address[route]
            peer.selector.remove_path(self._relay_path(route), now)
        self._drain_selector(peer)

    def peers_with_dead_relays(self, now: float) -> list[IPv4Address]:
        """Peers that have relay sessions, none of them acknowledged for ``relay_dead_after``:
        their relay is gone (discovery asks a lighthouse for a session on another)."""
        return [
            peer.ip for peer in self.peers.values()
            if peer.relays and all(b.dead(now, self.relay_dead_after) for b in peer.relays.values())
        ]

    def _rebind_transport(self, peer: PeerPaths, binding: RelaySessionBinding, transport: str, now: float) -> None:
        """The session's side moves to *transport*: its path replaces the other transport's."""
        old = binding.routes[binding.transport]
        binding.transport = transport
        binding.unacked = 0
        binding.tcp_answered_at = None
        binding.last_bind_at = None
        peer.selector.add_path(self._relay_path(binding.routes[transport]), now)
        peer.selector.remove_path(self._relay_path(old), now)
        peer.selector.probe_now(now)
        self._drain_selector(peer)

    @staticmethod
    def _relay_path(route: RelayRoute) -> Path:
        return Path(Rung.UDP_RELAY if route.transport == UDP else Rung.TCP_RELAY, route)

    def set_peer_key(self, peer_ip, public_key: bytes, now: float) -> None:
        peer = self.add_peer(peer_ip, now)
        key = derive_probe_key(self._static_key, self.own_ip, public_key, peer.ip)
        if key != peer.probe_key:
            peer.probe_key = key
            peer.selector.probe_now(now)

    def rebind_relays(self, now: float) -> None:
        """Send every relay session's BIND at the next tick (a TCP connection to a relay opened)."""
        for peer in self.peers.values():
            for binding in peer.relays.values():
                binding.next_bind_at = now

    def underlay_changed(self, now: float) -> None:
        """Our own address changed (roaming): re-bind relays and re-probe every path at once."""
        for peer in self.peers.values():
            for binding in peer.relays.values():
                binding.next_bind_at = now
                binding.acked_at = None
                binding.unacked = 0
            peer.selector.underlay_changed(now)
            self._drain_selector(peer)

    # ---- engine events pass through here ----------------------------------------------------

    def next_event(self, now: float):
        """The engine's next event (use this instead of ``engine.next_event``): a PeerUp sets the
        peer's probe key from its certificate."""
        event = self.engine.next_event()
        if isinstance(event, PeerUp):
            self.set_peer_key(event.peer_ip, event.certificate.public_key, now)
        return event

    def next_path_event(self) -> tuple[IPv4Address, PathChanged] | None:
        return self._path_events.popleft() if self._path_events else None

    # ---- input ----------------------------------------------------------------------------

    def receive_udp(self, data: bytes, addr, now: float) -> None:
        """A datagram from the UDP socket (not from a relay): to the engine, or a probe."""
        inbound = self.inbound_udp(data, addr, now)
        if inbound is not None:
            self.engine.receive_datagram(inbound[0], inbound[1], now)
            self._pull_engine(now)

    def receive_relay_frame(self, frame: bytes, transport: str, relay, now: float) -> None:
        """One relay frame (a UDP datagram from the relay, or a frame from the TCP stream)."""
        inbound = self.inbound_relay(frame, transport, relay, now)
        if inbound is not None:
            self.engine.receive_datagram(inbound[0], inbound[1], now)
            self._pull_engine(now)

    def inbound_udp(self, data: bytes, addr, now: float, count: int = 1):
        """Classify a datagram from the socket: a probe (handled here: None), or ``(data, address
        to give the engine)``: the peer's virtual endpoint if *addr* is one of its paths.
        *count*: datagrams in *data* (a GRO train), for the byte counters only."""
        addr = (str(addr[0]), int(addr[1])) if isinstance(addr, tuple) and len(addr) >= 2 else addr
        if is_path_probe(data):
            self._receive_probe(data, addr, None, now)
            return None
        peer_ip = self._by_address.get(addr)
        if peer_ip is None:
            self.counters["rx.unknown-address"] += count
            return data, addr
        peer = self.peers[peer_ip]
        peer.selector.record_received(Path(self._rung_of(peer, addr), addr), len(data))
        return data, virtual_endpoint(peer_ip)

    def inbound_relay(self, frame: bytes, transport: str, relay, now: float):
        """Classify a relay frame: BIND_ACKs and probes are handled here (None); a DATA frame of a
        known session gives ``(tunnel datagram, the peer's virtual endpoint)``."""
        try:
            parsed = parse_relay_frame(frame)
        except RelayFrameError as exc:
            self.counters[f"relay.drop.{exc.reason}"] += 1
            return None
        route = RelayRoute(transport, (str(relay[0]), int(relay[1])), parsed.session_id)
        peer_ip = self._by_address.get(route)
        if peer_ip is None:
            self.counters["relay.drop.unknown-session"] += 1
            return None
        peer = self.peers[peer_ip]
        binding = peer.relays.get(route.session_id)
        if binding is None or binding.routes.get(transport) != route:
            self.counters["relay.drop.unknown-route"] += 1
            return None
        if parsed.type == TYPE_BIND_ACK:
            self._bind_acked(peer, binding, transport, now)
            return None
        if parsed.type != TYPE_DATA:
            self.counters["relay.drop.unexpected-type"] += 1
            return None
        if is_path_probe(parsed.body):
            self._receive_probe(parsed.body, None, route, now)
            return None
        rung = Rung.UDP_RELAY if transport == UDP else Rung.TCP_RELAY
        peer.selector.record_received(Path(rung, route), len(parsed.body))
        return parsed.body, virtual_endpoint(peer_ip)

    def _bind_acked(self, peer: PeerPaths, binding: RelaySessionBinding, transport: str, now: float) -> None:
        self.counters["relay.bind-ack"] += 1
        silent_before = binding.acked_at is None or (transport == binding.transport and binding.unacked >= 2)
        binding.acked_at = now
        if transport == binding.transport:
            # the relay path is open (perhaps just now, or on a new transport): a pending handshake
            # can use it (a no-op once the handshake is done)
            self._resend_initiation(peer, now)
            binding.unacked = 0
            binding.tcp_answered_at = None
            if binding.last_bind_at is not None:  # answered: the next BIND is a keepalive
                binding.next_bind_at = max(binding.next_bind_at, binding.last_bind_at + self.rebind_interval)
            path = self._relay_path(binding.routes[transport])
            state = peer.selector.state(path)
            if state is not None and not state.alive(now, self.settings.dead_after) and (
                silent_before or not peer.selector.confirmed
            ):  # the relay is back (it restarted, or came back into reach): find out at once
                self.counters["relay.back"] += 1
                peer.selector.probe_now(now, path)
                self._drain_selector(peer)
        elif transport == UDP:  # a trial UDP BIND came back: UDP works again, and the
            self._rebind_transport(peer, binding, UDP, now)  # relay now forwards to our UDP address
            binding.next_udp_trial_at = None
            binding.next_bind_at = now + self.rebind_interval
            self.counters["relay.back-to-udp"] += 1
        elif binding.unacked >= self.udp_failover_after:
            # A trial TCP BIND answered while UDP ones are not: one more UDP BIND (which also moves
            # the relay's side back to UDP); if that goes unanswered too, UDP is blocked.
            if binding.tcp_answered_at is None:
                binding.tcp_answered_at = now
                self._bind(binding, UDP, now)
        else:  # UDP answers again after all: our side goes back to UDP at the relay
            self._bind(binding, UDP, now)

    def _rung_of(self, peer: PeerPaths, addr) -> Rung:
        for rung in (Rung.DIRECT_LAN, Rung.PUNCHED):
            if peer.selector.state(Path(rung, addr)) is not None:
                return rung
        return Rung.PUNCHED

    def _receive_probe(self, data: bytes, addr, route: RelayRoute | None, now: float) -> None:
        try:
            probe = parse_path_probe(data)
        except PathProbeError as exc:
            self.counters[f"probe.drop.{exc.reason}"] += 1
            return
        peer = self.peers.get(probe.sender)
        if peer is not None and peer.probe_key is None:
            self._ensure_key(peer, now)
        if peer is None or peer.probe_key is None:
            self.counters["probe.drop.unknown-sender"] += 1
            return
        if not check_path_probe(probe, peer.probe_key, self.own_ip):
            self.counters["probe.drop.bad-mac"] += 1
            return
        if route is not None:
            if self._by_address.get(route) != peer.ip:
                self.counters["probe.drop.wrong-session"] += 1
                return
            path = Path(Rung.UDP_RELAY if route.transport == UDP else Rung.TCP_RELAY, route)
        else:
            path = Path(self._rung_of(peer, addr), addr)
        if probe.kind == KIND_PING:
            self.counters["probe.ping-received"] += 1
            pong = encode_path_probe(KIND_PONG, self.own_ip, peer.ip, probe.nonce, peer.probe_key)
            self._emit(peer, path, pong, now)
            peer.selector.heard_from(path, now)
            if route is None and self._by_address.get(addr) is None:
                self.counters["probe.new-address"] += 1
                self.add_candidate(peer.ip, addr, now)
        elif probe.kind == KIND_PONG:
            if peer.selector.pong_received(path, probe.nonce, now):
                self.counters["probe.pong-accepted"] += 1
            self._drain_selector(peer)

    # ---- time -----------------------------------------------------------------------------

    def handle_timer(self, now: float) -> None:
        self.engine.handle_timer(now)
        self.tick_paths(now)
        self._pull_engine(now)

    def tick_paths(self, now: float) -> None:
        """Probes, relay BINDs, path switches (everything but the engine's own timers)."""
        for peer in self.peers.values():
            self._tick_peer(peer, now)

    def _ensure_key(self, peer: PeerPaths, now: float) -> bytes | None:
        """The probe key, derived from the certificate of the peer's tunnel session once there is
        one (so the mux needs no engine events; a renewed certificate keeps the same key only if
        its public key is the same, else the next session brings the new one)."""
        session = self.engine.session_for(peer.ip, now)
        certificate = getattr(session, "certificate", None) if session is not None else None
        if certificate is not None and certificate.public_key != peer.peer_public:
            peer.peer_public = certificate.public_key
            self.set_peer_key(peer.ip, certificate.public_key, now)
        return peer.probe_key

    def _resend_initiation(self, peer: PeerPaths, now: float) -> None:
        if peer.initiation is None:
            return
        status = self.engine.peers.get(peer.ip)  # O(peers), a few times per handshake
        if status is None or not status.handshake_pending or self.engine.session_for(peer.ip, now) is not None:
            # done, or abandoned (simultaneous initiation: the engine answers the peer's instead);
            # a stale copy arriving later would start a needless second handshake
            peer.initiation, peer.initiation_resends = None, []
            return
        self.counters["handshake.resent"] += 1
        for path in peer.selector.paths():
            self._emit(peer, path, peer.initiation, now)

    def _tick_peer(self, peer: PeerPaths, now: float) -> None:
        if peer.initiation_resends and now >= peer.initiation_resends[0]:
            while peer.initiation_resends and now >= peer.initiation_resends[0]:
                peer.initiation_resends.pop(0)
            self._resend_initiation(peer, now)
        if peer.probe_key is None and peer.probing:
            self._ensure_key(peer, now)
        for probe in peer.selector.tick(now):
            if not peer.probing:
                continue
            if peer.probe_key is None:
                self.counters["probe.no-key"] += 1
                continue
            ping = encode_path_probe(KIND_PING, self.own_ip, peer.ip, probe.nonce, peer.probe_key)
            self._emit(peer, probe.path, ping, now)
        for binding in peer.relays.values():
            self._tick_binding(peer, binding, now)
        self._drain_selector(peer)

    def _tick_binding(self, peer: PeerPaths, binding: RelaySessionBinding, now: float) -> None:
        if (
            binding.transport == UDP
            and binding.tcp_answered_at is not None
            and binding.unacked >= self.udp_failover_after
            and now >= binding.next_bind_at
        ):
            self._rebind_transport(peer, binding, TCP, now)  # UDP to the relay is blocked: bind over TCP
            binding.next_udp_trial_at = now + self.udp_retry_interval
            self.counters["relay.failover-to-tcp"] += 1
        if binding.last_bind_at is not None and self._relay_went_quiet(peer, binding, now):
            binding.next_bind_at = min(binding.next_bind_at, binding.last_bind_at + self.unacked_rebind_interval)
        if now >= binding.next_bind_at:
            self._bind(binding, binding.transport, now)
            if binding.unacked >= self.udp_failover_after:  # no answer on this transport: try the other
                if binding.transport == UDP and TCP in binding.routes and binding.tcp_answered_at is None:
                    self._bind(binding, TCP, now, trial=True)
                elif binding.transport == TCP and UDP in binding.routes:
                    binding.next_udp_trial_at = now  # the relay may be down, not UDP blocked
        if binding.next_udp_trial_at is not None and now >= binding.next_udp_trial_at:
            binding.next_udp_trial_at = now + self.udp_retry_interval
            self._bind(binding, UDP, now, trial=True)

    def _relay_went_quiet(self, peer: PeerPaths, binding: RelaySessionBinding, now: float) -> bool:
        """The relay path carries the peer's traffic (or nothing does) and has not answered a probe
        for ``suspect_after``, with no BIND_ACK since: the relay may have forgotten the session."""
        selector = peer.selector
        path = self._relay_path(binding.routes[binding.transport])
        if selector.confirmed and selector.current() != path:
            return False
        state = selector.state(path)
        if state is None or state.last_pong_at is None:
            return False
        quiet_since = state.last_pong_at + self.settings.suspect_after
        return now >= quiet_since and (binding.acked_at is None or binding.acked_at < quiet_since)

    def get_timer(self) -> float | None:
        deadlines = [d for d in (self.engine.get_timer(), self.paths_timer()) if d is not None]
        return min(deadlines) if deadlines else None

    def paths_timer(self) -> float | None:
        deadlines = []
        for peer in self.peers.values():
            t = peer.selector.get_timer()
            if t is not None:
                deadlines.append(t)
            if peer.initiation_resends:
                deadlines.append(peer.initiation_resends[0])
            for b in peer.relays.values():
                deadlines.append(b.next_bind_at)
                if b.next_udp_trial_at is not None:
                    deadlines.append(b.next_udp_trial_at)
        return min(deadlines) if deadlines else None

    # ---- output ---------------------------------------------------------------------------

    def transmits(self, now: float) -> list[Transmit]:
        self._pull_engine(now)
        out, self._out = self._out, []
        return out

    def _pull_engine(self, now: float) -> None:
        for data, addr in self.engine.datagrams_to_send():
            self.route(data, addr, now)

    def peer_for(self, addr) -> PeerPaths | None:
        """The peer an engine address belongs to: its virtual endpoint, or one of its paths."""
        if isinstance(addr, tuple) and len(addr) == 2 and addr[0] == "peer":
            return self.peers.get(IPv4Address(addr[1]))
        peer_ip = self._by_address.get(addr)
        return self.peers.get(peer_ip) if peer_ip is not None else None

    def route(self, data: bytes, addr, now: float) -> None:
        """Queue a datagram the engine (or the data plane) sends to *addr* on the right path(s)."""
        peer = self.peer_for(addr)
        if peer is None:
            if isinstance(addr, tuple) and addr and addr[0] == "peer":
                self.counters["tx.unknown-peer"] += 1
            else:  # a peer we do not know, answered at its own address
                self._out.append(Transmit(data, UDP, addr))
            return
        if data and data[0] in _HANDSHAKE_TYPES:
            for path in peer.selector.paths():
                self._emit(peer, path, data, now)
            if data[0] == MessageType.HANDSHAKE_INITIATION:
                peer.initiation = bytes(data)
                peer.initiation_resends = [now + d for d in INITIATION_RESENDS]
            return
        path = peer.selector.current()
        if path is None:
            self.counters["tx.no-path"] += 1
            return
        peer.selector.record_sent(len(data))
        self._emit(peer, path, data, now)

    def take_transmits(self) -> list[Transmit]:
        """What the mux itself queued (probes, PONGs, BINDs, routed datagrams), without pulling
        the engine (the data plane pulls it and routes through :meth:`route`)."""
        out, self._out = self._out, []
        return out

    def _emit(self, peer: PeerPaths, path: Path, data: bytes, now: float) -> None:
        address = path.address
        if isinstance(address, RelayRoute):
            binding = peer.relays.get(address.session_id)
            if binding is None:
                self.counters["tx.relay-gone"] += 1
                return
            if address.transport != binding.transport:  # not bound that way: it cannot arrive
                self.counters["tx.relay-dormant"] += 1
                return
            frame = encode_relay_frame(TYPE_DATA, binding.side, address.session_id, data)
            self._out.append(Transmit(frame, address.transport, address.relay))
        else:
            self._out.append(Transmit(data, UDP, address))

    def _bind(self, binding: RelaySessionBinding, transport: str, now: float, trial: bool = False) -> None:
        route = binding.routes[transport]
        frame = encode_relay_frame(TYPE_BIND, binding.side, route.session_id, binding.token)
        self._out.append(Transmit(frame, route.transport, route.relay))
        self.counters["relay.bind"] += 1
        if trial:
            return
        binding.unacked += 1  # (counted towards trying the other transport)
        binding.last_bind_at = now
        # Repeated soon unless answered: the ACK moves the next BIND to rebind_interval after this.
        binding.next_bind_at = now + self.unacked_rebind_interval

    def _drain_selector(self, peer: PeerPaths) -> None:
        while (event := peer.selector.next_event()) is not None:
            log.info("peer %s: %s -> %s (%s)", peer.ip, event.old, event.new, event.reason)
            self._path_events.append((peer.ip, event))

    # ---- status ---------------------------------------------------------------------------

    def status(self, now: float) -> dict[str, dict]:
        out = {}
        for ip, peer in self.peers.items():
            sel = peer.selector
            current = sel.current()
            out[str(ip)] = {
                "rung": current.rung.label if current is not None else None,
                "path": str(current) if current is not None else None,
                "confirmed": sel.confirmed,
                "seconds": {r.label: round(v, 3) for r, v in sel.rung_seconds(now).items()},
                "bytes_sent": {r.label: v for r, v in sel.bytes_sent.items()},
                "bytes_received": {r.label: v for r, v in sel.bytes_received.items()},
                "paths": len(sel.paths()),
                "relays": [
                    {
                        "session": b.session_id.hex(),
                        "transport": b.transport,
                        "acked_ago": None if b.acked_at is None else round(now - b.acked_at, 3),
                        "unacked": b.unacked,
                    }
                    for b in peer.relays.values()
                ],
            }
        return out


# ==== asyncio edge ==============================================================================


class RelayStreamConnection:
    """One TCP connection to a relay, reconnecting with backoff; frames in and out.

    ``send(frame)`` queues a frame (dropped and counted while disconnected: the tunnel retransmits
    what matters); each complete frame received goes to ``on_frame(frame)``. ``on_connected``
    runs after every (re)connect, so the owner can re-BIND at once.

    Reconnects back off from ``backoff`` doubling to ``backoff_max`` (2 s): a relay that restarts
    is back in use within 2 s of listening again (measured in tests/escalation/test_relay_restart.py),
    and a SYN every 2 s per node to a relay that stays down costs nothing worth saving.
    """

    def __init__(
        self,
        relay: tuple[str, int],
        on_frame: Callable[[bytes], None],
        on_connected: Callable[[], None] | None = None,
        backoff: float = 0.5,
        backoff_max: float = 2.0,
    ) -> None:
        self.relay = relay
        self.on_frame = on_frame
        self.on_connected = on_connected
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.counters: Counter[str] = Counter()
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task | None = None

    @property
    def connected(self) -> bool:
        return self._writer is not None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"relay-tcp-{self.relay[0]}:{self.relay[1]}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    def send(self, frame: bytes) -> None:
        if self._writer is None:
            self.counters["drop.disconnected"] += 1
            return
        if self._writer.transport.get_write_buffer_size() > 256 * 1024:
            self.counters["drop.backlog"] += 1  # a stalled connection must not eat memory
            return
        self._writer.write(encode_stream_frame(frame))

    async def _run(self) -> None:
        delay = self.backoff
        while True:
            writer = None
            try:
                reader, writer = await asyncio.open_connection(*self.relay)
                self._writer = writer
                self.counters["connect"] += 1
                delay = self.backoff
                if self.on_connected is not None:
                    self.on_connected()
                decoder = StreamFrameDecoder()
                while chunk := await reader.read(65536):
                    for frame in decoder.feed(chunk):
                        self.on_frame(frame)
                self.counters["closed-by-relay"] += 1
            except RelayFrameError:
                self.counters["framing-error"] += 1
            except OSError:
                # A reset of an open connection (a killed relay) is the relay closing it too.
                self.counters["connect-failed" if writer is None else "closed-by-relay"] += 1
            finally:
                self._writer = None
                if writer is not None:
                    writer.close()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff_max)


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, io: PathIO) -> None:
        self.io = io

    def datagram_received(self, data: bytes, addr) -> None:
        self.io.udp_received(data, addr)

    def error_received(self, exc: Exception) -> None:
        self.io.counters["udp.error"] += 1


class PathIO:
    """The asyncio edge of a :class:`PathMux`: one UDP socket (direct paths and UDP relays), a
    TCP connection per TCP relay, one timer. ``on_event(event)`` gets the engine's events.

    Relay addresses are recognised by source: a datagram from an address registered with
    :meth:`add_relay_address` is a relay frame, anything else goes to the mux as a direct datagram.
    """

    def __init__(self, mux: PathMux, on_event: Callable[[object], None], clock: Callable[[], float]) -> None:
        self.mux = mux
        self.on_event = on_event
        self.clock = clock
        self.counters: Counter[str] = Counter()
        self._transport: asyncio.DatagramTransport | None = None
        self._relay_udp: set[tuple[str, int]] = set()
        self._relay_tcp: dict[tuple[str, int], RelayStreamConnection] = {}
        self._timer: asyncio.TimerHandle | None = None

    async def start(self, host: str, port: int) -> tuple:
        loop = asyncio.get_running_loop()
        self._transport, _ = await loop.create_datagram_endpoint(lambda: _UdpProtocol(self), local_addr=(host, port))
        self.flush()
        return self._transport.get_extra_info("sockname")

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for conn in self._relay_tcp.values():
            await conn.stop()
        self._relay_tcp.clear()
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def add_relay_address(self, transport: str, relay) -> None:
        relay = (str(relay[0]), int(relay[1]))
        if transport == UDP:
            self._relay_udp.add(relay)
        elif relay not in self._relay_tcp:
            conn = RelayStreamConnection(
                relay,
                on_frame=lambda frame, r=relay: self._relay_frame(frame, TCP, r),
                on_connected=self._rebind_all,
            )
            self._relay_tcp[relay] = conn
            conn.start()

    def _rebind_all(self) -> None:
        self.mux.rebind_relays(self.clock())
        self._on_timer()

    def udp_received(self, data: bytes, addr) -> None:
        addr = (addr[0], addr[1])
        if addr in self._relay_udp:
            self._relay_frame(data, UDP, addr)
            return
        self.mux.receive_udp(data, addr, self.clock())
        self.flush()

    def _relay_frame(self, frame: bytes, transport: str, relay) -> None:
        self.mux.receive_relay_frame(frame, transport, relay, self.clock())
        self.flush()

    def flush(self) -> None:
        now = self.clock()
        while (event := self.mux.next_event(now)) is not None:
            self.on_event(event)
        for tx in self.mux.transmits(now):
            if tx.transport == UDP:
                if self._transport is not None:
                    self._transport.sendto(tx.data, tx.addr)
            else:
                conn = self._relay_tcp.get(tx.addr)
                if conn is None:
                    self.counters["tcp.no-connection"] += 1
                else:
                    conn.send(tx.data)
        self._arm()

    def _arm(self) -> None:
        deadline = self.mux.get_timer()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if deadline is None:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, deadline - self.clock())
        self._timer = loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.mux.handle_timer(self.clock())
        self.flush()


class EscalatingEndpoint:
    """The data plane's UDP endpoint (``recv``/``send``/``fileno``/``close``/``address``, as
    :class:`flatnet.node.udp.DatagramEndpoint`) with Graceful Escalation underneath.

    The data plane keeps sealing datagrams for a peer's *virtual* endpoint (the engine's
    ``peer.endpoint``); :meth:`send` carries them on the path the peer's selector chose: straight to
    the socket (a GSO train stays one ``sendmsg``) for direct rungs, framed for a relay otherwise.
    :meth:`recv` hands the data plane what arrived on any path, with the virtual endpoint as source;
    probes, BIND_ACKs and relay framing never reach it. Frames from a TCP relay arrive outside the
    socket's readiness, so they wait in a queue and :attr:`wake` (the data plane's "read the UDP
    socket now") is called.
    """

    def __init__(self, udp, mux: PathMux, clock: Callable[[], float]) -> None:
        self.udp = udp
        self.mux = mux
        self.clock = clock
        self.address = udp.address
        self.wake: Callable[[], None] | None = None
        self.counters: Counter[str] = Counter()
        self._inbound: deque = deque()
        self._relay_udp: set[tuple[str, int]] = set()
        self._relay_tcp: dict[tuple[str, int], RelayStreamConnection] = {}
        self._ticker: asyncio.Task | None = None

    # ---- DatagramEndpoint interface ----------------------------------------------------------

    def fileno(self) -> int:
        return self.udp.fileno()

    @property
    def pending(self) -> int:
        """Datagrams :meth:`recv` holds that the socket's readiness does not show: relay frames
        queued, and the socket's batched read-ahead (the data plane comes back for them)."""
        return len(self._inbound) + self.udp.pending

    def recv(self):
        return self._recv(self.udp.recv)

    def recv_lone(self):
        return self._recv(self.udp.recv_lone)

    def _recv(self, receive):
        mux = self.mux
        while True:
            if self._inbound:
                return self._inbound.popleft()
            got = receive()
            if got is None:
                self._flush_own()
                return None
            data, addr, segment = got
            if addr is None:
                return got
            addr = (addr[0], addr[1])
            now = self.clock()
            if addr in self._relay_udp:
                for frame in _segments(data, segment):
                    inbound = mux.inbound_relay(frame, UDP, addr, now)
                    if inbound is not None:
                        self._inbound.append((inbound[0], inbound[1], 0))
                self._flush_own()
                continue
            if segment and len(data) > segment and any(data[i] == PROBE_TYPE for i in range(0, len(data), segment)):
                for one in _segments(data, segment):
                    inbound = mux.inbound_udp(one, addr, now)
                    if inbound is not None:
                        self._inbound.append((inbound[0], inbound[1], 0))
                self._flush_own()
                continue
            count = (len(data) + segment - 1) // segment if segment else 1
            inbound = mux.inbound_udp(data, addr, now, count)
            if inbound is None:
                self._flush_own()
                continue
            return inbound[0], inbound[1], segment

    def send(self, buffer, addr, segment_size: int = 0) -> bool:
        mux = self.mux
        peer = mux.peer_for(addr)
        if peer is None:
            if isinstance(addr, tuple) and addr and addr[0] == "peer":
                self.counters["tx.unknown-peer"] += 1
                return True
            return self.udp.send(buffer, addr, segment_size)
        now = self.clock()
        path = peer.selector.current()
        first_type = buffer[0] if len(buffer) else -1
        if path is not None and not isinstance(path.address, RelayRoute) and first_type not in _HANDSHAKE_TYPES:
            peer.selector.record_sent(len(buffer))
            return self.udp.send(buffer, path.address, segment_size)
        for one in _segments(bytes(buffer), segment_size):
            mux.route(one, addr, now)
        self._flush_own()
        return True

    async def stop(self) -> None:
        """Stop the ticker and close the TCP relay connections (before :meth:`close`)."""
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.gather(self._ticker, return_exceptions=True)
            self._ticker = None
        for conn in self._relay_tcp.values():
            await conn.stop()
        self._relay_tcp.clear()

    def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        for conn in self._relay_tcp.values():  # not awaited: the loop may be gone (use stop() first)
            if conn._task is not None:
                conn._task.cancel()
        self._relay_tcp.clear()
        self.udp.close()

    # ---- relays, timers ------------------------------------------------------------------------

    def add_relay_address(self, transport: str, relay) -> None:
        relay = (str(relay[0]), int(relay[1]))
        if transport == UDP:
            self._relay_udp.add(relay)
        elif relay not in self._relay_tcp:
            conn = RelayStreamConnection(
                relay, on_frame=lambda frame, r=relay: self._tcp_frame(frame, r), on_connected=self._rebind_all
            )
            self._relay_tcp[relay] = conn
            conn.start()

    def relay_status(self) -> dict[str, dict]:
        """Each TCP relay connection: connected or not, and its counters (connect, closed-by-relay,
        connect-failed, drop.*)."""
        return {f"{r[0]}:{r[1]}": {"connected": c.connected, **c.counters} for r, c in self._relay_tcp.items()}

    def forget_unused_relays(self) -> None:
        """Close the TCP connections (and stop recognising the UDP addresses) of relays no relay
        session of any peer uses any more (after a dead relay's sessions were replaced)."""
        in_use = {
            (route.transport, route.relay)
            for peer in self.mux.peers.values() for binding in peer.relays.values() for route in binding.routes.values()
        }
        self._relay_udp = {r for r in self._relay_udp if (UDP, r) in in_use}
        for relay in [r for r in self._relay_tcp if (TCP, r) not in in_use]:
            conn = self._relay_tcp.pop(relay)
            if conn._task is not None:
                conn._task.cancel()  # its finally closes the socket
            self.counters["tcp.relay-forgotten"] += 1

    def _tcp_frame(self, frame: bytes, relay) -> None:
        inbound = self.mux.inbound_relay(frame, TCP, relay, self.clock())
        self._flush_own()
        if inbound is not None:
            self._inbound.append((inbound[0], inbound[1], 0))
            if self.wake is not None:
                self.wake()

    def _rebind_all(self) -> None:
        self.mux.rebind_relays(self.clock())
        self.tick()

    def start(self, interval: float = 0.1) -> None:
        self._ticker = asyncio.create_task(self._tick_forever(interval), name="path-ticker")

    async def _tick_forever(self, interval: float) -> None:
        while True:
            deadline = self.mux.paths_timer()
            now = self.clock()
            await asyncio.sleep(interval if deadline is None else min(interval, max(0.0, deadline - now)))
            self.tick()

    def tick(self) -> None:
        now = self.clock()
        deadline = self.mux.paths_timer()
        if deadline is not None and deadline <= now:
            self.mux.tick_paths(now)
        self._flush_own()

    def _flush_own(self) -> None:
        for tx in self.mux.take_transmits():
            if tx.transport == UDP:
                self.udp.send(tx.data, tx.addr)
            else:
                conn = self._relay_tcp.get(tx.addr)
                if conn is None:
                    self.counters["tcp.no-connection"] += 1
                else:
                    conn.send(tx.data)


def _segments(data: bytes, segment: int) -> list[bytes]:
    if not segment or len(data) <= segment:
        return [data]
    return [data[i : i + segment] for i in range(0, len(data), segment)]
