"""bench/rtt_floor: where a Python tunnel's ping RTT comes from, next to Nebula's, in one run.

    sudo .venv/bin/python -m bench.rtt_floor [--rounds 3] [--count 100]

Between two namespaces over a veth, interleaved in rounds, per-ping medians of ``ping -i 0.05``
(as bench.tunnel): the bare veth; a minimal Python TUN<->UDP forwarder on uvloop (no checks, no
crypto: the floor any Python data path pays); the same with one ChaCha20-Poly1305 call per hop;
Flatnet; Nebula. Prints each one's median and p90 and its ratio to Nebula.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.namespaces import BenchNamespaces
from bench.tunnel.__main__ import FlatnetTunnel, NebulaTunnel, _stop, _wait_ping
from flatnet.testing.tunnel_pair import UNDERLAY, build_underlay

FLOOR_NET = {"a": "10.90.0.1", "b": "10.90.0.2"}


def pings(ns, target: str, count: int) -> list[float]:
    out = ns.run(["ping", "-c", str(count), "-i", "0.05", target], check=False).stdout
    return [float(x) for x in re.findall(r"time=([\d.]+)", out)]


def start_forwarders(a, b, aead: bool) -> list[subprocess.Popen]:
    procs = []
    for side, ns, other in (("a", a, "b"), ("b", b, "a")):
        argv = [sys.executable, "-m", "bench.rtt_floor.forwarder", "fnfloor0", f"{FLOOR_NET[side]}/24",
                UNDERLAY[side], UNDERLAY[other]] + (["--aead"] if aead else [])
        proc = ns.popen(argv, stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        if proc.stdout.readline().strip() != "ready":
            _stop(procs)
            raise RuntimeError("forwarder did not start")
    _wait_ping(a, FLOOR_NET["b"])
    return procs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench.rtt_floor")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--count", type=int, default=100)
    args = parser.parse_args(argv)
    results: dict[str, list[float]] = {}
    namespaces = BenchNamespaces()
    try:
        a, b = namespaces.make("a"), namespaces.make("b")
        build_underlay(a, b)
        with tempfile.TemporaryDirectory() as work:
            nebula = NebulaTunnel()
            nebula.start(a, b, Path(work))
            flatnet = FlatnetTunnel()
            flatnet.start(a, b, Path(work))
            try:
                for _ in range(args.rounds):
                    results.setdefault("veth", []).extend(pings(a, UNDERLAY["b"], args.count))
                    for label, aead in (("python floor", False), ("python floor + AEAD", True)):
                        procs = start_forwarders(a, b, aead)
                        try:
                            results.setdefault(label, []).extend(pings(a, FLOOR_NET["b"], args.count))
                        finally:
                            _stop(procs)
                    results.setdefault("flatnet", []).extend(pings(a, flatnet.target, args.count))
                    results.setdefault("nebula", []).extend(pings(a, nebula.target, args.count))
            finally:
                flatnet.stop()
                nebula.stop()
    finally:
        namespaces.remove_all()
    reference = statistics.median(results["nebula"])
    print(f"{'path':22s} {'pings':>5s} {'median ms':>10s} {'p90 ms':>8s} {'x Nebula':>9s}")
    for label, values in results.items():
        values.sort()
        median = statistics.median(values)
        print(f"{label:22s} {len(values):5d} {median:10.3f} {values[len(values) * 9 // 10]:8.3f} {median / reference:9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
