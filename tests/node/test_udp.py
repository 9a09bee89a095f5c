"""The UDP endpoint on loopback: one GSO send comes back as one GRO read (or datagram by datagram);
batched reads (recvmmsg) and one recvmsg per datagram give the same results."""

from __future__ import annotations

import errno
import socket
import time

import pytest

from flatnet.node import udp
from flatnet.node.udp import RECV_BATCH, DatagramEndpoint
from flatnet.proto import batch as B

IP_RECVERR = 11  # <linux/in.h>; not in Python's socket module
# recvmsg, batched with the default size, and batches small enough that a test spans several.
READS = {"recvmsg": 0, "batched": RECV_BATCH, "batched-small": 3}

needs_recvmmsg = pytest.mark.skipif(udp.load_recvmmsg() is None, reason="no usable recvmmsg here")


@pytest.fixture(params=list(READS))
def recv_batch(request) -> int:
    if READS[request.param] and udp.load_recvmmsg() is None:
        pytest.skip("no usable recvmmsg here")
    return READS[request.param]


def _drain(endpoint: DatagramEndpoint, want_bytes: int, timeout: float = 2.0) -> list:
    got, total = [], 0
    deadline = time.monotonic() + timeout
    while total < want_bytes and time.monotonic() < deadline:
        item = endpoint.recv()
        if item is None:
            time.sleep(0.001)
            continue
        got.append(item)
        total += len(item[0])
    return got


def _read_all(endpoint: DatagramEndpoint, count: int, timeout: float = 2.0) -> list:
    """``count`` reads (waiting for them), then checks that nothing more is waiting."""
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        item = endpoint.recv()
        if item is None:
            time.sleep(0.001)
            continue
        got.append(item)
    time.sleep(0.01)
    assert endpoint.recv() is None and endpoint.recv() is None
    assert endpoint.pending == 0
    return got


@pytest.fixture
def pair(recv_batch):
    receiver = DatagramEndpoint("127.0.0.1", 0, gro=True, recv_batch=recv_batch)
    sender = DatagramEndpoint("127.0.0.1", 0, gro=False)
    assert receiver.batched == bool(recv_batch)
    yield receiver, sender
    receiver.close()
    sender.close()


def test_gso_send_and_gro_receive_carry_a_fragmented_message(pair):
    receiver, sender = pair
    message = bytes(range(256)) * 80  # 20 KB
    buffer, segment = B.encode_fragments(message, 1, 1472)
    assert sender.send(buffer, receiver.address, segment)
    reads = _drain(receiver, len(buffer))
    assert b"".join(r[0] for r in reads) == buffer
    assert all(r[1] == sender.address for r in reads)
    if receiver.gro:  # coalesced: the segment size comes back in the control message
        assert any(r[2] == segment for r in reads)
        joined = [B.join_fragment_train(r[0], r[2]) for r in reads if r[2]]
        assert message in joined
    assert sender.recv() is None  # nothing for the sender, and no blocking


def test_plain_datagrams_have_no_segment_size(pair):
    receiver, sender = pair
    assert sender.send(b"hello", receiver.address)
    [(data, addr, segment)] = _drain(receiver, 5)
    assert (data, addr, segment) == (b"hello", sender.address, 0)
    assert type(data) is bytes


def test_datagrams_arrive_in_order_with_their_source(recv_batch):
    receiver = DatagramEndpoint("127.0.0.1", 0, recv_batch=recv_batch)
    senders = [DatagramEndpoint("127.0.0.1", 0) for _ in range(3)]
    try:
        sent = []
        for i in range(12):
            sender = senders[i % 3] if i < 6 else senders[0]  # mixed sources, then one source
            payload = f"datagram {i}".encode() * (i + 1)
            assert sender.send(payload, receiver.address)
            sent.append((payload, sender.address, 0))
        assert _read_all(receiver, len(sent)) == sent
    finally:
        receiver.close()
        for sender in senders:
            sender.close()


def test_many_datagrams_over_several_batches_stay_whole(pair):
    receiver, sender = pair
    payloads = [bytes([i % 256]) * 1400 for i in range(500)]
    got = []
    for start in range(0, len(payloads), 100):  # 5 rounds, each read partly while the next is queued
        for payload in payloads[start : start + 100]:
            assert sender.send(payload, receiver.address)
        got.extend(_drain(receiver, 50 * 1400))
    got.extend(_read_all(receiver, len(payloads) - len(got)))
    # Every datagram is its own bytes: the ones read first were not overwritten by later batches.
    assert [data for data, _, _ in got] == payloads
    assert {(addr, segment) for _, addr, segment in got} == {(sender.address, 0)}


def test_gro_trains_report_their_own_segment_size(pair):
    receiver, sender = pair
    if not receiver.gro:
        pytest.skip("no UDP_GRO on this kernel")
    sends = [
        (b"a" * 5000, 1000),  # 5 equal segments
        (b"b" * 300, 0),  # alone
        (b"c" * 1700, 500),  # 3 of 500 and a short last one
        (b"d" * 64, 0),
        (b"e" * 6000, 1200),
        (b"f" * 2400, 1200),
    ]
    for buffer, segment in sends:
        assert sender.send(buffer, receiver.address, segment)
    expected = [(buffer, sender.address, segment) for buffer, segment in sends]
    assert _read_all(receiver, len(sends)) == expected


@pytest.mark.parametrize("recv_batch", [0, RECV_BATCH, 2])
def test_datagrams_longer_than_recv_size_are_dropped_and_counted(recv_batch):
    if recv_batch and udp.load_recvmmsg() is None:
        pytest.skip("no usable recvmmsg here")
    receiver = DatagramEndpoint("127.0.0.1", 0, gro=True, recv_batch=recv_batch, recv_size=1000)
    sender = DatagramEndpoint("127.0.0.1", 0)
    try:
        sends = [
            (b"1" * 500, 0),
            (b"2" * 2000, 0),
            (b"3" * 1000, 0),
            (b"4" * 3000, 600),
            (b"5" * 10, 0),
            (b"6" * 1001, 0),
            (b"7" * 1500, 0),
        ]
        for buffer, segment in sends:
            assert sender.send(buffer, receiver.address, segment)
        whole = [
            (b"1" * 500, sender.address, 0),
            (b"3" * 1000, sender.address, 0),
            (b"5" * 10, sender.address, 0),
        ]
        assert _read_all(receiver, len(whole)) == whole
        # The GSO send comes as one 3000-byte train where GRO is on, as 5 datagrams of 600 otherwise.
        assert receiver.truncated == 4
    finally:
        receiver.close()
        sender.close()


def test_an_icmp_error_for_an_earlier_send_reads_as_an_empty_datagram(recv_batch):
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.bind(("127.0.0.1", 0))
    closed_address = closed.getsockname()
    closed.close()
    endpoint = DatagramEndpoint("127.0.0.1", 0, recv_batch=recv_batch)
    try:
        # An unconnected socket hears of ICMP errors only with IP_RECVERR (the node sets neither).
        endpoint.sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
        assert endpoint.send(b"anyone?", closed_address)
        deadline = time.monotonic() + 2
        got = endpoint.recv()
        while got is None and time.monotonic() < deadline:
            time.sleep(0.001)
            got = endpoint.recv()
        assert got == (b"", None, 0)
        assert endpoint.recv() is None
        # And reads go on as before.
        other = DatagramEndpoint("127.0.0.1", 0)
        try:
            assert other.send(b"after", endpoint.address)
            assert _read_all(endpoint, 1) == [(b"after", other.address, 0)]
        finally:
            other.close()
    finally:
        endpoint.close()


def test_a_closed_endpoint_raises_on_recv(recv_batch):
    endpoint = DatagramEndpoint("127.0.0.1", 0, recv_batch=recv_batch)
    endpoint.close()
    replacement = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # may take the old fd number
    try:
        with pytest.raises(OSError) as raised:
            endpoint.recv()
        assert raised.value.errno == errno.EBADF
    finally:
        replacement.close()


@needs_recvmmsg
def test_batched_and_recvmsg_reads_give_the_same_results():
    readers = {
        batch: DatagramEndpoint("127.0.0.1", 0, gro=True, recv_batch=batch) for batch in (0, 2, RECV_BATCH)
    }
    sender = DatagramEndpoint("127.0.0.1", 0)
    try:
        # Singles, trains, singles again: the batched reader goes to recvmsg after a train and back.
        sends = [(bytes([i]) * (100 + 37 * i), 0) for i in range(5)]
        sends += [(bytes([50 + i]) * 4000, 800) for i in range(3)]
        sends += [(bytes([90 + i]) * 1400, 0) for i in range(7)]
        sends += [(b"z" * 2500, 1000)]
        sends += [(bytes([120 + i]) * 1400, 0) for i in range(4)]
        for reader in readers.values():
            for buffer, segment in sends:
                assert sender.send(buffer, reader.address, segment)
        results = {batch: _read_all(reader, len(sends)) for batch, reader in readers.items()}
        assert results[2] == results[0] and results[RECV_BATCH] == results[0]
        assert [data for data, _, _ in results[0]] == [buffer for buffer, _ in sends]
    finally:
        for reader in readers.values():
            reader.close()
        sender.close()


@pytest.fixture
def batch_of_8():
    """A receiver batching 8 per recvmmsg and a sender, on loopback."""
    receiver = DatagramEndpoint("127.0.0.1", 0, recv_batch=8)
    sender = DatagramEndpoint("127.0.0.1", 0)
    yield receiver, sender
    receiver.close()
    sender.close()


@needs_recvmmsg
def test_a_short_batch_is_followed_by_none_and_holds_the_rest(batch_of_8):
    receiver, sender = batch_of_8
    for i in range(3):
        assert sender.send(bytes([i]), receiver.address)
    time.sleep(0.01)
    assert receiver.recv() == (b"\x00", sender.address, 0)
    assert receiver.pending == 2  # read from the kernel in the same call: the fd is not readable
    assert receiver.recv()[0] == b"\x01"
    assert receiver.recv()[0] == b"\x02"
    assert receiver.pending == 0
    assert receiver.recv() is None


def test_without_recvmmsg_the_endpoint_reads_with_recvmsg(monkeypatch):
    monkeypatch.setattr(udp, "_recvmmsg", False)  # as on a libc without it
    receiver = DatagramEndpoint("127.0.0.1", 0, recv_batch=RECV_BATCH)
    sender = DatagramEndpoint("127.0.0.1", 0)
    try:
        assert not receiver.batched
        assert sender.send(b"hello", receiver.address)
        assert _read_all(receiver, 1) == [(b"hello", sender.address, 0)]
    finally:
        receiver.close()
        sender.close()


@needs_recvmmsg
def test_a_lone_read_takes_what_a_batch_holds_first_then_one_datagram(batch_of_8):
    receiver, sender = batch_of_8
    for i in range(3):
        assert sender.send(bytes([i]), receiver.address)
    time.sleep(0.01)
    assert receiver.recv()[0] == b"\x00"  # a batch: 1 and 2 held
    assert receiver.recv_lone()[0] == b"\x01"  # order kept: the held ones first
    for i in (3, 4):
        assert sender.send(bytes([i]), receiver.address)
    time.sleep(0.01)
    assert receiver.recv_lone()[0] == b"\x02"
    assert receiver.pending == 0
    assert receiver.recv_lone()[0] == b"\x03"  # one recvmsg: one datagram, nothing read ahead
    assert receiver.pending == 0
    assert receiver.recv()[0] == b"\x04"
    assert receiver.recv() is None
