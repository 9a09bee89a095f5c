"""The lab's demo app: a page, a redirect to an absolute path, a cookie (over loopback, in-process)."""

import http.client
import threading
from http.server import ThreadingHTTPServer

import pytest

from flatnet.lab.demo_app import COOKIE_NAME, PAGE_MARKER, DemoHandler


@pytest.fixture
def demo_server():
    handler = type("Handler", (DemoHandler,), {"service_name": "web", "log_message": lambda *a: None})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address
    server.shutdown()
    server.server_close()
    thread.join()


def get(addr, path, headers=None):
    conn = http.client.HTTPConnection(*addr, timeout=5)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read().decode()
    finally:
        conn.close()


def test_index_names_the_service_and_shows_forwarding_headers(demo_server):
    status, _, body = get(demo_server, "/", {"X-Forwarded-Prefix": "/web"})
    assert status == 200
    assert f"{PAGE_MARKER}: web" in body
    assert "/web" in body and 'href="login"' in body


def test_login_redirects_to_an_absolute_path_and_sets_a_cookie(demo_server):
    status, headers, _ = get(demo_server, "/login")
    assert status == 302
    assert headers["Location"] == "/welcome"
    assert headers["Set-Cookie"].startswith(f"{COOKIE_NAME}=hello-from-web; Path=/")


def test_welcome_reports_whether_the_cookie_arrived(demo_server):
    _, _, with_cookie = get(demo_server, "/welcome", {"Cookie": f"{COOKIE_NAME}=hello-from-web"})
    _, _, without = get(demo_server, "/welcome")
    assert "hello-from-web" in with_cookie and "arrived" in with_cookie
    assert "No cookie arrived" in without


def test_unknown_path_is_404(demo_server):
    assert get(demo_server, "/nope")[0] == 404
