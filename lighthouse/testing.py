"""Stand-ins for tests and the benchmark: a certificate with just what the lighthouse reads.

The lighthouse core only sees certificates the tunnel has already verified, so tests need no
signatures: :class:`CertificateStandIn` has the attributes of ``flatnet.pki.cert.Certificate``
that :class:`lighthouse.core.NodeCertificate` names. Tests that run the real tunnel use real
certificates instead.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network


@dataclass(frozen=True)
class CertificateStandIn:
    name: str
    ip: IPv4Interface
    subnets: tuple[IPv4Network, ...] = ()
    groups: tuple[str, ...] = ()
    serial: int = 0  # a re-issued certificate for the same host differs here (and in fingerprint)
    _fingerprint: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        digest = hashlib.sha256(f"{self.name}|{self.ip}|{self.subnets}|{self.serial}".encode()).digest()
        object.__setattr__(self, "_fingerprint", digest)

    def fingerprint(self) -> bytes:
        return self._fingerprint

    def allows_source(self, ip: IPv4Address) -> bool:
        return ip == self.ip.ip or any(ip in net for net in self.subnets)


def host_certificate(n: int, serial: int = 0, extra_subnets: tuple[str, ...] = ()) -> CertificateStandIn:
    """Host *n* (1..65535 with n % 256 != 0 for the /24 scheme): 10.87.<n>.1/16 routing 10.87.<n>.0/24,
    for n < 256 - as the Flatnet plan lays hosts out; larger n (the benchmark) get 10.x.y.1 with a /24."""
    if n < 256:
        ip = IPv4Interface(f"10.87.{n}.1/16")
        subnet = IPv4Network(f"10.87.{n}.0/24")
    else:
        ip = IPv4Interface(f"10.{(n >> 8) & 255}.{n & 255}.1/8")
        subnet = IPv4Network(f"10.{(n >> 8) & 255}.{n & 255}.0/24")
    subnets = (subnet, *(IPv4Network(s) for s in extra_subnets))
    return CertificateStandIn(f"host-{n}", ip, subnets, serial=serial)
