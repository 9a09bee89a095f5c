"""The admin API against a real gateway: auth, validation, sync generations, who may connect."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest

from flatnet.gateway.admin import AdminError, AsyncAdminClient
from flatnet.gateway.routes import Route, RouteError
from flatnet.lab.probe import in_namespace
from flatnet.testing.markers import needs_root, require_tools

from .conftest import APP_A, APP_B, APP_PORT, GATEWAY_LAN, GATEWAY_WSL, request_in

pytestmark = [pytest.mark.slow, needs_root, require_tools("nginx", "nsenter")]

WEB = Route("web", (f"{APP_A}:{APP_PORT}",))


def raw_admin(site, method, path, body=None, token="__site__", ns=None, address=GATEWAY_WSL):
    headers = {}
    if token == "__site__":
        token = site.token
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if body is not None:
        headers["Content-Type"] = "application/json"
    status, _, data = request_in(ns or site.wsl.name, address, 8081, method, path, headers=headers, body=body)
    return status, data


def snapshot(site):
    status, data = raw_admin(site, "GET", "/api/v1/routes")
    assert status == 200
    return json.loads(data)


def test_token_is_required(site):
    site.admin().upsert(WEB)
    before = snapshot(site)
    for token in (None, "wrong-token-of-the-right-length-xxxxxxxxxxxxxx", site.token[:-1]):
        for method, path, body in (
            ("GET", "/api/v1/routes", None),
            ("PUT", "/api/v1/routes/evil", json.dumps({"backends": ["10.87.9.9:80"]})),
            ("DELETE", "/api/v1/routes/web", None),
            ("POST", "/api/v1/sync", json.dumps({"owner": "x", "generation": 1, "routes": []})),
        ):
            status, data = raw_admin(site, method, path, body, token=token)
            assert status == 401, (method, path, token)
            assert "token" in json.loads(data)["error"]
    with pytest.raises(AdminError) as err:
        site.admin(token="not-the-token-0123456789").list()
    assert err.value.status == 401
    assert snapshot(site) == before


BAD_INPUT = [
    ("/api/v1/routes/web", "{not json", "not valid JSON"),
    ("/api/v1/routes/web", '{"backends": ["10.87.1.300:80"]}', "backends[0]"),
    ("/api/v1/routes/web", '{"backends": ["10.87.1.2"]}', "backends[0]"),
    ("/api/v1/routes/web", '{"backends": ["10.87.1.2:0"]}', "backends[0]"),
    ("/api/v1/routes/web", '{"backends": []}', "backends"),
    ("/api/v1/routes/web", '{"backends": ["10.87.1.2:80"], "mode": "rewrite"}', "mode"),
    ("/api/v1/routes/web", '{"backends": ["10.87.1.2:80"], "port": 9999}', "port"),
    ("/api/v1/routes/web", '{"backends": ["10.87.1.2:80"], "color": "red"}', "color"),
    ("/api/v1/routes/web", '{"name": "other", "backends": ["10.87.1.2:80"]}', "name"),
    ("/api/v1/routes/Bad_Name", '{"backends": ["10.87.1.2:80"]}', "name"),
    ("/api/v1/routes/web", "[1, 2]", "route"),
    ("/api/v1/sync", '{"owner": "a", "generation": -1, "routes": []}', "generation"),
    ("/api/v1/sync", '{"owner": "A B", "generation": 1, "routes": []}', "owner"),
    ("/api/v1/sync", '{"owner": "a", "generation": 1, "routes": [{"name": "x", "backends": ["1.2.3"]}]}',
     "routes[0].backends[0]"),
    ("/api/v1/sync", '{"owner": "a", "generation": 1, "routes": [{"name": "x", "backends": ["1.2.3.4:1"], '
                     '"owner": "b"}]}', "routes[0].owner"),
]


def test_bad_input_is_400_and_changes_nothing(site):
    site.admin().upsert(WEB)
    before = snapshot(site)
    for path, body, needle in BAD_INPUT:
        method = "POST" if path.endswith("/sync") else "PUT"
        status, data = raw_admin(site, method, path, body)
        assert status == 400, (path, body, data)
        assert needle in json.loads(data)["error"], (path, body, data)
        assert snapshot(site) == before, (path, body)


def test_oversized_body_is_400(site):
    before = snapshot(site)
    big = json.dumps({"backends": ["10.87.1.2:80"], "pad": "x" * (2 * 1024 * 1024)})
    status, data = raw_admin(site, "PUT", "/api/v1/routes/web", big)
    assert status == 400 and "too large" in json.loads(data)["error"]
    assert snapshot(site) == before


def test_upsert_list_delete(site):
    admin = site.admin()
    admin.upsert(WEB)
    admin.upsert(Route("two", (f"{APP_A}:{APP_PORT}", f"{APP_B}:{APP_PORT}"), mode="pass", port=8001,
                       host="two.example.lan"))
    table = admin.list()
    assert table.by_name() == {"web": WEB, "two": Route("two", (f"{APP_A}:{APP_PORT}", f"{APP_B}:{APP_PORT}"),
                                                        mode="pass", port=8001, host="two.example.lan")}
    # a port already held by another route is a conflict
    with pytest.raises(AdminError) as err:
        admin.upsert(Route("three", (f"{APP_A}:{APP_PORT}",), port=8001))
    assert err.value.status == 409
    admin.delete("two")
    assert [r.name for r in admin.list().routes] == ["web"]
    with pytest.raises(AdminError) as err:
        admin.delete("two")
    assert err.value.status == 404


def test_sync_replaces_one_owner_and_rejects_stale_generations(site):
    admin = site.admin()
    admin.upsert(WEB)  # set by hand: no owner
    a1 = [Route("a1", (f"{APP_A}:{APP_PORT}",)), Route("a2", (f"{APP_B}:{APP_PORT}",))]
    admin.sync("wsl-a", 5, a1)
    admin.sync("wsl-b", 1, [Route("b1", (f"{APP_B}:{APP_PORT}",))])
    # wsl-a restarts and pushes its whole state again: a2 gone, a3 new, others untouched
    admin.sync("wsl-a", 6, [Route("a1", (f"{APP_A}:{APP_PORT}",)), Route("a3", (f"{APP_A}:{APP_PORT}",))])
    table = admin.list()
    assert sorted(r.name for r in table.routes) == ["a1", "a3", "b1", "web"]
    assert table.by_name()["a3"].owner == "wsl-a" and table.by_name()["web"].owner is None
    assert table.owners == {"wsl-a": 6, "wsl-b": 1}
    before = snapshot(site)
    with pytest.raises(AdminError) as err:
        admin.sync("wsl-a", 5, [])
    assert err.value.status == 409 and "older" in err.value.message
    # a name held by another owner is a conflict, not a takeover
    with pytest.raises(AdminError) as err:
        admin.sync("wsl-a", 7, [Route("b1", (f"{APP_A}:{APP_PORT}",))])
    assert err.value.status == 409
    assert snapshot(site) == before
    # the same generation again is accepted (a retried push)
    admin.sync("wsl-a", 6, [])
    assert sorted(r.name for r in admin.list().routes) == ["b1", "web"]


def test_async_client(site):
    async def go():
        client = AsyncAdminClient(f"http://{GATEWAY_WSL}:8081", site.token)
        await client.sync("node-x", 1, [WEB])
        table = await client.list()
        await client.delete("web")
        try:
            await client.delete("web")
        except AdminError as exc:
            missing = exc.status
        return table, missing, await client.list()

    table, missing, after = in_namespace(site.wsl.name, lambda: asyncio.run(go()))
    assert table.by_name()["web"] == WEB.with_owner("node-x")
    assert missing == 404 and after.routes == ()


def test_admin_port_is_not_reachable_from_the_lan(site):
    def connect(address):
        try:
            socket.create_connection((address, 8081), timeout=3).close()
            return "connected"
        except ConnectionRefusedError:
            return "refused"
        except OSError as exc:
            return f"error: {exc}"

    # Not bound on the LAN address at all.
    assert in_namespace(site.lan.name, lambda: connect(GATEWAY_LAN)) == "refused"
    # Even reaching the WSL-side address (a LAN host with a route to it) is denied by address.
    site.lan.add_route(f"{GATEWAY_WSL}/32", gateway=GATEWAY_LAN)
    status, _ = raw_admin(site, "GET", "/api/v1/routes", ns=site.lan.name)
    assert status == 403


# The same rules on both sides: what the Python Route accepts, the Lua admin API accepts.
AGREEMENT_VECTORS = [
    {"name": "ok", "backends": ["10.87.1.2:80"]},
    {"name": "a", "backends": ["1.2.3.4:65535"], "mode": "pass"},
    {"name": "x" * 63, "backends": ["10.87.1.2:80"]},
    {"name": "x" * 64, "backends": ["10.87.1.2:80"]},
    {"name": "-web", "backends": ["10.87.1.2:80"]},
    {"name": "web-", "backends": ["10.87.1.2:80"]},
    {"name": "we--b", "backends": ["10.87.1.2:80"]},
    {"name": "api", "backends": ["10.87.1.2:80"]},
    {"name": "web", "backends": ["010.087.001.002:0080"]},
    {"name": "web", "backends": ["10.87.1.2:65536"]},
    {"name": "web", "backends": ["10.87.1:80"]},
    {"name": "web", "backends": ["[::1]:80"]},
    {"name": "web", "backends": ["10.87.1.2:80", "10.87.1.2:80"]},
    {"name": "web", "backends": [f"10.87.1.{i}:80" for i in range(1, 18)]},
    {"name": "web", "backends": ["10.87.1.2:80"], "owner": "wsl-a.office_1"},
    {"name": "web", "backends": ["10.87.1.2:80"], "owner": "-x"},
    {"name": "web", "backends": ["10.87.1.2:80"], "host": "web.example.lan"},
    {"name": "web", "backends": ["10.87.1.2:80"], "host": "Web.Example"},
    {"name": "web", "backends": ["10.87.1.2:80"], "host": "a..b"},
    {"name": "web", "backends": ["10.87.1.2:80"], "port": 8002},
    {"name": "web", "backends": ["10.87.1.2:80"], "port": True},
]


def test_python_and_lua_validation_agree(site):
    admin_results = []
    python_results = []
    for vector in AGREEMENT_VECTORS:
        try:
            Route.from_json(vector)
            python_results.append(True)
        except RouteError:
            python_results.append(False)
        status, data = raw_admin(site, "PUT", f"/api/v1/routes/{vector['name']}", json.dumps(vector))
        assert status in (200, 400), data
        admin_results.append(status == 200)
    assert admin_results == python_results
    assert python_results.count(True) >= 6 and python_results.count(False) >= 10
