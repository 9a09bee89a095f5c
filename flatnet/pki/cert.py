"""Flatnet certificates: the one module that knows their wire format.

A certificate binds a host name, its Flatnet address, the container subnets it may route and its
groups to an X25519 public key (the Noise static key), for a period of time, signed with Ed25519 by
the team's CA. A CA certificate is self-signed and carries the CA's Ed25519 public key.

Wire format (msgpack, ``use_bin_type=True``; every field positional, no maps)::

    certificate = [ FORMAT_VERSION, details, signature ]
    details     = [ name,          str   1..MAX_NAME_LENGTH UTF-8 chars, no control chars
                    ip,            bin 4 the host's Flatnet address ...
                    ip_prefix,     int   ... and its prefix length (10.87.1.1/16 -> 0a570101, 16)
                    subnets,       array of [bin 4, int prefix]: networks, host bits zero
                    groups,        array of str: distinct, no commas, whitespace or control chars
                    not_before,    int   Unix seconds, inclusive
                    not_after,     int   Unix seconds, inclusive
                    public_key,    bin 32: X25519 (host) or Ed25519 (CA)
                    is_ca,         bool
                    issuer ]       bin 32: SHA-256 fingerprint of the signing CA; bin 0 if self-signed
    signature   = bin 64: Ed25519 over  msgpack([ FORMAT_VERSION, details ])  ("to-be-signed" bytes)
    fingerprint = SHA-256 of the whole encoded certificate

Decoding is strict: the bytes must be exactly what :meth:`Certificate.encode` would produce for the
decoded value (shortest msgpack integers, no trailing bytes, ...). Without that check one signed
certificate could be re-encoded into many byte strings, each with its own fingerprint, and slip past
the blocklist. Any bad input raises ``CertificateError("malformed")`` and nothing else.

For a CA, ``ip`` is the range every certificate it signs must lie in (address and subnets);
``0.0.0.0/0`` means unconstrained. A CA's non-empty ``groups`` likewise bound its hosts' groups
(as in nebula). A CA has no subnets.

Time is passed in (``now``, Unix seconds): this module never reads a clock.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, replace
from functools import cached_property
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from flatnet.pki.errors import REASONS, CertificateError

__all__ = [
    "REASONS",
    "Certificate",
    "CertificateError",
    "TrustStore",
    "new_ca",
    "sign_host",
    "ed25519_public_bytes",
]

FORMAT_VERSION = 1
PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64
FINGERPRINT_SIZE = 32
MAX_NAME_LENGTH = 253  # a DNS name's limit; host names end up in logs and metrics
MAX_GROUP_LENGTH = 64
MAX_GROUPS = 64
MAX_SUBNETS = 256
MAX_TIME = 2**63 - 1
MAX_CERTIFICATE_SIZE = 16384  # far above any sane certificate; bounds work on hostile input
UNCONSTRAINED = IPv4Interface("0.0.0.0/0")
_BYTES_TYPES = (bytes, bytearray, memoryview)


@dataclass(frozen=True)
class Certificate:
    name: str
    ip: IPv4Interface
    subnets: tuple[IPv4Network, ...]
    groups: tuple[str, ...]
    not_before: int
    not_after: int
    public_key: bytes  # X25519 for hosts, Ed25519 for a CA
    is_ca: bool
    issuer: bytes  # fingerprint of the signing CA; b"" for a self-signed CA
    signature: bytes

    # -- wire format -------------------------------------------------------------------------

    def _details(self) -> list:
        return [
            self.name,
            self.ip.ip.packed,
            self.ip.network.prefixlen,
            [[net.network_address.packed, net.prefixlen] for net in self.subnets],
            list(self.groups),
            self.not_before,
            self.not_after,
            self.public_key,
            self.is_ca,
            self.issuer,
        ]

    def to_be_signed(self) -> bytes:
        """The bytes the issuer signs: the encoding without the signature field."""
        return msgpack.packb([FORMAT_VERSION, self._details()], use_bin_type=True)

    def encode(self) -> bytes:
        return msgpack.packb([FORMAT_VERSION, self._details(), self.signature], use_bin_type=True)

    @cached_property
    def _encoded(self) -> bytes:
        return self.encode()

    @cached_property
    def _fingerprint(self) -> bytes:
        return hashlib.sha256(self._encoded).digest()

    def fingerprint(self) -> bytes:
        """SHA-256 of the full encoding (32 bytes): what issuers and blocklists name."""
        return self._fingerprint

    def fingerprint_hex(self) -> str:
        return self.fingerprint().hex()

    @classmethod
    def decode(cls, data: bytes) -> Certificate:
        """Parse and sanity-check *data*; raises ``CertificateError("malformed")`` on any bad input."""
        try:
            return _decode(data)
        except CertificateError:
            raise
        except Exception as exc:  # noqa: BLE001 - hostile input: one error type, whatever went wrong
            raise CertificateError("malformed", f"{type(exc).__name__}: {exc}") from None

    # -- questions ---------------------------------------------------------------------------

    def valid_at(self, now: float) -> bool:
        return self.not_before <= now <= self.not_after

    @cached_property
    def _source_ranges(self) -> tuple[int, tuple[tuple[int, int], ...]]:
        ranges = tuple((int(net.network_address), int(net.netmask)) for net in self.subnets)
        return int(self.ip.ip), ranges

    def allows_source(self, ip: IPv4Address | bytes | int | str) -> bool:
        """May a packet from this host carry inner source address *ip*? (its own address or a subnet)

        *ip* may be an IPv4Address, 4 raw bytes (straight from a packet header), an int or a string.
        """
        if isinstance(ip, _BYTES_TYPES):
            if len(ip) != 4:
                return False
            value = int.from_bytes(ip, "big")
        elif isinstance(ip, int):
            value = ip
        else:
            value = int(IPv4Address(ip))
        own, ranges = self._source_ranges
        if value == own:
            return True
        for network, mask in ranges:  # noqa: SIM110 - a plain loop: no generator per packet
            if value & mask == network:
                return True
        return False

    def verify_signature(self, issuer_public_key: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(issuer_public_key).verify(self.signature, self.to_be_signed())
        except (InvalidSignature, ValueError):
            return False
        return True

    def describe(self) -> dict:
        """A JSON-friendly view, for ``flatnet cert print --json`` and logs."""
        return {
            "name": self.name,
            "ip": str(self.ip),
            "subnets": [str(n) for n in self.subnets],
            "groups": list(self.groups),
            "not_before": self.not_before,
            "not_after": self.not_after,
            "public_key": self.public_key.hex(),
            "is_ca": self.is_ca,
            "issuer": self.issuer.hex(),
            "fingerprint": self.fingerprint_hex(),
            "signature": self.signature.hex(),
        }


def _decode(data: bytes) -> Certificate:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CertificateError("malformed", "not bytes")
    data = bytes(data)
    if len(data) > MAX_CERTIFICATE_SIZE:
        raise CertificateError("malformed", "too long")
    outer = msgpack.unpackb(
        data,
        raw=False,
        use_list=True,
        strict_map_key=True,
        max_bin_len=MAX_CERTIFICATE_SIZE,
        max_str_len=MAX_CERTIFICATE_SIZE,
        max_array_len=1024,
        max_map_len=0,
        max_ext_len=0,
    )
    if not (isinstance(outer, list) and len(outer) == 3):
        raise CertificateError("malformed", "not a 3-element array")
    version, details, signature = outer
    if type(version) is not int or version != FORMAT_VERSION:
        raise CertificateError("malformed", f"unknown format version {version!r}")
    if not (isinstance(details, list) and len(details) == 10):
        raise CertificateError("malformed", "details is not a 10-element array")
    name, ip_bytes, prefix, subnets_raw, groups_raw, not_before, not_after, public_key, is_ca, issuer = (
        details
    )
    if not isinstance(ip_bytes, bytes) or len(ip_bytes) != 4 or not _is_int(prefix, 0, 32):
        raise CertificateError("malformed", "bad ip")
    ip = IPv4Interface((ip_bytes, prefix))
    if not isinstance(subnets_raw, list):
        raise CertificateError("malformed", "subnets is not an array")
    subnets = []
    for entry in subnets_raw:
        if not (isinstance(entry, list) and len(entry) == 2):
            raise CertificateError("malformed", "bad subnet entry")
        address, length = entry
        if not isinstance(address, bytes) or len(address) != 4 or not _is_int(length, 0, 32):
            raise CertificateError("malformed", "bad subnet entry")
        subnets.append(IPv4Network((address, length), strict=True))
    if not isinstance(groups_raw, list) or not all(isinstance(g, str) for g in groups_raw):
        raise CertificateError("malformed", "groups is not an array of strings")
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_SIZE:
        raise CertificateError("malformed", "bad signature field")
    if not isinstance(is_ca, bool):
        raise CertificateError("malformed", "is_ca is not a bool")
    cert = Certificate(
        name=name,
        ip=ip,
        subnets=tuple(subnets),
        groups=tuple(groups_raw),
        not_before=not_before,
        not_after=not_after,
        public_key=public_key,
        is_ca=is_ca,
        issuer=issuer,
        signature=signature,
    )
    problem = _field_problem(cert)
    if problem:
        raise CertificateError("malformed", problem)
    if cert.encode() != data:
        raise CertificateError("malformed", "not in canonical encoding")
    return cert


def _is_int(value, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high


def _text_problem(value, what: str, max_length: int, extra_forbidden: str = "") -> str | None:
    if not isinstance(value, str) or not 1 <= len(value) <= max_length:
        return f"{what} must be 1..{max_length} characters"
    if any(not ch.isprintable() or ch in extra_forbidden for ch in value):
        return f"{what} {value!r} has forbidden characters"
    return None


def _field_problem(cert: Certificate) -> str | None:
    """Why *cert*'s fields are not a well-formed certificate (None if they are). No trust decisions."""
    problem = _text_problem(cert.name, "name", MAX_NAME_LENGTH)
    if problem:
        return problem
    if not isinstance(cert.ip, IPv4Interface):
        return "ip must be an IPv4Interface"
    if not isinstance(cert.subnets, tuple) or not all(isinstance(n, IPv4Network) for n in cert.subnets):
        return "subnets must be a tuple of IPv4Network"
    if len(cert.subnets) > MAX_SUBNETS or len(set(cert.subnets)) != len(cert.subnets):
        return "too many or repeated subnets"
    if not isinstance(cert.groups, tuple) or len(cert.groups) > MAX_GROUPS:
        return f"groups must be a tuple of at most {MAX_GROUPS} strings"
    for group in cert.groups:
        problem = _text_problem(group, "group", MAX_GROUP_LENGTH, extra_forbidden=", ")
        if problem:
            return problem
    if len(set(cert.groups)) != len(cert.groups):
        return "repeated group"
    if not (_is_int(cert.not_before, 0, MAX_TIME) and _is_int(cert.not_after, 0, MAX_TIME)):
        return "not_before/not_after must be integers in 0..2^63-1"
    if cert.not_before > cert.not_after:
        return "not_before is after not_after"
    if not isinstance(cert.public_key, bytes) or len(cert.public_key) != PUBLIC_KEY_SIZE:
        return "public_key must be 32 bytes"
    if not isinstance(cert.is_ca, bool):
        return "is_ca must be a bool"
    if not isinstance(cert.issuer, bytes) or len(cert.issuer) not in (0, FINGERPRINT_SIZE):
        return "issuer must be empty or a 32-byte fingerprint"
    if cert.is_ca:
        if cert.subnets:
            return "a CA certificate has no subnets"
        if cert.issuer:
            return "a CA certificate is self-signed (empty issuer)"
    else:
        if not cert.issuer:
            return "a host certificate names its issuer"
        problem = _host_address_problem(cert.ip, cert.subnets)
        if problem:
            return problem
    if not isinstance(cert.signature, bytes) or len(cert.signature) != SIGNATURE_SIZE:
        return "signature must be 64 bytes"
    return None


def _host_address_problem(ip: IPv4Interface, subnets: tuple[IPv4Network, ...]) -> str | None:
    if ip.network.prefixlen == 0:
        return f"host address {ip} needs a prefix length of 1..32"
    address = ip.ip
    if (
        address.is_unspecified
        or address.is_multicast
        or address.is_loopback
        or address == IPv4Address("255.255.255.255")
    ):
        return f"{address} is not a usable host address"
    if ip.network.prefixlen <= 30 and address in (ip.network.network_address, ip.network.broadcast_address):
        return f"{address} is the network or broadcast address of {ip.network}"
    for net in subnets:
        if net.prefixlen == 0:
            return "a subnet of 0.0.0.0/0 would let the host claim every source address"
        if net.network_address.is_multicast or net.network_address.is_loopback:
            return f"subnet {net} is multicast or loopback"
    return None


def _as_interface(ip: IPv4Interface | str) -> IPv4Interface:
    if isinstance(ip, IPv4Interface):
        return ip
    result = ipaddress.ip_interface(ip)
    if not isinstance(result, IPv4Interface):
        raise ValueError(f"{ip}: not an IPv4 address")
    return result


def _as_networks(subnets: Iterable[IPv4Network | str]) -> tuple[IPv4Network, ...]:
    result = []
    for net in subnets:
        if not isinstance(net, IPv4Network):
            try:
                net = IPv4Network(net, strict=True)
            except ValueError as exc:
                raise ValueError(f"subnet {net}: {exc}") from None
        result.append(net)
    return tuple(result)


def ed25519_public_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _sign(cert: Certificate, key: Ed25519PrivateKey) -> Certificate:
    signed = replace(cert, signature=key.sign(cert.to_be_signed()))
    problem = _field_problem(signed)
    if problem:
        raise ValueError(problem)
    return signed


def new_ca(
    name: str,
    not_after: int,
    not_before: int = 0,
    groups: Iterable[str] = (),
    network: IPv4Network | str | None = None,
) -> tuple[Certificate, Ed25519PrivateKey]:
    """A new self-signed CA and its Ed25519 private key.

    *groups*, if given, are the only groups its hosts may carry; *network*, if given, the range
    their addresses and subnets must lie in. Raises ValueError for bad arguments.
    """
    key = Ed25519PrivateKey.generate()
    ip = UNCONSTRAINED if network is None else IPv4Interface(str(IPv4Network(network, strict=True)))
    unsigned = Certificate(
        name=name,
        ip=ip,
        subnets=(),
        groups=tuple(groups),
        not_before=int(not_before),
        not_after=int(not_after),
        public_key=ed25519_public_bytes(key),
        is_ca=True,
        issuer=b"",
        signature=bytes(SIGNATURE_SIZE),
    )
    return _sign(unsigned, key), key


def sign_host(
    ca_cert: Certificate,
    ca_key: Ed25519PrivateKey,
    name: str,
    ip: IPv4Interface | str,
    subnets: Iterable[IPv4Network | str],
    groups: Iterable[str],
    public_key: bytes,
    not_before: int,
    not_after: int,
) -> Certificate:
    """A host certificate signed by *ca_cert*/*ca_key*.

    Raises ``CertificateError("not-a-ca")`` if *ca_cert* is not a CA, and ValueError if the key does
    not match the CA, the validity does not lie within the CA's, the addresses are not sane or lie
    outside the CA's constraints.
    """
    if not ca_cert.is_ca:
        raise CertificateError("not-a-ca", f"{ca_cert.name} is not a CA certificate")
    if ed25519_public_bytes(ca_key) != ca_cert.public_key:
        raise ValueError("the CA key does not match the CA certificate")
    not_before, not_after = int(not_before), int(not_after)
    if not_before < ca_cert.not_before or not_after > ca_cert.not_after:
        raise ValueError(
            f"validity {not_before}..{not_after} must lie within the CA's "
            f"{ca_cert.not_before}..{ca_cert.not_after}"
        )
    unsigned = Certificate(
        name=name,
        ip=_as_interface(ip),
        subnets=_as_networks(subnets),
        groups=tuple(groups),
        not_before=not_before,
        not_after=not_after,
        public_key=bytes(public_key),
        is_ca=False,
        issuer=ca_cert.fingerprint(),
        signature=bytes(SIGNATURE_SIZE),
    )
    problem = _field_problem(unsigned) or _constraint_problem(unsigned, ca_cert)
    if problem:
        raise ValueError(problem)
    return _sign(unsigned, ca_key)


def _constraint_problem(cert: Certificate, ca: Certificate) -> str | None:
    allowed = ca.ip.network
    if allowed.prefixlen:
        if cert.ip.ip not in allowed:
            return f"address {cert.ip.ip} is outside the CA's network {allowed}"
        for net in cert.subnets:
            if not net.subnet_of(allowed):
                return f"subnet {net} is outside the CA's network {allowed}"
    if ca.groups:
        extra = sorted(set(cert.groups) - set(ca.groups))
        if extra:
            return f"groups {', '.join(extra)} are not among the CA's groups"
    return None


class TrustStore:
    """The CAs a node trusts and the fingerprints it refuses.

    ``verify(cert, now)`` returns None for a host certificate that chains to a trusted CA, is in
    date (and so is its CA), is not blocklisted (nor is its CA) and lies within its CA's constraints;
    otherwise it raises :class:`CertificateError` with the reason. Building a store from a
    certificate that is not a valid self-signed CA raises ``not-a-ca`` or ``bad-signature``.
    """

    def __init__(self, cas: Iterable[Certificate], blocklist: Iterable[bytes] = ()) -> None:
        self._cas: dict[bytes, Certificate] = {}
        self._blocked: set[bytes] = set()
        for fingerprint in blocklist:
            self.block(fingerprint)
        for ca in cas:
            self.add_ca(ca)

    def add_ca(self, ca: Certificate) -> None:
        if not ca.is_ca:
            raise CertificateError("not-a-ca", f"{ca.name} is not a CA certificate")
        if not ca.verify_signature(ca.public_key):
            raise CertificateError("bad-signature", f"CA {ca.name} is not properly self-signed")
        self._cas[ca.fingerprint()] = ca

    @property
    def cas(self) -> tuple[Certificate, ...]:
        return tuple(self._cas.values())

    def block(self, fingerprint: bytes) -> None:
        fingerprint = bytes(fingerprint)
        if len(fingerprint) != FINGERPRINT_SIZE:
            raise ValueError("a fingerprint is 32 bytes (SHA-256)")
        self._blocked.add(fingerprint)

    def is_blocked(self, fingerprint: bytes) -> bool:
        return fingerprint in self._blocked

    def verify(self, cert: Certificate, now: float) -> None:
        if cert.fingerprint() in self._blocked:
            raise CertificateError("blocklisted", f"{cert.name} {cert.fingerprint_hex()}")
        if cert.is_ca:
            raise CertificateError("is-a-ca", f"{cert.name} is a CA certificate, not a host's")
        ca = self._cas.get(cert.issuer)
        if ca is None:
            raise CertificateError("unknown-issuer", f"issuer {cert.issuer.hex()} is not a trusted CA")
        if cert.issuer in self._blocked:
            raise CertificateError("blocklisted", f"CA {ca.name} {cert.issuer.hex()}")
        if not cert.verify_signature(ca.public_key):
            raise CertificateError("bad-signature", f"{cert.name} is not signed by CA {ca.name}")
        for subject, who in ((ca, f"CA {ca.name}"), (cert, cert.name)):
            if now < subject.not_before:
                raise CertificateError("not-yet-valid", f"{who} is valid from {subject.not_before}")
            if now > subject.not_after:
                raise CertificateError("expired", f"{who} expired at {subject.not_after}")
        problem = _field_problem(cert)
        if problem:
            raise CertificateError("malformed", problem)
        problem = _constraint_problem(cert, ca)
        if problem:
            raise CertificateError("outside-ca-constraints", problem)
