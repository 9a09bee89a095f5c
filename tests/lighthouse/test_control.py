"""flatnet.proto.control: every message round-trips, worst cases fit, bad bytes raise one error type."""

from __future__ import annotations

import ipaddress
from ipaddress import IPv4Address, IPv4Network

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flatnet.proto import control
from flatnet.proto.control import (
    MAX_CATALOGUE_ENTRIES,
    MAX_CONTROL_MESSAGE_SIZE,
    MAX_ENDPOINTS,
    MAX_NAME_LENGTH,
    MAX_RELAYS,
    MAX_SERVICES,
    MAX_SUBNETS,
    TRANSPORT_TCP,
    TRANSPORT_UDP,
    CatalogueCursor,
    CatalogueEntry,
    CatalogueQuery,
    CatalogueReply,
    ControlMessageError,
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
    parse_control_message,
)

IP = IPv4Address("10.87.1.1")
V6_ENDPOINT = ("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", 65535)
LONG = "x" * MAX_NAME_LENGTH

EXAMPLES = [
    Register(IP, (IPv4Network("10.87.1.0/24"),), (("192.168.1.10", 4242), ("fe80::1", 4242))),
    Register(IP),
    RegisterAck(("203.0.113.9", 61000), 120, True),
    Query(1, IPv4Address("10.87.2.7")),
    QueryReply(2, IPv4Address("10.87.2.7"), False),
    QueryReply(
        3,
        IPv4Address("10.87.2.7"),
        True,
        IPv4Address("10.87.2.1"),
        (("198.51.100.1", 1000),),
        (Relay(TRANSPORT_UDP, ("192.0.2.1", 4243)), Relay(TRANSPORT_TCP, ("192.0.2.1", 443))),
        60,
    ),
    PunchNotify(IP, (("198.51.100.1", 1000),)),
    ServicePublish((Service("web", IPv4Address("10.87.1.5"), 8080),)),
    ServicePublish(()),
    CatalogueQuery(4),
    CatalogueQuery(5, CatalogueCursor(IP, 3)),
    CatalogueReply(6, (CatalogueEntry("host-1", IP, Service("web", IP, 80)),), CatalogueCursor(IP, 1)),
    CatalogueReply(6, (), None),
    RelayRequest(7, IP),
    RelayOffer(8, IP, b"s" * 8, 1, b"t" * 16, (Relay(TRANSPORT_UDP, ("192.0.2.1", 4243)),)),
    Refused(0, "rate-limited"),
]


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    data = encode_control_message(msg)
    assert len(data) <= MAX_CONTROL_MESSAGE_SIZE
    assert parse_control_message(data) == msg


def test_worst_case_messages_fit_one_datagram():
    endpoints = (V6_ENDPOINT,) * MAX_ENDPOINTS
    relays = (Relay(TRANSPORT_TCP, V6_ENDPOINT),) * MAX_RELAYS
    big_ip = IPv4Address("255.255.255.255")
    worst = [
        Register(big_ip, (IPv4Network("10.87.255.0/24"),) * MAX_SUBNETS, endpoints),
        QueryReply(2**32 - 1, big_ip, True, big_ip, endpoints, relays, 2**31),
        PunchNotify(big_ip, endpoints),
        ServicePublish((Service(LONG, big_ip, 65535),) * MAX_SERVICES),
        CatalogueReply(
            2**32 - 1,
            (CatalogueEntry(LONG, big_ip, Service(LONG, big_ip, 65535)),) * MAX_CATALOGUE_ENTRIES,
            CatalogueCursor(big_ip, 65535),
        ),
        RelayOffer(2**32 - 1, big_ip, b"\xff" * 8, 1, b"\xff" * 16, relays),
    ]
    for msg in worst:
        data = encode_control_message(msg)  # raises if over MAX_CONTROL_MESSAGE_SIZE
        assert parse_control_message(data) == msg


def test_encoders_refuse_misuse():
    with pytest.raises(ValueError):
        encode_control_message(PunchNotify(IP, (("192.0.2.1", 1),) * (MAX_ENDPOINTS + 1)))
    with pytest.raises(ValueError):
        encode_control_message(ServicePublish((Service("x" * (MAX_NAME_LENGTH + 1), IP, 80),)))
    with pytest.raises(ValueError):
        encode_control_message(Refused(0, "no such reason"))
    with pytest.raises(ValueError):
        encode_control_message(PunchNotify(IP, (("192.0.2.1", 0),)))


def _raw(**fields) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "malformed"),
        (b"\xc1", "malformed"),  # never-used msgpack byte
        (msgpack.packb([1, 3]), "malformed"),  # an array, not a map
        (_raw(v=2, t=3, id=1, a=b"\x0a\x57\x01\x01"), "unsupported-version"),
        (_raw(v=True, t=3, id=1, a=b"\x0a\x57\x01\x01"), "unsupported-version"),
        (_raw(v=1, t=99), "unknown-type"),
        (_raw(v=1, t=3, id=1), "malformed"),  # missing field
        (_raw(v=1, t=3, id=True, a=b"\x0a\x57\x01\x01"), "malformed"),  # bool is not an int
        (_raw(v=1, t=3, id=1, a=b"\x0a\x57\x01"), "malformed"),  # 3-byte address
        (_raw(v=1, t=3, id=-1, a=b"\x0a\x57\x01\x01"), "malformed"),
        (
            _raw(v=1, t=1, ip=b"\x0a\x57\x01\x01", sn=[b"\x0a\x57\x01\x01\x18"], ep=[]),
            "malformed",
        ),  # host bits
        (
            _raw(v=1, t=1, ip=b"\x0a\x57\x01\x01", sn=[], ep=[b"\xc0\x00\x02\x01\x00\x00"]),
            "malformed",
        ),  # port 0
        (_raw(v=1, t=11, id=0, why="bored"), "malformed"),
        (b"\x80" + b"\x00" * MAX_CONTROL_MESSAGE_SIZE, "too-large"),
    ],
)
def test_bad_messages_raise_one_error_type(data, reason):
    with pytest.raises(ControlMessageError) as info:
        parse_control_message(data)
    assert info.value.reason == reason


def test_unknown_keys_are_ignored_for_forward_compatibility():
    data = _raw(v=1, t=3, id=9, a=b"\x0a\x57\x01\x01", future="field")
    assert parse_control_message(data) == Query(9, IPv4Address("10.87.1.1"))


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_raise_only_control_message_error(data):
    try:
        parse_control_message(data)
    except ControlMessageError as exc:
        assert exc.reason in control.REASONS


# Structured fuzz: msgpack maps that pass the version and type checks, with random field values,
# reach the per-type parsers (random bytes almost never do).
_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=70)
    | st.binary(max_size=20),
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=4), children, max_size=4)
    ),
    max_leaves=12,
)
_keys = st.sampled_from(
    ["ip", "sn", "ep", "ob", "ttl", "new", "id", "a", "f", "r", "s", "c", "e", "sid", "sd", "tk", "why"]
)


@settings(max_examples=400, deadline=None)
@given(st.integers(0, 12), st.dictionaries(_keys, _values, max_size=8))
def test_structured_garbage_raises_only_control_message_error(kind, fields):
    data = msgpack.packb({"v": 1, "t": kind, **fields}, use_bin_type=True)
    try:
        parse_control_message(data)
    except ControlMessageError as exc:
        assert exc.reason in control.REASONS


def _reference_pack(host: str) -> bytes | None:
    try:
        return ipaddress.ip_address(host).packed
    except ValueError:
        return None


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(
        st.ip_addresses(v=4).map(str),
        st.lists(st.text("0123456789+-_ x", max_size=4), min_size=4, max_size=4).map(".".join),
        st.text(max_size=20),
    )
)
def test_endpoint_packing_agrees_with_ipaddress(host):
    expected = _reference_pack(host)
    try:
        packed = control.pack_endpoint((host, 4242))
    except ValueError:
        assert expected is None
    else:
        assert packed == expected + b"\x10\x92"
        assert control.unpack_endpoint(packed) == (str(ipaddress.ip_address(host)), 4242)
