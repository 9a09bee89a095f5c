"""Armored PKI files: modes, refusal to overwrite, bundles, blocklists."""

from __future__ import annotations

import os
import stat

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from flatnet.pki import files
from flatnet.pki.cert import new_ca, sign_host
from flatnet.pki.errors import PkiFileError

T0 = 1_800_000_000


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_armor_round_trip_and_looks_like_nebulas():
    text = files.armor(files.CERTIFICATE, bytes(range(200)))
    assert text.startswith("-----BEGIN FLATNET CERTIFICATE-----\n")
    assert text.endswith("-----END FLATNET CERTIFICATE-----\n")
    assert max(len(line) for line in text.splitlines()) <= 64
    assert files.unarmor(text, files.CERTIFICATE) == bytes(range(200))


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("nothing here", "no FLATNET CERTIFICATE"),
        (
            "-----BEGIN FLATNET X25519 PRIVATE KEY-----\nAAAA\n-----END FLATNET X25519 PRIVATE KEY-----\n",
            "expected",
        ),
        ("-----BEGIN FLATNET CERTIFICATE-----\nAA!A\n-----END FLATNET CERTIFICATE-----\n", "base64"),
        ("-----BEGIN FLATNET CERTIFICATE-----\nAAAA\n-----END FLATNET X25519 PUBLIC KEY-----\n", "closed by"),
    ],
)
def test_unarmor_refuses_wrong_or_broken_blocks(text, problem):
    with pytest.raises(PkiFileError, match=problem):
        files.unarmor(text, files.CERTIFICATE, "f.crt")


def test_private_keys_are_0600_and_public_files_0644(tmp_path):
    old_umask = os.umask(0)  # even with a permissive umask, a key is never readable by others
    try:
        ca_cert, ca_key = new_ca("ca", not_before=T0, not_after=T0 + 100)
        host = X25519PrivateKey.generate()
        files.write_ca_key(tmp_path / "ca.key", ca_key)
        files.write_host_key(tmp_path / "h.key", host)
        files.write_public_key(tmp_path / "h.pub", files.x25519_public_bytes(host))
        files.write_certificate(tmp_path / "ca.crt", ca_cert)
    finally:
        os.umask(old_umask)
    assert mode(tmp_path / "ca.key") == 0o600
    assert mode(tmp_path / "h.key") == 0o600
    assert mode(tmp_path / "h.pub") == 0o644
    assert mode(tmp_path / "ca.crt") == 0o644
    assert files.load_ca_key(tmp_path / "ca.key").sign(b"x")  # loads back
    assert files.x25519_public_bytes(files.load_host_key(tmp_path / "h.key")) == files.load_public_key(
        tmp_path / "h.pub"
    )
    assert files.load_certificate(tmp_path / "ca.crt") == ca_cert


def test_existing_file_is_never_overwritten_silently(tmp_path):
    path = tmp_path / "h.key"
    path.write_text("precious")
    with pytest.raises(FileExistsError):
        files.write_host_key(path, X25519PrivateKey.generate())
    assert path.read_text() == "precious"


def test_force_replaces_and_narrows_the_mode(tmp_path):
    path = tmp_path / "h.key"
    path.write_text("old")
    path.chmod(0o644)
    key = X25519PrivateKey.generate()
    files.write_host_key(path, key, force=True)
    assert mode(path) == 0o600
    assert files.x25519_public_bytes(files.load_host_key(path)) == files.x25519_public_bytes(key)
    assert [p.name for p in tmp_path.iterdir()] == ["h.key"]  # no temporary file left behind


def test_a_symlink_in_the_way_is_refused_not_followed(tmp_path):
    target = tmp_path / "elsewhere"
    (tmp_path / "h.key").symlink_to(target)
    with pytest.raises(FileExistsError):
        files.write_host_key(tmp_path / "h.key", X25519PrivateKey.generate())
    assert not target.exists()


def test_ca_bundle_holds_several_certificates(tmp_path):
    a, _ = new_ca("old", not_before=T0, not_after=T0 + 100)
    b, _ = new_ca("new", not_before=T0, not_after=T0 + 200)
    bundle = tmp_path / "ca.crt"
    bundle.write_text(files.armor(files.CERTIFICATE, a.encode()) + files.armor(files.CERTIFICATE, b.encode()))
    assert files.load_certificates(bundle) == [a, b]
    with pytest.raises(PkiFileError, match="expected one certificate"):
        files.load_certificate(bundle)


def test_a_certificate_file_with_garbage_inside_names_the_file(tmp_path):
    path = tmp_path / "bad.crt"
    path.write_text(files.armor(files.CERTIFICATE, b"\x93\x01\x02"))
    with pytest.raises(PkiFileError, match="bad.crt.*malformed"):
        files.load_certificate(path)
    with pytest.raises(PkiFileError, match="missing.crt"):
        files.load_certificate(tmp_path / "missing.crt")


def test_key_of_wrong_length_is_refused(tmp_path):
    path = tmp_path / "h.key"
    path.write_text(files.armor(files.HOST_PRIVATE_KEY, b"\x01" * 31))
    with pytest.raises(PkiFileError, match="32 bytes"):
        files.load_host_key(path)


def test_blocklist_file(tmp_path):
    ca_cert, ca_key = new_ca("ca", not_before=T0, not_after=T0 + 100)
    host = sign_host(ca_cert, ca_key, "h", "10.87.1.1/16", [], [], b"k" * 32, T0, T0 + 10)
    path = tmp_path / "blocklist"
    path.write_text(
        "# revoked 2026-11-28: stolen laptop\n"
        f"{host.fingerprint_hex()}   # wsl-h\n"
        "\n"
        f"  {ca_cert.fingerprint_hex().upper()}\n"
    )
    assert files.load_blocklist(path) == {host.fingerprint(), ca_cert.fingerprint()}


def test_blocklist_bad_line_names_file_and_line(tmp_path):
    path = tmp_path / "blocklist"
    path.write_text("# ok\n" + "ab" * 32 + "\nnot-a-fingerprint\n")
    with pytest.raises(PkiFileError, match=r"blocklist:3: .*not-a-fingerprint"):
        files.load_blocklist(path)


def test_parse_fingerprint_accepts_colons_and_refuses_short():
    assert files.parse_fingerprint(":".join(["ab"] * 32)) == b"\xab" * 32
    with pytest.raises(ValueError):
        files.parse_fingerprint("ab" * 31)
