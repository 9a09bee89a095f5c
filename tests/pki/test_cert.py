"""Certificates: wire format round trip, every refusal reason, strict decoding of hostile bytes."""

from __future__ import annotations

import dataclasses
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from flatnet.pki.cert import (
    REASONS,
    Certificate,
    CertificateError,
    TrustStore,
    new_ca,
    sign_host,
)
from flatnet.pki.files import x25519_public_bytes

T0 = 1_800_000_000
YEAR = 365 * 86400


def host_key() -> bytes:
    return x25519_public_bytes(X25519PrivateKey.generate())


@pytest.fixture(scope="module")
def ca():
    return new_ca("Acme office", not_before=T0, not_after=T0 + YEAR)


@pytest.fixture(scope="module")
def alice(ca):
    ca_cert, ca_key = ca
    return sign_host(
        ca_cert,
        ca_key,
        "wsl-alice",
        "10.87.1.1/16",
        ["10.87.1.0/24"],
        ["dev", "ops"],
        host_key(),
        not_before=T0,
        not_after=T0 + 30 * 86400,
    )


def test_host_certificate_round_trips_with_every_field(ca, alice):
    ca_cert, _ = ca
    decoded = Certificate.decode(alice.encode())
    assert decoded == alice
    assert decoded.name == "wsl-alice"
    assert decoded.ip == IPv4Interface("10.87.1.1/16")
    assert decoded.subnets == (IPv4Network("10.87.1.0/24"),)
    assert decoded.groups == ("dev", "ops")
    assert (decoded.not_before, decoded.not_after) == (T0, T0 + 30 * 86400)
    assert decoded.is_ca is False
    assert decoded.issuer == ca_cert.fingerprint()
    assert len(decoded.fingerprint()) == 32
    assert decoded.fingerprint() == alice.fingerprint() != ca_cert.fingerprint()


def test_ca_certificate_round_trips_and_is_self_signed(ca):
    ca_cert, _ = ca
    assert ca_cert.is_ca and ca_cert.issuer == b"" and ca_cert.subnets == ()
    assert Certificate.decode(ca_cert.encode()) == ca_cert
    assert ca_cert.verify_signature(ca_cert.public_key)


def test_layout_is_the_documented_msgpack_array(alice):
    version, details, signature = msgpack.unpackb(alice.encode())
    assert version == 1 and len(signature) == 64
    assert details[0] == "wsl-alice"
    assert details[1] == bytes([10, 87, 1, 1]) and details[2] == 16
    assert details[3] == [[bytes([10, 87, 1, 0]), 24]]
    assert alice.to_be_signed() == msgpack.packb([1, details])


def test_trusted_host_certificate_verifies(ca, alice):
    TrustStore([ca[0]]).verify(alice, T0 + 10)
    TrustStore([ca[0]]).verify(alice, T0)  # validity bounds are inclusive
    TrustStore([ca[0]]).verify(alice, alice.not_after)


def test_allows_source_own_address_and_subnets_only(alice):
    assert alice.allows_source(IPv4Address("10.87.1.1"))
    assert alice.allows_source("10.87.1.77")
    assert alice.allows_source(bytes([10, 87, 1, 255]))
    assert alice.allows_source(int(IPv4Address("10.87.1.0")))
    assert not alice.allows_source("10.87.2.1")
    assert not alice.allows_source("10.87.0.1")  # inside the /16 of its address, but not its own
    assert not alice.allows_source(b"\x0a\x57\x01")  # not 4 bytes


# -- every reason ------------------------------------------------------------------------------------


def refusal(store: TrustStore, cert: Certificate, now: float) -> str:
    with pytest.raises(CertificateError) as info:
        store.verify(cert, now)
    return info.value.reason


def test_reason_malformed():
    with pytest.raises(CertificateError) as info:
        Certificate.decode(b"\x93\x01")
    assert info.value.reason == "malformed"


def test_reason_bad_signature_when_a_field_is_changed(ca, alice):
    forged = dataclasses.replace(alice, subnets=(IPv4Network("10.87.0.0/16"),))
    assert refusal(TrustStore([ca[0]]), forged, T0 + 10) == "bad-signature"


def test_reason_bad_signature_when_signed_by_another_key_claiming_the_ca(ca):
    ca_cert, _ = ca
    impostor_cert, impostor_key = new_ca("Acme office", not_before=T0, not_after=T0 + YEAR)
    # The impostor signs with its own key but names the real CA as issuer.
    forged = sign_host(
        impostor_cert, impostor_key, "mallory", "10.87.9.1/16", [], [], host_key(), T0, T0 + 99
    )
    forged = dataclasses.replace(forged, issuer=ca_cert.fingerprint())
    forged = dataclasses.replace(forged, signature=impostor_key.sign(forged.to_be_signed()))
    assert refusal(TrustStore([ca_cert]), forged, T0 + 10) == "bad-signature"


def test_reason_unknown_issuer(ca, alice):
    other_ca, _ = new_ca("Other team", not_before=T0, not_after=T0 + YEAR)
    assert refusal(TrustStore([other_ca]), alice, T0 + 10) == "unknown-issuer"


def test_reason_expired_and_not_yet_valid(ca, alice):
    store = TrustStore([ca[0]])
    assert refusal(store, alice, alice.not_after + 1) == "expired"
    assert refusal(store, alice, alice.not_after + 0.001) == "expired"
    assert refusal(store, alice, T0 - 1) == "not-yet-valid"


def test_the_cas_own_validity_is_applied_even_if_the_host_cert_says_otherwise(ca):
    ca_cert, ca_key = ca
    cert = sign_host(ca_cert, ca_key, "h", "10.87.3.1/16", [], [], host_key(), T0, T0 + 100)
    # sign_host will not issue beyond the CA's validity; a CA key holder could still do it by hand.
    beyond = dataclasses.replace(cert, not_before=T0 - 100, not_after=T0 + 2 * YEAR)
    beyond = dataclasses.replace(beyond, signature=ca_key.sign(beyond.to_be_signed()))
    store = TrustStore([ca_cert])
    store.verify(beyond, T0 + 50)
    assert refusal(store, beyond, T0 + YEAR + 1) == "expired"
    assert refusal(store, beyond, T0 - 50) == "not-yet-valid"


def test_reason_blocklisted_host_and_blocklisted_ca(ca, alice):
    ca_cert, _ = ca
    assert refusal(TrustStore([ca_cert], blocklist=[alice.fingerprint()]), alice, T0 + 10) == "blocklisted"
    assert refusal(TrustStore([ca_cert], blocklist=[ca_cert.fingerprint()]), alice, T0 + 10) == "blocklisted"
    store = TrustStore([ca_cert])
    store.verify(alice, T0 + 10)
    store.block(alice.fingerprint())
    assert store.is_blocked(alice.fingerprint())
    assert refusal(store, alice, T0 + 10) == "blocklisted"


def test_reason_not_a_ca(ca, alice):
    with pytest.raises(CertificateError) as info:
        TrustStore([alice])
    assert info.value.reason == "not-a-ca"
    with pytest.raises(CertificateError) as info:
        sign_host(alice, ca[1], "x", "10.87.5.1/16", [], [], host_key(), T0, T0 + 10)
    assert info.value.reason == "not-a-ca"


def test_reason_is_a_ca(ca):
    assert refusal(TrustStore([ca[0]]), ca[0], T0 + 10) == "is-a-ca"


def test_reason_outside_ca_constraints():
    ca_cert, ca_key = new_ca(
        "net", not_before=T0, not_after=T0 + YEAR, groups=["dev"], network="10.87.0.0/16"
    )
    good = sign_host(ca_cert, ca_key, "h", "10.87.4.1/16", ["10.87.4.0/24"], ["dev"], host_key(), T0, T0 + 9)
    TrustStore([ca_cert]).verify(good, T0)
    with pytest.raises(ValueError, match="outside"):
        sign_host(ca_cert, ca_key, "h", "10.88.4.1/16", [], [], host_key(), T0, T0 + 9)
    with pytest.raises(ValueError, match="outside"):
        sign_host(ca_cert, ca_key, "h", "10.87.4.1/16", ["192.168.0.0/24"], [], host_key(), T0, T0 + 9)
    with pytest.raises(ValueError, match="groups"):
        sign_host(ca_cert, ca_key, "h", "10.87.4.1/16", [], ["ops"], host_key(), T0, T0 + 9)
    # A CA key that signs outside its own constraints anyway is refused at verification.
    rogue = dataclasses.replace(good, subnets=(IPv4Network("192.168.0.0/24"),))
    rogue = dataclasses.replace(rogue, signature=ca_key.sign(rogue.to_be_signed()))
    assert refusal(TrustStore([ca_cert]), rogue, T0) == "outside-ca-constraints"


def test_every_reason_is_exercised_above():
    # Keeps this file honest when a reason is added.
    assert {
        "malformed",
        "bad-signature",
        "unknown-issuer",
        "expired",
        "not-yet-valid",
        "blocklisted",
        "not-a-ca",
        "is-a-ca",
        "outside-ca-constraints",
    } == REASONS
    with pytest.raises(ValueError):
        CertificateError("no-such-reason")


def test_trust_store_refuses_a_ca_with_a_bad_self_signature(ca):
    ca_cert, _ = ca
    forged = dataclasses.replace(ca_cert, name="Evil office")
    with pytest.raises(CertificateError) as info:
        TrustStore([forged])
    assert info.value.reason == "bad-signature"


# -- signing rules -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ip", "subnets", "why"),
    [
        ("10.87.0.0/16", [], "network or broadcast"),
        ("10.87.255.255/16", [], "network or broadcast"),
        ("0.0.0.0/16", [], "usable"),
        ("224.0.0.1/8", [], "usable"),
        ("10.87.1.1/0", [], "prefix"),
        ("10.87.1.1/16", ["0.0.0.0/0"], "every source"),
        ("10.87.1.1/16", ["10.87.1.1/24"], "host bits"),
        ("10.87.1.1/16", ["10.87.1.0/24", "10.87.1.0/24"], "repeated"),
    ],
)
def test_sign_host_refuses_insane_addresses(ca, ip, subnets, why):
    with pytest.raises(ValueError, match=why):
        sign_host(*ca, "h", ip, subnets, [], host_key(), T0, T0 + 10)


def test_sign_host_validity_must_lie_within_the_cas(ca):
    with pytest.raises(ValueError, match="within"):
        sign_host(*ca, "h", "10.87.1.1/16", [], [], host_key(), T0 - 1, T0 + 10)
    with pytest.raises(ValueError, match="within"):
        sign_host(*ca, "h", "10.87.1.1/16", [], [], host_key(), T0, T0 + YEAR + 1)


def test_sign_host_refuses_a_key_that_is_not_the_cas(ca):
    _, other_key = new_ca("other", not_before=T0, not_after=T0 + YEAR)
    with pytest.raises(ValueError, match="does not match"):
        sign_host(ca[0], other_key, "h", "10.87.1.1/16", [], [], host_key(), T0, T0 + 10)


@pytest.mark.parametrize(
    ("name", "groups", "public_key"),
    [("", [], None), ("a\nb", [], None), ("h", ["a,b"], None), ("h", ["a", "a"], None), ("h", [], b"short")],
)
def test_sign_host_refuses_bad_names_groups_and_keys(ca, name, groups, public_key):
    with pytest.raises(ValueError):
        sign_host(*ca, name, "10.87.1.1/16", [], groups, public_key or host_key(), T0, T0 + 10)


# -- hostile bytes -----------------------------------------------------------------------------------


def test_non_canonical_re_encoding_is_refused(alice):
    """Same fields and signature, different bytes -> a different fingerprint: must not decode."""
    version, details, signature = msgpack.unpackb(alice.encode())
    # 1 as a uint32 instead of a fixint: valid msgpack, same value, different bytes.
    reencoded = b"\x93" + b"\xce\x00\x00\x00\x01" + alice.encode()[2:]
    assert msgpack.unpackb(reencoded) == [version, details, signature]
    with pytest.raises(CertificateError) as info:
        Certificate.decode(reencoded)
    assert info.value.reason == "malformed"
    with pytest.raises(CertificateError):
        Certificate.decode(alice.encode() + b"\x00")  # trailing byte


@pytest.mark.parametrize(
    "value",
    [
        None,
        1,
        "text",
        [],
        {},
        [1, [], b""],
        [2, [], b"x" * 64],
        [1, ["n", b"\x0a\x57\x01\x01", 16, [], [], 0, 1, b"k" * 32, False, b"i" * 32, "extra"], b"s" * 64],
        [1, ["n", b"\x0a\x57\x01\x01", 33, [], [], 0, 1, b"k" * 32, False, b"i" * 32], b"s" * 64],
        [1, ["n", b"\x0a\x57\x01\x01", 16, [[b"\x0a", 8]], [], 0, 1, b"k" * 32, False, b"i" * 32], b"s" * 64],
        [1, ["n", b"\x0a\x57\x01\x01", 16, [], [1], 0, 1, b"k" * 32, False, b"i" * 32], b"s" * 64],
        [1, ["n", b"\x0a\x57\x01\x01", 16, [], [], 5, 1, b"k" * 32, False, b"i" * 32], b"s" * 64],
        [1, ["n", b"\x0a\x57\x01\x01", 16, [], [], 0, 1, b"k" * 32, 1, b"i" * 32], b"s" * 64],
        [1, ["n", b"\x0a\x57\x01\x01", 16, [], [], -1, 1, b"k" * 32, False, b"i" * 32], b"s" * 64],
        [
            1,
            ["n", b"\x0a\x57\x01\x01", 16, [], [], 0, 1, b"k" * 32, False, b""],
            b"s" * 64,
        ],  # host, no issuer
        [1, ["n", b"\x0a\x57\x01\x01", 16, [], [], 0, 1.0, b"k" * 32, False, b"i" * 32], b"s" * 64],
        [1, {"name": "n"}, b"s" * 64],
    ],
)
def test_structurally_wrong_values_are_malformed(value):
    with pytest.raises(CertificateError) as info:
        Certificate.decode(msgpack.packb(value, use_bin_type=True))
    assert info.value.reason == "malformed"


def test_the_well_formed_value_used_above_does_decode():
    # The parametrized cases each break one thing of this otherwise well-formed certificate.
    good = [1, ["n", b"\x0a\x57\x01\x01", 16, [], [], 0, 1, b"k" * 32, False, b"i" * 32], b"s" * 64]
    cert = Certificate.decode(msgpack.packb(good, use_bin_type=True))
    assert cert.name == "n" and cert.ip == IPv4Interface("10.87.1.1/16")


@given(st.binary(max_size=400))
def test_arbitrary_bytes_only_ever_raise_certificate_error(data):
    try:
        Certificate.decode(data)
    except CertificateError as exc:
        assert exc.reason == "malformed"


def test_decode_refuses_non_bytes_with_certificate_error():
    for value in (None, "text", 7):
        with pytest.raises(CertificateError):
            Certificate.decode(value)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(position=st.integers(min_value=0), bit=st.integers(min_value=0, max_value=7))
def test_a_flipped_bit_anywhere_never_yields_a_trusted_certificate(ca, alice, position, bit):
    encoded = bytearray(alice.encode())
    encoded[position % len(encoded)] ^= 1 << bit
    store = TrustStore([ca[0]])
    with pytest.raises(CertificateError):
        store.verify(Certificate.decode(bytes(encoded)), T0 + 10)


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_truncated_or_spliced_bytes_never_yield_a_trusted_certificate(ca, alice, data):
    encoded = alice.encode()
    cut = data.draw(st.integers(min_value=0, max_value=len(encoded) - 1))
    tail = data.draw(st.binary(max_size=8))
    assume(encoded[:cut] + tail != encoded)
    store = TrustStore([ca[0]])
    with pytest.raises(CertificateError):
        store.verify(Certificate.decode(encoded[:cut] + tail), T0 + 10)


msgpack_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=70)
)
msgpack_values = msgpack_scalars | st.lists(
    msgpack_scalars | st.lists(msgpack_scalars, max_size=3), max_size=4
)


@settings(max_examples=150, deadline=None)
@given(st.lists(msgpack_values, min_size=3, max_size=3), st.lists(msgpack_values, min_size=10, max_size=10))
def test_well_formed_msgpack_of_any_shape_only_ever_raises_certificate_error(outer, details):
    # Arrays shaped like a certificate reach the field checks that arbitrary bytes rarely reach.
    for value in (outer, [1, details, outer[2]]):
        try:
            Certificate.decode(msgpack.packb(value, use_bin_type=True))
        except CertificateError as exc:
            assert exc.reason == "malformed"
