"""Graceful Escalation: time to first packet and time to a direct path, per NAT case.

SimNet (default): real TunnelEngines + PathMux on the simulated network with a fake clock, the
test topology of ``tests/escalation/topology.py`` (one-way latency 15 ms everywhere, so an RTT is
30 ms; the relay adds a hop). The "lighthouse" hands out endpoints and a relay session at t=0 and
host A sends its first packet at once; B answers nothing. For each case, over several seeds:

- first packet: from A's first send to B's receipt (handshake included, never waiting for
  discovery: it goes by whatever works first, usually the relay);
- direct: from t=0 to A's switch to a direct rung (LAN or punched), "-" if it never does;
- rung after 30 s, and the share of A's bytes that went by relay.

``--lab`` also runs the real NAT lab (network namespaces, nftables routers, the lighthouse and the
tunnel component; root needed): from both nodes started to the first ping answered through the
tunnel, and to the direct rung. Those figures include process start-up, registration (the
lighthouse client's 0.1 s tick) and the real kernel paths.

Run: ``.venv/bin/python -m bench.escalation [--seeds 5] [--lab]``.
"""

from __future__ import annotations

import argparse
import statistics

from flatnet.escalation import Rung
from flatnet.testing.simnet import SYMMETRIC
from tests.escalation.topology import block_udp, build

RTT = 0.030
CASES = {
    "one LAN": dict(same_lan=True),
    "public <-> public": dict(nat_a=None, nat_b=None),
    "cone <-> cone": dict(nat_a={}, nat_b={}),
    "symmetric <-> public": dict(nat_a={"mapping": SYMMETRIC, "filtering": SYMMETRIC}, nat_b=None),
    "symmetric <-> cone": dict(nat_a={"mapping": SYMMETRIC, "filtering": SYMMETRIC}, nat_b={}),
    "UDP blocked at A": dict(nat_a={}, nat_b={}, blocked=True),
}
DIRECT = (Rung.DIRECT_LAN, Rung.PUNCHED)


def run_case(spec: dict, seed: int) -> tuple[float, float | None, str, float]:
    spec = dict(spec)
    blocked = spec.pop("blocked", False)
    world = build(seed=seed, **spec)
    if blocked:
        block_udp(world, world.a)
    t0 = world.clock.now
    world.start_traffic(600, interval=0.05)
    world.net.run_for(30)
    first = world.b.received_at[0] - t0 if world.b.received_at else float("inf")
    direct = next((e.at - t0 for e in world.a.path_events if e.new is not None and e.new.rung in DIRECT), None)
    selector = world.a.selector(world.b)
    sent = selector.bytes_sent
    relay_share = sum(v for r, v in sent.items() if r not in DIRECT) / max(1, sum(sent.values()))
    return first, direct, selector.current().rung.label, relay_share


def simnet(seeds: int) -> None:
    print(f"SimNet (fake clock; one-way latency 15 ms, RTT {RTT * 1000:.0f} ms), median of {seeds} seeds")
    print(f"{'case':<22} {'first packet':>14} {'x RTT':>7} {'to direct':>11} {'x RTT':>7} {'rung @30s':>11} {'relay bytes':>12}")
    for name, spec in CASES.items():
        results = [run_case(spec, seed) for seed in range(1, seeds + 1)]
        first = statistics.median(r[0] for r in results)
        directs = [r[1] for r in results if r[1] is not None]
        direct = statistics.median(directs) if len(directs) == len(results) else None
        rungs = sorted({r[2] for r in results})
        share = statistics.median(r[3] for r in results)
        direct_text = f"{direct * 1000:8.0f} ms" if direct is not None else "          -"
        direct_ratio = f"{direct / RTT:7.1f}" if direct is not None else "      -"
        print(
            f"{name:<22} {first * 1000:11.0f} ms {first / RTT:7.1f} {direct_text} {direct_ratio} "
            f"{'/'.join(rungs):>11} {share:11.1%}"
        )


def lab() -> None:
    import itertools
    import os
    import tempfile
    import time
    from pathlib import Path

    from flatnet.lab.nat import CONE, build_nat_lab
    from flatnet.lab.nat import SYMMETRIC as NAT_SYMMETRIC
    from flatnet.netns import Namespace
    from tests.escalation.lab_harness import FLATNET, rung, start_lighthouse, start_node, write_files

    print("\nReal NAT lab (namespaces, nftables, lighthouse + relay, tunnel component); from both nodes up")
    print(f"{'case':<22} {'first ping':>12} {'to direct':>12} {'rung':>11}")
    counter = itertools.count()
    prefix = f"fnbench{os.getpid() % 10000}"
    for name, kwargs in (
        ("one LAN", dict(same_lan=True)),
        ("cone <-> cone", dict(nat_a=CONE, nat_b=CONE)),
        ("symmetric <-> cone", dict(nat_a=NAT_SYMMETRIC, nat_b=CONE)),
    ):
        made, processes = [], []

        def make(role, made=made):
            ns = Namespace.create(f"{prefix}-{next(counter)}-{role}")
            made.append(ns)
            return ns

        try:
            nat = build_nat_lab(make, **kwargs)
            with tempfile.TemporaryDirectory() as tmp:
                configs = write_files(Path(tmp), nat)
                processes.append(start_lighthouse(nat.internet, configs["lighthouse"]))
                processes.append(start_node(nat.host_a, configs["a"]))
                processes.append(start_node(nat.host_b, configs["b"]))
                t0 = time.monotonic()
                first = None
                while first is None and time.monotonic() - t0 < 30:
                    ping = nat.host_a.run(["ping", "-c1", "-W1", FLATNET["b"]], check=False)
                    if ping.returncode == 0:
                        first = time.monotonic() - t0
                direct, current = None, None
                while time.monotonic() - t0 < 30:
                    current = rung(processes[1], FLATNET["b"])
                    if current in ("direct-lan", "punched"):
                        direct = time.monotonic() - t0
                        break
                    time.sleep(0.1)
                first_text = f"{first:10.2f} s" if first is not None else "  no answer"
                direct_text = f"{direct:10.2f} s" if direct is not None else "           -"
                print(f"{name:<22} {first_text:>12} {direct_text:>12} {current or '?':>11}")
                for p in reversed(processes):
                    p.stop()
                processes = []
        finally:
            for p in reversed(processes):
                p.stop()
            for ns in made:
                ns.remove()


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.escalation")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--lab", action="store_true", help="also the real NAT lab (root, namespaces)")
    args = parser.parse_args()
    simnet(args.seeds)
    if args.lab:
        lab()


if __name__ == "__main__":
    main()
