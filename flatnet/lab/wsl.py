"""A lab WSL2 host's Flatnet stack: ``flatnet-node``, the CNI plugin and a private Podman.

Per WSL2 host the lab keeps ``<state>/<host>/``: ``node.toml``, the node's control socket, the CNI
IPAM store, the plugin executable (``flatnet cni install``) and a Podman environment of its own
(:class:`flatnet.podman.PodmanEnv`: runc, CNI backend, own storage and the offline busybox image).
Podman runs inside the host's namespace through ``nsenter``, so the plugin puts the container's
veth there and the node, also running there, pushes the container's route to the gateway through
the Windows host's WSL-facing admin address.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from flatnet.errors import UserError
from flatnet.lab.gateway import subcommands
from flatnet.lab.topology import ADMIN_PORT, Topology

TUNNEL_PORT = 4242


def stack_missing() -> str | None:
    """Why containers on ``--network flatnet`` cannot run in the lab, or None if they can."""
    if shutil.which("podman") is None:
        return "podman is not installed"
    try:
        import flatnet.podman  # noqa: F401
        from flatnet.node.main import build_node  # noqa: F401
    except Exception as exc:  # not landed yet, or half-landed: the lab reports it and carries on
        return f"flatnet-node / flatnet.podman cannot be imported: {type(exc).__name__}: {exc}"
    if "install" not in subcommands("cni.cli"):
        return "`flatnet cni install` is not available yet"
    return None


def pki_missing() -> str | None:
    """Why the lab cannot issue certificates with ``flatnet cert``, or None if it can."""
    missing = {"ca", "sign"} - subcommands("flatnet.pki.cli")
    return f"`flatnet cert {' / '.join(sorted(missing))}` is not available" if missing else None


def flatnet_ip(topology: Topology, host: str) -> ipaddress.IPv4Address:
    """A WSL2 host's own Flatnet address: the first address of its container subnet (10.87.N.1)."""
    return next(ipaddress.ip_network(topology.container_subnets[host]).hosts())


def issue_certificates(state_dir: Path, topology: Topology) -> Path:
    """The lab's CA and one certificate per WSL2 host, made with ``flatnet cert`` as a team would."""
    pki = state_dir / "pki"
    pki.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "flatnet.cli", "cert"]
    steps = [[*cli, "ca", "--name", "Flatnet lab", "--network", "10.87.0.0/16",
              "--out-crt", str(pki / "ca.crt"), "--out-key", str(pki / "ca.key")]]  # fmt: skip
    for host in topology.wsl_hosts:
        steps.append([
            *cli, "sign", "--ca-crt", str(pki / "ca.crt"), "--ca-key", str(pki / "ca.key"), "--name", host,
            "--ip", f"{flatnet_ip(topology, host)}/16", "--subnets", topology.container_subnets[host],
            "--groups", "lab", "--out-crt", str(pki / f"{host}.crt"), "--out-key", str(pki / f"{host}.key"),
        ])  # fmt: skip
    for argv in steps:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise UserError(f"{' '.join(argv[3:5])} failed: {(result.stderr or result.stdout).strip()[-300:]}")
    return pki


def control_ping(socket_path: Path, timeout: float = 1.0) -> bool:
    """Does the node's control socket answer ``{"cmd": "ping"}`` (one JSON object per line)?"""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(socket_path))
            sock.sendall(b'{"cmd": "ping"}\n')
            answer = sock.makefile("rb").readline()
        return bool(json.loads(answer).get("ok"))
    except (OSError, ValueError, AttributeError):
        return False


def tunnel_peers(socket_path: Path, timeout: float = 2.0) -> list[dict]:
    """The node's tunnel peers from its control socket (``status``); [] if it does not answer.

    Each: ip, name, up, endpoint, handshake_age (seconds or None), rx_bytes, tx_bytes.
    """
    from flatnet.node.control import ControlClient, ControlError

    try:
        status = ControlClient(socket_path, timeout=timeout).call("status")
    except (OSError, ControlError, ValueError):
        return []
    peers = []
    for ip, peer in sorted(status.get("peers", {}).items()):
        peers.append({
            "ip": ip, "name": peer.get("name"), "up": bool(peer.get("up")), "endpoint": peer.get("endpoint"),
            "handshake_age": peer.get("handshake_age"),
            "rx_bytes": peer.get("tunnel_rx_bytes", peer.get("rx_bytes", 0)),
            "tx_bytes": peer.get("tunnel_tx_bytes", peer.get("tx_bytes", 0)),
        })  # fmt: skip
    return peers


class WslStack:
    """Paths and commands of one WSL2 host's node, plugin and Podman."""

    def __init__(self, state_dir: Path, topology: Topology, host: str) -> None:
        self.host = host
        self.topology = topology
        self.dir = state_dir / host
        self.node_config = self.dir / "node.toml"
        self.control_socket = self.dir / "node.sock"
        self.cni_data = self.dir / "cni"
        self.plugin_dir = self.dir / "cni-plugins"
        self.podman_base = self.dir / "podman"

    def underlay_address(self) -> str:
        """The VM's own address (its eth0 toward the Windows host): where its tunnel listens."""
        return self.topology.link_between(self.topology.gateway_host, self.host).address_of(self.host) or ""

    def write_node_config(self, token_file: Path, pki: Path | None) -> Path:
        """node.toml; with *pki* the node also runs the tunnel, its static peers the other WSL2 hosts."""
        from flatnet.podman import PodmanEnv

        self.dir.mkdir(parents=True, exist_ok=True)
        podman = PodmanEnv.create(self.podman_base, plugin_dirs=[self.plugin_dir])
        admin = f"http://{self.topology.gateway_address_for(self.host)}:{ADMIN_PORT}"
        # Without certificates the node serves its own containers only (no tunnel): point it at
        # files that do not exist rather than at /etc/flatnet.
        pki_dir = pki or self.dir / "no-pki"
        tunnel = ""
        if pki is not None:
            tunnel = f'[tunnel]\nlisten_host = "{self.underlay_address()}"\nlisten_port = {TUNNEL_PORT}\n'
            for other in self.topology.wsl_hosts:
                if other != self.host:
                    peer = WslStack(self.dir.parent, self.topology, other)
                    tunnel += (
                        f'[[peers]]\nip = "{flatnet_ip(self.topology, other)}"\n'
                        f'endpoints = ["{peer.underlay_address()}:{TUNNEL_PORT}"]\n'
                    )
        self.node_config.write_text(
            f'name = "{self.host}"\n'
            f'control_socket = "{self.control_socket}"\n'
            "[pki]\n"
            f'ca = "{pki_dir}/ca.crt"\n'
            f'cert = "{pki_dir}/{self.host}.crt"\n'
            f'key = "{pki_dir}/{self.host}.key"\n'
            f"{tunnel}"
            "[cni]\n"
            f'data_dir = "{self.cni_data}"\n'
            f'subnet = "{self.topology.container_subnets[self.host]}"\n'
            f'plugin_dir = "{self.plugin_dir}"\n'
            f'conf_dir = "{podman.network_config_dir}"\n'
            "[gateway]\n"
            f'admin_url = "{admin}"\n'
            f'token_file = "{token_file}"\n'
            "retry_interval = 0.5\n"
        )
        return self.node_config

    def node_argv(self) -> list[str]:
        return [sys.executable, "-m", "flatnet.node.main", "--config", str(self.node_config)]

    def install_argv(self) -> list[str]:
        return [sys.executable, "-m", "flatnet.cli", "cni", "install", "--config", str(self.node_config)]

    def podman(self):
        from flatnet.podman import PodmanEnv

        return PodmanEnv(self.podman_base.resolve(), [self.plugin_dir.resolve()])
