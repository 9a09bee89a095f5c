"""``flatnet reload``: make the local flatnet-node re-read its config file (as ``kill -HUP`` does),
and print what changed, what needs a restart, or why the new config was refused (then nothing
changed). Asks the node's control socket (command ``reload``, flatnet/node/reload.py)."""

from __future__ import annotations

import argparse

from flatnet.errors import UserError
from flatnet.node.cli import DEFAULT_SOCKET, _socket_path


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", help=f"the node's control socket (default: from --config, else {DEFAULT_SOCKET})")
    parser.add_argument("--config", help="node.toml to take the control socket from")
    parser.set_defaults(func=run)


def run(args) -> int:
    from flatnet.node.control import ControlClient, ControlError

    path = _socket_path(args)
    try:
        answer = ControlClient(path, timeout=60.0).call("reload")
    except (OSError, ConnectionError) as exc:
        raise UserError(f"cannot reach flatnet-node at {path}: {exc}") from None
    except ControlError as exc:
        raise UserError(f"reload refused, nothing changed: {exc.error}") from None
    print(format_answer(answer))
    return 0


def format_answer(answer: dict) -> str:
    changes = answer.get("changes") or []
    restart = answer.get("needs_restart") or []
    lines = [f"changed: {c}" for c in changes] or ["no change applied"]
    lines += [f"needs restart (left as it was): {key}" for key in restart]
    return "\n".join(lines)
