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

     0        1        2        3        4                                   8                 10
     +--------+--------+--------+--------+-----------------------------------+-----------------+
     |  type  | index  | count  | flags  |         message id (u32)          | message length  |
     +--------+--------+--------+--------+-----------------------------------+-----------------+
     | piece ...
     +---------

   type      FRAGMENT_TYPE, a first byte no tunnel message uses
   index     0..count-1 for data pieces; count for the parity piece; count 2..MAX_FRAGMENTS
   flags     bit 0 PARITY: the piece is the XOR of all data pieces (each zero-padded to the piece
             size), so any ONE lost data piece can be rebuilt. The sender adds it while it sees
             loss (docs/dataplane.md); other bits must be 0.
   message id  per sender, from a random start, so pieces of different messages never mix
   message length  of the whole sealed message: every piece but the last is the same size

   Fragments (and the parity piece) are not authenticated one by one: the reassembled message is
   opened by the session (AEAD, replay window), so a forged or mixed-up piece only makes that
   message fail and be dropped. Parity is forward error correction, not cryptography.
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

FRAGMENT_HEADER = struct.Struct("!BBBBIH")
FRAGMENT_HEADER_LEN = FRAGMENT_HEADER.size  # 10
FRAGMENT_PARITY = 0x01
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
    message_length: int
    parity: bool
    piece: memoryview


def parse_fragment(datagram) -> Fragment | None:
    """A fragment datagram's header and piece, or None if it is not a valid fragment (never raises)."""
    view = memoryview(datagram)
    if len(view) <= FRAGMENT_HEADER_LEN:
        return None
    kind, index, count, flags, message_id, length = FRAGMENT_HEADER.unpack_from(view, 0)
    if kind != FRAGMENT_TYPE or flags & ~FRAGMENT_PARITY or not 2 <= count <= MAX_FRAGMENTS or length == 0:
        return None
    parity = bool(flags & FRAGMENT_PARITY)
    if (parity and index != count) or (not parity and index >= count):
        return None
    piece = view[FRAGMENT_HEADER_LEN:]
    # Every piece but the last data piece has the message's piece size P: (count-1)*P < length <= count*P.
    last_data = not parity and index == count - 1
    if not last_data and not (count - 1) * len(piece) < length <= count * len(piece):
        return None
    return Fragment(index, count, message_id, length, parity, piece)


def fragment_piece_size(datagram_budget: int) -> int:
    return datagram_budget - FRAGMENT_HEADER_LEN


def xor_pieces(pieces, size: int) -> bytes:
    """XOR of *pieces*, each zero-padded to *size* bytes (big integers do it at C speed)."""
    acc = 0
    for piece in pieces:
        acc ^= int.from_bytes(piece, "little")
    return acc.to_bytes(size, "little")


def encode_fragments(message, message_id: int, datagram_budget: int, parity: bool = False) -> tuple[bytes, int]:
    """Cut *message* into fragment datagrams of at most *datagram_budget* bytes (+ a parity one).

    Returns (buffer, segment_size): the datagrams back to back, every one *segment_size* long but
    the last, which is exactly what one ``sendmsg`` with ``UDP_SEGMENT = segment_size`` sends. The
    parity fragment, full-sized, goes just before the (shorter) last data fragment.
    """
    piece = fragment_piece_size(datagram_budget)
    view = memoryview(message)
    length = len(view)
    count = -(-length // piece)
    if not 2 <= count <= MAX_FRAGMENTS or length > 0xFFFF:
        raise ValueError(f"a message of {length} bytes makes {count} fragments")
    message_id &= 0xFFFFFFFF
    pack = FRAGMENT_HEADER.pack
    parts = []
    for index in range(count):
        if parity and index == count - 1:
            pieces = [view[i * piece : (i + 1) * piece] for i in range(count)]
            parts.append(pack(FRAGMENT_TYPE, count, count, FRAGMENT_PARITY, message_id, length))
            parts.append(xor_pieces(pieces, piece))
        parts.append(pack(FRAGMENT_TYPE, index, count, 0, message_id, length))
        parts.append(view[index * piece : (index + 1) * piece])
    return b"".join(parts), piece + FRAGMENT_HEADER_LEN


def join_fragment_train(buffer, segment_size: int) -> bytes | None:
    """The message in a GRO-coalesced *buffer* holding all its data fragments; else None.

    The common case on a clean path: the sender's one GSO send comes back as one GRO read. Anything
    else (a partial message, two messages, a gap) returns None and goes through reassembly.
    """
    view = memoryview(buffer)
    if segment_size <= FRAGMENT_HEADER_LEN or len(view) <= segment_size:
        return None
    segments = -(-len(view) // segment_size)
    if view[0] != FRAGMENT_TYPE or view[1] != 0:
        return None
    common = view[2:3], view[4:FRAGMENT_HEADER_LEN]  # count; message id and length
    count = view[2]
    if not 2 <= count <= MAX_FRAGMENTS or segments not in (count, count + 1):
        return None
    parts = []
    for at in range(0, len(view), segment_size):
        if view[at] != FRAGMENT_TYPE or view[at + 2 : at + 3] != common[0] or view[at + 4 : at + FRAGMENT_HEADER_LEN] != common[1]:
            return None
        if view[at + 3] & FRAGMENT_PARITY:
            continue
        if view[at + 1] != len(parts) or view[at + 3]:
            return None
        parts.append(view[at + FRAGMENT_HEADER_LEN : at + segment_size])
    if len(parts) != count:
        return None
    message = b"".join(parts)
    return message if len(message) == int.from_bytes(common[1][4:6], "big") else None
