"""flatnet-lighthouse's Prometheus exporter on ``[metrics] listen`` (``127.0.0.1:9588``; ``""``: none).

At each scrape the event loop copies what the cores already count: registered nodes and control
messages by type (Register = registrations, Query = queries), drops by reason (``rate-limited``
among them) from :class:`~lighthouse.core.LighthouseCore`; the lighthouse's own tunnel (handshakes,
peers); relay sessions, relayed bytes and relay drops from the in-process relay's table; config
reloads. A port in use is logged and the lighthouse runs on without an exporter.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

from flatnet.node.config import parse_listen
from flatnet.node.metrics_component import refresh_on_loop
from flatnet.observability import Metrics, observe_lighthouse, observe_tunnel, start_exporter

log = logging.getLogger("flatnet.lighthouse.metrics")


class LighthouseExporter:
    def __init__(self, listen: str, service, relay=None) -> None:
        self.listen = listen
        self.service = service  # lighthouse.service.LighthouseService
        self.relay = relay  # lighthouse.relay_service.RelayService or None
        self.reloads: Counter = Counter()  # outcome -> count, kept by the SIGHUP handler
        self.metrics = Metrics()
        self.server = None
        self._thread = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def address(self) -> tuple[str, int] | None:
        return None if self.server is None else self.server.server_address[:2]

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        host, port = parse_listen(self.listen)
        try:
            self.server, self._thread = start_exporter(
                self.metrics, port, host, before_scrape=lambda: refresh_on_loop(self._loop, self.refresh))
        except OSError as exc:
            log.error("metrics exporter not started on %s: %s", self.listen, exc.strerror or exc)
            return
        log.info("metrics on http://%s:%d/metrics", *self.address)

    async def stop(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            await asyncio.to_thread(server.shutdown)
            server.server_close()
            self._thread.join(timeout=5)

    def refresh(self) -> None:
        m = self.metrics
        table = self.relay.table if self.relay is not None else None
        observe_lighthouse(m, self.service.core, table)
        observe_tunnel(m, self.service.engine)
        m.absorb_counter("config_reloads_total", self.reloads, "outcome")
