"""A small real web app for the lab: a page, a redirect and a cookie.

It stands in for Forgejo & co. where no container runs: the gateway must carry its redirect
(``/login`` → ``/welcome``, an absolute path the gateway rewrites under the service prefix) and its
cookie. Links in its pages are relative so they work under any prefix.

    python -m flatnet.lab.demo_app --listen 10.87.1.200 --port 8080 --name web
"""

from __future__ import annotations

import argparse
import html
import http.cookies
import socket
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COOKIE_NAME = "flatnet_demo"
PAGE_MARKER = "Flatnet lab demo app"


class DemoHandler(BaseHTTPRequestHandler):
    server_version = "FlatnetDemo/1"
    service_name = "demo"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        sys.stderr.write(f"{self.address_string()} {format % args}\n")

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            self._page(200, self._index())
        elif path == "/login":
            self.send_response(302)
            self.send_header("Location", "/welcome")
            self.send_header("Set-Cookie", f"{COOKIE_NAME}=hello-from-{self.service_name}; Path=/; HttpOnly")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/welcome":
            cookies = http.cookies.SimpleCookie(self.headers.get("Cookie", ""))
            value = cookies[COOKIE_NAME].value if COOKIE_NAME in cookies else None
            body = (
                f"<p>Welcome back: cookie <code>{COOKIE_NAME}={html.escape(value)}</code> arrived.</p>"
                if value
                else "<p>No cookie arrived: the gateway dropped it, or you came here directly.</p>"
            )
            self._page(200, body + '<p><a href="./">back</a></p>')
        elif path == "/health":
            self._page(200, "ok", plain=True)
        else:
            self._page(404, f"<p>{html.escape(path)}: not found</p>")

    def _index(self) -> str:
        headers = "".join(
            f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>"
            for k, v in self.headers.items()
            if k.lower().startswith("x-forwarded") or k.lower() in ("host", "x-real-ip")
        )
        return (
            f"<h1>{PAGE_MARKER}: {html.escape(self.service_name)}</h1>"
            f"<p>Served by <b>{html.escape(socket.gethostname())}</b> on "
            f"{html.escape(self.server.server_address[0])}:{self.server.server_address[1]}, "
            f"to {html.escape(self.client_address[0])}.</p>"
            '<p><a href="login">log in</a> (a redirect that sets a cookie)</p>'
            f"<table>{headers}</table>"
        )

    def _page(self, status: int, body: str, plain: bool = False) -> None:
        if plain:
            data = body.encode()
            ctype = "text/plain; charset=utf-8"
        else:
            data = (
                "<!doctype html><html><head><meta charset=utf-8>"
                f"<title>{PAGE_MARKER}</title></head><body>{body}</body></html>"
            ).encode()
            ctype = "text/html; charset=utf-8"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--name", default="demo", help="service name shown on the page")
    args = parser.parse_args(argv)
    handler = type("Handler", (DemoHandler,), {"service_name": args.name})
    server = ThreadingHTTPServer((args.listen, args.port), handler)
    server.daemon_threads = True
    print(f"demo app {args.name} on http://{args.listen}:{args.port}/", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
