"""`flatnet cert` end to end, through the umbrella CLI's main()."""

from __future__ import annotations

import json
import os
import stat

import pytest

from flatnet.cli import main
from flatnet.pki import cli as pki_cli
from flatnet.pki import files

T0 = 1_800_000_000


@pytest.fixture
def clock(monkeypatch):
    """The CLI's clock, set by the test (the PKI never sleeps)."""
    state = {"now": float(T0)}
    monkeypatch.setattr(pki_cli, "now", lambda: state["now"])
    return state


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["cert", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_ca_sign_print_verify(workdir, clock, capsys):
    assert run(capsys, "ca", "--name", "Acme office", "--duration", "8760h")[0] == 0
    assert stat.S_IMODE(os.stat("ca.key").st_mode) == 0o600
    code, out, _ = run(
        capsys,
        "sign",
        "--name",
        "wsl-alice",
        "--ip",
        "10.87.1.1/16",
        "--subnets",
        "10.87.1.0/24",
        "--groups",
        "dev,ops",
    )
    assert code == 0, out
    assert stat.S_IMODE(os.stat("wsl-alice.key").st_mode) == 0o600
    cert = files.load_certificate("wsl-alice.crt")
    assert cert.not_before == T0 and cert.not_after == T0 + 8760 * 3600 - 1  # 1 s inside the CA's
    assert files.x25519_public_bytes(files.load_host_key("wsl-alice.key")) == cert.public_key

    code, out, _ = run(capsys, "print", "--json", "wsl-alice.crt")
    shown = json.loads(out)
    assert shown["name"] == "wsl-alice" and shown["ip"] == "10.87.1.1/16"
    assert shown["subnets"] == ["10.87.1.0/24"] and shown["groups"] == ["dev", "ops"]
    assert shown["fingerprint"] == cert.fingerprint_hex()
    assert shown["issuer"] == files.load_certificate("ca.crt").fingerprint_hex()

    code, out, _ = run(capsys, "print", "ca.crt")
    assert code == 0 and "CA certificate Acme office" in out and "(self-signed)" in out

    code, out, _ = run(capsys, "verify", "--ca", "ca.crt", "wsl-alice.crt")
    assert code == 0 and "valid" in out


def test_keygen_then_sign_with_in_pub(workdir, clock, capsys):
    run(capsys, "ca", "--name", "ca")
    assert run(capsys, "keygen", "--out-key", "b.key", "--out-pub", "b.pub")[0] == 0
    assert stat.S_IMODE(os.stat("b.key").st_mode) == 0o600
    code, out, err = run(
        capsys,
        "sign",
        "--name",
        "wsl-bob",
        "--ip",
        "10.87.2.1/16",
        "--in-pub",
        "b.pub",
        "--out-crt",
        "bob.crt",
        "--duration",
        "24h",
    )
    assert code == 0, err
    cert = files.load_certificate("bob.crt")
    assert cert.public_key == files.load_public_key("b.pub")
    assert cert.not_after == T0 + 86400
    assert not os.path.exists("wsl-bob.key")  # no key made when the host brought its own


def test_verify_reports_reasons_with_exit_1(workdir, clock, capsys):
    run(capsys, "ca", "--name", "ca", "--duration", "48h")
    run(capsys, "sign", "--name", "h", "--ip", "10.87.3.1/16", "--duration", "1h")
    clock["now"] = T0 + 2 * 3600
    code, out, _ = run(capsys, "verify", "--ca", "ca.crt", "h.crt")
    assert code == 1 and "refused: expired" in out

    clock["now"] = T0 + 60
    code, out, _ = run(capsys, "fingerprint", "h.crt")
    with open("blocklist", "w") as f:
        f.write(f"# revoked\n{out.strip()}\n")
    code, out, _ = run(capsys, "verify", "--ca", "ca.crt", "--blocklist", "blocklist", "h.crt")
    assert code == 1 and "refused: blocklisted" in out

    os.mkdir("other")
    run(capsys, "ca", "--name", "other", "--out-crt", "other/ca.crt", "--out-key", "other/ca.key")
    code, out, _ = run(capsys, "verify", "--ca", "other/ca.crt", "h.crt")
    assert code == 1 and "refused: unknown-issuer" in out


def test_no_silent_overwrite_and_force(workdir, clock, capsys):
    run(capsys, "ca", "--name", "ca")
    before = (workdir / "ca.key").read_text()
    code, _, err = run(capsys, "ca", "--name", "ca2")
    assert code == 1 and "refusing to overwrite" in err and "--force" in err
    assert (workdir / "ca.key").read_text() == before
    assert run(capsys, "ca", "--name", "ca2", "--force")[0] == 0
    assert (workdir / "ca.key").read_text() != before
    assert files.load_certificate("ca.crt").name == "ca2"


def test_sign_refusal_writes_nothing(workdir, clock, capsys):
    run(capsys, "ca", "--name", "ca")
    (workdir / "h.crt").write_text("precious")
    code, _, err = run(capsys, "sign", "--name", "h", "--ip", "10.87.3.1/16")
    assert code == 1 and "h.crt exists" in err
    assert not (workdir / "h.key").exists()  # the key was not written before the refusal either


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--ip", "10.87.0.0/16"], "network or broadcast"),
        (["--ip", "nonsense"], "nonsense"),
        (["--ip", "10.87.1.1/16", "--subnets", "10.87.1.5/24"], "host bits"),
        (["--ip", "10.87.1.1/16", "--duration", "9000h"], "outlive the CA"),
        (["--ip", "10.87.1.1/16", "--duration", "soon"], "bad duration"),
    ],
)
def test_sign_user_errors(workdir, clock, capsys, argv, message):
    run(capsys, "ca", "--name", "ca")
    code, _, err = run(capsys, "sign", "--name", "h", *argv)
    assert code == 1 and message in err


def test_sign_with_an_expired_ca_is_refused(workdir, clock, capsys):
    run(capsys, "ca", "--name", "ca", "--duration", "1h")
    clock["now"] = T0 + 7200
    code, _, err = run(capsys, "sign", "--name", "h", "--ip", "10.87.1.1/16")
    assert code == 1 and "expired" in err


def test_ca_network_constraint_via_cli(workdir, clock, capsys):
    run(capsys, "ca", "--name", "ca", "--network", "10.87.0.0/16", "--groups", "dev")
    code, _, err = run(capsys, "sign", "--name", "h", "--ip", "192.168.1.1/24")
    assert code == 1 and "outside the CA's network" in err
    code, _, err = run(capsys, "sign", "--name", "h", "--ip", "10.87.1.1/16", "--groups", "ops")
    assert code == 1 and "not among the CA's groups" in err


def test_print_of_a_non_certificate_is_a_user_error(workdir, clock, capsys):
    (workdir / "junk").write_text("hello")
    code, _, err = run(capsys, "print", "junk")
    assert code == 1 and "junk" in err


@pytest.mark.parametrize(
    ("text", "seconds"), [("8760h", 31536000), ("1h30m", 5400), ("90s", 90), ("2d", 172800)]
)
def test_parse_duration(text, seconds):
    assert pki_cli.parse_duration(text) == seconds
