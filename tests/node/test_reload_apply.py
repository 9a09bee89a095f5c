"""A reload carried out, in memory: the tunnel component's prepare/apply against two real engines
(harness Pair, fake clock) and flatnet-node's Node.reload with a config file and a fake gateway."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress

import pytest

from flatnet.config import ConfigError
from flatnet.firewall import FirewallConfig, FirewallRuleConfig
from flatnet.node import main as node_main
from flatnet.node.config import NodeConfig, PkiConfig, StaticPeer, load_node_config
from flatnet.node.reload import plan_reload
from flatnet.node.tunnel_component import TunnelComponent
from flatnet.pki.cert import sign_host
from flatnet.pki.files import write_certificate, write_host_key
from flatnet.proto.events import PeerDown

from .harness import A_IP, B_IP, FAR, Pair, finished_packets, frame, icmp_echo, tcp

C_IP = "10.87.3.1"


def _component_for_a(pair: Pair, tmp_path, **config) -> tuple[TunnelComponent, NodeConfig]:
    """Side a of *pair* as a TunnelComponent whose [pki] files hold a's identity and the pair's CA."""
    write_certificate(tmp_path / "ca.crt", pair.ca[0], force=True)
    write_certificate(tmp_path / "a.crt", pair.a.engine.certificate, force=True)
    write_host_key(tmp_path / "a.key", pair.a.engine._static_key, force=True)
    pki = PkiConfig(ca=tmp_path / "ca.crt", cert=tmp_path / "a.crt", key=tmp_path / "a.key")
    cfg = NodeConfig(name="host-a", pki=pki,
                     peers=[StaticPeer(ipaddress.IPv4Address(B_IP), ["192.168.87.2:4242"])], **config)
    component = TunnelComponent(cfg, clock=lambda: pair.now)
    component.engine, component.dataplane = pair.a.engine, pair.a.dataplane
    return component, cfg


def _reload(component: TunnelComponent, old: NodeConfig, new: NodeConfig, changed=frozenset()) -> list[str]:
    apply = component.prepare_reload(plan_reload(old, new, changed))
    assert apply is not None
    return apply()


def _tcp_exchange(pair: Pair, sport: int, dport: int) -> bool:
    """One data segment a -> b on an existing flow; True if b's TUN got it."""
    pair.b.tun.written.clear()
    pair.a.tun.inject(frame(tcp(A_IP, B_IP, sport, dport, 1000, b"x" * 100, flags=0x18)))
    pair.run()
    return bool(pair.b.tun.written)


def test_blocklist_reload_cuts_the_blocked_peer_only_when_it_is_blocked(tmp_path):
    pair = Pair()
    pair.establish()
    component, old = _component_for_a(pair, tmp_path)
    session = pair.a.engine.session_for(ipaddress.ip_address(B_IP), pair.now)
    # An unrelated fingerprint: the session stays, the very same object.
    new = dataclasses.replace(old, pki=dataclasses.replace(old.pki, blocklist=["00" * 32]))
    done = _reload(component, old, new)
    assert "cut off: none" in done[-1]
    assert pair.a.engine.session_for(ipaddress.ip_address(B_IP), pair.now) is session
    # b's fingerprint: b is cut off at once and cannot handshake back.
    blocked = dataclasses.replace(new, pki=dataclasses.replace(new.pki, blocklist=[pair.b.engine.certificate.fingerprint_hex()]))
    done = _reload(component, new, blocked)
    assert B_IP in done[-1]
    assert pair.a.engine.session_for(ipaddress.ip_address(B_IP), pair.now) is None
    events = []
    while (event := pair.a.engine.next_event()) is not None:
        events.append(event)
    assert PeerDown(ipaddress.IPv4Address(B_IP), "revoked") in events
    pair.b.tun.inject(frame(icmp_echo(B_IP, A_IP)))
    pair.advance(6)  # b's session died on a's side; b re-handshakes and is refused
    pair.advance(6)
    assert pair.a.engine.session_for(ipaddress.ip_address(B_IP), pair.now) is None
    assert not pair.a.tun.written


def test_firewall_swap_keeps_allowed_flows_and_forgets_the_others(tmp_path):
    pair = Pair()
    pair.establish()
    component, old = _component_for_a(pair, tmp_path)
    # b's firewall is what matters for a -> b traffic: give b a component too (only its dataplane is used).
    component_b = TunnelComponent(old, clock=lambda: pair.now)
    component_b.engine, component_b.dataplane = pair.b.engine, pair.b.dataplane
    assert _tcp_exchange(pair, 40001, 5001) and _tcp_exchange(pair, 40002, 5002)
    narrowed = dataclasses.replace(old, firewall=FirewallConfig(
        inbound=[FirewallRuleConfig(proto="tcp", port="5001"), FirewallRuleConfig(proto="icmp")]))
    done = _reload(component_b, old, narrowed)
    assert "1 tracked flows no longer allowed" in done[-1]
    assert _tcp_exchange(pair, 40001, 5001)  # the allowed stream carries on
    assert not _tcp_exchange(pair, 40002, 5002)  # its tracked flow is gone: the new rules apply
    assert not _tcp_exchange(pair, 40003, 5003)  # a new connection to a port now closed
    assert pair.b.dataplane.drops["firewall_inbound"] == 2
    # A bad rule refuses the whole reload, naming the key; the rules in force do not change.
    bad = dataclasses.replace(narrowed, firewall=FirewallConfig(inbound=[FirewallRuleConfig(port="80-70")]))
    with pytest.raises(ConfigError, match=r"firewall.inbound\[0\].port"):
        component_b.prepare_reload(plan_reload(narrowed, bad))
    assert len(pair.b.dataplane.firewall.inbound) == 2 and _tcp_exchange(pair, 40001, 5001)


def test_static_peers_added_and_removed_leave_the_others_alone(tmp_path):
    pair = Pair()
    pair.establish()
    component, old = _component_for_a(pair, tmp_path)
    session = pair.a.engine.session_for(ipaddress.ip_address(B_IP), pair.now)
    with_c = dataclasses.replace(old, peers=[*old.peers, StaticPeer(ipaddress.IPv4Address(C_IP), ["192.168.87.3:4242"])])
    _reload(component, old, with_c)
    assert ipaddress.IPv4Address(C_IP) in pair.a.engine.peers
    assert pair.a.engine.route(ipaddress.ip_address(C_IP)) is not None  # packets to C now go to the tunnel
    assert pair.a.engine.session_for(ipaddress.ip_address(B_IP), pair.now) is session
    without_b = dataclasses.replace(with_c, peers=with_c.peers[1:])
    _reload(component, with_c, without_b)
    assert ipaddress.IPv4Address(B_IP) not in pair.a.engine.peers
    assert pair.a.engine.route(ipaddress.ip_address(B_IP)) is None
    # The own address as a peer is refused before anything changes.
    own = dataclasses.replace(without_b, peers=[StaticPeer(ipaddress.IPv4Address(A_IP), [])])
    with pytest.raises(ConfigError, match="peers.ip"):
        component.prepare_reload(plan_reload(without_b, own))
    assert ipaddress.IPv4Address(C_IP) in pair.a.engine.peers


def test_new_own_certificate_rehandshakes_and_traffic_continues(tmp_path):
    pair = Pair()
    pair.establish()
    component, old = _component_for_a(pair, tmp_path)
    first = pair.a.engine.session_for(ipaddress.ip_address(B_IP), pair.now)
    cert = pair.a.engine.certificate
    renewed = sign_host(pair.ca[0], pair.ca[1], cert.name, f"{A_IP}/16", list(cert.subnets), ["hosts", "renewed"],
                        cert.public_key, 0, FAR)
    write_certificate(tmp_path / "a.crt", renewed, force=True)
    done = _reload(component, old, old, changed={old.pki.cert})
    assert "re-handshaking 1 peers" in done[0]
    pair.run()
    second = pair.a.engine.session_for(ipaddress.ip_address(B_IP), pair.now)
    assert second is not None and second is not first
    assert pair.b.engine.peers[ipaddress.IPv4Address(A_IP)].up
    ping = icmp_echo(A_IP, B_IP, seq=9)
    pair.b.tun.written.clear()
    pair.a.tun.inject(frame(ping))
    pair.run()
    assert finished_packets(pair.b.tun.written) == [ping]
    # A certificate for another address needs a restart: refused, nothing changes.
    moved = sign_host(pair.ca[0], pair.ca[1], cert.name, "10.87.9.1/16", ["10.87.9.0/24"], ["hosts"],
                      cert.public_key, 0, FAR)
    write_certificate(tmp_path / "a.crt", moved, force=True)
    with pytest.raises(ConfigError, match="pki.cert.*needs a restart"):
        component.prepare_reload(plan_reload(old, old, {old.pki.cert}))
    assert pair.a.engine.certificate == renewed


# ---- flatnet-node's Node.reload: the config file, the control command, the gateway pusher -----

class FakeAdmin:
    made: list[FakeAdmin] = []

    def __init__(self, url: str, token: str) -> None:
        self.url, self.token, self.syncs, self.closed = url, token, [], False
        FakeAdmin.made.append(self)

    async def sync(self, owner, generation, routes):
        self.syncs.append((owner, generation, routes))

    async def upsert(self, route):
        pass

    async def delete(self, name):
        pass

    async def close(self):
        self.closed = True


def _write_config(path, token_file, url="http://127.0.0.1:8081", extra=""):
    path.write_text(
        f'name = "host-a"\ncontrol_socket = "{path.parent}/node.sock"\n'
        f'[pki]\ncert = "{path.parent}/missing.crt"\n'
        f'[gateway]\nadmin_url = "{url}"\ntoken_file = "{token_file}"\n{extra}'
    )


async def _wait_for(predicate, timeout=5.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


@pytest.mark.asyncio
async def test_node_reload_token_rotation_bad_config_and_restart_only_keys(tmp_path, monkeypatch):
    monkeypatch.setattr(node_main, "GatewayAdminAdapter", FakeAdmin)
    FakeAdmin.made.clear()
    token, config_path = tmp_path / "gw.token", tmp_path / "node.toml"
    token.write_text("first\n")
    _write_config(config_path, token)
    config = load_node_config(config_path)
    node = node_main.build_node(config)
    node.config_path = config_path
    node.loaded_files = node_main.file_digests(config)
    node_main.register_reload(node)
    await node.start()
    try:
        await _wait_for(lambda: FakeAdmin.made[0].syncs)
        # Nothing changed: nothing done.
        assert (await node.reload()).empty
        # The token file rotated under the same path: a new client, a full sync with the new token.
        token.write_text("second\n")
        plan = await node.reload()
        assert plan.gateway is not None and plan.changes == ["gateway: push to http://127.0.0.1:8081 (full resync)"]
        await _wait_for(lambda: len(FakeAdmin.made) == 2 and FakeAdmin.made[1].syncs)
        assert FakeAdmin.made[0].closed and FakeAdmin.made[1].token == "second"
        assert node.pusher is not None and node.pusher.client is FakeAdmin.made[1]
        # A broken config: refused with file and key, nothing changes (the control answer says so).
        _write_config(config_path, token, extra="resync_interval = -1\n")
        answer = await node.control.dispatch(b'{"cmd": "reload"}\n')
        assert answer["ok"] is False and answer["code"] == 400
        assert str(config_path) in answer["error"] and "resync_interval" in answer["error"]
        assert len(FakeAdmin.made) == 2 and node.reloads["failed"] == 1
        # A restart-only key: reported, left as it was; the rest applies.
        _write_config(config_path, token, url="http://127.0.0.1:9999", extra="[tunnel]\nlisten_port = 5555\n")
        answer = await node.control.dispatch(b'{"cmd": "reload"}\n')
        assert answer["ok"] is True and answer["needs_restart"] == ["tunnel.listen_port"]
        assert node.config.tunnel.listen_port == 4242 and node.config.gateway.admin_url == "http://127.0.0.1:9999"
        await _wait_for(lambda: len(FakeAdmin.made) == 3 and FakeAdmin.made[2].syncs)
        assert node.reloads["ok"] == 3
    finally:
        await node.stop()
    assert FakeAdmin.made[2].closed


def test_reload_cli_prints_changes_and_refusals(tmp_path, capsys, monkeypatch):
    from flatnet import cli
    from flatnet.node.control import ControlClient, ControlError

    answers = iter([{"changes": ["firewall: 2 inbound, 1 outbound rules"], "needs_restart": ["tunnel.listen_port"]},
                    ControlError(400, "node.toml: key 'firewall.inbound[0].port': bad")])

    def call(self, cmd, **kw):
        assert cmd == "reload" and self.path == str(tmp_path / "s.sock")
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(ControlClient, "call", call)
    assert cli.main(["reload", "--socket", str(tmp_path / "s.sock")]) == 0
    out = capsys.readouterr().out
    assert "changed: firewall: 2 inbound" in out and "needs restart (left as it was): tunnel.listen_port" in out
    assert cli.main(["reload", "--socket", str(tmp_path / "s.sock")]) == 1
    assert "reload refused, nothing changed: node.toml: key 'firewall.inbound[0].port'" in capsys.readouterr().err


@pytest.mark.asyncio
async def test_node_reload_starts_pushing_when_a_gateway_is_configured_later(tmp_path, monkeypatch):
    monkeypatch.setattr(node_main, "GatewayAdminAdapter", FakeAdmin)
    FakeAdmin.made.clear()
    config_path = tmp_path / "node.toml"
    config_path.write_text(f'name = "host-a"\ncontrol_socket = "{tmp_path}/node.sock"\n'
                           f'[pki]\ncert = "{tmp_path}/missing.crt"\n')
    node = node_main.build_node(load_node_config(config_path))
    node.config_path = config_path
    await node.start()
    try:
        assert node.pusher is None
        # A token file that does not exist: refused, naming the file and key; still no pusher.
        _write_config(config_path, tmp_path / "nope.token")
        with pytest.raises(ConfigError, match=rf"{config_path}: key 'gateway.token_file'"):
            await node.reload()
        assert node.pusher is None and not FakeAdmin.made
        (tmp_path / "nope.token").write_text("t0k3n")
        plan = await node.reload()
        assert plan.gateway is not None
        await _wait_for(lambda: FakeAdmin.made and FakeAdmin.made[0].syncs)
        assert FakeAdmin.made[0].token == "t0k3n" and node.pusher is not None
    finally:
        await node.stop()
    assert FakeAdmin.made[0].closed
