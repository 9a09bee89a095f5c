"""The service catalogue on the node: the routes a catalogue means, when the follower fetches and
syncs (fake clock), and publish -> lighthouse -> follow with real LighthouseCores in memory."""

from __future__ import annotations

import asyncio
from collections import Counter
from ipaddress import IPv4Address

import pytest

from flatnet.gateway.admin import RouteTable
from flatnet.gateway.routes import Route
from flatnet.node.catalogue import (
    CatalogueComponent,
    CatalogueFollower,
    FetchCatalogue,
    FollowerSettings,
    SyncRoutes,
    catalogue_owner,
    catalogue_routes,
    published_services,
)
from flatnet.node.cni_service import Service as RegistryService
from flatnet.node.cni_service import ServiceRegistry
from flatnet.proto.control import MAX_SERVICES, CatalogueEntry
from flatnet.proto.control import Service as PublishedService
from lighthouse.client import CatalogueReceived
from tests.lighthouse.test_client import Network

A, B, C = IPv4Address("10.87.1.1"), IPv4Address("10.87.2.1"), IPv4Address("10.87.3.1")
NAMES = {A: "wsl-a", B: "wsl2", C: "Bob's PC"}
OWNER = "catalogue.wsl-a"


def entry(host, name, last_octet, port=80):
    ip = IPv4Address(int(host) - 1 + last_octet)  # 10.87.N.<last_octet>
    return CatalogueEntry(NAMES[host], host, PublishedService(name, ip, port))


def table(routes):
    return {r.name: list(r.backends) for r in routes}


# --- catalogue_routes ---------------------------------------------------------------------------


def test_other_hosts_services_become_routes_and_our_own_do_not():
    routes = catalogue_routes([entry(A, "shop", 2), entry(B, "web", 2, 3000), entry(C, "db-ui", 5)], A, OWNER)
    assert table(routes) == {"db-ui": ["10.87.3.5:80"], "web": ["10.87.2.2:3000"]}
    assert {r.owner for r in routes} == {OWNER}
    assert {r.mode for r in routes} == {"strip"}


def test_a_name_several_hosts_publish_is_suffixed_with_the_host_for_every_other_host():
    counters = Counter()
    entries = [entry(A, "web", 2), entry(B, "web", 2), entry(C, "web", 7), entry(C, "api-docs", 3)]
    routes = catalogue_routes(entries, A, OWNER, counters=counters)
    # our own "web" stays ours (pushed from the registry); C's host name is made a DNS label
    assert table(routes) == {"api-docs": ["10.87.3.3:80"], "web-bob-s-pc": ["10.87.3.7:80"],
                             "web-wsl2": ["10.87.2.2:80"]}
    assert counters["renamed"] == 2
    # no host wins a shared name even when we do not publish it
    routes = catalogue_routes([entry(B, "web", 2), entry(C, "web", 7)], A, OWNER)
    assert sorted(table(routes)) == ["web-bob-s-pc", "web-wsl2"]


def test_the_rule_is_deterministic_whatever_the_order_of_entries():
    entries = [entry(B, "web", 2), entry(C, "web", 7), entry(B, "web-wsl2", 9), entry(B, "x", 4)]
    first = catalogue_routes(entries, A, OWNER)
    assert first == catalogue_routes(list(reversed(entries)), A, OWNER)
    # "web-wsl2" is published bare by B itself, so B's "web" takes the next free suffix
    assert table(first) == {"web-bob-s-pc": ["10.87.3.7:80"], "web-wsl2": ["10.87.2.9:80"],
                            "web-wsl2-2": ["10.87.2.2:80"], "x": ["10.87.2.4:80"]}


def test_containers_of_one_host_sharing_a_name_share_a_route():
    routes = catalogue_routes([entry(B, "web", 2), entry(B, "web", 3), entry(B, "web", 3)], A, OWNER)
    assert table(routes) == {"web": ["10.87.2.2:80", "10.87.2.3:80"]}


def test_bad_names_are_skipped_and_counted_and_long_names_fit_a_label():
    counters = Counter()
    long = "s" * 63
    entries = [entry(B, "api", 2), entry(B, "Not_A_Label", 3), entry(B, long, 4), entry(C, long, 5)]
    routes = catalogue_routes(entries, A, OWNER, counters=counters)
    assert counters["skipped.bad-name"] == 2
    assert sorted(len(r.name) for r in routes) == [63, 63]
    assert sorted(r.name.rsplit("-", 1)[1] for r in routes) == ["pc", "wsl2"]


def test_names_held_by_other_owners_on_the_gateway():
    counters = Counter()
    held = {"web": ("10.87.2.2:80",), "docs": ("10.87.9.9:80",)}
    routes = catalogue_routes([entry(B, "web", 2), entry(C, "docs", 4)], A, OWNER, held, counters)
    # B pushes its own "web" to this gateway: already served; "docs" is someone else's: suffixed
    assert table(routes) == {"docs-bob-s-pc": ["10.87.3.4:80"]}
    assert counters["skipped.served-by-its-host"] == 1


def test_owner_is_a_valid_gateway_owner():
    assert catalogue_owner("WSL-A") == "catalogue.wsl-a"


def test_published_services_are_the_exposed_ones_capped():
    registry = ServiceRegistry()
    registry.put(RegistryService("c1", "web", IPv4Address("10.87.1.2"), 3000))
    registry.put(RegistryService("c2", "hidden", IPv4Address("10.87.1.3"), 80, expose=False))
    assert published_services(registry) == (PublishedService("web", IPv4Address("10.87.1.2"), 3000),)
    for i in range(MAX_SERVICES + 2):
        registry.put(RegistryService(f"x{i}", f"s{i:02d}", IPv4Address(f"10.87.1.{10 + i}"), 80))
    counters = Counter()
    assert len(published_services(registry, counters)) == MAX_SERVICES
    assert counters["publish.over-limit"] == 3


# --- CatalogueFollower on a fake clock ----------------------------------------------------------


def follower(now=0.0, base=1000, **settings):
    return CatalogueFollower(A, OWNER, base, FollowerSettings(**settings), now)


def test_fetch_then_sync_then_quiet_until_a_change_or_the_resync():
    f = follower(interval=10.0, resync_interval=30.0)
    assert f.tick(0.0) == [FetchCatalogue()]
    assert f.tick(1.0) == []  # waiting for the answer
    f.catalogue_received([entry(B, "web", 2)], 1.0)
    (sync,) = f.tick(1.0)
    assert isinstance(sync, SyncRoutes) and sync.owner == OWNER and sync.generation == 1001
    assert table(sync.routes) == {"web": ["10.87.2.2:80"]}
    assert f.tick(2.0) == []  # one push in flight at a time
    f.push_done(True, 2.0)
    assert f.tick(5.0) == []
    assert f.tick(11.0) == [FetchCatalogue()]
    f.catalogue_received([entry(B, "web", 2)], 11.0)
    assert f.tick(11.0) == []  # nothing changed
    f.catalogue_received([entry(B, "web", 2), entry(C, "web", 3)], 12.0)
    (sync,) = f.tick(12.0)
    assert sync.generation == 1002 and sorted(table(sync.routes)) == ["web-bob-s-pc", "web-wsl2"]
    f.push_done(True, 12.0)
    assert [d for d in f.tick(42.0) if isinstance(d, SyncRoutes)][0].generation == 1003  # periodic resync
    assert f.next_deadline() == 57.0  # the fetch sent at 42 times out at 57; the push is in flight


def test_a_failed_push_is_retried_with_a_new_generation():
    f = follower(retry_interval=1.0)
    f.tick(0.0)
    f.catalogue_received([entry(B, "web", 2)], 0.0)
    (sync,) = f.tick(0.0)
    f.push_done(False, 0.5)
    assert f.tick(1.0) == []
    (again,) = f.tick(1.5)
    assert again.generation == sync.generation + 1 and again.routes == sync.routes


def test_a_host_missing_from_the_catalogue_is_held_then_dropped():
    f = follower(interval=10.0, hold=40.0)
    f.tick(0.0)
    f.catalogue_received([entry(B, "web", 2), entry(C, "db", 2)], 0.0)
    f.catalogue_received([entry(C, "db", 2)], 10.0)  # B gone (e.g. a restarted lighthouse)
    assert sorted(table(f.desired)) == ["db", "web"]
    f.catalogue_received([entry(C, "db", 2)], 41.0)
    assert sorted(table(f.desired)) == ["db"]
    f.catalogue_received([], 100.0)  # an empty catalogue removes everything after the hold
    assert f.desired == ()


def test_a_lost_or_failed_fetch_is_asked_again():
    f = follower(interval=10.0, fetch_timeout=15.0, retry_interval=1.0)
    assert f.tick(0.0) == [FetchCatalogue()]
    assert f.tick(14.0) == []
    assert f.tick(15.0) == [FetchCatalogue()]
    f.catalogue_failed(16.0)
    assert f.tick(20.0) == []
    assert f.tick(21.0) == [FetchCatalogue()]


def test_a_restarted_follower_syncs_a_higher_generation():
    old = follower(base=5_000)
    old.tick(0.0)
    old.catalogue_received([], 0.0)
    (last,) = old.tick(0.0)
    new = follower(base=5_001)  # the I/O layer's base is the wall clock in ms
    new.tick(0.0)
    new.catalogue_received([], 0.0)
    (first,) = new.tick(0.0)
    assert first.generation > last.generation


# --- publish -> lighthouse -> follow, with real LighthouseCores ---------------------------------


class FakeDiscovery:
    def __init__(self, client, ip):
        self.client = client
        self.engine = type("E", (), {"certificate": type("C", (), {"ip": type("I", (), {"ip": ip})()})()})()
        self.catalogue_event = lambda event: None


class RecordingGateway:
    def __init__(self):
        self.syncs = []
        self.other_routes = []  # routes other owners hold

    async def list(self):
        return RouteTable(tuple(self.other_routes), {})

    async def sync(self, owner, generation, routes):
        self.syncs.append((owner, generation, routes))


@pytest.mark.asyncio
async def test_a_service_started_on_host_b_is_routed_by_the_gateway_following_on_host_a():
    net = Network()
    alice, bob = net.add_node(1, ("192.0.2.1", 1001)), net.add_node(2, ("192.0.2.2", 1002))
    net.run(until=0.0)
    reg_a, reg_b = ServiceRegistry(), ServiceRegistry()
    reg_a.put(RegistryService("a1", "shop", IPv4Address("10.87.1.2"), 80))
    gateway = RecordingGateway()
    clock = [1.0]
    follower_side = CatalogueComponent("wsl-a", reg_a, lambda: FakeDiscovery(alice, alice.ip), gateway,
                                       follow=True, interval=1.0, clock=lambda: clock[0], tick_interval=0.01)
    publisher = CatalogueComponent("wsl-b", reg_b, lambda: FakeDiscovery(bob, bob.ip))

    async def step(seconds=0.05):
        clock[0] += 0.5
        net.pump(clock[0])
        while (event := alice.next_event()) is not None:
            if isinstance(event, CatalogueReceived):
                follower_side.discovery.catalogue_event(event)
        await asyncio.sleep(seconds)

    await follower_side.start()
    await publisher.start()
    try:
        for _ in range(6):
            await step()
        assert gateway.syncs and gateway.syncs[-1][2] == []  # only alice's own "shop" so far
        reg_b.put(RegistryService("b1", "shop", IPv4Address("10.87.2.2"), 3000))  # a container starts on B
        reg_b.put(RegistryService("b2", "wiki", IPv4Address("10.87.2.3"), 80))
        for _ in range(8):
            await step()
        owner, generation, routes = gateway.syncs[-1]
        assert owner == "catalogue.wsl-a" and generation > gateway.syncs[0][1]
        assert {r["name"]: r["backends"] for r in routes} == {"shop-host-2": ["10.87.2.2:3000"],
                                                             "wiki": ["10.87.2.3:80"]}
        reg_b.remove("b2")  # and stops
        for _ in range(8):
            await step()
        assert [r["name"] for r in gateway.syncs[-1][2]] == ["shop-host-2"]
        # a name someone else holds on the gateway is not taken bare; a route B pushes there itself
        # with the same backend is not duplicated
        gateway.other_routes = [Route("docs", ("10.87.9.9:80",), owner="manual"),
                                Route("blog", ("10.87.2.5:80",), owner="wsl-b")]
        reg_b.put(RegistryService("b3", "docs", IPv4Address("10.87.2.4"), 80))
        reg_b.put(RegistryService("b4", "blog", IPv4Address("10.87.2.5"), 80))
        for _ in range(8):
            await step()
        assert [r["name"] for r in gateway.syncs[-1][2]] == ["docs-host-2", "shop-host-2"]
    finally:
        await publisher.stop()
        await follower_side.stop()


@pytest.mark.asyncio
async def test_a_reload_of_the_gateway_settings_restarts_following_with_them(tmp_path):
    from flatnet.node.config import GatewayPushConfig
    from flatnet.node.reload import ReloadPlan

    net = Network()
    alice = net.add_node(1, ("192.0.2.1", 1001))
    registry = ServiceRegistry()
    component = CatalogueComponent("wsl-a", registry, lambda: FakeDiscovery(alice, alice.ip), None, follow=False)
    await component.start()
    try:
        assert component.follower is None
        token = tmp_path / "token"
        token.write_text("secret\n")
        on = GatewayPushConfig(admin_url="http://127.0.0.1:9", token_file=token, follow_catalogue=True,
                               catalogue_interval=2.0)
        apply = component.prepare_reload(ReloadPlan(config=None, gateway=on))
        assert await apply() == ["catalogue: following onto http://127.0.0.1:9"]
        assert component.follower is not None and component.follower.settings.interval == 2.0
        assert component.admin_client._client.token == "secret"
        registry.put(RegistryService("c1", "web", IPv4Address("10.87.1.2"), 80))
        assert component.counters["published"] == 3  # start, reload's start, the change: subscribed once
        off = GatewayPushConfig(admin_url="http://127.0.0.1:9", token_file=token, follow_catalogue=False)
        assert await component.prepare_reload(ReloadPlan(config=None, gateway=off))() == ["catalogue: not following"]
        assert component.follower is None
        assert component.prepare_reload(ReloadPlan(config=None)) is None
    finally:
        await component.stop()
