"""A malicious-but-certified peer for the real anti-spoofing test: it handshakes with a node over
real UDP using a valid certificate, then sends one DATA_BATCH holding a UDP packet from a source
its certificate does not allow and one from its own address.

    python -m flatnet.testing.spoof_sender --config a.toml --spoof 10.87.3.7 --to 10.87.2.1:9999
"""

from __future__ import annotations

import argparse
import ipaddress
import select
import socket
import struct
import sys
import time

from flatnet.node import packet as P
from flatnet.node.config import load_node_config
from flatnet.node.tunnel_component import TunnelComponent
from flatnet.proto import batch as B


def udp_packet(src: str, dst: str, dport: int, payload: bytes) -> bytes:
    body = struct.pack("!HHHH", 5555, dport, 8 + len(payload), 0) + payload
    pkt = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), 0, 0x4000, 64, 17, 0,
                                ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed) + body)
    struct.pack_into("!H", pkt, 10, P.internet_checksum(pkt[:20]))
    P.complete_checksum(pkt, P.parse_flow(pkt))
    return bytes(pkt)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--spoof", required=True)
    parser.add_argument("--to", required=True)
    args = parser.parse_args(argv)
    config = load_node_config(args.config)
    engine, cert = TunnelComponent(config)._build_engine()
    dst, _, port = args.to.rpartition(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((config.tunnel.listen_host, config.tunnel.listen_port))
    own = str(cert.ip.ip)
    engine.send_packet(udp_packet(own, dst, int(port), b"hello"), time.time())  # starts the handshake
    deadline = time.monotonic() + 10
    session = None
    while session is None and time.monotonic() < deadline:
        for datagram, addr in engine.datagrams_to_send():
            sock.sendto(bytes(datagram), addr)
        if select.select([sock], [], [], 0.2)[0]:
            data, addr = sock.recvfrom(65535)
            engine.receive_datagram(data, addr, time.time())
        session = engine.session_for(ipaddress.ip_address(dst), time.time())
    if session is None:
        print("no session", flush=True)
        return 1
    for datagram, addr in engine.datagrams_to_send():
        sock.sendto(bytes(datagram), addr)
    payload = B.encode_record(udp_packet(args.spoof, dst, int(port), b"spoofed")) + B.encode_record(
        udp_packet(own, dst, int(port), b"honest")
    )
    sock.sendto(bytes(session.seal(payload, 5, time.time())), session.endpoint)
    print("sent", flush=True)
    sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
