"""Handshake initiation and response: the two Noise_IX messages in their Flatnet envelopes.

Initiation (type 1)::

     0       1       2       3
    +-------+-------+-------+-------+
    |   1   |   1   |  reserved (0) |
    +-------+-------+-------+-------+
    |         sender index          |   initiator's index for the session (u32 LE)
    +-------+-------+-------+-------+
    |  Noise IX message 1: e (32) | s (32) | payload (cleartext, hashed into the transcript):
    |     timestamp (u64 BE, microseconds; replay guard as WireGuard's TAI64N) | certificate
    +-------+-------+-------+-------+
    |   mac1 (16)   |   mac2 (16)   |   see flatnet.proto.cookies
    +-------+-------+-------+-------+

Response (type 2)::

    +-------+-------+-------+-------+
    |   2   |   1   |  reserved (0) |
    +-------+-------+-------+-------+
    |         sender index          |   responder's index
    +-------+-------+-------+-------+
    |        receiver index         |   the initiator's sender index
    +-------+-------+-------+-------+
    |  Noise IX message 2: e (32) | encrypted s (48) | encrypted payload: certificate (+16)
    +-------+-------+-------+-------+
    |   mac1 (16)   |   mac2 (16)   |
    +-------+-------+-------+-------+

The indices sit outside Noise (as in WireGuard): tampering with them only breaks this handshake,
which an on-path attacker can do anyway. `parse_*` check sizes only; the Noise layer authenticates.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from flatnet.proto.constants import MAC_SIZE
from flatnet.proto.errors import MalformedMessage
from flatnet.proto.header import PREFIX_SIZE, MessageType, encode_prefix, parse_prefix

INDEX = struct.Struct("<I")
TWO_INDICES = struct.Struct("<II")
MACS_SIZE = 2 * MAC_SIZE
DH_SIZE = 32
TAG_SIZE = 16
TIMESTAMP = struct.Struct(">Q")
MAX_HANDSHAKE_SIZE = 8192  # certificates are small; bounds work on hostile input
INITIATION_NOISE_MIN = DH_SIZE + DH_SIZE + TIMESTAMP.size + 1
RESPONSE_NOISE_MIN = DH_SIZE + DH_SIZE + TAG_SIZE + 1 + TAG_SIZE
INITIATION_MIN_SIZE = PREFIX_SIZE + INDEX.size + INITIATION_NOISE_MIN + MACS_SIZE
RESPONSE_MIN_SIZE = PREFIX_SIZE + TWO_INDICES.size + RESPONSE_NOISE_MIN + MACS_SIZE


@dataclass(frozen=True)
class HandshakeInitiation:
    sender_index: int
    noise_message: bytes
    mac1: bytes
    mac2: bytes
    mac1_input: bytes  # the bytes mac1 covers (everything before it)
    mac2_input: bytes  # the bytes mac2 covers (everything before it)


@dataclass(frozen=True)
class HandshakeResponse:
    sender_index: int
    receiver_index: int
    noise_message: bytes
    mac1: bytes
    mac2: bytes
    mac1_input: bytes
    mac2_input: bytes


def _check_size(data: bytes, minimum: int) -> None:
    if len(data) < minimum:
        raise MalformedMessage("truncated", f"{len(data)} < {minimum} bytes")
    if len(data) > MAX_HANDSHAKE_SIZE:
        raise MalformedMessage("oversized", f"{len(data)} bytes")


def parse_handshake_initiation(data: bytes) -> HandshakeInitiation:
    if parse_prefix(data) is not MessageType.HANDSHAKE_INITIATION:
        raise MalformedMessage("unknown-type", "not an initiation")
    _check_size(data, INITIATION_MIN_SIZE)
    data = bytes(data)
    (sender,) = INDEX.unpack_from(data, PREFIX_SIZE)
    end = len(data) - MACS_SIZE
    return HandshakeInitiation(
        sender, data[PREFIX_SIZE + INDEX.size : end], data[end : end + MAC_SIZE], data[end + MAC_SIZE :],
        data[:end], data[: end + MAC_SIZE],
    )


def encode_handshake_initiation_body(sender_index: int, noise_message: bytes) -> bytes:
    """Everything but the macs (cookies.MacSigner appends them)."""
    return encode_prefix(MessageType.HANDSHAKE_INITIATION) + INDEX.pack(sender_index) + noise_message


def parse_handshake_response(data: bytes) -> HandshakeResponse:
    if parse_prefix(data) is not MessageType.HANDSHAKE_RESPONSE:
        raise MalformedMessage("unknown-type", "not a response")
    _check_size(data, RESPONSE_MIN_SIZE)
    data = bytes(data)
    sender, receiver = TWO_INDICES.unpack_from(data, PREFIX_SIZE)
    end = len(data) - MACS_SIZE
    return HandshakeResponse(
        sender, receiver, data[PREFIX_SIZE + TWO_INDICES.size : end], data[end : end + MAC_SIZE],
        data[end + MAC_SIZE :], data[:end], data[: end + MAC_SIZE],
    )


def encode_handshake_response_body(sender_index: int, receiver_index: int, noise_message: bytes) -> bytes:
    return encode_prefix(MessageType.HANDSHAKE_RESPONSE) + TWO_INDICES.pack(sender_index, receiver_index) + noise_message


def peek_receiver_index(data: bytes) -> int:
    """The receiver index of a response (no other checks): to find the pending handshake cheaply."""
    return TWO_INDICES.unpack_from(data, PREFIX_SIZE)[1]


# --- the Noise payloads ----------------------------------------------------------------------------


@dataclass(frozen=True)
class InitiationPayload:
    timestamp_us: int
    certificate: bytes


def encode_initiation_payload(timestamp_us: int, certificate: bytes) -> bytes:
    return TIMESTAMP.pack(timestamp_us) + certificate


def parse_initiation_payload(payload: bytes) -> InitiationPayload:
    if len(payload) <= TIMESTAMP.size:
        raise MalformedMessage("truncated", "initiation payload")
    return InitiationPayload(TIMESTAMP.unpack_from(payload)[0], payload[TIMESTAMP.size :])
