"""Flatnet's handshake: Noise_IX_25519_ChaChaPoly_BLAKE2s carrying certificates.

    -> e, s                    payload: timestamp, initiator's certificate   (cleartext, hashed)
    <- e, ee, se, s, es        payload: responder's certificate              (encrypted)

Why IX (docs/protocol.md has the full argument): identities are certificates, so the responder
learns who is calling from the first message and needs no per-peer key configuration; one round
trip gives both sides mutual authentication and forward secrecy (ee, plus se/es). The cost is that
the initiator's certificate travels in clear, which is acceptable inside a team's own network.

The functions here are pure: they drive a HandshakeState and check sizes; whether a certificate is
trusted is decided by the engine.
"""

from __future__ import annotations

from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from flatnet.proto.constants import NOISE_PROLOGUE, NOISE_PROTOCOL_NAME
from flatnet.proto.handshake_messages import (
    InitiationPayload,
    encode_initiation_payload,
    parse_initiation_payload,
)
from flatnet.proto.noise import HandshakeState, ProtocolName

PROTOCOL = ProtocolName.parse(NOISE_PROTOCOL_NAME)

EphemeralFactory = Callable[[], X25519PrivateKey]


def begin_initiation(
    static_key: X25519PrivateKey, certificate: bytes, timestamp_us: int, new_ephemeral: EphemeralFactory
) -> tuple[HandshakeState, bytes]:
    """The initiator's HandshakeState and Noise message 1."""
    state = HandshakeState(PROTOCOL, True, NOISE_PROLOGUE, s=static_key, generate_ephemeral=new_ephemeral)
    return state, state.write_message(encode_initiation_payload(timestamp_us, certificate))


def read_initiation(
    static_key: X25519PrivateKey, noise_message: bytes, new_ephemeral: EphemeralFactory
) -> tuple[HandshakeState, InitiationPayload, bytes]:
    """The responder reads message 1 (hashing only: IX's first message has no DH).

    Returns (state, payload, initiator's static public key). Raises NoiseError / MalformedMessage.
    """
    state = HandshakeState(PROTOCOL, False, NOISE_PROLOGUE, s=static_key, generate_ephemeral=new_ephemeral)
    payload = parse_initiation_payload(state.read_message(noise_message))
    return state, payload, state.rs


def write_response(state: HandshakeState, certificate: bytes) -> bytes:
    """Noise message 2 (three DH operations)."""
    return state.write_message(certificate)


def read_response(state: HandshakeState, noise_message: bytes) -> tuple[bytes, bytes]:
    """(responder's certificate bytes, responder's static public key). Pass a clone: this mutates."""
    certificate = state.read_message(noise_message)
    return certificate, state.rs


def transport_keys(state: HandshakeState) -> tuple[bytes, bytes]:
    """(sending key, receiving key) for this side after Split()."""
    initiator_to_responder, responder_to_initiator = state.split()
    if state.initiator:
        return initiator_to_responder.k, responder_to_initiator.k
    return responder_to_initiator.k, initiator_to_responder.k
