"""The NAT lab: two hosts behind nftables NAT routers, an "internet" namespace with the lighthouse.

Used by the escalation lab tests (``tests/escalation/test_nat_lab.py``) with the test's own
namespaces (``netns_factory``), and usable from a shell. Layout (every box a namespace)::

    host-a 192.168.1.10 ── lan0 router-a wan0 100.64.1.1 ──┐
                         (192.168.1.1)                       ├── internet 100.64.1.254, 100.64.2.254
    host-b 192.168.2.20 ── lan0 router-b wan0 100.64.2.1 ──┘    (lighthouse + relay listen here)

    same_lan=True:  host-b 192.168.3.20 ── lan1 router-a (192.168.3.1): A and B on one routed
                    LAN, no NAT between them (masquerade only towards wan0)

Router behaviours (RFC 4787 vocabulary), all by nftables on the router:

- ``cone``: ``masquerade`` - Linux keeps the source port when it can and reuses the mapping
  for every destination (endpoint-independent mapping); conntrack lets in only replies
  (address-and-port-dependent filtering). Hole punching works.
- ``symmetric``: ``masquerade random`` - a random public port per new flow, so the port a peer
  would punch to is not the one the lighthouse saw (endpoint-dependent mapping). Punching fails.
- ``block_udp(host_ip)``: the router drops every UDP datagram from/to that host (a firewall that
  lets only TCP out); ``unblock_udp`` removes that table again.

Tables: ``flatnet_nat`` (the NAT) and ``flatnet_block`` (the UDP block), one each per router.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from flatnet.netns import Namespace, veth

NAT_TABLE = "flatnet_nat"
BLOCK_TABLE = "flatnet_block"
LIGHTHOUSE_ADDRESS = "100.64.1.254"  # the internet namespace's address the world uses
CONE = "cone"
SYMMETRIC = "symmetric"
NAT_KINDS = (CONE, SYMMETRIC)


def nat_ruleset(wan_if: str, kind: str) -> str:
    if kind not in NAT_KINDS:
        raise ValueError(f"NAT kind must be one of {NAT_KINDS}")
    mode = " random" if kind == SYMMETRIC else ""
    return (
        f"table ip {NAT_TABLE} {{\n"
        "  chain postrouting {\n"
        "    type nat hook postrouting priority srcnat; policy accept;\n"
        f'    oifname "{wan_if}" masquerade{mode}\n'
        "  }\n"
        # A home router's own firewall: nothing unsolicited from the WAN reaches the router itself.
        # Dropped here, such a packet's conntrack entry is never confirmed; accepted (even just to
        # be refused with an ICMP error), it would occupy the very tuple the host behind is about to
        # use for hole punching, and masquerade would then pick another port.
        "  chain input {\n"
        "    type filter hook input priority filter; policy accept;\n"
        f'    iifname "{wan_if}" ct state new drop\n'
        "  }\n"
        "}\n"
    )


def block_udp_ruleset(host_ip: str) -> str:
    return (
        f"table ip {BLOCK_TABLE} {{\n"
        "  chain forward {\n"
        "    type filter hook forward priority filter; policy accept;\n"
        f"    ip saddr {host_ip} meta l4proto udp counter drop\n"
        f"    ip daddr {host_ip} meta l4proto udp counter drop\n"
        "  }\n"
        "}\n"
    )


def _nft(ns: Namespace, ruleset: str) -> None:
    result = ns.run(["nft", "-f", "-"], check=False, input=ruleset)
    if result.returncode != 0:
        raise RuntimeError(f"nft in {ns.name}: {result.stderr.strip()}")


@dataclass
class NatLab:
    internet: Namespace
    router_a: Namespace
    router_b: Namespace | None
    host_a: Namespace
    host_b: Namespace
    a_address: str
    b_address: str
    lighthouse_address: str = LIGHTHOUSE_ADDRESS

    def block_udp(self, which: str = "a") -> None:
        router, ip = (self.router_a, self.a_address) if which == "a" else (self.router_b or self.router_a, self.b_address)
        _nft(router, block_udp_ruleset(ip))

    def unblock_udp(self, which: str = "a") -> None:
        router = self.router_a if which == "a" else (self.router_b or self.router_a)
        router.run(["nft", "delete", "table", "ip", BLOCK_TABLE])

    def readdress_a(self, new_address: str) -> None:
        """Host A's underlay address changes (DHCP gave it another one): the old one goes away."""
        with self.host_a.ipr() as ip:
            index = ip.link_lookup(ifname="u0")[0]
            # (deleting first: a primary address takes its secondaries with it)
            ip.addr("del", index=index, address=self.a_address, prefixlen=24)
            ip.addr("add", index=index, address=new_address, prefixlen=24)
            ip.route("replace", dst="0.0.0.0/0", gateway="192.168.1.1")
        self.a_address = new_address


def build_nat_lab(
    make: Callable[[str], Namespace], nat_a: str = CONE, nat_b: str = CONE, same_lan: bool = False
) -> NatLab:
    """Create the namespaces with *make(role)* (e.g. the tests' ``netns_factory``) and wire them."""
    internet = make("inet")
    router_a = make("ra")
    host_a = make("ha")
    host_b = make("hb")
    internet.set_sysctl("net/ipv4/ip_forward", "1")
    router_a.set_sysctl("net/ipv4/ip_forward", "1")

    veth(internet, "ia", router_a, "wan0")
    internet.add_address("ia", "100.64.1.254/24")
    router_a.add_address("wan0", "100.64.1.1/24")
    router_a.add_route("0.0.0.0/0", gateway="100.64.1.254")

    veth(router_a, "lan0", host_a, "u0")
    router_a.add_address("lan0", "192.168.1.1/24")
    host_a.add_address("u0", "192.168.1.10/24")
    host_a.add_route("0.0.0.0/0", gateway="192.168.1.1")
    _nft(router_a, nat_ruleset("wan0", nat_a))

    router_b = None
    if same_lan:
        veth(router_a, "lan1", host_b, "u0")
        router_a.add_address("lan1", "192.168.3.1/24")
        host_b.add_address("u0", "192.168.3.20/24")
        host_b.add_route("0.0.0.0/0", gateway="192.168.3.1")
        b_address = "192.168.3.20"
    else:
        router_b = make("rb")
        router_b.set_sysctl("net/ipv4/ip_forward", "1")
        veth(internet, "ib", router_b, "wan0")
        internet.add_address("ib", "100.64.2.254/24")
        router_b.add_address("wan0", "100.64.2.1/24")
        router_b.add_route("0.0.0.0/0", gateway="100.64.2.254")
        veth(router_b, "lan0", host_b, "u0")
        router_b.add_address("lan0", "192.168.2.1/24")
        host_b.add_address("u0", "192.168.2.20/24")
        host_b.add_route("0.0.0.0/0", gateway="192.168.2.1")
        _nft(router_b, nat_ruleset("wan0", nat_b))
        b_address = "192.168.2.20"
    return NatLab(internet, router_a, router_b, host_a, host_b, "192.168.1.10", b_address)
