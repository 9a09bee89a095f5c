"""flatnet-lighthouse's Prometheus exporter on ``[metrics] listen`` (``127.0.0.1:9588``; ``""``: none).

At each scrape the event loop copies what the cores already count: registered nodes and control
messages by type (Register = registrations, Query = queries), drops by reason (``rate-limited``
among them) from :class:`~lighthouse.core.LighthouseCore`; the lighthouse's own tunnel (handshakes,
peers); relay sessions, relayed bytes and relay drops from the in-process relay's table; config
reloads. A port in use is logged and the lighthouse runs on without an exporter.
"""

from __future__ import annotations

import logging
from collections import Counter

from flatnet.exporter import LoopExporter
from flatnet.observability import observe_lighthouse, observe_tunnel


class LighthouseExporter(LoopExporter):
    log = logging.getLogger("flatnet.lighthouse.metrics")

    def __init__(self, listen: str, service, relay=None) -> None:
        super().__init__(listen)
        self.service = service  # lighthouse.service.LighthouseService
        self.relay = relay  # lighthouse.relay_service.RelayService or None
        self.reloads: Counter = Counter()  # outcome -> count, kept by the SIGHUP handler

    def refresh(self) -> None:
        m = self.metrics
        table = self.relay.table if self.relay is not None else None
        observe_lighthouse(m, self.service.core, table)
        observe_tunnel(m, self.service.engine)
        m.absorb_counter("config_reloads_total", self.reloads, "outcome")
