"""``flatnet status`` against a real control server in a tmp dir, serving a real tunnel's status.

The tunnel is the in-memory pair of tests/node/harness.py (real engines and data planes): the
status the CLI prints is the shape the node really answers, not a hand-written dict.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket

import pytest

from flatnet.cli import main
from flatnet.node.cni_service import CniService, Service, ServiceRegistry
from flatnet.node.config import NodeConfig
from flatnet.node.control import ControlServer
from flatnet.node.tunnel_component import TunnelComponent

from .harness import A_IP, B_IP, Pair, frame, icmp_echo, udp


def _node_control(tmp_path, pair: Pair | None, services=()) -> ControlServer:
    """What build_node registers: ping, status (the tunnel component), services (the CNI service)."""
    config = NodeConfig(name="host-a", control_socket=tmp_path / "node.sock")
    control = ControlServer(config.control_socket)

    async def ping(request: dict) -> dict:
        return {"name": config.name, "commands": control.commands}

    control.register("ping", ping)
    registry = ServiceRegistry()
    for service in services:
        registry.put(service)
    CniService(config, registry).register(control)
    if pair is not None:
        tunnel = TunnelComponent(config, clock=lambda: pair.now)
        tunnel.engine, tunnel.dataplane = pair.a.engine, pair.a.dataplane
        tunnel.register(control)
    return control


async def _status(capsys, *argv: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(main, ["status", *argv])
    out, err = capsys.readouterr()
    return code, out, err


async def test_status_shows_peers_drops_and_services(tmp_path, capsys):
    pair = Pair()
    pair.establish()
    pair.a.tun.inject(frame(icmp_echo(A_IP, B_IP, seq=2)))
    pair.a.tun.inject(frame(udp("10.87.9.9", B_IP, 1, 2, b"not ours")))  # dropped: source not local
    pair.run()
    pair.advance(12.5)
    web = Service("c1", "web", ipaddress.ip_address("10.87.1.2"), 80)
    control = _node_control(tmp_path, pair, [web])
    await control.start()
    try:
        code, out, err = await _status(capsys, "--socket", str(tmp_path / "node.sock"))
        assert code == 0, err
        lines = out.splitlines()
        assert lines[0] == "flatnet-node host-a"
        peer = next(line for line in lines if line.startswith(B_IP))
        assert "host-b" in peer and " yes " in peer and "192.168.87.2:4242" in peer
        assert "12 s ago" in peer  # handshake age on the node's clock
        counted = pair.a.engine.peers[ipaddress.ip_address(B_IP)]
        assert 0 < counted.rx_bytes < 1000 and 0 < counted.tx_bytes < 1000
        assert peer.split()[-4:] == [str(counted.rx_bytes), "B", str(counted.tx_bytes), "B"]  # in, out
        assert any(line.split() == ["tun_source_not_local", "1"] for line in lines)
        assert any(line.split() == ["web", "10.87.1.2:80"] for line in lines)

        code, out, _ = await _status(capsys, "--socket", str(tmp_path / "node.sock"), "--json")
        answer = json.loads(out)
        assert code == 0 and answer["name"] == "host-a" and answer["running"] is True
        assert answer["peers"][B_IP]["up"] is True and answer["drops"]["tun_source_not_local"] == 1
        assert answer["services"] == [{"containerId": "c1", "name": "web", "address": "10.87.1.2", "port": 80,
                                       "expose": True}]  # fmt: skip
    finally:
        await control.close()


async def test_a_node_without_the_tunnel_says_so(tmp_path, capsys):
    control = _node_control(tmp_path, None)
    await control.start()
    try:
        code, out, _ = await _status(capsys, "--socket", str(tmp_path / "node.sock"))
    finally:
        await control.close()
    assert code == 0
    assert "tunnel: off (no certificate" in out and "(none)" in out


async def test_a_peer_never_reached_shows_pending_and_no_traffic(tmp_path, capsys):
    pair = Pair()
    pair.a.engine.learn_routes(pair.now)  # the initiation is never delivered: the pair is not run
    control = _node_control(tmp_path, pair)
    await control.start()
    try:
        code, out, _ = await _status(capsys, "--socket", str(tmp_path / "node.sock"))
    finally:
        await control.close()
    peer = next(line for line in out.splitlines() if line.startswith(B_IP))
    assert code == 0 and " no " in peer and "pending" in peer


def test_no_node_running_is_a_clear_error(tmp_path, capsys):
    assert main(["status", "--socket", str(tmp_path / "nothing.sock")]) == 1
    assert "flatnet-node is not running: no control socket at" in capsys.readouterr().err
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(stale))  # bound, never listening: what a node that died leaves
    assert main(["status", "--socket", str(stale)]) == 1
    assert "nothing listens on" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--config", "node.toml"]])
def test_socket_taken_from_the_node_config(tmp_path, capsys, argv):
    (tmp_path / "node.toml").write_text(f'name = "x"\ncontrol_socket = "{tmp_path / "x.sock"}"\n')
    assert main(["status", "--config", str(tmp_path / argv[1])]) == 1
    assert str(tmp_path / "x.sock") in capsys.readouterr().err
