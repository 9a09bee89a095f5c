"""``flatnet-node --config node.toml``: the per-host daemon (asyncio on uvloop).

The node is a list of components, each with ``async start()`` and ``async stop()``, started in
order and stopped in reverse. Today: the control socket, the CNI service (netlink work for the
plugin, the host's service registry) and the gateway pusher. The tunnel's ``Dataplane`` joins the
list in :func:`build_node` with a few lines.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from dataclasses import dataclass, field
from typing import Any, Protocol

from flatnet.config import ConfigError
from flatnet.node.cni_service import CniService, GatewayAdminAdapter, GatewayPusher, ServiceRegistry
from flatnet.node.config import DEFAULT_CONFIG_PATH, NodeConfig, load_node_config
from flatnet.node.control import ControlServer

log = logging.getLogger("flatnet.node")


class Component(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


class ControlComponent:
    def __init__(self, server: ControlServer) -> None:
        self.server = server

    async def start(self) -> None:
        await self.server.start()

    async def stop(self) -> None:
        await self.server.close()


class PusherComponent:
    def __init__(self, pusher: GatewayPusher, adapter: Any = None) -> None:
        self.pusher = pusher
        self.adapter = adapter
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.pusher.run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        close = getattr(self.adapter, "close", None)
        if close is not None:
            await close()


@dataclass
class Node:
    config: NodeConfig
    control: ControlServer
    registry: ServiceRegistry
    cni: CniService
    pusher: GatewayPusher | None = None
    components: list[Component] = field(default_factory=list)

    async def start(self) -> None:
        started: list[Component] = []
        try:
            for component in self.components:
                await component.start()
                started.append(component)
        except BaseException:
            for component in reversed(started):
                await component.stop()
            raise

    async def stop(self) -> None:
        for component in reversed(self.components):
            with contextlib.suppress(Exception):
                await component.stop()


def build_node(config: NodeConfig, admin_client: Any = None) -> Node:
    """Wire the components; *admin_client* overrides the gateway client (tests)."""
    control = ControlServer(config.control_socket)
    registry = ServiceRegistry()
    cni = CniService(config, registry)
    cni.register(control)

    async def ping(request: dict) -> dict:
        return {"name": config.name, "commands": control.commands}

    control.register("ping", ping)
    node = Node(config, control, registry, cni)
    # The control socket first: the plugin falls back to doing ADD itself until it answers, and
    # the CNI service's reconcile then picks those containers up from the IPAM store.
    node.components = [ControlComponent(control), cni]
    if admin_client is None and config.gateway.admin_url:
        token = config.gateway.token_file.read_text().strip() if config.gateway.token_file else ""
        admin_client = GatewayAdminAdapter(config.gateway.admin_url, token)
    if admin_client is not None:
        node.pusher = GatewayPusher(registry, admin_client, config.name, config.gateway.resync_interval,
                                    config.gateway.retry_interval)
        node.components.append(PusherComponent(node.pusher, admin_client))
    # The tunnel (TUN + UDP + Dataplane, flatnet/node/tunnel_component.py); its status on the socket.
    from flatnet.node.tunnel_component import TunnelComponent

    if config.pki.cert.exists():
        tunnel = TunnelComponent(config)
        tunnel.register(control)
        node.components.append(tunnel)
    else:  # a node without a certificate serves its own host's containers only (and says so)
        log.error("no certificate at %s: the tunnel is off (see `flatnet cert sign`)", config.pki.cert)
    return node


async def run_node(config: NodeConfig, stop: asyncio.Event | None = None) -> None:
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    node = build_node(config)
    await node.start()
    log.info("flatnet-node %s ready on %s", config.name, config.control_socket)
    try:
        await stop.wait()
    finally:
        await node.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flatnet-node", description="Flatnet's per-host daemon")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG_PATH), help="node configuration (TOML)")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-json", action="store_true", help="log JSON lines (docs/operations.md, Logs)")
    args = parser.parse_args(argv)
    from flatnet.observability import setup_logging

    setup_logging(json=args.log_json, level=args.log_level)
    try:
        config = load_node_config(args.config)
    except ConfigError as exc:
        print(f"flatnet-node: {exc}", file=sys.stderr)
        return 1
    import uvloop

    uvloop.run(run_node(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
