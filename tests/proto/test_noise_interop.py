"""The Noise layer against an independent implementation: the `noiseprotocol` package (0.3.1)."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from flatnet.proto.noise import HandshakeState, public_bytes

noise_connection = pytest.importorskip("noise.connection", reason="noiseprotocol (test dependency) not installed")
NoiseConnection, Keypair = noise_connection.NoiseConnection, noise_connection.Keypair

PROLOGUE = b"flatnet interop"


def _raw(key: X25519PrivateKey) -> bytes:
    return key.private_bytes_raw()


def _theirs(name: str, initiator: bool, s: X25519PrivateKey | None, rs: bytes | None):
    conn = NoiseConnection.from_name(name.encode())
    (conn.set_as_initiator if initiator else conn.set_as_responder)()
    conn.set_prologue(PROLOGUE)
    if s is not None:
        conn.set_keypair_from_private_bytes(Keypair.STATIC, _raw(s))
    if rs is not None:
        conn.set_keypair_from_public_bytes(Keypair.REMOTE_STATIC, rs)
    conn.start_handshake()
    return conn


PATTERNS = ["NN", "XX", "IX", "IK", "NK", "KK", "XK"]


@pytest.mark.parametrize("hash_name", ["BLAKE2s", "SHA256"])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("we_initiate", [True, False], ids=["we-initiate", "they-initiate"])
def test_handshake_and_transport_both_ways(pattern, hash_name, we_initiate):
    name = f"Noise_{pattern}_25519_ChaChaPoly_{hash_name}"
    init_s, resp_s = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    needs = {"I": True, "X": True, "K": True, "N": False}
    init_static = init_s if needs[pattern[0]] else None
    resp_static = resp_s if pattern[1] in "KX" else None
    init_knows_rs = public_bytes(resp_s) if pattern[1] == "K" else None
    resp_knows_rs = public_bytes(init_s) if pattern[0] == "K" else None

    if we_initiate:
        ours = HandshakeState(name, True, PROLOGUE, s=init_static, rs=init_knows_rs)
        theirs = _theirs(name, False, resp_static, resp_knows_rs)
    else:
        ours = HandshakeState(name, False, PROLOGUE, s=resp_static, rs=resp_knows_rs)
        theirs = _theirs(name, True, init_static, init_knows_rs)

    i = 0
    while not ours.finished:
        payload = f"handshake payload {i}".encode()
        if ours.my_turn():
            assert theirs.read_message(ours.write_message(payload)) == payload
        else:
            assert ours.read_message(theirs.write_message(payload)) == payload
        i += 1
    assert theirs.handshake_finished
    assert ours.handshake_hash == theirs.get_handshake_hash()

    i_to_r, r_to_i = ours.split()
    send, recv = (i_to_r, r_to_i) if we_initiate else (r_to_i, i_to_r)
    for n in range(3):
        msg = b"from flatnet %d" % n
        assert theirs.decrypt(send.encrypt_with_ad(b"", msg)) == msg
        reply = b"from noiseprotocol %d" % n
        assert recv.decrypt_with_ad(b"", theirs.encrypt(reply)) == reply
