"""The admin API client over asyncio streams, for flatnet-node (see :mod:`flatnet.gateway.admin`)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from typing import Any

from flatnet.gateway.admin import (
    API,
    DEFAULT_TIMEOUT,
    AdminError,
    RouteTable,
    _decode,
    _split_base,
    _sync_body,
    _table,
)
from flatnet.gateway.routes import Route, check_name


class AsyncAdminClient:
    """The same API over asyncio streams, one connection per call (calls are rare)."""

    def __init__(self, base_url: str, token: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.host, self.port, self.base_path = _split_base(base_url)
        self.token = token
        self.timeout = timeout

    async def _request(self, method: str, path: str, body: Any = None) -> Any:
        try:
            return await asyncio.wait_for(self._exchange(method, path, body), self.timeout)
        except TimeoutError:
            raise AdminError(0, f"no answer from {self.host}:{self.port} within {self.timeout} s") from None
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            raise AdminError(0, f"cannot talk to {self.host}:{self.port}: {exc}") from None

    async def _exchange(self, method: str, path: str, body: Any) -> Any:
        payload = b"" if body is None else json.dumps(body).encode()
        head = (
            f"{method} {self.base_path}{API}{path} HTTP/1.1\r\n"
            f"Host: {self.host}:{self.port}\r\n"
            f"Authorization: Bearer {self.token}\r\n"
            "Accept: application/json\r\n"
            "Connection: close\r\n"
            + ("Content-Type: application/json\r\n" if body is not None else "")
            + f"Content-Length: {len(payload)}\r\n\r\n"
        )
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            writer.write(head.encode("latin-1") + payload)
            await writer.drain()
            status, headers = await _read_head(reader)
            raw = await _read_body(reader, headers)
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass
        return _decode(status, raw)

    async def list(self) -> RouteTable:
        return _table(await self._request("GET", "/routes"))

    async def upsert(self, route: Route) -> None:
        await self._request("PUT", f"/routes/{route.name}", route.to_json())

    async def delete(self, name: str) -> None:
        await self._request("DELETE", f"/routes/{check_name(name)}")

    async def sync(self, owner: str, generation: int, routes: Iterable[Route]) -> dict[str, Any]:
        return await self._request("POST", "/sync", _sync_body(owner, generation, routes))


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    status_line = (await reader.readline()).decode("latin-1")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP answer: {status_line[:80]!r}")
    headers: dict[str, str] = {}
    while True:
        line = (await reader.readline()).decode("latin-1")
        if line in ("\r\n", "\n", ""):
            break
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                await reader.readline()
                return b"".join(chunks)
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"]))
    return await reader.read()
