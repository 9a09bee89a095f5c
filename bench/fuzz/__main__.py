"""``python -m bench.fuzz --surface NAME|all --count N [--seed S]``: run campaigns, print a report.

Exit status 1 if any campaign crashed, broke an invariant or leaked a file descriptor.
"""

from __future__ import annotations

import argparse
import sys

from bench.fuzz.campaign import run_campaign
from bench.fuzz.surfaces import SURFACES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__)
    parser.add_argument("--surface", default="all", choices=[*SURFACES, "all"])
    parser.add_argument("--count", type=int, default=100_000, help="inputs per surface")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--verbose", action="store_true", help="print surface statistics")
    args = parser.parse_args(argv)
    names = list(SURFACES) if args.surface == "all" else [args.surface]
    failed = False
    for name in names:
        report = run_campaign(SURFACES[name](), args.count, args.seed)
        print(report.line(), flush=True)
        if args.verbose:
            for key, value in report.stats.items():
                print(f"    {key}: {value}")
        for problem in report.problems:
            print(f"    PROBLEM: {problem}")
        for example in report.examples:
            print("    CRASH: " + example.replace("\n", "\n    "))
        failed |= not report.ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
