"""A static peer's `subnets` route its containers before its certificate is known."""

from __future__ import annotations

import dataclasses
from ipaddress import IPv4Address, IPv4Network

from flatnet.node.config import load_node_config
from flatnet.node.tunnel_component import TunnelComponent
from flatnet.testing.tunnel_pair import write_pki_and_configs


def test_configured_subnets_route_before_the_handshake(tmp_path):
    configs = write_pki_and_configs(tmp_path)
    config = load_node_config(configs["a"])
    [peer] = config.peers
    container = IPv4Address("10.87.2.7")
    engine, _ = TunnelComponent(config)._build_engine()
    assert engine.route(container) is None  # the certificate is not known yet: no route

    hinted = dataclasses.replace(config, peers=[dataclasses.replace(peer, subnets=[IPv4Network("10.87.2.0/24")])])
    engine, _ = TunnelComponent(hinted)._build_engine()
    owner = engine.route(container)
    assert owner is not None and owner.ip == peer.ip
    assert engine.route(IPv4Address("10.87.3.7")) is None


def test_subnets_in_the_file_are_checked_and_name_the_key(tmp_path):
    import pytest

    from flatnet.config import ConfigError

    path = tmp_path / "node.toml"
    path.write_text('name = "x"\n[[peers]]\nip = "10.87.2.1"\nsubnets = ["10.87.2.0/24", "10.87.300.0/24"]\n')
    with pytest.raises(ConfigError) as err:
        load_node_config(path)
    assert "peers[0].subnets[1]" in str(err.value) and str(path) in str(err.value)
