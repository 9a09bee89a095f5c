"""The gateway's one configuration object (``gateway.toml``), typed and validated in one place.

Example::

    listen = "0.0.0.0:80"
    admin_listen = ["127.0.0.1:8081"]
    admin_allow = ["127.0.0.0/8"]
    domain = "flatnet.lan"          # optional: also serve http://<name>.flatnet.lan/
    state_dir = "/var/lib/flatnet/gateway"
    dedicated_ports = [8001, 8002]  # routes with "port" take one of these
    workers = 0                     # 0 = one per CPU (always 1 on Windows)

Paths left unset get a default that depends on the render target (Linux or Windows).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePath, PureWindowsPath
from typing import Literal

from flatnet.config import load, positive_check
from flatnet.gateway.routes import HOST_PATTERN

Target = Literal["linux", "windows"]
TARGETS: tuple[Target, ...] = ("linux", "windows")

DEFAULT_STATE_DIR = {"linux": "/var/lib/flatnet/gateway", "windows": "C:/flatnet/gateway"}
LINUX_LUA_MODULES = ["/usr/lib/nginx/modules/ndk_http_module.so", "/usr/lib/nginx/modules/ngx_http_lua_module.so"]

_SIZE_RE = re.compile(r"^[0-9]+[kKmMgG]?$")


def parse_listen(text: str) -> tuple[str, int]:
    """``"0.0.0.0:80"`` / ``"[::1]:8081"`` -> (address, port); raises ValueError."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"expected 'address:port' with a port in 1..65535, got {text!r}")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        address = ipaddress.ip_address(bare)
    except ValueError:
        raise ValueError(f"expected an IP address before the port, got {host!r}") from None
    if address.version == 6 and not host.startswith("["):
        raise ValueError(f"write IPv6 addresses in brackets, e.g. '[::1]:8081', got {text!r}")
    return str(address), int(port_text)


def _listen_check(value: str) -> str | None:
    try:
        parse_listen(value)
    except ValueError as exc:
        return str(exc)
    return None


def _listen_list_check(values: list[str]) -> str | None:
    if not values:
        return "at least one admin address is needed"
    for v in values:
        problem = _listen_check(v)
        if problem:
            return problem
    return None


def _domain_check(value: str | None) -> str | None:
    if value is None:
        return None
    if not re.match(HOST_PATTERN, value):
        return f"expected a lower-case domain like flatnet.lan, got {value!r}"
    return None


def _ports_check(values: list[int]) -> str | None:
    for v in values:
        if not 1 <= v <= 65535:
            return f"expected ports in 1..65535, got {v}"
    if len(set(values)) != len(values):
        return "a port is listed twice"
    return None


def _size_check(value: str) -> str | None:
    return None if _SIZE_RE.match(value) else f"expected an nginx size like 1g, 512m or 0 (no limit), got {value!r}"


def _workers_check(value: int) -> str | None:
    return None if 0 <= value <= 64 else f"expected 0 (one per CPU) .. 64, got {value}"


@dataclass(frozen=True)
class GatewayConfig:
    listen: str = field(default="0.0.0.0:80", metadata={"check": _listen_check})
    # The admin API binds only these addresses, and also answers only clients in admin_allow.
    admin_listen: list[str] = field(default_factory=lambda: ["127.0.0.1:8081"], metadata={"check": _listen_list_check})
    admin_allow: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = field(
        default_factory=lambda: [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")]
    )
    # 0600 file holding the bearer token; created by `flatnet gateway run` when missing. Rotate by
    # writing a new token and reloading nginx (the token is read at (re)start).
    admin_token_file: str | None = None
    domain: str | None = field(default=None, metadata={"check": _domain_check})
    state_dir: str | None = None  # routes.json lives here; default per target
    prefix_dir: str | None = None  # nginx prefix (conf/, logs/, tmp/); default <state_dir>/nginx
    dedicated_ports: list[int] = field(default_factory=list, metadata={"check": _ports_check})
    workers: int = field(default=0, metadata={"check": _workers_check})
    max_body_size: str = field(default="1g", metadata={"check": _size_check})
    health_interval: float = field(default=2.0, metadata={"check": positive_check})
    connect_timeout: float = field(default=3.0, metadata={"check": positive_check})
    read_timeout: float = field(default=3600.0, metadata={"check": positive_check})
    access_log: bool = True
    # Linux only: the user nginx workers run as when started as root (they write routes.json).
    user: str = "www-data"
    nginx: str = "nginx"  # the nginx (or openresty) binary `flatnet gateway run` starts
    # Linux only: dynamic modules to load (Debian's packages); empty for OpenResty, which has Lua built in.
    lua_modules: list[str] = field(default_factory=lambda: list(LINUX_LUA_MODULES))

    def paths(self, target: Target = "linux") -> GatewayPaths:
        pure: type[PurePath] = PureWindowsPath if target == "windows" else Path
        state = pure(self.state_dir or DEFAULT_STATE_DIR[target])
        prefix = pure(self.prefix_dir) if self.prefix_dir else state / "nginx"
        token = pure(self.admin_token_file) if self.admin_token_file else state / "admin.token"
        return GatewayPaths(state_dir=state, prefix_dir=prefix, token_file=token, target=target)


@dataclass(frozen=True)
class GatewayPaths:
    state_dir: PurePath
    prefix_dir: PurePath
    token_file: PurePath
    target: Target

    @property
    def conf_dir(self) -> PurePath:
        return self.prefix_dir / "conf"

    @property
    def conf_file(self) -> PurePath:
        return self.conf_dir / "nginx.conf"

    @property
    def lua_dir(self) -> PurePath:
        return self.prefix_dir / "lua"

    @property
    def logs_dir(self) -> PurePath:
        return self.prefix_dir / "logs"

    @property
    def pid_file(self) -> PurePath:
        return self.logs_dir / "nginx.pid"

    @property
    def tmp_dir(self) -> PurePath:
        return self.prefix_dir / "tmp"

    @property
    def state_file(self) -> PurePath:
        return self.state_dir / "routes.json"


def load_gateway_config(path: str | Path) -> GatewayConfig:
    return load(path, GatewayConfig)
