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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from flatnet.errors import UserError
from flatnet.lab import gateway as lab_gateway
from flatnet.lab import network, probe, wsl
from flatnet.lab.demo_app import PAGE_MARKER
from flatnet.lab.state import (
    DEFAULT_PREFIX,
    LabState,
    Manifest,
    ProcessRecord,
    pids_in_namespace,
    process_start_ticks,
    spawn,
    terminate,
    with_descendants,
)
from flatnet.lab.topology import (
    CONTAINER_SERVICES,
    DEMO_ONLY_SERVICES,
    SITES,
    Service,
    Topology,
    namespace_name,
)
from flatnet.netns import NETNS_DIR, Namespace, list_namespaces

APP_START_TIMEOUT = 10.0
NODE_START_TIMEOUT = 20.0
NODE_SETTLE_TIME = 3.0
TUNNEL_UP_TIMEOUT = 15.0  # both nodes start at once: the handshake needs at most one retry (5 s)
ROUTE_WAIT_TIMEOUT = 15.0  # a node pushes its containers' routes once the gateway answers
GATEWAY_START_TIMEOUT = 20.0
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
)  # fmt: skip

Out = Callable[[str], None]


class Lab:
    """One lab: a topology, a prefix and its state directory."""

    def __init__(self, prefix: str = DEFAULT_PREFIX, site: str = "office", out: Out = print) -> None:
        if not prefix or "/" in prefix or len(prefix) > 24:
            raise UserError(f"bad lab prefix {prefix!r}: 1-24 characters, no '/'")
        if site not in SITES:
            raise UserError(f"no site {site!r} (known: {', '.join(sorted(SITES))})")
        self.prefix = prefix
        self.site = site
        self.topology: Topology = SITES[site]
        self.state = LabState(prefix)
        self.out = out

    # ---- names ----------------------------------------------------------------------------------

    def ns(self, host: str) -> str:
        return namespace_name(self.prefix, host)

    def namespaces_present(self) -> list[str]:
        return [n for n in list_namespaces() if n.startswith(f"{self.prefix}-")]

    # ---- up -------------------------------------------------------------------------------------

    def up(self, gateway_mode: str = "auto", browser: bool = False, containers: bool = True) -> int:
        if self.state.load() is not None or self.namespaces_present():
            self.out(f"A lab with prefix {self.prefix!r} exists already: removing it first.")
            self.down(quiet=True)
        manifest = self.state.create()
        manifest.facts["site"] = self.site
        try:
            return self._up(manifest, gateway_mode, browser, containers)
        except BaseException:
            self.out("lab up failed: removing what it made (logs kept in the message below).")
            logs = self._log_tails(manifest)
            self.down(quiet=True)
            if logs:
                self.out(logs)
            raise

    def _up(self, manifest: Manifest, gateway_mode: str, browser: bool, containers: bool) -> int:
        topo = self.topology

        def record_namespace(name: str) -> None:
            manifest.namespaces.append(name)
            self.state.save(manifest)

        network.build(topo, self.prefix, record_namespace)

        token_file = self.state.dir / "admin.token"
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")

        services = self._choose_services(manifest, containers)
        if manifest.facts.get("stack"):
            try:
                self._start_nodes(manifest, token_file)
            except UserError as exc:
                manifest.notes.append(f"flatnet-node / CNI plugin: not started ({exc}); the Python demo app stands in")
                for host in topo.wsl_hosts:
                    self._stop_processes(manifest, f"node:{host}")
                for key in ("stack", "tunnel"):
                    manifest.facts.pop(key, None)
                services = list(DEMO_ONLY_SERVICES)
        published: list[tuple[Service, str]] = []
        for service in services:
            try:
                backend = self._start_service(manifest, service)
            except UserError as exc:
                stand_in = self._demo_stand_in(service)
                if service.kind != "podman-httpd" or stand_in is None:
                    raise
                manifest.notes.append(f"container {service.name} on {service.host}: failed ({exc}); the demo app stands in")
                service, backend = stand_in, self._start_service(manifest, stand_in)
            published.append((service, backend))
            manifest.facts["services"] = [
                {"name": s.name, "host": s.host, "kind": s.kind, "backend": b, "pushed_by": self._pusher_of(s)}
                for s, b in published
            ]
            self.state.save(manifest)

        self._start_gateway(manifest, gateway_mode, published, token_file)
        check = self.check(manifest, wait=ROUTE_WAIT_TIMEOUT)
        manifest.facts["check"] = check
        self.state.save(manifest)
        if browser:
            manifest.facts["browser"] = self.browser_check(manifest)
        self.out(self.describe(manifest))
        if not check["ok"]:
            raise UserError(f"the lab is up but {check['url']} does not answer as it should: {check['detail']}")
        return 0

    def _choose_services(self, manifest: Manifest, containers: bool) -> list[Service]:
        missing = wsl.stack_missing() if containers else "--no-containers"
        if missing is None:
            manifest.facts["stack"] = True
            return list(CONTAINER_SERVICES)
        manifest.notes.append(
            f"Podman containers on --network flatnet: not started ({missing}); the Python demo app stands in"
        )
        manifest.notes.append("flatnet-node: not started; the lab pushes routes itself")
        return list(DEMO_ONLY_SERVICES)

    def _pusher_of(self, service: Service) -> str:
        """Who tells the gateway about *service*: the host's flatnet-node (containers) or the lab."""
        return "node" if service.kind == "podman-httpd" else "lab"

    def _demo_stand_in(self, service: Service) -> Service | None:
        local = next((a for a in self.topology.local_addresses if a.host == service.host), None)
        if local is None:
            return None
        return Service(service.name, service.host, "demo-app", local.addr.split("/")[0], 8080)

    def _start_nodes(self, manifest: Manifest, token_file: Path) -> None:
        """flatnet-node and the CNI plugin on every WSL2 host (before any container starts).

        With ``flatnet cert`` available the lab issues a CA and host certificates and the nodes also
        run the tunnel to each other; a node that cannot start so is restarted without the tunnel,
        and ``up`` says why.
        """
        pki: Path | None = None
        reason = wsl.pki_missing()
        if reason is None:
            try:
                pki = wsl.issue_certificates(self.state.dir, self.topology)
            except UserError as exc:
                reason = str(exc)
        if reason:
            manifest.notes.append(f"tunnel between WSL2 hosts: off ({reason})")
        # Start every node first, then wait for them: they come up in parallel.
        started: list[tuple[wsl.WslStack, ProcessRecord]] = []
        for host in self.topology.wsl_hosts:
            stack = wsl.WslStack(self.state.dir, self.topology, host)
            manifest.facts.setdefault("podman", {})[host] = str(stack.podman_base)
            stack.write_node_config(token_file, pki)
            started.append((stack, self._spawn(manifest, f"node:{host}", host, stack.node_argv())))
        for stack, record in started:
            host = stack.host
            problem = self._wait_for_node(record, stack)
            if problem and pki is not None:
                manifest.notes.append(f"tunnel on {host}: off (flatnet-node with certificates failed: {problem})")
                self._stop_processes(manifest, record.name)
                stack.control_socket.unlink(missing_ok=True)
                stack.write_node_config(token_file, None)
                record = self._spawn(manifest, f"node:{host}", host, stack.node_argv())
                problem = self._wait_for_node(record, stack)
            if problem:
                raise UserError(f"flatnet-node on {host}: {problem}")
            if pki is not None and not any(n.startswith(f"tunnel on {host}") for n in manifest.notes):
                manifest.facts.setdefault("tunnel", []).append(host)
        installs = [
            (stack.host, subprocess.Popen(stack.install_argv(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
            for stack, _ in started
        ]
        for host, proc in installs:
            _, err = proc.communicate(timeout=60)
            if proc.returncode != 0:
                raise UserError(f"flatnet cni install for {host} failed: {err.strip()[-500:]}")
        # Every WSL2 host gets the offline busybox image, so `lab exec <host> -- podman run` works there.
        with ThreadPoolExecutor(max_workers=len(started)) as pool:
            for host, problem in pool.map(_import_image, [stack for stack, _ in started]):
                if problem:
                    raise UserError(f"importing the busybox image on {host} failed: {problem}")
        self._serve_through_tunnels(manifest)
        self.state.save(manifest)

    def _serve_through_tunnels(self, manifest: Manifest) -> None:
        """One gateway serves every host's services: once host B's node and its entry host A's node
        have a tunnel up, the Windows host routes B's container subnet to A's VM (topology
        ``served_through``); A's node carries it to B, masquerading the gateway's address."""
        topo = self.topology
        tunnel = manifest.facts.get("tunnel", [])
        for host, entry in topo.served_through.items():
            if host not in tunnel or entry not in tunnel:
                continue
            stack = wsl.WslStack(self.state.dir, topo, entry)
            peer_ip = str(wsl.flatnet_ip(topo, host))
            deadline = time.monotonic() + TUNNEL_UP_TIMEOUT
            while not any(p["ip"] == peer_ip and p["up"] for p in wsl.tunnel_peers(stack.control_socket)):
                if time.monotonic() > deadline:
                    manifest.notes.append(
                        f"{host} through {entry}'s tunnel: the tunnel did not come up in {TUNNEL_UP_TIMEOUT:.0f} s; "
                        f"the Windows host routes {topo.container_subnets[host]} to {host} directly"
                    )
                    break
                time.sleep(0.1)
            else:
                subnet = topo.container_subnets[host]
                Namespace(self.ns(topo.gateway_host)).add_route(subnet, gateway=stack.underlay_address())
                manifest.facts.setdefault("served_through", {})[host] = entry

    def _wait_for_node(self, record: ProcessRecord, stack: wsl.WslStack) -> str | None:
        """None once the node is up, else what went wrong.

        Up: its control socket answers ``ping`` and it has logged that it is ready (all components
        started) — or, should that message change, it has kept answering for a few seconds.
        """
        deadline = time.monotonic() + NODE_START_TIMEOUT
        log = Path(record.log)
        answering_since: float | None = None
        while True:
            text = log.read_text(errors="replace") if log.exists() else ""
            if not record.alive():
                lines = text.strip().splitlines()
                return f"exited: {lines[-1] if lines else 'no output'}"
            if wsl.control_ping(stack.control_socket):
                answering_since = answering_since or time.monotonic()
                if " ready on " in text or time.monotonic() - answering_since > NODE_SETTLE_TIME:
                    return None
            if time.monotonic() > deadline:
                return f"not ready after {NODE_START_TIMEOUT:.0f} s"
            time.sleep(0.05)

    def _start_service(self, manifest: Manifest, service: Service) -> str:
        """Start *service*; returns its backend ``ip:port`` once it answers from the Windows host."""
        if service.kind == "podman-httpd":
            return self._start_container(manifest, service)
        argv = [
            sys.executable, "-m", "flatnet.lab.demo_app",
            "--listen", service.address, "--port", str(service.port), "--name", service.name,
        ]  # fmt: skip
        self._spawn(manifest, f"app:{service.name}", service.host, argv)
        return self._wait_for_backend(service, service.address, "/health")

    def _start_container(self, manifest: Manifest, service: Service) -> str:
        from flatnet.podman import PodmanError

        stack = wsl.WslStack(self.state.dir, self.topology, service.host)
        podman = stack.podman()
        ns = self.ns(service.host)
        try:
            image = podman.ensure_image()
            podman.podman(
                ["run", "-d", "--network", "flatnet", "--name", service.name,
                 "--label", f"flatnet.port={service.port}", image,
                 "httpd", "-f", "-p", str(service.port), "-h", "/www"],
                netns=ns,
            )  # fmt: skip
            inspect = podman.podman(
                ["inspect", service.name, "--format", "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}"],
                netns=ns,
            )
        except PodmanError as exc:
            raise UserError(str(exc)) from None
        address = inspect.stdout.split()[0] if inspect.stdout.split() else ""
        if not address:
            raise UserError(f"container {service.name} got no address on network flatnet")
        manifest.containers.append({"name": service.name, "host": service.host, "address": address})
        self.state.save(manifest)
        return self._wait_for_backend(service, address, "/")

    def _wait_for_backend(self, service: Service, address: str, path: str) -> str:
        """Wait until *service* answers at *address* from the Windows host, i.e. routed like the gateway's traffic."""
        deadline = time.monotonic() + APP_START_TIMEOUT
        while True:
            answer = probe.try_http_get(self.ns(self.topology.gateway_host), address, service.port, path, 1.0)
            if not isinstance(answer, str) and answer.status == 200:
                return f"{address}:{service.port}"
            if time.monotonic() > deadline:
                raise UserError(f"{service.name} on {service.host} does not answer at {address}:{service.port}: {answer}")
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
        # Containers' routes come from their host's flatnet-node; the lab pushes the rest (demo apps)
        # with `flatnet gateway sync` from the WSL2 host running them, over the WSL-facing admin
        # address: what a person there does in Phase 1.
        by_hand = [(s, b) for s, b in published if self._pusher_of(s) == "lab"]
        if not by_hand:
            return
        route_file = self.state.dir / "routes.toml"
        lab_gateway.write_route_file(route_file, by_hand)
        pusher = by_hand[0][0].host
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

    def check(self, manifest: Manifest, wait: float = 0.0) -> dict:
        """GET every service through the gateway from the LAN host: does each app's page come back?

        With *wait*, keep trying that long (routes pushed by a node arrive a moment later).
        """
        services = manifest.facts.get("services") or []
        deadline = time.monotonic() + wait
        while True:
            results = [self._check_one(s["name"]) for s in services]
            ok = bool(results) and all(r["ok"] for r in results)
            if ok or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        _, url = self.first_url(manifest)
        failed = [r for r in results if not r["ok"]]
        detail = "; ".join(f"{r['url']}: {r['detail']}" for r in (failed or results)) or "no services"
        return {"ok": ok, "url": url, "detail": detail, "services": results}

    def _check_one(self, name: str) -> dict:
        path = f"/{name}/"
        url = f"http://{self.topology.gateway_lan_address}{path}"
        answer = probe.try_http_get(self.ns(self.topology.client), self.topology.gateway_lan_address, 80, path, 5.0)
        if isinstance(answer, str):
            return {"ok": False, "url": url, "detail": answer}
        ok = answer.status == 200 and _is_app_page(answer.body)
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
        ok = result.returncode == 0 and _is_app_page(result.stdout)
        return {"ok": ok, "url": url, "detail": f"chromium exit {result.returncode}, DOM {len(result.stdout)} bytes"}

    # ---- exec -------------------------------------------------------------------------------------

    def exec(self, host: str, argv: list[str]) -> int:
        """Run *argv* in lab host *host*; on a WSL2 host, ``podman`` talks to that host's Podman."""
        try:
            self.topology.host(host)
        except KeyError:
            known = ", ".join(h.name for h in self.topology.hosts)
            raise UserError(f"no host {host!r} in the lab (hosts: {known})") from None
        ns = Namespace(self.ns(host))
        if not ns.exists():
            raise UserError(f"{ns.name} does not exist: is the lab with prefix {self.prefix!r} up?")
        stack = wsl.WslStack(self.state.dir, self.topology, host)
        env = stack.podman().env() if stack.podman_base.joinpath("containers.conf").exists() else None
        return subprocess.run(ns.command(argv), env=env).returncode

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
        self.topology = SITES.get(manifest.facts.get("site", self.site), self.topology)
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
        if manifest.facts.get("podman"):
            self.out("Containers:")
            for line in self.container_lines(manifest):
                self.out(f"  {line}")
        if manifest.facts.get("tunnel"):
            self.out("Tunnel peers:")
            for line in self.tunnel_lines(manifest):
                self.out(f"  {line}")
        self.out("Routes:")
        self.out("  " + "\n  ".join(self.route_lines(manifest)))
        check = self.check(manifest)
        healthy &= check["ok"]
        self.out(f"From {self.topology.client} through the gateway:")
        for r in check["services"]:
            self.out(f"  GET {r['url']} -> {'ok' if r['ok'] else 'FAIL'} ({r['detail']})")
        if browser:
            b = self.browser_check(manifest)
            healthy &= b["ok"]
            self.out(f"Chromium in {self.topology.client}: {b['url']} -> {'ok' if b['ok'] else 'FAIL'} ({b['detail']})")
        for note in manifest.notes:
            self.out(f"Note: {note}")
        return 0 if healthy else 1

    def container_lines(self, manifest: Manifest) -> list[str]:
        """``podman ps`` of each WSL2 host's Podman environment."""
        lines = []
        for host in sorted(manifest.facts.get("podman", {})):
            podman = wsl.WslStack(self.state.dir, self.topology, host).podman()
            try:
                result = podman.podman(
                    ["ps", "--all", "--format", "{{.Names}}  {{.Status}}  {{.Image}}"],
                    netns=self.ns(host), check=False, timeout=30,
                )  # fmt: skip
            except subprocess.TimeoutExpired:
                lines.append(f"{host}: podman ps timed out")
                continue
            if result.returncode != 0:
                lines.append(f"{host}: podman ps failed: {result.stderr.strip()[-200:]}")
                continue
            found = result.stdout.strip().splitlines()
            lines += [f"{host}: {c}" for c in found] or [f"{host}: (none)"]
        return lines

    def tunnel_lines(self, manifest: Manifest) -> list[str]:
        """Each tunnel node's peers (its control socket's ``status``). A peer without a session is
        not a fault: sessions end after 180 s without traffic and come back on demand."""
        lines = []
        for host in manifest.facts.get("tunnel", []):
            stack = wsl.WslStack(self.state.dir, self.topology, host)
            peers = wsl.tunnel_peers(stack.control_socket)
            if not peers:
                lines.append(f"{host}: no answer from flatnet-node ({stack.control_socket})")
            for p in peers:
                age = p["handshake_age"]
                state = "up" if p["up"] else "no session (handshakes on the next packet)"
                handshake = f", handshake {age:.0f} s ago" if age is not None else ""
                lines.append(
                    f"{host} -> {p['name'] or '?'} {p['ip']}: {state}, endpoint {p['endpoint'] or '-'}{handshake}, "
                    f"in {p['rx_bytes']} B, out {p['tx_bytes']} B"
                )
        for host, entry in manifest.facts.get("served_through", {}).items():
            lines.append(
                f"{self.topology.gateway_host} reaches {host}'s containers ({self.topology.container_subnets[host]}) "
                f"through {entry}'s tunnel"
            )
        return lines

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
        self._remove_containers(manifest, said)
        if manifest is not None:
            recorded = [p for p in manifest.processes if p.alive()]
            if recorded:
                said(f"Stopping {', '.join(f'{p.name} ({p.pid})' for p in recorded)}")
            terminate([p.pid for p in recorded])
        names = set(self.namespaces_present()) | {
            n for n in (manifest.namespaces if manifest else []) if os.path.exists(os.path.join(NETNS_DIR, n))
        }
        for name in sorted(names):
            # Children too: a container's processes live in a netns of their own under conmon.
            stragglers = with_descendants(pids_in_namespace(os.path.join(NETNS_DIR, name)))
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

    def _remove_containers(self, manifest: Manifest | None, said: Out) -> None:
        """``podman rm`` in each WSL2 host (the plugin's DEL frees the address, the node drops the route).

        Without a manifest (torn by a crash) the Podman environments are found in the state dir.
        """
        envs = dict(manifest.facts.get("podman", {})) if manifest else {}
        for conf in self.state.dir.glob("*/podman/containers.conf"):
            envs.setdefault(conf.parent.parent.name, str(conf.parent))
        for host, base in sorted(envs.items()):
            ns = self.ns(host)
            if not os.path.exists(os.path.join(NETNS_DIR, ns)) or not Path(base).exists():
                continue
            podman = wsl.WslStack(self.state.dir, self.topology, host).podman()
            try:
                result = podman.podman(["rm", "--all", "--force", "--time", "0"], netns=ns, check=False, timeout=60)
            except subprocess.TimeoutExpired:
                said(f"podman rm in {host} timed out; its processes are killed below")
                continue
            removed = result.stdout.split()
            if removed:
                said(f"Removed {len(removed)} container(s) in {host}")

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
        for p in manifest.processes:
            if p.name.startswith("node:"):
                tunnel = ", tunnel" if p.host in manifest.facts.get("tunnel", []) else ""
                runs[p.host].append(f"flatnet-node pid {p.pid} (control socket, CNI service, gateway pusher{tunnel})")
        kinds = {"demo-app": "Python demo app", "podman-httpd": "Podman container (busybox httpd) on --network flatnet"}
        served_through = manifest.facts.get("served_through", {})
        for s in manifest.facts.get("services", []):
            route = "route pushed by flatnet-node" if s.get("pushed_by") == "node" else "route pushed by the lab"
            if gateway.get("mode") == "static":
                route = "route in the static nginx config"
            if s["host"] in served_through:
                route += f"; the gateway reaches it through {served_through[s['host']]}'s tunnel"
            runs[s["host"]].append(f"{s['name']}: {kinds.get(s['kind'], s['kind'])} at {s['backend']} ({route})")
        for host, entry in served_through.items():
            via = wsl.WslStack(self.state.dir, topo, entry).underlay_address()
            runs[topo.gateway_host].append(
                f"route {topo.container_subnets[host]} via {via}: {host}'s containers through {entry}'s Flatnet tunnel"
            )
        lines = [f"Flatnet lab {self.prefix!r} is up (state, logs and configs in {self.state.dir}).", ""]
        for host in topo.hosts:
            addrs = ", ".join(topo.addresses_of(host.name))
            lines.append(f"  {host.name:<5} {self.ns(host.name):<16} {addrs}")
            lines.append(f"        {host.description}")
            for item in runs[host.name]:
                lines.append(f"        {item}" if item.startswith("route ") else f"        runs {item}")
        if manifest.facts.get("routes_pushed_from"):
            lines.append(f"\nRoutes pushed with `flatnet gateway sync` from {manifest.facts['routes_pushed_from']}.")
        if manifest.notes:
            lines.append("\nNot started / stand-ins:")
            lines += [f"  - {n}" for n in manifest.notes]
        check = manifest.facts.get("check", {})
        lines.append(f"\nChecked from {topo.client}, through the gateway:")
        for r in check.get("services", []):
            lines.append(f"  GET {r['url']} -> {'ok' if r['ok'] else 'FAIL'} ({r['detail']})")
        if "browser" in manifest.facts:
            b = manifest.facts["browser"]
            lines.append(f"Checked with headless Chromium in {topo.client}: {'ok' if b['ok'] else 'FAIL'} ({b['detail']})")
        lan = f"nsenter --net={NETNS_DIR}/{self.ns(topo.client)}"
        path, url = self.first_url(manifest)
        lines += ["", f"Try it as the colleague on the LAN ({topo.client}):"]
        for s in manifest.facts.get("services", []):
            lines.append(f"  {lan} curl http://{topo.gateway_lan_address}/{s['name']}/")
        demo = next((s for s in manifest.facts.get("services", []) if s["kind"] == "demo-app"), None)
        if demo:
            lines.append(
                f"  {lan} curl -L -c /tmp/lab-cookies -b /tmp/lab-cookies "
                f"http://{topo.gateway_lan_address}/{demo['name']}/login     # redirect + cookie"
            )
        lines.append(f"  {lan} curl http://{topo.gateway_lan_address}/     # the service index")
        podman_host = next((h for h in topo.wsl_hosts if h in manifest.facts.get("podman", {})), None)
        if podman_host:
            lines.append(f"  flatnet lab exec{self._prefix_arg()} {podman_host} -- podman ps     # {podman_host}'s containers")
        tunnel_hosts = manifest.facts.get("tunnel", [])
        if len(tunnel_hosts) >= 2:
            a, b = tunnel_hosts[0], tunnel_hosts[1]
            lines.append(
                f"  nsenter --net={NETNS_DIR}/{self.ns(a)} ping -c 3 {wsl.flatnet_ip(topo, b)}"
                f"     # {a} -> {b} through the Flatnet tunnel"
            )
        for host, entry in manifest.facts.get("served_through", {}).items():
            lines.append(
                f"  flatnet lab exec{self._prefix_arg()} {host} -- podman run -d --network flatnet --name far "
                "--label flatnet.port=80 localhost/flatnet-busybox httpd -f -p 80 -h /www"
            )
            lines.append(f"  {lan} curl http://{topo.gateway_lan_address}/far/     # gateway -> {entry} -> tunnel -> {host}")
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


def _import_image(stack: wsl.WslStack) -> tuple[str, str | None]:
    from flatnet.podman import PodmanError

    try:
        stack.podman().ensure_image()
    except (PodmanError, subprocess.TimeoutExpired) as exc:
        return stack.host, str(exc)
    return stack.host, None


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def _is_app_page(page: str) -> bool:
    """The demo app's page or the busybox container's index (flatnet.podman.INDEX_HTML)?"""
    return PAGE_MARKER in page or "hello from a flatnet container" in page


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
