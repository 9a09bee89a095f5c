"""Builds a :class:`~flatnet.lab.topology.Topology` out of namespaces, veths, routes and nftables.

Netlink through :mod:`flatnet.netns` (pyroute2); nftables rulesets are loaded with ``nft -f -``
inside the host's namespace, one table per host (``flatnet_lab``), so removing the namespace removes
the rules with it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

from flatnet.errors import UserError
from flatnet.lab.topology import Topology, namespace_name
from flatnet.netns import Namespace, veth

NFT_TABLE = "flatnet_lab"


def build(topology: Topology, prefix: str, on_namespace: Callable[[str], None]) -> dict[str, Namespace]:
    """Create every host of *topology*; *on_namespace(name)* is called right after each is made."""
    spaces: dict[str, Namespace] = {}
    for host in topology.hosts:
        name = namespace_name(prefix, host.name)
        if len(name) > 40:
            raise UserError(f"namespace name {name!r} is too long: use a shorter --prefix")
        try:
            ns = Namespace.create(name)
        except FileExistsError:
            raise UserError(
                f"network namespace {name} already exists: a lab with prefix {prefix!r} is up "
                f"(run `flatnet lab down --prefix {prefix}` first)"
            ) from None
        on_namespace(name)
        spaces[host.name] = ns
        if host.forwarding:
            ns.set_sysctl("net/ipv4/ip_forward", "1")

    for link in topology.links:
        veth(spaces[link.a], link.a_if, spaces[link.b], link.b_if, mtu=link.mtu)
        spaces[link.a].add_address(link.a_if, link.a_addr)
        spaces[link.b].add_address(link.b_if, link.b_addr)

    for local in topology.local_addresses:
        spaces[local.host].add_address(local.ifname, local.addr)

    for route in topology.routes:
        dst = "0.0.0.0/0" if route.dst == "default" else str(ipaddress.ip_network(route.dst))
        spaces[route.host].add_route(dst, gateway=route.via)

    for host, ruleset in nft_rulesets(topology).items():
        result = spaces[host].run(["nft", "-f", "-"], check=False, input=ruleset)
        if result.returncode != 0:
            raise UserError(f"nftables in {namespace_name(prefix, host)} failed: {result.stderr.strip()}")
    return spaces


def nft_rulesets(topology: Topology) -> dict[str, str]:
    """host -> an nftables ruleset: masquerades (Windows' WSL NAT) and blocked ports (its firewall)."""
    hosts = {m.host for m in topology.masquerades} | {b.host for b in topology.blocked_ports}
    rulesets = {}
    for host in sorted(hosts):
        lines = [f"table ip {NFT_TABLE} {{"]
        nats = [m for m in topology.masquerades if m.host == host]
        if nats:
            lines.append("  chain postrouting {")
            lines.append("    type nat hook postrouting priority srcnat; policy accept;")
            for m in nats:
                mode = " random" if m.random_ports else ""
                lines.append(f'    ip saddr {m.source} oifname "{m.out_if}" masquerade{mode}')
            lines.append("  }")
        blocks = [b for b in topology.blocked_ports if b.host == host]
        for hook in ("input", "forward"):
            rules = [b for b in blocks if b.forwarded == (hook == "forward")]
            if not rules:
                continue
            lines.append(f"  chain {hook} {{")
            lines.append(f"    type filter hook {hook} priority filter; policy accept;")
            for b in rules:
                port = f" dport {b.port}" if b.port is not None else ""
                match = f"{b.protocol}{port}" if port else f"meta l4proto {b.protocol}"
                lines.append(f'    iifname "{b.in_if}" {match} counter drop')
            lines.append("  }")
        lines.append("}")
        rulesets[host] = "\n".join(lines) + "\n"
    return rulesets
