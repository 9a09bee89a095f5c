"""What a gateway route is, and the rules every route must follow.

A route maps a service *name* to one or more *backends* (``ip:port``). The same rules are checked
in two places: here (the admin client, the CNI plugin and ``flatnet gateway sync`` reject a bad
route before sending it) and in the gateway's Lua admin API (which must not trust its callers).
The patterns and limits below are the single source: :func:`lua_limits` hands them to the rendered
nginx config, so the two sides cannot drift apart.

Route JSON, as carried by the admin API::

    {"name": "web", "backends": ["10.87.1.2:80"], "mode": "strip", "port": null,
     "owner": "wsl-a", "host": null}

- ``mode = "strip"``: ``/web/x`` reaches the app as ``/x``; ``X-Forwarded-Prefix: /web`` is set and
  redirects and cookie paths coming back are put under ``/web``.
- ``mode = "pass"``: the app sees ``/web/x`` unchanged (apps configured with a base path).
- ``port``: a port of its own on the gateway, taken from the gateway's ``dedicated_ports`` pool.
- ``owner``: who pushed it (a node name, ``manual``); ``POST /api/v1/sync`` replaces one owner's set.
- ``host``: an extra full host name served by this route (besides ``<name>.<domain>``).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from flatnet.config import ConfigError, from_dict, load

# A service name is one DNS label (RFC 1123), lower case: it becomes /<name>/ and <name>.<domain>.
NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
# An owner is a host or tool name: a label with dots, dashes and underscores allowed.
OWNER_PATTERN = r"^[a-z0-9]([a-z0-9._-]{0,62}[a-z0-9])?$"
# A full host name: dot-separated labels, at most 253 characters.
HOST_PATTERN = r"^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$"
HOST_MAX_LENGTH = 253
MAX_BACKENDS = 16
MODES = ("strip", "pass")
# Admin API request bodies larger than this are refused (a sync of ~2000 routes still fits).
ADMIN_MAX_BODY = 1024 * 1024
# Names the gateway keeps for itself (its own pages live under /_flatnet/).
RESERVED_NAMES = ("api",)

_NAME_RE = re.compile(NAME_PATTERN)
_OWNER_RE = re.compile(OWNER_PATTERN)
_HOST_RE = re.compile(HOST_PATTERN)


class RouteError(ValueError):
    """A route breaks a rule. ``field`` names the offending field ("name", "backends[1]", ...)."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


def check_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise RouteError("name", f"expected a DNS label ([a-z0-9-], 1-63 characters), got {name!r}")
    if name in RESERVED_NAMES:
        raise RouteError("name", f"{name!r} is reserved by the gateway")
    return name


def check_backend(backend: object, field: str = "backend") -> str:
    """``"10.87.1.2:80"`` (IPv4 dotted quad and port 1..65535), returned in canonical form."""
    if not isinstance(backend, str):
        raise RouteError(field, f"expected 'ip:port', got {backend!r}")
    host, sep, port_text = backend.rpartition(":")
    if not sep or not port_text.isdigit() or not (1 <= int(port_text) <= 65535):
        raise RouteError(field, f"expected 'ip:port' with a port in 1..65535, got {backend!r}")
    parts = host.split(".")
    # ipaddress alone would accept forms nginx and the Lua check do not; insist on a plain quad.
    if len(parts) != 4 or not all(p.isdigit() and len(p) <= 3 for p in parts):
        raise RouteError(field, f"expected an IPv4 address like 10.87.1.2, got {host!r}")
    try:
        address = ipaddress.IPv4Address(".".join(str(int(p)) for p in parts))
    except ValueError:
        raise RouteError(field, f"expected an IPv4 address like 10.87.1.2, got {host!r}") from None
    return f"{address}:{int(port_text)}"


def check_host(host: object) -> str:
    if not isinstance(host, str) or len(host) > HOST_MAX_LENGTH or not _HOST_RE.match(host):
        raise RouteError("host", f"expected a lower-case host name like web.example.lan, got {host!r}")
    return host


def check_owner(owner: object) -> str:
    if not isinstance(owner, str) or not _OWNER_RE.match(owner):
        raise RouteError("owner", f"expected an owner name ([a-z0-9._-], 1-64 characters), got {owner!r}")
    return owner


@dataclass(frozen=True)
class Route:
    """One service on the gateway. Construction validates; an invalid Route cannot exist."""

    name: str
    backends: tuple[str, ...]
    mode: Literal["strip", "pass"] = "strip"
    port: int | None = None
    owner: str | None = None
    host: str | None = None

    def __post_init__(self) -> None:
        check_name(self.name)
        if isinstance(self.backends, str) or not isinstance(self.backends, Iterable):
            raise RouteError("backends", f"expected a list of 'ip:port', got {self.backends!r}")
        backends = tuple(check_backend(b, f"backends[{i}]") for i, b in enumerate(self.backends))
        if not backends:
            raise RouteError("backends", "at least one backend is needed")
        if len(backends) > MAX_BACKENDS:
            raise RouteError("backends", f"at most {MAX_BACKENDS} backends, got {len(backends)}")
        if len(set(backends)) != len(backends):
            raise RouteError("backends", "a backend is listed twice")
        object.__setattr__(self, "backends", backends)
        if self.mode not in MODES:
            raise RouteError("mode", f"expected one of {list(MODES)}, got {self.mode!r}")
        if self.port is not None and (
            isinstance(self.port, bool) or not isinstance(self.port, int) or not 1 <= self.port <= 65535
        ):
            raise RouteError("port", f"expected a port in 1..65535 or null, got {self.port!r}")
        if self.owner is not None:
            check_owner(self.owner)
        if self.host is not None:
            check_host(self.host)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "backends": list(self.backends),
            "mode": self.mode,
            "port": self.port,
            "owner": self.owner,
            "host": self.host,
        }

    @classmethod
    def from_json(cls, data: Any) -> Route:
        """Build from admin-API JSON; unknown fields are an error, as in the Lua check."""
        if not isinstance(data, Mapping):
            raise RouteError("route", f"expected an object, got {data!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RouteError(unknown[0], f"unknown field (known: {', '.join(sorted(known))})")
        if "name" not in data or "backends" not in data:
            raise RouteError("name" if "name" not in data else "backends", "required field is missing")
        if not isinstance(data["backends"], list):
            raise RouteError("backends", f"expected a list of 'ip:port', got {data['backends']!r}")
        kwargs = {k: data[k] for k in known if k in data and data[k] is not None}
        kwargs["backends"] = tuple(data["backends"])
        return cls(**kwargs)

    def with_owner(self, owner: str | None) -> Route:
        return dataclasses.replace(self, owner=owner)


def lua_limits() -> dict[str, Any]:
    """The rules above in the shape the Lua side reads at init (see lua/flatnet/routes.lua)."""
    return {
        "name_pattern": NAME_PATTERN,
        "owner_pattern": OWNER_PATTERN,
        "host_pattern": HOST_PATTERN,
        "host_max_length": HOST_MAX_LENGTH,
        "max_backends": MAX_BACKENDS,
        "modes": list(MODES),
        "reserved_names": list(RESERVED_NAMES),
    }


# ---- the hand-written route file of Phase 1 (`flatnet gateway sync routes.toml`) -------------


@dataclass(frozen=True)
class RouteEntry:
    """One ``[[route]]`` table of a route file."""

    name: str
    backends: list[str]
    mode: Literal["strip", "pass"] = "strip"
    port: int | None = None
    host: str | None = None


@dataclass(frozen=True)
class RouteFile:
    route: list[RouteEntry] = dataclasses.field(default_factory=list)


def load_route_file(path: str | Path, owner: str | None = None) -> list[Route]:
    """Read a ``[[route]]`` TOML file; every problem is a ConfigError naming the file and key."""
    return _routes_from_file(load(path, RouteFile), str(path), owner)


def routes_from_dict(data: Any, source: str = "<routes>", owner: str | None = None) -> list[Route]:
    """As :func:`load_route_file`, from an already parsed mapping (tests, the lab)."""
    return _routes_from_file(from_dict(data, RouteFile, source=source), source, owner)


def _routes_from_file(parsed: RouteFile, source: str, owner: str | None) -> list[Route]:
    routes: list[Route] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(parsed.route):
        try:
            route = Route(
                name=entry.name,
                backends=tuple(entry.backends),
                mode=entry.mode,
                port=entry.port,
                owner=owner,
                host=entry.host,
            )
        except RouteError as exc:
            raise ConfigError(source, f"route[{i}].{exc.field}", exc.message) from None
        if route.name in seen:
            raise ConfigError(source, f"route[{i}].name", f"{route.name!r} is already defined in route[{seen[route.name]}]")
        seen[route.name] = i
        routes.append(route)
    return routes
