"""The exporters for real: two flatnet-node processes and a flatnet-lighthouse in namespaces, each
scraped on its loopback ``/metrics`` from inside its namespace. Traffic moves the node's peers,
handshakes, bytes and packets; a CNI call is counted and timed; the lighthouse counts the nodes'
registrations; nothing answers on the non-loopback address.

    a 192.168.97.1 ──u0── b 192.168.97.2 (node :4242, lighthouse :4243)
      10.87.1.1              10.87.2.1, lighthouse 10.87.255.1
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from prometheus_client.parser import text_string_to_metric_families

from flatnet.netns import veth
from flatnet.node.control import ControlClient
from flatnet.pki.cert import new_ca, sign_host
from flatnet.pki.files import write_certificate, write_host_key
from flatnet.testing.markers import needs_root, require_tools

pytestmark = [pytest.mark.slow, needs_root, require_tools("nsenter", "ping")]

FLATNET = {"a": "10.87.1.1", "b": "10.87.2.1", "lh": "10.87.255.1"}
UNDERLAY = {"a": "192.168.97.1", "b": "192.168.97.2"}
NODE_METRICS, LH_METRICS = 9587, 9588

SCRAPE = """
import sys, urllib.request
sys.stdout.write(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5).read().decode())
"""

CONNECT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2).close()
    print("open")
except OSError as exc:
    print(type(exc).__name__)
"""


def _site(directory) -> None:
    now = int(time.time())
    ca, ca_key = new_ca("team", not_after=now + 86400, not_before=now - 3600)
    write_certificate(directory / "ca.crt", ca, force=True)
    for name, ip, subnets in (("a", FLATNET["a"], ["10.87.1.0/24"]), ("b", FLATNET["b"], ["10.87.2.0/24"]),
                              ("lh", FLATNET["lh"], [])):
        key = X25519PrivateKey.generate()
        cert = sign_host(ca, ca_key, f"host-{name}", f"{ip}/16", subnets, ["hosts"],
                         key.public_key().public_bytes_raw(), now - 3600, now + 86400)
        write_certificate(directory / f"{name}.crt", cert, force=True)
        write_host_key(directory / f"{name}.key", key, force=True)
    pki = 'ca = "{d}/ca.crt"\ncert = "{d}/{n}.crt"\nkey = "{d}/{n}.key"\n'
    (directory / "lh.toml").write_text(
        f'name = "lh"\nlisten_host = "{UNDERLAY["b"]}"\nlisten_port = 4243\ntick_interval = 0.2\n'
        f"[pki]\n{pki.format(d=directory, n='lh')}"
    )
    for side, other in (("a", "b"), ("b", "a")):
        (directory / f"{side}.toml").write_text(
            f'name = "host-{side}"\ncontrol_socket = "{directory}/{side}.sock"\n'
            f"[pki]\n{pki.format(d=directory, n=side)}"
            f'[tunnel]\nlisten_port = 4242\ntun_name = "flatnet0"\n'
            f'[cni]\ndata_dir = "{directory}/cni-{side}"\n'
            f'[[peers]]\nip = "{FLATNET[other]}"\nendpoints = ["{UNDERLAY[other]}:4242"]\n'
            f'[lighthouse]\nhosts = [{{ ip = "{FLATNET["lh"]}", endpoints = ["{UNDERLAY["b"]}:4243"] }}]\n'
        )


def _scrape(ns, port: int) -> dict[tuple[str, tuple], float]:
    """Every sample of one /metrics page: (name, sorted labels) -> value."""
    result = ns.run([sys.executable, "-c", SCRAPE, str(port)], check=False, timeout=30)
    assert result.returncode == 0, result.stderr
    out = {}
    for family in text_string_to_metric_families(result.stdout):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _total(samples, name: str, **labels) -> float:
    """Sum over the samples of *name* whose labels include *labels*."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


def _start(ns, argv, log):
    with open(log, "w") as out:
        return ns.popen([sys.executable, "-m", *argv], stdout=out, stderr=subprocess.STDOUT,
                        env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _stop(proc) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _wait_until(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.3)
    return False


def test_node_and_lighthouse_export_their_metrics_on_loopback_only(netns_factory, tmp_path):
    a, b = netns_factory("mxa"), netns_factory("mxb")
    veth(a, "u0", b, "u0")
    a.add_address("u0", f"{UNDERLAY['a']}/24")
    b.add_address("u0", f"{UNDERLAY['b']}/24")
    _site(tmp_path)
    procs = []
    try:
        procs.append(_start(b, ["lighthouse.main", "--config", str(tmp_path / "lh.toml")], tmp_path / "lh.log"))
        for side, ns in (("a", a), ("b", b)):
            procs.append(_start(ns, ["flatnet.node.main", "--config", str(tmp_path / f"{side}.toml")],
                                tmp_path / f"{side}.log"))
        for side in "ab":
            assert _wait_until(lambda s=side: _pingable(tmp_path / f"{s}.sock")), (tmp_path / f"{side}.log").read_text()
        assert _wait_until(lambda: _connects(a, "127.0.0.1", NODE_METRICS) == "open"), (tmp_path / "a.log").read_text()
        assert _wait_until(lambda: _connects(b, "127.0.0.1", LH_METRICS) == "open"), (tmp_path / "lh.log").read_text()

        before = _scrape(a, NODE_METRICS)
        assert a.run(["ping", "-c", "1", "-W", "10", FLATNET["b"]], check=False).returncode == 0
        assert a.run(["ping", "-c", "20", "-i", "0.05", "-s", "1000", "-W", "2", FLATNET["b"]], check=False).returncode == 0
        # A CNI call through the control socket (VERSION: no namespace needed) is counted and timed.
        ControlClient(str(tmp_path / "a.sock"), timeout=10).call(
            "cni", request={"command": "VERSION", "config": {"cniVersion": "1.0.0", "name": "flatnet", "type": "flatnet"}})
        after = _scrape(a, NODE_METRICS)

        assert _value(after, "flatnet_peers", state="up") >= 1
        assert _value(after, "flatnet_sessions") >= 1
        for direction in ("tx", "rx"):
            assert (_value(after, "flatnet_tunnel_bytes_total", direction=direction)
                    >= _value(before, "flatnet_tunnel_bytes_total", direction=direction) + 20 * 1000)
            assert (_value(after, "flatnet_tunnel_packets_total", direction=direction)
                    >= _value(before, "flatnet_tunnel_packets_total", direction=direction) + 20)
        assert _value(after, "flatnet_handshakes_total", outcome="completed") >= 1
        assert _value(after, "flatnet_handshakes_total", outcome="initiated") + _value(
            after, "flatnet_handshakes_total", outcome="answered") >= 1
        assert _value(after, "flatnet_peer_rung", peer=FLATNET["b"]) == 0  # direct on the LAN
        assert _total(after, "flatnet_cni_calls_total", command="VERSION") == 1
        assert _value(after, "flatnet_cni_call_seconds_count", command="VERSION") == 1
        assert _value(after, "flatnet_up_since_seconds") > 0

        lighthouse = {}

        def registered() -> bool:
            lighthouse.update(_scrape(b, LH_METRICS))
            return _value(lighthouse, "flatnet_lighthouse_nodes") == 2
        assert _wait_until(registered), lighthouse
        assert _value(lighthouse, "flatnet_lighthouse_messages_total", type="Register") >= 2
        assert _total(lighthouse, "flatnet_handshakes_total", outcome="answered") >= 2

        # Loopback only: the underlay address refuses, from the other host and from the host itself.
        assert _connects(a, UNDERLAY["b"], NODE_METRICS) == "ConnectionRefusedError"
        assert _connects(a, UNDERLAY["b"], LH_METRICS) == "ConnectionRefusedError"
        assert _connects(b, UNDERLAY["b"], NODE_METRICS) == "ConnectionRefusedError"
    finally:
        for proc in reversed(procs):
            _stop(proc)


def _pingable(socket_path) -> bool:
    try:
        ControlClient(str(socket_path), timeout=2).call("ping")
        return True
    except OSError:
        return False


def _connects(ns, host: str, port: int) -> str:
    return ns.run([sys.executable, "-c", CONNECT, host, str(port)], check=False, timeout=30).stdout.strip()
