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

import logging
from typing import Any

from flatnet.exporter import LoopExporter
from flatnet.observability import observe_tunnel


class MetricsComponent(LoopExporter):
    log = logging.getLogger("flatnet.node.metrics")

    def __init__(self, node: Any, listen: str) -> None:
        super().__init__(listen)
        self.node = node
        node.cni.metrics = self.metrics

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


def metrics_component(node: Any) -> MetricsComponent | None:
    """The exporter for *node*'s ``[metrics] listen``, None when it is ``""``."""
    return MetricsComponent(node, node.config.metrics.listen) if node.config.metrics.listen else None


