"""The relay's asyncio edge: a UDP socket and a TCP listener around one :class:`RelayTable`.

Frames (``flatnet/proto/relay.py``) arrive on UDP, one per datagram, or on TCP connections as a
length-prefixed stream; the table decides where each goes (it checks BIND tokens, binds sides,
meters bytes). Nothing here opens a frame's body: DATA bodies are the nodes' tunnel datagrams,
encrypted end to end, forwarded as they came.

Addresses in the table are opaque keys: a UDP ``(host, port)``, or ``("tcp", (host, port))`` for a
TCP connection, so one session may join a UDP side and a TCP side (a node behind a firewall that
blocks UDP). A TCP connection that closes is unbound from every session (``forget_address``). A
framing error on a stream closes that connection (a stream cannot resynchronise); a connection
whose send buffer is over ``max_stream_backlog`` loses frames (counted) rather than memory.

Counters: the table's (``relay.table``) and ours: ``udp.rx``, ``tcp.rx``, ``tcp.accepted``,
``tcp.closed``, ``tcp.framing-error``, ``tx.udp``, ``tx.tcp``, ``tx.tcp-gone``, ``tx.tcp-backlog``,
``udp.error``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Hashable

from flatnet.proto.relay import RelayFrameError, StreamFrameDecoder, encode_stream_frame
from lighthouse.relay_table import TCP_KEY, RelayTable, transport_of

log = logging.getLogger("flatnet.relay")



def _plain(addr) -> tuple[str, int]:
    return (str(addr[0]), int(addr[1]))


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, service: RelayService) -> None:
        self.service = service

    def datagram_received(self, data: bytes, addr) -> None:
        self.service.udp_received(data, _plain(addr))

    def error_received(self, exc: Exception) -> None:
        self.service.counters["udp.error"] += 1


class RelayService:
    def __init__(
        self,
        table: RelayTable,
        clock: Callable[[], float] = time.monotonic,
        tick_interval: float = 1.0,
        max_stream_backlog: int = 512 * 1024,
    ) -> None:
        self.table = table
        self.clock = clock
        self.tick_interval = tick_interval
        self.max_stream_backlog = max_stream_backlog
        self.counters: Counter[str] = Counter()
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp_server: asyncio.base_events.Server | None = None
        self._streams: dict[Hashable, asyncio.StreamWriter] = {}
        self._handlers: set[asyncio.Task] = set()
        self._ticker: asyncio.Task | None = None
        self.udp_address: tuple | None = None
        self.tcp_address: tuple | None = None

    async def start(self, host: str, udp_port: int | None, tcp_port: int | None) -> None:
        """Listen on UDP and/or TCP (None: not on that transport; 0: any free port)."""
        loop = asyncio.get_running_loop()
        if udp_port is not None:
            self._udp, _ = await loop.create_datagram_endpoint(lambda: _UdpProtocol(self), local_addr=(host, udp_port))
            self.udp_address = self._udp.get_extra_info("sockname")[:2]
        if tcp_port is not None:
            self._tcp_server = await asyncio.start_server(self._serve_stream, host, tcp_port)
            self.tcp_address = self._tcp_server.sockets[0].getsockname()[:2]
        self._ticker = asyncio.create_task(self._tick_forever(), name="relay-ticker")
        log.info("relay listening: udp %s, tcp %s", self.udp_address, self.tcp_address)

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.gather(self._ticker, return_exceptions=True)
            self._ticker = None
        if self._tcp_server is not None:
            self._tcp_server.close()
        for writer in list(self._streams.values()):
            writer.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._tcp_server is not None:
            await self._tcp_server.wait_closed()
            self._tcp_server = None
        if self._udp is not None:
            self._udp.close()
            self._udp = None

    # ---- input ----------------------------------------------------------------------------

    def udp_received(self, data: bytes, addr) -> None:
        self.counters["udp.rx"] += 1
        self._deliver(self.table.receive(data, addr, self.clock()))

    async def _serve_stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._handlers.add(task)
        key = (TCP_KEY, _plain(writer.get_extra_info("peername")))
        self._streams[key] = writer
        self.counters["tcp.accepted"] += 1
        decoder = StreamFrameDecoder()
        try:
            while chunk := await reader.read(65536):
                now = self.clock()
                for frame in decoder.feed(chunk):
                    self.counters["tcp.rx"] += 1
                    self._deliver(self.table.receive(frame, key, now))
        except RelayFrameError as exc:
            self.counters["tcp.framing-error"] += 1
            self.table.counters[f"drop.{exc.reason}"] += 1
        except (ConnectionError, OSError):
            pass
        finally:
            self._streams.pop(key, None)
            self.table.forget_address(key)
            self.counters["tcp.closed"] += 1
            writer.close()
            self._handlers.discard(task)

    # ---- output ---------------------------------------------------------------------------

    def _deliver(self, outputs) -> None:
        for dst, frame in outputs:
            if transport_of(dst) == "tcp":
                writer = self._streams.get(dst)
                if writer is None or writer.is_closing():
                    self.counters["tx.tcp-gone"] += 1
                elif writer.transport.get_write_buffer_size() > self.max_stream_backlog:
                    self.counters["tx.tcp-backlog"] += 1
                else:
                    writer.write(encode_stream_frame(frame))
                    self.counters["tx.tcp"] += 1
            elif self._udp is not None:
                self._udp.sendto(frame, dst)
                self.counters["tx.udp"] += 1

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(self.tick_interval)
            self.table.tick(self.clock())

    def status(self) -> dict:
        return {
            "sessions": len(self.table),
            "streams": len(self._streams),
            "table": dict(self.table.counters),
            "service": dict(self.counters),
        }


# ---- configuration glue (lighthouse/config.py's [relay] section) -------------------------------


def load_relay_secret(path: str) -> bytes:
    """The secret shared by lighthouses and relays (a file of at least 16 bytes; whitespace at the
    ends is ignored, so ``head -c 32 /dev/urandom | base64 > relay.secret`` works)."""
    from flatnet.config import ConfigError

    try:
        secret = open(path, "rb").read().strip()  # noqa: SIM115 - tiny file, read once
    except OSError as exc:
        raise ConfigError(path, "relay.secret_file", f"cannot read: {exc.strerror}") from None
    if len(secret) < 16:
        raise ConfigError(path, "relay.secret_file", "the relay secret must be at least 16 bytes")
    return secret


def advertised_relays(relay_config) -> tuple:
    """The ``Relay`` entries a lighthouse puts in its RelayOffers."""
    from flatnet.proto.control import TRANSPORT_TCP, TRANSPORT_UDP, Relay
    from lighthouse.config import parse_relay_url

    out = []
    for url in relay_config.advertise:
        scheme, endpoint = parse_relay_url(url)
        out.append(Relay(TRANSPORT_UDP if scheme == "udp" else TRANSPORT_TCP, endpoint))
    return tuple(out)


def build_relay_service(relay_config, secret: bytes) -> RelayService:
    from lighthouse.relay_table import RelayLimits

    limits = RelayLimits(
        max_sessions=relay_config.max_sessions,
        idle_timeout=relay_config.idle_timeout,
        bytes_per_second=relay_config.bytes_per_second,
        burst_bytes=relay_config.burst_bytes,
    )
    return RelayService(RelayTable(secret, limits))
