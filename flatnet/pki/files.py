"""PKI files on disk: PEM-like armored certificates and keys, and the fingerprint blocklist.

Armor (as nebula's)::

    -----BEGIN FLATNET CERTIFICATE-----
    <base64 of the msgpack certificate, 64 characters a line>
    -----END FLATNET CERTIFICATE-----

Kinds: ``FLATNET CERTIFICATE`` (a file may hold several, e.g. a CA bundle during a CA rotation),
``FLATNET ED25519 PRIVATE KEY`` (a CA's 32-byte seed), ``FLATNET X25519 PRIVATE KEY`` and
``FLATNET X25519 PUBLIC KEY`` (a host's Noise static key pair, raw 32 bytes each).

Writing: private keys are created with mode 0600 (never widened for an instant: the file is created
with that mode). An existing file is never overwritten unless ``force=True``; then the new content
goes to a temporary file beside it, renamed over the old one.

Blocklist: one hex SHA-256 certificate fingerprint per line; ``#`` starts a comment; blank lines are
ignored. A bad line raises :class:`PkiFileError` naming the file and line.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from flatnet.pki.cert import FINGERPRINT_SIZE, Certificate
from flatnet.pki.errors import CertificateError, PkiFileError

CERTIFICATE = "FLATNET CERTIFICATE"
CA_PRIVATE_KEY = "FLATNET ED25519 PRIVATE KEY"
HOST_PRIVATE_KEY = "FLATNET X25519 PRIVATE KEY"
HOST_PUBLIC_KEY = "FLATNET X25519 PUBLIC KEY"
KINDS = (CERTIFICATE, CA_PRIVATE_KEY, HOST_PRIVATE_KEY, HOST_PUBLIC_KEY)

SECRET_MODE = 0o600
PUBLIC_MODE = 0o644
_LINE = 64
_BLOCK = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----\s*(.*?)\s*-----END ([A-Z0-9 ]+)-----", re.DOTALL)


# -- armor -----------------------------------------------------------------------------------------


def armor(kind: str, data: bytes) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown armor kind {kind!r}")
    body = base64.b64encode(data).decode("ascii")
    lines = [body[i : i + _LINE] for i in range(0, len(body), _LINE)]
    return f"-----BEGIN {kind}-----\n" + "".join(line + "\n" for line in lines) + f"-----END {kind}-----\n"


def unarmor_all(text: str, kind: str, source: str = "<text>") -> list[bytes]:
    """The payloads of every *kind* block in *text* (blocks of other kinds are an error)."""
    blocks = []
    for match in _BLOCK.finditer(text):
        begin, body, end = match.groups()
        line = text.count("\n", 0, match.start()) + 1
        if begin != end:
            raise PkiFileError(source, f"BEGIN {begin} closed by END {end}", line)
        if begin != kind:
            raise PkiFileError(source, f"expected {kind}, found {begin}", line)
        try:
            blocks.append(base64.b64decode("".join(body.split()), validate=True))
        except (binascii.Error, ValueError):
            raise PkiFileError(source, f"bad base64 in {kind}", line) from None
    if not blocks:
        raise PkiFileError(source, f"no {kind} block found")
    return blocks


def unarmor(text: str, kind: str, source: str = "<text>") -> bytes:
    """The payload of the single *kind* block in *text*."""
    blocks = unarmor_all(text, kind, source)
    if len(blocks) != 1:
        raise PkiFileError(source, f"expected one {kind}, found {len(blocks)}")
    return blocks[0]


# -- writing ---------------------------------------------------------------------------------------


def write_file(path: str | os.PathLike, text: str, *, secret: bool, force: bool = False) -> None:
    """Write *text* to *path*: mode 0600 if *secret*, else 0644. Refuses an existing file
    (FileExistsError) unless *force*."""
    path = Path(path)
    mode = SECRET_MODE if secret else PUBLIC_MODE
    data = text.encode("ascii")
    if not force:
        # O_EXCL: refusing and creating are one atomic step, and the mode is set at creation.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            os.fchmod(fd, mode)  # the umask may have narrowed it; never widens a secret
            os.write(fd, data)
        finally:
            os.close(fd)
        return
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.close(fd)
        fd = -1
        os.replace(temporary, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def write_certificate(path, cert: Certificate, *, force: bool = False) -> None:
    write_file(path, armor(CERTIFICATE, cert.encode()), secret=False, force=force)


def write_ca_key(path, key: Ed25519PrivateKey, *, force: bool = False) -> None:
    raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    write_file(path, armor(CA_PRIVATE_KEY, raw), secret=True, force=force)


def write_host_key(path, key: X25519PrivateKey, *, force: bool = False) -> None:
    raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    write_file(path, armor(HOST_PRIVATE_KEY, raw), secret=True, force=force)


def write_public_key(path, public_key: bytes, *, force: bool = False) -> None:
    write_file(path, armor(HOST_PUBLIC_KEY, public_key), secret=False, force=force)


def x25519_public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


# -- reading ---------------------------------------------------------------------------------------


def _read_text(path) -> str:
    try:
        return Path(path).read_text(encoding="ascii")
    except UnicodeDecodeError:
        raise PkiFileError(str(path), "not an armored text file") from None
    except OSError as exc:
        raise PkiFileError(str(path), exc.strerror or str(exc)) from None


def load_certificates(path) -> list[Certificate]:
    """Every certificate in *path* (a CA bundle may hold several)."""
    source = str(path)
    certs = []
    for data in unarmor_all(_read_text(path), CERTIFICATE, source):
        try:
            certs.append(Certificate.decode(data))
        except CertificateError as exc:
            raise PkiFileError(source, f"bad certificate: {exc}") from None
    return certs


def load_certificate(path) -> Certificate:
    certs = load_certificates(path)
    if len(certs) != 1:
        raise PkiFileError(str(path), f"expected one certificate, found {len(certs)}")
    return certs[0]


def _raw_key(path, kind: str) -> bytes:
    raw = unarmor(_read_text(path), kind, str(path))
    if len(raw) != 32:
        raise PkiFileError(str(path), f"{kind} must be 32 bytes, found {len(raw)}")
    return raw


def load_ca_key(path) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(_raw_key(path, CA_PRIVATE_KEY))


def load_host_key(path) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(_raw_key(path, HOST_PRIVATE_KEY))


def load_public_key(path) -> bytes:
    return _raw_key(path, HOST_PUBLIC_KEY)


# -- blocklist -------------------------------------------------------------------------------------


def parse_fingerprint(text: str) -> bytes:
    """A hex SHA-256 fingerprint (64 hex digits, ``:`` separators allowed) -> 32 bytes; ValueError."""
    cleaned = text.strip().replace(":", "").lower()
    if len(cleaned) != 2 * FINGERPRINT_SIZE or not re.fullmatch(r"[0-9a-f]+", cleaned):
        raise ValueError(f"{text.strip()!r} is not a 64-digit hex SHA-256 fingerprint")
    return bytes.fromhex(cleaned)


def parse_blocklist(text: str, source: str = "<blocklist>") -> frozenset[bytes]:
    fingerprints = set()
    for number, line in enumerate(text.splitlines(), start=1):
        content = line.split("#", 1)[0].strip()
        if not content:
            continue
        try:
            fingerprints.add(parse_fingerprint(content))
        except ValueError as exc:
            raise PkiFileError(source, str(exc), number) from None
    return frozenset(fingerprints)


def load_blocklist(path) -> frozenset[bytes]:
    """The fingerprints in blocklist file *path* (for ``TrustStore(cas, blocklist=...)``)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PkiFileError(str(path), getattr(exc, "strerror", None) or str(exc)) from None
    return parse_blocklist(text, str(path))
