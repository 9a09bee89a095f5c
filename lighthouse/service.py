"""The lighthouse's asyncio edge: one UDP socket, the tunnel engine, the sans-I/O core.

Datagram in -> ``TunnelEngine.receive_datagram`` (which authenticates: anything that is not a valid
handshake or transport message of an established session is dropped and counted in
``engine.drops``) -> ``ControlReceived`` events -> ``LighthouseCore.handle_control`` with the
peer's certificate (from its ``PeerUp``) and the datagram's source address -> payloads to send
through ``engine.send_control`` -> datagrams out. A ticker calls ``engine.handle_timer`` and
``core.tick`` every ``tick_interval`` seconds. Nothing else lives here.

The clock is Unix time (``time.time``): the engine checks certificate validity against it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable

from flatnet.proto.events import ControlReceived, PeerDown, PeerUp
from lighthouse.core import LighthouseCore

log = logging.getLogger("flatnet.lighthouse")


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, service: LighthouseService) -> None:
        self.service = service

    def datagram_received(self, data: bytes, addr) -> None:
        self.service.datagram_received(data, addr)

    def error_received(self, exc: Exception) -> None:  # ICMP errors for earlier sends: lost datagrams
        self.service.counters["udp.error"] += 1


class LighthouseService:
    def __init__(
        self, engine, core: LighthouseCore, clock: Callable[[], float] = time.time, tick_interval: float = 0.5
    ) -> None:
        self.engine = engine
        self.core = core
        self.clock = clock
        self.tick_interval = tick_interval
        self.counters: Counter[str] = Counter()
        self._certificates: dict = {}  # peer Flatnet IP -> its certificate (from PeerUp)
        self._transport: asyncio.DatagramTransport | None = None
        self._ticker: asyncio.Task | None = None
        self.address: tuple | None = None

    async def start(self, host: str, port: int) -> tuple:
        loop = asyncio.get_running_loop()
        self._transport, _ = await loop.create_datagram_endpoint(
            lambda: _Protocol(self), local_addr=(host, port)
        )
        self.address = self._transport.get_extra_info("sockname")
        self._ticker = asyncio.create_task(self._tick_forever(), name="lighthouse-ticker")
        log.info("lighthouse listening on %s:%s", *self.address[:2])
        return self.address

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            try:
                await self._ticker
            except asyncio.CancelledError:
                pass
            self._ticker = None
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def datagram_received(self, data: bytes, addr) -> None:
        now = self.clock()
        self.engine.receive_datagram(data, addr, now)
        self._process_events(addr, now)
        self._flush()

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(self.tick_interval)
            now = self.clock()
            self.engine.handle_timer(now)
            self.core.tick(now)
            self._process_events(None, now)
            self._flush()

    def _process_events(self, addr, now: float) -> None:
        engine = self.engine
        while (event := engine.next_event()) is not None:
            if isinstance(event, PeerUp):
                self._certificates[event.peer_ip] = event.certificate
            elif isinstance(event, PeerDown):
                self._certificates.pop(event.peer_ip, None)
            elif isinstance(event, ControlReceived):
                certificate = self._certificates.get(event.peer_ip)
                if certificate is None or addr is None:
                    self.counters["drop.control-without-certificate"] += 1
                    continue
                for out in self.core.handle_control(event.payload, certificate, addr, now):
                    self._send(out, now)
            else:  # data, batches, relay frames: a lighthouse routes nothing
                self.counters[f"drop.{type(event).__name__}"] += 1

    def _send(self, out, now: float) -> None:
        certificate = self._certificates.get(out.peer_ip)
        if certificate is None or certificate.fingerprint() != out.fingerprint:
            self.counters["send.peer-gone"] += 1  # the tunnel's peer is no longer that certificate
            return
        if not self.engine.send_control(out.payload, out.peer_ip, now):
            self.counters["send.no-session"] += 1

    def _flush(self) -> None:
        transport = self._transport
        for data, addr in self.engine.datagrams_to_send():
            if transport is not None and addr is not None:
                transport.sendto(data, addr)

    def status(self) -> dict:
        return {
            "nodes": len(self.core),
            "core": dict(self.core.counters),
            "service": dict(self.counters),
            "tunnel_drops": dict(self.engine.drops),
        }
