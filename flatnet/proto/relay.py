"""Wire format of relay frames (node <-> relay), over UDP and over TCP. Sans-I/O, no state.

A relay forwards frames between the two sides of a *relay session*. The lighthouse grants a
session to two nodes over their authenticated control channel (``RelayOffer`` in
``flatnet/proto/control.py``): a random 8-byte session id, a side (0 or 1) and a token per side,
``token = HMAC-SHA256(relay_secret, "flatnet relay v1" | session id | side)[:16]``. The relay
shares ``relay_secret`` with the lighthouse, so it checks a BIND without asking anyone and keeps
no state before the first valid BIND. The payload of DATA frames is the tunnel's own datagram,
already end-to-end encrypted between the two nodes: the relay never sees plaintext and never
holds a tunnel key.

Frame (the same bytes over UDP and, length-prefixed, over TCP)::

     0         1         2         3         4                                  12
    +---------+---------+---------+---------+----------------------------------+-------------
    | version |  type   |  side   |    0    |        session id (8 bytes)       |  body ...
    +---------+---------+---------+---------+----------------------------------+-------------

    version  RELAY_VERSION (1); a relay drops any other version
    type     1 BIND      node -> relay, body = token (16 bytes). (Re)binds this side of the
                         session to the address the frame came from: the first BIND creates the
                         session; a later one refreshes it and follows a roaming node.
             2 BIND_ACK  relay -> node, no body: the side is bound (keeps the NAT mapping open too)
             3 DATA      either way, body = an opaque tunnel datagram (at most MAX_RELAY_BODY)
    side     0 or 1: which side of the session the sender is (BIND); on DATA from a node it is the
             sender's side, the relay forwards the frame unchanged to the other side

TCP (for networks that block UDP; a relay may listen on 443): a byte stream of frames, each
preceded by its length as a 2-byte big-endian integer::

    +----------------+----------------------------+----------------+------------ ...
    | length (2, BE) | frame (length bytes)        | length (2, BE) | frame ...
    +----------------+----------------------------+----------------+------------ ...

A length below RELAY_HEADER_SIZE or above MAX_RELAY_FRAME is a framing error: the relay closes
that connection (a stream cannot resynchronise). :class:`StreamFrameDecoder` does the
reassembly, sans-I/O.

Errors: :func:`parse_relay_frame` and :meth:`StreamFrameDecoder.feed` raise only
:class:`RelayFrameError` (``reason`` from :data:`REASONS`); callers count and drop.
"""

from __future__ import annotations

import hmac as _stdlib_hmac
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.hmac import HMAC

RELAY_VERSION = 1
RELAY_HEADER_SIZE = 12
SESSION_ID_SIZE = 8
TOKEN_SIZE = 16
MAX_RELAY_BODY = 1500  # one tunnel datagram (the tunnel keeps its datagrams under this)
MAX_RELAY_FRAME = RELAY_HEADER_SIZE + MAX_RELAY_BODY
STREAM_LENGTH_SIZE = 2

TYPE_BIND = 1
TYPE_BIND_ACK = 2
TYPE_DATA = 3

_TOKEN_LABEL = b"flatnet relay v1"
_HEADER = struct.Struct("!BBBx8s")

REASONS = frozenset(
    {
        "short",  # fewer bytes than the header
        "too-large",  # body above MAX_RELAY_BODY / stream length above MAX_RELAY_FRAME
        "unsupported-version",
        "unknown-type",
        "bad-side",
        "bad-body",  # BIND without a 16-byte token, BIND_ACK with a body
    }
)


class RelayFrameError(Exception):
    """A relay frame could not be parsed; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str) -> None:
        assert reason in REASONS, reason
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True, slots=True)
class RelayFrame:
    type: int
    side: int
    session_id: bytes
    body: bytes


def mint_relay_token(secret: bytes, session_id: bytes, side: int) -> bytes:
    """The token that lets *side* bind to *session_id* (the lighthouse mints, the relay checks)."""
    if len(session_id) != SESSION_ID_SIZE or side not in (0, 1):
        raise ValueError("bad session id or side")
    mac = HMAC(secret, hashes.SHA256())
    mac.update(_TOKEN_LABEL + session_id + bytes([side]))
    return mac.finalize()[:TOKEN_SIZE]


def check_relay_token(secret: bytes, session_id: bytes, side: int, token: bytes) -> bool:
    return _stdlib_hmac.compare_digest(mint_relay_token(secret, session_id, side), token)


def encode_relay_frame(frame_type: int, side: int, session_id: bytes, body: bytes = b"") -> bytes:
    if frame_type not in (TYPE_BIND, TYPE_BIND_ACK, TYPE_DATA) or side not in (0, 1):
        raise ValueError("bad frame type or side")
    if len(session_id) != SESSION_ID_SIZE or len(body) > MAX_RELAY_BODY:
        raise ValueError("bad session id or body size")
    return _HEADER.pack(RELAY_VERSION, frame_type, side, session_id) + body


def parse_relay_frame(data: bytes) -> RelayFrame:
    """Parse one frame (a UDP datagram, or one frame out of :class:`StreamFrameDecoder`)."""
    if len(data) < RELAY_HEADER_SIZE:
        raise RelayFrameError("short")
    if len(data) > MAX_RELAY_FRAME:
        raise RelayFrameError("too-large")
    version, frame_type, side, session_id = _HEADER.unpack_from(data)
    if version != RELAY_VERSION:
        raise RelayFrameError("unsupported-version")
    if frame_type not in (TYPE_BIND, TYPE_BIND_ACK, TYPE_DATA):
        raise RelayFrameError("unknown-type")
    if side > 1:
        raise RelayFrameError("bad-side")
    body = bytes(data[RELAY_HEADER_SIZE:])
    if (frame_type == TYPE_BIND and len(body) != TOKEN_SIZE) or (frame_type == TYPE_BIND_ACK and body):
        raise RelayFrameError("bad-body")
    return RelayFrame(frame_type, side, session_id, body)


def encode_stream_frame(frame: bytes) -> bytes:
    """Prefix *frame* with its length for the TCP transport."""
    if not RELAY_HEADER_SIZE <= len(frame) <= MAX_RELAY_FRAME:
        raise ValueError(f"frame of {len(frame)} bytes")
    return len(frame).to_bytes(STREAM_LENGTH_SIZE, "big") + frame


class StreamFrameDecoder:
    """Reassembles length-prefixed frames from a TCP byte stream (sans-I/O).

    ``feed(chunk)`` returns the complete frames now available; a framing error raises
    :class:`RelayFrameError` and the caller must close the connection. Buffers at most one
    frame plus its length prefix.
    """

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, chunk: bytes) -> list[bytes]:
        self._buffer += chunk
        frames: list[bytes] = []
        buf = self._buffer
        offset = 0
        while len(buf) - offset >= STREAM_LENGTH_SIZE:
            length = int.from_bytes(buf[offset : offset + STREAM_LENGTH_SIZE], "big")
            if length < RELAY_HEADER_SIZE:
                raise RelayFrameError("short")
            if length > MAX_RELAY_FRAME:
                raise RelayFrameError("too-large")
            end = offset + STREAM_LENGTH_SIZE + length
            if len(buf) < end:
                break
            frames.append(bytes(buf[offset + STREAM_LENGTH_SIZE : end]))
            offset = end
        del buf[:offset]
        return frames

    @property
    def buffered(self) -> int:
        return len(self._buffer)
