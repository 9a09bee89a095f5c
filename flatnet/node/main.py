"""flatnet-node: stub until the data-plane issue."""

import sys


def main() -> int:
    print("flatnet-node: not yet implemented", file=sys.stderr)
    return 2
