"""`flatnet gateway ...`: render the nginx config, run the gateway, push routes by hand.

    flatnet gateway render --config gateway.toml --out DIR [--target linux|windows]
    flatnet gateway run --config gateway.toml
    flatnet gateway sync routes.toml [--admin URL] [--token-file F] [--owner manual] [--generation N]
    flatnet gateway routes [--admin URL] [--token-file F]
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

from flatnet.config import ConfigError
from flatnet.errors import UserError
from flatnet.gateway.admin import AdminClient, AdminError
from flatnet.gateway.config import TARGETS, GatewayConfig, load_gateway_config
from flatnet.gateway.render import render, write_rendered
from flatnet.gateway.routes import load_route_file

DEFAULT_CONFIG = "/etc/flatnet/gateway.toml"
DEFAULT_ADMIN = "http://127.0.0.1:8081"


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="gateway_command", metavar="SUBCOMMAND")
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])

    p = sub.add_parser("render", help="write nginx.conf and the Lua modules for a target")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="gateway.toml (default %(default)s)")
    p.add_argument("--out", required=True, help="directory to write conf/ and lua/ into (the nginx prefix)")
    p.add_argument("--target", choices=TARGETS, default="linux")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("run", help="run the gateway (nginx) in the foreground")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="gateway.toml (default %(default)s)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("sync", help="push a hand-written route file ([[route]] tables) to the gateway")
    p.add_argument("routes", help="routes.toml")
    _admin_args(p)
    p.add_argument("--owner", default="manual", help="owner of these routes (default %(default)s)")
    p.add_argument("--generation", type=int, default=None,
                   help="sync generation (default: the current time, so a later sync always wins)")
    p.set_defaults(func=cmd_sync)

    p = sub.add_parser("routes", help="list the routes the gateway holds")
    _admin_args(p)
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    p.set_defaults(func=cmd_routes)


def _admin_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--admin", default=DEFAULT_ADMIN, help="admin API URL (default %(default)s)")
    p.add_argument("--token-file", default=None,
                   help="file holding the admin token (default: admin_token_file of --config)")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="gateway.toml, to find the token file")


def _client(args) -> AdminClient:
    from flatnet.gateway.runner import read_token_file

    token_file = args.token_file
    if token_file is None:
        if not Path(args.config).exists():
            raise UserError(f"give --token-file (no {args.config} to find the admin token in)")
        token_file = load_gateway_config(args.config).paths("linux").token_file
    try:
        return AdminClient(args.admin, read_token_file(token_file))
    except ValueError as exc:
        raise UserError(str(exc)) from None


def cmd_render(args) -> int:
    config = load_gateway_config(args.config)
    try:
        files = render(config, args.target)
    except ValueError as exc:
        raise ConfigError(args.config, "", str(exc)) from None
    for path in write_rendered(files, args.out):
        print(path)
    paths = config.paths(args.target)
    print(f"# prefix in the config: {paths.prefix_dir} (copy {args.out} there); state: {paths.state_file}",
          file=sys.stderr)
    return 0


def cmd_run(args) -> int:
    from flatnet.gateway.runner import GatewayProcess

    config: GatewayConfig = load_gateway_config(args.config)
    gateway = GatewayProcess(config)
    try:
        gateway.start(stderr=sys.stderr, die_with_parent=True)
    except ValueError as exc:
        raise ConfigError(args.config, "", str(exc)) from None
    paths = gateway.paths
    print(f"flatnet gateway: nginx {gateway.master_pid} serving http://{config.listen}/ "
          f"(admin {', '.join(config.admin_listen)}, token {paths.token_file}); Ctrl-C stops it", file=sys.stderr)
    stop = {"now": False}

    def on_signal(signum, frame):
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def on_hup(signum, frame):
        # Re-read gateway.toml, re-render, `nginx -s reload` (also how a new admin token takes effect).
        try:
            new_config = load_gateway_config(args.config)
            gateway.config, gateway.paths = new_config, new_config.paths("linux")
            gateway.reload()
            print("flatnet gateway: reloaded", file=sys.stderr)
        except (UserError, ConfigError, ValueError, OSError) as exc:
            print(f"flatnet gateway: reload failed, still serving the previous config: {exc}", file=sys.stderr)

    signal.signal(signal.SIGHUP, on_hup)
    try:
        while not stop["now"] and gateway.proc is not None and gateway.proc.poll() is None:
            time.sleep(0.2)
        code = gateway.proc.returncode if gateway.proc is not None else 0
    finally:
        gateway.stop()
    return 0 if stop["now"] else (code or 1)


def cmd_sync(args) -> int:
    routes = load_route_file(args.routes, owner=args.owner)
    generation = args.generation if args.generation is not None else time.time_ns() // 1_000_000
    client = _client(args)
    try:
        result = client.sync(args.owner, generation, routes)
    except (AdminError, ValueError) as exc:
        raise UserError(f"{args.routes}: {exc}") from None
    print(f"synced {len(routes)} route(s) as owner {args.owner!r} generation {generation}: "
          f"{json.dumps(result, sort_keys=True)}")
    return 0


def cmd_routes(args) -> int:
    client = _client(args)
    try:
        table = client.list()
    except AdminError as exc:
        raise UserError(str(exc)) from None
    if args.json:
        print(json.dumps({"routes": [r.to_json() for r in table.routes], "owners": table.owners}, indent=2))
        return 0
    for r in table.routes:
        extra = "".join(f" {k}={v}" for k, v in (("port", r.port), ("host", r.host), ("owner", r.owner)) if v)
        print(f"{r.name:20} {r.mode:5} {','.join(r.backends)}{extra}")
    if not table.routes:
        print("(no routes)", file=sys.stderr)
    return 0

