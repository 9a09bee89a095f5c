"""The generic Noise layer against the published cacophony vectors (read in place from ../shared)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from flatnet.proto.errors import NoiseError
from flatnet.proto.noise import HandshakeState, ProtocolName

VECTORS_FILE = Path(__file__).resolve().parents[2] / ".." / "shared" / "vectors" / "noise-cacophony-25519-chachapoly.json"


def _load():
    if not VECTORS_FILE.exists():
        return []
    return json.loads(VECTORS_FILE.read_text())["vectors"]


VECTORS = _load()
pytestmark = pytest.mark.skipif(not VECTORS, reason=f"Noise vectors not found at {VECTORS_FILE} (shared/ beside the repo)")


def _supported(v) -> bool:
    try:
        ProtocolName.parse(v["protocol_name"])
    except NoiseError:
        return False
    return True


def _key(v, name):
    return X25519PrivateKey.from_private_bytes(bytes.fromhex(v[name])) if name in v else None


def _pub(v, name):
    return bytes.fromhex(v[name]) if name in v else None


def test_we_support_every_pattern_in_the_file():
    unsupported = [v["protocol_name"] for v in VECTORS if not _supported(v)]
    assert unsupported == []
    names = {v["protocol_name"].split("_")[1] for v in VECTORS}
    assert {"NN", "XX", "IX", "IK", "NK", "KK", "XK"} <= names


@pytest.mark.parametrize("vector", VECTORS, ids=[v["protocol_name"] for v in VECTORS])
def test_vector(vector):
    v = vector
    init = HandshakeState(
        v["protocol_name"], True, bytes.fromhex(v["init_prologue"]),
        s=_key(v, "init_static"), e=_key(v, "init_ephemeral"), rs=_pub(v, "init_remote_static"),
        psks=[bytes.fromhex(p) for p in v.get("init_psks", [])],
    )
    resp = HandshakeState(
        v["protocol_name"], False, bytes.fromhex(v["resp_prologue"]),
        s=_key(v, "resp_static"), e=_key(v, "resp_ephemeral"), rs=_pub(v, "resp_remote_static"),
        psks=[bytes.fromhex(p) for p in v.get("resp_psks", [])],
    )
    one_way = init.protocol.pattern.one_way
    ciphers = None
    for i, msg in enumerate(v["messages"]):
        payload, expected = bytes.fromhex(msg["payload"]), bytes.fromhex(msg["ciphertext"])
        from_initiator = one_way or i % 2 == 0
        if not init.finished:
            writer, reader = (init, resp) if from_initiator else (resp, init)
            assert writer.write_message(payload) == expected, f"message {i}"
            assert reader.read_message(expected) == payload
            if init.finished:
                assert resp.finished
                assert init.handshake_hash == resp.handshake_hash == bytes.fromhex(v["handshake_hash"])
                i_to_r, r_to_i = init.split()
                ri, rr = resp.split()
                ciphers = {True: (i_to_r, ri), False: (r_to_i, rr)}
        else:
            send, recv = ciphers[from_initiator]
            assert send.encrypt_with_ad(b"", payload) == expected, f"transport message {i}"
            assert recv.decrypt_with_ad(b"", expected) == payload
    assert init.finished
