"""The gateway on the lab's Windows host: Flatnet's own, or an honest stand-in.

``flatnet`` mode runs ``flatnet gateway run --config gateway.toml`` (nginx + Lua, routes in a shared
dict, admin API on loopback and the WSL-facing addresses) and pushes the lab's routes with
``flatnet gateway sync`` from a WSL2 host, as a node or a person there would.

``static`` mode is the fallback while the Flatnet gateway is unavailable (not built yet, or failing
to start): plain nginx with one ``proxy_pass`` location per service and no admin API. ``lab up``
says which mode runs and why.
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import importlib
import sys
from dataclasses import dataclass
from pathlib import Path

from flatnet.lab.topology import ADMIN_PORT, Service, Topology

LAN_PORT = 80
LAB_DOMAIN = "flatnet.lan"


@dataclass(frozen=True)
class GatewayLaunch:
    mode: str  # "flatnet" or "static"
    argv: list[str]  # run inside the gateway host's namespace
    admin_urls: dict[str, str]  # lab host -> admin API URL as seen from that host
    files: list[Path]
    dropped_keys: tuple[str, ...] = ()  # gateway.toml keys the gateway's config does not know
    domain: str | None = None  # services are also http://<name>.<domain>/


def subcommands(module_name: str) -> set[str]:
    """The sub-commands a CLI group module registers (empty for a "not yet" stub)."""
    try:
        module = importlib.import_module(module_name)
        parser = argparse.ArgumentParser()
        module.register(parser)
    except Exception:  # a half-landed module must not break the lab: it is reported as missing
        return set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    return set()


def flatnet_gateway_missing() -> str | None:
    """Why ``flatnet gateway run/sync`` cannot be used, or None if it can."""
    have = subcommands("flatnet.gateway.cli")
    missing = {"run", "sync"} - have
    if missing:
        return f"`flatnet gateway {' / '.join(sorted(missing))}` is not available yet"
    return None


def flatnet_launch(topology: Topology, state_dir: Path, token_file: Path) -> GatewayLaunch:
    """Write gateway.toml for the lab's Windows host; the gateway binds its admin API where WSL sees it."""
    from flatnet.gateway import config as gateway_config

    admin_hosts = {"127.0.0.1": topology.gateway_host}
    for wsl in topology.wsl_hosts:
        admin_hosts[topology.gateway_address_for(wsl)] = wsl
    wanted = {
        "listen": f"{topology.gateway_lan_address}:{LAN_PORT}",
        "admin_listen": [f"{addr}:{ADMIN_PORT}" for addr in admin_hosts],
        "admin_allow": ["127.0.0.0/8", "172.24.0.0/16"],
        "admin_token_file": str(token_file),
        "domain": LAB_DOMAIN,
        "state_dir": str(state_dir / "gateway"),
        "workers": 1,
        "health_interval": 1.0,
    }
    known = {f.name for f in dataclasses.fields(gateway_config.GatewayConfig)}
    dropped = tuple(k for k in wanted if k not in known)
    path = state_dir / "gateway.toml"
    path.write_text("".join(f"{k} = {_toml(v)}\n" for k, v in wanted.items() if k in known))
    argv = [sys.executable, "-m", "flatnet.cli", "gateway", "run", "--config", str(path)]
    admin_urls = {host: f"http://{addr}:{ADMIN_PORT}" for addr, host in admin_hosts.items()}
    domain = wanted["domain"] if "domain" in known else None
    return GatewayLaunch("flatnet", argv, admin_urls, [path], dropped, domain)


def write_route_file(path: Path, services: list[tuple[Service, str]]) -> None:
    """``[[route]]`` file for ``flatnet gateway sync``: (service, "ip:port") pairs, prefix stripped."""
    lines = []
    for service, backend in services:
        lines += ["[[route]]", f'name = "{service.name}"', f'backends = ["{backend}"]', 'mode = "strip"', ""]
    path.write_text("\n".join(lines))


def sync_argv(route_file: Path, admin_url: str, token_file: Path) -> list[str]:
    return [
        sys.executable, "-m", "flatnet.cli", "gateway", "sync", str(route_file),
        "--admin", admin_url, "--token-file", str(token_file),
    ]  # fmt: skip


def static_launch(topology: Topology, state_dir: Path, services: list[tuple[Service, str]]) -> GatewayLaunch:
    """Plain nginx proxying each service under /<name>/ (prefix stripped, redirects and cookies rewritten)."""
    prefix = state_dir / "static-nginx"
    (prefix / "tmp").mkdir(parents=True, exist_ok=True)
    items = "".join(
        f'<li><a href="/{html.escape(s.name)}/">{html.escape(s.name)}</a> &rarr; {html.escape(b)} on {s.host}</li>'
        for s, b in services
    )
    index = (
        "<!doctype html><html><head><meta charset=utf-8><title>Flatnet lab (static gateway)</title></head>"
        f"<body><h1>Flatnet lab services</h1><ul>{items}</ul>"
        "<p>Static stand-in gateway: the Flatnet gateway was not available.</p></body></html>"
    ).replace("'", "&#39;")
    locations = ""
    for service, backend in services:
        locations += f"""
    location /{service.name}/ {{
      proxy_pass http://{backend}/;
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto $scheme;
      proxy_set_header X-Forwarded-Host $host;
      proxy_set_header X-Forwarded-Prefix /{service.name};
      proxy_redirect ~^/(.*)$ /{service.name}/$1;
      proxy_cookie_path / /{service.name}/;
    }}
    location = /{service.name} {{ return 301 /{service.name}/; }}"""
    conf = f"""worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log;
events {{ worker_connections 256; }}
http {{
  access_log {prefix}/access.log;
  client_body_temp_path {prefix}/tmp/body;
  proxy_temp_path {prefix}/tmp/proxy;
  fastcgi_temp_path {prefix}/tmp/fastcgi;
  uwsgi_temp_path {prefix}/tmp/uwsgi;
  scgi_temp_path {prefix}/tmp/scgi;
  server {{
    listen {topology.gateway_lan_address}:{LAN_PORT};
    location = / {{ default_type text/html; return 200 '{index}'; }}{locations}
  }}
}}
"""
    path = prefix / "nginx.conf"
    path.write_text(conf)
    argv = ["nginx", "-p", str(prefix), "-c", str(path), "-e", str(prefix / "error.log"), "-g", "daemon off;"]
    return GatewayLaunch("static", argv, {}, [path])


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
