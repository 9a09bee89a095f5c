"""The transport header: DATA, DATA_BATCH, CONTROL and RELAY datagrams.

     0       1       2       3
    +-------+-------+-------+-------+
    | type  |version|  reserved (0) |
    +-------+-------+-------+-------+
    |        receiver index         |   the receiver's session index (u32 LE)
    +-------+-------+-------+-------+
    |                               |
    +            counter            +   64-bit LE; the AEAD nonce is 4 zero bytes + these 8
    |                               |   (Noise §5.1/§12.3 nonce layout, used explicitly §11.4)
    +-------+-------+-------+-------+
    |  ChaCha20-Poly1305 ciphertext |   associated data = the 16 header bytes above
    |  ...             + 16-byte tag|
    +-------+-------+-------+-------+

16 bytes of header + 16 of tag = TRANSPORT_OVERHEAD. An empty DATA plaintext is a keepalive.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from flatnet.proto.constants import PROTOCOL_VERSION
from flatnet.proto.errors import MalformedMessage
from flatnet.proto.header import TRANSPORT_TYPES, MessageType, parse_prefix

HEADER = struct.Struct("<BBHIQ")
HEADER_SIZE = HEADER.size  # 16
TAG_SIZE = 16
TRANSPORT_OVERHEAD = HEADER_SIZE + TAG_SIZE
NONCE_OFFSET = 8  # header[8:16] is the counter; the nonce is b"\0" * 4 + header[8:16]
NONCE_PREFIX = b"\x00\x00\x00\x00"


@dataclass(frozen=True)
class TransportHeader:
    msg_type: MessageType
    receiver_index: int
    counter: int


def parse_transport_header(data: bytes) -> TransportHeader:
    msg_type = parse_prefix(data)
    if msg_type not in TRANSPORT_TYPES:
        raise MalformedMessage("unknown-type", f"{msg_type.name} is not a transport message")
    if len(data) < TRANSPORT_OVERHEAD:
        raise MalformedMessage("truncated", "shorter than header + tag")
    _, _, _, receiver_index, counter = HEADER.unpack_from(data)
    return TransportHeader(msg_type, receiver_index, counter)


def encode_transport_header(msg_type: MessageType, receiver_index: int, counter: int) -> bytes:
    return HEADER.pack(msg_type, PROTOCOL_VERSION, 0, receiver_index, counter)
