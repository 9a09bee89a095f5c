"""Clients of the gateway's admin API (docs/admin-api.md).

:class:`AdminClient` uses only ``http.client`` (it is imported by the CNI plugin, which must start
fast); :class:`AsyncAdminClient` (module ``admin_async``, also importable from here) speaks the same
requests over asyncio streams for flatnet-node.
Both validate routes before sending them (:class:`Route` cannot be built invalid) and raise
:class:`AdminError` with the gateway's status and message for anything but 2xx.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from flatnet.gateway.routes import Route, check_name, check_owner

API = "/api/v1"
DEFAULT_TIMEOUT = 10.0


class AdminError(Exception):
    """The admin API answered with an error (status 0: no answer at all)."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message
        super().__init__(f"gateway admin API: {status} {message}" if status else f"gateway admin API: {message}")


@dataclass(frozen=True)
class RouteTable:
    """What ``GET /api/v1/routes`` returns."""

    routes: tuple[Route, ...]
    owners: dict[str, int]

    def by_name(self) -> dict[str, Route]:
        return {r.name: r for r in self.routes}


def _split_base(base_url: str) -> tuple[str, int, str]:
    parts = urlsplit(base_url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"admin URL must look like http://127.0.0.1:8081, got {base_url!r}")
    return parts.hostname, parts.port or 80, parts.path.rstrip("/")


def _sync_body(owner: str, generation: int, routes: Iterable[Route]) -> dict[str, Any]:
    check_owner(owner)
    if isinstance(generation, bool) or not isinstance(generation, int) or generation < 0:
        raise ValueError(f"generation must be a non-negative integer, got {generation!r}")
    items = []
    for route in routes:
        if route.owner not in (None, owner):
            raise ValueError(f"route {route.name} belongs to {route.owner}, not {owner}")
        items.append(route.with_owner(owner).to_json())
    return {"owner": owner, "generation": generation, "routes": items}


def _decode(status: int, raw: bytes) -> Any:
    try:
        doc = json.loads(raw) if raw else {}
    except ValueError:
        doc = None
    if 200 <= status < 300:
        if doc is None:
            raise AdminError(status, f"answer is not JSON: {raw[:200]!r}")
        return doc
    message = doc.get("error") if isinstance(doc, dict) else None
    raise AdminError(status, message or raw[:200].decode("utf-8", "replace").strip() or "no message")


def _table(doc: Any) -> RouteTable:
    try:
        routes = tuple(Route.from_json(r) for r in doc["routes"])
        owners = {str(k): int(v) for k, v in doc.get("owners", {}).items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise AdminError(200, f"unexpected route list: {exc}") from None
    return RouteTable(routes, owners)


class AdminClient:
    """Blocking client: ``AdminClient("http://127.0.0.1:8081", token).upsert(route)``."""

    def __init__(self, base_url: str, token: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.host, self.port, self.base_path = _split_base(base_url)
        self.token = token
        self.timeout = timeout

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.request(method, self.base_path + API + path, body=payload, headers=headers)
            response = conn.getresponse()
            raw = response.read()
            status = response.status
        except (OSError, http.client.HTTPException) as exc:
            raise AdminError(0, f"cannot reach {self.host}:{self.port}: {exc}") from None
        finally:
            conn.close()
        return _decode(status, raw)

    def list(self) -> RouteTable:
        return _table(self._request("GET", "/routes"))

    def upsert(self, route: Route) -> None:
        self._request("PUT", f"/routes/{route.name}", route.to_json())

    def delete(self, name: str) -> None:
        self._request("DELETE", f"/routes/{check_name(name)}")

    def sync(self, owner: str, generation: int, routes: Iterable[Route]) -> dict[str, Any]:
        return self._request("POST", "/sync", _sync_body(owner, generation, routes))


def __getattr__(name: str):
    # AsyncAdminClient lives in admin_async so that the CNI plugin's import stays free of asyncio.
    if name == "AsyncAdminClient":
        from flatnet.gateway.admin_async import AsyncAdminClient

        return AsyncAdminClient
    raise AttributeError(name)
