"""The systemd units: hardened as docs/security.md says, and accepted by systemd-analyze verify."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "packaging" / "systemd"
VENV_BIN = Path(sys.executable).parent


def parse(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # keys are case-sensitive
    parser.read_string((UNITS / name).read_text())
    return parser


def test_node_unit_is_hardened():
    service = parse("flatnet-node.service")["Service"]
    assert service["ProtectSystem"] == "strict"
    assert service["NoNewPrivileges"] == "yes"
    caps = set(service["CapabilityBoundingSet"].split())
    assert {"CAP_NET_ADMIN", "CAP_NET_RAW"} <= caps
    assert caps <= {"CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_SYS_ADMIN"}  # SYS_ADMIN: setns for CNI (see unit)
    assert "/var/lib/flatnet" in service["ReadWritePaths"].split()
    assert service["RuntimeDirectory"] == "flatnet"
    assert service["Restart"] == "on-failure"
    assert service["DeviceAllow"] == "/dev/net/tun rw" and service["DevicePolicy"] == "closed"
    assert service["UMask"] == "0077"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"  # flatnet-node reloads on SIGHUP


def test_lighthouse_unit_is_hardened_and_has_no_capabilities():
    service = parse("flatnet-lighthouse.service")["Service"]
    assert service["ProtectSystem"] == "strict" and service["NoNewPrivileges"] == "yes"
    assert service["CapabilityBoundingSet"] == ""
    assert service["RuntimeDirectory"] != "flatnet"  # would remove the node's socket directory on stop
    assert service["Restart"] == "on-failure"
    assert service["PrivateDevices"] == "yes"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"  # flatnet-lighthouse reloads on SIGHUP


@pytest.mark.parametrize("name, binary", [("flatnet-node.service", "flatnet-node"),
                                          ("flatnet-lighthouse.service", "flatnet-lighthouse")])
def test_systemd_analyze_verify_accepts_the_unit(tmp_path, name, binary):
    text = (UNITS / name).read_text()
    assert f"ExecStart=/opt/flatnet/venv/bin/{binary} " in text
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed (the parse tests above still ran)")
    # verify checks that ExecStart exists: point it at this checkout's venv
    (tmp_path / name).write_text(text.replace("/opt/flatnet/venv/bin/", f"{VENV_BIN}/"))
    result = subprocess.run(["systemd-analyze", "verify", str(tmp_path / name)], capture_output=True, text=True)
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if name in line or "Unknown" in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr
