"""Relay frames (flatnet.proto.relay) and the relay's forwarding table, on a fake clock."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flatnet.proto.relay import (
    MAX_RELAY_BODY,
    MAX_RELAY_FRAME,
    RELAY_HEADER_SIZE,
    TYPE_BIND,
    TYPE_BIND_ACK,
    TYPE_DATA,
    RelayFrame,
    RelayFrameError,
    StreamFrameDecoder,
    encode_relay_frame,
    encode_stream_frame,
    mint_relay_token,
    parse_relay_frame,
)
from lighthouse.relay_table import RelayLimits, RelayTable

SECRET = b"relay-secret-0123456789abcdef"
SID = bytes(range(8))
A_UDP = ("203.0.113.10", 40001)
B_TCP = ("tcp", 17)  # the I/O layer's key for a TCP connection: any hashable


def bind(table, side, addr, now, sid=SID, secret=SECRET):
    token = mint_relay_token(secret, sid, side)
    return table.receive(encode_relay_frame(TYPE_BIND, side, sid, token), addr, now)


def data(side, body, sid=SID):
    return encode_relay_frame(TYPE_DATA, side, sid, body)


def test_frame_round_trip_and_header_size():
    frame = encode_relay_frame(TYPE_DATA, 1, SID, b"ciphertext")
    assert len(frame) == RELAY_HEADER_SIZE + 10
    assert frame[:4] == b"\x01\x03\x01\x00"
    assert parse_relay_frame(frame) == RelayFrame(TYPE_DATA, 1, SID, b"ciphertext")


@pytest.mark.parametrize(
    "raw, reason",
    [
        (b"\x01\x03\x00", "short"),
        (b"\x02\x03\x00\x00" + SID, "unsupported-version"),
        (b"\x01\x09\x00\x00" + SID, "unknown-type"),
        (b"\x01\x03\x02\x00" + SID, "bad-side"),
        (b"\x01\x01\x00\x00" + SID + b"short token", "bad-body"),
        (b"\x01\x02\x00\x00" + SID + b"x", "bad-body"),
        (b"\x01\x03\x00\x00" + SID + b"x" * (MAX_RELAY_BODY + 1), "too-large"),
    ],
)
def test_bad_frames(raw, reason):
    with pytest.raises(RelayFrameError) as info:
        parse_relay_frame(raw)
    assert info.value.reason == reason


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=1600))
def test_arbitrary_bytes_raise_only_relay_frame_error(raw):
    try:
        parse_relay_frame(raw)
    except RelayFrameError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(min_size=0, max_size=200), max_size=8), st.data())
def test_stream_decoder_reassembles_any_split(bodies, draw):
    frames = [encode_relay_frame(TYPE_DATA, 0, SID, b) for b in bodies]
    stream = b"".join(encode_stream_frame(f) for f in frames)
    cuts = sorted(draw.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    decoder, got, last = StreamFrameDecoder(), [], 0
    for cut in [*cuts, len(stream)]:
        got += decoder.feed(stream[last:cut])
        last = cut
    assert got == frames and decoder.buffered == 0


def test_stream_decoder_refuses_bad_lengths():
    with pytest.raises(RelayFrameError):
        StreamFrameDecoder().feed((RELAY_HEADER_SIZE - 1).to_bytes(2, "big"))
    with pytest.raises(RelayFrameError):
        StreamFrameDecoder().feed((MAX_RELAY_FRAME + 1).to_bytes(2, "big"))


def test_bind_then_forward_both_ways_across_udp_and_tcp():
    table = RelayTable(SECRET)
    assert bind(table, 0, A_UDP, 0.0) == [(A_UDP, encode_relay_frame(TYPE_BIND_ACK, 0, SID))]
    # B not bound yet: nothing to forward to.
    assert table.receive(data(0, b"early"), A_UDP, 0.1) == []
    assert table.counters["drop.peer-not-bound"] == 1
    bind(table, 1, B_TCP, 0.2)
    assert table.receive(data(0, b"a->b"), A_UDP, 0.3) == [(B_TCP, data(0, b"a->b"))]
    assert table.receive(data(1, b"b->a"), B_TCP, 0.4) == [(A_UDP, data(1, b"b->a"))]
    assert table.counters["forwarded"] == 2
    # Bytes are counted by the transport they arrived on; the mixed session counts on both.
    assert table.counters["forwarded.bytes.udp"] == len(data(0, b"a->b"))
    assert table.counters["forwarded.bytes.tcp"] == len(data(1, b"b->a"))
    assert table.sessions_by_transport() == {"udp": 1, "tcp": 1}

    from flatnet.observability import Metrics, observe_lighthouse
    from lighthouse.core import LighthouseCore

    metrics = Metrics()
    observe_lighthouse(metrics, LighthouseCore(), table)
    assert metrics.sample("relay_bytes_total", transport="tcp") == len(data(1, b"b->a"))
    assert metrics.sample("relay_bytes_total", transport="all") == 2 * len(data(0, b"a->b"))
    assert metrics.sample("relay_sessions", transport="udp") == 1
    assert metrics.sample("relay_sessions", transport="all") == 1


def test_bad_token_and_spoofed_sender_are_dropped():
    table = RelayTable(SECRET)
    assert bind(table, 0, A_UDP, 0.0, secret=b"another-secret-0123456789") == []
    assert table.counters["drop.bad-token"] == 1 and len(table) == 0
    # A token for side 0 does not bind side 1.
    token0 = mint_relay_token(SECRET, SID, 0)
    assert table.receive(encode_relay_frame(TYPE_BIND, 1, SID, token0), A_UDP, 0.0) == []
    bind(table, 0, A_UDP, 0.0)
    bind(table, 1, B_TCP, 0.0)
    # Someone else claiming to be side 0 cannot inject frames.
    assert table.receive(data(0, b"x"), ("192.0.2.66", 1), 0.1) == []
    assert table.counters["drop.not-bound"] == 1
    assert table.receive(data(0, b"x", sid=b"\xff" * 8), A_UDP, 0.1) == []
    assert table.counters["drop.unknown-session"] == 1


def test_rebind_follows_a_roaming_node():
    table = RelayTable(SECRET)
    bind(table, 0, A_UDP, 0.0)
    bind(table, 1, B_TCP, 0.0)
    moved = ("203.0.113.77", 40001)
    bind(table, 0, moved, 1.0)
    assert table.counters["rebind"] == 1
    assert table.receive(data(1, b"hi"), B_TCP, 1.1) == [(moved, data(1, b"hi"))]
    assert table.receive(data(0, b"old"), A_UDP, 1.2) == []


def test_sessions_are_capped_and_expire_when_idle():
    table = RelayTable(SECRET, RelayLimits(max_sessions=2, idle_timeout=60.0))
    bind(table, 0, A_UDP, 0.0, sid=b"1" * 8)
    bind(table, 0, A_UDP, 10.0, sid=b"2" * 8)
    assert bind(table, 0, A_UDP, 10.0, sid=b"3" * 8) == []
    assert table.counters["drop.full"] == 1
    assert table.next_deadline() == 60.0
    bind(table, 0, A_UDP, 50.0, sid=b"1" * 8)  # keepalive BIND
    table.tick(75.0)
    assert table.session(b"2" * 8) is None and table.session(b"1" * 8) is not None
    assert table.counters["expired"] == 1


def test_per_session_byte_rate_limit():
    table = RelayTable(SECRET, RelayLimits(bytes_per_second=10_000.0, burst_bytes=5_000.0))
    bind(table, 0, A_UDP, 0.0)
    bind(table, 1, B_TCP, 0.0)
    frame = data(0, b"x" * 988)  # 1000 bytes
    sent = sum(bool(table.receive(frame, A_UDP, 0.0)) for _ in range(10))
    assert sent == 5 and table.counters["drop.rate-limited"] == 5
    sent = sum(bool(table.receive(frame, A_UDP, 0.5)) for _ in range(10))
    assert sent == 5


def test_forget_address_unbinds_a_closed_tcp_connection():
    table = RelayTable(SECRET)
    bind(table, 0, A_UDP, 0.0)
    bind(table, 1, B_TCP, 0.0)
    table.forget_address(B_TCP)
    assert table.receive(data(0, b"x"), A_UDP, 0.1) == []
    assert table.counters["drop.peer-not-bound"] == 1


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1600))
def test_garbage_never_raises_out_of_the_relay_table(raw):
    table = RelayTable(SECRET)
    assert table.receive(raw, A_UDP, 0.0) == []  # a random BIND token never verifies
    assert len(table) == 0


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=6))
def test_stream_decoder_raises_only_relay_frame_error(chunks):
    decoder = StreamFrameDecoder()
    try:
        for chunk in chunks:
            for frame in decoder.feed(chunk):
                assert RELAY_HEADER_SIZE <= len(frame) <= MAX_RELAY_FRAME
    except RelayFrameError:
        pass
