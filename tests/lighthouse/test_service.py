"""The lighthouse service for real: UDP on loopback, the Noise tunnel, certificates from a CA.

Two nodes (a TunnelEngine + LighthouseClient each, on their own loopback sockets) register with a
LighthouseService, one resolves the other and the other is told to punch back; garbage from an
unauthenticated socket and a claim outside a certificate are dropped/refused and counted. Loopback
only; no namespaces needed.
"""

from __future__ import annotations

import asyncio
import socket
import time
from ipaddress import IPv4Address, IPv4Network

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from flatnet.pki.cert import TrustStore, new_ca, sign_host
from flatnet.proto.control import Register, encode_control_message
from flatnet.proto.engine import TunnelEngine
from flatnet.proto.events import ControlReceived
from lighthouse.client import (
    ClientSettings,
    LighthouseClient,
    LighthouseRefused,
    PeerResolved,
    PunchRequested,
)
from lighthouse.config import LighthouseConfig
from lighthouse.core import LighthouseCore
from lighthouse.main import main as lighthouse_main
from lighthouse.service import LighthouseService

pytestmark = pytest.mark.slow

LH_IP = IPv4Address("10.87.255.1")


def make_pki():
    now = int(time.time())
    ca, ca_key = new_ca("test-ca", not_after=now + 86400, not_before=now - 3600)
    trust = TrustStore([ca])

    def identity(name, ip, subnets):
        key = X25519PrivateKey.generate()
        cert = sign_host(
            ca,
            ca_key,
            name,
            ip,
            subnets,
            ["hosts"],
            key.public_key().public_bytes_raw(),
            now - 60,
            now + 3600,
        )
        return cert, key

    return trust, identity


class Node:
    """The I/O a flatnet-node will do for discovery, reduced to what the test needs."""

    def __init__(self, identity, trust, lighthouses):
        """*lighthouses*: {Flatnet IP: underlay address}, or one address for LH_IP."""
        if not isinstance(lighthouses, dict):
            lighthouses = {LH_IP: lighthouses}
        self.lighthouses = lighthouses
        self.engine = TunnelEngine(identity, trust)
        for ip, addr in lighthouses.items():
            self.engine.add_peer(ip, [addr])
        cert = identity[0]
        self.client = LighthouseClient(
            list(lighthouses), cert.ip.ip, cert.subnets, ClientSettings(retry_interval=0.5)
        )
        self.unsent: list[tuple] = []  # (lighthouse, payload) waiting for the tunnel to come up
        self.events: list = []
        self.transport = None

    async def start(self):
        loop = asyncio.get_running_loop()
        node = self

        class Protocol(asyncio.DatagramProtocol):
            def datagram_received(self, data, addr):
                node.engine.receive_datagram(data, addr, time.time())
                node.pump()

        self.transport, _ = await loop.create_datagram_endpoint(Protocol, local_addr=("127.0.0.1", 0))
        self.address = self.transport.get_extra_info("sockname")

    def pump(self):
        now = time.time()
        self.client.tick(now)
        while (event := self.engine.next_event()) is not None:
            if isinstance(event, ControlReceived) and event.peer_ip in self.lighthouses:
                self.client.handle_control(event.payload, event.peer_ip, now)
        self.unsent += [(m.lighthouse, m.payload) for m in self.client.messages_to_send()]
        # A control payload for a lighthouse whose tunnel is not up waits (the engine starts the
        # handshake); the client's own retries cover a lighthouse that never answers.
        self.unsent = [(lh, p) for lh, p in self.unsent if not self.engine.send_control(p, lh, now)][-64:]
        while (event := self.client.next_event()) is not None:
            self.events.append(event)
        for data, addr in self.engine.datagrams_to_send():
            self.transport.sendto(data, addr)

    def close(self):
        self.transport.close()


async def until(predicate, nodes, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        for node in nodes:
            node.engine.handle_timer(time.time())
            node.pump()
        await asyncio.sleep(0.02)


async def test_register_resolve_punch_and_refusals_over_the_real_tunnel():
    trust, identity = make_pki()
    lh_identity = identity("lighthouse", f"{LH_IP}/16", [])
    service = LighthouseService(TunnelEngine(lh_identity, trust), LighthouseCore(), tick_interval=0.1)
    lh_addr = await service.start("127.0.0.1", 0)
    alice = Node(identity("alice", "10.87.1.1/16", ["10.87.1.0/24"]), trust, lh_addr)
    bob = Node(identity("bob", "10.87.2.1/16", ["10.87.2.0/24"]), trust, lh_addr)
    await alice.start()
    await bob.start()
    nodes = [alice, bob]
    intruder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        await until(lambda: len(service.core) == 2, nodes)
        assert service.core.endpoints_of(IPv4Address("10.87.1.1"))[0] == alice.address

        # Bob resolves a container address of Alice's; Alice is told to punch back at Bob.
        assert bob.client.resolve(IPv4Address("10.87.1.7"), time.time()) is None
        await until(lambda: any(isinstance(e, PeerResolved) for e in bob.events), nodes)
        resolved = next(e for e in bob.events if isinstance(e, PeerResolved))
        assert resolved.host_ip == IPv4Address("10.87.1.1") and resolved.endpoints[0] == alice.address
        await until(lambda: any(isinstance(e, PunchRequested) for e in alice.events), nodes)
        punch = next(e for e in alice.events if isinstance(e, PunchRequested))
        assert punch.peer_ip == IPv4Address("10.87.2.1") and punch.endpoints[0] == bob.address

        # An unauthenticated datagram is dropped and counted by the tunnel; the core never sees it.
        core_before = dict(service.core.counters)
        drops_before = sum(service.engine.drops.values())
        intruder.sendto(encode_control_message(Register(IPv4Address("10.87.3.1"))), lh_addr)
        intruder.sendto(b"\x04" + b"\x00" * 40, lh_addr)
        await until(lambda: sum(service.engine.drops.values()) >= drops_before + 2, nodes)
        assert dict(service.core.counters) == core_before

        # Alice cannot claim Bob's subnet, even through her authenticated tunnel.
        claim = Register(IPv4Address("10.87.1.1"), (IPv4Network("10.87.2.0/24"),))
        alice.unsent.append((LH_IP, encode_control_message(claim)))
        alice.pump()
        await until(lambda: any(isinstance(e, LighthouseRefused) for e in alice.events), nodes)
        assert service.core.counters["refused.claim-outside-certificate"] == 1
        refused = next(e for e in alice.events if isinstance(e, LighthouseRefused))
        assert refused.reason == "claim-outside-certificate"
        reply = bob.client.resolve(IPv4Address("10.87.2.9"), time.time())  # still Bob's
        await until(lambda: sum(isinstance(e, PeerResolved) for e in bob.events) >= 2, nodes)
        assert reply is None and bob.events[-1].host_ip == IPv4Address("10.87.2.1")
        assert service.status()["nodes"] == 2
    finally:
        intruder.close()
        alice.close()
        bob.close()
        await service.stop()


def test_main_reports_config_errors_without_a_traceback(tmp_path, capsys):
    bad = tmp_path / "lighthouse.toml"
    bad.write_text("listen_port = 70000\n")
    assert lighthouse_main(["--config", str(bad)]) == 2
    assert "listen_port" in capsys.readouterr().err
    missing = tmp_path / "pki.toml"
    missing.write_text(f'[pki]\nca = "{tmp_path}/nope.crt"\n')
    assert lighthouse_main(["--config", str(missing)]) == 2
    assert LighthouseConfig().listen_port == 4242


async def test_flatnet_lighthouse_process_serves_a_node_and_stops_cleanly(tmp_path):
    import subprocess
    import sys

    from flatnet.pki.files import write_certificate, write_host_key

    now = int(time.time())
    ca, ca_key = new_ca("test-ca", not_after=now + 86400, not_before=now - 3600)
    write_certificate(tmp_path / "ca.crt", ca)
    identities = {}
    for name, ip, subnets in (("lighthouse", f"{LH_IP}/16", []), ("alice", "10.87.1.1/16", ["10.87.1.0/24"])):
        key = X25519PrivateKey.generate()
        cert = sign_host(
            ca,
            ca_key,
            name,
            ip,
            subnets,
            ["hosts"],
            key.public_key().public_bytes_raw(),
            now - 60,
            now + 3600,
        )
        identities[name] = (cert, key)
    write_certificate(tmp_path / "lh.crt", identities["lighthouse"][0])
    write_host_key(tmp_path / "lh.key", identities["lighthouse"][1])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:  # a free loopback port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = tmp_path / "lighthouse.toml"
    config.write_text(
        f'listen_host = "127.0.0.1"\nlisten_port = {port}\n'
        f'[pki]\nca = "{tmp_path}/ca.crt"\ncert = "{tmp_path}/lh.crt"\nkey = "{tmp_path}/lh.key"\n'
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "lighthouse.main", "--config", str(config)], stderr=subprocess.PIPE, text=True
    )
    alice = Node(identities["alice"], TrustStore([ca]), ("127.0.0.1", port))
    await alice.start()
    try:
        await until(lambda: alice.client.lighthouse_status()[LH_IP][0] is not None, [alice], timeout=20.0)
        assert alice.client.lighthouse_status()[LH_IP][1] == alice.address  # what the lighthouse observed
    finally:
        alice.close()
        process.terminate()
        _, stderr = process.communicate(timeout=10)
    assert process.returncode == 0, stderr


async def test_a_second_lighthouse_keeps_discovery_going_when_the_first_is_killed():
    trust, identity = make_pki()
    lh_ips = [IPv4Address("10.87.255.1"), IPv4Address("10.87.255.2")]
    services = [
        LighthouseService(
            TunnelEngine(identity(f"lh{i}", f"{ip}/16", []), trust), LighthouseCore(), tick_interval=0.1
        )
        for i, ip in enumerate(lh_ips)
    ]
    addrs = {ip: await service.start("127.0.0.1", 0) for ip, service in zip(lh_ips, services, strict=True)}
    alice = Node(identity("alice", "10.87.1.1/16", ["10.87.1.0/24"]), trust, addrs)
    bob = Node(identity("bob", "10.87.2.1/16", ["10.87.2.0/24"]), trust, addrs)
    carol = Node(identity("carol", "10.87.3.1/16", ["10.87.3.0/24"]), trust, addrs)
    nodes = [alice, bob, carol]
    for node in nodes:
        await node.start()
    try:
        await until(lambda: all(len(s.core) == 3 for s in services), nodes)
        await services[0].stop()  # lighthouse 1 dies
        for node in (bob, carol):  # new peers are still found, through lighthouse 2
            node.client.resolve(IPv4Address("10.87.1.9"), time.time())
        await until(
            lambda: all(any(isinstance(e, PeerResolved) for e in n.events) for n in (bob, carol)), nodes
        )
        for node in (bob, carol):
            resolved = next(e for e in node.events if isinstance(e, PeerResolved))
            assert resolved.lighthouse == lh_ips[1] and resolved.endpoints[0] == alice.address
        assert services[1].core.counters["punch.sent"] == 2
    finally:
        for node in nodes:
            node.close()
        for service in services:
            await service.stop()
