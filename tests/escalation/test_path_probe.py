"""The path probe wire format: round trip, MAC, and every way a bad datagram is refused."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from flatnet.proto.path_probe import (
    KIND_PING,
    KIND_PONG,
    PROBE_SIZE,
    PathProbeError,
    check_path_probe,
    derive_probe_key,
    encode_path_probe,
    is_path_probe,
    parse_path_probe,
)

A, B, C = IPv4Address("10.87.1.1"), IPv4Address("10.87.2.1"), IPv4Address("10.87.3.1")


def keys():
    ka, kb = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    pa, pb = ka.public_key().public_bytes_raw(), kb.public_key().public_bytes_raw()
    return ka, kb, pa, pb


def test_both_ends_derive_the_same_key_and_a_third_party_does_not():
    ka, kb, pa, pb = keys()
    k_ab = derive_probe_key(ka, A, pb, B)
    assert k_ab == derive_probe_key(kb, B, pa, A)
    kc = X25519PrivateKey.generate()
    assert derive_probe_key(kc, C, pb, B) != k_ab


def test_round_trip_and_mac():
    ka, kb, pa, pb = keys()
    key = derive_probe_key(ka, A, pb, B)
    data = encode_path_probe(KIND_PING, A, B, b"12345678", key)
    assert len(data) == PROBE_SIZE and is_path_probe(data)
    probe = parse_path_probe(data)
    assert (probe.kind, probe.sender, probe.nonce) == (KIND_PING, A, b"12345678")
    assert check_path_probe(probe, derive_probe_key(kb, B, pa, A), B)
    assert not check_path_probe(probe, key, A)  # bound to the receiver: cannot be reflected back
    pong = parse_path_probe(encode_path_probe(KIND_PONG, B, A, b"12345678", key))
    assert pong.kind == KIND_PONG and check_path_probe(pong, key, A)


def test_every_flipped_bit_is_refused():
    ka, _, _, pb = keys()
    key = derive_probe_key(ka, A, pb, B)
    data = encode_path_probe(KIND_PING, A, B, b"nonce-01", key)
    for bit in range(8, PROBE_SIZE * 8):  # the type byte is what routes it here at all
        tampered = bytearray(data)
        tampered[bit // 8] ^= 1 << (bit % 8)
        try:
            probe = parse_path_probe(bytes(tampered))
        except PathProbeError:
            continue
        assert not check_path_probe(probe, key, B), bit


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xfc", "size"),
        (b"\xfc" + bytes(40), "size"),
        (b"\xfc\x02" + bytes(30), "unsupported-version"),
        (b"\xfc\x01\x07" + bytes(29), "unknown-kind"),
    ],
)
def test_malformed_probes(data, reason):
    with pytest.raises(PathProbeError) as info:
        parse_path_probe(data)
    assert info.value.reason == reason


@given(st.binary(max_size=64))
def test_parse_raises_only_its_own_error(data):
    try:
        parse_path_probe(data)
    except PathProbeError:
        pass
