"""The gateway end to end: a LAN client, nginx on the "Windows host", real apps on the "WSL2 host"."""

from __future__ import annotations

import json
from urllib.parse import urlencode

import pytest
from websockets.sync.client import connect as ws_connect

from flatnet.gateway.routes import Route
from flatnet.lab.probe import in_namespace
from flatnet.testing.markers import needs_root, require_tools

from .conftest import APP_A, APP_B, APP_BASED, APP_PORT, DOMAIN, GATEWAY_LAN, LAN_CLIENT

pytestmark = [pytest.mark.slow, needs_root, require_tools("nginx", "nsenter")]

WEB = Route("web", (f"{APP_A}:{APP_PORT}",))


def test_pages_redirect_and_cookie_under_the_prefix(site):
    site.admin().upsert(WEB)
    status, headers, body = site.lan_request("GET", "/web/")
    assert status == 200 and b"Hello from app-a" in body

    # /web (no slash) is the app's root one redirect away.
    status, headers, _ = site.lan_request("GET", "/web?x=1")
    assert status == 301 and headers["location"] == ["/web/?x=1"]

    # The app redirects to /home and sets a cookie for Path=/: both come back under /web.
    status, headers, _ = site.lan_request("GET", "/web/login")
    assert status == 302
    assert headers["location"] == ["/web/home"]
    cookie = headers["set-cookie"][0]
    assert "Path=/web;" in cookie or cookie.endswith("Path=/web")
    session = cookie.split(";")[0]
    status, _, body = site.lan_request("GET", headers["location"][0], headers={"Cookie": session})
    assert status == 200 and json.loads(body) == {"page": "home", "app": "app-a", "session": "app-a-ok"}

    # An absolute redirect built from the Host header keeps the gateway's host and gains the prefix.
    status, headers, _ = site.lan_request("GET", "/web/login-absolute")
    assert status == 302 and headers["location"] == [f"http://{GATEWAY_LAN}/web/home"]


LOCATION_REWRITES = [
    ("/x?a=1", "/web/x?a=1"),
    ("/", "/web/"),
    ("/web/already", "/web/already"),  # the app read X-Forwarded-Prefix
    ("relative/x", "relative/x"),
    (f"http://{GATEWAY_LAN}/x", f"http://{GATEWAY_LAN}/web/x"),
    (f"http://{GATEWAY_LAN}", f"http://{GATEWAY_LAN}/web/"),
    (f"http://{APP_A}:{APP_PORT}/x", f"http://{GATEWAY_LAN}/web/x"),  # the backend's own address
    (f"//{GATEWAY_LAN}/x", f"//{GATEWAY_LAN}/web/x"),
    ("http://elsewhere.example/x", "http://elsewhere.example/x"),
    ("https://elsewhere.example/", "https://elsewhere.example/"),
]


def test_strip_mode_rewrites_locations(site):
    site.admin().upsert(WEB)
    for location, expected in LOCATION_REWRITES:
        status, headers, _ = site.lan_request("GET", "/web/redirect?" + urlencode({"to": location}))
        assert status == 302 and headers["location"] == [expected], location


def test_strip_mode_rewrites_cookie_paths(site):
    site.admin().upsert(WEB)
    status, headers, _ = site.lan_request("GET", "/web/cookies?path=/&path=/a/b&path=&path=/web/x")
    assert status == 200
    assert headers["set-cookie"] == [
        "c0=v0; Path=/web; HttpOnly",
        "c1=v1; Path=/web/a/b; HttpOnly",
        "c2=v2; HttpOnly",
        "c3=v3; Path=/web/x; HttpOnly",
    ]


def test_forwarded_headers_and_exact_upstream_uri(site):
    site.admin().upsert(WEB)
    status, _, body = site.lan_request("GET", "/web/whoami?q=a%2Fb&x=1")
    seen = json.loads(body)
    assert status == 200
    assert seen["target"] == "/whoami?q=a%2Fb&x=1"
    h = seen["headers"]
    assert h["x-forwarded-prefix"] == "/web"
    assert h["x-forwarded-for"] == LAN_CLIENT
    assert h["x-forwarded-proto"] == "http"
    assert h["x-forwarded-host"] == GATEWAY_LAN
    assert h["host"] == GATEWAY_LAN


def test_pass_mode_host_routing_and_dedicated_port(site):
    admin = site.admin()
    admin.upsert(Route("based", (f"{APP_BASED}:{APP_PORT}",), mode="pass"))
    admin.upsert(Route("own", (f"{APP_B}:{APP_PORT}",), port=8001))
    _, _, body = site.lan_request("GET", "/based/whoami")
    seen = json.loads(body)
    assert seen["target"] == "/based/whoami" and "x-forwarded-prefix" not in seen["headers"]
    # pass mode leaves redirects alone: the app knows its base path
    status, headers, _ = site.lan_request("GET", "/based/login")
    assert headers["location"] == ["/based/home"]
    assert "Path=/;" in headers["set-cookie"][0]

    # <name>.<domain>: the whole URI goes to the app as is.
    status, _, body = site.lan_request("GET", "/based/whoami", host=f"based.{DOMAIN}")
    assert status == 200 and json.loads(body)["target"] == "/based/whoami"

    status, _, body = site.lan_request("GET", "/whoami", port=8001)
    assert status == 200 and json.loads(body)["app"] == "app-b"
    status, _, body = site.lan_request("GET", "/", port=8002)
    assert status == 404 and b"No service on port 8002" in body


def test_round_robin_and_retry_past_a_dead_backend(site):
    dead = f"{APP_A}:9"
    site.admin().upsert(Route("pool", (f"{APP_A}:{APP_PORT}", dead, f"{APP_B}:{APP_PORT}")))
    apps = []
    for _ in range(12):
        status, _, body = site.lan_request("GET", "/pool/whoami")
        assert status == 200
        apps.append(json.loads(body)["app"])
    assert set(apps) == {"app-a", "app-b"}


def test_websocket_echo(site):
    site.admin().upsert(WEB)

    def echo():
        with ws_connect(f"ws://{GATEWAY_LAN}/web/ws", open_timeout=10) as ws:
            ws.send("hello over the gateway")
            text = ws.recv(timeout=10)
            ws.send(b"\x00\x01binary")
            data = ws.recv(timeout=10)
        return text, data

    assert in_namespace(site.lan.name, echo) == ("hello over the gateway", b"\x00\x01binary")


def test_service_down_and_unknown_service_pages(site):
    site.admin().upsert(Route("gone", (f"{APP_A}:9",)))
    status, headers, body = site.lan_request("GET", "/gone/")
    assert status == 503
    assert b"Service <code>gone</code> is not running" in body
    status, _, body = site.lan_request("GET", "/nothing-here/")
    assert status == 404 and b"No service called nothing-here" in body and b'href="/"' in body


def test_upload_of_100_mb(site):
    site.admin().upsert(WEB)
    size = 100 * 1024 * 1024
    block = bytes(range(256)) * 4096  # 1 MiB

    def body():
        for _ in range(size // len(block)):
            yield block

    import hashlib

    digest = hashlib.sha256()
    for _ in range(size // len(block)):
        digest.update(block)
    status, _, answer = site.lan_request("POST", "/web/upload", body=body(),
                                         headers={"Content-Length": str(size)}, timeout=120)
    assert status == 200
    assert json.loads(answer) == {"bytes": size, "sha256": digest.hexdigest()}
