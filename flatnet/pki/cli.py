"""`flatnet cert`: the team's CA and host certificates, like ``nebula-cert``.

    flatnet cert ca      --name NAME [--out-crt ca.crt] [--out-key ca.key] [--duration 8760h]
                         [--groups a,b] [--network 10.87.0.0/16] [--force]
    flatnet cert keygen  --out-key host.key --out-pub host.pub [--force]
    flatnet cert sign    --ca-crt ca.crt --ca-key ca.key --name NAME --ip 10.87.1.1/16
                         [--subnets 10.87.1.0/24] [--groups a,b] [--in-pub host.pub]
                         [--out-crt NAME.crt] [--out-key NAME.key] [--duration 720h] [--force]
    flatnet cert print   [--json] FILE
    flatnet cert verify  --ca ca.crt [--blocklist FILE] host.crt     (exit 0 valid, 1 refused)
    flatnet cert fingerprint FILE

This is the one place of the PKI that reads the clock (``now()`` below; tests replace it).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from datetime import UTC, datetime

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from flatnet.errors import UserError
from flatnet.pki import files
from flatnet.pki.cert import Certificate, CertificateError, TrustStore, new_ca, sign_host
from flatnet.pki.errors import PkiFileError


def now() -> float:
    return time.time()


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(d|h|m|s)")
_UNIT_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_duration(text: str) -> int:
    """Go-style durations as nebula-cert takes them: ``8760h``, ``1h30m``, ``90s``; also ``365d``."""
    text = text.strip()
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if not text or pos != len(text):
        raise UserError(f"bad duration {text!r} (examples: 8760h, 1h30m, 90s, 365d)")
    if total <= 0:
        raise UserError(f"duration {text!r} must be positive")
    return int(total)


def _split_list(text: str | None) -> list[str]:
    return [item.strip() for item in (text or "").split(",") if item.strip()]


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="cert_command", metavar="SUBCOMMAND")
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])

    ca = sub.add_parser("ca", help="create a self-signed CA")
    ca.add_argument("--name", required=True, help="the CA's name, e.g. 'Acme office'")
    ca.add_argument("--out-crt", default="ca.crt")
    ca.add_argument("--out-key", default="ca.key")
    ca.add_argument("--duration", default="8760h", help="validity from now (default 8760h = 1 year)")
    ca.add_argument("--groups", help="comma-separated: the only groups its hosts may have")
    ca.add_argument("--network", help="range host addresses and subnets must lie in, e.g. 10.87.0.0/16")
    ca.add_argument("--force", action="store_true", help="overwrite existing files")
    ca.set_defaults(func=_cmd_ca)

    keygen = sub.add_parser("keygen", help="create a host's X25519 key pair")
    keygen.add_argument("--out-key", required=True)
    keygen.add_argument("--out-pub", required=True)
    keygen.add_argument("--force", action="store_true")
    keygen.set_defaults(func=_cmd_keygen)

    sign = sub.add_parser("sign", help="sign a host certificate")
    sign.add_argument("--ca-crt", default="ca.crt")
    sign.add_argument("--ca-key", default="ca.key")
    sign.add_argument("--name", required=True, help="host name, e.g. wsl-alice")
    sign.add_argument("--ip", required=True, help="Flatnet address with prefix, e.g. 10.87.1.1/16")
    sign.add_argument("--subnets", help="comma-separated container subnets, e.g. 10.87.1.0/24")
    sign.add_argument("--groups", help="comma-separated groups")
    sign.add_argument("--in-pub", help="the host's public key (from keygen); else a key pair is made")
    sign.add_argument("--out-crt", help="default NAME.crt")
    sign.add_argument("--out-key", help="default NAME.key (only when no --in-pub)")
    sign.add_argument("--duration", help="validity from now (default: until 1 s before the CA expires)")
    sign.add_argument("--force", action="store_true")
    sign.set_defaults(func=_cmd_sign)

    show = sub.add_parser("print", help="show a certificate (or every one in a bundle)")
    show.add_argument("--json", action="store_true")
    show.add_argument("path", metavar="FILE")
    show.set_defaults(func=_cmd_print)

    verify = sub.add_parser("verify", help="check a host certificate against the CA(s)")
    verify.add_argument("--ca", required=True, help="CA certificate file (a bundle may hold several)")
    verify.add_argument("--blocklist", help="file of hex fingerprints, one a line")
    verify.add_argument("path", metavar="FILE")
    verify.set_defaults(func=_cmd_verify)

    fingerprint = sub.add_parser("fingerprint", help="print a certificate's fingerprint (for blocklists)")
    fingerprint.add_argument("path", metavar="FILE")
    fingerprint.set_defaults(func=_cmd_fingerprint)


def _guard(func):
    """Turn library errors into user errors with a readable message."""

    def run(args):
        try:
            return func(args)
        except FileExistsError as exc:
            raise UserError(f"{exc.filename} exists; refusing to overwrite it (use --force)") from None
        except PkiFileError as exc:
            raise UserError(str(exc)) from None
        except CertificateError as exc:
            raise UserError(f"certificate refused: {exc}") from None
        except ValueError as exc:
            raise UserError(str(exc)) from None
        except OSError as exc:
            raise UserError(f"{exc.filename or ''}: {exc.strerror or exc}") from None

    return run


def _refuse_existing(paths, force: bool) -> None:
    """Check every output first, so a refusal leaves nothing half-written."""
    if force:
        return
    from pathlib import Path

    for path in paths:
        if Path(path).exists() or Path(path).is_symlink():
            raise FileExistsError(17, "exists", str(path))


@_guard
def _cmd_ca(args) -> int:
    start = int(now())
    ca_cert, ca_key = new_ca(
        args.name,
        not_before=start,
        not_after=start + parse_duration(args.duration),
        groups=_split_list(args.groups),
        network=args.network,
    )
    _refuse_existing([args.out_crt, args.out_key], args.force)
    files.write_ca_key(args.out_key, ca_key, force=args.force)
    files.write_certificate(args.out_crt, ca_cert, force=args.force)
    print(f"CA {ca_cert.name}: {args.out_crt} (key {args.out_key}), fingerprint {ca_cert.fingerprint_hex()}")
    return 0


@_guard
def _cmd_keygen(args) -> int:
    _refuse_existing([args.out_key, args.out_pub], args.force)
    key = X25519PrivateKey.generate()
    files.write_host_key(args.out_key, key, force=args.force)
    files.write_public_key(args.out_pub, files.x25519_public_bytes(key), force=args.force)
    return 0


@_guard
def _cmd_sign(args) -> int:
    ca_cert = files.load_certificate(args.ca_crt)
    ca_key = files.load_ca_key(args.ca_key)
    start = int(now())
    if args.duration:
        not_after = start + parse_duration(args.duration)
        if not_after > ca_cert.not_after:
            raise UserError(
                f"--duration {args.duration} would outlive the CA (it expires {_when(ca_cert.not_after)})"
            )
    else:
        not_after = ca_cert.not_after - 1
    if start > not_after:
        raise UserError(f"the CA {ca_cert.name} has expired or expires too soon ({_when(ca_cert.not_after)})")
    start = max(start, ca_cert.not_before)
    out_crt = args.out_crt or f"{args.name}.crt"
    host_key = None
    if args.in_pub:
        if args.out_key:
            raise UserError("--out-key makes no sense with --in-pub (the key pair already exists)")
        public_key = files.load_public_key(args.in_pub)
        outputs = [out_crt]
    else:
        host_key = X25519PrivateKey.generate()
        public_key = files.x25519_public_bytes(host_key)
        out_key = args.out_key or f"{args.name}.key"
        outputs = [out_crt, out_key]
    cert = sign_host(
        ca_cert,
        ca_key,
        name=args.name,
        ip=args.ip,
        subnets=_split_list(args.subnets),
        groups=_split_list(args.groups),
        public_key=public_key,
        not_before=start,
        not_after=not_after,
    )
    _refuse_existing(outputs, args.force)
    if host_key is not None:
        files.write_host_key(out_key, host_key, force=args.force)
    files.write_certificate(out_crt, cert, force=args.force)
    print(f"{cert.name} {cert.ip}: {out_crt}, fingerprint {cert.fingerprint_hex()}")
    return 0


def _when(seconds: int) -> str:
    try:
        return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")
    except (OverflowError, OSError, ValueError):
        return str(seconds)


def _format(cert: Certificate) -> str:
    d = cert.describe()
    rows = [
        ("fingerprint", d["fingerprint"]),
        ("network" if cert.is_ca else "ip", d["ip"]),
        ("subnets", ", ".join(d["subnets"]) or "-"),
        ("groups", ", ".join(d["groups"]) or "-"),
        ("not before", _when(cert.not_before)),
        ("not after", _when(cert.not_after)),
        ("public key", d["public_key"]),
        ("issuer", d["issuer"] or "(self-signed)"),
        ("signature", d["signature"]),
    ]
    title = f"{'CA' if cert.is_ca else 'Host'} certificate {d['name']}"
    return "\n".join([title] + [f"  {label + ':':<13}{value}" for label, value in rows])


@_guard
def _cmd_print(args) -> int:
    certs = files.load_certificates(args.path)
    if args.json:
        described = [c.describe() for c in certs]
        print(json.dumps(described[0] if len(described) == 1 else described, indent=2))
    else:
        print("\n\n".join(_format(c) for c in certs))
    return 0


@_guard
def _cmd_verify(args) -> int:
    blocklist = files.load_blocklist(args.blocklist) if args.blocklist else ()
    store = TrustStore(files.load_certificates(args.ca), blocklist)
    cert = files.load_certificate(args.path)
    try:
        store.verify(cert, now())
    except CertificateError as exc:
        print(f"{args.path}: refused: {exc.reason}" + (f" ({exc.detail})" if exc.detail else ""))
        return 1
    print(f"{args.path}: valid ({cert.name} {cert.ip})")
    return 0


@_guard
def _cmd_fingerprint(args) -> int:
    for cert in files.load_certificates(args.path):
        print(cert.fingerprint_hex())
    return 0


if __name__ == "__main__":  # pragma: no cover
    from flatnet.cli import main

    sys.exit(main(["cert", *sys.argv[1:]]))
