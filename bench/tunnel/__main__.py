"""bench/tunnel: Flatnet vs Nebula vs wireguard-go, each between two host namespaces bridged by a third.

    .venv/bin/python -m bench.tunnel [--seconds 5] [--repeats 3] [--only flatnet,nebula,wireguard-go]
                                     [--conditions clean,loss1,loss1-net,loss1-skb]

For each tunnel: single-flow iperf3 TCP throughput (``--seconds`` per run, ``--repeats`` runs),
ping RTT, and the tunnel daemons' CPU seconds per GB carried (both sides, from /proc), the tunnels
measured round-robin so load changes hit all alike. The hosts' veths meet at a bridge in a third
namespace (the network between them). Conditions: clean; 1% random loss (nftables ``numgen random
mod 100 < 1 drop``) three ways:

* "1% loss/datagram" (``loss1``): at each host's input, with UDP segmentation offload turned off on
  the hosts' veths (ethtool) so nftables sees each datagram. The receiving host then gets every
  datagram alone: nothing can coalesce them before the input hook.
* "1% loss in network" (``loss1-net``): per datagram, dropped in the bridge; the hosts' veths run
  GRO (NAPI), so what arrives may be coalesced again before the socket, as a real NIC does
  (only a socket asking for ``UDP_GRO`` -- Flatnet's -- sees coalesced trains).
* "1% loss/skb" (``loss1-skb``): at each host's input with the offload on, as the plain nftables
  rule behaves: a GSO train is one packet (only Flatnet sends GSO trains, so it is the only one
  that condition treats differently).

Medians; ratios to Nebula.

Nebula: Debian's ``nebula`` with certs from ``nebula-cert``, default MTU (1300) and all-allow
firewall. wireguard-go: Debian's userspace daemon, configured through its UAPI socket (no
``wg`` tool needed), MTU 1420. Flatnet: flatnet-node's tunnel component with the real Noise engine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from flatnet.netns import Namespace
from flatnet.testing.tunnel_pair import FLATNET, UNDERLAY, start_node, write_pki_and_configs

PREFIX = f"fnb{os.getpid() % 100000}"


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        for task in _tasks(pid):
            try:
                with open(f"/proc/{pid}/task/{task}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick
            except OSError:
                pass
    return total


def _tasks(pid: int) -> list[str]:
    try:
        return os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []


def descendants_named(root: int, names: tuple[str, ...]) -> list[int]:
    """The processes under *root* (nsenter wraps the daemon) whose comm is in *names*."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        if comm in names:
            pid = int(entry)
            p = pid
            while p > 1:
                if p == root:
                    found.append(pid)
                    break
                try:
                    with open(f"/proc/{p}/stat") as f:
                        p = int(f.read().rsplit(")", 1)[1].split()[1])
                except OSError:
                    break
    return found


class Tunnel:
    name = ""
    target = ""

    def start(self, a: Namespace, b: Namespace, work: Path) -> None: ...
    def stop(self) -> None: ...
    def pids(self) -> list[int]: ...


class FlatnetTunnel(Tunnel):
    name = "flatnet"
    target = FLATNET["b"]

    def __init__(self, tunnel_options: dict | None = None) -> None:
        self.tunnel_options = tunnel_options or {}

    def start(self, a, b, work):
        configs = write_pki_and_configs(work / "flatnet", tun_name="fnbench0", extra=self.tunnel_options)
        self.nodes = [start_node(a, configs["a"]), start_node(b, configs["b"])]

    def pids(self):
        return [p for n in self.nodes for p in descendants_named(n.proc.pid, ("python", "python3", "python3.11"))] or [
            n.proc.pid for n in self.nodes
        ]

    def stop(self):
        for n in self.nodes:
            n.stop()


class NebulaTunnel(Tunnel):
    name = "nebula"
    target = "10.88.0.2"
    PORT = 4243

    def start(self, a, b, work):
        d = work / "nebula"
        d.mkdir()
        subprocess.run(["nebula-cert", "ca", "-name", "bench", "-out-crt", d / "ca.crt", "-out-key", d / "ca.key"], check=True)
        self.procs = []
        for side, ns, ip, other in (("a", a, "10.88.0.1", "b"), ("b", b, "10.88.0.2", "a")):
            subprocess.run(["nebula-cert", "sign", "-ca-crt", d / "ca.crt", "-ca-key", d / "ca.key", "-name", side,
                            "-ip", f"{ip}/24", "-out-crt", d / f"{side}.crt", "-out-key", d / f"{side}.key"], check=True)
            other_ip = "10.88.0.2" if side == "a" else "10.88.0.1"
            config = {
                "pki": {"ca": str(d / "ca.crt"), "cert": str(d / f"{side}.crt"), "key": str(d / f"{side}.key")},
                "static_host_map": {other_ip: [f"{UNDERLAY[other]}:{self.PORT}"]},
                "lighthouse": {"am_lighthouse": False, "hosts": []},
                "listen": {"host": UNDERLAY[side], "port": self.PORT},
                "punchy": {"punch": False},
                "tun": {"dev": f"nebb{side}", "mtu": 1300},
                "logging": {"level": "warning"},
                "firewall": {
                    "outbound": [{"port": "any", "proto": "any", "host": "any"}],
                    "inbound": [{"port": "any", "proto": "any", "host": "any"}],
                },
            }
            path = d / f"{side}.yml"
            path.write_text(json.dumps(config))  # JSON is YAML
            self.procs.append(ns.popen(["nebula", "-config", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _wait_ping(a, self.target)

    def pids(self):
        return [p for proc in self.procs for p in descendants_named(proc.pid, ("nebula",))]

    def stop(self):
        _stop(self.procs)


class WireguardGoTunnel(Tunnel):
    name = "wireguard-go"
    target = "10.89.0.2"
    PORT = 4244

    def start(self, a, b, work):
        keys = {s: X25519PrivateKey.generate() for s in "ab"}
        self.procs = []
        self.ifnames = {"a": f"wgb{os.getpid() % 10000}a", "b": f"wgb{os.getpid() % 10000}b"}
        for side, ns in (("a", a), ("b", b)):
            env = {**os.environ, "LOG_LEVEL": "error"}
            self.procs.append(ns.popen(["wireguard-go", "-f", self.ifnames[side]], env=env,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for side, ns, ip, other in (("a", a, "10.89.0.1", "b"), ("b", b, "10.89.0.2", "a")):
            sock_path = f"/var/run/wireguard/{self.ifnames[side]}.sock"
            deadline = time.monotonic() + 10
            while not os.path.exists(sock_path) and time.monotonic() < deadline:
                time.sleep(0.05)
            other_ip = "10.89.0.2" if side == "a" else "10.89.0.1"
            request = (
                "set=1\n"
                f"private_key={keys[side].private_bytes_raw().hex()}\n"
                f"listen_port={self.PORT}\n"
                "replace_peers=true\n"
                f"public_key={keys[other].public_key().public_bytes_raw().hex()}\n"
                f"endpoint={UNDERLAY[other]}:{self.PORT}\n"
                "replace_allowed_ips=true\n"
                f"allowed_ip={other_ip}/32\n\n"
            )
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(sock_path)
                s.sendall(request.encode())
                answer = s.recv(4096).decode()
            if "errno=0" not in answer:
                raise RuntimeError(f"wireguard-go UAPI: {answer!r}")
            with ns.ipr() as ipr:
                index = ipr.link_lookup(ifname=self.ifnames[side])[0]
                ipr.link("set", index=index, mtu=1420)
            ns.add_address(self.ifnames[side], f"{ip}/24")
            ns.link_up(self.ifnames[side])
        _wait_ping(a, self.target)

    def pids(self):
        return [p for proc in self.procs for p in descendants_named(proc.pid, ("wireguard-go",))]

    def stop(self):
        _stop(self.procs)


def _stop(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _wait_ping(ns: Namespace, target: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ns.run(["ping", "-c", "1", "-W", "1", target], check=False).returncode == 0:
            return
    raise RuntimeError(f"no ping to {target} through the tunnel")


def iperf(a: Namespace, b: Namespace, target: str, seconds: float) -> tuple[float, int]:
    """(bits per second received, bytes received)"""
    server = b.popen(["iperf3", "-s", "-1", "-B", target], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        out = a.run(["iperf3", "-c", target, "-t", str(seconds), "-J"], check=False, timeout=seconds + 30).stdout
        server.wait(10)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    try:
        end = json.loads(out)["end"]["sum_received"]
        return end["bits_per_second"], int(end["bytes"])
    except (ValueError, KeyError):
        return 0.0, 0


def ping_rtt(a: Namespace, target: str, count: int = 100) -> float | None:
    """Median RTT of *count* pings 50 ms apart (the median: one scheduling hiccup of the shared
    machine moves an average of 20 by more than the differences measured)."""
    out = a.run(["ping", "-c", str(count), "-i", "0.05", target], check=False).stdout
    times = [float(t) for t in re.findall(r"time=([\d.]+)", out)]
    return statistics.median(times) if times else None


# condition -> (loss percent, UDP segmentation offload on the hosts' veths, where the loss is)
CONDITIONS = {
    "clean": (0, True, None),
    "loss1": (1, False, "hosts"),  # 1% of datagrams at each host's input: segmentation offload off, so
    # nft sees each datagram -- and the receiving host cannot coalesce them (GRO) before its socket
    "loss1-net": (1, False, "network"),  # 1% of datagrams dropped in the network (the bridge between
    # the hosts); the receiving host's veth coalesces what arrives (GRO), as a real NIC does
    "loss1-skb": (1, True, "hosts"),  # 1% of packets as nft sees them on the veth: a GSO train is one packet
}
LABELS = {"clean": "clean", "loss1": "1% loss/datagram", "loss1-net": "1% loss in network",
          "loss1-skb": "1% loss/skb"}


def build_bridged_underlay(a, r, b) -> None:
    """a -- r -- b: the two hosts' ``u0`` joined by a bridge in *r* (the network between them)."""
    from flatnet.netns import veth

    veth(a, "u0", r, "ua")
    veth(r, "ub", b, "u0")
    a.add_address("u0", f"{UNDERLAY['a']}/24")
    b.add_address("u0", f"{UNDERLAY['b']}/24")
    r.run(["ip", "link", "add", "br0", "type", "bridge"])
    r.run(["ip", "link", "set", "br0", "up"])
    for port in ("ua", "ub"):
        r.run(["ip", "link", "set", port, "master", "br0"])
        r.run(["ip", "link", "set", port, "up"])


def set_loss(namespaces, percent: int, udp_segmentation: bool = True, where: str | None = "hosts") -> None:
    """*namespaces*: (a, b) or (a, r, b); loss at the hosts' input or in r's bridge."""
    hosts, bridge = (namespaces[0], namespaces[-1]), namespaces[1] if len(namespaces) == 3 else None
    for ns in hosts:
        ns.run(["nft", "delete", "table", "inet", "fnbench_loss"], check=False)
        ns.run(["ethtool", "-K", "u0", "tx-udp-segmentation", "on" if udp_segmentation else "off"], check=False)
        if percent and where == "hosts":
            rules = (
                "table inet fnbench_loss {\n chain input {\n  type filter hook input priority 0; policy accept;\n"
                f'  iifname "u0" meta l4proto udp numgen random mod 100 < {percent} drop\n }}\n}}\n'
            )
            ns.run(["nft", "-f", "-"], input=rules)
    if bridge is not None:
        bridge.run(["nft", "delete", "table", "bridge", "fnbench_loss"], check=False)
        # A veth hands its peer's NAPI (and so GRO) only what it did not segment itself (TSO off):
        # with loss in the network the hosts receive coalesced, as from a NIC; otherwise as before.
        for port in ("ua", "ub"):
            bridge.run(["ethtool", "-K", port, "tso", "off" if where == "network" else "on"], check=False)
        if percent and where == "network":
            rules = (
                "table bridge fnbench_loss {\n chain forward {\n  type filter hook forward priority 0; policy accept;\n"
                f"  meta l4proto udp numgen random mod 100 < {percent} drop\n }}\n}}\n"
            )
            bridge.run(["nft", "-f", "-"], input=rules)
        for ns in hosts:  # GRO wanted on the hosts' veths: it turns their NAPI on (veth)
            ns.run(["ethtool", "-K", "u0", "gro", "off"], check=False)
            ns.run(["ethtool", "-K", "u0", "gro", "on"], check=False)


def measure_all(setups: list, seconds: float, repeats: int, conditions: list[str]) -> dict:
    """Round-robin: each repeat runs every tunnel once, so a change in the machine's load (it is
    shared) hits all of them alike and the ratios stay fair."""
    results: dict = {tunnel.name: {} for tunnel, _, _ in setups}
    for key in conditions:
        loss, segmentation, where = CONDITIONS[key]
        samples = {tunnel.name: ([], []) for tunnel, _, _ in setups}
        for tunnel, _a, _b in setups:
            set_loss(tunnel.underlay, loss, segmentation, where)
        for _ in range(repeats):
            for tunnel, a, b in setups:
                rates, cpu_per_gb = samples[tunnel.name]
                pids = tunnel.pids()
                cpu0 = cpu_seconds(pids)
                bps, nbytes = iperf(a, b, tunnel.target, seconds)
                cpu1 = cpu_seconds(pids)
                rates.append(bps / 1e6)
                if nbytes:
                    cpu_per_gb.append((cpu1 - cpu0) / (nbytes / 1e9))
        for tunnel, a, _b in setups:
            rates, cpu_per_gb = samples[tunnel.name]
            results[tunnel.name][key] = {
                "mbps": statistics.median(rates),
                "runs": [round(r) for r in rates],
                "cpu_s_per_gb": statistics.median(cpu_per_gb) if cpu_per_gb else None,
                "rtt_ms": ping_rtt(a, tunnel.target),
            }
        print(f"{key}: done", file=sys.stderr, flush=True)
    for tunnel, _a, _b in setups:
        set_loss(tunnel.underlay, 0)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench.tunnel")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default="flatnet,nebula,wireguard-go")
    parser.add_argument("--conditions", default="clean,loss1,loss1-net,loss1-skb", help=f"of {', '.join(CONDITIONS)}")
    parser.add_argument("--flatnet", action="append", default=[], metavar="KEY=VALUE",
                        help="a [tunnel] setting for Flatnet's nodes, e.g. max_segments=8 (TOML value)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    wanted = args.only.split(",")
    options = dict(item.split("=", 1) for item in args.flatnet)
    tunnels = [t for t in (FlatnetTunnel(options), NebulaTunnel(), WireguardGoTunnel()) if t.name in wanted]
    setups, started, namespaces = [], [], []
    with tempfile.TemporaryDirectory() as work:
        try:
            for tunnel in tunnels:  # each tunnel between its own pair of namespaces, all up at once
                a = Namespace.create(f"{PREFIX}-{tunnel.name[:5]}-a")
                namespaces.append(a)
                r = Namespace.create(f"{PREFIX}-{tunnel.name[:5]}-r")
                namespaces.append(r)
                b = Namespace.create(f"{PREFIX}-{tunnel.name[:5]}-b")
                namespaces.append(b)
                build_bridged_underlay(a, r, b)
                tunnel.underlay = (a, r, b)
                tunnel.start(a, b, Path(work))
                started.append(tunnel)
                setups.append((tunnel, a, b))
            results = measure_all(setups, args.seconds, args.repeats, args.conditions.split(","))
        finally:
            for tunnel in started:
                tunnel.stop()
            for ns in namespaces:
                ns.remove()
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def print_table(results: dict) -> None:
    base = results.get("nebula")
    print(f"{'tunnel':<14}{'condition':<18}{'Mbit/s':>9}{'x Nebula':>10}{'RTT ms':>9}{'x Nebula':>10}{'CPU s/GB':>10}  runs")
    for name, r in results.items():
        for cond, m in r.items():
            ratio = f"{m['mbps'] / base[cond]['mbps']:.2f}" if base and cond in base and base[cond]["mbps"] else "-"
            rtt = f"{m['rtt_ms']:.3f}" if m["rtt_ms"] is not None else "-"
            rtt_ratio = (
                f"{m['rtt_ms'] / base[cond]['rtt_ms']:.2f}"
                if base and cond in base and m["rtt_ms"] and base[cond]["rtt_ms"] else "-"
            )
            cpu = f"{m['cpu_s_per_gb']:.2f}" if m["cpu_s_per_gb"] is not None else "-"
            label = LABELS[cond]
            print(f"{name:<14}{label:<18}{m['mbps']:>9.0f}{ratio:>10}{rtt:>9}{rtt_ratio:>10}{cpu:>10}  {m['runs']}")


if __name__ == "__main__":
    sys.exit(main())
