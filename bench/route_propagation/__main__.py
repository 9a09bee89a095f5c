"""`python -m bench.route_propagation [--starts N]`: CNI ADD returning -> first 200 through the gateway.

The office of ``tests/cni/podman_site.py`` (LAN client, gateway, WSL host with flatnet-node and
Podman). For each of N ``podman run -d --network flatnet ... httpd`` the plugin's ADD return time is
stamped by a wrapper around the installed plugin; two pollers then wait for the first 200: one from
the LAN client through the gateway (``/<name>/``), one straight at the container from the WSL host.
The direct figure is the container's own start-up (runc, httpd binding its port), which Flatnet
cannot shorten; the gateway figure is what a colleague sees. A third poller asks the gateway's admin
API for the route, which is Flatnet's own part (node registers, pushes; gateway stores). p50/p99 of
each are printed. Issue 4's target: gateway p99 <= 100 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import statistics
import sys
import threading
import time
from pathlib import Path

from bench.namespaces import BenchNamespaces
from flatnet.gateway.admin import AdminClient, AdminError
from flatnet.lab.probe import in_namespace
from flatnet.podman import IMAGE
from tests.cni import podman_site

POLL_INTERVAL = 0.002


def stamp_add_returns(stamp_dir: Path):
    """A plugin wrapper: run the real plugin, then record when ADD returned (per container name)."""

    def wrap(plugin: Path) -> None:
        real = plugin.with_name("flatnet-real")
        plugin.rename(real)
        stamp_dir.mkdir(parents=True, exist_ok=True)
        plugin.write_text(
            "#!/bin/sh\n"
            f'out=$("{real}"); rc=$?\n'
            'if [ "$CNI_COMMAND" = ADD ] && [ $rc = 0 ]; then\n'
            '  t=$(date +%s.%N)\n'
            """  name=$(printf '%s' "$CNI_ARGS" | tr ';' '\\n' | sed -n 's/^K8S_POD_NAME=//p')\n"""
            f'  echo "$t" > "{stamp_dir}/$name"\n'
            'fi\n'
            'printf "%s\\n" "$out"; exit $rc\n')
        plugin.chmod(0o755)

    return wrap


def first_200(ns: str, address: str, path: str, stop: threading.Event, out: dict, key: str) -> None:
    def poll() -> None:
        while not stop.is_set():
            conn = http.client.HTTPConnection(address, 80, timeout=0.5)
            try:
                conn.request("GET", path)
                if conn.getresponse().status == 200:
                    out[key] = time.time()
                    return
            except OSError:
                pass
            finally:
                conn.close()
            time.sleep(POLL_INTERVAL)

    in_namespace(ns, poll)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.route_propagation")
    parser.add_argument("--starts", type=int, default=50)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.route_propagation needs root (namespaces)", file=sys.stderr)
        return 2
    namespaces = BenchNamespaces()
    make = namespaces.make

    stamps = Path(f"/tmp/flatnet-bench-stamps-{os.getpid()}")
    gateway_ms: list[float] = []
    direct_ms: list[float] = []
    route_ms: list[float] = []
    try:
        with contextlib.closing(podman_site.build(make, plugin_wrapper=stamp_add_returns(stamps))) as gen:
            site = next(gen)
            for i in range(args.starts):
                name = f"rp{i}"
                out: dict[str, float] = {}
                stop = threading.Event()
                stamp = stamps / name

                def direct(name=name, stamp=stamp, out=out, stop=stop) -> None:
                    # The container's address is known once ADD has returned (its stamp exists).
                    while not stamp.exists() and not stop.is_set():
                        time.sleep(0.001)
                    leases = [a for a, lease in site.host.leases().items() if lease.name == name]
                    if leases:
                        first_200(site.wsl.name, str(leases[0]), "/", stop, out, "direct")

                def route(name=name, out=out, stop=stop) -> None:
                    client = AdminClient(f"http://{podman_site.GATEWAY_WSL}:8081", site.token)

                    def poll() -> None:
                        while not stop.is_set():
                            try:
                                if name in client.list().by_name():
                                    out["route"] = time.time()
                                    return
                            except AdminError:
                                pass
                            time.sleep(POLL_INTERVAL)

                    in_namespace(site.wsl.name, poll)

                pollers = [threading.Thread(target=first_200, args=(site.lan.name, podman_site.GATEWAY_LAN,
                                                                     f"/{name}/", stop, out, "gateway")),
                           threading.Thread(target=direct), threading.Thread(target=route)]
                for t in pollers:
                    t.start()
                try:
                    site.run("run", "-d", "--network", "flatnet", "--name", name, IMAGE,
                             "httpd", "-f", "-p", "80", "-h", "/www")
                    deadline = time.monotonic() + 20
                    while len(out) < 3 and time.monotonic() < deadline:
                        time.sleep(0.01)
                finally:
                    stop.set()
                    for t in pollers:
                        t.join()
                added = float(stamp.read_text())
                if len(out) == 3:
                    gateway_ms.append((out["gateway"] - added) * 1e3)
                    direct_ms.append((out["direct"] - added) * 1e3)
                    route_ms.append((out["route"] - added) * 1e3)
                else:
                    print(f"{name}: no 200 within 20 s ({sorted(out)})", file=sys.stderr)
                site.run("rm", "--force", "--time", "0", name)
    finally:
        namespaces.remove_all()
        for f in stamps.glob("*"):
            f.unlink()
        with contextlib.suppress(OSError):
            stamps.rmdir()
    if not gateway_ms:
        return 1
    diff = [g - d for g, d in zip(gateway_ms, direct_ms, strict=True)]
    print(f"route propagation over {len(gateway_ms)} container starts (ms after CNI ADD returned):")
    print(f"{'':34}{'p50':>8}{'p99':>8}{'max':>8}")
    for label, values in (("first 200 through the gateway", gateway_ms), ("first 200 direct (container up)", direct_ms),
                          ("gateway minus direct", diff), ("route listed by the admin API", route_ms)):
        print(f"{label:34}{statistics.median(values):8.1f}{percentile(values, 0.99):8.1f}{max(values):8.1f}")
    p99 = percentile(gateway_ms, 0.99)
    print(f"target: gateway p99 <= 100 ms: {p99:.1f} ms ({'met' if p99 <= 100 else 'MISSED'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
