"""A netavark plugin front end (Podman 5's network stack) over the same core as the CNI plugin.

netavark's plugin API 1.0.0: the executable is called as ``PLUGIN create`` / ``setup NETNS`` /
``teardown NETNS`` / ``info`` with JSON on stdin and JSON on stdout; a failure is
``{"error": "text"}`` on stdout and a non-zero exit.

- ``create``: the network definition (``subnets[0].subnet`` or ``options.subnet`` is this host's
  subnet); we fill in the gateway and return it.
- ``setup``: ``{"container_id", "container_name", "port_mappings", "network", "network_options":
  {"interface_name", ...}}``; answers a status block with the interface's MAC and subnet.
- ``teardown``: the same input; no output.

Each request becomes a :class:`cni.spec.CniRequest` (ADD / DEL) and takes the plugin's path: the
node when it runs, the core in this process when not, so registration works the same way.
Debian 12 ships netavark 1.4, which predates plugins; only the JSON contract is tested here.
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from cni import plugin
from cni.spec import ARG_POD_NAME, CniError, CniRequest

API_VERSION = "1.0.0"
PLUGIN_VERSION = "0.1.0"
CNI_VERSION = "1.0.0"


class NetavarkError(Exception):
    pass


def _network_conf(network: Mapping[str, Any]) -> dict[str, Any]:
    options = network.get("options") or {}
    subnets = network.get("subnets") or []
    subnet = options.get("subnet") or (subnets[0].get("subnet") if subnets and isinstance(subnets[0], dict) else None)
    if not subnet:
        raise NetavarkError("network has no subnet (subnets[0].subnet or options.subnet)")
    conf: dict[str, Any] = {"cniVersion": CNI_VERSION, "name": str(network.get("name") or "flatnet"), "subnet": subnet}
    for option, key in (("data_dir", "dataDir"), ("node_socket", "nodeSocket"), ("flatnet_range", "flatnetRange")):
        if option in options:
            conf[key] = options[option]
    if "mtu" in options:
        conf["mtu"] = int(options["mtu"])
    return conf


def create(network: dict[str, Any]) -> dict[str, Any]:
    conf = _network_conf(network)
    from cni.core import PluginConfig  # validation only; no netlink

    try:
        checked = PluginConfig.from_netconf(conf)
    except CniError as exc:
        raise NetavarkError(f"{exc.msg}: {exc.details}") from None
    network = dict(network)
    network["driver"] = network.get("driver") or "flatnet"
    network["subnets"] = [{"subnet": str(checked.subnet), "gateway": str(checked.gateway)}]
    return network


def _request(command: str, netns: str, body: Mapping[str, Any]) -> CniRequest:
    network = body.get("network")
    if not isinstance(network, dict):
        raise NetavarkError("missing 'network'")
    container_id = body.get("container_id")
    if not isinstance(container_id, str) or not container_id:
        raise NetavarkError("missing 'container_id'")
    options = body.get("network_options") or {}
    ifname = str(options.get("interface_name") or "eth0")
    conf = _network_conf(network)
    mappings = [{"containerPort": m.get("container_port"), "hostPort": m.get("host_port"),
                 "protocol": m.get("protocol", "tcp")} for m in body.get("port_mappings") or [] if isinstance(m, dict)]
    conf["runtimeConfig"] = {"portMappings": mappings}
    args = {ARG_POD_NAME: str(body.get("container_name") or "")}
    podman_env = {k: os.environ[k] for k in ("CONTAINERS_CONF", "CONTAINERS_STORAGE_CONF") if k in os.environ}
    return CniRequest(command, container_id, netns, ifname, args, "", conf, podman_env)


def _via_plugin_path(request: CniRequest, fallback_paths: Sequence[str]) -> dict[str, Any] | None:
    try:
        try:
            return plugin.ask_node(str(request.config.get("nodeSocket") or plugin.DEFAULT_NODE_SOCKET), request)
        except plugin.NodeUnavailable:
            return plugin.run_locally(request, fallback_paths)
    except CniError as exc:
        raise NetavarkError(f"{exc.msg}: {exc.details}" if exc.details else exc.msg) from None


def setup(netns: str, body: Mapping[str, Any], fallback_paths: Sequence[str] = ()) -> dict[str, Any]:
    request = _request("ADD", netns, body)
    result = _via_plugin_path(request, fallback_paths) or {}
    container = next((i for i in result.get("interfaces", []) if i.get("sandbox")), {})
    subnets = []
    for ip in result.get("ips", []):
        iface = ipaddress.IPv4Interface(ip["address"])
        subnets.append({"ipnet": str(iface), "gateway": ip.get("gateway")})
    return {"dns_search_domains": [], "dns_server_ips": [],
            "interfaces": {request.ifname: {"mac_address": container.get("mac", ""), "subnets": subnets}}}


def teardown(netns: str, body: Mapping[str, Any], fallback_paths: Sequence[str] = ()) -> None:
    _via_plugin_path(_request("DEL", netns, body), fallback_paths)


def info() -> dict[str, Any]:
    return {"version": PLUGIN_VERSION, "api_version": API_VERSION,
            "description": "Flatnet: containers reachable through the office gateway"}


def run(argv: Sequence[str], stdin: bytes, fallback_paths: Sequence[str] = ()) -> tuple[dict[str, Any] | None, int]:
    """(JSON for stdout or None, exit status) for one invocation; argv without the program name."""
    try:
        if not argv:
            raise NetavarkError("usage: PLUGIN create|setup NETNS|teardown NETNS|info")
        command = argv[0]
        if command == "info":
            return info(), 0
        try:
            body = json.loads(stdin or b"null")
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise NetavarkError(f"failed to decode input: {exc}") from None
        if not isinstance(body, dict):
            raise NetavarkError("expected a JSON object on stdin")
        if command == "create":
            return create(body), 0
        if command in ("setup", "teardown"):
            if len(argv) < 2 or not argv[1]:
                raise NetavarkError(f"{command} needs the network namespace path")
            if command == "setup":
                return setup(argv[1], body, fallback_paths), 0
            teardown(argv[1], body, fallback_paths)
            return None, 0
        raise NetavarkError(f"unknown command {command!r}")
    except NetavarkError as exc:
        return {"error": str(exc)}, 1
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}, 1


def main(argv: Sequence[str] | None = None, fallback_paths: Sequence[str] = ()) -> int:
    output, status = run(list(sys.argv[1:] if argv is None else argv), sys.stdin.buffer.read(), fallback_paths)
    if output is not None:
        sys.stdout.write(json.dumps(output) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
