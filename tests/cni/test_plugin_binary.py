"""Spec tests: the installed plugin executable driven with env + stdin, with and without the node.

Every command in every version we speak; malformed input; a vanished network namespace; a plugin
SIGKILLed half-way through ADD. After each test nothing may be left: no lease, no veth, no route.
"""

from __future__ import annotations

import ipaddress
import json

import pytest

from cni import spec
from flatnet.testing.markers import needs_root
from tests.cni.harness import CniHost

pytestmark = [pytest.mark.slow, needs_root]


@pytest.fixture(params=["node", "standalone"])
def host(request, netns_factory, tmp_path):
    h = CniHost.create(netns_factory("wsl"), tmp_path)
    if request.param == "node":
        h.start_node()
    yield h
    h.stop_node()


def assert_clean(host):
    assert host.leases() == {}
    assert host.flatnet_links() == []
    assert not [r for r in host.host_routes() if r.startswith("10.87.")]


@pytest.mark.parametrize("version", ["0.3.1", "0.4.0", "1.0.0", "1.1.0"])
def test_add_check_readd_del_del(host, netns_factory, version):
    ctr = netns_factory("ctr")
    conf = host.netconf(version, runtimeConfig={"portMappings": [{"hostPort": 8080, "containerPort": 3000, "protocol": "tcp"}]})
    rc, result = host.call("ADD", conf, "c" * 64, ctr.path)
    assert rc == 0, result
    assert result["cniVersion"] == version
    ip = result["ips"][0]
    assert ip["address"].startswith("10.87.1.") and ip["address"].endswith("/24") and ip["gateway"] == "10.87.1.1"
    assert ("version" in ip) == (version < "1.0.0")
    container_if = result["interfaces"][ip["interface"]]
    assert container_if["name"] == "eth0" and container_if["sandbox"] == ctr.path and len(container_if["mac"]) == 17
    assert {r["dst"] for r in result["routes"]} == {"10.87.0.0/16", "0.0.0.0/0"}
    address = ip["address"].split("/")[0]
    # The container reaches its gateway and the host reaches the container.
    assert ctr.run(["ping", "-c1", "-W2", "10.87.1.1"]).returncode == 0
    assert host.ns.run(["ping", "-c1", "-W2", address]).returncode == 0
    assert f"{address} dev " in "\n".join(host.host_routes())

    if version >= "0.4.0":
        assert host.call("CHECK", {**conf, "prevResult": result}, "c" * 64, ctr.path) == (0, None)
    rc, again = host.call("ADD", conf, "c" * 64, ctr.path)  # a re-run (podman network reload)
    assert rc == 0 and again["ips"] == result["ips"]
    if version >= "0.4.0":
        assert host.call("CHECK", {**conf, "prevResult": again}, "c" * 64, ctr.path) == (0, None)
    assert len(host.leases()) == 1 and len(host.flatnet_links()) == 1

    assert host.call("DEL", {**conf, "prevResult": again}, "c" * 64, ctr.path) == (0, None)
    assert_clean(host)
    assert host.call("DEL", conf, "c" * 64, ctr.path) == (0, None)  # idempotent
    assert host.call("DEL", conf, "c" * 64, "") == (0, None)  # and without a netns
    assert_clean(host)


def test_version_answers_without_config(host):
    rc, out = host.call("VERSION", b'{"cniVersion": "0.4.0"}')
    assert rc == 0 and out == {"cniVersion": "0.4.0", "supportedVersions": list(spec.SUPPORTED_VERSIONS)}
    rc, out = host.call("VERSION", b"")
    assert rc == 0 and out["cniVersion"] == "1.0.0"


def test_malformed_requests_get_the_specs_codes_and_leave_nothing(host, netns_factory):
    ctr = netns_factory("ctr")
    cases = [
        (host.call("ADD", b"{oops", "c1", ctr.path), spec.ERR_DECODE),
        (host.call("ADD", host.netconf("0.2.0"), "c1", ctr.path), spec.ERR_INCOMPATIBLE_VERSION),
        (host.call("ADD", host.netconf(), "c1", ctr.path, drop=("CNI_NETNS",)), spec.ERR_INVALID_ENV),
        (host.call("ADD", host.netconf(), "", ctr.path), spec.ERR_INVALID_ENV),
        (host.call("ADD", host.netconf(subnet="192.168.1.0/24"), "c1", ctr.path), spec.ERR_INVALID_CONFIG),
        (host.call("ADD", host.netconf(), "c1", "/run/netns/does-not-exist"), spec.ERR_CONTAINER_UNKNOWN),
        (host.call("CHECK", host.netconf(), "c1", ctr.path), spec.ERR_CHECK_FAILED),
        (host.call("FROB", host.netconf(), "c1", ctr.path), spec.ERR_INVALID_ENV),
    ]
    for (rc, out), code in cases:
        assert rc == 1
        assert out["code"] == code, out
        assert out["msg"] and out["cniVersion"] in spec.SUPPORTED_VERSIONS
    assert_clean(host)


def test_a_vanished_netns_fails_add_cleanly_and_del_still_cleans(host, netns_factory):
    ctr = netns_factory("ctr")
    conf = host.netconf()
    assert host.call("ADD", conf, "c2", ctr.path)[0] == 0
    ctr.remove()  # the container died without a DEL; its veth went with the namespace
    rc, out = host.call("CHECK", conf, "c2", ctr.path)
    assert rc == 1 and out["code"] in (spec.ERR_CHECK_FAILED, spec.ERR_CONTAINER_UNKNOWN)
    assert host.call("DEL", conf, "c2", ctr.path) == (0, None)
    assert_clean(host)


def test_check_notices_a_missing_route(host, netns_factory):
    ctr = netns_factory("ctr")
    conf = host.netconf()
    rc, result = host.call("ADD", conf, "c3", ctr.path)
    assert rc == 0
    ctr.run(["ip", "route", "del", "10.87.0.0/16"])
    rc, out = host.call("CHECK", {**conf, "prevResult": result}, "c3", ctr.path)
    assert rc == 1 and out["code"] == spec.ERR_CHECK_FAILED and "route" in out["msg"]
    assert host.call("DEL", conf, "c3", ctr.path) == (0, None)
    assert_clean(host)


def test_gc_frees_what_is_not_valid_and_status_is_ready(host, netns_factory):
    conf = host.netconf("1.1.0")
    a, b = netns_factory("a"), netns_factory("b")
    assert host.call("ADD", conf, "keep", a.path)[0] == 0
    assert host.call("ADD", conf, "stale", b.path)[0] == 0
    assert host.call("STATUS", conf) == (0, None)
    valid = {spec.GC_VALID_ATTACHMENTS: [{"containerID": "keep", "ifname": "eth0"}]}
    assert host.call("GC", {**conf, **valid}) == (0, None)
    assert [lease.container_id for lease in host.leases().values()] == ["keep"]
    assert len(host.flatnet_links()) == 1
    assert host.call("GC", {**conf, spec.GC_VALID_ATTACHMENTS: []}) == (0, None)
    assert_clean(host)


def test_status_reports_exhaustion(netns_factory, tmp_path):
    host = CniHost.create(netns_factory("wsl"), tmp_path)
    conf = host.netconf("1.1.0", subnet="10.87.1.0/30")  # one usable address
    ctr = netns_factory("ctr")
    assert host.call("ADD", conf, "only", ctr.path)[0] == 0
    rc, out = host.call("STATUS", conf)
    assert rc == 1 and out["code"] == spec.ERR_PLUGIN_NOT_AVAILABLE
    rc, out = host.call("ADD", conf, "second", netns_factory("ctr2").path)
    assert rc == 1 and out["code"] == spec.ERR_ADDRESSES_EXHAUSTED
    assert host.call("DEL", conf, "only", ctr.path) == (0, None)
    assert host.leases() == {} and host.flatnet_links() == []


@pytest.mark.parametrize("point", ["after-lease", "after-veth"])
def test_sigkill_mid_add_then_del_is_clean(netns_factory, tmp_path, point):
    host = CniHost.create(netns_factory("wsl"), tmp_path)  # standalone: the plugin does the work
    ctr = netns_factory("ctr")
    conf = host.netconf()
    rc, out = host.call("ADD", conf, "victim", ctr.path, extra_env={"FLATNET_CNI_CRASH_POINT": point})
    assert rc == -9 and out is None
    assert len(host.leases()) == 1  # the crash left a lease (and maybe a veth) behind
    assert len(host.flatnet_links()) == (1 if point == "after-veth" else 0)
    assert host.call("DEL", conf, "victim", ctr.path) == (0, None)
    assert host.leases() == {} and host.flatnet_links() == []
    with ctr.ipr() as ip:
        assert [link.get_attr("IFLA_IFNAME") for link in ip.get_links()] == ["lo"]
    # and the address is handed out again afterwards
    rc, result = host.call("ADD", conf, "next", ctr.path)
    assert rc == 0 and ipaddress.IPv4Interface(result["ips"][0]["address"]).ip in ipaddress.IPv4Network("10.87.1.0/24")
    assert host.call("DEL", conf, "next", ctr.path) == (0, None)


def test_node_registers_and_reconciles_after_a_restart(netns_factory, tmp_path):
    host = CniHost.create(netns_factory("wsl"), tmp_path)
    ctr, gone = netns_factory("ctr"), netns_factory("gone")
    conf = host.netconf(runtimeConfig={"portMappings": [{"hostPort": 1, "containerPort": 3000, "protocol": "tcp"}]})
    # Node down: the plugin does ADD itself.
    rc, result = host.call("ADD", conf, "a" * 64, ctr.path, args="IgnoreUnknown=1;K8S_POD_NAME=shop")
    assert rc == 0
    assert host.call("ADD", conf, "b" * 64, gone.path)[0] == 0
    gone.remove()  # this container died while the node was down
    host.start_node()
    try:
        services = host.services(wait_for=1)
        address = result["ips"][0]["address"].split("/")[0]
        assert [(s["name"], s["address"], s["port"]) for s in services] == [("shop", address, 3000)]
        assert [lease.container_id for lease in host.leases().values()] == ["a" * 64]
        assert host.call("DEL", conf, "a" * 64, ctr.path) == (0, None)
        assert host.services(wait_for=0) == []
    finally:
        host.stop_node()
    assert host.leases() == {} and host.flatnet_links() == []


def test_node_answers_cni_requests_with_json_errors(netns_factory, tmp_path):
    host = CniHost.create(netns_factory("wsl"), tmp_path)
    host.start_node()
    try:
        from flatnet.node.control import ControlClient

        answer = ControlClient(host.socket).call("cni", request={"command": "ADD", "config": host.netconf(),
                                                                  "containerId": "x", "netns": "/nope", "ifname": "eth0"})
        assert answer["cniError"]["code"] == spec.ERR_CONTAINER_UNKNOWN
        assert json.loads(json.dumps(answer))
    finally:
        host.stop_node()
