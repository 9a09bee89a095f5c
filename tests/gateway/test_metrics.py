"""The gateway's Prometheus endpoint (admin server, GET /metrics) against a real nginx.

The site runs two workers: a request is counted by whichever worker served it and reaches the
shared dict at that worker's next one-second flush, so the tests poll the scrape until the counts
arrive, then wait one more flush period and check they are still exactly right (nothing counted
twice, nothing left behind).
"""

from __future__ import annotations

import http.client
import json
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from flatnet.gateway import render
from flatnet.gateway.routes import Route
from flatnet.gateway.runner import GatewayProcess
from flatnet.lab.probe import in_namespace
from flatnet.testing.markers import needs_root, require_tools

from .conftest import APP_A, APP_B, APP_PORT, GATEWAY_LAN, GATEWAY_WSL, gateway_config, request_in

pytestmark = [pytest.mark.slow, needs_root, require_tools("nginx", "nsenter")]

WEB = Route("web", (f"{APP_A}:{APP_PORT}",))
FLUSH_PERIOD = 1.0  # metrics.lua FLUSH_INTERVAL

FAMILIES = {
    "flatnet_gateway_routes": "gauge",
    "flatnet_gateway_backends": "gauge",
    "flatnet_gateway_requests": "counter",
    "flatnet_gateway_upstream_failures": "counter",
    "flatnet_gateway_route_changes": "counter",
    "flatnet_gateway_metrics_dropped": "counter",
    "flatnet_gateway_up_since_seconds": "gauge",
}


def scrape_raw(site, token="__site__"):
    headers = {}
    if token == "__site__":
        token = site.token
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return request_in(site.wsl.name, GATEWAY_WSL, 8081, "GET", "/metrics", headers=headers)


class Scrape:
    """One parsed scrape: samples by (name, sorted labels)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples = {}
        for fam in self.families.values():
            for s in fam.samples:
                self.samples[(s.name, tuple(sorted(s.labels.items())))] = s.value

    def get(self, name: str, **labels) -> float | None:
        return self.samples.get((name, tuple(sorted(labels.items()))))

    def series(self, name: str) -> dict[tuple, float]:
        """{label tuple: value} of one sample name, e.g. requests as {(("code", "2xx"), ("route", "web")): 7}."""
        return {labels: v for (n, labels), v in self.samples.items() if n == name}


def scrape(site) -> Scrape:
    status, headers, body = scrape_raw(site)
    assert status == 200, body
    assert headers["content-type"] == ["text/plain; version=0.0.4; charset=utf-8"]
    return Scrape(body.decode())


def requests_by(route_code: dict[tuple[str, str], int]) -> dict[tuple, float]:
    return {(("code", code), ("route", route)): float(n) for (route, code), n in route_code.items()}


def wait_for_series(site, name: str, expected: dict[tuple, float], timeout: float = 6.0) -> Scrape:
    """Poll until *name*'s series are exactly *expected*; then one flush later they must still be."""
    deadline = time.monotonic() + timeout
    while True:
        got = scrape(site)
        if got.series(name) == expected:
            break
        if time.monotonic() > deadline:
            assert got.series(name) == expected, got.text
        time.sleep(0.2)
    time.sleep(FLUSH_PERIOD + 0.3)
    again = scrape(site)
    assert again.series(name) == expected, again.text
    return again


def requests_on_one_connection(site, path: str, n: int) -> list[int]:
    """*n* GETs on one keep-alive connection from the LAN client: all served by one worker."""

    def go():
        conn = http.client.HTTPConnection(GATEWAY_LAN, 80, timeout=10)
        try:
            statuses = []
            for _ in range(n):
                conn.request("GET", path)
                resp = conn.getresponse()
                resp.read()
                statuses.append(resp.status)
            return statuses
        finally:
            conn.close()

    return in_namespace(site.lan.name, go)


def test_metrics_need_the_token(site):
    for token in (None, "wrong-token-of-the-right-length-xxxxxxxxxxxxxx", site.token[:-1]):
        status, headers, body = scrape_raw(site, token=token)
        assert status == 401, token
        assert headers["content-type"] == ["application/json"]
        assert headers["www-authenticate"] == ['Bearer realm="flatnet-gateway"']
        assert "token" in json.loads(body)["error"]
    # The public side has no /metrics: it is just a service nobody runs.
    status, _, body = site.lan_request("GET", "/metrics")
    assert status == 404 and b"No service called metrics" in body
    # POST is refused (with the token): a scrape is a GET.
    status, _, body = request_in(site.wsl.name, GATEWAY_WSL, 8081, "POST", "/metrics",
                                 headers={"Authorization": f"Bearer {site.token}"}, body=b"")
    assert status == 405


def test_fresh_gateway_exposes_every_family_in_the_text_format(site):
    before = time.time()
    got = scrape(site)
    assert {name: fam.type for name, fam in got.families.items()} == FAMILIES
    for fam in got.families.values():
        assert fam.documentation, fam.name
    assert got.get("flatnet_gateway_routes") == 0
    assert got.get("flatnet_gateway_route_changes_total") == 0
    assert got.get("flatnet_gateway_metrics_dropped_total") == 0
    assert got.series("flatnet_gateway_requests_total") == {}
    up_since = got.get("flatnet_gateway_up_since_seconds")
    assert before - 60 < up_since <= time.time()
    assert got.text.endswith("\n")


def test_requests_are_counted_by_route_and_status_class(site):
    site.admin().upsert(WEB)
    n_ok, n_missing, n_slash = 7, 5, 2
    # One connection per request: the two workers share the load (and the counting).
    for i in range(n_ok):
        assert site.lan_request("GET", f"/web/?i={i}")[0] == 200
    for i in range(n_missing):
        assert site.lan_request("GET", f"/nosuch-{i}/")[0] == 404
    for _ in range(n_slash):
        assert site.lan_request("GET", "/web")[0] == 301
    assert site.lan_request("GET", "/")[0] == 200  # the index: no route

    got = wait_for_series(site, "flatnet_gateway_requests_total", requests_by({
        ("web", "2xx"): n_ok,
        ("web", "3xx"): n_slash,
        ("", "4xx"): n_missing,  # made-up names are not series of their own
        ("", "2xx"): 1,
    }))
    assert got.series("flatnet_gateway_upstream_failures_total") == {}
    assert got.get("flatnet_gateway_routes") == 1
    # A backend's own error status is its route's (the app answers 404 for a path it lacks).
    assert site.lan_request("GET", "/web/no-such-page")[0] == 404
    got = wait_for_series(site, "flatnet_gateway_requests_total", requests_by({
        ("web", "2xx"): n_ok, ("web", "3xx"): n_slash, ("web", "4xx"): 1, ("", "4xx"): n_missing, ("", "2xx"): 1,
    }))
    assert got.series("flatnet_gateway_upstream_failures_total") == {}


def test_a_backend_that_is_down_counts_upstream_failures(site):
    admin = site.admin()
    admin.upsert(WEB)
    admin.upsert(Route("gone", (f"{APP_B}:9",)))  # nothing listens on port 9: connection refused
    statuses = requests_on_one_connection(site, "/gone/", 3)
    assert statuses == [503, 503, 503]
    got = wait_for_series(site, "flatnet_gateway_upstream_failures_total", {(("route", "gone"),): 3.0})
    assert got.series("flatnet_gateway_requests_total") == requests_by({("gone", "5xx"): 3})

    # The health check (every 0.5 s here) sorts the backends.
    deadline = time.monotonic() + 5
    expected = {
        (("route", "gone"), ("state", "healthy")): 0.0,
        (("route", "gone"), ("state", "unhealthy")): 1.0,
        (("route", "web"), ("state", "healthy")): 1.0,
        (("route", "web"), ("state", "unhealthy")): 0.0,
    }
    while scrape(site).series("flatnet_gateway_backends") != expected and time.monotonic() < deadline:
        time.sleep(0.2)
    assert scrape(site).series("flatnet_gateway_backends") == expected


def test_route_changes_move_the_route_gauge_and_counter(site):
    admin = site.admin()

    def routes_and_changes():
        got = scrape(site)
        return got.get("flatnet_gateway_routes"), got.get("flatnet_gateway_route_changes_total")

    assert routes_and_changes() == (0, 0)
    admin.upsert(WEB)
    assert routes_and_changes() == (1, 1)
    admin.upsert(WEB)  # the same route again: a write, but no change
    assert routes_and_changes() == (1, 1)
    pushed = [Route("b", (f"{APP_B}:{APP_PORT}",)), Route("c", (f"{APP_B}:{APP_PORT}",), port=8001)]
    admin.sync("wsl-a", 1, pushed)
    assert routes_and_changes() == (3, 2)
    admin.sync("wsl-a", 2, pushed)  # only the generation moved
    assert routes_and_changes() == (3, 2)
    status, _, _ = request_in(site.wsl.name, GATEWAY_WSL, 8081, "PUT", "/api/v1/routes/bad",
                              headers={"Authorization": f"Bearer {site.token}"}, body=b'{"backends": []}')
    assert status == 400  # refused: nothing changed
    assert routes_and_changes() == (3, 2)
    admin.delete("web")
    assert routes_and_changes() == (2, 3)
    admin.sync("wsl-a", 3, [])
    assert routes_and_changes() == (0, 4)
    assert scrape(site).series("flatnet_gateway_backends") == {}


def test_counts_survive_a_reload(site):
    site.admin().upsert(WEB)
    up_since = scrape(site).get("flatnet_gateway_up_since_seconds")
    assert requests_on_one_connection(site, "/web/", 4) == [200] * 4
    # At once, before the worker's timer ran: a leaving worker hands its counts over as it exits
    # (its timer's last, premature run; exit_worker_by_lua for requests that end after that).
    site.gateway.reload()
    got = wait_for_series(site, "flatnet_gateway_requests_total", requests_by({("web", "2xx"): 4}))
    assert got.get("flatnet_gateway_up_since_seconds") == up_since
    assert got.get("flatnet_gateway_route_changes_total") == 1


@pytest.fixture
def capped_site(monkeypatch, request):
    """The site with room for three counter series."""
    monkeypatch.setattr(render, "METRICS_MAX_SERIES", 3)
    return request.getfixturevalue("site")


def test_series_are_capped_and_stale_routes_make_room(capped_site):
    site = capped_site
    admin = site.admin()
    for name in ("a", "b", "c", "d"):
        admin.upsert(Route(name, (f"{APP_A}:{APP_PORT}",)))
    for name in ("a", "b", "c"):
        assert requests_on_one_connection(site, f"/{name}/", 2) == [200, 200]
    wait_for_series(site, "flatnet_gateway_requests_total",
                    requests_by({("a", "2xx"): 2, ("b", "2xx"): 2, ("c", "2xx"): 2}))

    # At the cap, a new series first prunes the counters of routes that are gone.
    admin.delete("a")
    assert requests_on_one_connection(site, "/d/", 3) == [200] * 3
    got = wait_for_series(site, "flatnet_gateway_requests_total",
                          requests_by({("b", "2xx"): 2, ("c", "2xx"): 2, ("d", "2xx"): 3}))
    assert got.get("flatnet_gateway_metrics_dropped_total") == 0

    # Full again, nothing stale (and pruning waits a minute): counted as dropped, not stored.
    assert requests_on_one_connection(site, "/nosuch/", 5) == [404] * 5
    got = wait_for_series(site, "flatnet_gateway_metrics_dropped_total", {(): 5.0})
    assert got.series("flatnet_gateway_requests_total") == requests_by(
        {("b", "2xx"): 2, ("c", "2xx"): 2, ("d", "2xx"): 3})
    # Existing series keep counting.
    assert requests_on_one_connection(site, "/b/", 1) == [200]
    wait_for_series(site, "flatnet_gateway_requests_total",
                    requests_by({("b", "2xx"): 3, ("c", "2xx"): 2, ("d", "2xx"): 3}))


# A test-only server beside the gateway's own: the label escaping, called in the gateway's Lua.
ESCAPE_PROBE = """
    server {
        listen 127.0.0.1:8099;
        location = /escape {
            content_by_lua_block {
                ngx.req.read_body()
                ngx.print(require("flatnet.metrics").escape_label(ngx.req.get_body_data()))
            }
        }
    }
"""


def test_label_values_are_escaped_for_the_text_format(netns_factory, gateway_dir):
    # Route names are DNS labels today, so the exposition never needs this; the escaping is
    # still the text format's (backslash, double quote, newline) in case a label ever carries more.
    ns = netns_factory("gw")
    config = gateway_config(gateway_dir, listen="127.0.0.1:80", admin_listen=["127.0.0.1:8081"],
                            admin_allow=["127.0.0.0/8"], dedicated_ports=[])
    with GatewayProcess(config, wrap=ns.command, extra_http=ESCAPE_PROBE):
        value = 'a "b" \\ c\nd \\n'
        status, _, escaped = request_in(ns.name, "127.0.0.1", 8099, "POST", "/escape", body=value.encode())
    assert status == 200
    assert escaped.decode() == 'a \\"b\\" \\\\ c\\nd \\\\n'
    (family,) = text_string_to_metric_families(f'x{{route="{escaped.decode()}"}} 1\n')
    assert family.samples[0].labels == {"route": value}
