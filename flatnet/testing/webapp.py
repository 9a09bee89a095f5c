"""A small real web app for end-to-end tests and the lab: the things proxies get wrong.

    python -m flatnet.testing.webapp --listen 0.0.0.0:8080 --name web

Endpoints (paths as the app sees them, i.e. after a strip-mode gateway removed its prefix):

- ``GET /``               HTML page naming the app, with links
- ``GET /whoami``         JSON: app name, path, headers and cookies as received
- ``GET /login``          302 to ``/home`` (absolute path) setting ``session=...; Path=/``
- ``GET /login-absolute`` 302 to ``http://<Host>/home`` (absolute URL built from Host)
- ``GET /redirect?to=L``   302 to exactly ``L``
- ``GET /cookies?path=P&path=Q``  one ``Set-Cookie`` per path (empty: no ``Path`` attribute)
- ``GET /home``           JSON: ``{"page": "home", "session": <cookie or null>}``
- ``GET /download?size=N&chunk=C&delay=S``  N bytes of a repeating pattern, C per write, S seconds between
- ``POST /upload``        JSON: ``{"bytes": n, "sha256": ...}`` of the request body (streamed, any size)
- ``GET /ws``             WebSocket echo (text and binary)
- ``GET /health``         ``ok``

With ``--base-path /x`` every path above lives under ``/x`` instead (an app configured with its base
path, like Forgejo's ``ROOT_URL``), and its redirects include it.

HTTP/1.1 with keep-alive and chunked request bodies; WebSocket through the sans-I/O protocol of
the ``websockets`` package. Not a general web server: enough for tests, honest about errors.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import html
import json
import signal
from http.cookies import SimpleCookie
from urllib.parse import parse_qs, urlsplit

from websockets.frames import Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol

MAX_CHUNK = 65536
# Byte i of a download is i % 256; any chunk of up to MAX_CHUNK bytes is one slice of this.
PATTERN = bytes(range(256)) * (MAX_CHUNK // 256 + 1)
REASONS = {200: "OK", 302: "Found", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}


class BadRequest(Exception):
    pass


class WebApp:
    def __init__(self, name: str = "webapp", base_path: str = "") -> None:
        self.name = name
        self.base_path = base_path.rstrip("/")  # "/based": the app lives under it (gateway "pass" mode)
        self.requests = 0
        self._writers: set[asyncio.StreamWriter] = set()

    def close_connections(self) -> None:
        """Close open (keep-alive, websocket) connections: their handlers then end on EOF."""
        for writer in list(self._writers):
            writer.close()

    async def serve(self, host: str, port: int) -> asyncio.Server:
        return await asyncio.start_server(self._connection, host, port, limit=1 << 20)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                head = await _read_head(reader)
                if head is None:
                    break
                method, target, headers, raw_head = head
                self.requests += 1
                keep_alive = headers.get("connection", "").lower() != "close"
                path = urlsplit(target).path
                if path == "/ws" and headers.get("upgrade", "").lower() == "websocket":
                    await self._websocket(raw_head, reader, writer)
                    break
                await self._dispatch(method, target, headers, reader, writer)
                if not keep_alive:
                    break
        except (BadRequest, ValueError) as exc:
            await _respond(writer, 400, {"Content-Type": "text/plain"}, f"bad request: {exc}\n".encode())
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass

    async def _dispatch(self, method, target, headers, reader, writer) -> None:
        url = urlsplit(target)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        path = url.path
        if self.base_path:
            if path != self.base_path and not path.startswith(self.base_path + "/"):
                await _consume_body(reader, headers)
                return await _respond(writer, 404, {"Content-Type": "text/plain"},
                                      f"{self.name}: no {path} (I live under {self.base_path}/)\n".encode())
            path = path[len(self.base_path):] or "/"
        base = self.base_path
        if method == "POST" and path == "/upload":
            count, digest = await _consume_body(reader, headers)
            body = json.dumps({"bytes": count, "sha256": digest}).encode()
            return await _respond(writer, 200, {"Content-Type": "application/json"}, body)
        await _consume_body(reader, headers)  # a GET with a body is still framed correctly
        if method not in ("GET", "HEAD"):
            return await _respond(writer, 405, {"Content-Type": "text/plain"}, b"method not allowed\n")
        cookies = SimpleCookie(headers.get("cookie", ""))
        if path == "/":
            page = (
                f"<!DOCTYPE html><html><head><title>{html.escape(self.name)}</title></head><body>"
                f'<h1 id="app">Hello from {html.escape(self.name)}</h1>'
                '<p><a href="login">log in</a> <a href="whoami">who am I</a></p></body></html>'
            )
            return await _respond(writer, 200, {"Content-Type": "text/html; charset=utf-8"}, page.encode())
        if path == "/health":
            return await _respond(writer, 200, {"Content-Type": "text/plain"}, b"ok\n")
        if path == "/whoami":
            body = json.dumps({
                "app": self.name,
                "method": method,
                "target": target,
                "headers": {k: v for k, v in headers.items()},
                "cookies": {k: m.value for k, m in cookies.items()},
            }).encode()
            return await _respond(writer, 200, {"Content-Type": "application/json"}, body)
        if path == "/login":
            return await _respond(writer, 302, {
                "Location": f"{base}/home",
                "Set-Cookie": f"session={self.name}-ok; Path=/; HttpOnly",
            }, b"")
        if path == "/login-absolute":
            host = headers.get("host", "localhost")
            return await _respond(writer, 302, {
                "Location": f"http://{host}{base}/home",
                "Set-Cookie": f"session={self.name}-abs; Path=/",
            }, b"")
        if path == "/redirect":  # any Location, as apps write them
            return await _respond(writer, 302, {"Location": query.get("to", "/")}, b"")
        if path == "/cookies":  # one Set-Cookie per ?path= ("" = no Path attribute)
            paths = parse_qs(url.query, keep_blank_values=True).get("path", [])
            values = [f"c{i}=v{i}" + (f"; Path={p}" if p else "") + "; HttpOnly" for i, p in enumerate(paths)]
            return await _respond(writer, 200, {"Set-Cookie": values}, b"cookies set\n")
        if path == "/home":
            session = cookies["session"].value if "session" in cookies else None
            body = json.dumps({"page": "home", "app": self.name, "session": session}).encode()
            return await _respond(writer, 200, {"Content-Type": "application/json"}, body)
        if path == "/download":
            size = int(query.get("size", "1048576"))
            chunk = max(1, min(int(query.get("chunk", "65536")), MAX_CHUNK))
            delay = float(query.get("delay", "0"))
            head = _head(200, {"Content-Type": "application/octet-stream", "Content-Length": str(size)})
            writer.write(head)
            sent = 0
            while sent < size:
                n = min(chunk, size - sent)
                writer.write(PATTERN[sent % 256 : sent % 256 + n])
                sent += n
                await writer.drain()
                if delay:
                    await asyncio.sleep(delay)
            return
        return await _respond(writer, 404, {"Content-Type": "text/plain"}, f"{self.name}: no {path}\n".encode())

    async def _websocket(self, raw_head: bytes, reader, writer) -> None:
        # The protocol object parses the handshake itself: hand it the request head as received.
        protocol = ServerProtocol()
        protocol.receive_data(raw_head)
        (request,) = protocol.events_received()
        response = protocol.accept(request)
        protocol.send_response(response)
        _flush(protocol, writer)
        await writer.drain()
        if response.status_code != 101:
            return
        while protocol.state is not State.CLOSED:
            data = await reader.read(65536)
            if data:
                protocol.receive_data(data)
            else:
                protocol.receive_eof()
            for frame in protocol.events_received():
                if frame.opcode is Opcode.TEXT:
                    protocol.send_text(frame.data)
                elif frame.opcode is Opcode.BINARY:
                    protocol.send_binary(frame.data)
            _flush(protocol, writer)
            await writer.drain()
            # After the close handshake the server closes the TCP connection first (RFC 6455 7.1.1).
            if not data or protocol.close_expected():
                break


def expected_download(size: int) -> bytes:
    """What ``/download?size=size`` sends (for tests that check the bytes)."""
    return (bytes(range(256)) * (size // 256 + 1))[:size]


def _flush(protocol: ServerProtocol, writer: asyncio.StreamWriter) -> None:
    for data in protocol.data_to_send():
        if data:
            writer.write(data)


async def _read_head(reader: asyncio.StreamReader):
    try:
        line = await reader.readline()
    except ValueError:
        raise BadRequest("request line too long") from None
    if not line:
        return None
    raw = [line]
    parts = line.decode("latin-1").rstrip("\r\n").split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest(f"bad request line {line[:80]!r}")
    headers: dict[str, str] = {}
    while True:
        header_line = await reader.readline()
        raw.append(header_line)
        if header_line in (b"\r\n", b"\n", b""):
            break
        name, sep, value = header_line.decode("latin-1").partition(":")
        if not sep:
            raise BadRequest(f"bad header line {header_line[:80]!r}")
        key = name.strip().lower()
        headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    return parts[0], parts[1], headers, b"".join(raw)


async def _consume_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> tuple[int, str]:
    """Read (and hash) the request body without keeping it: uploads may be large."""
    digest = hashlib.sha256()
    count = 0
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
                break
            remaining = size
            while remaining:
                data = await reader.read(min(remaining, 1 << 20))
                if not data:
                    raise asyncio.IncompleteReadError(b"", remaining)
                digest.update(data)
                remaining -= len(data)
                count += len(data)
            await reader.readexactly(2)
    else:
        remaining = int(headers.get("content-length", "0"))
        while remaining:
            data = await reader.read(min(remaining, 1 << 20))
            if not data:
                raise asyncio.IncompleteReadError(b"", remaining)
            digest.update(data)
            remaining -= len(data)
            count += len(data)
    return count, digest.hexdigest()


def _head(status: int, headers: dict[str, str | list[str]]) -> bytes:
    """Status line and headers; a list value is sent as one header line per item."""
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}"]
    for k, v in headers.items():
        lines += [f"{k}: {item}" for item in (v if isinstance(v, list) else [v])]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _respond(writer: asyncio.StreamWriter, status: int, headers: dict[str, str | list[str]], body: bytes) -> None:
    headers = {**headers, "Content-Length": str(len(body))}
    writer.write(_head(status, headers) + body)
    await writer.drain()


async def _main(host: str, port: int, name: str, base_path: str) -> None:
    app = WebApp(name, base_path)
    server = await app.serve(host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"webapp {name} listening on {host}:{port}", flush=True)
    await stop.wait()
    server.close()
    app.close_connections()
    await asyncio.sleep(0.1)  # let the handlers see EOF and finish


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flatnet.testing.webapp", description=__doc__.split("\n")[0])
    parser.add_argument("--listen", default="0.0.0.0:8080", help="address:port (default %(default)s)")
    parser.add_argument("--name", default="webapp", help="name shown on its pages")
    parser.add_argument("--base-path", default="", help="serve under this path, e.g. /forge (default: /)")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    asyncio.run(_main(host, int(port), args.name, args.base_path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
