"""DATA_BATCH: what a batched data message carries, and the fragments that carry big messages.

Why a batch format at all: in Python the fixed cost of one AEAD call (~2 us for ChaCha20-Poly1305
in ``cryptography``) and of handling one datagram dominates, not the bytes. So the data plane reads
64 KB TCP super-packets from the TUN device (virtio-net offloads), and seals up to ``segment_cap``
TCP segments worth of one super-packet in a single message: one AEAD call per ~16 segments instead
of one per segment. A message is therefore larger than the path MTU and travels in fragments,
which the sender hands to the kernel in one ``sendmsg`` with UDP GSO and the receiver gets back in
one ``recvmsg`` with UDP GRO. The trade-off (docs/dataplane.md): losing any fragment loses the whole
message, so the cap bounds how much one lost datagram costs TCP.

1. The plaintext of a DATA_BATCH message (sealed by the tunnel session, whose 16-byte header is
   the AEAD associated data) is a sequence of records, each an inner IP packet with the offload
   facts the kernel needs to put it back on a TUN device::

     0        1        2                 4                 6
     +--------+--------+-----------------+-----------------+--------------------------------+
     |  kind  | flags  |     length      |    gso_size     |  IP packet (length bytes) ...  |
     +--------+--------+-----------------+-----------------+--------------------------------+

   kind      RECORD_IP_PACKET (1); any other kind makes the whole batch invalid (dropped, counted)
   flags     bit 0 NEEDS_CSUM: the TCP/UDP checksum is left to the receiving kernel; the receiver
             writes the pseudo-header sum itself, whatever the field holds. Other bits must be 0.
   length    bytes of the IP packet that follows (1..65535)
   gso_size  0 for an ordinary packet; for a TCP super-packet the segment size (MSS) the receiving
             kernel cuts it into. A super-packet carries one IP+TCP header for all its segments.

2. Fragments. A sealed message longer than the datagram budget is cut into equal pieces (the last
   may be shorter), each sent as its own datagram behind this header::

     0        1        2        3        4                                   8
     +--------+--------+--------+--------+-----------------------------------+------------------+
     |  type  | index  | count  |  rsvd  |         message id (u32)          | piece ...        |
     +--------+--------+--------+--------+-----------------------------------+------------------+

   type      FRAGMENT_TYPE, a first byte no tunnel message uses
   index     0..count-1; count 2..MAX_FRAGMENTS
   message id  per sender, from a random start, so pieces of different messages never mix

   Fragments are not authenticated one by one: the reassembled message is opened by the session
   (AEAD, replay window), so a forged or mixed-up piece only makes that message fail and be dropped.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

RECORD_HEADER = struct.Struct("!BBHH")
RECORD_HEADER_LEN = RECORD_HEADER.size  # 6
RECORD_IP_PACKET = 1
FLAG_NEEDS_CSUM = 0x01
KNOWN_FLAGS = FLAG_NEEDS_CSUM
MAX_RECORD_LENGTH = 0xFFFF

FRAGMENT_HEADER = struct.Struct("!BBBBI")
FRAGMENT_HEADER_LEN = FRAGMENT_HEADER.size  # 8
# First byte of a fragment datagram. Tunnel messages start with their type (small numbers); the
# test tests/node/test_batch.py checks this never collides with a tunnel message type.
FRAGMENT_TYPE = 0xFB
MAX_FRAGMENTS = 64


class Record(NamedTuple):
    packet: memoryview
    flags: int
    gso_size: int


def encode_record(packet, flags: int = 0, gso_size: int = 0) -> bytes:
    if not 0 < len(packet) <= MAX_RECORD_LENGTH:
        raise ValueError(f"record of {len(packet)} bytes")
    if flags & ~KNOWN_FLAGS:
        raise ValueError(f"unknown record flags {flags:#x}")
    return RECORD_HEADER.pack(RECORD_IP_PACKET, flags, len(packet), gso_size) + bytes(packet)


def record_header(length: int, flags: int = 0, gso_size: int = 0) -> bytes:
    """Just the 6-byte header, for callers that join header and packet themselves (no copy)."""
    if not 0 < length <= MAX_RECORD_LENGTH:
        raise ValueError(f"record of {length} bytes")
    return RECORD_HEADER.pack(RECORD_IP_PACKET, flags, length, gso_size)


def parse_batch(payload) -> list[Record] | None:
    """The records of a DATA_BATCH plaintext, or None if it is malformed (never raises).

    Malformed: empty, a truncated header or packet, an unknown kind or flag bit, a zero length.
    """
    view = memoryview(payload)
    end = len(view)
    if end == 0:
        return None
    records = []
    at = 0
    unpack = RECORD_HEADER.unpack_from
    while at < end:
        if end - at < RECORD_HEADER_LEN:
            return None
        kind, flags, length, gso_size = unpack(view, at)
        at += RECORD_HEADER_LEN
        if kind != RECORD_IP_PACKET or flags & ~KNOWN_FLAGS or length == 0 or end - at < length:
            return None
        records.append(Record(view[at : at + length], flags, gso_size))
        at += length
    return records


class Fragment(NamedTuple):
    index: int
    count: int
    message_id: int
    piece: memoryview


def parse_fragment(datagram) -> Fragment | None:
    """A fragment datagram's header and piece, or None if it is not a valid fragment (never raises)."""
    view = memoryview(datagram)
    if len(view) <= FRAGMENT_HEADER_LEN:
        return None
    kind, index, count, reserved, message_id = FRAGMENT_HEADER.unpack_from(view, 0)
    if kind != FRAGMENT_TYPE or reserved != 0 or not 2 <= count <= MAX_FRAGMENTS or index >= count:
        return None
    return Fragment(index, count, message_id, view[FRAGMENT_HEADER_LEN:])


def fragment_piece_size(datagram_budget: int) -> int:
    return datagram_budget - FRAGMENT_HEADER_LEN


def encode_fragments(message, message_id: int, datagram_budget: int) -> tuple[bytes, int]:
    """Cut *message* into fragment datagrams of at most *datagram_budget* bytes.

    Returns (buffer, segment_size): the datagrams back to back, every one *segment_size* long but
    the last, which is exactly what one ``sendmsg`` with ``UDP_SEGMENT = segment_size`` sends.
    """
    piece = fragment_piece_size(datagram_budget)
    view = memoryview(message)
    count = -(-len(view) // piece)
    if not 2 <= count <= MAX_FRAGMENTS:
        raise ValueError(f"a message of {len(view)} bytes makes {count} fragments")
    message_id &= 0xFFFFFFFF
    pack = FRAGMENT_HEADER.pack
    parts = []
    for index in range(count):
        parts.append(pack(FRAGMENT_TYPE, index, count, 0, message_id))
        parts.append(view[index * piece : (index + 1) * piece])
    return b"".join(parts), piece + FRAGMENT_HEADER_LEN


def join_fragment_train(buffer, segment_size: int) -> bytes | None:
    """The message in a GRO-coalesced *buffer* holding exactly all its fragments, in order; else None.

    The common case on a clean path: the sender's one GSO send comes back as one GRO read. Anything
    else (a partial message, two messages, a gap) returns None and goes through reassembly.
    """
    view = memoryview(buffer)
    if segment_size <= FRAGMENT_HEADER_LEN or len(view) <= segment_size:
        return None
    count = -(-len(view) // segment_size)
    if view[0] != FRAGMENT_TYPE or view[1] != 0 or view[2] != count or not 2 <= count <= MAX_FRAGMENTS:
        return None
    tail = view[2:FRAGMENT_HEADER_LEN]  # count, reserved, message id: the same in every fragment
    if tail[1] != 0:
        return None
    parts = []
    for index in range(count):
        at = index * segment_size
        if view[at] != FRAGMENT_TYPE or view[at + 1] != index or view[at + 2 : at + FRAGMENT_HEADER_LEN] != tail:
            return None
        parts.append(view[at + FRAGMENT_HEADER_LEN : at + segment_size])
    return b"".join(parts)
