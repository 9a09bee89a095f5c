"""Requests/s through the Flatnet gateway vs a static ``proxy_pass``, same nginx, same run.

    .venv/bin/python -m bench.gateway [--seconds 5] [--rounds 3] [--connections 32]

One nginx process serves both paths: ``/bench/`` routed by Lua (shared-dict route table,
balancer_by_lua, header filter) on one port, and a plain ``upstream`` + ``proxy_pass`` with the same
proxy settings (``flatnet_proxy.conf``) on another. Both forward to a second nginx that answers
``200 hello``. wrk runs against each in turn, alternating, and the medians are compared. Everything
binds free ports on 127.0.0.1; keep the runs short, the machine is shared.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flatnet.config import from_dict
from flatnet.gateway.admin import AdminClient
from flatnet.gateway.config import GatewayConfig
from flatnet.gateway.routes import Route
from flatnet.gateway.runner import GatewayProcess

BACKEND_CONF = """\
worker_processes 1;
daemon off;
master_process on;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/tmp;
    proxy_temp_path {prefix}/tmp;
    fastcgi_temp_path {prefix}/tmp;
    uwsgi_temp_path {prefix}/tmp;
    scgi_temp_path {prefix}/tmp;
    server {{
        listen 127.0.0.1:{port};
        keepalive_requests 100000;
        location / {{ default_type text/plain; return 200 "hello\\n"; }}
    }}
}}
"""

STATIC_SERVER = """\
    # The benchmark's comparison: the same proxy settings, a static upstream, no Lua.
    upstream flatnet_bench_static {{
        server 127.0.0.1:{backend_port};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{static_port};
        location /bench/ {{
            proxy_pass http://flatnet_bench_static/;
            proxy_set_header X-Forwarded-Prefix /bench;
            include flatnet_proxy.conf;
        }}
    }}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pids: set[int]) -> float:
    """utime + stime of *pids* (the gateway's workers), in seconds."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def wrk(url: str, seconds: float, connections: int, workers: set[int]) -> tuple[float, float]:
    """(requests/s, gateway worker CPU microseconds per request) of one wrk run."""
    cpu_before = cpu_seconds(workers)
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", url], capture_output=True, text=True, check=True
    ).stdout
    cpu = cpu_seconds(workers) - cpu_before
    rate = re.search(r"Requests/sec:\s+([0-9.]+)", out)
    count = re.search(r"([0-9]+) requests in", out)
    if not rate or not count or "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk reported errors for {url}:\n{out}")
    return float(rate.group(1)), cpu * 1e6 / max(1, int(count.group(1)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gateway", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args(argv)
    if not shutil.which("wrk") or not shutil.which("nginx"):
        print("bench.gateway: needs wrk and nginx", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="flatnet-bench-gw-"))
    work.chmod(0o755)
    backend_port, gateway_port, admin_port, static_port = (free_port() for _ in range(4))
    backend_prefix = work / "backend"
    (backend_prefix / "tmp").mkdir(parents=True)
    config = from_dict({
        "listen": f"127.0.0.1:{gateway_port}",
        "admin_listen": [f"127.0.0.1:{admin_port}"],
        "state_dir": str(work / "gateway"),
        "workers": 1,
        "access_log": False,
    }, GatewayConfig, source="<bench>")
    (backend_prefix / "nginx.conf").write_text(BACKEND_CONF.format(
        prefix=backend_prefix, port=backend_port))
    backend = subprocess.Popen(["nginx", "-p", f"{backend_prefix}/", "-c", str(backend_prefix / "nginx.conf")],
                               stderr=subprocess.DEVNULL)
    gateway = GatewayProcess(config, extra_http=STATIC_SERVER.format(backend_port=backend_port,
                                                                     static_port=static_port))
    try:
        gateway.start()
        token = Path(config.paths().token_file).read_text().strip()
        AdminClient(f"http://127.0.0.1:{admin_port}", token).upsert(Route("bench", (f"127.0.0.1:{backend_port}",)))
        time.sleep(0.5)
        urls = {
            "flatnet (Lua route)": f"http://127.0.0.1:{gateway_port}/bench/x",
            "static proxy_pass": f"http://127.0.0.1:{static_port}/bench/x",
        }
        workers = gateway.worker_pids()
        for url in urls.values():  # warm up both paths (keepalive pools, JIT)
            wrk(url, 1, args.connections, workers)
        results: dict[str, list[float]] = {name: [] for name in urls}
        cpu: dict[str, list[float]] = {name: [] for name in urls}
        for _ in range(args.rounds):
            for name, url in urls.items():
                rate, cpu_per_request = wrk(url, args.seconds, args.connections, workers)
                results[name].append(rate)
                cpu[name].append(cpu_per_request)
    finally:
        gateway.stop()
        backend.terminate()
        backend.wait(10)
        shutil.rmtree(work, ignore_errors=True)

    medians = {name: statistics.median(v) for name, v in results.items()}
    cpu_medians = {name: statistics.median(v) for name, v in cpu.items()}
    print(f"gateway benchmark: wrk -t1 -c{args.connections} -d{max(1, round(args.seconds))}s, {args.rounds} rounds "
          "alternating, 1 gateway worker, backend = nginx 'return 200', all on 127.0.0.1")
    for name, values in results.items():
        runs = ", ".join(f"{v:,.0f}" for v in values)
        print(f"  {name:22} median {medians[name]:>9,.0f} req/s  {cpu_medians[name]:6.1f} us CPU/req  (runs: {runs})")
    ratio = medians["flatnet (Lua route)"] / medians["static proxy_pass"]
    cpu_ratio = cpu_medians["static proxy_pass"] / cpu_medians["flatnet (Lua route)"]
    print(f"  ratio flatnet/static, req/s:             {ratio:.3f}x   (target >= 0.95x)")
    print(f"  ratio flatnet/static, worker CPU per req: {cpu_ratio:.3f}x   (static CPU / flatnet CPU; "
          "steadier than req/s on a shared machine)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
