"""Reload for real: three flatnet-node processes in namespaces, a TCP stream open a -> b through the
tunnel, then reloads (SIGHUP and ``flatnet reload``) that narrow b's firewall, add a static peer c
to a, are refused for a broken config, and blocklist c; the stream carries on throughout and
arrives intact (SHA-256), each change is in effect.

    c 192.168.88.3 ──u1── a 192.168.87.1 / .88.1 ──u0── b 192.168.87.2
      10.87.3.1            10.87.1.1                      10.87.2.1
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from flatnet.netns import veth
from flatnet.node.control import ControlClient
from flatnet.pki.cert import new_ca, sign_host
from flatnet.pki.files import write_certificate, write_host_key
from flatnet.testing.markers import needs_root, require_tools

pytestmark = [pytest.mark.slow, needs_root, require_tools("nsenter", "ping")]

FLATNET = {"a": "10.87.1.1", "b": "10.87.2.1", "c": "10.87.3.1"}
UNDERLAY = {"b": "192.168.87.2", "c": "192.168.88.3"}
A_TOWARD = {"b": "192.168.87.1", "c": "192.168.88.1"}
PORT = 4242

RECEIVER = """
import hashlib, socket, sys, threading
def probes():
    p = socket.socket(); p.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    p.bind((sys.argv[1], 5002)); p.listen(16)
    while True:
        c, _ = p.accept(); c.close()
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5001)); s.listen(1)
threading.Thread(target=probes, daemon=True).start()
print("listening", flush=True)
c, _ = s.accept(); h = hashlib.sha256(); n = 0
while chunk := c.recv(1 << 20):
    h.update(chunk); n += len(chunk)
print(n, h.hexdigest(), flush=True)
"""

# A steady stream (about 3 MB/s) until told to stop on stdin: it stays open through all the reloads.
SENDER = """
import hashlib, select, socket, sys, time
s = socket.create_connection((sys.argv[1], 5001), timeout=30); print("connected", flush=True)
h = hashlib.sha256(); n = 0; i = 0
while not select.select([sys.stdin], [], [], 0)[0]:
    chunk = (b"%08d" % i) * 4096; i += 1
    s.sendall(chunk); h.update(chunk); n += len(chunk); time.sleep(0.01)
s.close(); print(n, h.hexdigest(), flush=True)
"""

CONNECT = "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2).close()"


def _write_site(directory) -> dict:
    now = int(time.time())
    ca_cert, ca_key = new_ca("lab-ca", not_after=now + 86400, not_before=now - 3600)
    write_certificate(directory / "ca.crt", ca_cert, force=True)
    site = {"fingerprint": {}}
    for side in "abc":
        key = X25519PrivateKey.generate()
        cert = sign_host(ca_cert, ca_key, f"host-{side}", f"{FLATNET[side]}/16", [f"{FLATNET[side][:-2]}.0/24"],
                         ["hosts"], key.public_key().public_bytes_raw(), now - 3600, now + 86400)
        write_certificate(directory / f"{side}.crt", cert, force=True)
        write_host_key(directory / f"{side}.key", key, force=True)
        site["fingerprint"][side] = cert.fingerprint_hex()
    return site


def _config(directory, side: str, peers: list[tuple[str, str]], extra: str = "") -> str:
    text = (
        f'name = "host-{side}"\ncontrol_socket = "{directory}/{side}.sock"\n'
        f'[pki]\nca = "{directory}/ca.crt"\ncert = "{directory}/{side}.crt"\nkey = "{directory}/{side}.key"\n'
        f"{extra}\n"
        f'[tunnel]\nlisten_port = {PORT}\ntun_name = "flatnet0"\n'
    )
    for ip, endpoint in peers:
        text += f'[[peers]]\nip = "{ip}"\nendpoints = ["{endpoint}:{PORT}"]\n'
    return text


class NodeProc:
    def __init__(self, ns, config, log) -> None:
        self.config, self.socket = config, str(config).replace(".toml", ".sock")
        self.log = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = ns.popen([sys.executable, "-m", "flatnet.node.main", "--config", str(config), "--log-level", "INFO"],
                             stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 20
        while True:
            try:
                ControlClient(self.socket, timeout=2).call("ping")
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"node did not start: {Path(log).read_text()}") from None
                time.sleep(0.1)

    def call(self, cmd: str) -> dict:
        return ControlClient(self.socket, timeout=30).call(cmd)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def _flatnet_reload(socket_path: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flatnet.cli", "reload", "--socket", socket_path],
                          capture_output=True, text=True, timeout=60)


def _wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def _kill(proc) -> str:
    if proc.poll() is None:
        proc.kill()
    return proc.communicate()[0] or ""


def test_reload_changes_firewall_and_peers_under_an_open_tcp_stream(netns_factory, tmp_path):
    a, b, c = netns_factory("rla"), netns_factory("rlb"), netns_factory("rlc")
    veth(a, "u0", b, "u0")
    a.add_address("u0", f"{A_TOWARD['b']}/24")
    b.add_address("u0", f"{UNDERLAY['b']}/24")
    veth(a, "u1", c, "u0")
    a.add_address("u1", f"{A_TOWARD['c']}/24")
    c.add_address("u0", f"{UNDERLAY['c']}/24")
    site = _write_site(tmp_path)
    conf = {side: tmp_path / f"{side}.toml" for side in "abc"}
    conf["a"].write_text(_config(tmp_path, "a", [(FLATNET["b"], UNDERLAY["b"])]))
    conf["b"].write_text(_config(tmp_path, "b", [(FLATNET["a"], A_TOWARD["b"])]))
    conf["c"].write_text(_config(tmp_path, "c", []))  # c answers; only a's config can open the tunnel

    nodes, procs = {}, []
    try:
        for side, ns in (("a", a), ("b", b), ("c", c)):
            nodes[side] = NodeProc(ns, conf[side], tmp_path / f"{side}.log")
        assert a.run(["ping", "-c", "1", "-W", "5", FLATNET["b"]], check=False).returncode == 0
        # Before any reload: a knows no route to c; b's port 5002 is open to a.
        assert a.run(["ping", "-c", "1", "-W", "2", FLATNET["c"]], check=False).returncode != 0
        receiver = b.popen([sys.executable, "-c", RECEIVER, FLATNET["b"]], stdout=subprocess.PIPE, text=True)
        procs.append(receiver)
        assert receiver.stdout.readline().strip() == "listening"
        assert a.run([sys.executable, "-c", CONNECT, FLATNET["b"], "5002"], check=False).returncode == 0
        sender = a.popen([sys.executable, "-c", SENDER, FLATNET["b"]], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
        procs.append(sender)
        assert sender.stdout.readline().strip() == "connected"

        # (1) b by SIGHUP: inbound only TCP 5001 (the stream) and ICMP.
        rules = ('[firewall]\ninbound = [{ proto = "tcp", port = "5001" }, { proto = "icmp" }]\n')
        conf["b"].write_text(_config(tmp_path, "b", [(FLATNET["a"], A_TOWARD["b"])], extra=rules))
        nodes["b"].proc.send_signal(signal.SIGHUP)
        assert _wait_until(lambda: nodes["b"].call("status")["firewall"]["inbound_rules"] == 2)
        refused = a.run([sys.executable, "-c", CONNECT, FLATNET["b"], "5002"], check=False)
        assert refused.returncode != 0 and "timed out" in refused.stderr
        assert a.run(["ping", "-c", "1", "-W", "5", FLATNET["b"]], check=False).returncode == 0

        # (2) a by `flatnet reload`: a new static peer c (a new route through the tunnel).
        conf["a"].write_text(_config(tmp_path, "a", [(FLATNET["b"], UNDERLAY["b"]), (FLATNET["c"], UNDERLAY["c"])]))
        answer = _flatnet_reload(nodes["a"].socket)
        assert answer.returncode == 0, answer.stderr
        assert f"changed: peers: added {FLATNET['c']}" in answer.stdout
        assert a.run(["ping", "-c", "1", "-W", "5", FLATNET["c"]], check=False).returncode == 0

        # (3) a broken config: refused with file and key, nothing changes.
        conf["a"].write_text(conf["a"].read_text() + '[firewall]\ninbound = [{ proto = "tcp", port = "99999" }]\n')
        answer = _flatnet_reload(nodes["a"].socket)
        assert answer.returncode == 1
        assert "nothing changed" in answer.stderr and str(conf["a"]) in answer.stderr and "port" in answer.stderr
        assert nodes["a"].call("status")["firewall"]["inbound_rules"] == 1
        assert a.run(["ping", "-c", "1", "-W", "5", FLATNET["c"]], check=False).returncode == 0

        # (4) a blocklists c: c is cut at once, b is untouched.
        blocked = f'blocklist = ["{site["fingerprint"]["c"]}"]'
        text = _config(tmp_path, "a", [(FLATNET["b"], UNDERLAY["b"]), (FLATNET["c"], UNDERLAY["c"])])
        conf["a"].write_text(text.replace('key = "', f'{blocked}\nkey = "', 1))
        answer = _flatnet_reload(nodes["a"].socket)
        assert answer.returncode == 0 and "trust store reloaded" in answer.stdout, answer.stdout + answer.stderr
        peers = nodes["a"].call("status")["peers"]
        assert not peers[FLATNET["c"]]["up"] and peers[FLATNET["b"]]["up"]
        assert a.run(["ping", "-c", "1", "-W", "3", FLATNET["c"]], check=False).returncode != 0
        # The stream outlived every reload and arrived whole.
        assert sender.poll() is None and receiver.poll() is None
        sent = sender.communicate("stop\n", timeout=60)[0].split()
        got = receiver.communicate(timeout=30)[0].split()
        assert sent == got and int(sent[0]) > 1_000_000
    finally:
        for proc in procs:
            _kill(proc)
        for node in nodes.values():
            node.stop()
    logs = {side: (tmp_path / f"{side}.log").read_text() for side in "abc"}
    assert "config.reloaded" in logs["b"] and "config.reload_failed" in logs["a"], logs
