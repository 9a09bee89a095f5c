"""plan_reload: every kind of config change, one at a time and together (sans-I/O, no node)."""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path

import pytest

from flatnet.firewall import FirewallConfig, FirewallRuleConfig
from flatnet.node.config import (
    CniConfig,
    GatewayPushConfig,
    LighthouseHost,
    NodeConfig,
    NodeLighthouseConfig,
    PkiConfig,
    StaticPeer,
    TunnelConfig,
)
from flatnet.node.reload import changed_files, plan_reload, referenced_files

B = StaticPeer(ipaddress.IPv4Address("10.87.2.1"), ["192.168.87.2:4242"])
C = StaticPeer(ipaddress.IPv4Address("10.87.3.1"), ["192.168.87.3:4242"])
BASE = NodeConfig(
    name="host-a",
    pki=PkiConfig(ca=Path("/etc/flatnet/ca.crt"), cert=Path("/etc/flatnet/a.crt"), key=Path("/etc/flatnet/a.key")),
    peers=[B],
    gateway=GatewayPushConfig(admin_url="http://127.0.0.1:8081", token_file=Path("/etc/flatnet/gw.token")),
)


def with_(config: NodeConfig = BASE, **changes) -> NodeConfig:
    return dataclasses.replace(config, **changes)


def test_same_config_plans_nothing():
    plan = plan_reload(BASE, with_())
    assert plan.empty and not plan.tunnel_changed
    assert plan.changes == [] and plan.needs_restart == ()
    assert plan.config == BASE


def test_blocklist_change_rebuilds_trust_only():
    new = with_(pki=dataclasses.replace(BASE.pki, blocklist=["ab" * 32]))
    plan = plan_reload(BASE, new)
    assert plan.trust and not plan.identity
    assert plan.firewall is None and plan.gateway is None and not plan.peers_added
    assert plan.tunnel_changed and plan.config == new


def test_ca_path_or_contents_change_rebuilds_trust():
    assert plan_reload(BASE, with_(pki=dataclasses.replace(BASE.pki, ca=Path("/new/ca.crt")))).trust
    plan = plan_reload(BASE, with_(), changed_files={BASE.pki.ca})
    assert plan.trust and not plan.identity


@pytest.mark.parametrize("field", ["cert", "key"])
def test_own_certificate_or_key_change_means_new_identity(field):
    plan = plan_reload(BASE, with_(pki=dataclasses.replace(BASE.pki, **{field: Path(f"/new/{field}")})))
    assert plan.identity and not plan.trust
    plan = plan_reload(BASE, with_(), changed_files={getattr(BASE.pki, field)})
    assert plan.identity and not plan.trust and "re-handshake" in plan.changes[0]


def test_firewall_change_carries_the_new_rule_set():
    rules = FirewallConfig(inbound=[FirewallRuleConfig(proto="tcp", port="5001")])
    plan = plan_reload(BASE, with_(firewall=rules))
    assert plan.firewall == rules
    assert not plan.trust and not plan.identity and plan.gateway is None
    assert plan.changes == ["firewall: 1 inbound, 1 outbound rules"]


def test_static_peers_added_removed_updated_and_untouched():
    b_moved = StaticPeer(B.ip, ["192.168.99.2:4242"])
    d = StaticPeer(ipaddress.IPv4Address("10.87.4.1"), [])
    old = with_(peers=[B, d])
    plan = plan_reload(old, with_(peers=[b_moved, C]))
    assert plan.peers_added == (C,)
    assert plan.peers_removed == (d.ip,)
    assert plan.peers_updated == (b_moved,)
    # A peer whose entry is identical is in none of the lists: its sessions are left alone.
    plan = plan_reload(with_(peers=[B, C]), with_(peers=[C, B]))
    assert plan.empty


@pytest.mark.parametrize(
    "gateway",
    [
        GatewayPushConfig(admin_url="http://127.0.0.1:9999", token_file=BASE.gateway.token_file),
        GatewayPushConfig(admin_url=BASE.gateway.admin_url, token_file=Path("/other.token")),
        GatewayPushConfig(admin_url=None),
        dataclasses.replace(BASE.gateway, resync_interval=5.0),
    ],
)
def test_gateway_push_settings_change_means_a_new_pusher(gateway):
    plan = plan_reload(BASE, with_(gateway=gateway))
    assert plan.gateway == gateway and not plan.tunnel_changed


def test_rotated_token_contents_mean_a_new_pusher():
    plan = plan_reload(BASE, with_(), changed_files={BASE.gateway.token_file})
    assert plan.gateway == BASE.gateway and not plan.trust and not plan.identity


@pytest.mark.parametrize(
    ("changes", "keys"),
    [
        ({"tunnel": TunnelConfig(listen_port=5555)}, ["tunnel.listen_port"]),
        ({"tunnel": TunnelConfig(tun_name="fn1", mtu=1300)}, ["tunnel.tun_name", "tunnel.mtu"]),
        ({"control_socket": Path("/tmp/other.sock")}, ["control_socket"]),
        ({"name": "host-z"}, ["name"]),
        ({"flatnet_range": ipaddress.IPv4Network("10.88.0.0/16")}, ["flatnet_range"]),
        ({"cni": CniConfig(subnet=ipaddress.IPv4Network("10.87.1.0/24"))}, ["cni.subnet"]),
        ({"lighthouse": NodeLighthouseConfig(hosts=[LighthouseHost(ipaddress.IPv4Address("10.87.255.1"))])},
         ["lighthouse.hosts"]),
    ],
)
def test_restart_only_settings_are_reported_and_kept(changes, keys):
    plan = plan_reload(BASE, with_(**changes))
    assert list(plan.needs_restart) == keys
    assert plan.config == BASE  # the running values stay
    assert plan.changes == [] and not plan.empty


def test_everything_at_once():
    new = with_(
        name="renamed",
        tunnel=TunnelConfig(listen_port=9),
        pki=dataclasses.replace(BASE.pki, blocklist=["cd" * 32]),
        firewall=FirewallConfig(outbound=[]),
        peers=[C],
        gateway=GatewayPushConfig(),
    )
    plan = plan_reload(BASE, new, changed_files={BASE.pki.cert})
    assert plan.trust and plan.identity and plan.firewall == new.firewall
    assert plan.peers_added == (C,) and plan.peers_removed == (B.ip,) and plan.peers_updated == ()
    assert plan.gateway == GatewayPushConfig()
    assert plan.needs_restart == ("name", "tunnel.listen_port")
    # Applied: all but the restart-only values.
    assert plan.config == with_(new, name=BASE.name, tunnel=BASE.tunnel)
    summary = plan.summary()
    assert summary["needs_restart"] == ["name", "tunnel.listen_port"]
    assert len(summary["changes"]) == 6


def test_referenced_files_and_changed_files():
    assert referenced_files(BASE) == (BASE.pki.ca, BASE.pki.cert, BASE.pki.key, BASE.gateway.token_file)
    assert referenced_files(with_(gateway=GatewayPushConfig())) == (BASE.pki.ca, BASE.pki.cert, BASE.pki.key)
    loaded = {Path("/a"): b"1", Path("/b"): b"2", Path("/c"): None}
    current = {Path("/a"): b"1", Path("/b"): b"3", Path("/c"): b"4", Path("/new"): b"5"}
    assert changed_files(loaded, current) == {Path("/b"), Path("/c")}
