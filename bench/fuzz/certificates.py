"""Certificate decoding: a peer's certificate arrives inside its handshake, before anything trusts it.

Inputs: real CA and host certificates encoded, then mutated as msgpack values and as bytes, plus
random bytes. Contract: :meth:`Certificate.decode` raises only ``CertificateError``; whatever
decodes is then verified against the trust store, which also raises only ``CertificateError`` —
and a mutated certificate that verifies must be byte-identical to a genuine one.
"""

from __future__ import annotations

import random

import msgpack

from bench.fuzz.campaign import Surface, mutate_bytes, mutate_structure, random_bytes
from bench.fuzz.identities import make_ca, make_identity
from flatnet.pki.cert import Certificate, CertificateError, TrustStore

NOW = 1_800_000_000.0


class CertificateSurface(Surface):
    name = "certificates"
    description = "Certificate.decode + TrustStore.verify"

    def setup(self, rng: random.Random) -> None:
        ca = make_ca()
        other = make_ca("other-ca")
        certs = [ca[0], other[0]] + [make_identity(ca, f"h{n}", f"10.87.{n}.1/16", [f"10.87.{n}.0/24"])[0]
                                     for n in range(1, 4)]
        certs.append(make_identity(other, "stranger", "10.87.9.1/16")[0])
        self.trust = TrustStore([ca[0]])
        self.seeds = [c.encode() for c in certs]
        self.genuine = {c.encode() for c in certs}
        self.decoded_seeds = [msgpack.unpackb(s, raw=False) for s in self.seeds]
        self.decoded = self.verified = 0

    def generate(self, rng: random.Random) -> bytes:
        r = rng.random()
        if r < 0.45:
            try:
                return msgpack.packb(mutate_structure(rng.choice(self.decoded_seeds), rng), use_bin_type=True)
            except (ValueError, TypeError, OverflowError):
                return rng.choice(self.seeds)
        if r < 0.9:
            return mutate_bytes(rng.choice(self.seeds), rng, self.seeds)
        return random_bytes(rng, 400)

    def feed(self, data: bytes) -> None:
        try:
            cert = Certificate.decode(data)
        except CertificateError:
            return
        self.decoded += 1
        try:
            self.trust.verify(cert, NOW)
        except CertificateError:
            return
        self.verified += 1
        if cert.encode() not in self.genuine:
            raise AssertionError(f"a forged certificate verified: {cert.describe()}")

    def stats(self) -> dict:
        return {"decoded": self.decoded, "verified": self.verified}
