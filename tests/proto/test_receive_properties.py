"""Property tests: every parser takes arbitrary bytes without raising anything but MalformedMessage,
and the engine's receive path takes arbitrary bytes (and mutations of real datagrams) without
raising and without changing state."""

from __future__ import annotations

import functools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flatnet.proto.cookie_reply import parse_cookie_reply
from flatnet.proto.errors import MalformedMessage
from flatnet.proto.handshake_messages import (
    parse_handshake_initiation,
    parse_handshake_response,
    parse_initiation_payload,
)
from flatnet.proto.header import MessageType, parse_prefix
from flatnet.proto.ratelimit import HandshakeRateLimiter
from flatnet.proto.replay import ReplayWindow
from flatnet.proto.transport_header import parse_transport_header
from tests.proto.harness import ipv4_packet, pair, snapshot

A_IP, B_IP = "10.87.1.1", "10.87.2.1"
PARSERS = [
    parse_prefix,
    parse_transport_header,
    parse_handshake_initiation,
    parse_handshake_response,
    parse_cookie_reply,
    parse_initiation_payload,
]

# Bytes that look like our messages often enough to get past the first checks.
typed_bytes = st.builds(
    lambda t, v, body: bytes([t, v, 0, 0]) + body,
    st.sampled_from([int(m) for m in MessageType] + [0, 9, 255]),
    st.sampled_from([1, 1, 1, 0, 2]),
    st.binary(max_size=600),
)
any_bytes = st.one_of(st.binary(max_size=600), typed_bytes)


@pytest.mark.parametrize("parser", PARSERS, ids=[p.__name__ for p in PARSERS])
@given(data=any_bytes)
@settings(max_examples=300, deadline=None)
def test_parsers_raise_only_malformed(parser, data):
    try:
        parser(data)
    except MalformedMessage as e:
        assert e.reason


@functools.cache
def _established():
    """One established pair, and real datagrams of every kind captured on the way."""
    wire, a, b = pair()
    a.engine.send_packet(ipv4_packet(A_IP, B_IP, b"x" * 64), wire.now)
    wire.run()
    for n in range(3):
        b.engine.send_packet(ipv4_packet(B_IP, A_IP, b"y%d" % n), wire.now)
    wire.run()
    captured = [d for _, _, _, d in wire.log]
    kinds = {d[0] for d in captured}
    assert {MessageType.HANDSHAKE_INITIATION, MessageType.HANDSHAKE_RESPONSE, MessageType.DATA} <= kinds
    return wire, a, b, captured


def _mutations():
    captured = _established()[3]
    return st.builds(
        lambda i, edits, cut: _mutate(captured[i % len(captured)], edits, cut),
        st.integers(min_value=0, max_value=len(captured) - 1),
        st.lists(st.tuples(st.integers(min_value=0, max_value=2000), st.integers(min_value=1, max_value=255)), min_size=1, max_size=4),
        st.one_of(st.none(), st.integers(min_value=0, max_value=2000)),
    )


def _mutate(data: bytes, edits, cut) -> bytes:
    out = bytearray(data)
    for position, xor in edits:
        out[position % len(out)] ^= xor
    if cut is not None:
        out = out[: cut % (len(out) + 1)]
    return bytes(out)


@given(data=st.one_of(any_bytes, st.deferred(_mutations)))
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_arbitrary_datagrams_never_raise_and_never_change_state(data):
    wire, a, b, _ = _established()
    for node, source in ((b, a.addr), (a, b.addr), (b, ("203.0.113.1", 9))):
        # Alternate between a calm node and one under load (which answers with cookie replies).
        node.engine._limiter = HandshakeRateLimiter(burst=1000 if data[-1:] < b"\x80" else 0, rate=0)
        before = snapshot(node.engine)
        drops = sum(node.engine.drops.values())
        node.engine.receive_datagram(data, source, wire.now)  # strict engines: internal errors raise
        after = snapshot(node.engine)
        # The only output bad input may cause is a cookie reply (no state, no DH).
        sent = after[3][len(before[3]):]
        assert all(d[0] == MessageType.COOKIE_REPLY for d, _ in sent)
        assert after[:3] + after[4:] == before[:3] + before[4:]
        node.engine.datagrams_to_send()
        assert sum(node.engine.drops.values()) == drops + 1 or data[:1] == bytes([MessageType.PUNCH])
        assert node.engine.open_data(data, source, wire.now) is None


@given(st.lists(st.integers(min_value=0, max_value=10_000), max_size=300))
@settings(max_examples=200, deadline=None)
def test_replay_window_accepts_each_counter_once_within_the_window(counters):
    window = ReplayWindow(size=2048)
    accepted = set()
    for c in counters:
        if window.check(c):
            window.update(c)
            assert c not in accepted
            accepted.add(c)
        else:
            assert c in accepted or c <= window.highest - 2048
    assert window.highest == (max(counters) if counters else -1)
