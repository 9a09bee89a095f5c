"""``flatnet status [--socket PATH | --config node.toml] [--json]``: what the local flatnet-node is doing.

Asks the node's control socket (flatnet/node/control.py) for ``ping`` (its name), ``status`` (the
tunnel: :meth:`flatnet.node.tunnel_component.TunnelComponent.status`) and ``services`` (the host's
containers published to the gateway) and prints:

* one line per peer: Flatnet IP, certificate name, up/down, the Graceful Escalation rung carrying
  its traffic (``direct-lan``, ``punched``, ``udp-relay``, ``tcp-relay``; ``?`` while nothing is
  confirmed yet: a fallback is in use; ``-`` without escalation), the path (endpoint), the age of
  the last handshake, bytes in and out, and — with escalation — the bytes sent per rung;
* drops by reason (data plane, reassembly, ``firewall.*``, ``tunnel.*``), most frequent first;
* the services this host publishes.

``--json`` prints the whole status answer (plus ``name`` and ``services``). A node that is not
running, or runs without the tunnel (no certificate), is said so plainly; the exit code is 1 when
the node cannot be reached.
"""

from __future__ import annotations

import argparse
import json

from flatnet.errors import UserError

DEFAULT_SOCKET = "/run/flatnet/node.sock"
UNKNOWN_COMMAND = 404  # flatnet.node.control.UNKNOWN_COMMAND (not imported: keeps `flatnet --help` light)


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


def _call(client, path: str, cmd: str) -> dict:
    from flatnet.node.control import ControlError

    try:
        return client.call(cmd)
    except FileNotFoundError:
        raise UserError(f"flatnet-node is not running: no control socket at {path} "
                        "(start it, or point --socket / --config at the right node)") from None  # fmt: skip
    except ConnectionRefusedError:
        raise UserError(f"flatnet-node is not running: nothing listens on {path} (a socket left by a node that died?)") from None
    except PermissionError:
        raise UserError(f"not allowed to talk to flatnet-node at {path}: run as root (or the socket's group)") from None
    except TimeoutError:
        raise UserError(f"flatnet-node at {path} did not answer within {client.timeout:.0f} s") from None
    except (OSError, ConnectionError, ValueError) as exc:
        raise UserError(f"cannot reach flatnet-node at {path}: {exc}") from None
    except ControlError as exc:
        if exc.code == UNKNOWN_COMMAND:
            return {"unknown_command": cmd}
        raise UserError(f"flatnet-node answered {cmd!r} with an error: {exc}") from None


def gather(path: str, timeout: float = 10.0) -> dict:
    """The node's name, tunnel status and services, from its control socket at *path*."""
    from flatnet.node.control import ControlClient

    client = ControlClient(path, timeout=timeout)
    ping = _call(client, path, "ping")
    status = _call(client, path, "status")
    if "unknown_command" in status:  # built without the tunnel component: no certificate
        status = {"running": False, "tunnel": "off (no certificate: see `flatnet cert sign`)"}
    services = _call(client, path, "services")
    return {**status, "name": ping.get("name"), "services": services.get("services", [])}


def run(args) -> int:
    path = _socket_path(args)
    status = gather(path)
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
        return 0
    print(format_status(status))
    return 0


def format_status(status: dict) -> str:
    """The whole human-readable report: peers, drops, services."""
    lines = [f"flatnet-node {status.get('name') or '?'}"]
    if not status.get("running", True):
        lines.append(f"tunnel: {status.get('tunnel', 'not running')}")
    else:
        lines += ["", format_peers(status)]
        lines += ["", "drops:"]
        drops = sorted(((n, r) for r, n in (status.get("drops") or {}).items() if n), key=lambda d: (-d[0], d[1]))
        lines += [f"  {reason:<32} {count}" for count, reason in drops] or ["  (none)"]
    services = status.get("services") or []
    lines += ["", "services (published to the gateway):"]
    for s in sorted(services, key=lambda s: str(s.get("name"))):
        hidden = "" if s.get("expose", True) else "  (not exposed)"
        lines.append(f"  {str(s.get('name')):<24} {s.get('address')}:{s.get('port')}{hidden}")
    if not services:
        lines.append("  (none)")
    return "\n".join(lines)


def format_peers(status: dict) -> str:
    """One line per peer (the table of ``flatnet status``)."""
    if not status.get("running", True):
        return "tunnel: not running"
    paths = (status.get("escalation") or {}).get("peers", {})
    peers = status.get("peers", {})
    header = (f"{'peer':<16} {'name':<16} {'up':<4} {'rung':<11} {'path':<28} {'handshake':<12} "
              f"{'in':>10} {'out':>10}")  # fmt: skip
    if paths:
        header += "  bytes sent by rung"
    lines = [header]
    for ip in sorted(set(peers) | set(paths), key=_ip_key):
        peer = peers.get(ip, {})
        path = paths.get(ip, {})
        rung = path.get("rung") or "-"
        if path and not path.get("confirmed"):
            rung += "?"
        where = path.get("path") or peer.get("endpoint") or "-"
        received = peer.get("tunnel_rx_bytes", peer.get("rx_bytes"))
        sent = peer.get("tunnel_tx_bytes", peer.get("tx_bytes"))
        line = (f"{ip:<16} {str(peer.get('name') or '-'):<16} {'yes' if peer.get('up') else 'no':<4} {rung:<11} "
                f"{where:<28} {_handshake(peer):<12} {_size(received):>10} {_size(sent):>10}")  # fmt: skip
        if paths:
            line += "  " + (", ".join(f"{k} {v}" for k, v in sorted(path.get("bytes_sent", {}).items())) or "-")
        lines.append(line)
    if len(lines) == 1:
        lines.append("(no peers)")
    return "\n".join(lines)


def _handshake(peer: dict) -> str:
    age = peer.get("handshake_age")
    if age is not None:
        return f"{age:.0f} s ago" if age >= 10 else f"{age:.1f} s ago"
    return "pending" if peer.get("handshake_pending") else "never"


def _size(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _ip_key(ip: str):
    try:
        return tuple(int(part) for part in ip.split("."))
    except ValueError:
        return (999, ip)
