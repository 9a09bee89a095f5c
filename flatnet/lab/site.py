"""``lab up``, ``lab status``, ``lab down``: build, inspect and remove a simulated Flatnet site.

``up`` builds the topology's namespaces, starts the web apps on the WSL2 hosts, starts the gateway
on the Windows host, publishes the routes and checks from the LAN host that a page comes back
through the gateway. Whatever of Flatnet is not available yet (the gateway, Podman + the CNI plugin,
flatnet-node) is left out or replaced by a stand-in, and ``up`` says so.

``down`` removes everything, also after a crash: it reads the manifest when there is one, and in
any case kills every process found inside the lab's namespaces (by the namespace's inode, see
:func:`flatnet.lab.state.pids_in_namespace`) and removes every namespace named ``<prefix>-*``.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from flatnet.errors import UserError
from flatnet.lab import gateway as lab_gateway
from flatnet.lab import network, probe
from flatnet.lab.demo_app import PAGE_MARKER
from flatnet.lab.state import (
    LabState,
    Manifest,
    ProcessRecord,
    pids_in_namespace,
    process_start_ticks,
    spawn,
    terminate,
)
from flatnet.lab.topology import DEMO_ONLY_SERVICES, OFFICE, Service, Topology, namespace_name
from flatnet.netns import NETNS_DIR, Namespace, list_namespaces

DEFAULT_PREFIX = "fnlab"
APP_START_TIMEOUT = 10.0
GATEWAY_START_TIMEOUT = 20.0
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
)  # fmt: skip

Out = Callable[[str], None]


class Lab:
    """One lab: a topology, a prefix and its state directory."""

    def __init__(self, prefix: str = DEFAULT_PREFIX, topology: Topology = OFFICE, out: Out = print) -> None:
        if not prefix or "/" in prefix or len(prefix) > 24:
            raise UserError(f"bad lab prefix {prefix!r}: 1-24 characters, no '/'")
        self.prefix = prefix
        self.topology = topology
        self.state = LabState(prefix)
        self.out = out

    # ---- names ----------------------------------------------------------------------------------

    def ns(self, host: str) -> str:
        return namespace_name(self.prefix, host)

    def namespaces_present(self) -> list[str]:
        return [n for n in list_namespaces() if n.startswith(f"{self.prefix}-")]

    # ---- up -------------------------------------------------------------------------------------

    def up(self, gateway_mode: str = "auto", browser: bool = False) -> int:
        if self.state.load() is not None or self.namespaces_present():
            self.out(f"A lab with prefix {self.prefix!r} exists already: removing it first.")
            self.down(quiet=True)
        manifest = self.state.create()
        try:
            return self._up(manifest, gateway_mode, browser)
        except BaseException:
            self.out("lab up failed: removing what it made (logs kept in the message below).")
            logs = self._log_tails(manifest)
            self.down(quiet=True)
            if logs:
                self.out(logs)
            raise

    def _up(self, manifest: Manifest, gateway_mode: str, browser: bool) -> int:
        topo = self.topology

        def record_namespace(name: str) -> None:
            manifest.namespaces.append(name)
            self.state.save(manifest)

        network.build(topo, self.prefix, record_namespace)

        token_file = self.state.dir / "admin.token"
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")

        services = self._choose_services(manifest)
        published: list[tuple[Service, str]] = []
        for service in services:
            published.append((service, self._start_service(manifest, service)))
        manifest.facts["services"] = [
            {"name": s.name, "host": s.host, "kind": s.kind, "backend": b} for s, b in published
        ]
        self.state.save(manifest)

        self._start_gateway(manifest, gateway_mode, published, token_file)
        check = self.check(manifest)
        manifest.facts["check"] = check
        self.state.save(manifest)
        if browser:
            manifest.facts["browser"] = self.browser_check(manifest)
        self.out(self.describe(manifest))
        if not check["ok"]:
            raise UserError(f"the lab is up but {check['url']} does not answer as it should: {check['detail']}")
        return 0

    def _choose_services(self, manifest: Manifest) -> list[Service]:
        manifest.notes.append(
            "Podman containers: not started; the lab runs the Python demo app in their place "
            "(the CNI plugin / flatnet-node are not wired into the lab yet)"
        )
        manifest.notes.append("flatnet-node: not started (not wired into the lab yet); routes are pushed by hand")
        return list(DEMO_ONLY_SERVICES)

    def _start_service(self, manifest: Manifest, service: Service) -> str:
        """Start *service*; returns its backend ``ip:port`` once it answers."""
        if service.kind != "demo-app":
            raise UserError(f"service kind {service.kind} is not supported by this lab")
        argv = [
            sys.executable, "-m", "flatnet.lab.demo_app",
            "--listen", service.address, "--port", str(service.port), "--name", service.name,
        ]  # fmt: skip
        self._spawn(manifest, f"app:{service.name}", service.host, argv)
        deadline = time.monotonic() + APP_START_TIMEOUT
        while True:
            answer = probe.try_http_get(self.ns(service.host), service.address, service.port, "/health", 1.0)
            if not isinstance(answer, str) and answer.status == 200:
                return f"{service.address}:{service.port}"
            if time.monotonic() > deadline:
                raise UserError(f"app {service.name} on {service.host} did not answer: {answer}")
            time.sleep(0.1)

    def _spawn(self, manifest: Manifest, name: str, host: str, argv: list[str]) -> ProcessRecord:
        log = self.state.logs / f"{name.replace(':', '-')}.log"
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        proc = spawn(Namespace(self.ns(host)).command(argv), log, env=env)
        ticks = process_start_ticks(proc.pid) or 0
        record = ProcessRecord(name, proc.pid, ticks, host, argv, str(log))
        manifest.processes.append(record)
        self.state.save(manifest)
        return record

    def _start_gateway(
        self, manifest: Manifest, mode: str, published: list[tuple[Service, str]], token_file: Path
    ) -> None:
        topo = self.topology
        reason = lab_gateway.flatnet_gateway_missing() if mode in ("auto", "flatnet") else "--gateway static"
        if reason is None:
            launch = lab_gateway.flatnet_launch(topo, self.state.dir, token_file)
            try:
                self._run_flatnet_gateway(manifest, launch, published, token_file)
                return
            except UserError as exc:
                if mode == "flatnet":
                    raise
                reason = f"the Flatnet gateway did not come up: {exc}"
                self._stop_processes(manifest, "gateway")
        elif mode == "flatnet":
            raise UserError(f"--gateway flatnet: {reason}")
        manifest.notes.append(f"Flatnet gateway: not started ({reason}); plain nginx with static routes stands in")
        launch = lab_gateway.static_launch(topo, self.state.dir, published)
        self._spawn(manifest, "gateway", topo.gateway_host, launch.argv)
        manifest.facts["gateway"] = {"mode": "static", "admin_urls": {}}
        self.state.save(manifest)
        self._wait_for_gateway(manifest)

    def _run_flatnet_gateway(
        self, manifest: Manifest, launch: lab_gateway.GatewayLaunch, published: list[tuple[Service, str]],
        token_file: Path,
    ) -> None:
        topo = self.topology
        if launch.dropped_keys:
            manifest.notes.append(f"gateway.toml: left out keys the gateway does not know: {', '.join(launch.dropped_keys)}")
        self._spawn(manifest, "gateway", topo.gateway_host, launch.argv)
        manifest.facts["gateway"] = {"mode": "flatnet", "admin_urls": launch.admin_urls, "domain": launch.domain}
        self.state.save(manifest)
        self._wait_for_gateway(manifest)
        route_file = self.state.dir / "routes.toml"
        lab_gateway.write_route_file(route_file, published)
        # Push from the WSL2 host that runs the first service, over the WSL-facing admin address:
        # the way a person (Phase 1) or flatnet-node (Phase 2) there does it.
        pusher = published[0][0].host if published else topo.gateway_host
        admin_url = launch.admin_urls.get(pusher, launch.admin_urls[topo.gateway_host])
        argv = lab_gateway.sync_argv(route_file, admin_url, token_file)
        deadline = time.monotonic() + GATEWAY_START_TIMEOUT
        while True:
            result = Namespace(self.ns(pusher)).run(argv, check=False, timeout=30)
            if result.returncode == 0:
                break
            if time.monotonic() > deadline:
                detail = (result.stderr or result.stdout).strip().splitlines()
                raise UserError(f"route sync from {pusher} failed: {detail[-1] if detail else result.returncode}")
            time.sleep(0.3)
        manifest.facts["routes_pushed_from"] = f"{pusher} via {admin_url}"
        self.state.save(manifest)

    def _wait_for_gateway(self, manifest: Manifest) -> None:
        topo = self.topology
        record = next(p for p in manifest.processes if p.name == "gateway")
        deadline = time.monotonic() + GATEWAY_START_TIMEOUT
        while True:
            answer = probe.try_http_get(self.ns(topo.client), topo.gateway_lan_address, lab_gateway.LAN_PORT, "/", 1.0)
            if not isinstance(answer, str):
                return
            if not record.alive():
                raise UserError(f"the gateway exited: {_tail(Path(record.log))}")
            if time.monotonic() > deadline:
                raise UserError(f"the gateway does not answer on {topo.gateway_lan_address}:80 from the LAN: {answer}")
            time.sleep(0.2)

    def _stop_processes(self, manifest: Manifest, name: str) -> None:
        records = [p for p in manifest.processes if p.name == name]
        terminate([p.pid for p in records if p.alive()])
        manifest.processes = [p for p in manifest.processes if p.name != name]
        self.state.save(manifest)

    # ---- checks -----------------------------------------------------------------------------------

    def first_url(self, manifest: Manifest) -> tuple[str, str]:
        services = manifest.facts.get("services") or [{"name": "web"}]
        path = f"/{services[0]['name']}/"
        return path, f"http://{self.topology.gateway_lan_address}{path}"

    def check(self, manifest: Manifest) -> dict:
        """GET the first service through the gateway from the LAN host: does the app's page come back?"""
        path, url = self.first_url(manifest)
        answer = probe.try_http_get(self.ns(self.topology.client), self.topology.gateway_lan_address, 80, path, 5.0)
        if isinstance(answer, str):
            return {"ok": False, "url": url, "detail": answer}
        ok = answer.status == 200 and (PAGE_MARKER in answer.body or "flatnet container" in answer.body)
        return {"ok": ok, "url": url, "detail": f"HTTP {answer.status}, {len(answer.body)} bytes: {_headline(answer.body)!r}"}

    def browser_check(self, manifest: Manifest) -> dict:
        """Load the first service in headless Chromium inside the LAN host; does the DOM show the app?"""
        _, url = self.first_url(manifest)
        if shutil.which("chromium") is None:
            return {"ok": False, "url": url, "detail": "chromium is not installed"}
        with tempfile.TemporaryDirectory(prefix="flatnet-lab-chromium-") as profile:
            argv = ["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url]
            try:
                result = Namespace(self.ns(self.topology.client)).run(argv, check=False, timeout=60)
            except subprocess.TimeoutExpired:
                return {"ok": False, "url": url, "detail": "chromium timed out"}
        ok = result.returncode == 0 and (PAGE_MARKER in result.stdout or "flatnet container" in result.stdout)
        return {"ok": ok, "url": url, "detail": f"chromium exit {result.returncode}, DOM {len(result.stdout)} bytes"}

    # ---- status -----------------------------------------------------------------------------------

    def status(self, browser: bool = False) -> int:
        manifest = self.state.load()
        present = self.namespaces_present()
        if manifest is None and not present:
            self.out(f"No lab with prefix {self.prefix!r} is up.")
            return 3
        if manifest is None:
            self.out(f"Leftovers of a lab with prefix {self.prefix!r} (no manifest): {', '.join(present)}")
            self.out(f"Remove them with: flatnet lab down --prefix {self.prefix}")
            return 1
        healthy = True
        self.out(f"Lab {self.prefix!r} (state in {self.state.dir})")
        self.out("Namespaces:")
        for host in self.topology.hosts:
            name = self.ns(host.name)
            exists = name in present
            healthy &= exists
            self.out(f"  {name:<22} {'present' if exists else 'MISSING'}  {host.description}")
        self.out("Processes:")
        for p in manifest.processes:
            alive = p.alive()
            healthy &= alive
            self.out(f"  {p.name:<14} pid {p.pid:<7} in {p.host:<5} {'alive' if alive else 'DEAD'}   log {p.log}")
        self.out("Routes:")
        self.out("  " + "\n  ".join(self.route_lines(manifest)))
        check = self.check(manifest)
        healthy &= check["ok"]
        self.out(f"From {self.topology.client}: GET {check['url']} -> {'ok' if check['ok'] else 'FAIL'} ({check['detail']})")
        if browser:
            b = self.browser_check(manifest)
            healthy &= b["ok"]
            self.out(f"Chromium in {self.topology.client}: {b['url']} -> {'ok' if b['ok'] else 'FAIL'} ({b['detail']})")
        for note in manifest.notes:
            self.out(f"Note: {note}")
        return 0 if healthy else 1

    def route_lines(self, manifest: Manifest) -> list[str]:
        gateway = manifest.facts.get("gateway", {})
        if gateway.get("mode") != "flatnet":
            return [f"/{s['name']}/ -> {s['backend']} (static nginx config)" for s in manifest.facts.get("services", [])]
        admin_url = gateway["admin_urls"].get(self.topology.gateway_host)
        token = (self.state.dir / "admin.token").read_text().strip()
        try:
            from flatnet.gateway.admin import AdminClient

            routes = probe.in_namespace(self.ns(self.topology.gateway_host), lambda: AdminClient(admin_url, token).list())
        except Exception as exc:  # status reports what it can: the admin API may be down
            return [f"admin API {admin_url}: cannot list routes ({type(exc).__name__}: {exc})"]
        lines = []
        for route in _route_items(routes):
            lines.append(f"/{route.get('name')}/ -> {', '.join(route.get('backends', []))} ({route.get('mode', '?')})")
        return lines or ["(no routes)"]

    # ---- down -------------------------------------------------------------------------------------

    def down(self, quiet: bool = False) -> int:
        manifest = self.state.load()
        said = self.out if not quiet else (lambda _s: None)
        if manifest is not None:
            recorded = [p for p in manifest.processes if p.alive()]
            if recorded:
                said(f"Stopping {', '.join(f'{p.name} ({p.pid})' for p in recorded)}")
            terminate([p.pid for p in recorded])
        names = set(self.namespaces_present()) | {
            n for n in (manifest.namespaces if manifest else []) if os.path.exists(os.path.join(NETNS_DIR, n))
        }
        for name in sorted(names):
            stragglers = pids_in_namespace(os.path.join(NETNS_DIR, name))
            if stragglers:
                said(f"Killing {len(stragglers)} process(es) left in {name}")
                terminate(stragglers, grace=1.0)
        for name in sorted(names):
            Namespace(name).remove()
        if names:
            said(f"Removed namespaces {', '.join(sorted(names))}")
        self.state.remove()
        if not names and manifest is None:
            said(f"No lab with prefix {self.prefix!r}: nothing to remove.")
        return 0

    # ---- describing -------------------------------------------------------------------------------

    def describe(self, manifest: Manifest) -> str:
        topo = self.topology
        runs: dict[str, list[str]] = {h.name: [] for h in topo.hosts}
        gateway = manifest.facts.get("gateway", {})
        for p in manifest.processes:
            if p.name == "gateway":
                runs[p.host].append(f"gateway ({gateway.get('mode')}) pid {p.pid}, http://{topo.gateway_lan_address}/")
                for host, url in gateway.get("admin_urls", {}).items():
                    runs[topo.gateway_host].append(f"admin API {url} (for {host})")
        for s in manifest.facts.get("services", []):
            runs[s["host"]].append(f"{s['name']}: {s['kind']} on {s['backend']}")
        lines = [f"Flatnet lab {self.prefix!r} is up (state, logs and configs in {self.state.dir}).", ""]
        for host in topo.hosts:
            addrs = ", ".join(topo.addresses_of(host.name))
            lines.append(f"  {host.name:<5} {self.ns(host.name):<16} {addrs}")
            lines.append(f"        {host.description}")
            for item in runs[host.name]:
                lines.append(f"        runs {item}")
        if manifest.facts.get("routes_pushed_from"):
            lines.append(f"\nRoutes pushed with `flatnet gateway sync` from {manifest.facts['routes_pushed_from']}.")
        if manifest.notes:
            lines.append("\nNot started / stand-ins:")
            lines += [f"  - {n}" for n in manifest.notes]
        check = manifest.facts.get("check", {})
        lines.append(f"\nChecked from {topo.client}: GET {check.get('url')} -> {'ok' if check.get('ok') else 'FAIL'} ({check.get('detail')})")
        if "browser" in manifest.facts:
            b = manifest.facts["browser"]
            lines.append(f"Checked with headless Chromium in {topo.client}: {'ok' if b['ok'] else 'FAIL'} ({b['detail']})")
        lan = f"nsenter --net={NETNS_DIR}/{self.ns(topo.client)}"
        path, url = self.first_url(manifest)
        lines += [
            "",
            f"Try it as the colleague on the LAN ({topo.client}):",
            f"  {lan} curl {url}",
            f"  {lan} curl -L -c /tmp/lab-cookies -b /tmp/lab-cookies {url}login     # redirect + cookie",
            f"  {lan} curl http://{topo.gateway_lan_address}/                           # the service index",
        ]
        if gateway.get("domain"):
            host = f"{path.strip('/')}.{gateway['domain']}"
            lines.append(f"  {lan} curl -H 'Host: {host}' http://{topo.gateway_lan_address}/       # by name")
        lines += [
            f"  {lan} chromium {' '.join(CHROMIUM_FLAGS)} --user-data-dir=$(mktemp -d) --dump-dom {url}",
            "",
            f"Status: flatnet lab status{self._prefix_arg()}    Remove it: flatnet lab down{self._prefix_arg()}",
        ]
        return "\n".join(lines)

    def _prefix_arg(self) -> str:
        return "" if self.prefix == DEFAULT_PREFIX else f" --prefix {self.prefix}"

    def _log_tails(self, manifest: Manifest) -> str:
        parts = []
        for p in manifest.processes:
            tail = _tail(Path(p.log))
            if tail:
                parts.append(f"--- {p.name} ({p.log}):\n{tail}")
        return "\n".join(parts)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def _headline(page: str) -> str:
    """The first <h1> (else <title>, else the start) of an HTML page, for one-line reports."""
    match = re.search(r"<h1[^>]*>(.*?)</h1>", page, re.S | re.I) or re.search(r"<title>(.*?)</title>", page, re.S | re.I)
    text = match.group(1) if match else page
    return re.sub(r"<[^>]+>|\s+", " ", text).strip()[:80]


def _route_items(routes: object) -> list[dict]:
    """AdminClient.list() output as a list of route dicts, whatever container it comes in."""
    if hasattr(routes, "routes"):  # flatnet.gateway.admin.RouteTable
        routes = routes.routes
    if isinstance(routes, dict):
        routes = routes.get("routes", list(routes.values()))
    items = []
    for r in routes or []:
        if isinstance(r, dict):
            items.append(r)
        elif hasattr(r, "to_json"):
            items.append(r.to_json())
    return items
