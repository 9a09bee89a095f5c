"""The node's tunnel component: certificates -> TunnelEngine, TUN + UDP + Dataplane, status.

``TunnelComponent(config)`` has the ``async start()`` / ``async stop()`` of flatnet-node's
components. Start: load the PKI files, create the engine with the static peers, open the TUN device
(offloads) and configure it over netlink (MTU from the underlay, this node's address, a route for
the whole Flatnet range), turn forwarding on, masquerade foreign sources (the gateway), open the
UDP socket, run the I/O shell. Stop: undo all of it (closing the TUN removes its routes).

``status()`` is what ``flatnet status`` shows (the control socket serves it as command "status").

Run alone (tests, benches): ``python -m flatnet.node.tunnel_component --config node.toml``.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import signal
import sys
import time

from flatnet.firewall import Firewall
from flatnet.node.allocator import keep_freed_memory
from flatnet.node.config import NodeConfig, load_node_config
from flatnet.node.dataplane import Dataplane, DataplaneSettings
from flatnet.node.nat import Masquerade
from flatnet.node.service import DataplaneIO, DataplaneService
from flatnet.node.tun import TunDevice, enable_forwarding, interface_mtu, restore_forwarding
from flatnet.node.udp import RECV_BATCH, DatagramEndpoint

log = logging.getLogger("flatnet.node.tunnel")

# Bytes between the underlay MTU and the largest inner packet carried in one datagram: outer IPv4
# (20) + UDP (8) + transport header (16) + AEAD tag (16) + one batch record header (6).
OVERHEAD = 20 + 8 + 16 + 16 + 6
UDP_IP_OVERHEAD = 28
MAX_SEGMENTS_LIMIT = 40  # a message must fit one GSO send (64 KB)


def overlay_mtu_for(underlay_mtu: int) -> int:
    return underlay_mtu - OVERHEAD


def _endpoint(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


class TunnelComponent:
    def __init__(self, config: NodeConfig, clock=time.time, masquerade: bool = True) -> None:
        self.config = config
        self.clock = clock  # certificates are checked against it: Unix time
        self.masquerade_enabled = masquerade
        self.engine = None
        self.dataplane: Dataplane | None = None
        self.tun: TunDevice | None = None
        self.udp: DatagramEndpoint | None = None
        self.service: DataplaneService | None = None
        self.masquerade: Masquerade | None = None
        self._forwarding: str = ""
        self._timer_task: asyncio.Task | None = None
        self.escalation = None  # flatnet.node.discovery.Escalation, with [lighthouse] configured

    def _load_pki(self):
        """This node's (certificate, key) and the trust store (CA bundle + blocklist), from [pki]."""
        from flatnet.pki.cert import TrustStore
        from flatnet.pki.files import (
            load_blocklist,
            load_certificate,
            load_certificates,
            load_host_key,
            parse_fingerprint,
        )

        pki = self.config.pki
        cert = load_certificate(pki.cert)
        key = load_host_key(pki.key)
        blocked = set()
        for item in pki.blocklist:
            blocked.add(parse_fingerprint(item))
        blocklist_file = getattr(pki, "blocklist_file", None)
        if blocklist_file:
            blocked |= load_blocklist(blocklist_file)
        return (cert, key), TrustStore(load_certificates(pki.ca), blocked)

    def _build_engine(self):
        from flatnet.proto.engine import TunnelEngine

        (cert, key), trust = self._load_pki()
        engine = TunnelEngine((cert, key), trust)
        for peer in self.config.peers:
            engine.add_peer(peer.ip, [_endpoint(e) for e in peer.endpoints], peer.subnets)
        return engine, cert

    async def start(self) -> None:
        tunnel = self.config.tunnel
        keep_freed_memory()  # the receive path's 64 KB buffers reuse the heap (flatnet/node/allocator.py)
        self.engine, cert = self._build_engine()
        underlay = await asyncio.to_thread(interface_mtu, tunnel.underlay_interface or None)
        inner_mtu = overlay_mtu_for(underlay)
        local_networks = (ipaddress.ip_network(f"{cert.ip.ip}/32"), *cert.subnets)
        settings = DataplaneSettings(
            local_ip=cert.ip.ip,
            local_networks=local_networks,
            overlay_mtu=inner_mtu,
            datagram_budget=underlay - UDP_IP_OVERHEAD,
            max_cap=max(1, min(tunnel.max_segments, MAX_SEGMENTS_LIMIT)),
            adaptive_cap=tunnel.adaptive_segments,
            parity=tunnel.parity,
        )
        self.dataplane = Dataplane(self.engine, Firewall(self.config.firewall), settings)
        self.tun = TunDevice(tunnel.tun_name)
        try:
            # pyroute2's synchronous API runs an asyncio loop of its own: keep it off the running one.
            await asyncio.to_thread(
                self.tun.configure, cert.ip.ip, [self.config.flatnet_range], tunnel.mtu or inner_mtu
            )
            self._forwarding = enable_forwarding()
            if self.masquerade_enabled:
                self.masquerade = Masquerade(self.tun.name, self.config.flatnet_range)
                await asyncio.to_thread(self.masquerade.install)
            self.udp = DatagramEndpoint(tunnel.listen_host, tunnel.listen_port, recv_batch=RECV_BATCH)
            if self.config.lighthouse.hosts or self.config.lighthouse.escalation:
                from flatnet.node.discovery import attach_escalation  # Graceful Escalation

                self.escalation = attach_escalation(self.config, self.engine, self.udp, self.clock)
                self.udp = self.escalation.endpoint
        except BaseException:
            await self._teardown()
            raise
        self.service = DataplaneService(DataplaneIO(self.dataplane, self.tun, self.udp), clock=self.clock)
        self.service.start()
        if self.escalation is not None:
            self.escalation.start(self.service)
        # Handshake with every static peer now: the container subnets a peer owns are in its
        # certificate, so until then a packet to one of its containers has no route.
        if self.engine.learn_routes(self.clock()):
            self.service.kick()
        log.info(
            "tunnel up: %s %s/32, MTU %d (underlay %d), UDP %s, %d static peers",
            self.tun.name, cert.ip.ip, tunnel.mtu or inner_mtu, underlay, self.udp.address, len(self.config.peers),
        )

    async def stop(self) -> None:
        if self.escalation is not None:
            await self.escalation.stop()
        if self.service is not None:
            self.service.close()
            self.service = None
        await self._teardown()

    async def _teardown(self) -> None:
        if self.udp is not None:
            self.udp.close()
            self.udp = None
        if self.masquerade is not None:
            await asyncio.to_thread(self.masquerade.remove)
            self.masquerade = None
        if self.tun is not None:
            self.tun.close()
            self.tun = None
        if self._forwarding:
            restore_forwarding(self._forwarding)
            self._forwarding = ""

    # ---- reload without restart (flatnet/node/reload.py) ----------------------------------------

    def prepare_reload(self, plan):
        """Load what *plan* needs (certificates, trust store, firewall rules): raises
        ConfigError/ValueError/OSError before anything changes. Returns ``apply() -> list[str]``
        (what was done, for the log), or None when the tunnel has nothing to do."""
        from flatnet.config import ConfigError
        from flatnet.firewall import Firewall

        if not plan.tunnel_changed or self.engine is None or self.dataplane is None:
            return None
        pki = plan.config.pki
        trust = identity = None
        if plan.trust or plan.identity:
            from flatnet.pki.cert import TrustStore
            from flatnet.pki.errors import PkiFileError
            from flatnet.pki.files import (
                load_certificate,
                load_certificates,
                load_host_key,
                parse_fingerprint,
            )
            from flatnet.proto.noise import public_bytes

            def load(key_name, loader, *args):
                try:
                    return loader(*args)
                except (PkiFileError, OSError, ValueError) as exc:
                    raise ConfigError("", key_name, str(exc)) from None

            cert = load("pki.cert", load_certificate, pki.cert)
            key = load("pki.key", load_host_key, pki.key)
            blocked = {load(f"pki.blocklist[{i}]", parse_fingerprint, text) for i, text in enumerate(pki.blocklist)}
            fresh_trust = TrustStore(load("pki.ca", load_certificates, pki.ca), blocked)
            trust = fresh_trust if plan.trust else None
            if plan.identity:
                if public_bytes(key) != cert.public_key:
                    raise ConfigError("", "pki.key", "the private key does not match the certificate")
                old = self.engine.certificate
                if cert.ip != old.ip or tuple(cert.subnets) != tuple(old.subnets):
                    raise ConfigError("", "pki.cert",
                                      f"the new certificate changes this node's address or subnets "
                                      f"({cert.ip}, {[str(n) for n in cert.subnets]}): that needs a restart")
                identity = (cert, key)
        if plan.firewall is not None:
            Firewall(plan.firewall)  # validates every rule (ConfigError names the key)
        peers = [(p, [_endpoint(e) for e in p.endpoints]) for p in (*plan.peers_added, *plan.peers_updated)]
        own = self.engine.certificate.ip.ip
        for peer, _ in peers:
            if peer.ip == own:
                raise ConfigError("", "peers.ip", f"{peer.ip} is this node's own address")

        def apply() -> list[str]:
            now = self.clock()
            done = []
            engine, dataplane = self.engine, self.dataplane
            for ip in plan.peers_removed:
                if engine.remove_peer(ip):
                    dataplane.paths.pop(ip, None)
                    done.append(f"peer {ip} removed")
            for peer, endpoints in peers:
                engine.add_peer(peer.ip, endpoints, peer.subnets)
                if self.escalation is not None:
                    self.escalation.mux.add_peer(peer.ip, now)
                    for endpoint in endpoints:
                        self.escalation.mux.add_candidate(peer.ip, endpoint, now)
                done.append(f"peer {peer.ip} endpoints {peer.endpoints}")
            if peers:
                engine.learn_routes(now)  # a new peer's certificate names its subnets (docs/dataplane.md)
            if identity is not None:
                restarted = engine.set_identity(identity, now)
                if self.escalation is not None:
                    self.escalation.mux._static_key = identity[1]  # path probes are keyed on it
                done.append(f"own certificate {identity[0].name}: re-handshaking {len(restarted)} peers")
            if trust is not None:
                revoked = engine.set_trust(trust, now)
                done.append(f"trust store reloaded; cut off: {[str(ip) for ip in revoked] or 'none'}")
            if plan.firewall is not None:
                forgotten = dataplane.firewall.replace_rules(plan.firewall, self._identity_for_remote)
                done.append(f"firewall rules swapped; {forgotten} tracked flows no longer allowed")
            self.config = plan.config
            if self.service is not None:
                self.service.kick()  # handshakes / keepalives queued above go out now
            return done

        return apply

    def _identity_for_remote(self, remote: bytes):
        from flatnet.firewall import identity_of

        peer = self.engine.route(remote)
        if peer is None or peer.certificate is None:
            return None
        return identity_of(peer)

    def status(self) -> dict:
        """Peers (path, handshake age, bytes), drops by reason, firewall: for ``flatnet status``."""
        now = self.clock()
        if self.dataplane is None:
            return {"running": False}
        status = self.dataplane.status(now)
        for ip, peer in (self.engine.peers if self.engine is not None else {}).items():
            entry = status["peers"].setdefault(str(ip), {})
            entry.update(
                {
                    "name": peer.name,
                    "up": peer.up,
                    "endpoint": f"{peer.endpoint[0]}:{peer.endpoint[1]}" if peer.endpoint else None,
                    "handshake_age": None if peer.last_handshake_at is None else round(now - peer.last_handshake_at, 1),
                    "handshake_pending": peer.handshake_pending,
                    "queued_packets": peer.queued_packets,
                    "tunnel_rx_bytes": peer.rx_bytes,
                    "tunnel_tx_bytes": peer.tx_bytes,
                }
            )
        if self.escalation is not None:
            status["escalation"] = self.escalation.status()
        status["running"] = True
        return status

    def register(self, control) -> None:
        """Serve ``status`` on the node's control socket."""

        async def status(request: dict) -> dict:
            return self.status()

        control.register("status", status)


async def _run_alone(config: NodeConfig) -> None:
    component = TunnelComponent(config)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, lambda: print(json.dumps(component.status()), flush=True))
    await component.start()
    print("ready", flush=True)
    try:
        await stop.wait()
    finally:
        print(json.dumps(component.status()), flush=True)
        await component.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flatnet-tunnel", description="flatnet-node's tunnel alone")
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import uvloop

    uvloop.run(_run_alone(load_node_config(args.config)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
