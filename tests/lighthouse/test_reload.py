"""flatnet-lighthouse's SIGHUP reload (lighthouse.main.reload_lighthouse): rate limits, blocklist,
restart-only keys, a bad file changes nothing."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import signal
import subprocess
import sys
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from flatnet.config import ConfigError
from flatnet.pki.cert import TrustStore, new_ca, sign_host
from flatnet.pki.files import write_certificate, write_host_key
from flatnet.proto.engine import TunnelEngine
from flatnet.testing.markers import needs_root
from lighthouse.config import load_lighthouse_config
from lighthouse.main import build_core, build_engine, reload_lighthouse
from tests.node.harness import icmp_echo

LH_IP, NODE_IP = "10.87.255.1", "10.87.1.1"
LH_ADDR, NODE_ADDR = ("192.0.2.1", 4242), ("192.0.2.2", 4242)


def _site(tmp_path):
    now = int(time.time())
    ca, ca_key = new_ca("team", not_after=now + 86400, not_before=now - 60)
    write_certificate(tmp_path / "ca.crt", ca, force=True)
    certs = {}
    for name, ip in (("lh", LH_IP), ("node", NODE_IP)):
        key = X25519PrivateKey.generate()
        certs[name] = (sign_host(ca, ca_key, name, f"{ip}/16", [], [], key.public_key().public_bytes_raw(),
                                 now - 60, now + 86400), key)
        write_certificate(tmp_path / f"{name}.crt", certs[name][0], force=True)
        write_host_key(tmp_path / f"{name}.key", key, force=True)
    return ca, certs


def _write(tmp_path, extra: str = "", port: int = 4242) -> None:
    (tmp_path / "lh.toml").write_text(
        f'name = "lh"\nlisten_port = {port}\n'
        f'[pki]\nca = "{tmp_path}/ca.crt"\ncert = "{tmp_path}/lh.crt"\nkey = "{tmp_path}/lh.key"\n{extra}'
    )


def test_reload_applies_limits_and_blocklist_and_reports_restart_keys(tmp_path):
    ca, certs = _site(tmp_path)
    _write(tmp_path)
    old = load_lighthouse_config(tmp_path / "lh.toml")
    engine, core = build_engine(old), build_core(old)
    node = TunnelEngine(certs["node"], TrustStore([ca]))
    node.add_peer(LH_IP, [LH_ADDR])
    now = time.time()
    node.send_packet(icmp_echo(NODE_IP, LH_IP), now)
    for _ in range(4):  # shuttle the handshake both ways
        for data, _addr in node.datagrams_to_send():
            engine.receive_datagram(data, NODE_ADDR, now)
        for data, _addr in engine.datagrams_to_send():
            node.receive_datagram(data, LH_ADDR, now)
    assert engine.peers[ipaddress.IPv4Address(NODE_IP)].up

    # New limits and a listen port: limits apply, the port is reported and kept.
    _write(tmp_path, "[limits]\nrate = 5.0\nburst = 10.0\n", port=5555)
    new = load_lighthouse_config(tmp_path / "lh.toml")
    changes, restart = reload_lighthouse(old, new, engine, core, now)
    assert core.settings.rate == 5.0 and core.settings.burst == 10.0
    assert restart == ["listen_port"] and "cut off: none" in changes[0]
    assert engine.peers[ipaddress.IPv4Address(NODE_IP)].up

    # A CA file that does not load: ConfigError naming pki.ca, nothing changes.
    broken = dataclasses.replace(new, pki=dataclasses.replace(new.pki, ca=tmp_path / "missing.crt"))
    with pytest.raises(ConfigError, match="pki.ca"):
        reload_lighthouse(new, broken, engine, core, now)
    assert engine.peers[ipaddress.IPv4Address(NODE_IP)].up

    # The node's certificate on the blocklist: cut at once.
    _write(tmp_path, f'blocklist = ["{certs["node"][0].fingerprint_hex()}"]\n[limits]\nrate = 5.0\nburst = 10.0\n', port=5555)
    blocked = load_lighthouse_config(tmp_path / "lh.toml")
    changes, restart = reload_lighthouse(new, blocked, engine, core, now)
    assert NODE_IP in changes[0] and restart == []
    assert not engine.peers[ipaddress.IPv4Address(NODE_IP)].up


@pytest.mark.slow
@needs_root
def test_sighup_reloads_a_running_lighthouse(tmp_path, netns_factory):
    _site(tmp_path)
    _write(tmp_path)
    ns = netns_factory("lhr")
    log = tmp_path / "lh.log"
    with open(log, "w") as out:
        proc = ns.popen([sys.executable, "-m", "lighthouse.main", "--config", str(tmp_path / "lh.toml")],
                        stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        time.sleep(2.0)  # no readiness line to wait for; the handler is installed before serving
        _write(tmp_path, "[limits]\nrate = 5.0\n", port=5555)
        proc.send_signal(signal.SIGHUP)
        assert _wait_for_text(log, "config.reloaded"), log.read_text()
        _write(tmp_path, "[limits]\nrate = -1\n")
        proc.send_signal(signal.SIGHUP)
        assert _wait_for_text(log, "config.reload_failed"), log.read_text()
        assert proc.poll() is None  # SIGHUP no longer ends the process
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
    text = log.read_text()
    assert "rate=5.0" in text and "needs_restart=['listen_port']" in text
    assert f"{tmp_path}/lh.toml: key 'limits.rate'" in text


def _wait_for_text(path, text: str, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in path.read_text():
            return True
        time.sleep(0.1)
    return False
