"""`python -m bench.cni [--rounds N]`: wall time of the flatnet plugin's ADD, DEL and VERSION.

Side by side, in the same run and the same namespaces, with Debian's reference plugins: ``ptp``
with ``host-local`` IPAM (the same veth + /32 routes design, written in Go). Flatnet is measured
twice: with ``flatnet-node`` running (the normal path: the plugin asks the node) and without (the
self-contained fallback, which imports pyroute2). Rounds are interleaved so load from other users of
the machine hits every variant alike; each figure is the median (and p90) over the rounds.

Targets (issue 4): ADD <= 2x the reference, VERSION <= 30 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.namespaces import BenchNamespaces
from flatnet.lab.probe import in_namespace
from flatnet.netns import Namespace
from tests.cni.harness import CniHost

REFERENCE_DIR = "/usr/lib/cni"
REF_SUBNET = "10.87.2.0/24"


def reference_conf(data_dir: Path) -> dict:
    return {"cniVersion": "1.0.0", "name": "refnet", "type": "ptp",
            "ipam": {"type": "host-local", "subnet": REF_SUBNET, "dataDir": str(data_dir),
                     "routes": [{"dst": "10.87.0.0/16"}, {"dst": "0.0.0.0/0"}]}}


def timed(ns: Namespace, argv: list[str], env: dict, stdin: bytes) -> float:
    """Seconds for one plugin run, spawned from a thread inside *ns* (no nsenter in the way)."""

    def go() -> float:
        start = time.perf_counter()
        proc = subprocess.run(argv, input=stdin, env=env, capture_output=True)
        elapsed = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"{argv[0]} {env['CNI_COMMAND']} failed: {proc.stdout[-500:]!r} {proc.stderr[-500:]!r}")
        return elapsed

    return in_namespace(ns.name, go)


def cni_env(command: str, container_id: str = "", netns: str = "", path: str = REFERENCE_DIR) -> dict:
    return {"PATH": os.environ["PATH"], "CNI_COMMAND": command, "CNI_CONTAINERID": container_id, "CNI_NETNS": netns,
            "CNI_IFNAME": "eth0", "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAME=bench", "CNI_PATH": path}


def summary(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cni")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.cni needs root (namespaces)", file=sys.stderr)
        return 2
    namespaces = BenchNamespaces()
    make = namespaces.make

    tmp = Path(tempfile.mkdtemp(prefix="flatnet-bench-cni-"))
    host = None
    try:
        host_ns = make("wsl")
        host = CniHost.create(host_ns, tmp / "flatnet")
        plugin = [str(host.plugin)]
        ref = [f"{REFERENCE_DIR}/ptp"]
        ref_conf = json.dumps(reference_conf(tmp / "host-local")).encode()
        flat_conf = json.dumps(host.netconf()).encode()
        version_in = b'{"cniVersion": "1.0.0"}'
        times: dict[str, list[float]] = {k: [] for k in (
            "VERSION ref", "VERSION flatnet",
            "ADD ref", "ADD flatnet+node", "ADD flatnet standalone",
            "DEL ref", "DEL flatnet+node", "DEL flatnet standalone")}

        def round_trip(node_up: bool, rounds: int) -> None:
            label = "flatnet+node" if node_up else "flatnet standalone"
            for i in range(rounds):
                a, b = make("ref"), make("flat")
                times["VERSION ref"].append(timed(host_ns, ref, cni_env("VERSION"), version_in))
                times["VERSION flatnet"].append(timed(host_ns, plugin, cni_env("VERSION"), version_in))
                times["ADD ref"].append(timed(host_ns, ref, cni_env("ADD", f"r{i}", a.path), ref_conf))
                times[f"ADD {label}"].append(timed(host_ns, plugin, cni_env("ADD", f"f{i}", b.path), flat_conf))
                times["DEL ref"].append(timed(host_ns, ref, cni_env("DEL", f"r{i}", a.path), ref_conf))
                times[f"DEL {label}"].append(timed(host_ns, plugin, cni_env("DEL", f"f{i}", b.path), flat_conf))
                for ns in (a, b):
                    namespaces.remove(ns)

        host.start_node(read_labels=False)
        round_trip(True, args.rounds)
        host.stop_node()
        round_trip(False, max(5, args.rounds // 2))

        print(f"CNI plugin wall times, {args.rounds} rounds (standalone {max(5, args.rounds // 2)}), ms: median / p90")
        print(f"{'':26}{'flatnet':>16}{'ptp+host-local':>18}{'ratio (median)':>16}")
        for op in ("VERSION", "ADD", "DEL"):
            ref_med, ref_p90 = summary(times[f"{op} ref"])
            variants = ["flatnet"] if op == "VERSION" else ["flatnet+node", "flatnet standalone"]
            for variant in variants:
                med, p90 = summary(times[f"{op} {variant}"])
                print(f"{op + ' ' + variant:26}{med * 1e3:8.1f} /{p90 * 1e3:6.1f}{ref_med * 1e3:10.1f} /{ref_p90 * 1e3:6.1f}"
                      f"{med / ref_med:14.2f}x")
        add_ratio = summary(times["ADD flatnet+node"])[0] / summary(times["ADD ref"])[0]
        version_ms = summary(times["VERSION flatnet"])[0] * 1e3
        print(f"targets: ADD <= 2x reference: {add_ratio:.2f}x ({'met' if add_ratio <= 2 else 'MISSED'}); "
              f"VERSION <= 30 ms: {version_ms:.1f} ms ({'met' if version_ms <= 30 else 'MISSED'})")
        return 0
    finally:
        if host is not None:
            host.stop_node()
        namespaces.remove_all()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
