"""Wire format of lighthouse CONTROL messages (the payload of the tunnel's CONTROL message type).

A control message travels inside an established Noise tunnel, so by the time it is parsed the
sender is authenticated by its certificate; this module only turns bytes into typed messages and
back. It is sans-I/O and holds no state.

Each message is one msgpack map with short string keys::

    { "v": 1,            # format version; anything else is refused ("unsupported-version")
      "t": <type>,       # message type, see the table below
      ...fields... }     # per type; unknown keys are ignored so a later minor revision may add
                         # optional fields; a missing or mistyped known key is an error

    type  name             direction      fields
    ----  ---------------  -------------  --------------------------------------------------------
     1    Register         node -> lh     ip, sn (subnets), ep (endpoints)
     2    RegisterAck      lh -> node     ob (observed endpoint), ttl, new (lh had no record)
     3    Query            node -> lh     id, a (address to resolve: a Flatnet IP or in a subnet)
     4    QueryReply       lh -> node     id, a, f (found), ip (host), ep, r (relays), ttl
     5    PunchNotify      lh -> node     ip (the peer that is about to punch), ep
     6    ServicePublish   node -> lh     s (services: [name, ip, port])
     7    CatalogueQuery   node -> lh     id, c (cursor: where to continue, or nil from the start)
     8    CatalogueReply   lh -> node     id, e (entries), c (next cursor, nil at the end)
     9    RelayRequest     node -> lh     id, ip (peer to reach through a relay)
    10    RelayOffer       lh -> node     id, ip (peer), sid, sd (side), tk (token), r (relays)
    11    Refused          lh -> node     id (0 when not a reply to a request), why (reason)

Encodings of the fields::

    IPv4 address   bin 4                       (a Flatnet address; the overlay is IPv4)
    subnet         bin 5   = address(4) | prefix length(1)
    endpoint       bin 6   = IPv4(4) | port(2, big endian)       (an underlay UDP address)
                   bin 18  = IPv6(16) | port(2, big endian)
    relay          [transport, endpoint]    transport 1 = UDP, 2 = TCP (frames: flatnet/proto/relay.py)
    service        [name str, ip bin4, port int]
    catalogue entry [host name str, host ip bin4, service name str, service ip bin4, port int]
    catalogue cursor [host ip bin4, index int]  (the index-th service of that host, in host IP order)

The whole message is at most :data:`MAX_CONTROL_MESSAGE_SIZE` bytes so it fits one tunnel
datagram; list lengths are capped below so every encoder stays under that size (a test checks
the worst case of each message).

Error contract: :func:`parse_control_message` raises only :class:`ControlMessageError` (its
``reason`` is a stable string from :data:`REASONS`, used as a metric label); callers on a data
path catch it, count it and drop the message. Encoders raise ``ValueError`` for misuse (a list
longer than its cap), never for anything a peer sent.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import msgpack

from flatnet.proto import relay as relay_wire

CONTROL_VERSION = 1
MAX_CONTROL_MESSAGE_SIZE = 1200

# Caps on list lengths (shared by the lighthouse core, which stores no more than this either).
MAX_ENDPOINTS = 8  # endpoints per node (claimed LAN addresses + the one the lighthouse observed)
MAX_SUBNETS = 8  # container subnets per node
MAX_RELAYS = 4  # relays offered in one reply
MAX_SERVICES = 14  # services one node publishes (14 with 63-byte names fill one message)
MAX_CATALOGUE_ENTRIES = 6  # services per CatalogueReply page
MAX_NAME_LENGTH = 63  # host and service names (UTF-8 bytes), as a DNS label
MAX_REQUEST_ID = 2**32 - 1
RELAY_SESSION_ID_SIZE = relay_wire.SESSION_ID_SIZE
RELAY_TOKEN_SIZE = relay_wire.TOKEN_SIZE

TRANSPORT_UDP = 1
TRANSPORT_TCP = 2

REASONS = frozenset(
    {
        "too-large",  # longer than MAX_CONTROL_MESSAGE_SIZE
        "malformed",  # not one msgpack map, or a field of the wrong type or size
        "unsupported-version",  # "v" is not CONTROL_VERSION
        "unknown-type",  # "t" names no message type
    }
)

# Reasons carried in a Refused message (lighthouse -> node); stable strings.
REFUSAL_REASONS = frozenset(
    {
        "rate-limited",  # the node sent more than its token bucket allows
        "claim-outside-certificate",  # an IP, subnet or service address the certificate does not give
        "not-registered",  # a request that needs the sender's registration came first
        "full",  # the lighthouse is at its node cap
        "unknown-peer",  # relay request for a peer the lighthouse does not know
        "no-relay",  # relay request but the lighthouse offers no relay
    }
)

Endpoint = tuple[str, int]  # (IP address text, UDP port), as asyncio gives and takes addresses


class ControlMessageError(Exception):
    """A control message could not be parsed; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        assert reason in REASONS, reason
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


# --- messages ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Register:
    ip: IPv4Address
    subnets: tuple[IPv4Network, ...] = ()
    endpoints: tuple[Endpoint, ...] = ()


@dataclass(frozen=True, slots=True)
class RegisterAck:
    observed: Endpoint
    ttl: int
    new: bool  # the lighthouse had no record of this node: publish services again


@dataclass(frozen=True, slots=True)
class Query:
    request_id: int
    address: IPv4Address


@dataclass(frozen=True, slots=True)
class Relay:
    transport: int  # TRANSPORT_UDP or TRANSPORT_TCP
    endpoint: Endpoint


@dataclass(frozen=True, slots=True)
class QueryReply:
    request_id: int
    address: IPv4Address
    found: bool
    host_ip: IPv4Address | None = None  # the host that owns ``address``
    endpoints: tuple[Endpoint, ...] = ()  # observed endpoint first
    relays: tuple[Relay, ...] = ()
    ttl: int = 0


@dataclass(frozen=True, slots=True)
class PunchNotify:
    peer_ip: IPv4Address
    endpoints: tuple[Endpoint, ...]


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    ip: IPv4Address
    port: int


@dataclass(frozen=True, slots=True)
class ServicePublish:
    services: tuple[Service, ...]


@dataclass(frozen=True, slots=True)
class CatalogueCursor:
    host_ip: IPv4Address
    index: int


@dataclass(frozen=True, slots=True)
class CatalogueQuery:
    request_id: int
    cursor: CatalogueCursor | None = None


@dataclass(frozen=True, slots=True)
class CatalogueEntry:
    host_name: str
    host_ip: IPv4Address
    service: Service


@dataclass(frozen=True, slots=True)
class CatalogueReply:
    request_id: int
    entries: tuple[CatalogueEntry, ...]
    next_cursor: CatalogueCursor | None  # None: this was the last page


@dataclass(frozen=True, slots=True)
class RelayRequest:
    request_id: int
    peer_ip: IPv4Address


@dataclass(frozen=True, slots=True)
class RelayOffer:
    request_id: int  # 0 on the offer sent to the peer that did not ask
    peer_ip: IPv4Address
    session_id: bytes  # RELAY_SESSION_ID_SIZE bytes
    side: int  # 0 (the asker) or 1 (the peer)
    token: bytes  # RELAY_TOKEN_SIZE bytes, proves to the relay that the lighthouse granted it
    relays: tuple[Relay, ...]


@dataclass(frozen=True, slots=True)
class Refused:
    request_id: int
    reason: str  # one of REFUSAL_REASONS


ControlMessage = (
    Register
    | RegisterAck
    | Query
    | QueryReply
    | PunchNotify
    | ServicePublish
    | CatalogueQuery
    | CatalogueReply
    | RelayRequest
    | RelayOffer
    | Refused
)

TYPE_REGISTER = 1
TYPE_REGISTER_ACK = 2
TYPE_QUERY = 3
TYPE_QUERY_REPLY = 4
TYPE_PUNCH_NOTIFY = 5
TYPE_SERVICE_PUBLISH = 6
TYPE_CATALOGUE_QUERY = 7
TYPE_CATALOGUE_REPLY = 8
TYPE_RELAY_REQUEST = 9
TYPE_RELAY_OFFER = 10
TYPE_REFUSED = 11


# --- field codecs -----------------------------------------------------------------------------


def pack_endpoint(endpoint: Endpoint) -> bytes:
    """(host, port) -> 6 or 18 bytes. Raises ValueError for a bad address or port."""
    host, port = endpoint
    if type(port) is not int or not 0 < port < 65536:
        raise ValueError(f"bad port {port!r}")
    return _pack_host(host) + port.to_bytes(2, "big")


def _pack_host(host: str) -> bytes:
    # Fast path for canonical dotted-quad text (what unpack_endpoint and asyncio produce): a
    # lighthouse packs several endpoints per query and ipaddress' parser costs ~8 us each.
    parts = host.split(".")
    if len(parts) == 4:
        try:
            octets = bytes(map(int, parts))  # ValueError beyond 0..255 or for non-numbers
        except ValueError:
            octets = b""
        if octets and f"{octets[0]}.{octets[1]}.{octets[2]}.{octets[3]}" == host:
            return octets  # exactly canonical: no signs, spaces, underscores or leading zeros
    return ipaddress.ip_address(host).packed


def unpack_endpoint(data: bytes) -> Endpoint:
    if len(data) == 6:
        host = f"{data[0]}.{data[1]}.{data[2]}.{data[3]}"  # == str(IPv4Address(data[:4])), faster
    elif len(data) == 18:
        host = str(ipaddress.IPv6Address(data[:16]))
    else:
        raise ControlMessageError("malformed", "endpoint is not 6 or 18 bytes")
    port = int.from_bytes(data[-2:], "big")
    if port == 0:
        raise ControlMessageError("malformed", "endpoint port 0")
    return host, port


def _pack_relay(r: Relay) -> list[Any]:
    return [r.transport, pack_endpoint(r.endpoint)]


def _pack_subnet(net: IPv4Network) -> bytes:
    return net.network_address.packed + bytes([net.prefixlen])


def _pack_service(svc: Service) -> list[Any]:
    _check_name(svc.name)
    return [svc.name, svc.ip.packed, svc.port]


def _check_name(name: str) -> None:
    if not name or len(name.encode()) > MAX_NAME_LENGTH:
        raise ValueError(f"name must be 1..{MAX_NAME_LENGTH} UTF-8 bytes: {name!r}")


def _capped(items: tuple, cap: int, what: str) -> tuple:
    if len(items) > cap:
        raise ValueError(f"{len(items)} {what}, at most {cap}")
    return items


def _cursor_or_nil(cursor: CatalogueCursor | None) -> list[Any] | None:
    return None if cursor is None else [cursor.host_ip.packed, cursor.index]


# --- encode -----------------------------------------------------------------------------------


def encode_control_message(msg: ControlMessage) -> bytes:
    """Serialise *msg*; the result is at most MAX_CONTROL_MESSAGE_SIZE bytes."""
    m: dict[str, Any] = {"v": CONTROL_VERSION}
    if isinstance(msg, Register):
        m["t"] = TYPE_REGISTER
        m["ip"] = msg.ip.packed
        m["sn"] = [_pack_subnet(n) for n in _capped(msg.subnets, MAX_SUBNETS, "subnets")]
        m["ep"] = [pack_endpoint(e) for e in _capped(msg.endpoints, MAX_ENDPOINTS, "endpoints")]
    elif isinstance(msg, RegisterAck):
        m["t"] = TYPE_REGISTER_ACK
        m["ob"] = pack_endpoint(msg.observed)
        m["ttl"] = msg.ttl
        m["new"] = msg.new
    elif isinstance(msg, Query):
        m["t"] = TYPE_QUERY
        m["id"] = msg.request_id
        m["a"] = msg.address.packed
    elif isinstance(msg, QueryReply):
        m["t"] = TYPE_QUERY_REPLY
        m["id"] = msg.request_id
        m["a"] = msg.address.packed
        m["f"] = msg.found
        m["ip"] = None if msg.host_ip is None else msg.host_ip.packed
        m["ep"] = [pack_endpoint(e) for e in _capped(msg.endpoints, MAX_ENDPOINTS, "endpoints")]
        m["r"] = [_pack_relay(r) for r in _capped(msg.relays, MAX_RELAYS, "relays")]
        m["ttl"] = msg.ttl
    elif isinstance(msg, PunchNotify):
        m["t"] = TYPE_PUNCH_NOTIFY
        m["ip"] = msg.peer_ip.packed
        m["ep"] = [pack_endpoint(e) for e in _capped(msg.endpoints, MAX_ENDPOINTS, "endpoints")]
    elif isinstance(msg, ServicePublish):
        m["t"] = TYPE_SERVICE_PUBLISH
        m["s"] = [_pack_service(s) for s in _capped(msg.services, MAX_SERVICES, "services")]
    elif isinstance(msg, CatalogueQuery):
        m["t"] = TYPE_CATALOGUE_QUERY
        m["id"] = msg.request_id
        m["c"] = _cursor_or_nil(msg.cursor)
    elif isinstance(msg, CatalogueReply):
        m["t"] = TYPE_CATALOGUE_REPLY
        m["id"] = msg.request_id
        entries = _capped(msg.entries, MAX_CATALOGUE_ENTRIES, "catalogue entries")
        for e in entries:
            _check_name(e.host_name)
        m["e"] = [[e.host_name, e.host_ip.packed, *_pack_service(e.service)] for e in entries]
        m["c"] = _cursor_or_nil(msg.next_cursor)
    elif isinstance(msg, RelayRequest):
        m["t"] = TYPE_RELAY_REQUEST
        m["id"] = msg.request_id
        m["ip"] = msg.peer_ip.packed
    elif isinstance(msg, RelayOffer):
        m["t"] = TYPE_RELAY_OFFER
        m["id"] = msg.request_id
        m["ip"] = msg.peer_ip.packed
        if len(msg.session_id) != RELAY_SESSION_ID_SIZE or len(msg.token) != RELAY_TOKEN_SIZE:
            raise ValueError("bad relay session id or token size")
        m["sid"] = msg.session_id
        m["sd"] = msg.side
        m["tk"] = msg.token
        m["r"] = [_pack_relay(r) for r in _capped(msg.relays, MAX_RELAYS, "relays")]
    elif isinstance(msg, Refused):
        if msg.reason not in REFUSAL_REASONS:
            raise ValueError(f"unknown refusal reason {msg.reason!r}")
        m["t"] = TYPE_REFUSED
        m["id"] = msg.request_id
        m["why"] = msg.reason
    else:
        raise TypeError(f"not a control message: {msg!r}")
    data = msgpack.packb(m, use_bin_type=True)
    if len(data) > MAX_CONTROL_MESSAGE_SIZE:
        raise ValueError(f"encoded control message is {len(data)} bytes")
    return data


# --- parse ------------------------------------------------------------------------------------


def _field(m: dict, key: str) -> Any:
    try:
        return m[key]
    except KeyError:
        raise ControlMessageError("malformed", f"missing {key!r}") from None


def _int(m: dict, key: str, lo: int, hi: int) -> int:
    value = _field(m, key)
    if type(value) is not int or not lo <= value <= hi:  # bool is an int subclass: refused too
        raise ControlMessageError("malformed", f"{key!r} is not an integer in {lo}..{hi}")
    return value


def _bool(m: dict, key: str) -> bool:
    value = _field(m, key)
    if type(value) is not bool:
        raise ControlMessageError("malformed", f"{key!r} is not a boolean")
    return value


def _bin(value: Any, size: int, what: str) -> bytes:
    if type(value) is not bytes or len(value) != size:
        raise ControlMessageError("malformed", f"{what} is not {size} bytes")
    return value


def _ip(value: Any, what: str) -> IPv4Address:
    return IPv4Address(_bin(value, 4, what))


def _ip_field(m: dict, key: str) -> IPv4Address:
    return _ip(_field(m, key), key)


def _ip_or_none(m: dict, key: str) -> IPv4Address | None:
    value = _field(m, key)
    return None if value is None else _ip(value, key)


def _cursor_or_none(m: dict, key: str) -> CatalogueCursor | None:
    value = _field(m, key)
    if value is None:
        return None
    if type(value) is not list or len(value) != 2 or type(value[1]) is not int or not 0 <= value[1] < 2**16:
        raise ControlMessageError("malformed", "bad catalogue cursor")
    return CatalogueCursor(_ip(value[0], "cursor ip"), value[1])


def _list(m: dict, key: str, cap: int) -> list:
    value = _field(m, key)
    if type(value) is not list or len(value) > cap:
        raise ControlMessageError("malformed", f"{key!r} is not a list of at most {cap}")
    return value


def _endpoints(m: dict, key: str) -> tuple[Endpoint, ...]:
    out = []
    for item in _list(m, key, MAX_ENDPOINTS):
        if type(item) is not bytes:
            raise ControlMessageError("malformed", "endpoint is not bin")
        out.append(unpack_endpoint(item))
    return tuple(out)


def _subnet(value: Any) -> IPv4Network:
    raw = _bin(value, 5, "subnet")
    try:
        return IPv4Network((raw[:4], raw[4]))  # strict: host bits set is refused
    except ValueError:
        raise ControlMessageError("malformed", "bad subnet") from None


def _relays(m: dict, key: str) -> tuple[Relay, ...]:
    out = []
    for item in _list(m, key, MAX_RELAYS):
        if type(item) is not list or len(item) != 2 or item[0] not in (TRANSPORT_UDP, TRANSPORT_TCP):
            raise ControlMessageError("malformed", "bad relay")
        if type(item[0]) is not int or type(item[1]) is not bytes:
            raise ControlMessageError("malformed", "bad relay")
        out.append(Relay(item[0], unpack_endpoint(item[1])))
    return tuple(out)


def _name(value: Any) -> str:
    if type(value) is not str or not value or len(value.encode()) > MAX_NAME_LENGTH:
        raise ControlMessageError("malformed", "bad name")
    return value


def _port(value: Any) -> int:
    if type(value) is not int or not 0 < value < 65536:
        raise ControlMessageError("malformed", "bad port")
    return value


def _service(items: list) -> Service:
    return Service(_name(items[0]), _ip(items[1], "service ip"), _port(items[2]))


def _parse_register(m: dict) -> Register:
    subnets = tuple(_subnet(v) for v in _list(m, "sn", MAX_SUBNETS))
    return Register(_ip_field(m, "ip"), subnets, _endpoints(m, "ep"))


def _parse_register_ack(m: dict) -> RegisterAck:
    ob = _field(m, "ob")
    if type(ob) is not bytes:
        raise ControlMessageError("malformed", "'ob' is not bin")
    return RegisterAck(unpack_endpoint(ob), _int(m, "ttl", 0, 2**31), _bool(m, "new"))


def _parse_query(m: dict) -> Query:
    return Query(_int(m, "id", 0, MAX_REQUEST_ID), _ip_field(m, "a"))


def _parse_query_reply(m: dict) -> QueryReply:
    return QueryReply(
        _int(m, "id", 0, MAX_REQUEST_ID),
        _ip_field(m, "a"),
        _bool(m, "f"),
        _ip_or_none(m, "ip"),
        _endpoints(m, "ep"),
        _relays(m, "r"),
        _int(m, "ttl", 0, 2**31),
    )


def _parse_punch_notify(m: dict) -> PunchNotify:
    return PunchNotify(_ip_field(m, "ip"), _endpoints(m, "ep"))


def _parse_service_publish(m: dict) -> ServicePublish:
    services = []
    for item in _list(m, "s", MAX_SERVICES):
        if type(item) is not list or len(item) != 3:
            raise ControlMessageError("malformed", "bad service")
        services.append(_service(item))
    return ServicePublish(tuple(services))


def _parse_catalogue_query(m: dict) -> CatalogueQuery:
    return CatalogueQuery(_int(m, "id", 0, MAX_REQUEST_ID), _cursor_or_none(m, "c"))


def _parse_catalogue_reply(m: dict) -> CatalogueReply:
    entries = []
    for item in _list(m, "e", MAX_CATALOGUE_ENTRIES):
        if type(item) is not list or len(item) != 5:
            raise ControlMessageError("malformed", "bad catalogue entry")
        entries.append(CatalogueEntry(_name(item[0]), _ip(item[1], "host ip"), _service(item[2:])))
    return CatalogueReply(_int(m, "id", 0, MAX_REQUEST_ID), tuple(entries), _cursor_or_none(m, "c"))


def _parse_relay_request(m: dict) -> RelayRequest:
    return RelayRequest(_int(m, "id", 0, MAX_REQUEST_ID), _ip_field(m, "ip"))


def _parse_relay_offer(m: dict) -> RelayOffer:
    return RelayOffer(
        _int(m, "id", 0, MAX_REQUEST_ID),
        _ip_field(m, "ip"),
        _bin(_field(m, "sid"), RELAY_SESSION_ID_SIZE, "'sid'"),
        _int(m, "sd", 0, 1),
        _bin(_field(m, "tk"), RELAY_TOKEN_SIZE, "'tk'"),
        _relays(m, "r"),
    )


def _parse_refused(m: dict) -> Refused:
    why = _field(m, "why")
    if why not in REFUSAL_REASONS:  # an unknown reason from a newer lighthouse is still malformed here
        raise ControlMessageError("malformed", "unknown refusal reason")
    return Refused(_int(m, "id", 0, MAX_REQUEST_ID), why)


_PARSERS = {
    TYPE_REGISTER: _parse_register,
    TYPE_REGISTER_ACK: _parse_register_ack,
    TYPE_QUERY: _parse_query,
    TYPE_QUERY_REPLY: _parse_query_reply,
    TYPE_PUNCH_NOTIFY: _parse_punch_notify,
    TYPE_SERVICE_PUBLISH: _parse_service_publish,
    TYPE_CATALOGUE_QUERY: _parse_catalogue_query,
    TYPE_CATALOGUE_REPLY: _parse_catalogue_reply,
    TYPE_RELAY_REQUEST: _parse_relay_request,
    TYPE_RELAY_OFFER: _parse_relay_offer,
    TYPE_REFUSED: _parse_refused,
}


def parse_control_message(data: bytes) -> ControlMessage:
    """Parse one control message. Raises only :class:`ControlMessageError`."""
    if len(data) > MAX_CONTROL_MESSAGE_SIZE:
        raise ControlMessageError("too-large", f"{len(data)} bytes")
    try:
        m = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_str_len=MAX_CONTROL_MESSAGE_SIZE,
            max_bin_len=MAX_CONTROL_MESSAGE_SIZE,
            max_array_len=64,
            max_map_len=32,
            max_ext_len=0,
        )
    except Exception:  # msgpack raises ValueError, its own errors, UnicodeDecodeError, ...
        raise ControlMessageError("malformed", "not a msgpack object") from None
    if type(m) is not dict:
        raise ControlMessageError("malformed", "not a map")
    if m.get("v") != CONTROL_VERSION or type(m.get("v")) is not int:
        raise ControlMessageError("unsupported-version", repr(m.get("v"))[:20])
    kind = m.get("t")
    parser = _PARSERS.get(kind) if type(kind) is int else None
    if parser is None:
        raise ControlMessageError("unknown-type", repr(kind)[:20])
    try:
        return parser(m)
    except ControlMessageError:
        raise
    except (TypeError, ValueError, IndexError, KeyError) as exc:  # e.g. an unhashable map value
        raise ControlMessageError("malformed", type(exc).__name__) from None
