"""``flatnet lab up|status|down``: a whole Flatnet site simulated on this machine (see docs/lab.md)."""

from __future__ import annotations

import argparse
import os

from flatnet.errors import UserError
from flatnet.lab.state import DEFAULT_PREFIX
from flatnet.lab.topology import SITES


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="lab_command", metavar="ACTION")

    def add(name: str, help_text: str, func) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument(
            "--prefix",
            default=DEFAULT_PREFIX,
            help=f"names of the lab's namespaces start with PREFIX- and its state is in "
            f"/run/flatnet-lab/PREFIX (default {DEFAULT_PREFIX})",
        )
        p.set_defaults(func=func)
        return p

    up = add("up", "build the site, start gateway and apps, print what runs where and what to try", _up)
    up.add_argument("--site", choices=sorted(SITES), default="office", help="which simulated site (default office)")
    up.add_argument(
        "--gateway",
        choices=("auto", "flatnet", "static"),
        default="auto",
        help="flatnet: Flatnet's gateway or fail; static: plain nginx stand-in; auto (default): "
        "Flatnet's if it works, else the stand-in",
    )
    up.add_argument("--browser", action="store_true", help="also load the app in headless Chromium from the LAN host")
    up.add_argument(
        "--no-containers",
        dest="containers",
        action="store_false",
        help="no flatnet-node, CNI plugin or Podman: only the Python demo app (quicker)",
    )
    status = add("status", "namespaces, processes, routes, and whether the app answers from the LAN", _status)
    status.add_argument("--browser", action="store_true", help="also load the app in headless Chromium")
    add("down", "remove every namespace, link, rule and process of the lab (also after a crash)", _down)
    run = add("exec", "run a command on a lab host (its namespace; podman there uses the host's Podman)", _exec)
    run.add_argument("host", help="lab host, e.g. lan, win, wsl1")
    run.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND", help="command and arguments")
    parser.set_defaults(func=lambda args: _help(parser))


def _lab(args: argparse.Namespace):
    if os.geteuid() != 0:
        raise UserError("the lab needs root (network namespaces, nftables): run it with sudo")
    from flatnet.lab.site import Lab

    return Lab(prefix=args.prefix, site=getattr(args, "site", "office"))


def _up(args: argparse.Namespace) -> int:
    return _lab(args).up(gateway_mode=args.gateway, browser=args.browser, containers=args.containers)


def _status(args: argparse.Namespace) -> int:
    return _lab(args).status(browser=args.browser)


def _down(args: argparse.Namespace) -> int:
    return _lab(args).down()


def _exec(args: argparse.Namespace) -> int:
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        raise UserError("give a command, e.g. flatnet lab exec wsl1 -- podman ps")
    return _lab(args).exec(args.host, argv)


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2
