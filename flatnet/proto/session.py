"""A transport session: one keypair of an established tunnel, and the data plane's hot path.

`seal` and `open` are what every data packet costs: one AEAD call, a struct pack/unpack, a replay
window check and update. They call back into the engine only for bookkeeping the timers need
(last sent/received, rekey triggers); that is a method call, not a queue.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from flatnet.proto.constants import PROTOCOL_VERSION, REJECT_AFTER_MESSAGES, REJECT_AFTER_TIME
from flatnet.proto.errors import SessionExpiredError
from flatnet.proto.header import TRANSPORT_TYPES, MessageType
from flatnet.proto.replay import ReplayWindow
from flatnet.proto.transport_header import HEADER, HEADER_SIZE, NONCE_PREFIX

if TYPE_CHECKING:
    from flatnet.proto.engine import Peer, TunnelEngine

_pack_header = HEADER.pack
_DATA = MessageType.DATA


class TransportSession:
    """Keys, counters and replay window of one handshake's result.

    `is_initiator`: we sent the initiation (only the initiator renews a session by time, as in
    WireGuard, so two peers do not both rekey). `confirmed`: the responder may not send until the
    initiator's first transport message proves the initiator holds its static key (key confirmation);
    until then the session waits in the peer's `next` slot.
    """

    __slots__ = (
        "peer",
        "certificate",
        "local_index",
        "remote_index",
        "created_at",
        "is_initiator",
        "confirmed",
        "send_counter",
        "replay",
        "_send",
        "_recv",
        "_engine",
    )

    def __init__(
        self,
        engine: TunnelEngine,
        peer: Peer,
        certificate,
        local_index: int,
        remote_index: int,
        send_key: bytes,
        recv_key: bytes,
        created_at: float,
        is_initiator: bool,
    ):
        self._engine = engine
        self.peer = peer
        self.certificate = certificate
        self.local_index = local_index
        self.remote_index = remote_index
        self.created_at = created_at
        self.is_initiator = is_initiator
        self.confirmed = is_initiator
        self.send_counter = 0
        self.replay = ReplayWindow()
        self._send = ChaCha20Poly1305(send_key)
        self._recv = ChaCha20Poly1305(recv_key)

    # -- what the data plane asks ---------------------------------------------------------------

    @property
    def peer_certificate(self):
        return self.certificate

    @property
    def peer_ip(self):
        return self.peer.ip

    @property
    def endpoint(self):
        return self.peer.endpoint

    def allows_source(self, ip) -> bool:
        """May a packet from this peer carry inner source `ip`? (4 raw bytes, IPv4Address, int or str)"""
        return self.certificate.allows_source(ip)

    def expired(self, now: float) -> bool:
        return now - self.created_at >= REJECT_AFTER_TIME

    def can_send(self, now: float) -> bool:
        return self.confirmed and self.send_counter < REJECT_AFTER_MESSAGES and now - self.created_at < REJECT_AFTER_TIME

    # -- the hot path -----------------------------------------------------------------------------

    def seal(self, payload: bytes, msg_type: MessageType, now: float) -> bytes:
        """The full datagram carrying `payload` as `msg_type`. Raises SessionExpiredError past the limits.

        After sealing, drain `engine.datagrams_to_send()`: sealing may have started a rekey.
        """
        counter = self.send_counter
        if counter >= REJECT_AFTER_MESSAGES or now - self.created_at >= REJECT_AFTER_TIME or not self.confirmed:
            raise SessionExpiredError(f"session {self.local_index} cannot send (expired or unconfirmed)")
        if msg_type is not _DATA and msg_type not in TRANSPORT_TYPES:
            raise ValueError(f"{msg_type!r} is not a transport message type")
        self.send_counter = counter + 1
        header = _pack_header(msg_type, PROTOCOL_VERSION, 0, self.remote_index, counter)
        out = header + self._send.encrypt(NONCE_PREFIX + header[8:], payload, header)
        self._engine._after_seal(self, len(out), bool(payload), now)
        return out

    def decrypt(self, datagram) -> bytes | None:
        """The plaintext of a transport datagram, or None if it does not authenticate.

        The engine checks the replay window before and updates it after (see TunnelEngine.open_data).
        """
        try:
            if type(datagram) is not bytes:
                datagram = bytes(datagram)
            return self._recv.decrypt(NONCE_PREFIX + datagram[8:HEADER_SIZE], datagram[HEADER_SIZE:], datagram[:HEADER_SIZE])
        except InvalidTag:
            return None
