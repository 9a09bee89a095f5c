"""The relay service on loopback: raw UDP and TCP clients, then two real tunnel nodes (PathIO +
TunnelEngine) talking through it, one side over UDP and the other over TCP. The relay must only
ever see tunnel ciphertext."""

from __future__ import annotations

import asyncio
import random
import time
from ipaddress import IPv4Address

import pytest

from flatnet.node.paths import TCP, UDP, PathIO, PathMux
from flatnet.pki.cert import TrustStore
from flatnet.proto.engine import TunnelEngine
from flatnet.proto.events import PacketReceived
from flatnet.proto.relay import (
    TYPE_BIND,
    TYPE_BIND_ACK,
    TYPE_DATA,
    StreamFrameDecoder,
    encode_relay_frame,
    encode_stream_frame,
    mint_relay_token,
    parse_relay_frame,
)
from lighthouse.relay_service import RelayService
from lighthouse.relay_table import RelayTable
from tests.proto.harness import ipv4_packet, make_ca, make_identity

pytestmark = pytest.mark.slow

SECRET = b"relay secret shared with the lighthouse"
SID = bytes.fromhex("0102030405060708")


class RecordingTable(RelayTable):
    """The real table, keeping a copy of every frame it is handed (what the relay can see)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[bytes] = []

    def receive(self, data, addr, now):
        self.seen.append(bytes(data))
        return super().receive(data, addr, now)


async def start_relay(table=None):
    service = RelayService(table or RecordingTable(SECRET), tick_interval=0.2)
    await service.start("127.0.0.1", 0, 0)
    return service


class UdpClient(asyncio.DatagramProtocol):
    def __init__(self):
        self.queue: asyncio.Queue = asyncio.Queue()

    def datagram_received(self, data, addr):
        self.queue.put_nowait(data)


async def udp_client(relay_addr):
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(UdpClient, remote_addr=relay_addr)
    return transport, proto


async def tcp_client(relay_addr):
    reader, writer = await asyncio.open_connection(*relay_addr)
    decoder = StreamFrameDecoder()

    async def read_frame():
        while True:
            frames = decoder.feed(await reader.read(4096))
            if frames:
                return frames[0]

    return reader, writer, read_frame


async def test_udp_and_tcp_clients_exchange_frames_through_one_session():
    service = await start_relay()
    udp, udp_proto = await udp_client(service.udp_address)
    reader, writer, read_frame = await tcp_client(service.tcp_address)
    try:
        udp.sendto(encode_relay_frame(TYPE_BIND, 0, SID, mint_relay_token(SECRET, SID, 0)))
        assert parse_relay_frame(await asyncio.wait_for(udp_proto.queue.get(), 5)).type == TYPE_BIND_ACK
        writer.write(encode_stream_frame(encode_relay_frame(TYPE_BIND, 1, SID, mint_relay_token(SECRET, SID, 1))))
        assert parse_relay_frame(await asyncio.wait_for(read_frame(), 5)).type == TYPE_BIND_ACK
        # UDP -> TCP, and TCP -> UDP, bodies unchanged
        udp.sendto(encode_relay_frame(TYPE_DATA, 0, SID, b"from udp side"))
        frame = parse_relay_frame(await asyncio.wait_for(read_frame(), 5))
        assert (frame.type, frame.side, frame.body) == (TYPE_DATA, 0, b"from udp side")
        writer.write(encode_stream_frame(encode_relay_frame(TYPE_DATA, 1, SID, b"from tcp side")))
        frame = parse_relay_frame(await asyncio.wait_for(udp_proto.queue.get(), 5))
        assert frame.body == b"from tcp side"
        # a bad token binds nothing; garbage is counted, never raised
        udp.sendto(encode_relay_frame(TYPE_BIND, 1, SID, b"\x00" * 16))
        udp.sendto(b"garbage")
        await asyncio.sleep(0.1)
        assert service.table.counters["drop.bad-token"] == 1 and service.table.counters["drop.short"] == 1
        # the TCP side goes away: its binding goes with it
        writer.close()
        await writer.wait_closed()
        for _ in range(50):
            if service.counters["tcp.closed"]:
                break
            await asyncio.sleep(0.02)
        assert service.table.session(SID).addresses[1] is None
        udp.sendto(encode_relay_frame(TYPE_DATA, 0, SID, b"nobody there"))
        await asyncio.sleep(0.1)
        assert service.table.counters["drop.peer-not-bound"] == 1
    finally:
        udp.close()
        writer.close()
        await service.stop()


async def test_a_framing_error_closes_only_that_connection():
    service = await start_relay()
    reader, writer, _ = await tcp_client(service.tcp_address)
    _, writer2, read2 = await tcp_client(service.tcp_address)
    try:
        writer.write(b"\x00\x03abc")  # length 3 < header: the stream cannot be trusted any more
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert service.counters["tcp.framing-error"] == 1
        writer2.write(encode_stream_frame(encode_relay_frame(TYPE_BIND, 0, SID, mint_relay_token(SECRET, SID, 0))))
        assert parse_relay_frame(await asyncio.wait_for(read2(), 5)).type == TYPE_BIND_ACK
    finally:
        writer.close()
        writer2.close()
        await service.stop()



async def test_two_tunnel_nodes_through_the_relay_udp_on_one_side_tcp_on_the_other():
    service = await start_relay()
    ca = make_ca()
    trust = TrustStore([ca[0]])
    nodes = {}
    received = {"alpha": [], "bravo": []}
    for name, ip, seed in (("alpha", "10.87.1.1", 1), ("bravo", "10.87.2.1", 2)):
        cert, key = make_identity(ca, name, ip + "/16")
        engine = TunnelEngine((cert, key), trust, rng=random.Random(seed))
        mux = PathMux(engine, key)

        def on_event(event, name=name):
            if isinstance(event, PacketReceived):
                received[name].append(event.packet)

        nodes[name] = PathIO(mux, on_event, time.time)
    a, b = nodes["alpha"], nodes["bravo"]
    try:
        await a.start("127.0.0.1", 0)
        await b.start("127.0.0.1", 0)
        now = time.time()
        # alpha reaches the relay by UDP, bravo only by TCP (as behind a UDP-blocking firewall)
        a.add_relay_address(UDP, service.udp_address)
        a.mux.add_relay("10.87.2.1", SID, 0, mint_relay_token(SECRET, SID, 0), [(UDP, service.udp_address)], now)
        b.add_relay_address(TCP, service.tcp_address)
        b.mux.add_relay("10.87.1.1", SID, 1, mint_relay_token(SECRET, SID, 1), [(TCP, service.tcp_address)], now)
        for _ in range(100):
            if b._relay_tcp[service.tcp_address].connected and len(service.table) and all(
                service.table.session(SID).addresses
            ):
                break
            b.flush()
            a.flush()
            await asyncio.sleep(0.05)
        assert all(service.table.session(SID).addresses)
        secret_marker = b"PLAINTEXT-MARKER-" * 4
        sent = []
        for i in range(20):
            packet = ipv4_packet("10.87.1.1", "10.87.2.1", secret_marker + b"%04d" % i)
            sent.append(packet)
            a.mux.engine.send_packet(packet, time.time())
            a.flush()
            await asyncio.sleep(0.01)
        for _ in range(100):
            if len(received["bravo"]) == len(sent):
                break
            await asyncio.sleep(0.05)
        assert received["bravo"] == sent
        reply = ipv4_packet("10.87.2.1", "10.87.1.1", secret_marker + b"reply")
        b.mux.engine.send_packet(reply, time.time())
        b.flush()
        for _ in range(100):
            if received["alpha"]:
                break
            await asyncio.sleep(0.05)
        assert received["alpha"] == [reply]
        status_a = a.mux.status(time.time())["10.87.2.1"]
        status_b = b.mux.status(time.time())["10.87.1.1"]
        assert status_a["rung"] == "udp-relay" and status_b["rung"] == "tcp-relay"
        # what the relay saw: frames, many of them DATA, and never a byte of the plaintext
        seen = service.table.seen
        assert sum(1 for f in seen if f[1] == TYPE_DATA) >= 21
        assert not any(secret_marker[:16] in frame for frame in seen)
        assert service.counters["tx.tcp"] > 0 and service.counters["tx.udp"] > 0
        assert IPv4Address("10.87.1.1") in b.mux.peers
    finally:
        await a.stop()
        await b.stop()
        await service.stop()
