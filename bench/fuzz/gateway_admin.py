"""Gateway admin API: what a client allowed to connect to the admin listener can send.

A real nginx with the gateway's Lua is started through :class:`flatnet.gateway.runner.GatewayProcess`
on loopback (free ports, its own prefix in a temporary directory). Each input is one HTTP request on
a fresh connection: methods, paths (route names valid, overlong, encoded, traversals), headers
(token right, wrong, missing, doubled; Content-Length right and wrong; chunked bodies) and JSON
bodies for PUT /api/v1/routes/{name} and POST /api/v1/sync, mutated as values and as bytes; a few
requests are mutated as raw bytes as a whole. Contract: every answer is 1xx-4xx (2xx or 4xx for
anything complete), never 5xx — except the 501/505 nginx's own HTTP parser must give an unknown
transfer-coding or HTTP version (RFC 9112 section 6.1, RFC 9110 section 15.6.6), which never reach
the Lua; the workers that started are the workers that end (none crashed and
was respawned); error.log has no Lua abort, [alert] or [emerg].
"""

from __future__ import annotations

import json
import random
import shutil
import socket
import tempfile
from pathlib import Path

from bench.fuzz.campaign import Surface, mutate_bytes, mutate_structure

ROUTE = {"backends": ["10.87.1.2:8080", "10.87.1.3:8080"], "mode": "strip"}
SYNC = {"owner": "node-1", "generation": 1, "routes": [{"name": "web", "backends": ["10.87.1.2:8080"]}]}
NAMES = ["web", "api", "x", "a" * 63, "a" * 64, "Bad_Name", "web%2Fx", "..", "%00", "we b", "ü", "web/extra", ""]
PATHS = ["/api/v1/routes", "/api/v1/sync", "/api/v1/", "/api/v1/routes/", "/", "/api/v2/routes",
         "/api/v1/routes?x=1", "/api/v1/../v1/routes", "//api//v1//routes", "/api/v1/routes/web#frag"]
# nginx's built-in error pages for the two 5xx answers HTTP requires of a parser (see feed()); the
# gateway's Lua answers JSON, never these HTML pages.
PARSER_STATUSES = {501: b"<h1>501 Not Implemented</h1>", 505: b"<h1>505 HTTP Version Not Supported</h1>"}
METHODS = ["GET", "PUT", "POST", "DELETE", "HEAD", "OPTIONS", "PATCH", "TRACE", "CONNECT", "get", "PROPFIND", "X" * 40]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GatewayAdminSurface(Surface):
    name = "gateway-admin"
    description = "real nginx + Lua admin API on loopback, one request per connection"

    def setup(self, rng: random.Random) -> None:
        from flatnet.config import from_dict
        from flatnet.gateway.config import GatewayConfig
        from flatnet.gateway.runner import GatewayProcess

        if not shutil.which("nginx"):
            raise RuntimeError("the gateway-admin campaign needs nginx")
        self.work = Path(tempfile.mkdtemp(prefix="flatnet-fuzz-gw-"))
        self.work.chmod(0o755)  # nginx workers (www-data) write routes.json under it
        self.admin_port = free_port()
        self.config = from_dict({
            "listen": f"127.0.0.1:{free_port()}",
            "admin_listen": [f"127.0.0.1:{self.admin_port}"],
            "state_dir": str(self.work / "gateway"),
            "workers": 1,
            "access_log": False,
        }, GatewayConfig, source="<fuzz>")
        self.gateway = GatewayProcess(self.config)
        self._errlog = open(self.work / "nginx.stderr", "wb")  # noqa: SIM115  (closed in teardown)
        try:
            self.gateway.start(stderr=self._errlog)
        except Exception:
            self._errlog.close()
            raise
        self.token = Path(self.config.paths().token_file).read_text().strip()
        self.workers = self.gateway.worker_pids()
        self.statuses: dict[int, int] = {}
        self.no_answer = 0
        self.parser_refusals = 0

    # -- inputs -----------------------------------------------------------------------------------

    def _body(self, rng: random.Random, path: str) -> bytes:
        base = SYNC if "sync" in path else ROUTE
        r = rng.random()
        if r < 0.2:
            value = base
        elif r < 0.7:
            value = mutate_structure(base, rng)
        elif r < 0.8:
            value = [base] * rng.randint(0, 3)
        else:
            return mutate_bytes(json.dumps(base).encode(), rng)
        try:
            return json.dumps(value).encode()
        except (ValueError, TypeError):
            return json.dumps(base).encode()

    def generate(self, rng: random.Random) -> bytes:
        method = rng.choice(METHODS[:4]) if rng.random() < 0.8 else rng.choice(METHODS)
        path = "/api/v1/routes/" + rng.choice(NAMES) if rng.random() < 0.6 else rng.choice(PATHS)
        if rng.random() < 0.05:
            path = path + "/" + "z" * rng.choice((10, 5000, 9000))
        headers = [f"Host: 127.0.0.1:{self.admin_port}", "Connection: close"]
        r = rng.random()
        if r < 0.8:
            headers.append(f"Authorization: Bearer {self.token}")
        elif r < 0.85:
            headers.append(f"Authorization: Bearer {self.token[:-1]}")
        elif r < 0.9:
            headers.append(f"Authorization: Basic {self.token}")
        elif r < 0.95:
            headers += [f"Authorization: Bearer {self.token}", "Authorization: Bearer wrong"]
        if rng.random() < 0.05:
            headers.append("X-Junk: " + "j" * rng.choice((100, 9000)))
        body = b""
        if method in ("PUT", "POST", "PATCH") or rng.random() < 0.1:
            body = self._body(rng, path)
            headers.append(rng.choice(("Content-Type: application/json", "Content-Type: text/plain",
                                       "Content-Type: application/json; charset=utf-16")))
            if rng.random() < 0.1:  # chunked
                headers.append("Transfer-Encoding: chunked")
                body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"
            else:
                length = len(body)
                if rng.random() < 0.05:
                    length = rng.choice((0, max(0, length - 3), -1, 2**63, "abc"))
                headers.append(f"Content-Length: {length}")
                if rng.random() < 0.02:
                    body += b"x" * (1 << 20)  # above the admin body limit: 413 -> a 4xx JSON answer
        request = f"{method} {path} HTTP/1.1\r\n".encode() + "\r\n".join(headers).encode("utf-8", "replace") \
            + b"\r\n\r\n" + body
        if rng.random() < 0.05:
            request = mutate_bytes(request, rng)
        return request

    # -- the request ------------------------------------------------------------------------------

    def feed(self, request: bytes) -> None:
        with socket.create_connection(("127.0.0.1", self.admin_port), timeout=5) as sock:
            try:
                sock.sendall(request)
                sock.shutdown(socket.SHUT_WR)
            except (BrokenPipeError, ConnectionResetError):
                pass  # nginx answered (e.g. 413) and closed before taking it all
            answer = b""
            try:
                while len(answer) < 4096:
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    answer += chunk
            except ConnectionResetError:
                pass
        status = None
        for line in answer.split(b"\r\n"):
            if line.startswith(b"HTTP/1."):
                parts = line.split(b" ", 2)
                if len(parts) > 1 and parts[1].isdigit() and not parts[1].startswith(b"1"):
                    status = int(parts[1])
                    break
        if status is None:
            self.no_answer += 1  # nginx may close on a request it cannot parse at all
            return
        self.statuses[status] = self.statuses.get(status, 0) + 1
        head = answer.split(b"\r\n\r\n", 1)[0]
        if status in PARSER_STATUSES and (PARSER_STATUSES[status] in answer or (  # a HEAD answer has no body
                request.startswith(b"HEAD ") and b"Content-Type: text/html" in head)):
            # nginx's own HTTP parser answered, before any Lua ran, as the RFCs require: 501 for an
            # unknown transfer-coding (RFC 9112 section 6.1), 505 for an HTTP major version it does
            # not speak (RFC 9110 section 15.6.6). Not a server failure.
            self.parser_refusals += 1
            return
        if status >= 500:
            raise AssertionError(f"{status} for {request[:200]!r}: {answer[-300:]!r}")

    # -- after ------------------------------------------------------------------------------------

    def check(self) -> list[str]:
        problems = []
        if self.gateway.proc is None or self.gateway.proc.poll() is not None:
            problems.append("the nginx master died")
        now = self.gateway.worker_pids()
        if now != self.workers:
            problems.append(f"nginx workers changed {sorted(self.workers)} -> {sorted(now)} (a worker died)")
        log = Path(self.config.paths().logs_dir) / "error.log"
        bad = [line for line in log.read_text(errors="replace").splitlines()
               if "lua entry thread aborted" in line or "[alert]" in line or "[emerg]" in line
               or "exited on signal" in line]
        problems += [f"error.log: {line[:200]}" for line in bad[:5]]
        return problems

    def teardown(self) -> None:
        try:
            self.gateway.stop()
        finally:
            self._errlog.close()
            shutil.rmtree(self.work, ignore_errors=True)

    def stats(self) -> dict:
        return {"statuses": dict(sorted(self.statuses.items())), "closed_without_answer": self.no_answer,
                "nginx_parser_501_505": self.parser_refusals}
