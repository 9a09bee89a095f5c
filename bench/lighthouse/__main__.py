"""Benchmark the lighthouse core with simulated nodes, in process, on one core.

For each population (1 k and 10 k registered nodes by default):

- registration: every node registers (Register with two LAN endpoints and its subnet) once;
- memory per node: tracemalloc over the registration of every node (records, indexes, buckets),
  divided by the node count - measured in a separate pass, since tracing slows everything;
- queries: random nodes query random other nodes' container addresses (reply + PunchNotify,
  both encoded), the fake clock advancing at the target rate so each node stays under its rate
  limit; a service publish per node beforehand so the records are full-sized. Sustained
  queries/s = queries / wall time; latency per query from ``perf_counter_ns`` around each
  ``handle_control`` call (p50, p99, max); also queries per CPU-second (``process_time``), the
  one-core capacity independent of other load on a shared machine.

The figures are printed beside the targets (10 k nodes, 5 k queries/s, p99 <= 5 ms, one core).
Run: ``.venv/bin/python -m bench.lighthouse [--nodes 1000 10000] [--queries 20000]``.
"""

from __future__ import annotations

import argparse
import gc
import random
import time
import tracemalloc
from ipaddress import IPv4Address

from flatnet.proto.control import Query, Register, Service, ServicePublish, encode_control_message
from lighthouse.core import LighthouseCore, LighthouseSettings
from lighthouse.testing import host_certificate

TARGET_NODES = 10_000
TARGET_QPS = 5_000.0
TARGET_P99_MS = 5.0


def make_population(count: int):
    certs = [host_certificate(n) for n in range(1, count + 1)]
    addrs = [(f"198.51.{(n >> 8) & 255}.{n & 255}", 40000 + n % 20000) for n in range(1, count + 1)]
    registers = [
        encode_control_message(
            Register(
                c.ip.ip,
                c.subnets,
                ((f"192.168.{n % 250}.{n % 200 + 2}", 4242), (f"172.20.{n % 250}.2", 4242)),
            )
        )
        for n, c in enumerate(certs, start=1)
    ]
    publishes = [
        encode_control_message(
            ServicePublish(
                (
                    Service("web", IPv4Address(int(c.subnets[0].network_address) + 2), 8080),
                    Service("db", IPv4Address(int(c.subnets[0].network_address) + 3), 5432),
                )
            )
        )
        for c in certs
    ]
    return certs, addrs, registers, publishes


def populate(core: LighthouseCore, certs, addrs, registers, publishes, now: float) -> float:
    start = time.perf_counter()
    for cert, addr, reg, pub in zip(certs, addrs, registers, publishes, strict=True):
        core.handle_control(reg, cert, addr, now)
        core.handle_control(pub, cert, addr, now)
    return time.perf_counter() - start


def percentile(sorted_values: list[int], fraction: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(fraction * len(sorted_values)))]


def run(count: int, queries: int, seed: int) -> dict:
    rng = random.Random(seed)
    certs, addrs, registers, publishes = make_population(count)
    settings = LighthouseSettings(max_nodes=max(count, 20_000))

    # Memory pass (traced).
    gc.collect()
    tracemalloc.start()
    core = LighthouseCore(settings)
    before = tracemalloc.take_snapshot()
    populate(core, certs, addrs, registers, publishes, 0.0)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    bytes_per_node = grown / count
    del core
    gc.collect()

    # Timed pass.
    core = LighthouseCore(settings)
    register_seconds = populate(core, certs, addrs, registers, publishes, 0.0)
    assert len(core) == count
    plan = []
    for i in range(queries):
        asker = rng.randrange(count)
        target = rng.randrange(count)
        address = IPv4Address(int(certs[target].subnets[0].network_address) + 2 + (i % 5))
        plan.append((certs[asker], addrs[asker], encode_control_message(Query(i % 2**32 + 1, address))))
    latencies = []
    step = 1.0 / TARGET_QPS
    now = 1.0
    next_tick = 2.0
    handle = core.handle_control
    clock = time.perf_counter_ns
    sent = 0
    gc.collect()
    cpu_start = time.process_time()
    wall_start = clock()
    for cert, addr, payload in plan:
        t0 = clock()
        sent += len(handle(payload, cert, addr, now))
        latencies.append(clock() - t0)
        now += step
        if now >= next_tick:  # the service ticks once a second: expiry work is part of the load
            core.tick(now)
            next_tick += 1.0
    wall = (clock() - wall_start) / 1e9
    cpu = time.process_time() - cpu_start
    latencies.sort()
    dropped = core.counters["drop.rate-limited"]
    return {
        "nodes": count,
        "register_per_s": 2 * count / register_seconds,
        "bytes_per_node": bytes_per_node,
        "qps": queries / wall,
        "qps_cpu": queries / cpu,
        "p50_ms": percentile(latencies, 0.50) / 1e6,
        "p99_ms": percentile(latencies, 0.99) / 1e6,
        "max_ms": latencies[-1] / 1e6,
        "messages_out": sent,
        "rate_limited": dropped,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[1_000, 10_000])
    parser.add_argument("--queries", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    print(f"lighthouse core, one process, {args.queries} queries per population (reply + punch notify each)")
    header = (
        f"{'nodes':>7} {'reg msg/s':>10} {'bytes/node':>10} {'queries/s':>10} {'x target':>8} {'q/cpu-s':>8} "
        f"{'p50 ms':>7} {'p99 ms':>7} {'p99/target':>10} {'max ms':>7} {'out msgs':>9} {'limited':>7}"
    )
    print(header)
    print("-" * len(header))
    for count in args.nodes:
        r = run(count, args.queries, args.seed)
        print(
            f"{r['nodes']:>7} {r['register_per_s']:>10.0f} {r['bytes_per_node']:>10.0f} {r['qps']:>10.0f} "
            f"{r['qps'] / TARGET_QPS:>8.2f} {r['qps_cpu']:>8.0f} {r['p50_ms']:>7.3f} {r['p99_ms']:>7.3f} "
            f"{r['p99_ms'] / TARGET_P99_MS:>10.3f} {r['max_ms']:>7.3f} {r['messages_out']:>9} {r['rate_limited']:>7}"
        )
    print(f"targets: {TARGET_NODES} nodes, {TARGET_QPS:.0f} queries/s, p99 <= {TARGET_P99_MS} ms on one core")
    print("queries/s is wall clock; q/cpu-s is per second of this process's CPU time (what one core")
    print("sustains when the machine is shared); latencies are wall clock and include preemption.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
