"""`flatnet`: the umbrella command line.

Each command group lives beside the code it drives and exposes ``register(parser)``, which adds
its sub-commands and sets ``func(args) -> int`` on each. Errors meant for the user are raised as
:class:`flatnet.errors.UserError` (or ``ConfigError``) and printed without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from flatnet import __version__
from flatnet.config import ConfigError
from flatnet.errors import UserError

# (command, module with register(parser), one-line help)
COMMAND_GROUPS = [
    ("gateway", "flatnet.gateway.cli", "render, run and feed the HTTP gateway"),
    ("cert", "flatnet.pki.cli", "the team's CA and host certificates"),
    ("lab", "flatnet.lab.cli", "a whole Flatnet site simulated on this machine"),
    ("cni", "cni.cli", "install the Podman CNI plugin"),
    ("status", "flatnet.node.cli", "what the local flatnet-node is doing"),
    ("reload", "flatnet.node.reload_cli", "make the local flatnet-node re-read its config"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flatnet", description="Flatnet: reach containers across WSL2 hosts.")
    parser.add_argument("--version", action="version", version=f"flatnet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name, help_text in COMMAND_GROUPS:
        group = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module_name).register(group)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except (UserError, ConfigError) as exc:
        print(f"flatnet: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
