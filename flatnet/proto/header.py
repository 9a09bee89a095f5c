"""The 4-byte prefix every Flatnet datagram starts with, and the registry of message types.

     0       1       2       3
    +-------+-------+-------+-------+
    | type  |version|  reserved (0) |    version = PROTOCOL_VERSION (1)
    +-------+-------+-------+-------+
    | type-specific body ...

The type comes first (as in WireGuard) so a receiver can dispatch on one byte; message types are
1..8 and the data plane's fragment envelope (flatnet/proto/batch.py) uses 0xFB, which is not one.

A node drops (and counts) a datagram whose version or type it does not speak, or whose reserved
bytes are not zero, before looking further: that is how later versions stay refusable.
"""

from __future__ import annotations

import enum
import struct

from flatnet.proto.constants import PROTOCOL_VERSION
from flatnet.proto.errors import MalformedMessage

PREFIX = struct.Struct("<BBH")
PREFIX_SIZE = PREFIX.size  # 4


class MessageType(enum.IntEnum):
    HANDSHAKE_INITIATION = 1
    HANDSHAKE_RESPONSE = 2
    COOKIE_REPLY = 3
    DATA = 4  # one inner IPv4 packet (empty = keepalive)
    DATA_BATCH = 5  # opaque payload: the data plane's batch format (flatnet.node), we only seal/open it
    CONTROL = 6  # lighthouse control messages (encrypted like DATA)
    PUNCH = 7  # NAT hole punching: cleartext, carries nothing, changes nothing
    RELAY = 8  # a frame relayed through a third node (encrypted like DATA, hop by hop)


# Transport messages: sealed with a session's keys under the transport header.
TRANSPORT_TYPES = frozenset({MessageType.DATA, MessageType.DATA_BATCH, MessageType.CONTROL, MessageType.RELAY})
_KNOWN = frozenset(int(t) for t in MessageType)


def parse_prefix(data: bytes) -> MessageType:
    """The message type of `data`; MalformedMessage(reason) for anything this node does not speak."""
    if len(data) < PREFIX_SIZE:
        raise MalformedMessage("truncated", "shorter than the prefix")
    msg_type, version, reserved = PREFIX.unpack_from(data)
    if msg_type not in _KNOWN:
        raise MalformedMessage("unknown-type", str(msg_type))
    if version != PROTOCOL_VERSION:
        raise MalformedMessage("bad-version", str(version))
    if reserved:
        raise MalformedMessage("bad-reserved")
    return MessageType(msg_type)


def encode_prefix(msg_type: MessageType) -> bytes:
    return PREFIX.pack(msg_type, PROTOCOL_VERSION, 0)


def encode_punch() -> bytes:
    """A hole-punching datagram: the prefix alone."""
    return encode_prefix(MessageType.PUNCH)
