"""Every error type of ``flatnet.pki``, in one place.

- :class:`CertificateError`: a certificate cannot be decoded or is not to be trusted. ``reason`` is
  one of :data:`REASONS` (stable strings: the tunnel uses them as metric labels).
- :class:`PkiFileError`: an armored file or a blocklist cannot be read; names the file and line.
- Refusing to overwrite an existing file raises the built-in :class:`FileExistsError`.
"""

from __future__ import annotations

REASONS = frozenset(
    {
        "malformed",  # not a certificate in our wire format (any decoding problem at all)
        "bad-signature",  # the issuer's key did not sign these bytes
        "unknown-issuer",  # the issuer fingerprint names no CA in the trust store
        "expired",  # now > not_after (of the certificate or of its CA)
        "not-yet-valid",  # now < not_before (of the certificate or of its CA)
        "blocklisted",  # the certificate's (or its CA's) fingerprint is on the blocklist
        "not-a-ca",  # used as a CA but is_ca is false
        "is-a-ca",  # presented as a host certificate but is_ca is true
        "outside-ca-constraints",  # address, subnet or group the CA does not permit
    }
)


class CertificateError(Exception):
    """A certificate was refused; ``reason`` says why (one of :data:`REASONS`)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown CertificateError reason {reason!r}")
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class PkiFileError(Exception):
    """An armored PKI file or a blocklist could not be read."""

    def __init__(self, source: str, message: str, line: int | None = None) -> None:
        self.source = source
        self.line = line
        where = f"{source}:{line}" if line is not None else source
        super().__init__(f"{where}: {message}")
