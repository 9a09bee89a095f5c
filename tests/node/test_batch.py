"""DATA_BATCH records and fragments: round trips, and parsers that never raise (hypothesis)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flatnet.node.reassembly import Reassembly
from flatnet.proto import batch as B
from flatnet.proto.header import MessageType

from .harness import B_IP, Pair


def test_fragment_type_is_no_tunnel_message_type():
    assert B.FRAGMENT_TYPE not in {int(t) for t in MessageType}


def test_records_round_trip():
    packets = [(b"\x45" + bytes(range(40)), 0, 0), (b"\x45" * 3000, B.FLAG_NEEDS_CSUM, 1380)]
    payload = b"".join(B.encode_record(p, f, g) for p, f, g in packets)
    parsed = B.parse_batch(payload)
    assert [(bytes(r.packet), r.flags, r.gso_size) for r in parsed] == packets


@pytest.mark.parametrize(
    "payload",
    [b"", b"\x01\x00\x00", b"\x02\x00\x00\x01\x00\x00x", b"\x01\x80\x00\x01\x00\x00x", b"\x01\x00\x00\x05\x00\x00xx",
     b"\x01\x00\x00\x00\x00\x00"],
)
def test_malformed_batches_are_refused(payload):
    assert B.parse_batch(payload) is None


def test_fragments_round_trip_in_any_order():
    message = bytes(random.Random(1).randbytes(20_000))
    buffer, segment = B.encode_fragments(message, 77, 1472)
    datagrams = [buffer[i : i + segment] for i in range(0, len(buffer), segment)]
    assert all(len(d) == segment for d in datagrams[:-1]) and len(datagrams[-1]) <= segment
    random.Random(2).shuffle(datagrams)
    reassembly = Reassembly()
    results = [reassembly.add(B.parse_fragment(d), ("h", 1), 0.0) for d in datagrams]
    assert results[-1] == message and all(r is None for r in results[:-1]) and len(reassembly) == 0


def test_duplicate_and_inconsistent_fragments_are_counted():
    buffer, segment = B.encode_fragments(bytes(5000), 1, 1472)
    first = B.parse_fragment(buffer[:segment])
    reassembly = Reassembly()
    assert reassembly.add(first, "x", 0.0) is None
    assert reassembly.add(first, "x", 0.0) is None
    assert reassembly.drops["fragment_duplicate"] == 1
    other, _ = B.encode_fragments(bytes(9000), 1, 1472)
    assert reassembly.add(B.parse_fragment(other[:segment]), "x", 0.0) is None
    assert reassembly.drops["fragment_inconsistent"] == 1


def test_reassembly_is_bounded():
    reassembly = Reassembly(max_messages=4)
    for message_id in range(10):
        buffer, segment = B.encode_fragments(bytes(3000), message_id, 1472)
        reassembly.add(B.parse_fragment(buffer[:segment]), "x", 0.0)
    assert len(reassembly) == 4 and reassembly.drops["reassembly_evicted"] == 6


@given(st.binary(max_size=3000))
def test_parse_batch_never_raises(data):
    records = B.parse_batch(data)
    assert records is None or sum(B.RECORD_HEADER_LEN + len(r.packet) for r in records) == len(data)


@given(st.binary(max_size=2000))
def test_parse_fragment_never_raises(data):
    fragment = B.parse_fragment(data)
    assert fragment is None or fragment.index < fragment.count


_pair = None


def _established():
    global _pair
    if _pair is None:
        _pair = Pair()
        _pair.establish()
    return _pair


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.binary(max_size=1500),
    st.binary(max_size=1500).map(lambda b: bytes([B.FRAGMENT_TYPE]) + b),
    st.binary(max_size=600).map(lambda b: bytes([5, 1, 0, 0]) + b),
    st.binary(max_size=600),
))
def test_arbitrary_datagrams_never_raise_and_are_counted(data):
    pair = _established()
    dataplane = pair.b.dataplane
    before = sum(dataplane.status(pair.now)["drops"].values())
    written = len(pair.b.tun.written)
    dataplane.udp_datagram(data, pair.a.io.udp.addr, pair.now)
    dataplane.udp_datagram(data, pair.a.io.udp.addr, pair.now, segment_size=7)
    assert len(dataplane.take_tun_writes()) == 0 and len(pair.b.tun.written) == written
    after = dataplane.status(pair.now)["drops"]
    # Each bad datagram is counted somewhere (a stray fragment just waits in reassembly, bounded).
    assert sum(after.values()) > before or len(dataplane.reassembly) > 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.binary(min_size=1, max_size=200)), max_size=6))
def test_arbitrary_records_in_an_authentic_message_never_raise(items):
    """A peer with valid keys sending garbage records: dropped and counted, never raised."""
    pair = _established()
    session = pair.a.engine.session_for(__import__("ipaddress").ip_address(B_IP), pair.now)
    payload = b"".join(B.RECORD_HEADER.pack(1, flags & 1, len(body), flags * 700) + body for flags, body in items)
    if not payload:
        return
    datagram = bytes(session.seal(payload, 5, pair.now))
    pair.b.dataplane.udp_datagram(datagram, pair.a.io.udp.addr, pair.now)
    pair.b.dataplane.take_tun_writes()


def test_a_whole_gro_train_is_joined_without_reassembly():
    message = bytes(random.Random(3).randbytes(9000))
    buffer, segment = B.encode_fragments(message, 5, 1472)
    assert B.join_fragment_train(buffer, segment) == message
    assert B.join_fragment_train(buffer[segment:], segment) is None  # not from the start
    broken = bytearray(buffer)
    broken[segment + 1] = 7  # a wrong index in the middle
    assert B.join_fragment_train(bytes(broken), segment) is None


@given(st.binary(max_size=3000), st.integers(0, 1600))
def test_join_fragment_train_never_raises(data, segment):
    B.join_fragment_train(bytes([B.FRAGMENT_TYPE]) + data, segment)


@pytest.mark.parametrize("length", [3000, 2924, 20_000])
def test_parity_rebuilds_any_one_missing_piece(length):
    message = bytes(random.Random(length).randbytes(length))
    buffer, segment = B.encode_fragments(message, 9, 1472, parity=True)
    datagrams = [buffer[i : i + segment] for i in range(0, len(buffer), segment)]
    data = [d for d in datagrams if not B.parse_fragment(d).parity]
    [parity] = [d for d in datagrams if B.parse_fragment(d).parity]
    for lost in range(len(data)):
        reassembly = Reassembly()
        arrivals = [parity] + [d for i, d in enumerate(data) if i != lost]
        results = [reassembly.add(B.parse_fragment(d), "x", 0.0) for d in arrivals]
        if lost == len(data) - 1:  # the last piece lost: rebuilt once the read burst is over
            assert results == [None] * len(arrivals)
            assert reassembly.recover_pending() == [("x", message)]
        else:  # the last piece is here, so the missing one is lost: rebuilt at once
            assert results[-1] == message and reassembly.recover_pending() == []
        assert reassembly.recovered == 1


def test_two_missing_pieces_cannot_be_rebuilt_and_late_parity_is_ignored():
    message = bytes(random.Random(1).randbytes(8000))
    buffer, segment = B.encode_fragments(message, 3, 1472, parity=True)
    fragments = [B.parse_fragment(buffer[i : i + segment]) for i in range(0, len(buffer), segment)]
    data = [f for f in fragments if not f.parity]
    parity = next(f for f in fragments if f.parity)
    reassembly = Reassembly()
    assert all(reassembly.add(f, "x", 0.0) is None for f in [parity, *data[2:]])
    assert reassembly.recover_pending() == []
    reassembly.expire(10.0)
    assert reassembly.drops["reassembly_timeout"] == 1
    clean = Reassembly()
    assert [clean.add(f, "x", 0.0) for f in data][-1] == message
    assert clean.add(parity, "x", 0.0) is None and len(clean) == 0


def test_parity_before_the_last_piece_does_not_trigger_a_rebuild():
    message = bytes(random.Random(6).randbytes(8000))
    buffer, segment = B.encode_fragments(message, 8, 1472, parity=True)
    reassembly = Reassembly()
    results = [reassembly.add(B.parse_fragment(buffer[i : i + segment]), "x", 0.0) for i in range(0, len(buffer), segment)]
    assert results[-1] == message and reassembly.recover_pending() == [] and reassembly.recovered == 0


def test_gro_train_with_parity_is_joined():
    message = bytes(random.Random(4).randbytes(9000))
    buffer, segment = B.encode_fragments(message, 5, 1472, parity=True)
    assert B.join_fragment_train(buffer, segment) == message


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 59), st.integers(0, 255)), max_size=6),
    st.integers(0, 120),
    st.sampled_from([0, 1, 536, 1380, 65535]),
    st.booleans(),
)
def test_mangled_tcp_records_from_a_certified_peer_never_raise(flips, cut, gso_size, csum):
    """Near-valid inner TCP packets (header bytes flipped, truncated, odd gso_size) from the real peer
    reach the merge and checksum code: they are delivered, merged or dropped, never raised."""
    from .harness import A_IP, tcp

    pair = _established()
    session = pair.a.engine.session_for(__import__("ipaddress").ip_address(B_IP), pair.now)
    pkt = bytearray(tcp(A_IP, B_IP, 40000, 80, 7, bytes(200)))
    for at, value in flips:
        pkt[at] = value
    pkt = pkt[: len(pkt) - cut] or pkt
    flags = B.FLAG_NEEDS_CSUM if csum else 0
    payload = B.encode_record(pkt, flags, gso_size) + B.encode_record(pkt, flags, gso_size)
    pair.b.dataplane.udp_datagram(bytes(session.seal(payload, 5, pair.now)), pair.a.io.udp.addr, pair.now)
    for frame in pair.b.dataplane.take_tun_writes():
        assert len(frame) > 10
