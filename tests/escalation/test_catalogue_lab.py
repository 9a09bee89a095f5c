"""The service catalogue, for real: the NAT lab's lighthouse, full ``flatnet-node`` processes on
host A (beside a real OpenResty gateway, following the catalogue) and host B (with the CNI plugin);
a container started on B appears on A's gateway under owner ``catalogue.host-a`` and answers
through the gateway, carried by A's tunnel.

What it stands in for: A's namespace plays both the WSL2 VM and the Windows host (the gateway's
requests to 10.87.2.0/24 leave through A's TUN); the Windows route itself is covered by
tests/lab/test_cross_host.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cni import cli
from flatnet.gateway.runner import GatewayProcess
from flatnet.lab.nat import build_nat_lab
from flatnet.node.control import ControlClient
from flatnet.testing.markers import needs_root, require_tools
from tests.escalation.lab_harness import start_lighthouse, write_files
from tests.gateway.conftest import assert_clean_error_log, gateway_config, request_in

pytestmark = [pytest.mark.slow, needs_root, require_tools("nft", "nginx")]

REPO = Path(__file__).resolve().parents[2]
NODE_BIN = str(REPO / ".venv" / "bin" / "flatnet-node")


def start_full_node(ns, config: Path, socket: Path, log: Path, timeout: float = 40.0) -> subprocess.Popen:
    with open(log, "ab") as out:
        proc = subprocess.Popen(ns.command([NODE_BIN, "--config", str(config)]), stdout=out, stderr=out,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ControlClient(socket, timeout=2).call("ping")
            return proc
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.1)
    stop(proc)
    raise RuntimeError(f"flatnet-node did not start:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def gateway_dir():
    """A directory nginx workers (www-data) can reach: pytest's tmp_path sits under a 0700 dir."""
    path = Path(tempfile.mkdtemp(prefix="flatnet-gw-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_container_started_on_host_b_is_served_by_the_gateway_following_on_host_a(
    netns_factory, tmp_path, gateway_dir
):
    lab = build_nat_lab(netns_factory, same_lan=True)
    configs = write_files(tmp_path, lab)
    processes: list[subprocess.Popen] = []
    lighthouse = start_lighthouse(lab.internet, configs["lighthouse"])
    gw_config = gateway_config(gateway_dir, admin_listen=["127.0.0.1:8081"], admin_allow=["127.0.0.0/8"])
    gateway = GatewayProcess(gw_config, wrap=lab.host_a.command)
    try:
        with open(gateway_dir / "nginx.stderr", "wb") as errlog:
            gateway.start(stderr=errlog)
        token_file = Path(gw_config.paths().token_file)
        # A: the gateway's node, following the catalogue. B: a host with the CNI plugin.
        with configs["a"].open("a") as f:
            f.write(f'[cni]\nsubnet = "10.87.1.0/24"\ndata_dir = "{tmp_path}/a-cni"\nread_labels = false\n'
                    f'[gateway]\nadmin_url = "http://127.0.0.1:8081"\ntoken_file = "{token_file}"\n'
                    "follow_catalogue = true\ncatalogue_interval = 1.0\nretry_interval = 0.2\n")
        with configs["b"].open("a") as f:
            f.write(f'[cni]\nsubnet = "10.87.2.0/24"\ndata_dir = "{tmp_path}/b-cni"\nread_labels = false\n')
        processes.append(start_full_node(lab.host_a, configs["a"], tmp_path / "a.sock", tmp_path / "a.log"))
        processes.append(start_full_node(lab.host_b, configs["b"], tmp_path / "b.sock", tmp_path / "b.log"))

        # A container starts on B: the runtime runs the plugin, which asks B's node.
        conf = cli.conflist("flatnet", "10.87.2.0/24", f"{tmp_path}/b-cni", str(tmp_path / "b.sock"))
        cli.install(tmp_path / "plugins", tmp_path / "net.d", conf)
        container = netns_factory("ctr")
        netconf = {"cniVersion": "1.0.0", "name": conf["name"], **conf["plugins"][0]}
        env = {"PATH": os.environ["PATH"], "CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c0ffee" * 8,
               "CNI_NETNS": f"/run/netns/{container.name}", "CNI_IFNAME": "eth0",
               "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAME=wiki", "CNI_PATH": str(tmp_path / "plugins")}
        added = subprocess.run(lab.host_b.command([str(tmp_path / "plugins" / "flatnet")]),
                               input=json.dumps(netconf).encode(), env=env, capture_output=True, timeout=60)
        assert added.returncode == 0, added.stdout + added.stderr
        address = json.loads(added.stdout)["ips"][0]["address"].split("/")[0]
        app = container.popen([sys.executable, "-m", "flatnet.testing.webapp", "--listen", f"{address}:80",
                               "--name", "wiki-on-b"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        processes.append(app)

        # The gateway on A learns /wiki/ from the catalogue and serves it through A's tunnel.
        deadline = time.monotonic() + 90
        answer = None
        while time.monotonic() < deadline:
            routes = {r.name: r for r in gateway_admin(lab.host_a, token_file).routes}
            if "wiki" in routes:
                assert routes["wiki"].owner == "catalogue.host-a"
                assert routes["wiki"].backends == (f"{address}:80",)
                try:
                    answer = request_in(lab.host_a.name, "127.0.0.1", 80, "GET", "/wiki/", timeout=5.0)
                except OSError as exc:
                    answer = (0, {}, str(exc).encode())
                if answer[0] == 200:
                    break
            time.sleep(0.5)
        assert answer is not None and answer[0] == 200 and b"wiki-on-b" in answer[2], (
            f"/wiki/ never answered: {answer}\nA: {catalogue_status(tmp_path / 'a.sock')}\n"
            f"B: {catalogue_status(tmp_path / 'b.sock')}\n{(tmp_path / 'a.log').read_text()[-3000:]}")

        # The container goes away. B now publishes nothing, so it leaves the catalogue, and a host
        # missing from it keeps its routes for the hold (40 s: a restarted lighthouse must not make
        # routes blink), then they go.
        env["CNI_COMMAND"] = "DEL"
        removed = subprocess.run(lab.host_b.command([str(tmp_path / "plugins" / "flatnet")]),
                                 input=json.dumps(netconf).encode(), env=env, capture_output=True, timeout=60)
        assert removed.returncode == 0, removed.stdout + removed.stderr
        deadline = time.monotonic() + 75
        while "wiki" in {r.name for r in gateway_admin(lab.host_a, token_file).routes}:
            assert time.monotonic() < deadline, "wiki stayed on the gateway after its container went"
            time.sleep(0.5)
    finally:
        for proc in reversed(processes):
            stop(proc)
        lighthouse.stop()
        gateway.stop()
    assert_clean_error_log(gw_config)


def gateway_admin(ns, token_file: Path):
    from tests.gateway.conftest import NsAdmin

    return NsAdmin(ns.name, "http://127.0.0.1:8081", token_file.read_text().strip()).list()


def catalogue_status(socket: Path):
    try:
        return ControlClient(socket, timeout=5).call("catalogue")
    except OSError as exc:
        return str(exc)
