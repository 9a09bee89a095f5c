"""End to end with real Podman (runc, CNI backend, an image made offline), the node and the gateway.

`podman run --network flatnet` in the WSL host namespace; a LAN client gets the page through the
gateway at /<name>/; stopping and removing the container takes the route away and frees the address.
"""

from __future__ import annotations

import concurrent.futures
import contextlib

import pytest

from flatnet.podman import IMAGE
from flatnet.testing.markers import needs_root, require_tools
from tests.cni import podman_site

pytestmark = [pytest.mark.slow, needs_root, require_tools("podman", "runc", "nginx", "busybox")]

HTTPD = ["httpd", "-f", "-p", "80", "-h", "/www"]


@pytest.fixture
def site(netns_factory):
    with contextlib.closing(podman_site.build(netns_factory)) as gen:
        yield next(gen)


def assert_no_flatnet_state(site):
    assert site.host.leases() == {}
    assert site.host.flatnet_links() == []
    assert not [r for r in site.host.host_routes() if r.startswith("10.87.")]


def test_web_is_reached_through_the_gateway_and_goes_away_on_stop(site):
    site.run("run", "-d", "--network", "flatnet", "--name", "web", IMAGE, *HTTPD)
    address = site.run("inspect", "--format", "{{.NetworkSettings.Networks.flatnet.IPAddress}}", "web").stdout.strip()
    assert address.startswith("10.87.1.")
    assert site.wsl_get(address)[0] == 200
    site.wait_for(lambda: site.lan_status("/web/") == 200, what="the route to web at the gateway")
    status, body = site.lan_get("/web/")
    assert status == 200 and b"hello from a flatnet container" in body
    assert site.admin_routes()["web"].backends == (f"{address}:80",)
    assert [lease.name for lease in site.host.leases().values()] == ["web"]

    site.run("stop", "--time", "0", "web")
    site.wait_for(lambda: "web" not in site.admin_routes(), what="the route to be withdrawn")
    assert site.lan_status("/web/") != 200
    assert_no_flatnet_state(site)  # stop already ran DEL: address, veth and route are gone
    site.run("rm", "web")
    assert_no_flatnet_state(site)


def test_labels_set_port_and_name_and_opt_out(site):
    site.run("run", "-d", "--network", "flatnet", "--name", "web-3000", "--label", "flatnet.port=3000",
             "--label", "flatnet.name=shop", IMAGE, "httpd", "-f", "-p", "3000", "-h", "/www")
    site.run("run", "-d", "--network", "flatnet", "--name", "hidden", "--label", "flatnet.expose=false", IMAGE, *HTTPD)
    site.run("run", "-d", "--network", "flatnet", "--name", "mapped", "-p", "18080:8081", IMAGE,
             "httpd", "-f", "-p", "8081", "-h", "/www")
    site.wait_for(lambda: site.lan_status("/shop/") == 200, what="the route named by the label")
    site.wait_for(lambda: site.lan_status("/mapped/") == 200, what="the route on the mapped port")
    routes = site.admin_routes()
    assert routes["shop"].backends[0].endswith(":3000")
    assert routes["mapped"].backends[0].endswith(":8081")
    assert "hidden" not in routes and "web-3000" not in routes
    services = {s["name"]: s for s in site.host.services(wait_for=3)}
    assert services["hidden"]["expose"] is False


def test_twenty_containers_in_parallel_leave_nothing_behind(site):
    names = [f"par{i}" for i in range(20)]

    def start(name):
        return site.run("run", "-d", "--network", "flatnet", "--name", name, IMAGE, *HTTPD).returncode

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert list(pool.map(start, names)) == [0] * 20
    leases = site.host.leases()
    assert len(leases) == 20 and sorted(lease.name for lease in leases.values()) == sorted(names)
    addresses = [site.run("inspect", "--format", "{{.NetworkSettings.Networks.flatnet.IPAddress}}", n).stdout.strip()
                 for n in names]
    assert len(set(addresses)) == 20 and {str(a) for a in leases} == set(addresses)
    assert len(site.host.flatnet_links()) == 20
    site.wait_for(lambda: set(names) <= set(site.admin_routes()), what="20 routes at the gateway")
    for address in addresses[:3]:
        assert site.wsl_get(address)[0] == 200

    # A `podman network reload`-style re-run keeps every container's address and reachability.
    site.run("network", "reload", "--all")
    assert {str(a) for a in site.host.leases()} == set(addresses)
    assert site.wsl_get(addresses[0])[0] == 200

    def remove(name):
        return site.run("rm", "--force", "--time", "0", name).returncode

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert list(pool.map(remove, names)) == [0] * 20
    assert_no_flatnet_state(site)
    site.wait_for(lambda: not set(names) & set(site.admin_routes()), what="all routes withdrawn")


def test_node_down_add_still_works_and_the_node_publishes_it_when_it_starts(site):
    site.host.stop_node()
    site.run("run", "-d", "--network", "flatnet", "--name", "early", "--label", "flatnet.name=early-bird", IMAGE, *HTTPD)
    address = site.run("inspect", "--format", "{{.NetworkSettings.Networks.flatnet.IPAddress}}", "early").stdout.strip()
    assert site.wsl_get(address)[0] == 200  # the plugin did the work itself
    assert "early-bird" not in site.admin_routes()
    site.host.start_node(gateway_url=f"http://{podman_site.GATEWAY_WSL}:8081", token_file=site.token_file)
    site.wait_for(lambda: site.lan_status("/early-bird/") == 200, what="the node to publish the container")
    site.run("rm", "--force", "--time", "0", "early")
    site.wait_for(lambda: "early-bird" not in site.admin_routes(), what="the route to be withdrawn")
    assert_no_flatnet_state(site)
