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
import dataclasses
import hashlib
import logging
import signal
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from flatnet.config import ConfigError
from flatnet.node.cni_service import CniService, GatewayAdminAdapter, GatewayPusher, ServiceRegistry
from flatnet.node.config import DEFAULT_CONFIG_PATH, NodeConfig, load_node_config
from flatnet.node.control import BAD_REQUEST, ControlError, ControlServer
from flatnet.node.reload import ReloadPlan, changed_files, plan_reload, referenced_files
from flatnet.observability import log_event

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
        self.registry, self.owner = pusher.registry, pusher.owner  # for a pusher built on reload

    async def start(self) -> None:
        if self.pusher is not None:
            self._task = asyncio.get_running_loop().create_task(self.pusher.run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        close = getattr(self.adapter, "close", None)
        if close is not None:
            await close()

    def prepare_reload(self, plan):
        """New push settings: read the token now (may fail), then swap in a fresh pusher whose
        first push is a full sync. Returns ``async apply() -> list[str]`` or None."""
        if plan.gateway is None:
            return None
        gateway = plan.gateway
        if not gateway.admin_url:
            async def stop_pushing() -> list[str]:
                await self.stop()
                self.pusher = self.adapter = None
                return ["gateway: no admin_url, routes are no longer pushed"]
            return stop_pushing
        adapter = GatewayAdminAdapter(gateway.admin_url, read_token(gateway))
        registry, owner = self.registry, self.owner

        async def apply() -> list[str]:
            await self.stop()
            self.pusher = GatewayPusher(registry, adapter, owner, gateway.resync_interval, gateway.retry_interval)
            self.adapter = adapter
            await self.start()
            return [f"gateway: pushing to {gateway.admin_url}, full resync"]
        return apply


def read_token(gateway) -> str:
    """The admin token from ``gateway.token_file`` ("" without one); ConfigError if unreadable."""
    if gateway.token_file is None:
        return ""
    try:
        return gateway.token_file.read_text().strip()
    except OSError as exc:
        raise ConfigError("", "gateway.token_file", f"{gateway.token_file}: {exc.strerror or exc}") from None


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

    # ---- reload without restart (flatnet/node/reload.py) --------------------------------------

    config_path: Path | None = None
    loaded_files: dict = field(default_factory=dict)  # referenced file -> digest, as last loaded
    reloads: Counter = field(default_factory=Counter)  # outcome -> count
    _reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def reload(self) -> ReloadPlan:
        """Re-read the config file and apply what changed. Raises ConfigError (naming file and key)
        and changes nothing when the new config does not load or a component cannot prepare."""
        async with self._reload_lock:
            try:
                plan = await self._reload()
            except Exception as exc:
                self.reloads["failed"] += 1
                log_event(log, "config.reload_failed", logging.ERROR, msg="config reload refused, nothing changed", file=str(self.config_path), error=str(exc))
                raise
            self.reloads["ok"] += 1
            return plan

    async def _reload(self) -> ReloadPlan:
        if self.config_path is None:
            raise ConfigError("", "", "this node was started without a config file: nothing to reload")
        source = str(self.config_path)
        new = load_node_config(self.config_path)
        digests = file_digests(new)
        plan = plan_reload(self.config, new, changed_files(self.loaded_files, digests))
        appliers = []
        for component in self.components:
            prepare = getattr(component, "prepare_reload", None)
            if prepare is None:
                continue
            try:
                apply = prepare(plan)
            except ConfigError as exc:
                raise ConfigError(source, exc.key, exc.message) from None
            if apply is not None:
                appliers.append(apply)
        if plan.gateway is not None and plan.gateway.admin_url and not any(
            isinstance(c, PusherComponent) for c in self.components
        ):
            try:
                token = read_token(plan.gateway)
            except ConfigError as exc:
                raise ConfigError(source, exc.key, exc.message) from None
            adapter = GatewayAdminAdapter(plan.gateway.admin_url, token)
            pusher = PusherComponent(GatewayPusher(self.registry, adapter, self.config.name,
                                                   plan.gateway.resync_interval, plan.gateway.retry_interval), adapter)

            async def start_pushing() -> list[str]:
                await pusher.start()
                self.components.append(pusher)
                return [f"gateway: pushing to {plan.gateway.admin_url}, full resync"]
            appliers.append(start_pushing)
        if (plan.trust or plan.identity) and not any(hasattr(c, "engine") for c in self.components):
            plan = dataclasses.replace(plan, needs_restart=(*plan.needs_restart, "pki (the tunnel is off)"))
        # Everything prepared: from here on nothing may fail half-way.
        done = []
        for apply in appliers:
            result = apply()
            if asyncio.iscoroutine(result):
                result = await result
            done += result
        self.config = plan.config
        self.loaded_files = digests
        for component in self.components:
            if isinstance(component, PusherComponent):
                self.pusher = component.pusher
        log_event(log, "config.reloaded", msg="config reloaded", file=source, changes=plan.changes, needs_restart=list(plan.needs_restart),
                  done=done)
        return plan


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
        if config.lighthouse.hosts:  # publish this host's services; follow everyone's if asked
            from flatnet.node.catalogue import CatalogueComponent

            gw = config.gateway
            catalogue = CatalogueComponent(
                config.name, registry, lambda: tunnel.escalation.discovery if tunnel.escalation else None,
                admin_client, gw.follow_catalogue, gw.catalogue_interval, gw.resync_interval, gw.retry_interval,
                clock=tunnel.clock)  # the clock discovery runs on: the client's deadlines are in it
            catalogue.register(control)
            node.components.append(catalogue)
    else:  # a node without a certificate serves its own host's containers only (and says so)
        log.error("no certificate at %s: the tunnel is off (see `flatnet cert sign`)", config.pki.cert)
    # Prometheus /metrics last: started when everything it reads exists, stopped first.
    from flatnet.node.metrics_component import metrics_component

    exporter = metrics_component(node)
    if exporter is not None:
        node.components.append(exporter)
    return node


def file_digests(config: NodeConfig) -> dict:
    """SHA-256 of each file a reload re-reads (None: unreadable now)."""
    out = {}
    for path in referenced_files(config):
        try:
            out[path] = hashlib.sha256(path.read_bytes()).digest()
        except OSError:
            out[path] = None
    return out


def register_reload(node: Node) -> None:
    """Serve ``reload`` on the node's control socket: ``{"changes": [...], "needs_restart": [...]}``,
    or code 400 with the ConfigError (file and key) when the new config was refused."""

    async def reload(request: dict) -> dict:
        try:
            plan = await node.reload()
        except (ConfigError, ValueError, OSError) as exc:
            raise ControlError(BAD_REQUEST, str(exc)) from None
        return plan.summary()

    node.control.register("reload", reload)


async def run_node(config: NodeConfig, stop: asyncio.Event | None = None, config_path: str | Path | None = None) -> None:
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    node = build_node(config)
    node.config_path = Path(config_path) if config_path is not None else None
    node.loaded_files = file_digests(config)
    register_reload(node)
    reloads: set[asyncio.Task] = set()

    async def reload_on_signal() -> None:
        with contextlib.suppress(Exception):  # logged as config.reload_failed by Node.reload
            await node.reload()

    def on_hup() -> None:
        task = loop.create_task(reload_on_signal())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    await node.start()
    log.info("flatnet-node %s ready on %s", config.name, config.control_socket)
    try:
        await stop.wait()
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
        for task in list(reloads):
            task.cancel()
        await asyncio.gather(*reloads, return_exceptions=True)
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

    uvloop.run(run_node(config, config_path=args.config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
