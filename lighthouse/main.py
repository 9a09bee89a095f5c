"""flatnet-lighthouse: stub until the lighthouse issue."""

import sys


def main() -> int:
    print("flatnet-lighthouse: not yet implemented", file=sys.stderr)
    return 2
