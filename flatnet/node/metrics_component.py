"""flatnet-node's Prometheus exporter: one :class:`~flatnet.observability.Metrics`, served on
``[metrics] listen`` (``127.0.0.1:9587`` by default; ``""``: none).

Nothing on the data path is touched: at each scrape, the exporter's thread asks the event loop to
run :meth:`MetricsComponent.refresh`, which reads the counters the cores already keep (the tunnel
engine and data plane, escalation, the service registry, the gateway pusher, the reload counts)
into the metrics, and only then are they rendered. CNI calls are the exception: they are counted
and timed as they finish (``CniService.metrics``), being rare.

A port already in use does not stop the node: the error is logged and the node runs without an
exporter (its tunnels matter more than its metrics).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from typing import Any

from flatnet.node.config import parse_listen
from flatnet.observability import Metrics, observe_tunnel, start_exporter

log = logging.getLogger("flatnet.node.metrics")

REFRESH_TIMEOUT = 2.0  # seconds a scrape waits for the event loop; a busy loop gives the last values


class MetricsComponent:
    def __init__(self, node: Any, listen: str) -> None:
        self.node = node
        self.listen = listen
        self.metrics = Metrics()
        self.server = None
        self._thread = None
        self._loop: asyncio.AbstractEventLoop | None = None
        node.cni.metrics = self.metrics

    @property
    def address(self) -> tuple[str, int] | None:
        """Where the exporter listens (the real port when the config said 0), None if it does not."""
        return None if self.server is None else self.server.server_address[:2]

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        host, port = parse_listen(self.listen)
        try:
            self.server, self._thread = start_exporter(self.metrics, port, host, before_scrape=self._before_scrape)
        except OSError as exc:
            log.error("metrics exporter not started on %s: %s", self.listen, exc.strerror or exc)
            return
        log.info("metrics on http://%s:%d/metrics", *self.address)

    async def stop(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            await asyncio.to_thread(server.shutdown)  # waits for a scrape in progress (which needs the loop)
            server.server_close()
            self._thread.join(timeout=5)

    def _before_scrape(self) -> None:
        refresh_on_loop(self._loop, self.refresh)

    def refresh(self) -> None:
        """On the event loop: copy the cores' counters into the metrics."""
        m, node = self.metrics, self.node
        tunnel = next((c for c in node.components if getattr(c, "engine", None) is not None), None)
        if tunnel is not None:
            observe_tunnel(m, tunnel.engine, tunnel.dataplane)
            m["peer_rung"].clear()  # peers removed since the last scrape go away
            escalation = getattr(tunnel, "escalation", None)
            if escalation is not None:
                from flatnet.node.discovery import observe_escalation

                observe_escalation(m, escalation.mux, tunnel.clock())
            else:  # static peers without escalation are reached directly: rung 0 once up
                for ip, status in tunnel.engine.peers.items():
                    m["peer_rung"].labels(peer=str(ip)).set(0 if status.up else -1)
        m["routes"].set(len(node.registry.services()))
        if node.pusher is not None:  # a reload may replace the pusher: its counts start again
            m.absorb_counter("route_pushes_total", {"ok": node.pusher.pushes, "failed": node.pusher.failures}, "outcome")
        m.absorb_counter("config_reloads_total", node.reloads, "outcome")


def refresh_on_loop(loop: asyncio.AbstractEventLoop | None, refresh) -> None:
    """In the exporter's thread: run *refresh* on the event loop (which owns the cores' state)
    and wait for it, at most REFRESH_TIMEOUT."""
    if loop is None or loop.is_closed():
        return

    async def run() -> None:
        refresh()

    try:
        future = asyncio.run_coroutine_threadsafe(run(), loop)
        future.result(timeout=REFRESH_TIMEOUT)
    except (concurrent.futures.TimeoutError, RuntimeError):  # busy or closing loop: the last values
        return
    except Exception:  # a collector bug must not take the exporter down: scrape what there is
        log.exception("refreshing metrics failed")


def metrics_component(node: Any) -> MetricsComponent | None:
    """The exporter for *node*'s ``[metrics] listen``, None when it is ``""``."""
    return MetricsComponent(node, node.config.metrics.listen) if node.config.metrics.listen else None


