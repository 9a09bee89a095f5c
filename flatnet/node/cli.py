"""``flatnet status``: what the local flatnet-node is doing, per peer (asks its control socket).

One line per peer: Flatnet IP, certificate name, up/down, the Graceful Escalation rung carrying
its traffic (``direct-lan``, ``punched``, ``udp-relay``, ``tcp-relay``; ``?`` while nothing is
confirmed yet: a fallback is in use), the path, and the bytes sent per rung. ``--json`` prints the
node's whole status answer.
"""

from __future__ import annotations

import argparse
import json

from flatnet.errors import UserError

DEFAULT_SOCKET = "/run/flatnet/node.sock"


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", help=f"the node's control socket (default: from --config, else {DEFAULT_SOCKET})")
    parser.add_argument("--config", help="node.toml to take the control socket from")
    parser.add_argument("--json", action="store_true", help="the whole status answer as JSON")
    parser.set_defaults(func=run)


def _socket_path(args) -> str:
    if args.socket:
        return args.socket
    if args.config:
        from flatnet.node.config import load_node_config

        return str(load_node_config(args.config).control_socket)
    return DEFAULT_SOCKET


def run(args) -> int:
    from flatnet.node.control import ControlClient, ControlError

    path = _socket_path(args)
    try:
        status = ControlClient(path).call("status")
    except (OSError, ConnectionError) as exc:
        raise UserError(f"cannot reach flatnet-node at {path}: {exc}") from None
    except ControlError as exc:
        raise UserError(f"flatnet-node answered with an error: {exc}") from None
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
        return 0
    print(format_peers(status))
    return 0


def format_peers(status: dict) -> str:
    if not status.get("running", True):
        return "tunnel: not running"
    paths = status.get("escalation", {}).get("peers", {})
    lines = [f"{'peer':<16} {'name':<16} {'up':<4} {'rung':<11} {'path':<44} bytes sent by rung"]
    for ip in sorted(set(status.get("peers", {})) | set(paths)):
        peer = status.get("peers", {}).get(ip, {})
        path = paths.get(ip, {})
        rung = path.get("rung") or "-"
        if path and not path.get("confirmed"):
            rung += "?"
        sent = ", ".join(f"{k} {v}" for k, v in sorted(path.get("bytes_sent", {}).items())) or "-"
        where = path.get("path") or peer.get("endpoint") or "-"
        lines.append(
            f"{ip:<16} {str(peer.get('name') or '-'):<16} {'yes' if peer.get('up') else 'no':<4} "
            f"{rung:<11} {where:<44} {sent}"
        )
    return "\n".join(lines)
