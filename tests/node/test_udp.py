"""The UDP endpoint on loopback: one GSO send comes back as one GRO read (or datagram by datagram)."""

from __future__ import annotations

import time

from flatnet.node.udp import DatagramEndpoint
from flatnet.proto import batch as B


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


def test_gso_send_and_gro_receive_carry_a_fragmented_message():
    receiver = DatagramEndpoint("127.0.0.1", 0, gro=True)
    sender = DatagramEndpoint("127.0.0.1", 0, gro=False)
    try:
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
    finally:
        receiver.close()
        sender.close()


def test_plain_datagrams_have_no_segment_size():
    receiver = DatagramEndpoint("127.0.0.1", 0)
    sender = DatagramEndpoint("127.0.0.1", 0)
    try:
        assert sender.send(b"hello", receiver.address)
        [(data, addr, segment)] = _drain(receiver, 5)
        assert (data, addr, segment) == (b"hello", sender.address, 0)
    finally:
        receiver.close()
        sender.close()
