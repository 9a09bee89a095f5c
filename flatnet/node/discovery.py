"""flatnet-node's discovery: the lighthouse client wired to the tunnel engine and the path mux.

:class:`NodeDiscovery` is sans-I/O (``tick(now)``, ``take_event(event, now)``): it keeps the
:class:`~lighthouse.client.LighthouseClient` registered with every configured lighthouse over the
tunnel (lighthouses are tunnel peers like any other), resolves the peers this node wants, and turns
what the lighthouses say into paths for Graceful Escalation:

    PeerResolved(host, endpoints, relays)   -> mux.punch(host, endpoints); a relay session is asked
                                               for at once, so the first packets have a path that
                                               works through any NAT while punching is tried
    PunchRequested(peer, endpoints)         -> mux.punch(peer, endpoints)
    RelayOffered(offer)                     -> mux.add_relay(peer, session, side, token, relays)
    RegisterAck with another observed addr  -> mux.underlay_changed(): we roamed

A peer's relay sessions are asked for again when all of them have gone unacknowledged for the
mux's ``relay_dead_after`` (the relay died and stays down): the new session, likely on another
lighthouse's relay, replaces the dead one.

Which peers does a node want? Every ``[[peers]]`` entry (an entry without endpoints is found only
through the lighthouses). Answers are re-asked for when the lighthouse's TTL runs out, which also
re-sends the peer a punch notice: a peer that roamed is found again within ``answer_ttl``.

:class:`DiscoveryService` is the asyncio edge: a ticker that takes the lighthouses' CONTROL
messages from the data plane's ``control_inbox`` (the data plane opens every transport message).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Iterable
from ipaddress import IPv4Address

from flatnet.escalation import Rung
from flatnet.node.paths import TCP, UDP, PathMux
from flatnet.proto.control import TRANSPORT_UDP
from flatnet.proto.events import ControlReceived
from flatnet.proto.header import MessageType
from lighthouse.client import (
    CatalogueFailed,
    CatalogueReceived,
    ClientSettings,
    LighthouseClient,
    PeerResolved,
    PunchRequested,
    QueryFailed,
    RelayOffered,
)

log = logging.getLogger("flatnet.node.discovery")

RESOLVE_RETRY = 5.0  # a peer not found (or not answered) is asked for again after this
RELAY_RETRY = 5.0  # a relay session asked for and not offered is asked for again after this
RELAY_WAIT = 2.0  # the higher-IP end waits this long for the lower's session before asking itself


class NodeDiscovery:
    def __init__(
        self,
        mux: PathMux,
        lighthouses: dict,
        wanted_peers: Iterable = (),
        lan_endpoints: Iterable = (),
        settings: ClientSettings | None = None,
        now: float = 0.0,
        use_relays: bool = True,
    ) -> None:
        """*lighthouses*: {Flatnet IP: [(host, port), ...]}; *wanted_peers*: Flatnet IPs to find."""
        self.mux = mux
        self.engine = mux.engine
        certificate = self.engine.certificate
        self.lighthouses = {IPv4Address(ip): [tuple(e) for e in eps] for ip, eps in lighthouses.items()}
        self.client = LighthouseClient(
            list(self.lighthouses), certificate.ip.ip, certificate.subnets, settings, now
        )
        self.client.set_endpoints([tuple(e) for e in lan_endpoints], now)
        for ip, endpoints in self.lighthouses.items():
            mux.add_peer(ip, now, probing=False)
            for endpoint in endpoints:
                mux.add_candidate(ip, endpoint, now, Rung.PUNCHED)
        self.wanted: dict[IPv4Address, float] = {IPv4Address(ip): now for ip in wanted_peers}
        for ip in self.wanted:
            mux.add_peer(ip, now)  # the engine routes to it (its virtual endpoint) from the start
        self.use_relays = use_relays
        self._relay_asked: dict[IPv4Address, float] = {}  # peer -> when we asked (until an offer)
        self._unsent: list[tuple[IPv4Address, bytes]] = []
        self._observed: dict = {}
        self._last_refresh = float("-inf")
        self.counters: Counter[str] = Counter()

    def set_lan_endpoints(self, endpoints, now: float) -> bool:
        """Our own underlay addresses (polled from the interfaces): a change is roaming. Returns
        True if they changed."""
        endpoints = tuple(tuple(e) for e in endpoints)
        if endpoints == self.client.endpoints:
            return False
        had = bool(self.client.endpoints)
        self.client.set_endpoints(endpoints, now)  # registers everywhere at once
        if had:
            self.counters["underlay-changed"] += 1
            log.info("underlay endpoints now %s: re-probing every path", endpoints)
            self.mux.underlay_changed(now)
            for ip in self.wanted:
                self.wanted[ip] = now
        return True

    def path_died(self, now: float) -> None:
        """A peer's current path stopped answering: we (or it) may have moved. Re-register now
        (the lighthouses' answer tells us our observed address) and re-resolve, at most every 10 s."""
        if now - self._last_refresh < 10.0:
            return
        self._last_refresh = now
        self.counters["refresh-after-dead-path"] += 1
        self.client.set_endpoints(self.client.endpoints, now)
        for ip in self.wanted:
            self.wanted[ip] = now

    def want(self, peer_ip, now: float) -> None:
        self.mux.add_peer(peer_ip, now)
        self.wanted.setdefault(IPv4Address(peer_ip), now)

    def take_event(self, event, now: float) -> bool:
        """An engine event: True if it was a lighthouse's control message (consumed here)."""
        if isinstance(event, ControlReceived) and event.peer_ip in self.lighthouses:
            self.take_control(event.payload, event.peer_ip, now)
            return True
        return False

    def take_control(self, payload: bytes, lighthouse, now: float) -> None:
        """A CONTROL payload from a lighthouse (authenticated by the tunnel)."""
        self.client.handle_control(payload, IPv4Address(lighthouse), now)
        self._resolve_due(now)  # the first RegisterAck lets the queries go
        self._after_client(now)

    def tick(self, now: float) -> None:
        self.client.tick(now)
        if self.use_relays:
            self._replace_dead_relays(now)
        for host, asked in self._relay_asked.items():
            if now - asked > RELAY_RETRY:  # no offer came (refused, lost, lighthouse restarted)
                self._relay_asked[host] = now
                self.counters["relay-re-requested"] += 1
                self.client.request_relay(host, now)
        self._resolve_due(now)
        self._after_client(now)

    def _replace_dead_relays(self, now: float) -> None:
        """A peer whose every relay session has gone unacknowledged for the mux's
        ``relay_dead_after`` (its relay died, or stays down) gets a session asked for again, as at
        first: the lower IP at once, the higher after RELAY_WAIT unless the lower's session brings
        it an offer. The request goes to the lighthouse that acknowledged us last, so with a
        second lighthouse up it is that one's relay; the dead session is dropped when the new one
        is added (``PathMux.add_relay``)."""
        for host in self.mux.peers_with_dead_relays(now):
            if self._relay_asked.get(host) != float("inf"):
                continue  # asking already
            self.counters["relay-dead"] += 1
            log.info("every relay session to %s is dead: asking for another", host)
            if self.engine.certificate.ip.ip < host:
                self._relay_asked[host] = now
                self.client.request_relay(host, now)
            else:
                self._relay_asked[host] = now - RELAY_RETRY + RELAY_WAIT

    def registered(self) -> bool:
        return any(acked is not None for acked, _ in self.client.lighthouse_status().values())

    def _resolve_due(self, now: float) -> None:
        # Ask only once a lighthouse has our record: a query from a node it does not know gets no
        # punch notice sent to the peer, and a relay request is refused.
        if not self.registered():
            return
        for ip, due in self.wanted.items():
            if due <= now:
                result = self.client.resolve(ip, now)
                if result is not None:
                    self._resolved(result, now)
                self.wanted[ip] = now + RESOLVE_RETRY

    def next_deadline(self) -> float:
        deadlines = [self.client.next_deadline()]
        if self.registered():
            deadlines.extend(self.wanted.values())
        deadlines.extend(t + RELAY_RETRY for t in self._relay_asked.values() if t != float("inf"))
        return min(deadlines)

    def _after_client(self, now: float) -> None:
        client = self.client
        while (event := client.next_event()) is not None:
            if isinstance(event, PeerResolved):
                self._resolved(event, now)
            elif isinstance(event, PunchRequested):
                self.counters["punch-requested"] += 1
                self.mux.punch(event.peer_ip, event.endpoints, now)
                self._bring_up(event.peer_ip, now)  # our initiation is the punch the peer waits for
            elif isinstance(event, RelayOffered):
                self._relay_offered(event.offer, now)
            elif isinstance(event, QueryFailed):
                self.counters[f"query-failed.{event.reason}"] += 1
            elif isinstance(event, (CatalogueReceived, CatalogueFailed)):
                self.catalogue_event(event)  # the catalogue follower (flatnet/node/catalogue.py)
        for lh, (_acked, observed) in client.lighthouse_status().items():
            if observed is None:
                continue
            previous = self._observed.get(lh)
            self._observed[lh] = observed
            if previous is not None and previous != observed:
                self.counters["roamed"] += 1
                log.info("lighthouse %s sees us at %s (was %s): underlay changed", lh, observed, previous)
                self.mux.underlay_changed(now)
                for ip in self.wanted:
                    self.wanted[ip] = now  # re-resolve: the peers get punch notices with our new address
        self._unsent += [(m.lighthouse, m.payload) for m in client.messages_to_send()]
        # A payload for a lighthouse whose tunnel is not up waits (send_control starts the
        # handshake); the client's retries cover a lighthouse that never answers.
        self._unsent = [(lh, p) for lh, p in self._unsent if not self.engine.send_control(p, lh, now)][-64:]

    def _resolved(self, result: PeerResolved, now: float) -> None:
        self.counters["resolved"] += 1
        host = result.host_ip
        if host not in self.wanted and result.address in self.wanted:
            self.wanted.setdefault(host, now + RESOLVE_RETRY)
        self.mux.punch(host, result.endpoints, now)
        self._bring_up(host, now)
        if self.use_relays and result.relays and host not in self._relay_asked:
            # Both ends usually resolve each other; one session per pair is enough: the lower IP
            # asks at once, the higher waits RELAY_WAIT for the offer that session brings it.
            if self.engine.certificate.ip.ip < host:
                self._relay_asked[host] = now
                self.client.request_relay(host, now)
            else:
                self._relay_asked[host] = now - RELAY_RETRY + RELAY_WAIT

    def _bring_up(self, host: IPv4Address, now: float) -> None:
        if self.engine.session_for(host, now) is None:
            # Bring the tunnel up now (send_control starts the handshake and drops the empty
            # payload): the probes are keyed from its session, so paths are found before traffic.
            self.engine.send_control(b"", host, now)

    def _relay_offered(self, offer, now: float) -> None:
        relays, seen = [], set()
        for relay in offer.relays:
            transport = UDP if relay.transport == TRANSPORT_UDP else TCP
            if transport not in seen:  # one UDP and one TCP endpoint per session
                seen.add(transport)
                relays.append((transport, tuple(relay.endpoint)))
        if not relays:
            self.counters["relay-offer-empty"] += 1
            return
        self.counters["relay-offered"] += 1
        self._relay_asked[offer.peer_ip] = float("inf")  # granted: never ask again for this peer
        self.mux.add_relay(offer.peer_ip, offer.session_id, offer.side, offer.token, relays, now)
        self.relay_endpoints_added(relays)

    relay_endpoints_added: Callable[[list], None] = staticmethod(lambda relays: None)
    catalogue_event: Callable[[object], None] = staticmethod(lambda event: None)

    def status(self) -> dict:
        return {
            "lighthouses": {
                str(lh): {"acked_at": acked, "observed": None if obs is None else f"{obs[0]}:{obs[1]}"}
                for lh, (acked, obs) in self.client.lighthouse_status().items()
            },
            "counters": dict(self.counters),
            "client": dict(self.client.counters),
        }


class DiscoveryService:
    """The asyncio edge: feeds discovery the lighthouses' control messages, runs its ticker,
    sends what the engine queued, tells the endpoint about relays."""

    def __init__(
        self, discovery: NodeDiscovery, endpoint, clock: Callable[[], float], control_inbox=None, interval: float = 0.1
    ) -> None:
        """*control_inbox*: the data plane's deque of (peer IP, message type, payload) for CONTROL
        messages it opened (``Dataplane.control_inbox``); lighthouse messages are taken from it."""
        self.discovery = discovery
        self.endpoint = endpoint
        self.clock = clock
        self.control_inbox = control_inbox
        self.interval = interval
        self.auto_endpoints: tuple[int, set[str]] | None = None  # (port, interfaces to skip): poll ours
        self._next_poll = 0.0
        self._task: asyncio.Task | None = None
        discovery.relay_endpoints_added = self._relays_added

    def _relays_added(self, relays) -> None:
        for transport, relay in relays:
            self.endpoint.add_relay_address(transport, relay)
        forget = getattr(self.endpoint, "forget_unused_relays", None)
        if forget is not None:  # a new session may have replaced a dead relay's
            forget()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="discovery")

    async def _run(self) -> None:
        while True:
            try:
                await self._round()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not end discovery for the life of the node
                self.discovery.counters["internal-error"] += 1
                log.exception("discovery round failed")
            await asyncio.sleep(self.interval)

    async def _round(self) -> None:
        inbox = self.control_inbox
        now = self.clock()
        while inbox:
            peer_ip, msg_type, payload = inbox.popleft()
            if msg_type == MessageType.CONTROL and peer_ip in self.discovery.lighthouses:
                self.discovery.take_control(payload, peer_ip, now)
        while (change := self.discovery.mux.next_path_event()) is not None:
            if change[1].reason == "dead":
                self.discovery.path_died(now)
        if self.auto_endpoints is not None and now >= self._next_poll:
            self._next_poll = now + 2.0
            port, exclude = self.auto_endpoints
            try:
                endpoints = await asyncio.to_thread(local_endpoints, port, exclude)
            except OSError:
                endpoints = None
            if endpoints is not None:
                self.discovery.set_lan_endpoints(endpoints, self.clock())
        self.discovery.tick(now)
        # Control datagrams (and handshakes) the engine queued: the data plane drains the
        # engine only on traffic and its timers, so send them now, on their paths.
        for data, addr in self.discovery.engine.datagrams_to_send():
            self.endpoint.send(data, addr)
        self.endpoint.tick()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None


def _endpoint(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


class Escalation:
    """What the tunnel component holds when escalation is on: the mux, the endpoint the data
    plane uses, discovery (with lighthouses) and their asyncio services."""

    def __init__(self, mux: PathMux, endpoint, discovery: NodeDiscovery | None, clock) -> None:
        self.mux = mux
        self.endpoint = endpoint
        self.discovery = discovery
        self.clock = clock
        self.service: DiscoveryService | None = None
        self.auto_endpoints: tuple[int, set[str]] | None = None

    def start(self, dataplane_service) -> None:
        # Frames from a TCP relay arrive outside the UDP socket's readiness: have the data plane
        # read its endpoint (which hands them over) when one comes.
        self.endpoint.wake = getattr(dataplane_service, "_on_udp", None)
        self.endpoint.start()
        if self.discovery is not None:
            inbox = getattr(getattr(getattr(dataplane_service, "io", None), "dataplane", None), "control_inbox", None)
            self.service = DiscoveryService(self.discovery, self.endpoint, self.clock, inbox)
            self.service.auto_endpoints = self.auto_endpoints
            self.service.start()

    async def stop(self) -> None:
        if self.service is not None:
            await self.service.stop()
        await self.endpoint.stop()

    def status(self) -> dict:
        out = {
            "peers": self.mux.status(self.clock()),
            "counters": dict(self.mux.counters),
            "endpoint": dict(self.endpoint.counters),
            "relay_tcp": self.endpoint.relay_status() if hasattr(self.endpoint, "relay_status") else {},
            "tunnel_drops": dict(self.mux.engine.drops),
        }
        if self.discovery is not None:
            out["discovery"] = self.discovery.status()
        return out


def attach_escalation(config, engine, udp, clock) -> Escalation:
    """Build escalation for a node from its config (``[lighthouse]``, ``[[peers]]``): returns the
    :class:`Escalation` whose ``endpoint`` replaces *udp* for the data plane."""
    from flatnet.node.paths import EscalatingEndpoint
    from flatnet.pki.files import load_host_key

    now = clock()
    mux = PathMux(engine, load_host_key(config.pki.key))
    endpoint = EscalatingEndpoint(udp, mux, clock)
    wanted = []
    for peer in config.peers:
        mux.add_peer(peer.ip, now)
        for text in peer.endpoints:
            mux.add_candidate(peer.ip, _endpoint(text), now)
        wanted.append(peer.ip)
    discovery = None
    lh = config.lighthouse
    if lh.hosts:
        advertise = [_endpoint(t) for t in lh.advertise]
        auto = None
        if not advertise and config.tunnel.listen_host not in ("0.0.0.0", "", "::"):
            advertise = [(config.tunnel.listen_host, udp.address[1])]
        elif not advertise:  # listening on every address: advertise the interfaces' (and follow them)
            auto = (udp.address[1], {"lo", config.tunnel.tun_name})
        discovery = NodeDiscovery(
            mux,
            {h.ip: [_endpoint(e) for e in h.endpoints] for h in lh.hosts},
            wanted,
            advertise,
            now=now,
            use_relays=lh.relays,
        )
    escalation = Escalation(mux, endpoint, discovery, clock)
    if discovery is not None:
        escalation.auto_endpoints = auto
    return escalation


def local_endpoints(port: int, exclude: set[str]) -> list[tuple[str, int]]:
    """(IPv4 address, *port*) for each address of this namespace's interfaces, except *exclude*d
    interfaces and loopback addresses (pyroute2; runs in a thread: it is synchronous)."""
    from pyroute2 import IPRoute

    out = []
    with IPRoute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        for addr in ipr.get_addr(family=2):
            if names.get(addr["index"]) in exclude:
                continue
            ip = addr.get_attr("IFA_ADDRESS")
            if ip and not ip.startswith("127."):
                out.append((ip, port))
    return sorted(out)[:7]


def observe_escalation(metrics, mux: PathMux, now: float) -> None:
    """Prometheus view of escalation (``flatnet.observability.Metrics``, from a periodic tick):
    ``flatnet_peer_rung{peer}`` = the Rung's number (-1: no path yet), and the time and bytes per
    rung (``flatnet_peer_rung_seconds``, ``flatnet_peer_rung_bytes_total`` with ``peer``, ``rung``
    labels), as :meth:`PathMux.status` shows them."""
    seconds = "peer_rung_seconds" in metrics
    sent = "peer_rung_bytes_total" in metrics
    for ip, peer in mux.peers.items():
        if not peer.probing:
            continue  # lighthouses
        current = peer.selector.current()
        metrics["peer_rung"].labels(peer=str(ip)).set(-1 if current is None else int(current.rung))
        if seconds:
            for rung, value in peer.selector.rung_seconds(now).items():
                metrics["peer_rung_seconds"].labels(peer=str(ip), rung=rung.label).set(value)
        if sent:
            metrics.absorb_counter(
                "peer_rung_bytes_total", {r.label: v for r, v in peer.selector.bytes_sent.items()}, "rung", peer=str(ip)
            )
