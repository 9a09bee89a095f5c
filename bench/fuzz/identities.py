"""A CA and host identities for the fuzz campaigns (and the simulated week): real certificates."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from flatnet.pki.cert import Certificate, new_ca, sign_host

FAR_FUTURE = 2**40


def make_ca(name: str = "fuzz-ca"):
    return new_ca(name, not_after=FAR_FUTURE)


def make_identity(ca, name: str, ip: str, subnets=(), groups=("hosts",)) -> tuple[Certificate, X25519PrivateKey]:
    ca_cert, ca_key = ca
    key = X25519PrivateKey.generate()
    cert = sign_host(ca_cert, ca_key, name, ip, list(subnets), list(groups),
                     key.public_key().public_bytes_raw(), 0, FAR_FUTURE)
    return cert, key
