"""The lab's site description is consistent, and renders the rules the docs promise (fast, no root)."""

import ipaddress

from flatnet.lab.network import nft_rulesets
from flatnet.lab.topology import ADMIN_PORT, CONTAINER_SERVICES, DEMO_ONLY_SERVICES, FLATNET_RANGE, OFFICE


def test_every_row_names_a_known_host():
    names = {h.name for h in OFFICE.hosts}
    assert len(names) == len(OFFICE.hosts)
    for link in OFFICE.links:
        assert {link.a, link.b} <= names
    for row in (*OFFICE.routes, *OFFICE.local_addresses, *OFFICE.masquerades, *OFFICE.blocked_ports):
        assert row.host in names
    assert {OFFICE.client, OFFICE.gateway_host, *OFFICE.wsl_hosts} <= names


def test_interface_names_fit_linux_and_are_unique_per_host():
    seen = set()
    for link in OFFICE.links:
        for host, ifname in ((link.a, link.a_if), (link.b, link.b_if)):
            assert len(ifname) <= 15
            assert (host, ifname) not in seen
            seen.add((host, ifname))


def test_each_route_goes_via_a_directly_connected_neighbour():
    for route in OFFICE.routes:
        own = [ipaddress.ip_interface(a) for link in OFFICE.links for h, a in ((link.a, link.a_addr), (link.b, link.b_addr)) if h == route.host]
        assert any(ipaddress.ip_address(route.via) in i.network for i in own), route


def test_windows_host_routes_each_container_subnet_to_its_wsl_vm():
    for wsl, subnet in OFFICE.container_subnets.items():
        assert ipaddress.ip_network(subnet).subnet_of(FLATNET_RANGE)
        vm_address = OFFICE.link_between(OFFICE.gateway_host, wsl).address_of(wsl)
        assert any(r.host == OFFICE.gateway_host and r.dst == subnet and r.via == vm_address for r in OFFICE.routes)


def test_services_live_in_their_hosts_container_subnet():
    for service in (*DEMO_ONLY_SERVICES, *CONTAINER_SERVICES):
        if service.address:
            assert ipaddress.ip_address(service.address) in ipaddress.ip_network(OFFICE.container_subnets[service.host])
            assert any(la.host == service.host and la.addr.startswith(service.address + "/") for la in OFFICE.local_addresses)


def test_nftables_ruleset_masquerades_wsl_traffic_and_guards_the_admin_port():
    rules = nft_rulesets(OFFICE)
    assert set(rules) == {"win"}
    win = rules["win"]
    assert 'ip saddr 172.24.0.0/16 oifname "lan0" masquerade' in win
    assert f'iifname "lan0" tcp dport {ADMIN_PORT} counter drop' in win


def test_rows_for_later_sites_render_nat_kinds_and_udp_blocks():
    """What the NAT-router sites of the lighthouse issue need is rows, not code."""
    from dataclasses import replace

    from flatnet.lab.topology import BlockPort, Host, Link, Masquerade

    site = replace(
        OFFICE,
        hosts=(*OFFICE.hosts, Host("nat1", "a symmetric home router", forwarding=True)),
        links=(*OFFICE.links, Link("nat1", "wan0", "203.0.113.2/24", "win", "inet0", "203.0.113.1/24")),
        masquerades=(*OFFICE.masquerades, Masquerade("nat1", "10.0.0.0/8", "wan0", random_ports=True)),
        blocked_ports=(*OFFICE.blocked_ports, BlockPort("nat1", "wan0", None, "udp", forwarded=True)),
    )
    rules = nft_rulesets(site)
    assert 'ip saddr 10.0.0.0/8 oifname "wan0" masquerade random' in rules["nat1"]
    assert "chain forward" in rules["nat1"] and 'iifname "wan0" meta l4proto udp counter drop' in rules["nat1"]
    assert "chain input" not in rules["nat1"]
