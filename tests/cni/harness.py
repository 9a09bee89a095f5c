"""Drive the installed CNI plugin binary the way a runtime does: env + stdin, inside a host netns."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cni import cli
from cni.ipam import AddressPool
from cni.links import HOST_IFNAME_PREFIX
from flatnet.netns import Namespace
from flatnet.node.control import ControlClient

SUBNET = "10.87.1.0/24"
REPO = Path(__file__).resolve().parents[2]
NODE_BIN = str(REPO / ".venv" / "bin" / "flatnet-node")


@dataclass
class CniHost:
    """A simulated WSL2 host: a namespace, the installed plugin, its conflist and data dir."""

    ns: Namespace
    base: Path
    node: subprocess.Popen | None = None
    conf: dict[str, Any] = field(default_factory=dict)

    @property
    def plugin(self) -> Path:
        return self.base / "plugins" / "flatnet"

    @property
    def socket(self) -> Path:
        return self.base / "node.sock"

    @classmethod
    def create(cls, ns: Namespace, base: Path) -> CniHost:
        conf = cli.conflist("flatnet", SUBNET, str(base / "data"), str(base / "node.sock"))
        cli.install(base / "plugins", base / "net.d", conf)
        return cls(ns, base, conf=conf)

    def netconf(self, version: str = "1.0.0", **extra: Any) -> dict[str, Any]:
        """The conflist's plugin entry as a runtime passes it on stdin."""
        return {"cniVersion": version, "name": self.conf["name"], **self.conf["plugins"][0], **extra}

    def call(self, command: str, netconf: dict | bytes | None, container_id: str = "", netns: str = "",
             ifname: str = "eth0", args: str = "IgnoreUnknown=1;K8S_POD_NAME=test", extra_env: dict | None = None,
             drop: tuple[str, ...] = ()) -> tuple[int, Any]:
        env = {"PATH": os.environ["PATH"], "CNI_COMMAND": command, "CNI_CONTAINERID": container_id,
               "CNI_NETNS": netns, "CNI_IFNAME": ifname, "CNI_ARGS": args, "CNI_PATH": str(self.plugin.parent)}
        env.update(extra_env or {})
        for key in drop:
            env.pop(key, None)
        stdin = netconf if isinstance(netconf, bytes) else json.dumps(netconf or {}).encode()
        proc = subprocess.run(self.ns.command([str(self.plugin)]), input=stdin, env=env, capture_output=True,
                              timeout=60)
        out = proc.stdout.decode()
        return proc.returncode, (json.loads(out) if out.strip() else None)

    def leases(self) -> dict:
        return AddressPool(self.base / "data", "flatnet", __import__("ipaddress").IPv4Network(SUBNET)).leases()

    def flatnet_links(self) -> list[str]:
        with self.ns.ipr() as ip:
            names = [link.get_attr("IFLA_IFNAME") for link in ip.get_links()]
        return [n for n in names if n.startswith(HOST_IFNAME_PREFIX)]

    def host_routes(self) -> list[str]:
        return self.ns.run(["ip", "-4", "route", "show"]).stdout.split("\n")

    # -- the node ---------------------------------------------------------------------------------

    def start_node(self, gateway_url: str | None = None, token_file: Path | None = None,
                   read_labels: bool = True) -> None:
        lines = ['name = "wsl-test"', f'control_socket = "{self.socket}"', "[cni]", f'subnet = "{SUBNET}"',
                 f'data_dir = "{self.base / "data"}"', f"read_labels = {str(read_labels).lower()}"]
        if gateway_url:
            lines += ["[gateway]", f'admin_url = "{gateway_url}"', f'token_file = "{token_file}"',
                      "retry_interval = 0.1"]
        (self.base / "node.toml").write_text("\n".join(lines) + "\n")
        log = open(self.base / "node.log", "ab")  # noqa: SIM115 - closed in stop_node
        self.node = subprocess.Popen(self.ns.command([NODE_BIN, "--config", str(self.base / "node.toml")]),
                                     stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                ControlClient(self.socket, timeout=2).call("ping")
                return
            except OSError:
                if self.node.poll() is not None:
                    break
                time.sleep(0.05)
        self.stop_node()
        raise RuntimeError("flatnet-node did not start: " + (self.base / "node.log").read_text()[-2000:])

    def stop_node(self) -> None:
        if self.node is not None:
            self.node.terminate()
            try:
                self.node.wait(10)
            except subprocess.TimeoutExpired:
                self.node.kill()
                self.node.wait()
            self.node = None

    def services(self, wait_for: int | None = None, timeout: float = 30.0) -> list[dict]:
        """The node's registry; with *wait_for*, poll until it has that many entries (lookups are async)."""
        deadline = time.monotonic() + timeout
        while True:
            services = ControlClient(self.socket).call("services")["services"]
            if wait_for is None or len(services) == wait_for or time.monotonic() > deadline:
                return services
            time.sleep(0.05)


def python_in(ns: Namespace, code: str) -> str:
    return ns.run([sys.executable, "-c", code]).stdout
