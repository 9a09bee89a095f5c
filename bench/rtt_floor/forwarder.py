"""The floor of a Python data path: a TUN <-> UDP forwarder on uvloop with no checks (bench only).

    python -m bench.rtt_floor.forwarder TUN_NAME TUN_ADDRESS/PREFIX LOCAL_IP PEER_IP [--aead]

Reads a packet from the TUN and sends it to the peer (optionally sealed with one ChaCha20-Poly1305
call, fixed key and nonce: a cost model, not a tunnel), and the other way round. Prints "ready".
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import os
import socket
import struct

import uvloop
from pyroute2 import IPRoute

TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
PORT = 4299


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("tun")
    parser.add_argument("address")
    parser.add_argument("local")
    parser.add_argument("peer")
    parser.add_argument("--aead", action="store_true")
    args = parser.parse_args()
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", args.tun.encode(), IFF_TUN | IFF_NO_PI))
    address, prefix = args.address.split("/")
    with IPRoute() as ip:
        index = ip.link_lookup(ifname=args.tun)[0]
        ip.addr("add", index=index, address=address, prefixlen=int(prefix))
        ip.link("set", index=index, state="up")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((args.local, PORT))
    sock.setblocking(False)
    peer = (args.peer, PORT)
    seal = unseal = None
    if args.aead:
        from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

        aead, nonce = ChaCha20Poly1305(bytes(32)), bytes(12)
        seal = lambda p: aead.encrypt(nonce, p, None)  # noqa: E731
        unseal = lambda p: aead.decrypt(nonce, p, None)  # noqa: E731

    def on_tun() -> None:
        while True:
            try:
                packet = os.read(fd, 65536)
            except BlockingIOError:
                return
            sock.sendto(seal(packet) if seal else packet, peer)

    def on_udp() -> None:
        while True:
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                return
            try:
                os.write(fd, unseal(data) if unseal else data)
            except OSError:
                pass

    async def run() -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(fd, on_tun)
        loop.add_reader(sock.fileno(), on_udp)
        print("ready", flush=True)
        await asyncio.Event().wait()

    uvloop.run(run())


if __name__ == "__main__":
    main()
