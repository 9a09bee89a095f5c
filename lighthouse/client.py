"""The node's side of discovery, sans-I/O: registers with every lighthouse and resolves peers.

Theory of operation
-------------------
A network has several lighthouses so that losing one loses nothing. The node's
:class:`LighthouseClient` therefore talks to all of them, and no answer depends on any single one:

- **Registration**: every ``register_interval`` seconds it sends ``Register`` (Flatnet IP,
  subnets, LAN endpoints) to each lighthouse. A lighthouse that has not acknowledged is asked
  again every ``retry_interval`` (it may have restarted, or the tunnel to it is still
  handshaking). A ``RegisterAck`` with ``new`` set means that lighthouse had no record of us: the
  services are published to it again at once.
- **Queries**: :meth:`resolve` answers from the cache when it can; otherwise it sends one
  ``Query`` (one request id) to every lighthouse and returns ``None``. The first lighthouse to
  answer *found* wins: the answer is cached (for the TTL the lighthouse gave) and a
  :class:`PeerResolved` event fires at once. Answers arriving later before the deadline are
  merged in (their extra endpoints and relays appended) and fire :class:`PeerResolved` again if
  they added something. A query no lighthouse answered within ``query_timeout`` fires
  :class:`QueryFailed` (``not-found`` if every lighthouse that answered said so, else
  ``timeout``); a not-found answer is cached for ``negative_ttl`` so a node does not hammer the
  lighthouses for an address nobody owns.
- **Punching**: a lighthouse forwards ``PunchNotify`` when someone queries us; every lighthouse
  the querier asked sends one, so identical notifications within ``punch_dedup_window`` are
  folded into one :class:`PunchRequested`.
- **Relays**: :meth:`request_relay` asks one lighthouse (the one that last acknowledged us);
  offers - ours and those for sessions peers asked for - come out as :class:`RelayOffered`.
- **Catalogue**: :meth:`request_catalogue` asks every lighthouse for the first page, then follows
  the pages of whichever answered first; the whole catalogue comes out as
  :class:`CatalogueReceived`.

Inputs are method calls with ``now``; outputs are pulled: :meth:`messages_to_send` (control
payloads addressed to a lighthouse) and :meth:`next_event`; :meth:`next_deadline` says when to
call :meth:`tick`. Lighthouses are named by opaque hashable ids (the I/O layer uses their Flatnet
IPs, which is how the tunnel addresses them).
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from flatnet.proto import control
from flatnet.proto.control import (
    MAX_ENDPOINTS,
    MAX_RELAYS,
    MAX_REQUEST_ID,
    CatalogueEntry,
    CatalogueQuery,
    CatalogueReply,
    ControlMessageError,
    Endpoint,
    PunchNotify,
    Query,
    QueryReply,
    Refused,
    Register,
    RegisterAck,
    Relay,
    RelayOffer,
    RelayRequest,
    Service,
    ServicePublish,
)

LighthouseId = Hashable


@dataclass(frozen=True)
class ClientSettings:
    register_interval: float = 30.0  # well under the lighthouse's node_ttl (120 s by default)
    retry_interval: float = 5.0  # re-send Register to a lighthouse that has not acknowledged
    query_timeout: float = 2.0
    negative_ttl: float = 5.0
    max_cache_entries: int = 4096
    max_pending_queries: int = 1024
    punch_dedup_window: float = 2.0
    catalogue_timeout: float = 5.0


# --- outputs ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ToLighthouse:
    lighthouse: LighthouseId
    payload: bytes


@dataclass(frozen=True, slots=True)
class PeerResolved:
    address: IPv4Address  # what was asked
    host_ip: IPv4Address  # the host that owns it (the tunnel peer to use)
    endpoints: tuple[Endpoint, ...]  # the host's observed endpoint first
    relays: tuple[Relay, ...]
    lighthouse: LighthouseId  # the lighthouse whose answer came first
    merged: bool = False  # a later lighthouse added endpoints or relays to an earlier answer


@dataclass(frozen=True, slots=True)
class QueryFailed:
    address: IPv4Address
    reason: str  # "not-found" | "timeout"


@dataclass(frozen=True, slots=True)
class PunchRequested:
    peer_ip: IPv4Address
    endpoints: tuple[Endpoint, ...]


@dataclass(frozen=True, slots=True)
class RelayOffered:
    offer: RelayOffer
    lighthouse: LighthouseId


@dataclass(frozen=True, slots=True)
class CatalogueReceived:
    entries: tuple[CatalogueEntry, ...]
    lighthouse: LighthouseId


@dataclass(frozen=True, slots=True)
class CatalogueFailed:
    reason: str  # "timeout"


@dataclass(frozen=True, slots=True)
class LighthouseRefused:
    lighthouse: LighthouseId
    request_id: int
    reason: str


ClientEvent = (
    PeerResolved
    | QueryFailed
    | PunchRequested
    | RelayOffered
    | CatalogueReceived
    | CatalogueFailed
    | LighthouseRefused
)


# --- state --------------------------------------------------------------------------------------


class _LighthouseState:
    __slots__ = ("next_register", "acked_at", "observed")

    def __init__(self, now: float) -> None:
        self.next_register = now
        self.acked_at: float | None = None
        self.observed: Endpoint | None = None


class _PendingQuery:
    __slots__ = ("request_id", "address", "deadline", "asked", "answered", "not_found", "result")

    def __init__(self, request_id: int, address: IPv4Address, deadline: float, asked: frozenset) -> None:
        self.request_id = request_id
        self.address = address
        self.deadline = deadline
        self.asked = asked
        self.answered: set[LighthouseId] = set()
        self.not_found = 0
        self.result: PeerResolved | None = None


class _CachedAnswer:
    __slots__ = ("result", "expires")

    def __init__(self, result: PeerResolved | None, expires: float) -> None:
        self.result = result  # None: a cached not-found
        self.expires = expires


class _CatalogueFetch:
    __slots__ = ("request_id", "source", "entries", "deadline")

    def __init__(self, request_id: int, deadline: float) -> None:
        self.request_id = request_id
        self.source: LighthouseId | None = None
        self.entries: list[CatalogueEntry] = []
        self.deadline = deadline


class LighthouseClient:
    def __init__(
        self,
        lighthouses: Sequence[LighthouseId],
        ip: IPv4Address,
        subnets: Sequence[IPv4Network] = (),
        settings: ClientSettings | None = None,
        now: float = 0.0,
    ) -> None:
        if not lighthouses:
            raise ValueError("a LighthouseClient needs at least one lighthouse")
        self.settings = settings or ClientSettings()
        self.ip = ip
        self.subnets = tuple(subnets)
        self.endpoints: tuple[Endpoint, ...] = ()
        self.services: tuple[Service, ...] = ()
        self._lighthouses = {lh: _LighthouseState(now) for lh in lighthouses}
        self._pending: dict[int, _PendingQuery] = {}
        self._pending_by_address: dict[IPv4Address, int] = {}
        self._cache: OrderedDict[IPv4Address, _CachedAnswer] = OrderedDict()
        self._recent_punches: OrderedDict[tuple, float] = OrderedDict()
        self._catalogue: _CatalogueFetch | None = None
        self._next_request_id = 1
        self._outbox: list[ToLighthouse] = []
        self._events: deque[ClientEvent] = deque()
        self.counters: Counter[str] = Counter()

    # --- pulled outputs ---

    def messages_to_send(self) -> list[ToLighthouse]:
        out, self._outbox = self._outbox, []
        return out

    def next_event(self) -> ClientEvent | None:
        return self._events.popleft() if self._events else None

    def next_deadline(self) -> float:
        deadlines = [state.next_register for state in self._lighthouses.values()]
        deadlines.extend(p.deadline for p in self._pending.values())
        if self._catalogue is not None:
            deadlines.append(self._catalogue.deadline)
        return min(deadlines)

    # --- inspection ---

    def lighthouse_status(self) -> dict[LighthouseId, tuple[float | None, Endpoint | None]]:
        """Per lighthouse: when it last acknowledged us, and the address it sees us at."""
        return {lh: (st.acked_at, st.observed) for lh, st in self._lighthouses.items()}

    # --- inputs ---

    def set_endpoints(self, endpoints: Sequence[Endpoint], now: float) -> None:
        """Our LAN endpoints changed (roaming, a new interface): register everywhere at once."""
        self.endpoints = tuple(endpoints)[: MAX_ENDPOINTS - 1]  # one slot for the observed address
        for state in self._lighthouses.values():
            state.next_register = now

    def set_services(self, services: Sequence[Service]) -> None:
        self.services = tuple(services)
        for lh in self._lighthouses:
            self._send(lh, ServicePublish(self.services))

    def tick(self, now: float) -> None:
        s = self.settings
        for lh, state in self._lighthouses.items():
            if state.next_register <= now:
                self._send(lh, Register(self.ip, self.subnets, self.endpoints))
                state.next_register = now + s.retry_interval  # pushed to register_interval by the ack
        for pending in [p for p in self._pending.values() if p.deadline <= now]:
            self._finish(pending, now)
        fetch = self._catalogue
        if fetch is not None and fetch.deadline <= now:
            self._catalogue = None
            self._events.append(CatalogueFailed("timeout"))

    def resolve(self, address: IPv4Address, now: float) -> PeerResolved | None:
        """The cached answer for *address*, or None after starting a query (answer as an event).

        A cached not-found also returns None, without querying again until it expires.
        """
        cached = self._cache.get(address)
        if cached is not None:
            if cached.expires > now:
                self._cache.move_to_end(address)
                return cached.result
            del self._cache[address]
        if address in self._pending_by_address:
            return None
        if len(self._pending) >= self.settings.max_pending_queries:
            self.counters["query.dropped-too-many-pending"] += 1
            return None
        request_id = self._new_request_id()
        pending = _PendingQuery(
            request_id, address, now + self.settings.query_timeout, frozenset(self._lighthouses)
        )
        self._pending[request_id] = pending
        self._pending_by_address[address] = request_id
        for lh in self._lighthouses:
            self._send(lh, Query(request_id, address))
        self.counters["query.sent"] += 1
        return None

    def request_relay(self, peer_ip: IPv4Address, now: float) -> None:
        """Ask one lighthouse (the most recently acknowledging) for a relay session to *peer_ip*."""
        best = max(self._lighthouses.items(), key=lambda item: item[1].acked_at or -1.0)[0]
        self._send(best, RelayRequest(self._new_request_id(), peer_ip))

    def request_catalogue(self, now: float) -> None:
        fetch = self._catalogue = _CatalogueFetch(
            self._new_request_id(), now + self.settings.catalogue_timeout
        )
        for lh in self._lighthouses:
            self._send(lh, CatalogueQuery(fetch.request_id, None))

    def handle_control(self, payload: bytes, lighthouse: LighthouseId, now: float) -> None:
        """One control payload from *lighthouse* (authenticated by the tunnel)."""
        state = self._lighthouses.get(lighthouse)
        if state is None:
            self.counters["drop.not-a-lighthouse"] += 1
            return
        try:
            msg = control.parse_control_message(payload)
        except ControlMessageError as exc:
            self.counters[f"drop.malformed.{exc.reason}"] += 1
            return
        if isinstance(msg, RegisterAck):
            state.acked_at = now
            state.observed = msg.observed
            state.next_register = now + self.settings.register_interval
            if msg.new and self.services:
                self._send(lighthouse, ServicePublish(self.services))
        elif isinstance(msg, QueryReply):
            self._on_query_reply(msg, lighthouse, now)
        elif isinstance(msg, PunchNotify):
            self._on_punch_notify(msg, now)
        elif isinstance(msg, RelayOffer):
            self._events.append(RelayOffered(msg, lighthouse))
        elif isinstance(msg, CatalogueReply):
            self._on_catalogue_reply(msg, lighthouse, now)
        elif isinstance(msg, Refused):
            self.counters[f"refused.{msg.reason}"] += 1
            if msg.reason == "not-registered":
                state.next_register = now
            self._events.append(LighthouseRefused(lighthouse, msg.request_id, msg.reason))
        else:
            self.counters["drop.not-for-node"] += 1

    # --- handlers ---

    def _on_query_reply(self, msg: QueryReply, lighthouse: LighthouseId, now: float) -> None:
        pending = self._pending.get(msg.request_id)
        if (
            pending is None
            or pending.address != msg.address
            or lighthouse not in pending.asked
            or lighthouse in pending.answered
        ):
            self.counters["drop.unexpected-reply"] += 1
            return
        pending.answered.add(lighthouse)
        if not msg.found or msg.host_ip is None:
            pending.not_found += 1
        else:
            previous = pending.result
            if previous is None:
                result = PeerResolved(msg.address, msg.host_ip, msg.endpoints, msg.relays, lighthouse)
            else:
                endpoints = previous.endpoints + tuple(
                    e for e in msg.endpoints if e not in previous.endpoints
                )
                relays = previous.relays + tuple(r for r in msg.relays if r not in previous.relays)
                endpoints, relays = endpoints[:MAX_ENDPOINTS], relays[:MAX_RELAYS]
                if msg.host_ip != previous.host_ip or (endpoints, relays) == (
                    previous.endpoints,
                    previous.relays,
                ):
                    result = None  # nothing new (a disagreeing host: the first answer stands)
                else:
                    result = PeerResolved(
                        msg.address, previous.host_ip, endpoints, relays, previous.lighthouse, merged=True
                    )
            if result is not None:
                pending.result = result
                self._cache_put(msg.address, result, now + msg.ttl)
                self._events.append(result)
        if pending.answered == pending.asked:
            self._finish(pending, now)

    def _finish(self, pending: _PendingQuery, now: float) -> None:
        del self._pending[pending.request_id]
        del self._pending_by_address[pending.address]
        if pending.result is not None:
            return
        if pending.not_found and pending.not_found == len(pending.answered):
            self._cache_put(pending.address, None, now + self.settings.negative_ttl)
            self._events.append(QueryFailed(pending.address, "not-found"))
        else:
            self.counters["query.timeout"] += 1
            self._events.append(QueryFailed(pending.address, "timeout"))

    def _on_punch_notify(self, msg: PunchNotify, now: float) -> None:
        key = (msg.peer_ip, msg.endpoints)
        recent = self._recent_punches
        while recent and next(iter(recent.values())) <= now - self.settings.punch_dedup_window:
            recent.popitem(last=False)
        if key in recent:
            self.counters["punch.duplicate"] += 1
            return
        recent[key] = now
        self._events.append(PunchRequested(msg.peer_ip, msg.endpoints))

    def _on_catalogue_reply(self, msg: CatalogueReply, lighthouse: LighthouseId, now: float) -> None:
        fetch = self._catalogue
        if fetch is None or msg.request_id != fetch.request_id:
            self.counters["drop.unexpected-reply"] += 1
            return
        if fetch.source is None:
            fetch.source = lighthouse  # the first to answer serves every following page
        elif fetch.source != lighthouse:
            return  # another lighthouse's first page, too late
        fetch.entries.extend(msg.entries)
        if msg.next_cursor is None:
            self._catalogue = None
            self._events.append(CatalogueReceived(tuple(fetch.entries), lighthouse))
        else:
            fetch.deadline = now + self.settings.catalogue_timeout
            self._send(lighthouse, CatalogueQuery(fetch.request_id, msg.next_cursor))

    # --- helpers ---

    def _cache_put(self, address: IPv4Address, result: PeerResolved | None, expires: float) -> None:
        cache = self._cache
        cache[address] = _CachedAnswer(result, expires)
        cache.move_to_end(address)
        while len(cache) > self.settings.max_cache_entries:
            cache.popitem(last=False)

    def _new_request_id(self) -> int:
        request_id = self._next_request_id
        self._next_request_id = request_id % MAX_REQUEST_ID + 1  # 1..MAX, 0 means "not a reply"
        return request_id

    def _send(self, lighthouse: LighthouseId, msg: control.ControlMessage) -> None:
        self._outbox.append(ToLighthouse(lighthouse, control.encode_control_message(msg)))
