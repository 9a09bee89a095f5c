"""The node's side of the CNI plugin: do the netlink work, keep the host's service registry, push it.

Flow for one container start::

    podman ─exec─▶ cni plugin ──"cni" request──▶ CniService.handle_cni
                                                   │ CniCore.add (in a worker thread: IPAM + netlink)
                   ◀──────── result ───────────────┤
                                                   └▶ resolve labels (podman container inspect, async:
                                                      Podman holds the container's lock until it has
                                                      started, so this cannot happen inside ADD)
                                                      ─▶ ServiceRegistry ─▶ GatewayPusher ─▶ gateway

:class:`ServiceRegistry` and :func:`service_for` are plain values and functions (tested without
Podman or a gateway); :class:`GatewayPusher` drives any object with the admin client's
``sync/upsert/delete`` coroutines (an in-memory twin in tests, the gateway's
``AsyncAdminClient`` in production).

Labels (read through Podman): ``flatnet.port=3000`` (the app's HTTP port), ``flatnet.name=shop``
(the route name; default: the container's name), ``flatnet.expose=false`` (do not publish). Without
a port label, the first TCP port mapping's container port (``-p 8080:3000`` gives 3000), else 80.

Two readings, so the gateway knows before the container has even started: at ADD, the labels on
the command line of the ``podman run`` that ran the plugin (``/proc/<pid>/cmdline``: instant, but
blind to labels baked into the image); then ``podman container inspect``, which waits for Podman to
release the container (after it started) and is the final word. A container whose image alone says
``flatnet.expose=false`` is thus published for the moment between the two.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from cni import links
from cni.core import CniCore, PluginConfig, guard
from cni.ipam import Lease
from cni.spec import CniError, CniRequest
from flatnet.node.config import NodeConfig
from flatnet.node.control import BAD_REQUEST, ControlError, ControlServer
from flatnet.observability import (
    CNI_ADD,
    CNI_DEL,
    CNI_FAILED,
    ROUTE_PUSH_FAILED,
    ROUTE_PUSHED,
    ROUTE_REMOVED,
    log_event,
)

log = logging.getLogger(__name__)

LABEL_PORT = "flatnet.port"
LABEL_NAME = "flatnet.name"
LABEL_EXPOSE = "flatnet.expose"
DEFAULT_HTTP_PORT = 80
ROUTE_MODE = "strip"
LABEL_LOOKUP_TIMEOUT = 30.0  # seconds; Podman answers once the container has started
_NOT_A_LABEL_CHAR = re.compile(r"[^a-z0-9-]+")


# -- what a container publishes -------------------------------------------------------------------


@dataclass(frozen=True)
class Service:
    """One container's entry in the host's registry."""

    container_id: str
    name: str  # the route name (a DNS label)
    address: ipaddress.IPv4Address
    port: int
    expose: bool = True

    @property
    def backend(self) -> str:
        return f"{self.address}:{self.port}"

    def route_json(self, owner: str) -> dict[str, Any]:
        return {"name": self.name, "backends": [self.backend], "mode": ROUTE_MODE, "port": None, "owner": owner}


def route_name(text: str, fallback: str) -> str:
    """A DNS label from a container name: lower case, runs of other characters become ``-``."""
    name = _NOT_A_LABEL_CHAR.sub("-", text.lower()).strip("-")[:63].strip("-")
    return name or fallback


def service_for(container_id: str, container_name: str, address: ipaddress.IPv4Address,
                labels: Mapping[str, str], port_mappings: list[dict[str, Any]]) -> Service:
    """Decide name, port and exposure: label, else port mappings, else 80 (see module doc)."""
    fallback = f"c-{container_id[:12]}"
    name = route_name(labels.get(LABEL_NAME) or container_name, fallback)
    expose = labels.get(LABEL_EXPOSE, "true").strip().lower() not in ("false", "0", "no", "off")
    port = DEFAULT_HTTP_PORT
    label_port = labels.get(LABEL_PORT, "").strip()
    if label_port.isdigit() and 1 <= int(label_port) <= 65535:
        port = int(label_port)
    else:
        for mapping in port_mappings:
            if isinstance(mapping, dict) and str(mapping.get("protocol", "tcp")).lower() == "tcp":
                container_port = mapping.get("containerPort")
                if isinstance(container_port, int) and 1 <= container_port <= 65535:
                    port = container_port
                    break
    return Service(container_id, name, address, port, expose)


class ServiceRegistry:
    """The host's containers by id; ``routes(owner)`` is what the gateway should hold for us."""

    def __init__(self) -> None:
        self._services: dict[str, Service] = {}
        self.generation = 0  # bumps on every change
        self._listeners: list[Callable[[], None]] = []

    def subscribe(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def put(self, service: Service) -> None:
        if self._services.get(service.container_id) != service:
            self._services[service.container_id] = service
            self._changed()

    def remove(self, container_id: str) -> Service | None:
        service = self._services.pop(container_id, None)
        if service is not None:
            self._changed()
        return service

    def get(self, container_id: str) -> Service | None:
        return self._services.get(container_id)

    def services(self) -> list[Service]:
        return sorted(self._services.values(), key=lambda s: (s.name, s.container_id))

    def routes(self, owner: str) -> dict[str, dict[str, Any]]:
        """Route name -> route JSON. Two containers asking for one name share it (both backends)."""
        routes: dict[str, dict[str, Any]] = {}
        for service in self.services():
            if not service.expose:
                continue
            if service.name in routes:
                routes[service.name]["backends"].append(service.backend)
            else:
                routes[service.name] = service.route_json(owner)
        return routes

    def _changed(self) -> None:
        self.generation += 1
        for listener in self._listeners:
            listener()


# -- pushing the registry to the gateway ----------------------------------------------------------


class AdminClient(Protocol):
    """What the gateway's ``flatnet.gateway.admin.AsyncAdminClient`` offers (routes as JSON here)."""

    async def sync(self, owner: str, generation: int, routes: list[dict[str, Any]]) -> Any: ...
    async def upsert(self, route: dict[str, Any]) -> Any: ...
    async def delete(self, name: str) -> Any: ...


class GatewayAdminAdapter:
    """Adapts ``flatnet.gateway.admin.AsyncAdminClient`` (which takes ``Route`` objects) to dict routes."""

    def __init__(self, base_url: str, token: str) -> None:
        from flatnet.gateway import admin  # the gateway package; imported only when pushing is on

        self._admin = admin
        self._client = admin.AsyncAdminClient(base_url, token)

    def _route(self, route: dict[str, Any]) -> Any:
        return self._admin.Route(name=route["name"], backends=list(route["backends"]), mode=route["mode"],
                                 owner=route["owner"])

    async def sync(self, owner: str, generation: int, routes: list[dict[str, Any]]) -> Any:
        return await self._client.sync(owner=owner, generation=generation, routes=[self._route(r) for r in routes])

    async def upsert(self, route: dict[str, Any]) -> Any:
        return await self._client.upsert(self._route(route))

    async def delete(self, name: str) -> Any:
        return await self._client.delete(name)

    async def list(self) -> Any:
        """The gateway's ``RouteTable`` (routes as ``Route`` objects, with their owners)."""
        return await self._client.list()

    async def close(self) -> None:
        close = getattr(self._client, "close", None) or getattr(self._client, "aclose", None)
        if close is not None:
            result = close()
            if asyncio.iscoroutine(result):
                await result


def route_problem(route: dict[str, Any]) -> str | None:
    """Why the gateway would refuse *route* (its own rules, ``flatnet.gateway.routes``), or None.

    A refused route must not reach the admin API: the whole sync would fail with it, and with it
    every other container's route.
    """
    from flatnet.gateway.routes import Route, RouteError

    try:
        Route.from_json(route)
    except (RouteError, ValueError, TypeError, KeyError) as exc:
        return str(exc)
    return None


class GatewayPusher:
    """Keeps the gateway's routes for this node equal to the registry's.

    Changes go out at once as upserts and deletes; a full ``sync`` (which replaces everything this
    owner had) runs at start, after any failed push, and every *resync_interval* seconds, so a
    gateway restart or a missed change heals. The sync generation starts from the wall clock in ms
    so a restarted node never sends a generation lower than its previous life did.
    """

    def __init__(self, registry: ServiceRegistry, client: AdminClient, owner: str,
                 resync_interval: float = 30.0, retry_interval: float = 1.0) -> None:
        self.registry = registry
        self.client = client
        self.owner = owner
        self.resync_interval = resync_interval
        self.retry_interval = retry_interval
        self.published: dict[str, dict[str, Any]] | None = None  # None: unknown, full sync needed
        self.sync_generation = int(time.time() * 1000)
        self.pushes = 0
        self.failures = 0
        self.refused: set[str] = set()  # route names the gateway's rules reject (never pushed)
        self._dirty = asyncio.Event()
        registry.subscribe(self._dirty.set)

    async def push_once(self, full: bool = False) -> None:
        """Bring the gateway up to date (raises on failure; the next push is then a full sync)."""
        desired = {}
        refused = set()
        for name, route in self.registry.routes(self.owner).items():
            problem = route_problem(route)
            if problem:
                refused.add(name)
                if name not in self.refused:
                    log.warning("not publishing %s: %s", name, problem)
            else:
                desired[name] = route
        self.refused = refused
        try:
            if full or self.published is None:
                self.sync_generation += 1
                await self.client.sync(self.owner, self.sync_generation, list(desired.values()))
            else:
                for name in sorted(set(self.published) - set(desired)):
                    await self.client.delete(name)
                    log_event(log, ROUTE_REMOVED, route=name)
                for name, route in desired.items():
                    if self.published.get(name) != route:
                        await self.client.upsert(route)
                        log_event(log, ROUTE_PUSHED, route=name, backends=",".join(map(str, route.get("backends", []))))
        except BaseException:
            self.published = None
            raise
        self.published = {k: {**v, "backends": list(v["backends"])} for k, v in desired.items()}
        self.pushes += 1

    async def run(self) -> None:
        next_full = 0.0
        loop = asyncio.get_running_loop()
        while True:
            self._dirty.clear()
            full = loop.time() >= next_full
            try:
                await self.push_once(full=full)
                if full:
                    next_full = loop.time() + self.resync_interval
                timeout = max(0.0, next_full - loop.time())
            except Exception as exc:
                self.failures += 1
                log_event(log, ROUTE_PUSH_FAILED, logging.WARNING, msg=f"pushing routes to the gateway failed: {exc}",
                          error=str(exc))
                timeout = self.retry_interval
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), timeout)


# -- reading labels through Podman ----------------------------------------------------------------


async def podman_labels(container_id: str, podman_env: Mapping[str, str]) -> dict[str, str] | None:
    """The container's labels via ``podman container inspect`` (None: no such container)."""
    env = dict(os.environ)
    env.update(podman_env)
    proc = await asyncio.create_subprocess_exec(
        "podman", "container", "inspect", "--format", "{{json .Config.Labels}}", container_id,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), LABEL_LOOKUP_TIMEOUT)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        return None
    labels = json.loads(out or b"null")
    return {str(k): str(v) for k, v in (labels or {}).items()}


def labels_from_podman_argv(argv: list[str]) -> dict[str, str] | None:
    """``--label k=v`` / ``-l k=v`` / ``--label=k=v`` of a ``podman [container] run`` command line.

    None when *argv* is not one (``podman start``, ``network reload``, another runtime) or uses
    ``--label-file``: then only ``podman inspect`` can tell.
    """
    if not argv or not os.path.basename(argv[0]).startswith("podman"):
        return None
    head = argv[1:8]
    if "run" not in head:
        return None
    labels: dict[str, str] = {}
    tokens = iter(argv[1 + head.index("run") + 1:])
    for token in tokens:
        if token == "--":
            break
        if token.startswith("--label-file"):
            return None
        if token in ("--label", "-l"):
            value = next(tokens, "")
        elif token.startswith("--label="):
            value = token[len("--label="):]
        elif token.startswith("-l") and not token.startswith("--") and len(token) > 2:
            value = token[2:]
        else:
            continue
        key, _, text = value.partition("=")
        labels[key] = text
    return labels


def labels_from_runtime(pid: int, levels: int = 3) -> dict[str, str] | None:
    """Labels from the ``podman run`` that ran the plugin: its parent, or an ancestor a few levels
    up (a wrapper script between Podman and the plugin is allowed)."""
    for _ in range(levels):
        if pid <= 1:
            return None
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
            with open(f"/proc/{pid}/stat", "rb") as f:
                parent = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return None
        labels = labels_from_podman_argv(argv)
        if labels is not None:
            return labels
        pid = parent
    return None


# -- the service ----------------------------------------------------------------------------------


class CniService:
    """Serves ``cni`` (the plugin's requests) and ``services`` on the control socket."""

    def __init__(self, config: NodeConfig, registry: ServiceRegistry, core: CniCore | None = None,
                 label_reader: Callable[..., Any] = podman_labels) -> None:
        self.config = config
        self.registry = registry
        self.core = core or CniCore()
        self.label_reader = label_reader
        self._lookups: dict[str, asyncio.Task] = {}
        self.requests = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self.metrics = None  # flatnet.observability.Metrics: CNI calls and their latency

    def register(self, server: ControlServer) -> None:
        server.register("cni", self.handle_cni)
        server.register("services", self.handle_services)

    async def start(self) -> None:
        await self.reconcile()

    async def stop(self) -> None:
        for task in list(self._lookups.values()):
            task.cancel()
        await asyncio.gather(*self._lookups.values(), return_exceptions=True)
        self._lookups.clear()

    async def handle_services(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"services": [{"containerId": s.container_id, "name": s.name, "address": str(s.address),
                              "port": s.port, "expose": s.expose} for s in self.registry.services()],
                "generation": self.registry.generation}

    async def handle_cni(self, message: dict[str, Any]) -> dict[str, Any]:
        try:
            request = CniRequest.from_json(message["request"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ControlError(BAD_REQUEST, f"bad cni request: {exc}") from None
        self.requests += 1
        self._loop = asyncio.get_running_loop()
        started = time.monotonic()
        try:
            result = await asyncio.to_thread(self._run, request)
        except CniError as exc:
            self._observe(request, "failed", started)
            log_event(log, CNI_FAILED, logging.WARNING, command=request.command, container=(request.container_id or "")[:12],
                      error=str(exc))
            return {"cniError": exc.to_json(request.cni_version)}
        except BaseException:
            self._observe(request, "failed", started)
            raise
        self._observe(request, "ok", started)
        if request.command in ("ADD", "DEL"):
            ips = (result or {}).get("ips") or [{}]
            address = ips[0].get("address", "") if request.command == "ADD" else ""
            log_event(log, CNI_ADD if request.command == "ADD" else CNI_DEL, container=(request.container_id or "")[:12],
                      **({"address": address} if address else {}))
        return {"result": result}

    def _observe(self, request: CniRequest, outcome: str, started: float) -> None:
        if self.metrics is not None:
            self.metrics["cni_calls_total"].labels(command=request.command, outcome=outcome).inc()
            self.metrics["cni_call_seconds"].labels(command=request.command).observe(time.monotonic() - started)

    def _run(self, request: CniRequest) -> dict[str, Any] | None:
        """In a worker thread: the core's work, then hand registry changes to the event loop."""
        loop = self._loop
        if request.command == "ADD":
            with guard(request.command):
                outcome = self.core.add(request)
            address = outcome.attachment.address.ip
            quick = labels_from_runtime(request.runtime_pid)
            loop.call_soon_threadsafe(self._container_added, address, outcome.lease, quick)
            return outcome.attachment.result(request.cni_version)
        if request.command == "DEL":
            self.core.handle(request)
            loop.call_soon_threadsafe(self._container_removed, request.container_id)
            return None
        if request.command == "GC":
            conf = PluginConfig.from_netconf(request.config)
            before = {lease.container_id for lease in conf.pool().leases().values()}
            self.core.handle(request)
            after = {lease.container_id for lease in conf.pool().leases().values()}
            for container_id in before - after:
                loop.call_soon_threadsafe(self._container_removed, container_id)
            return None
        return self.core.handle(request)

    def _container_added(self, address: ipaddress.IPv4Address, lease: Lease,
                         quick_labels: dict[str, str] | None = None) -> None:
        old = self._lookups.pop(lease.container_id, None)
        if old is not None:
            old.cancel()
        if quick_labels is not None:
            self.registry.put(service_for(lease.container_id, lease.name, address, quick_labels, lease.port_mappings))
        task = asyncio.get_running_loop().create_task(self._register(address, lease))
        self._lookups[lease.container_id] = task
        task.add_done_callback(lambda t, cid=lease.container_id: self._lookups.pop(cid, None) if self._lookups.get(cid) is t else None)

    def _container_removed(self, container_id: str) -> None:
        task = self._lookups.pop(container_id, None)
        if task is not None:
            task.cancel()
        self.registry.remove(container_id)

    async def _register(self, address: ipaddress.IPv4Address, lease: Lease) -> None:
        labels: dict[str, str] | None = {}
        try:
            if self.config.cni.read_labels:
                labels = await self.label_reader(lease.container_id, lease.podman_env)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # podman missing or slow: publish with what the plugin passed
            log.warning("reading labels of %s failed: %s", lease.container_id[:12], exc)
            labels = {}
        if labels is None:
            # Podman does not know the container: another runtime (netavark front end, a CNI tool)
            # or a Podman with other config files. A Podman container removed meanwhile cannot be
            # the reason: its DEL cancels this lookup first.
            labels = {}
        self.registry.put(service_for(lease.container_id, lease.name, address, labels, lease.port_mappings))

    def plugin_config(self) -> PluginConfig | None:
        if self.config.cni.subnet is None:
            return None
        return PluginConfig(network=self.config.cni.network, subnet=self.config.cni.subnet,
                            data_dir=self.config.cni.data_dir, flatnet_range=self.config.flatnet_range,
                            node_socket=str(self.config.control_socket), mtu=self.config.cni.mtu)

    async def reconcile(self) -> None:
        """At start: register leased containers whose veth exists; free leases whose veth is gone.

        Covers ADDs the plugin did on its own while the node was down, and DELs that happened then.
        """
        conf = self.plugin_config()
        if conf is None:
            return
        pool = conf.pool()
        leases = await asyncio.to_thread(pool.leases)
        present = await asyncio.to_thread(links.host_side_names)
        for address, lease in leases.items():
            host_ifname = lease.host_ifname or links.host_ifname_for(lease.container_id, lease.ifname)
            if host_ifname in present:
                self._container_added(address, lease)
            else:
                log.info("freeing %s: container %s is gone", address, lease.container_id[:12])
                await asyncio.to_thread(pool.release_address, address, lease.container_id)

