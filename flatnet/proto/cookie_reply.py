"""The cookie reply (type 3): a responder under load answers an initiation with this, not with DH.

     0       1       2       3
    +-------+-------+-------+-------+
    |   3   |   1   |  reserved (0) |
    +-------+-------+-------+-------+
    |        receiver index         |   the initiation's sender index
    +-------+-------+-------+-------+
    |        nonce (12, random)     |
    +-------+-------+-------+-------+
    |  encrypted cookie (16) + tag (16)   ChaCha20-Poly1305, key = cookie key of the network,
    +-------+-------+-------+-------+   associated data = the initiation's mac1

52 bytes: smaller than any initiation, so a spoofed flood is never amplified. WireGuard uses
XChaCha20 with a 24-byte random nonce; `cryptography` has no XChaCha20, and a 96-bit random nonce
is safe for the few cookie replies one key ever encrypts (it rotates with the network key only, but
replies are rate-bounded by the initiations that trigger them).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from flatnet.proto.constants import COOKIE_SIZE
from flatnet.proto.errors import MalformedMessage
from flatnet.proto.header import PREFIX_SIZE, MessageType, encode_prefix, parse_prefix

BODY = struct.Struct("<I12s")
NONCE_SIZE = 12
ENCRYPTED_COOKIE_SIZE = COOKIE_SIZE + 16
COOKIE_REPLY_SIZE = PREFIX_SIZE + BODY.size + ENCRYPTED_COOKIE_SIZE  # 52


@dataclass(frozen=True)
class CookieReply:
    receiver_index: int
    nonce: bytes
    encrypted_cookie: bytes


def parse_cookie_reply(data: bytes) -> CookieReply:
    if parse_prefix(data) is not MessageType.COOKIE_REPLY:
        raise MalformedMessage("unknown-type", "not a cookie reply")
    if len(data) != COOKIE_REPLY_SIZE:
        raise MalformedMessage("truncated" if len(data) < COOKIE_REPLY_SIZE else "oversized", "cookie reply")
    receiver, nonce = BODY.unpack_from(data, PREFIX_SIZE)
    return CookieReply(receiver, nonce, bytes(data[PREFIX_SIZE + BODY.size :]))


def encode_cookie_reply(reply: CookieReply) -> bytes:
    return encode_prefix(MessageType.COOKIE_REPLY) + BODY.pack(reply.receiver_index, reply.nonce) + reply.encrypted_cookie
