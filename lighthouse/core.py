"""The lighthouse's logic, sans-I/O: authenticated control payloads in, payloads to send out.

Theory of operation
-------------------
The lighthouse is reached over the same Noise tunnel as any peer, so every payload handed to
:meth:`LighthouseCore.handle_control` comes with the sender's *verified* certificate and the
underlay address the datagram came from (``observed_addr``). The core never sees an
unauthenticated byte; the I/O layer drops and counts those before they get here.

Per message, in this order (cheap checks first, so a flood costs as little as possible):

1. **Rate limit.** A token bucket per node (``rate`` per second, ``burst``), driven by ``now``.
   A registered node's bucket lives in its record; a node that has not registered yet gets one
   from a small LRU table of ``max_strangers``. Over the limit: dropped and counted, no reply
   (a reply would turn the lighthouse into an amplifier).
2. **Parse** (``flatnet.proto.control``). A bad message is dropped and counted by reason;
   state is untouched.
3. **Dispatch** by type:

   - ``Register``: the claimed Flatnet IP must be the certificate's, every subnet inside one of the
     certificate's subnets, or the whole message is refused (``Refused`` +
     ``refused.claim-outside-certificate``). The record stores the observed endpoint first, then
     the claimed LAN endpoints (unusable ones - unspecified, multicast, loopback - are dropped),
     at most ``MAX_ENDPOINTS``. Soft state: the record expires ``node_ttl`` seconds after the
     last Register; nodes re-register well before that. ``RegisterAck`` tells the node what
     address the lighthouse sees and whether the record is new (then it publishes its services
     again).
   - ``Query``: finds the host that owns the address (its Flatnet IP, or the longest registered
     subnet containing it) and answers with its endpoints and the relays; *at the same time* it
     sends the owner a ``PunchNotify`` carrying the querier's endpoints, so both sides send
     packets at each other and open their NATs (the querier must be registered for that).
   - ``ServicePublish``: replaces the node's service list; each service address must be the
     node's IP or inside its certificate's subnets.
   - ``CatalogueQuery``: pages through every published service, ordered by host IP.
   - ``RelayRequest``: grants a relay session to the asker and the peer (``RelayOffer`` to both),
     with tokens the relay can check on its own (``flatnet.proto.relay``).

Memory is bounded: at most ``max_nodes`` records (a new node beyond that is refused with
``full``), ``MAX_ENDPOINTS`` endpoints and ``MAX_SUBNETS`` subnets and ``MAX_SERVICES`` services
each, ``max_strangers`` buckets for unregistered senders. Records use ``__slots__`` and store
endpoints packed (6 bytes for IPv4 + port).

:meth:`LighthouseCore.tick` expires records. Because every record's lifetime is the same
``node_ttl``, records sit in an ordered dict in refresh order and expiry pops from the front:
O(expired), not O(nodes).

Counters (``core.counters``, a ``collections.Counter`` keyed by stable strings; the service
exports them as metrics): ``rx.<type>``, ``drop.rate-limited``, ``drop.malformed.<reason>``,
``drop.not-for-lighthouse``, ``refused.<reason>``, ``endpoint.dropped``, ``expired``,
``replaced-certificate``, ``punch.sent``, ``relay.granted``.
"""

from __future__ import annotations

import bisect
import ipaddress
import os
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Any, Protocol

from flatnet.proto import control
from flatnet.proto.control import (
    MAX_ENDPOINTS,
    MAX_RELAYS,
    CatalogueCursor,
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
    encode_control_message,
)
from flatnet.proto.relay import SESSION_ID_SIZE, mint_relay_token
from lighthouse.ratelimit import TokenBucket


class NodeCertificate(Protocol):
    """What the core needs of a verified certificate (``flatnet.pki.cert.Certificate`` has it)."""

    name: str
    ip: IPv4Interface
    subnets: Sequence[IPv4Network]

    def fingerprint(self) -> Any: ...

    def allows_source(self, ip: IPv4Address) -> bool: ...  # its own IP or inside its subnets


@dataclass(frozen=True)
class LighthouseSettings:
    node_ttl: float = 120.0  # a record lives this long after its last Register
    answer_ttl: int = 60  # how long a node may cache a QueryReply
    max_nodes: int = 20_000
    max_strangers: int = 4_096  # rate-limit buckets for senders that have not registered
    rate: float = 20.0  # control messages per second per node, sustained
    burst: float = 40.0
    catalogue_page: int = control.MAX_CATALOGUE_ENTRIES


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A control payload for the I/O layer to send through the tunnel to one node."""

    peer_ip: IPv4Address  # the node's Flatnet IP (its certificate's)
    fingerprint: Any  # its certificate's fingerprint: send only if the tunnel's peer still has it
    payload: bytes


class NodeRecord(TokenBucket):
    """One registered node. Inherits the node's rate-limit bucket (``tokens``, ``stamp``)."""

    __slots__ = ("ip", "fingerprint", "name", "subnets", "endpoints", "expires", "services")

    def __init__(self, ip: int, fingerprint: Any, name: str, burst: float, now: float) -> None:
        super().__init__(burst, now)
        self.ip = ip
        self.fingerprint = fingerprint
        self.name = name
        self.subnets: tuple[int, ...] = ()  # subnet keys, see _subnet_key
        self.endpoints: tuple[bytes, ...] = ()  # packed; [0] is the observed one
        self.expires = 0.0
        self.services: tuple[Service, ...] = ()


def _subnet_key(network_int: int, prefixlen: int) -> int:
    return (network_int << 6) | prefixlen


def _usable_endpoint(host: str) -> bool:
    addr = ipaddress.ip_address(host)
    return not (addr.is_unspecified or addr.is_multicast or addr.is_loopback)


def _normalise_addr(addr: Any) -> Endpoint:
    """asyncio addresses may be (host, port, flowinfo, scope) or an IPv4-mapped IPv6 host."""
    host, port = addr[0], addr[1]
    if ":" not in host:
        return host, port
    ip = ipaddress.ip_address(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        host = str(ip.ipv4_mapped)
    return host, port


class LighthouseCore:
    """Registrations, queries, punch coordination, relay grants and the service catalogue."""

    def __init__(
        self,
        settings: LighthouseSettings | None = None,
        relays: Sequence[Relay] = (),
        relay_secret: bytes | None = None,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.settings = settings or LighthouseSettings()
        if len(relays) > MAX_RELAYS:
            raise ValueError(f"at most {MAX_RELAYS} relays")
        if relays and not relay_secret:
            raise ValueError("relays need a relay_secret shared with them")
        self.relays = tuple(relays)
        self._relay_secret = relay_secret
        self._random_bytes = random_bytes
        self.counters: Counter[str] = Counter()
        # Records in refresh order (= expiry order, as every record lives node_ttl).
        self._nodes: OrderedDict[int, NodeRecord] = OrderedDict()
        self._subnet_owner: dict[int, int] = {}  # subnet key -> node ip
        self._prefix_counts: Counter[int] = Counter()
        self._prefixes_longest_first: list[int] = []
        self._service_hosts: list[int] = []  # sorted node ips that have services
        self._strangers: OrderedDict[Any, TokenBucket] = OrderedDict()

    # --- inspection (status, tests, bench) ---

    def __len__(self) -> int:
        return len(self._nodes)

    def node(self, ip: IPv4Address) -> NodeRecord | None:
        return self._nodes.get(int(ip))

    def endpoints_of(self, ip: IPv4Address) -> tuple[Endpoint, ...]:
        record = self._nodes.get(int(ip))
        return () if record is None else tuple(control.unpack_endpoint(e) for e in record.endpoints)

    def next_deadline(self) -> float | None:
        """When :meth:`tick` next has work: the oldest record's expiry."""
        for record in self._nodes.values():
            return record.expires
        return None

    # --- input ---

    def handle_control(
        self, payload: bytes, sender_cert: NodeCertificate, observed_addr: Any, now: float
    ) -> list[Outgoing]:
        """Handle one authenticated control payload; return what to send (possibly nothing)."""
        sender = sender_cert.ip.ip  # (a property that builds a new IPv4Address: read it once)
        fingerprint = sender_cert.fingerprint()
        record = self._nodes.get(int(sender))
        if record is not None and record.fingerprint != fingerprint:
            record = None  # another certificate for that IP: it must register to take over
        bucket = record if record is not None else self._stranger_bucket(fingerprint, now)
        s = self.settings
        if not bucket.take(now, s.rate, s.burst):
            self.counters["drop.rate-limited"] += 1
            return []
        try:
            msg = control.parse_control_message(payload)
        except ControlMessageError as exc:
            self.counters[f"drop.malformed.{exc.reason}"] += 1
            return []
        try:
            observed = _normalise_addr(observed_addr)
            observed_packed = control.pack_endpoint(observed)
        except (ValueError, TypeError, IndexError):
            raise ValueError(f"observed_addr is not an address: {observed_addr!r}") from None
        if record is not None and record.endpoints and record.endpoints[0] != observed_packed:
            # Roaming: the node's underlay address changed; answer queries with the new one at once.
            rest = tuple(e for e in record.endpoints[1:] if e != observed_packed)
            record.endpoints = (observed_packed, *rest)
        handler = self._HANDLERS.get(type(msg))
        if handler is None:
            self.counters["drop.not-for-lighthouse"] += 1
            return []
        self.counters[f"rx.{type(msg).__name__}"] += 1
        return handler(self, msg, sender_cert, sender, fingerprint, record, observed, observed_packed, now)

    def tick(self, now: float) -> None:
        """Expire records whose soft state ran out."""
        nodes = self._nodes
        while nodes:
            ip, record = next(iter(nodes.items()))
            if record.expires > now:
                break
            self._remove(record)
            self.counters["expired"] += 1

    # --- handlers ---

    def _refuse(self, sender_ip: int, fingerprint: Any, request_id: int, reason: str) -> list[Outgoing]:
        self.counters[f"refused.{reason}"] += 1
        payload = encode_control_message(Refused(request_id, reason))
        return [Outgoing(IPv4Address(sender_ip), fingerprint, payload)]

    def _on_register(self, msg: Register, cert, sender, fingerprint, record, observed, observed_packed, now):
        sender_ip = int(sender)
        if msg.ip != sender or not all(self._cert_allows_subnet(cert, n) for n in msg.subnets):
            return self._refuse(sender_ip, fingerprint, 0, "claim-outside-certificate")
        new = record is None
        if new:
            old = self._nodes.get(sender_ip)
            if old is not None:  # same IP, another certificate (re-issued): the newcomer takes over
                self._remove(old)
                self.counters["replaced-certificate"] += 1
            elif len(self._nodes) >= self.settings.max_nodes:
                return self._refuse(sender_ip, fingerprint, 0, "full")
            bucket = self._strangers.pop(fingerprint, None)
            record = NodeRecord(sender_ip, fingerprint, cert.name, self.settings.burst, now)
            if bucket is not None:  # carry the bucket over: registering must not reset the limit
                record.tokens, record.stamp = bucket.tokens, bucket.stamp
            self._nodes[sender_ip] = record
        else:
            self._nodes.move_to_end(sender_ip)
        endpoints = [observed_packed]
        for endpoint in msg.endpoints:
            if len(endpoints) >= MAX_ENDPOINTS:
                break
            packed = control.pack_endpoint(endpoint)
            if packed in endpoints:
                continue
            if not _usable_endpoint(endpoint[0]):
                self.counters["endpoint.dropped"] += 1
                continue
            endpoints.append(packed)
        record.endpoints = tuple(endpoints)
        self._set_subnets(
            record, tuple(_subnet_key(int(n.network_address), n.prefixlen) for n in msg.subnets)
        )
        record.expires = now + self.settings.node_ttl
        ack = RegisterAck(observed, int(self.settings.node_ttl), new)
        return [Outgoing(sender, fingerprint, encode_control_message(ack))]

    def _on_query(self, msg: Query, cert, sender, fingerprint, record, observed, observed_packed, now):
        owner = self._owner_of(int(msg.address))
        s = self.settings
        if owner is None:
            reply = QueryReply(msg.request_id, msg.address, False, ttl=0)
            return [Outgoing(sender, fingerprint, encode_control_message(reply))]
        unpack = control.unpack_endpoint
        reply = QueryReply(
            msg.request_id,
            msg.address,
            True,
            IPv4Address(owner.ip),
            tuple(unpack(e) for e in owner.endpoints),
            self.relays,
            min(s.answer_ttl, max(0, int(owner.expires - now))),
        )
        out = [Outgoing(sender, fingerprint, encode_control_message(reply))]
        if record is not None and owner is not record:
            # Tell the owner to punch back at the querier now, while the querier punches at it.
            notify = PunchNotify(sender, tuple(unpack(e) for e in record.endpoints))
            out.append(Outgoing(IPv4Address(owner.ip), owner.fingerprint, encode_control_message(notify)))
            self.counters["punch.sent"] += 1
        return out

    def _on_service_publish(
        self, msg: ServicePublish, cert, sender, fingerprint, record, observed, observed_packed, now
    ):
        sender_ip = int(sender)
        if record is None:
            return self._refuse(sender_ip, fingerprint, 0, "not-registered")
        for svc in msg.services:
            if not cert.allows_source(svc.ip):
                return self._refuse(sender_ip, fingerprint, 0, "claim-outside-certificate")
        had = bool(record.services)
        record.services = msg.services
        if had and not msg.services:
            self._service_hosts.pop(bisect.bisect_left(self._service_hosts, sender_ip))
        elif msg.services and not had:
            bisect.insort(self._service_hosts, sender_ip)
        return []

    def _on_catalogue_query(
        self, msg: CatalogueQuery, cert, sender, fingerprint, record, observed, observed_packed, now
    ):
        hosts = self._service_hosts
        nodes = self._nodes
        i, skip = 0, 0
        if msg.cursor is not None:
            cursor_ip = int(msg.cursor.host_ip)
            i = bisect.bisect_left(hosts, cursor_ip)
            if i < len(hosts) and hosts[i] == cursor_ip:
                skip = msg.cursor.index
        entries: list[CatalogueEntry] = []
        page = self.settings.catalogue_page
        while i < len(hosts) and len(entries) < page:
            host = nodes[hosts[i]]
            taken = host.services[skip : skip + page - len(entries)]
            host_ip = IPv4Address(host.ip)
            entries.extend(CatalogueEntry(host.name, host_ip, svc) for svc in taken)
            skip += len(taken)
            if skip >= len(host.services):
                i, skip = i + 1, 0
        next_cursor = CatalogueCursor(IPv4Address(hosts[i]), skip) if i < len(hosts) else None
        reply = CatalogueReply(msg.request_id, tuple(entries), next_cursor)
        return [Outgoing(sender, fingerprint, encode_control_message(reply))]

    def _on_relay_request(
        self, msg: RelayRequest, cert, sender, fingerprint, record, observed, observed_packed, now
    ):
        sender_ip = int(sender)
        if record is None:
            return self._refuse(sender_ip, fingerprint, msg.request_id, "not-registered")
        if not self.relays:
            return self._refuse(sender_ip, fingerprint, msg.request_id, "no-relay")
        peer = self._nodes.get(int(msg.peer_ip))
        if peer is None or peer is record:
            return self._refuse(sender_ip, fingerprint, msg.request_id, "unknown-peer")
        session_id = self._random_bytes(SESSION_ID_SIZE)
        secret = self._relay_secret
        assert secret is not None
        to_asker = RelayOffer(
            msg.request_id, msg.peer_ip, session_id, 0, mint_relay_token(secret, session_id, 0), self.relays
        )
        to_peer = RelayOffer(0, sender, session_id, 1, mint_relay_token(secret, session_id, 1), self.relays)
        self.counters["relay.granted"] += 1
        return [
            Outgoing(sender, fingerprint, encode_control_message(to_asker)),
            Outgoing(msg.peer_ip, peer.fingerprint, encode_control_message(to_peer)),
        ]

    _HANDLERS: dict[type, Callable[..., list[Outgoing]]] = {
        Register: _on_register,
        Query: _on_query,
        ServicePublish: _on_service_publish,
        CatalogueQuery: _on_catalogue_query,
        RelayRequest: _on_relay_request,
    }

    # --- state helpers ---

    @staticmethod
    def _cert_allows_subnet(cert: NodeCertificate, net: IPv4Network) -> bool:
        return any(net.subnet_of(allowed) for allowed in cert.subnets)

    def _stranger_bucket(self, fingerprint: Any, now: float) -> TokenBucket:
        strangers = self._strangers
        bucket = strangers.get(fingerprint)
        if bucket is None:
            if len(strangers) >= self.settings.max_strangers:
                strangers.popitem(last=False)
            bucket = strangers[fingerprint] = TokenBucket(self.settings.burst, now)
        return bucket

    def _owner_of(self, address: int) -> NodeRecord | None:
        record = self._nodes.get(address)
        if record is not None:
            return record
        for prefixlen in self._prefixes_longest_first:
            shift = 32 - prefixlen
            owner_ip = self._subnet_owner.get(_subnet_key((address >> shift) << shift, prefixlen))
            if owner_ip is not None:
                return self._nodes.get(owner_ip)
        return None

    def _set_subnets(self, record: NodeRecord, keys: tuple[int, ...]) -> None:
        self._drop_subnets(record)
        for key in keys:
            previous = self._subnet_owner.get(key)
            if previous is not None and previous != record.ip:
                # Two certificates may both allow a subnet (a move between hosts): the latest
                # registration wins; the other node keeps the key in its record but no longer owns it.
                pass
            else:
                self._prefix_counts[key & 63] += 1
            self._subnet_owner[key] = record.ip
        record.subnets = keys
        self._refresh_prefixes()

    def _drop_subnets(self, record: NodeRecord) -> None:
        for key in record.subnets:
            if self._subnet_owner.get(key) == record.ip:
                del self._subnet_owner[key]
                self._prefix_counts[key & 63] -= 1
                if self._prefix_counts[key & 63] <= 0:
                    del self._prefix_counts[key & 63]
        self._refresh_prefixes()

    def _refresh_prefixes(self) -> None:
        self._prefixes_longest_first = sorted(self._prefix_counts, reverse=True)

    def _remove(self, record: NodeRecord) -> None:
        del self._nodes[record.ip]
        self._drop_subnets(record)
        if record.services:
            self._service_hosts.pop(bisect.bisect_left(self._service_hosts, record.ip))
