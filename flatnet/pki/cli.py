"""Command group stub: replaced by the issue that builds it."""

import argparse


def register(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(func=lambda args: _not_yet(parser.prog))


def _not_yet(prog: str) -> int:
    print(f"{prog}: not yet implemented")
    return 2
