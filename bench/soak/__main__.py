"""``python -m bench.soak --hours N``: run the lab for N hours with traffic and churn; fail on growth.

Brings up the simulated site (:class:`flatnet.lab.site.Lab`, prefix ``fnsoak`` unless told), then
until the time is up, in one loop:

- **traffic**: every ``--traffic-interval`` s an HTTP GET of every service through the gateway
  from the LAN host, and a ping from each WSL2 host to every other host's Flatnet IP;
- **churn**: every ``--churn-interval`` s a container is started on a WSL2 host (``podman run
  --network flatnet``: CNI ADD, a route pushed) and the previous churn container is removed (DEL);
- **samples**: every ``--sample-interval`` s the RSS, open fds and threads of every lab process
  (flatnet-node, the gateway and its nginx workers, the apps), each node's peers from its
  control socket ``status``, and a scrape of each node's ``/metrics`` (127.0.0.1:9587 in its
  namespace; a few figures go into the CSV's note column).

Writes ``soak.csv`` (one row per process per sample) into ``--out`` and prints a summary: per
process RSS first/last/slope, fds and threads, and the error counts. Exit 1 when a process grew
(:mod:`bench.soak.growth`), a process died, or more than ``--max-error-ratio`` of the operations
failed. The lab is always taken down at the end, on Ctrl-C or on failure too.

Default growth limits: RSS fails when, after the warm-up, it grows faster than 2 MiB/h *and* by
more than 2 MiB (2 MiB/h would be 336 MiB in a week; a 10-minute run cannot show 2 MiB, so
only runs of about an hour or more can fail on a slow trend); fds and threads fail when the last
quarter's lowest count is above the first quarter's highest plus 4.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

from bench.soak.growth import count_verdict, rss_verdict
from flatnet.lab import probe, wsl
from flatnet.lab.site import Lab
from flatnet.lab.state import pids_in_namespace, process_start_ticks
from flatnet.netns import NETNS_DIR, Namespace

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def process_sample(pid: int) -> dict | None:
    """RSS (bytes), open fds, threads and the command name of *pid*; None once it is gone."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            rss = int(f.read().split()[1]) * PAGE_SIZE
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        threads = len(os.listdir(f"/proc/{pid}/task"))
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return {"rss": rss, "fds": fds, "threads": threads, "cmd": describe(argv)}


def describe(argv: list[bytes]) -> str:
    words = [a.decode(errors="replace") for a in argv if a]
    if not words:
        return "?"
    if words[0].startswith("nginx:"):  # nginx rewrites its argv: "nginx: worker process"
        return "nginx master" if "master" in words[0] else "nginx worker"
    for module in ("flatnet.node.main", "flatnet.gateway", "flatnet.lab.demo_app", "lighthouse"):
        if any(w.startswith(module) for w in words):
            return module
    if "flatnet.cli" in words:  # python -m flatnet.cli gateway run ...
        at = words.index("flatnet.cli")
        return " ".join(["flatnet", *words[at + 1:at + 3]])
    return os.path.basename(words[0])


NODE_METRICS_PORT = 9587  # flatnet-node's default [metrics] listen, on each host's loopback
NOTED_METRICS = ("flatnet_peers{state=\"up\"}", "flatnet_tunnel_packets_total{direction=\"tx\"}",
                 "flatnet_cni_calls_total", "flatnet_route_pushes_total{outcome=\"ok\"}")


def metrics_note(text: str) -> str:
    """A few figures from a /metrics page for the CSV: peers up, packets sent, CNI calls, pushes."""
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, _, value = line.rpartition(" ")
        for wanted in NOTED_METRICS:
            if name == wanted or (name.startswith(wanted + "{") and "{" not in wanted):
                totals[wanted] = totals.get(wanted, 0.0) + float(value)
    return " ".join(f"{k}={v:g}" for k, v in totals.items())


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.lab = Lab(prefix=args.prefix, site=args.site)
        self.topology = self.lab.topology
        self.errors: Counter = Counter()
        self.operations: Counter = Counter()
        self.series: dict[tuple[str, str], dict[str, list]] = defaultdict(lambda: defaultdict(list))
        self.churned: list[tuple[str, str]] = []  # (host, container name) still running
        self.churn_count = 0
        self.out = Path(args.out)
        self.started = time.monotonic()

    # ---- traffic and churn ------------------------------------------------------------------

    def traffic(self, manifest) -> None:
        for service in manifest.facts.get("services") or []:
            self.operations["http"] += 1
            answer = probe.try_http_get(self.lab.ns(self.topology.client), self.topology.gateway_lan_address, 80,
                                        f"/{service['name']}/", 5.0)
            if isinstance(answer, str) or answer.status != 200:
                self.errors["http"] += 1
        hosts = list(manifest.facts.get("tunnel", []))
        for src in hosts:
            for dst in hosts:
                if src == dst:
                    continue
                self.operations["ping"] += 1
                target = str(wsl.flatnet_ip(self.topology, dst))
                result = Namespace(self.lab.ns(src)).run(["ping", "-c", "3", "-i", "0.2", "-W", "2", "-q", target],
                                                         check=False, timeout=15)
                if result.returncode != 0:
                    self.errors["ping"] += 1

    def churn(self, manifest) -> None:
        hosts = list(manifest.facts.get("tunnel", [])) or list(self.topology.wsl_hosts)
        host = hosts[self.churn_count % len(hosts)]
        self.churn_count += 1
        podman = wsl.WslStack(self.lab.state.dir, self.topology, host).podman()
        name = f"soak-churn-{self.churn_count}"
        self.operations["churn"] += 1
        try:
            image = podman.ensure_image()
            podman.podman(["run", "-d", "--network", "flatnet", "--name", name, "--label", "flatnet.port=8080",
                           image, "httpd", "-f", "-p", "8080", "-h", "/"], netns=self.lab.ns(host), timeout=60)
            self.churned.append((host, name))
        except Exception as exc:  # noqa: BLE001 - counted, the soak goes on
            self.errors["churn-add"] += 1
            print(f"  churn: starting {name} on {host} failed: {str(exc)[:200]}", flush=True)
        while len(self.churned) > self.args.churn_keep:
            old_host, old = self.churned.pop(0)
            self.remove(old_host, old)

    def remove(self, host: str, name: str) -> None:
        podman = wsl.WslStack(self.lab.state.dir, self.topology, host).podman()
        self.operations["churn-del"] += 1
        try:
            podman.podman(["rm", "-f", "-t", "0", name], netns=self.lab.ns(host), timeout=60)
        except Exception as exc:  # noqa: BLE001
            self.errors["churn-del"] += 1
            print(f"  churn: removing {name} failed: {str(exc)[:200]}", flush=True)

    # ---- samples ------------------------------------------------------------------------------

    def sample(self, manifest, writer) -> None:
        t = time.monotonic() - self.started
        for record in manifest.processes:
            if process_start_ticks(record.pid) != record.start_ticks:
                if ("died", record.name) not in self.errors:
                    print(f"  {record.name} (pid {record.pid}) is gone", flush=True)
                self.errors[("died", record.name)] = 1
        for ns in self.lab.namespaces_present():
            for pid in pids_in_namespace(f"{NETNS_DIR}/{ns}"):
                s = process_sample(pid)
                if s is None or s["cmd"] in ("ping", "podman", "conmon", "runc", "nsenter", "httpd", "sleep", "sh"):
                    continue  # short-lived helpers and churn containers
                key = (ns.removeprefix(self.args.prefix + "-"), f"{s['cmd']}[{pid}]")
                for metric in ("rss", "fds", "threads"):
                    self.series[key][metric].append((t, s[metric]))
                writer.writerow([f"{t:.1f}", key[0], s["cmd"], pid, s["rss"], s["fds"], s["threads"], ""])
        for host in manifest.facts.get("tunnel", []):
            peers = wsl.tunnel_peers(wsl.WslStack(self.lab.state.dir, self.topology, host).control_socket)
            up = sum(1 for p in peers if p.get("up"))
            writer.writerow([f"{t:.1f}", host, "node-status", "", "", "", "", f"peers={len(peers)} up={up}"])
            if not peers:
                self.errors["status"] += 1
            self.operations["status"] += 1
            # The node's Prometheus exporter, scraped like Prometheus would (it is a thread that
            # reads the event loop's counters: a leak there shows in the node's fds and threads).
            self.operations["scrape"] += 1
            answer = probe.try_http_get(self.lab.ns(host), "127.0.0.1", NODE_METRICS_PORT, "/metrics", 5.0)
            if isinstance(answer, str) or answer.status != 200:
                self.errors["scrape"] += 1
            else:
                writer.writerow([f"{t:.1f}", host, "node-metrics", "", "", "", "", metrics_note(answer.body)])

    # ---- the run ------------------------------------------------------------------------------

    def run(self) -> int:
        args = self.args
        self.out.mkdir(parents=True, exist_ok=True)
        print(f"soak: lab up (prefix {args.prefix})", flush=True)
        if self.lab.up() != 0:
            print("soak: lab up failed", file=sys.stderr)
            return 1
        manifest = self.lab.state.load()
        self.started = time.monotonic()
        end = self.started + args.hours * 3600
        next_traffic = next_churn = next_sample = self.started
        next_report = self.started + 60
        with open(self.out / "soak.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["t", "host", "process", "pid", "rss_bytes", "fds", "threads", "note"])
            while (now := time.monotonic()) < end:
                if now >= next_sample:
                    self.sample(manifest, writer)
                    f.flush()
                    next_sample = now + args.sample_interval
                if now >= next_traffic:
                    self.traffic(manifest)
                    next_traffic = now + args.traffic_interval
                if now >= next_churn:
                    self.churn(manifest)
                    next_churn = now + args.churn_interval
                if now >= next_report:
                    print(f"  {now - self.started:.0f} s: {dict(self.operations)} errors {dict(self.errors) or 0}", flush=True)
                    next_report = now + 60
                time.sleep(max(0.0, min(next_sample, next_traffic, next_churn, end) - time.monotonic()))
            for host, name in list(self.churned):
                self.remove(host, name)
            self.churned.clear()
            self.sample(manifest, writer)
        return self.summary()

    def summary(self) -> int:
        args = self.args
        warmup = min(args.warmup, args.hours * 3600 / 3)
        failed = []
        print(f"\nsoak: {args.hours * 60:.1f} min, warm-up {warmup:.0f} s, samples every {args.sample_interval:g} s")
        print(f"{'host':8} {'process':32} {'RSS':46} {'fds':28} threads")
        for (host, proc), series in sorted(self.series.items()):
            rss = rss_verdict(series["rss"], warmup, args.rss_slope_mib_per_hour * 2**20, args.rss_min_growth_mib * 2**20)
            fds = count_verdict(series["fds"], warmup, args.fd_tolerance)
            threads = count_verdict(series["threads"], warmup, args.fd_tolerance)
            mark = "" if rss.ok and fds.ok and threads.ok else "  <-- GROWS"
            print(f"{host:8} {proc:32} {rss.detail:46} {fds.detail:28} {threads.detail}{mark}")
            if mark:
                failed.append(f"{host} {proc}")
        ops = sum(self.operations.values())
        errs = sum(v for k, v in self.errors.items() if not isinstance(k, tuple))
        died = [k[1] for k in self.errors if isinstance(k, tuple)]
        print(f"operations {dict(self.operations)}; errors {dict(self.errors) or 'none'}")
        ratio = errs / ops if ops else 0.0
        if died:
            failed.append(f"processes died: {', '.join(died)}")
        if ratio > args.max_error_ratio:
            failed.append(f"error ratio {ratio:.2%} > {args.max_error_ratio:.2%}")
        print(f"CSV: {self.out / 'soak.csv'}")
        print("soak: FAILED: " + "; ".join(failed) if failed else "soak: OK (no growth, no process died, errors within limit)")
        return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.soak", description=__doc__.split("\n")[0])
    parser.add_argument("--hours", type=float, required=True)
    parser.add_argument("--prefix", default="fnsoak")
    parser.add_argument("--site", default="office")
    parser.add_argument("--out", default="/tmp/flatnet-soak")
    parser.add_argument("--sample-interval", type=float, default=5.0)
    parser.add_argument("--traffic-interval", type=float, default=2.0)
    parser.add_argument("--churn-interval", type=float, default=20.0)
    parser.add_argument("--churn-keep", type=int, default=2, help="churn containers kept running")
    parser.add_argument("--warmup", type=float, default=120.0, help="seconds ignored by the growth checks")
    parser.add_argument("--rss-slope-mib-per-hour", type=float, default=2.0)
    parser.add_argument("--rss-min-growth-mib", type=float, default=2.0)
    parser.add_argument("--fd-tolerance", type=float, default=4)
    parser.add_argument("--max-error-ratio", type=float, default=0.01)
    args = parser.parse_args(argv)
    soak = Soak(args)
    try:
        return soak.run()
    except KeyboardInterrupt:
        print("soak: interrupted", file=sys.stderr)
        return 130
    finally:
        print("soak: lab down", flush=True)
        try:
            soak.lab.down(quiet=True)
        except Exception as exc:  # noqa: BLE001 - the exit code must still come out
            print(f"soak: lab down failed: {exc}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
