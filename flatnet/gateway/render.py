"""Turn a :class:`GatewayConfig` into the files nginx runs: ``conf/nginx.conf``,
``conf/flatnet_proxy.conf`` and the Lua modules under ``lua/flatnet/``.

Rendering is pure (config in, ``{relative path: text}`` out); :func:`write_rendered` puts the files
under a directory. The Windows target differs in paths (``C:/...``, forward slashes, which nginx
for Windows accepts), one worker (nginx on Windows serves with one), and no ``user``,
``load_module`` or ``daemon`` lines (OpenResty for Windows has Lua built in and runs as a service).
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path, PurePath

from flatnet.gateway import routes as route_rules
from flatnet.gateway.config import GatewayConfig, Target, parse_listen

_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")

# Counter series (route x status class, upstream failures) the metrics dict holds at most; beyond,
# stale routes' series are pruned and the rest counted as dropped (lua/flatnet/metrics.lua).
METRICS_MAX_SERIES = 4096
# Shared-dict bytes per series: the node (~80 bytes) and a key of up to ~70 bytes fall in the
# slab allocator's 256-byte class; twice that leaves room for fragmentation.
_METRICS_BYTES_PER_SERIES = 512


def template(name: str) -> str:
    return resources.files("flatnet.gateway").joinpath("templates", name).read_text(encoding="utf-8")


def lua_sources() -> dict[str, str]:
    folder = resources.files("flatnet.gateway").joinpath("lua", "flatnet")
    return {entry.name: entry.read_text(encoding="utf-8") for entry in folder.iterdir() if entry.name.endswith(".lua")}


def fill(text: str, values: dict[str, str]) -> str:
    """Replace ``{{name}}``; a placeholder without a value is a bug, not an empty string."""

    def one(match: re.Match) -> str:
        key = match.group(1)
        if key not in values:
            raise KeyError(f"template placeholder {{{{{key}}}}} has no value")
        return str(values[key])

    return _PLACEHOLDER.sub(one, text)


def _path(p: PurePath) -> str:
    text = p.as_posix()
    if any(c in text for c in ' ;{}"\'$'):
        raise ValueError(f"path {text!r} contains characters nginx would misread")
    return text


def _listen_line(address: str, port: int, extra: str = "") -> str:
    host = f"[{address}]" if ":" in address else address
    return f"        listen {host}:{port}{extra};"


def _seconds(value: float) -> str:
    return f"{int(value * 1000)}ms"


def render(config: GatewayConfig, target: Target = "linux", extra_http: str = "") -> dict[str, str]:
    """All files of a gateway, by path relative to the nginx prefix directory.

    *extra_http* is nginx text added inside ``http {}`` (the benchmark's static upstream).
    """
    paths = config.paths(target)
    public_host, public_port = parse_listen(config.listen)
    listens = [_listen_line(public_host, public_port, " default_server")]
    for port in config.dedicated_ports:
        if port == public_port:
            raise ValueError(f"dedicated port {port} is the public listen port")
        listens.append(_listen_line(public_host, port))
    admin_lines = []
    for item in config.admin_listen:
        host, port = parse_listen(item)
        if port == public_port or port in config.dedicated_ports:
            raise ValueError(f"admin_listen {item} clashes with a public port")
        admin_lines.append(_listen_line(host, port))
    allow_lines = [f"        allow {net};" for net in config.admin_allow]

    settings = {
        "target": target,
        "state_file": _path(paths.state_file),
        "token_file": _path(paths.token_file),
        "domain": config.domain,
        "dedicated_ports": list(config.dedicated_ports),
        "health_interval": config.health_interval,
        "admin_max_body": route_rules.ADMIN_MAX_BODY,
        "limits": route_rules.lua_limits(),
        "metrics_max_series": METRICS_MAX_SERIES,
    }
    settings_json = json.dumps(settings, sort_keys=True)
    assert "]==]" not in settings_json

    if target == "windows":
        main = ["# OpenResty for Windows: Lua built in, one worker, started by the service wrapper."]
        workers = "1"
        error_log_stderr = ""
    else:
        main = [f"load_module {m};" for m in config.lua_modules]
        main += ["daemon off;", "master_process on;", f"user {config.user};"]
        workers = str(config.workers) if config.workers else "auto"
        error_log_stderr = "error_log stderr warn;"

    values = {
        "target": target,
        "state_file": _path(paths.state_file),
        "main_directives": "\n".join(main),
        "workers": workers,
        "pid_file": _path(paths.pid_file),
        "error_log": _path(paths.logs_dir / "error.log"),
        "error_log_stderr": error_log_stderr,
        "access_log": (
            f"access_log {_path(paths.logs_dir / 'access.log')} combined buffer=64k flush=1s;"
            if config.access_log
            else "access_log off;"
        ),
        "tmp_dir": _path(paths.tmp_dir),
        "lua_dir": _path(paths.lua_dir),
        "settings_json": settings_json,
        "public_listen": "\n".join(listens),
        "max_body_size": config.max_body_size,
        "admin_max_body": str(route_rules.ADMIN_MAX_BODY),
        "extra_http": extra_http,
        "metrics_dict_size": f"{max(1024, METRICS_MAX_SERIES * _METRICS_BYTES_PER_SERIES // 1024)}k",
    }
    proxy_values = {"connect_timeout": _seconds(config.connect_timeout), "read_timeout": _seconds(config.read_timeout)}
    files = {
        "conf/nginx.conf": fill(template("nginx.conf"), values),
        "conf/flatnet_proxy.conf": fill(template("flatnet_proxy.conf"), proxy_values),
        "conf/flatnet_admin_listen.conf": "# generated: admin API addresses and allowed clients\n"
        + "\n".join(line.strip() for line in admin_lines + allow_lines) + "\n",
    }
    for name, text in lua_sources().items():
        files[f"lua/flatnet/{name}"] = text
    return files


def write_rendered(files: dict[str, str], out_dir: str | Path) -> list[Path]:
    """Write *files* under *out_dir* (each via a temp file and rename); returns the paths written."""
    out = Path(out_dir)
    written = []
    for rel, text in sorted(files.items()):
        dest = out / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".tmp")
        tmp.write_bytes(text.encode("utf-8"))
        tmp.replace(dest)
        written.append(dest)
    return written
