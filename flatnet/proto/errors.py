"""Every error type of the protocol core, in one place.

The contract (as nebula's handshake machine states it): bad input from the network never escapes
`TunnelEngine.receive_datagram`/`open_data` — it is dropped, counted in `engine.drops` under a
`DropReason`, and leaves the engine's state as it was. Exceptions here are for the layers below the
engine (the Noise objects, the wire-format parsers) and for API misuse by the caller.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base of everything the protocol core raises."""


class NoiseError(ProtocolError):
    """A Noise message that does not authenticate or parse, or a Noise object used out of turn."""


class MalformedMessage(ProtocolError):
    """A datagram that does not parse as the wire format it claims to be. `.reason` is a drop reason."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class SessionExpiredError(ProtocolError):
    """`TransportSession.seal` on a session past REJECT_AFTER_TIME/MESSAGES: get a new one."""


class UnknownPeerError(ProtocolError):
    """API misuse: an operation names a peer the engine does not know."""
