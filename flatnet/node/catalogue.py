"""The service catalogue on the node: publish this host's services, follow everyone's onto a gateway.

Theory of operation
-------------------
**Publishing** (every node with lighthouses): the host's :class:`ServiceRegistry` (the CNI
service's containers) is turned into the lighthouse's ``Service`` list by
:func:`published_services` and handed to ``LighthouseClient.set_services`` at start and on every
registry change. The client sends it to every lighthouse and again whenever a lighthouse says it
had no record of us (``RegisterAck.new``: it restarted), so the catalogue heals by itself.

**Following** (``[gateway] follow_catalogue = true``): every ``catalogue_interval`` seconds the
node asks the lighthouses for the whole catalogue (``request_catalogue``; the client pages through
the first lighthouse to answer). :func:`catalogue_routes` turns the entries into gateway routes for
every *other* host, and :class:`CatalogueFollower` decides when to ``sync`` them to the gateway
under the owner ``catalogue.<node name>`` (a sync replaces exactly that owner's routes, so services
gone from the catalogue disappear; the host's own routes keep coming from its registry under the
node's own owner). The gateway reaches those containers through this node's tunnel: the Windows
host routes the whole Flatnet range via this node (docs/gateway.md, "Following the catalogue").

Naming rule (deterministic, the same on every run for the same catalogue):

1. A service name published by one host only, and not held on the gateway by another owner, keeps
   its name: ``web``.
2. A name published by several hosts (this host counts), or already held on the gateway by another
   owner, is given to no other host bare: each other host's service becomes
   ``<name>-<host label>`` (``web-wsl2``), the host label being the host's name as a DNS label
   (its Flatnet IP with dashes if the name makes no label). The name part is shortened so the
   whole fits 63 characters. No host "wins" a shared name, so a host joining never silently moves
   ``web`` from one host's container to another's.
3. If that suffixed name is itself taken (published bare, held, or given already), ``-2``, ``-3``,
   ... is appended, in order of (name, host IP).
4. A service that the gateway already serves with exactly the same backends under another owner
   (that host pushes to this gateway itself) is skipped: it is there already.

Entries whose name is not a valid route name (or is reserved, ``api``) are skipped and counted.
Containers of one host sharing a name share one route (several backends, at most 16).

A host that stops publishing (it left, its lighthouse record expired, or a lighthouse restarted and
has not heard from it yet) keeps its routes for ``hold`` seconds after it was last seen, so a
restarted lighthouse does not make every route blink.

:func:`catalogue_routes` and :class:`CatalogueFollower` are sans-I/O (``now`` in, decisions out);
:class:`CatalogueComponent` is the asyncio edge in ``flatnet-node``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

from flatnet.gateway.routes import MAX_BACKENDS, Route, RouteError, check_name
from flatnet.node.cni_service import ROUTE_MODE, ServiceRegistry, route_name
from flatnet.proto.control import MAX_NAME_LENGTH, MAX_SERVICES, CatalogueEntry
from flatnet.proto.control import Service as PublishedService

log = logging.getLogger("flatnet.node.catalogue")

CATALOGUE_OWNER_PREFIX = "catalogue."  # the gateway's owner names allow [a-z0-9._-], not ":"
MAX_HOST_LABEL = 24  # the host part of a suffixed name, so the service part stays readable


def catalogue_owner(node_name: str) -> str:
    """``catalogue.<node name>``: the owner the follower's routes are synced under."""
    return CATALOGUE_OWNER_PREFIX + route_name(node_name, "node")


# --- publishing ---------------------------------------------------------------------------------


def published_services(registry: ServiceRegistry, counters: Counter | None = None) -> tuple[PublishedService, ...]:
    """The registry's exposed services as the lighthouse's ``Service`` list (at most MAX_SERVICES,
    in name order; the rest are counted, not published)."""
    out = []
    for service in registry.services():
        if not service.expose or len(service.name.encode()) > MAX_NAME_LENGTH:
            continue
        out.append(PublishedService(service.name, service.address, service.port))
    if len(out) > MAX_SERVICES and counters is not None:
        counters["publish.over-limit"] += len(out) - MAX_SERVICES
    return tuple(out[:MAX_SERVICES])


# --- the routes a catalogue means ---------------------------------------------------------------


def host_label(host_name: str, host_ip: IPv4Address) -> str:
    label = route_name(host_name, str(host_ip).replace(".", "-"))[:MAX_HOST_LABEL].strip("-")
    return label or str(host_ip).replace(".", "-")


def _suffixed(name: str, suffix: str) -> str:
    base = name[: 63 - len(suffix) - 1].rstrip("-") or name[:1]
    return f"{base}-{suffix}"


def catalogue_routes(
    entries: Iterable[CatalogueEntry],
    own_host: IPv4Address,
    owner: str,
    held: Mapping[str, tuple[str, ...]] | None = None,
    counters: Counter | None = None,
) -> list[Route]:
    """The gateway routes for every host's services but *own_host*'s (see the naming rule above).

    *held*: route name -> backends of the routes other owners hold on the gateway now (optional).
    Returned sorted by name; every route has *owner*.
    """
    held = held or {}
    counters = counters if counters is not None else Counter()
    hosts_by_name: dict[str, set[IPv4Address]] = {}
    backends: dict[tuple[IPv4Address, str], list[str]] = {}
    host_names: dict[IPv4Address, str] = {}
    for entry in entries:
        service = entry.service
        try:
            check_name(service.name)
        except RouteError:
            counters["skipped.bad-name"] += 1
            continue
        if not 1 <= service.port <= 65535:
            counters["skipped.bad-port"] += 1
            continue
        hosts_by_name.setdefault(service.name, set()).add(entry.host_ip)
        host_names.setdefault(entry.host_ip, entry.host_name)
        if entry.host_ip == own_host:
            continue
        listed = backends.setdefault((entry.host_ip, service.name), [])
        backend = f"{service.ip}:{service.port}"
        if backend in listed:
            continue
        if len(listed) >= MAX_BACKENDS:
            counters["skipped.too-many-backends"] += 1
            continue
        listed.append(backend)

    taken = set(hosts_by_name) | set(held)
    routes: dict[str, Route] = {}
    suffixed: list[tuple[str, int, IPv4Address]] = []
    for (host_ip, name), listed in backends.items():
        if name in held and tuple(sorted(held[name])) == tuple(sorted(listed)):
            counters["skipped.served-by-its-host"] += 1
            continue
        if len(hosts_by_name[name]) == 1 and name not in held:
            routes[name] = Route(name, tuple(listed), ROUTE_MODE, owner=owner)
        else:
            suffixed.append((name, int(host_ip), host_ip))
    for name, _, host_ip in sorted(suffixed):
        candidate = _suffixed(name, host_label(host_names[host_ip], host_ip))
        n = 1
        while candidate in taken or candidate in routes:
            n += 1
            candidate = _suffixed(name, f"{host_label(host_names[host_ip], host_ip)}-{n}")
        try:
            routes[candidate] = Route(candidate, tuple(backends[(host_ip, name)]), ROUTE_MODE, owner=owner)
        except RouteError:
            counters["skipped.bad-name"] += 1
            continue
        counters["renamed"] += 1
    return [routes[name] for name in sorted(routes)]


# --- when to fetch and when to push -------------------------------------------------------------


@dataclass(frozen=True)
class FetchCatalogue:
    """Ask the lighthouses for the catalogue (``LighthouseClient.request_catalogue``)."""


@dataclass(frozen=True)
class SyncRoutes:
    """``sync(owner, generation, routes)`` on the gateway; report back with ``push_done``."""

    owner: str
    generation: int
    routes: tuple[Route, ...]


@dataclass(frozen=True)
class FollowerSettings:
    interval: float = 10.0  # between catalogue fetches
    hold: float = 40.0  # a host's entries outlive its last appearance by this much
    resync_interval: float = 30.0  # a full sync even without change (a restarted gateway heals)
    retry_interval: float = 1.0  # after a failed push or fetch
    fetch_timeout: float = 15.0  # no answer nor failure by then: ask again (a lost event)


class CatalogueFollower:
    """Decides when to fetch the catalogue and when to sync the gateway (sans-I/O).

    Generations start at *generation_base* (the I/O layer passes the wall clock in ms, so a
    restarted follower's first sync is newer than anything its previous life sent) and grow by one
    per sync; a retried push after a failure takes a new one too.
    """

    def __init__(self, own_host: IPv4Address, owner: str, generation_base: int,
                 settings: FollowerSettings | None = None, now: float = 0.0) -> None:
        self.own_host = own_host
        self.owner = owner
        self.settings = settings or FollowerSettings()
        self.generation = generation_base
        self.counters: Counter[str] = Counter()
        self.held: dict[str, tuple[str, ...]] = {}  # other owners' routes on the gateway (optional input)
        self._hosts: dict[IPv4Address, tuple[float, tuple[CatalogueEntry, ...]]] = {}  # last seen, entries
        self._have_catalogue = False
        self._next_fetch = now
        self._fetch_deadline: float | None = None
        self.desired: tuple[Route, ...] = ()
        self.pushed: tuple[Route, ...] | None = None  # what the gateway holds for us; None: unknown
        self._in_flight: tuple[Route, ...] | None = None
        self._next_resync = now
        self._retry_at = now

    # --- inputs ---

    def catalogue_received(self, entries: Iterable[CatalogueEntry], now: float) -> None:
        by_host: dict[IPv4Address, list[CatalogueEntry]] = {}
        for entry in entries:
            by_host.setdefault(entry.host_ip, []).append(entry)
        for host_ip, listed in by_host.items():
            self._hosts[host_ip] = (now, tuple(listed))
        for host_ip in [h for h, (seen, _) in self._hosts.items() if now - seen > self.settings.hold]:
            del self._hosts[host_ip]
            self.counters["host-forgotten"] += 1
        self._have_catalogue = True
        self._fetch_deadline = None
        self._next_fetch = now + self.settings.interval
        self.counters["catalogue.received"] += 1
        self._recompute()

    def catalogue_failed(self, now: float) -> None:
        self.counters["catalogue.failed"] += 1
        self._fetch_deadline = None
        self._next_fetch = now + min(self.settings.retry_interval * 5, self.settings.interval)

    def set_held(self, held: Mapping[str, tuple[str, ...]]) -> None:
        """Route name -> backends held on the gateway by other owners (from its route list)."""
        self.held = dict(held)
        self._recompute()

    def push_done(self, ok: bool, now: float) -> None:
        routes, self._in_flight = self._in_flight, None
        if ok:
            self.pushed = routes
            self._next_resync = now + self.settings.resync_interval
            self.counters["sync.ok"] += 1
        else:
            self.pushed = None
            self._retry_at = now + self.settings.retry_interval
            self.counters["sync.failed"] += 1

    # --- decisions ---

    def tick(self, now: float) -> list[FetchCatalogue | SyncRoutes]:
        out: list[FetchCatalogue | SyncRoutes] = []
        if self._fetch_deadline is not None and now >= self._fetch_deadline:
            self.counters["catalogue.lost"] += 1
            self._fetch_deadline = None
        if self._fetch_deadline is None and now >= self._next_fetch:
            self._fetch_deadline = now + self.settings.fetch_timeout
            self._next_fetch = now + self.settings.interval
            out.append(FetchCatalogue())
        if (
            self._have_catalogue
            and self._in_flight is None
            and now >= self._retry_at
            and (self.pushed != self.desired or now >= self._next_resync)
        ):
            self.generation += 1
            self._in_flight = self.desired
            out.append(SyncRoutes(self.owner, self.generation, self.desired))
        return out

    def next_deadline(self) -> float:
        deadlines = [self._next_fetch if self._fetch_deadline is None else self._fetch_deadline]
        if self._have_catalogue and self._in_flight is None:
            deadlines.append(max(self._retry_at, self._next_resync if self.pushed == self.desired else 0.0))
        return min(deadlines)

    def _recompute(self) -> None:
        entries = [e for _, listed in self._hosts.values() for e in listed]
        self.desired = tuple(catalogue_routes(entries, self.own_host, self.owner, self.held, self.counters))

    def status(self) -> dict[str, Any]:
        return {
            "owner": self.owner,
            "generation": self.generation,
            "hosts": len(self._hosts),
            "routes": [r.name for r in self.desired],
            "in_sync": self.pushed == self.desired,
            "counters": dict(self.counters),
        }


# --- the asyncio edge ---------------------------------------------------------------------------


class CatalogueComponent:
    """In ``flatnet-node`` after the tunnel: publishes the registry through the tunnel's discovery
    and, with *admin_client* and ``follow_catalogue``, follows the catalogue onto the gateway.

    *admin_client*: ``sync(owner, generation, routes as JSON dicts)`` (the node's
    ``GatewayAdminAdapter``); *discovery_of*: returns the tunnel's ``NodeDiscovery`` once started;
    *clock*: the clock that discovery runs on (the tunnel's Unix time), since ``request_catalogue``
    takes ``now`` and the client times the fetch out on its own ticks.
    """

    def __init__(self, node_name: str, registry: ServiceRegistry, discovery_of: Callable[[], Any],
                 admin_client: Any = None, follow: bool = False, interval: float = 10.0,
                 resync_interval: float = 30.0, retry_interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic, tick_interval: float = 0.25) -> None:
        self.node_name = node_name
        self.registry = registry
        self.discovery_of = discovery_of
        self.admin_client = admin_client
        self.follow = follow and admin_client is not None
        self.settings = FollowerSettings(interval=interval, hold=max(40.0, 4 * interval),
                                         resync_interval=resync_interval, retry_interval=retry_interval)
        self.clock = clock
        self.tick_interval = tick_interval
        self.counters: Counter[str] = Counter()
        self.follower: CatalogueFollower | None = None
        self.discovery = None
        self._events: list[Any] = []
        self._task: asyncio.Task | None = None
        self._running = False
        self._subscribed = False

    async def start(self) -> None:
        self.discovery = self.discovery_of()
        if self.discovery is None:
            if self.follow:
                log.error("follow_catalogue needs [lighthouse] hosts: not following")
            return
        self._running = True
        if not self._subscribed:
            self._subscribed = True
            self.registry.subscribe(self._registry_changed)
        self._registry_changed()
        if self.follow:
            self.discovery.catalogue_event = self._events.append
            cert_ip = self.discovery.engine.certificate.ip.ip
            self.follower = CatalogueFollower(cert_ip, catalogue_owner(self.node_name), int(time.time() * 1000),
                                              self.settings, self.clock())
            self._task = asyncio.get_running_loop().create_task(self._run(), name="catalogue")

    def _registry_changed(self) -> None:
        if not self._running or self.discovery is None:
            return
        self.counters["published"] += 1
        self.discovery.client.set_services(published_services(self.registry, self.counters))

    async def _run(self) -> None:
        from lighthouse.client import CatalogueReceived

        follower = self.follower
        assert follower is not None
        while True:
            try:
                now = self.clock()
                events, self._events[:] = list(self._events), []
                for event in events:
                    if isinstance(event, CatalogueReceived):
                        follower.catalogue_received(event.entries, now)
                    else:
                        follower.catalogue_failed(now)
                for decision in follower.tick(now):
                    if isinstance(decision, FetchCatalogue):
                        self.discovery.client.request_catalogue(now)
                        await self._read_held()
                    else:
                        await self._push(decision)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not end following for the life of the node
                self.counters["internal-error"] += 1
                log.exception("catalogue round failed")
            await asyncio.sleep(self.tick_interval)

    async def _read_held(self) -> None:
        """Names other owners hold on the gateway now (a node pushing there itself, routes set by
        hand): the catalogue gives them to no other host bare. Kept as it was if the gateway does
        not answer (the push will fail and be retried anyway)."""
        list_routes = getattr(self.admin_client, "list", None)
        if list_routes is None:
            return
        try:
            table = await list_routes()
        except Exception as exc:
            self.counters["gateway-list-failed"] += 1
            log.debug("reading the gateway's routes failed: %s", exc)
            return
        owner = self.follower.owner
        self.follower.set_held({r.name: tuple(r.backends) for r in table.routes if r.owner != owner})

    async def _push(self, decision: SyncRoutes) -> None:
        follower = self.follower
        try:
            await self.admin_client.sync(decision.owner, decision.generation, [r.to_json() for r in decision.routes])
        except Exception as exc:
            log.warning("syncing catalogue routes to the gateway failed: %s", exc)
            follower.push_done(False, self.clock())
        else:
            follower.push_done(True, self.clock())

    async def stop(self) -> None:
        self._running = False
        if self.discovery is not None and self.follow:
            self.discovery.catalogue_event = _ignore
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def prepare_reload(self, plan):
        """New ``[gateway]`` settings: read the token now (may raise ConfigError), then restart
        following with them (a fresh follower: its first sync replaces what the old one pushed).
        Returns ``async apply() -> list[str]`` or None."""
        gateway = plan.gateway
        if gateway is None or self.discovery is None:
            return None
        admin_client = None
        if gateway.admin_url and gateway.follow_catalogue:
            from flatnet.node.cni_service import GatewayAdminAdapter
            from flatnet.node.main import read_token

            admin_client = GatewayAdminAdapter(gateway.admin_url, read_token(gateway))

        async def apply() -> list[str]:
            await self.stop()
            self.admin_client = admin_client
            self.follow = admin_client is not None
            interval = gateway.catalogue_interval
            self.settings = FollowerSettings(interval=interval, hold=max(40.0, 4 * interval),
                                             resync_interval=gateway.resync_interval,
                                             retry_interval=gateway.retry_interval)
            self.follower = None
            await self.start()
            return [f"catalogue: following onto {gateway.admin_url}" if self.follow else "catalogue: not following"]
        return apply

    def register(self, server) -> None:
        """``catalogue`` on the node's control socket: what is published and followed."""

        async def catalogue(request: dict) -> dict:
            return self.status()

        server.register("catalogue", catalogue)

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"counters": dict(self.counters), "following": self.follower is not None}
        if self.discovery is not None:
            out["published"] = [f"{s.name} {s.ip}:{s.port}" for s in self.discovery.client.services]
        if self.follower is not None:
            out["follower"] = self.follower.status()
        return out


def _ignore(event: Any) -> None:
    return None
