"""A node-like data plane process for tests and benches: real TUN + UDP, stand-in tunnel keys.

Runs inside a namespace (``Namespace.popen``); ``--peer`` names the one other side. Prints
``ready`` once the TUN is configured, its status as JSON to stdout on SIGUSR1, exits cleanly on
SIGTERM (closing the TUN removes it). The tunnel is :mod:`flatnet.testing.standin_tunnel`: both
sides derive the same keys from ``--seed``, so it measures and tests the data plane alone.

    python -m flatnet.testing.dataplane_node --tun fn0 --ip 10.87.1.1 --nets 10.87.1.0/24 \
        --listen 192.168.77.1:4242 --peer 10.87.2.1,10.87.2.0/24,192.168.77.2:4242 --side a
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import signal
import sys

from flatnet.firewall import Firewall
from flatnet.node.dataplane import Dataplane, DataplaneSettings
from flatnet.node.service import DataplaneIO, DataplaneService
from flatnet.node.tun import TunDevice
from flatnet.node.udp import DatagramEndpoint
from flatnet.testing.standin_tunnel import standin_pair

OVERHEAD = 20 + 8 + 16 + 16 + 6  # IP, UDP, tunnel header, tag, one batch record header


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def run(args) -> int:
    import uvloop  # noqa: F401  (the loop policy is set by main)

    peer_ip, peer_nets, peer_endpoint = args.peer.split(",")
    listen = _addr(args.listen)
    a, b = standin_pair(
        args.ip if args.side == "a" else peer_ip,
        args.nets.split("+") if args.side == "a" else peer_nets.split("+"),
        listen if args.side == "a" else _addr(peer_endpoint),
        peer_ip if args.side == "a" else args.ip,
        peer_nets.split("+") if args.side == "a" else args.nets.split("+"),
        _addr(peer_endpoint) if args.side == "a" else listen,
        key_seed=args.seed.encode(),
    )
    engine = a if args.side == "a" else b
    underlay_mtu = args.underlay_mtu
    settings = DataplaneSettings(
        local_ip=ipaddress.ip_address(args.ip),
        local_networks=tuple(ipaddress.ip_network(n) for n in [args.ip + "/32", *args.nets.split("+")]),
        overlay_mtu=underlay_mtu - OVERHEAD,
        datagram_budget=underlay_mtu - 28,
        max_cap=args.cap,
        adaptive_cap=not args.fixed_cap,
    )
    dataplane = Dataplane(engine, Firewall(), settings)
    tun = TunDevice(args.tun, offload=not args.no_offload)
    udp = DatagramEndpoint(listen[0], listen[1], gro=not args.no_gro)
    try:
        # pyroute2's synchronous API runs its own asyncio loop: keep it off the running one.
        await asyncio.to_thread(tun.configure, settings.local_ip, [args.route], args.tun_mtu or settings.overlay_mtu)
        io = DataplaneIO(dataplane, tun, udp)
        if args.no_gso:
            original = udp.send
            udp.send = lambda buf, addr, seg=0: all(  # type: ignore[method-assign]
                original(buf[i : i + seg], addr, 0) for i in range(0, len(buf), seg)
            ) if seg else original(buf, addr, 0)
        loop = asyncio.get_running_loop()
        service = DataplaneService(io, loop)
        service.start()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(
            signal.SIGUSR1, lambda: print(json.dumps(dataplane.status(loop.time())), flush=True)
        )
        print("ready", flush=True)
        await stop.wait()
        service.close()
        print(json.dumps(dataplane.status(loop.time())), flush=True)
    finally:
        udp.close()
        tun.close()
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="dataplane_node")
    parser.add_argument("--tun", required=True)
    parser.add_argument("--ip", required=True)
    parser.add_argument("--nets", required=True, help="this side's networks, joined with +")
    parser.add_argument("--route", default="10.87.0.0/16")
    parser.add_argument("--listen", required=True)
    parser.add_argument("--peer", required=True, help="ip,nets,endpoint")
    parser.add_argument("--side", choices=["a", "b"], required=True)
    parser.add_argument("--seed", default="flatnet-test")
    parser.add_argument("--underlay-mtu", type=int, default=1500)
    parser.add_argument("--tun-mtu", type=int, default=0)
    parser.add_argument("--cap", type=int, default=16)
    parser.add_argument("--fixed-cap", action="store_true")
    parser.add_argument("--no-offload", action="store_true")
    parser.add_argument("--no-gro", action="store_true")
    parser.add_argument("--no-gso", action="store_true")
    args = parser.parse_args(argv)
    import uvloop

    return uvloop.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
