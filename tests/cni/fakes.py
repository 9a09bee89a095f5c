"""In-memory twins for the CNI tests: the gateway's admin API as the node's pusher sees it."""

from __future__ import annotations

import asyncio
import json
from typing import Any


class FakeAdminClient:
    """Records calls and keeps the routes a gateway would hold; ``fail`` makes the next calls raise."""

    def __init__(self) -> None:
        self.routes: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, Any]] = []
        self.fail = 0
        self.changed = asyncio.Event()

    def _maybe_fail(self) -> None:
        if self.fail:
            self.fail -= 1
            raise ConnectionError("gateway down")

    async def sync(self, owner: str, generation: int, routes: list[dict[str, Any]]) -> dict[str, Any]:
        self._maybe_fail()
        self.calls.append(("sync", generation))
        self.routes = {k: v for k, v in self.routes.items() if v["owner"] != owner}
        self.routes.update({r["name"]: r for r in routes})
        self.changed.set()
        return {"generation": generation}

    async def upsert(self, route: dict[str, Any]) -> None:
        self._maybe_fail()
        self.calls.append(("upsert", route["name"]))
        self.routes[route["name"]] = route
        self.changed.set()

    async def delete(self, name: str) -> None:
        self._maybe_fail()
        self.calls.append(("delete", name))
        self.routes.pop(name, None)
        self.changed.set()


class RecordingAdminServer:
    """A tiny HTTP server on loopback answering the admin API with 200 {} and recording requests."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, Any]] = []
        self.got = asyncio.Event()
        self._server: asyncio.base_events.Server | None = None

    @property
    def url(self) -> str:
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def close(self) -> None:
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            method, path, _ = (await reader.readline()).decode().split(" ", 2)
            length = 0
            while (line := (await reader.readline()).decode().strip()):
                key, _, value = line.partition(":")
                if key.lower() == "content-length":
                    length = int(value)
            body = json.loads(await reader.readexactly(length)) if length else None
            self.requests.append((method, path, body))
            self.got.set()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
                         b"Connection: close\r\n\r\n{}")
            await writer.drain()
        finally:
            writer.close()
