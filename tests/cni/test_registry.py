"""Registration: what a container publishes, the host's registry, and pushing it to the gateway."""

import asyncio
import ipaddress

import pytest

from flatnet.node.cni_service import (
    GatewayAdminAdapter,
    GatewayPusher,
    ServiceRegistry,
    labels_from_podman_argv,
    route_name,
    service_for,
)
from tests.cni.fakes import FakeAdminClient, RecordingAdminServer

IP = ipaddress.IPv4Address("10.87.1.5")


def test_port_comes_from_the_label_then_the_port_mappings_then_80():
    mappings = [{"hostPort": 8443, "containerPort": 53, "protocol": "udp"},
                {"hostPort": 8080, "containerPort": 3000, "protocol": "tcp"}]
    assert service_for("c1", "web", IP, {"flatnet.port": "5000"}, mappings).port == 5000
    assert service_for("c1", "web", IP, {}, mappings).port == 3000
    assert service_for("c1", "web", IP, {}, []).port == 80
    assert service_for("c1", "web", IP, {"flatnet.port": "notaport"}, []).port == 80


def test_name_and_opt_out_come_from_labels():
    s = service_for("0123456789abcdef", "My_App.1", IP, {}, [])
    assert (s.name, s.expose, s.backend) == ("my-app-1", True, "10.87.1.5:80")
    assert service_for("c1", "x", IP, {"flatnet.name": "Shop"}, []).name == "shop"
    assert not service_for("c1", "x", IP, {"flatnet.expose": "false"}, []).expose
    assert route_name("___", "c-0123") == "c-0123"


def test_registry_routes_skip_opted_out_and_merge_shared_names():
    registry = ServiceRegistry()
    registry.put(service_for("a", "web", IP, {}, []))
    registry.put(service_for("b", "web", ipaddress.IPv4Address("10.87.1.6"), {}, []))
    registry.put(service_for("c", "db", ipaddress.IPv4Address("10.87.1.7"), {"flatnet.expose": "no"}, []))
    routes = registry.routes("wsl-a")
    assert list(routes) == ["web"]
    assert routes["web"] == {"name": "web", "backends": ["10.87.1.5:80", "10.87.1.6:80"], "mode": "strip",
                             "port": None, "owner": "wsl-a"}
    generation = registry.generation
    registry.put(service_for("a", "web", IP, {}, []))  # unchanged: no new generation
    assert registry.generation == generation
    registry.remove("a")
    assert registry.routes("wsl-a")["web"]["backends"] == ["10.87.1.6:80"]


async def test_pusher_syncs_first_then_sends_changes_and_heals_after_a_failure():
    registry = ServiceRegistry()
    registry.put(service_for("a", "web", IP, {}, []))
    gateway = FakeAdminClient()
    pusher = GatewayPusher(registry, gateway, "wsl-a", resync_interval=3600, retry_interval=0.01)
    await pusher.push_once()
    assert gateway.calls == [("sync", pusher.sync_generation)]
    registry.put(service_for("b", "shop", ipaddress.IPv4Address("10.87.1.6"), {"flatnet.port": "8000"}, []))
    registry.remove("a")
    await pusher.push_once()
    assert gateway.calls[1:] == [("delete", "web"), ("upsert", "shop")]
    assert gateway.routes["shop"]["backends"] == ["10.87.1.6:8000"]

    gateway.fail = 1
    registry.remove("b")
    with pytest.raises(ConnectionError):
        await pusher.push_once()
    assert pusher.published is None  # the next push is a full sync
    first_generation = pusher.sync_generation
    await pusher.push_once()
    assert gateway.calls[-1] == ("sync", first_generation + 1)
    assert gateway.routes == {}


async def test_pusher_loop_pushes_each_change_and_retries():
    registry = ServiceRegistry()
    gateway = FakeAdminClient()
    gateway.fail = 2  # the gateway is down at first
    pusher = GatewayPusher(registry, gateway, "wsl-a", resync_interval=3600, retry_interval=0.01)
    task = asyncio.create_task(pusher.run())
    try:
        registry.put(service_for("a", "web", IP, {}, []))
        async with asyncio.timeout(5):
            while "web" not in gateway.routes:
                gateway.changed.clear()
                await gateway.changed.wait()
            registry.remove("a")
            while gateway.routes:
                gateway.changed.clear()
                await gateway.changed.wait()
        assert pusher.failures == 2
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_adapter_speaks_the_gateways_admin_api():
    server = RecordingAdminServer()
    await server.start()
    try:
        adapter = GatewayAdminAdapter(server.url, "secret")
        route = service_for("a", "web", IP, {}, []).route_json("wsl-a")
        await adapter.upsert(route)
        await adapter.sync("wsl-a", 7, [route])
        await adapter.delete("web")
        await adapter.close()
    finally:
        await server.close()
    (m1, p1, b1), (m2, p2, b2), (m3, p3, _) = server.requests
    assert (m1, p1) == ("PUT", "/api/v1/routes/web")
    assert b1["backends"] == ["10.87.1.5:80"] and b1["owner"] == "wsl-a" and b1["mode"] == "strip"
    assert (m2, p2, b2["owner"], b2["generation"]) == ("POST", "/api/v1/sync", "wsl-a", 7)
    assert [r["name"] for r in b2["routes"]] == ["web"]
    assert (m3, p3) == ("DELETE", "/api/v1/routes/web")


def test_labels_from_the_podman_run_command_line():
    argv = ["podman", "--root", "/x", "run", "-d", "--network", "flatnet", "--label", "flatnet.port=3000",
            "-l", "flatnet.name=shop", "--label=a=b=c", "-lflatnet.expose=false", "img", "--", "--label", "x=y"]
    assert labels_from_podman_argv(argv) == {"flatnet.port": "3000", "flatnet.name": "shop", "a": "b=c",
                                             "flatnet.expose": "false"}
    assert labels_from_podman_argv(["/usr/bin/podman", "container", "run", "img"]) == {}
    assert labels_from_podman_argv(["podman", "start", "web"]) is None
    assert labels_from_podman_argv(["podman", "run", "--label-file", "f", "img"]) is None
    assert labels_from_podman_argv(["crun", "run"]) is None
    assert labels_from_podman_argv([]) is None


async def test_a_route_the_gateway_would_refuse_is_skipped_not_fatal():
    registry = ServiceRegistry()
    registry.put(service_for("a", "api", IP, {}, []))  # "api" is reserved by the gateway
    registry.put(service_for("b", "web", ipaddress.IPv4Address("10.87.1.6"), {}, []))
    gateway = FakeAdminClient()
    pusher = GatewayPusher(registry, gateway, "wsl-a")
    await pusher.push_once()
    assert list(gateway.routes) == ["web"] and pusher.refused == {"api"}


async def test_cni_service_registers_from_quick_labels_then_podmans_answer(tmp_path):
    from cni.ipam import Lease
    from flatnet.node.cni_service import CniService
    from flatnet.node.config import NodeConfig

    answer = asyncio.get_running_loop().create_future()

    async def label_reader(container_id, podman_env):
        return await answer

    registry = ServiceRegistry()
    service = CniService(NodeConfig(name="wsl-a"), registry, label_reader=label_reader)
    lease = Lease("c" * 64, "eth0", name="web", port_mappings=[{"containerPort": 3000, "protocol": "tcp"}])
    service._container_added(IP, lease, {"flatnet.name": "shop"})
    assert [(s.name, s.port) for s in registry.services()] == [("shop", 3000)]  # at once, from the command line
    answer.set_result({"flatnet.name": "shop", "flatnet.port": "8080"})  # the image adds a port label
    for _ in range(20):
        await asyncio.sleep(0)
    assert [(s.name, s.port) for s in registry.services()] == [("shop", 8080)]

    slow = asyncio.get_running_loop().create_future()

    async def never(container_id, podman_env):
        return await slow

    service.label_reader = never
    service._container_added(IP, Lease("d" * 64, "eth0", name="db"))
    service._container_removed("d" * 64)  # DEL before Podman answered: the lookup is cancelled
    for _ in range(20):
        await asyncio.sleep(0)
    assert [s.container_id for s in registry.services()] == ["c" * 64]
    await service.stop()
