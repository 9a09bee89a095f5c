"""Two Flatnet hosts in two namespaces joined by a veth, each running the tunnel component.

Used by the real-namespace tests and by bench/tunnel: a CA and two host certificates written to a
directory, one node config each, ``python -m flatnet.node.tunnel_component`` started in each
namespace (``Namespace.popen``), stopped with SIGTERM (which removes the TUN and its routes).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from flatnet.pki.cert import new_ca, sign_host
from flatnet.pki.files import write_certificate, write_host_key

UNDERLAY = {"a": "192.168.87.1", "b": "192.168.87.2"}
FLATNET = {"a": "10.87.1.1", "b": "10.87.2.1"}
SUBNET = {"a": "10.87.1.0/24", "b": "10.87.2.0/24"}
PORT = 4242


def write_pki_and_configs(directory: Path, tun_name: str = "flatnet0", extra: dict | None = None) -> dict[str, Path]:
    """CA, certs, keys and a node.toml per side; returns side -> config path."""
    directory.mkdir(parents=True, exist_ok=True)
    now = int(time.time())
    ca_cert, ca_key = new_ca("lab-ca", not_after=now + 86400 * 365, not_before=now - 3600)
    write_certificate(directory / "ca.crt", ca_cert, force=True)
    configs = {}
    for side, other in (("a", "b"), ("b", "a")):
        key = X25519PrivateKey.generate()
        cert = sign_host(
            ca_cert, ca_key, f"host-{side}", f"{FLATNET[side]}/16", [SUBNET[side]], ["hosts"],
            key.public_key().public_bytes_raw(), now - 3600, now + 86400 * 30,
        )
        write_certificate(directory / f"{side}.crt", cert, force=True)
        write_host_key(directory / f"{side}.key", key, force=True)
        text = (
            f'name = "host-{side}"\n'
            f'control_socket = "{directory}/{side}.sock"\n'
            f"[pki]\nca = \"{directory}/ca.crt\"\ncert = \"{directory}/{side}.crt\"\nkey = \"{directory}/{side}.key\"\n"
            f'[tunnel]\nlisten_host = "{UNDERLAY[side]}"\nlisten_port = {PORT}\ntun_name = "{tun_name}"\n'
        )
        for key_name, value in (extra or {}).items():
            text += f"{key_name} = {value}\n"
        text += f'[[peers]]\nip = "{FLATNET[other]}"\nendpoints = ["{UNDERLAY[other]}:{PORT}"]\n'
        path = directory / f"{side}.toml"
        path.write_text(text)
        configs[side] = path
    return configs


def build_underlay(ns_a, ns_b, mtu: int | None = None) -> None:
    from flatnet.netns import veth

    veth(ns_a, "u0", ns_b, "u0", mtu=mtu)
    ns_a.add_address("u0", f"{UNDERLAY['a']}/24")
    ns_b.add_address("u0", f"{UNDERLAY['b']}/24")


@dataclass
class NodeProcess:
    ns: object
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
        return "".join(self.output) + (out or "")


def start_node(ns, config: Path, timeout: float = 20.0) -> NodeProcess:
    proc = ns.popen(
        [sys.executable, "-m", "flatnet.node.tunnel_component", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    node = NodeProcess(ns, proc)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.strip() == "ready":
            return node
        node.output.append(line)
    out = node.stop()
    raise RuntimeError(f"node in {ns.name} did not start:\n{out}")
