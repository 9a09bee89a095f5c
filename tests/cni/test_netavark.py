"""The netavark plugin front end on its JSON contract (Debian 12's netavark 1.4 cannot run plugins)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cni import netavark
from flatnet.testing.markers import needs_root
from tests.cni.harness import SUBNET, CniHost


def network(tmp_path, **options):
    return {"name": "flatnet", "id": "f" * 64, "driver": "flatnet", "network_interface": "",
            "subnets": [{"subnet": SUBNET}], "ipv6_enabled": False, "internal": False, "dns_enabled": False,
            "options": {"data_dir": str(tmp_path / "data"), "node_socket": str(tmp_path / "none.sock"), **options}}


def run(argv, body) -> tuple[dict | None, int]:
    stdin = body if isinstance(body, bytes) else json.dumps(body).encode()
    return netavark.run(argv, stdin)


def test_info_and_create(tmp_path):
    out, status = run(["info"], b"")
    assert status == 0 and out["api_version"] == "1.0.0" and out["version"]
    out, status = run(["create"], network(tmp_path))
    assert status == 0 and out["subnets"] == [{"subnet": SUBNET, "gateway": "10.87.1.1"}] and out["name"] == "flatnet"


@pytest.mark.parametrize(("argv", "body", "needle"), [
    ([], b"{}", "usage"),
    (["frob"], b"{}", "unknown command"),
    (["create"], b"{nope", "decode"),
    (["create"], b"[]", "JSON object"),
    (["create"], {"name": "x", "subnets": []}, "subnet"),
    (["create"], {"name": "x", "subnets": [{"subnet": "192.168.0.0/24"}]}, "Flatnet range"),
    (["setup"], {"container_id": "c", "network": {}}, "namespace path"),
    (["setup", "/run/netns/x"], {"network": {"subnets": [{"subnet": SUBNET}]}}, "container_id"),
    (["teardown", "/run/netns/x"], {"container_id": "c"}, "network"),
])
def test_errors_are_json_with_a_message(argv, body, needle):
    out, status = run(argv, body)
    assert status == 1 and needle in out["error"]


def test_the_executable_prints_json(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cni.netavark", "info"], capture_output=True, timeout=30)
    assert proc.returncode == 0 and json.loads(proc.stdout)["api_version"] == "1.0.0"
    proc = subprocess.run([sys.executable, "-m", "cni.netavark", "create"], input=b"{", capture_output=True, timeout=30)
    assert proc.returncode == 1 and "error" in json.loads(proc.stdout)


@pytest.mark.slow
@needs_root
def test_setup_and_teardown_in_namespaces(netns_factory, tmp_path):
    from flatnet.lab.probe import in_namespace

    host = CniHost.create(netns_factory("wsl"), tmp_path)
    ctr = netns_factory("ctr")
    body = {"container_id": "n" * 64, "container_name": "web", "network": network(tmp_path),
            "network_options": {"interface_name": "eth0"},
            "port_mappings": [{"container_port": 3000, "host_port": 8080, "protocol": "tcp"}]}
    out, status = in_namespace(host.ns.name, lambda: run(["setup", ctr.path], body))
    assert status == 0, out
    block = out["interfaces"]["eth0"]
    assert len(block["mac_address"]) == 17
    assert block["subnets"][0]["ipnet"].startswith("10.87.1.") and block["subnets"][0]["gateway"] == "10.87.1.1"
    (lease,) = host.leases().values()
    assert lease.name == "web" and lease.port_mappings[0]["containerPort"] == 3000
    assert in_namespace(host.ns.name, lambda: run(["teardown", ctr.path], body)) == (None, 0)
    assert in_namespace(host.ns.name, lambda: run(["teardown", ctr.path], body)) == (None, 0)
    assert host.leases() == {} and host.flatnet_links() == []
