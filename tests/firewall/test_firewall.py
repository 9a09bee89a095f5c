"""The group firewall on its own: rules, conntrack for replies, timeouts on a fake clock, config."""

from __future__ import annotations

import ipaddress

import pytest

from flatnet.config import ConfigError, from_dict
from flatnet.firewall import INBOUND, OUTBOUND, Firewall, FirewallConfig, FirewallRuleConfig, PeerIdentity
from flatnet.node.config import NodeConfig

LOCAL = ipaddress.ip_address("10.87.2.5").packed
WEB = PeerIdentity("alice-pc", frozenset({"hosts", "web-admins"}), ipaddress.ip_address("10.87.1.1"))
OTHER = PeerIdentity("bob-pc", frozenset({"hosts"}), ipaddress.ip_address("10.87.3.1"))
TCP, UDP, ICMP = 6, 17, 1


def inbound(fw, peer, proto=TCP, dport=80, sport=40000, now=0.0, remote=None):
    # Anti-spoofing ties an inner source to one peer, so each peer here sends from its own address.
    remote = remote or peer.ip.packed
    return fw.allow(INBOUND, proto, LOCAL, dport, remote, sport, peer, now)


def test_default_allows_everything_within_the_ca():
    fw = Firewall()
    assert inbound(fw, OTHER, UDP, 53) and fw.allow(OUTBOUND, ICMP, LOCAL, 0, OTHER.ip.packed, 0, OTHER, 0.0)


def test_group_port_rule():
    fw = Firewall(FirewallConfig(inbound=[FirewallRuleConfig(proto="tcp", port="80", groups=["web-admins"])]))
    assert inbound(fw, WEB, TCP, 80)
    assert not inbound(fw, OTHER, TCP, 80)
    assert not inbound(fw, WEB, TCP, 81)
    assert not inbound(fw, WEB, UDP, 80)
    assert fw.drops["inbound_no_rule"] == 3


def test_host_cidr_local_cidr_and_port_range():
    rules = [
        FirewallRuleConfig(host="bob-pc", port="8000-8100"),
        FirewallRuleConfig(proto="icmp", cidr="10.87.1.0/24", local_cidr="10.87.2.0/28"),
    ]
    fw = Firewall(FirewallConfig(inbound=rules))
    assert inbound(fw, OTHER, TCP, 8050) and not inbound(fw, OTHER, TCP, 8101) and not inbound(fw, WEB, TCP, 8050)
    assert inbound(fw, WEB, ICMP, 0)
    assert not inbound(fw, WEB, ICMP, 0, remote=ipaddress.ip_address("10.87.9.1").packed)


def test_replies_pass_by_conntrack_until_the_timeout():
    fw = Firewall(FirewallConfig(inbound=[], tcp_timeout=60.0))
    assert not inbound(fw, OTHER, TCP, 40000, sport=80, now=0.0)  # unsolicited
    assert fw.allow(OUTBOUND, TCP, LOCAL, 40000, OTHER.ip.packed, 80, OTHER, 1.0)  # we connect out
    assert inbound(fw, OTHER, TCP, 40000, sport=80, now=30.0)  # the reply
    assert inbound(fw, OTHER, TCP, 40000, sport=80, now=89.0)  # refreshed at 30
    assert not inbound(fw, OTHER, TCP, 40000, sport=80, now=200.0)  # expired
    fw.tick(200.0)
    assert fw.conntrack == {}


def test_non_first_fragments_follow_a_tracked_pair():
    fw = Firewall(FirewallConfig(inbound=[FirewallRuleConfig(proto="udp", port="53")]))
    assert not fw.allow(INBOUND, UDP, LOCAL, 0, OTHER.ip.packed, 0, OTHER, 0.0, first_fragment=False)
    assert inbound(fw, OTHER, UDP, 53)
    assert fw.allow(INBOUND, UDP, LOCAL, 0, OTHER.ip.packed, 0, OTHER, 0.0, first_fragment=False)


def test_conntrack_is_bounded():
    fw = Firewall(FirewallConfig(max_tracked_flows=3))
    assert all(inbound(fw, OTHER, TCP, 80, sport=p) for p in range(3))
    assert not inbound(fw, OTHER, TCP, 80, sport=99)
    assert fw.drops["conntrack_full"] == 1


def test_node_config_firewall_section():
    config = from_dict(
        {"name": "n", "firewall": {"inbound": [{"proto": "tcp", "port": "80", "groups": ["web"]}], "outbound": []}},
        NodeConfig,
    )
    fw = Firewall(config.firewall)
    assert len(fw.inbound) == 1 and fw.outbound == []
    with pytest.raises(ConfigError, match="firewall.inbound"):
        from_dict({"name": "n", "firewall": {"inbound": [{"proto": "sctp"}]}}, NodeConfig, source="node.toml")
    with pytest.raises(ConfigError, match="port"):
        Firewall(FirewallConfig(inbound=[FirewallRuleConfig(port="90-80")]))
