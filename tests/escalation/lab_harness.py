"""Processes for the NAT lab: a lighthouse (with its relay) in the internet namespace and the real
tunnel component (``python -m flatnet.node.tunnel_component``) in each host namespace, configured
to find each other only through the lighthouse. Status comes from the node's SIGUSR1 JSON line."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from flatnet.lab.nat import NatLab, build_nat_lab
from flatnet.pki.cert import new_ca, sign_host
from flatnet.pki.files import write_certificate, write_host_key
from flatnet.testing.tunnel_pair import start_node as _start_node

LIGHTHOUSE_IP = "10.87.255.1"
FLATNET = {"a": "10.87.1.1", "b": "10.87.2.1"}
SUBNET = {"a": "10.87.1.0/24", "b": "10.87.2.0/24"}
PORT = 4242


SECOND_LIGHTHOUSE_IP = "10.87.255.2"
SECOND_LIGHTHOUSE_ADDRESS = "100.64.2.254"  # the internet namespace's other address


def write_files(directory: Path, lab: NatLab, lighthouses: int = 1) -> dict[str, Path]:
    """CA, certificates and keys, the relay secret, lighthouse.toml (lighthouse2.toml with two) and
    a node.toml per host listing every lighthouse."""
    directory.mkdir(parents=True, exist_ok=True)
    now = int(time.time())
    ca_cert, ca_key = new_ca("lab-ca", not_after=now + 86400, not_before=now - 3600)
    write_certificate(directory / "ca.crt", ca_cert, force=True)

    def identity(name, ip, subnets):
        key = X25519PrivateKey.generate()
        cert = sign_host(
            ca_cert, ca_key, name, f"{ip}/16", subnets, ["hosts"], key.public_key().public_bytes_raw(),
            now - 3600, now + 86400,
        )
        write_certificate(directory / f"{name}.crt", cert, force=True)
        write_host_key(directory / f"{name}.key", key, force=True)

    (directory / "relay.secret").write_text(os.urandom(24).hex())
    configs = {}
    hosts = []
    all_lighthouses = [("lighthouse", LIGHTHOUSE_IP, lab.lighthouse_address)]
    if lighthouses > 1:
        all_lighthouses.append(("lighthouse2", SECOND_LIGHTHOUSE_IP, SECOND_LIGHTHOUSE_ADDRESS))
    for name, ip, lh in all_lighthouses:
        identity(name, ip, [])
        (directory / f"{name}.toml").write_text(
            # Bound to one public address: a socket on 0.0.0.0 would answer the second router from
            # the other link's address, which its NAT does not let in.
            f'name = "{name}"\nlisten_host = "{lh}"\nlisten_port = 4242\ntick_interval = 0.2\n'
            f'[pki]\nca = "{directory}/ca.crt"\ncert = "{directory}/{name}.crt"\nkey = "{directory}/{name}.key"\n'
            f'[relay]\nsecret_file = "{directory}/relay.secret"\nserve = true\nudp_port = 3478\ntcp_port = 443\n'
            f'listen_host = "{lh}"\n'
            f'advertise = ["udp://{lh}:3478", "tcp://{lh}:443"]\n'
        )
        configs[name] = directory / f"{name}.toml"
        hosts.append(f'{{ ip = "{ip}", endpoints = ["{lh}:4242"] }}')
    for side, other in (("a", "b"), ("b", "a")):
        identity(f"host-{side}", FLATNET[side], [SUBNET[side]])
        text = (
            f'name = "host-{side}"\ncontrol_socket = "{directory}/{side}.sock"\n'
            f'[pki]\nca = "{directory}/ca.crt"\ncert = "{directory}/host-{side}.crt"\nkey = "{directory}/host-{side}.key"\n'
            f'[tunnel]\nlisten_host = "0.0.0.0"\nlisten_port = {PORT}\ntun_name = "flatnet0"\n'
            f'[[peers]]\nip = "{FLATNET[other]}"\n'
            f'[lighthouse]\nhosts = [{", ".join(hosts)}]\n'
        )
        path = directory / f"{side}.toml"
        path.write_text(text)
        configs[side] = path
    return configs


@dataclass
class Process:
    proc: subprocess.Popen
    output: list[str] = field(default_factory=list)

    def stop(self, timeout: float = 10.0) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        unread = bytes(self.proc.__dict__.get("_lab_pending", b"")).decode(errors="replace")  # (see _readline)
        return "".join(self.output) + unread + (out or "")


def start_node(ns, config: Path, timeout: float = 40.0):
    """The tunnel component in *ns* (generous start-up time: the machine is shared)."""
    return _start_node(ns, config, timeout=timeout)


def start_lighthouse(ns, config: Path, timeout: float = 40.0) -> Process:
    proc = ns.popen(
        [sys.executable, "-m", "lighthouse.main", "--config", str(config), "--log-level", "INFO"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    process = Process(proc)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = _readline(proc, deadline - time.monotonic())
        if line is None:
            break
        process.output.append(line)
        if "relay listening" in line:
            return process
    raise RuntimeError("lighthouse did not start:\n" + process.stop())


def _readline(proc, timeout: float) -> str | None:
    """The next line of *proc*'s output, None at EOF or after *timeout* seconds. Reads the pipe's
    fd itself, with a buffer of its own: select() on a file object whose reader already buffered
    the next lines (two log lines in one pipe read, e.g. a restarted lighthouse's "listening"
    lines) would wait for data that is already here."""
    pending = proc.__dict__.setdefault("_lab_pending", bytearray())
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + max(0.0, timeout)
    while b"\n" not in pending:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            return None
        chunk = os.read(fd, 65536)
        if not chunk:
            return None
        pending += chunk
    end = pending.index(b"\n") + 1
    line = bytes(pending[:end]).decode(errors="replace")
    del pending[:end]
    return line


def node_status(node, timeout: float = 20.0) -> dict:
    """The node's status (what `flatnet status` shows): SIGUSR1 makes it print one JSON line."""
    node.proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = _readline(node.proc, deadline - time.monotonic())
        if line is None:
            break
        if line.startswith("{"):
            return json.loads(line)
        node.output.append(line)
    raise RuntimeError("no status from the node:\n" + "".join(node.output[-30:]))


def rung(node, peer_ip: str) -> str | None:
    peers = node_status(node).get("escalation", {}).get("peers", {})
    return peers.get(peer_ip, {}).get("rung")


def wait_for_rung(node, peer_ip: str, wanted: str, timeout: float = 40.0) -> float:
    start = time.monotonic()
    last = None
    while time.monotonic() - start < timeout:
        last = rung(node, peer_ip)
        if last == wanted:
            return time.monotonic() - start
        time.sleep(0.5)
    raise AssertionError(f"rung to {peer_ip} is {last!r}, not {wanted!r} after {timeout}s")


class Lab:
    """A NAT lab (``build_nat_lab`` kwargs) with a lighthouse+relay (two with ``lighthouses=2``) in
    the internet namespace and a node on each host; every process it starts is stopped by
    :meth:`close` (the ``make_lab`` fixture calls it)."""

    def __init__(self, netns_factory, tmp_path, lighthouses: int = 1, **kwargs):
        self.lab = build_nat_lab(netns_factory, **kwargs)
        self.configs = write_files(tmp_path, self.lab, lighthouses)
        self.processes = []
        self.lighthouse = start_lighthouse(self.lab.internet, self.configs["lighthouse"])
        self.processes.append(self.lighthouse)
        if lighthouses > 1:
            self.lighthouse2 = start_lighthouse(self.lab.internet, self.configs["lighthouse2"])
            self.processes.append(self.lighthouse2)
        self.a = start_node(self.lab.host_a, self.configs["a"])
        self.processes.append(self.a)
        self.b = start_node(self.lab.host_b, self.configs["b"])
        self.processes.append(self.b)

    def stream(self, total: int, seconds: float, port: int = 5001):
        """Start a TCP stream A -> B through the tunnel; returns (server, client) processes."""
        server = self.lab.host_b.popen(
            [sys.executable, "-m", "tests.escalation.lab_tcp", "serve", FLATNET["b"], str(port)],
            stdout=subprocess.PIPE, text=True,
        )
        assert server.stdout.readline().strip() == "listening"
        client = self.lab.host_a.popen(
            [sys.executable, "-m", "tests.escalation.lab_tcp", "send", FLATNET["b"], str(port), str(total), str(seconds)],
            stdout=subprocess.PIPE, text=True,
        )
        self.processes += [server, client]
        return server, client

    def transfer_intact(self, total: int = 2_000_000, seconds: float = 1.0) -> None:
        server, client = self.stream(total, seconds)
        sent, _ = client.communicate(timeout=90)
        received, _ = server.communicate(timeout=30)
        assert sent.split()[0] == str(total // 16384 * 16384) and sent == received

    def close(self):
        outputs = []
        for p in reversed(self.processes):
            if hasattr(p, "stop"):
                outputs.append(p.stop())
            elif p.poll() is None:
                p.kill()
                p.communicate()
        return outputs

    def kill_relay(self) -> None:
        """The first lighthouse (which serves the relay) dies at once (SIGKILL: no goodbye; the
        kernel resets its TCP connections and answers its UDP ports with ICMP unreachable)."""
        self.lighthouse.proc.kill()
        self.lighthouse.stop()
        self.processes.remove(self.lighthouse)

    def start_relay(self) -> None:
        """The first lighthouse again, same address, same config (an empty relay table)."""
        self.lighthouse = start_lighthouse(self.lab.internet, self.configs["lighthouse"])
        self.processes.append(self.lighthouse)

    def relay_metrics(self) -> dict[str, float]:
        """The first lighthouse's Prometheus samples (its default ``[metrics] listen``,
        127.0.0.1:9588 of the internet namespace): ``{'name{labels}': value}``."""
        script = (
            "import sys, urllib.request; "
            "sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:9588/metrics', timeout=10).read().decode())"
        )
        text = self.lab.internet.run([sys.executable, "-c", script], timeout=30).stdout
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples

    def pinger(self, interval: float = 0.2) -> Pinger:
        """ICMP echo A -> B through the tunnel every *interval* seconds, timestamped."""
        pinger = Pinger(self.lab.host_a, FLATNET["b"], interval)
        self.processes.append(pinger)
        return pinger


class Pinger:
    """``ping -D`` in a namespace; :meth:`finish` stops it and returns the reply times (wall
    clock, as ``time.time()``), from which :func:`longest_gap` measures an outage."""

    def __init__(self, ns, address: str, interval: float) -> None:
        self.interval = interval
        self.proc = ns.popen(
            ["ping", "-D", "-n", "-i", str(interval), "-W", "1", address],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.output = ""

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            out, _ = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        self.output += out or ""
        return self.output

    def finish(self) -> list[float]:
        self.stop()
        replies = []
        for line in self.output.splitlines():
            if line.startswith("[") and "bytes from" in line:
                replies.append(float(line[1 : line.index("]")]))
        return replies


def longest_gap(replies: list[float], start: float, end: float) -> float:
    """The longest time without a reply that overlaps [start, end] (seconds): the outage seen
    by a steady pinger. No reply after *start* at all is an unbounded outage."""
    before = [t for t in replies if t <= start]
    after = [t for t in replies if t > start]
    if not before or not after:
        return float("inf")
    times = [before[-1]] + [t for t in after if t <= end] + [t for t in after if t > end][:1]
    return max(b - a for a, b in zip(times, times[1:], strict=False))
