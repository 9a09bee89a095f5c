"""One vocabulary for what Flatnet's processes report: Prometheus metrics and structured log events.

Metrics
-------
Every process (node, lighthouse, relay, gateway sync) makes one :class:`Metrics` — a private
``prometheus_client.CollectorRegistry``, never the library's global one, so two components in one
test process do not collide and a test can read exactly what one component counted. Names all start
``flatnet_``; the full list is :data:`METRIC_DEFINITIONS` (also rendered into docs/operations.md).

Counters that already live inside the sans-I/O cores (``TunnelEngine.drops``/``stats``,
``LighthouseCore.counters``, plain ``collections.Counter``) are not duplicated on the data path:
the I/O layer calls :meth:`Metrics.absorb_counter` from its periodic tick (or at scrape time), which
turns each ``Counter`` key into a label value and moves the Prometheus counter forward by the
difference. The hot path stays a dict increment.

:func:`start_exporter` serves ``/metrics`` over HTTP on **127.0.0.1** by default: metrics name
peers and routes, so exposing them beyond the host is an operator's explicit choice.

Structured logs
---------------
:func:`setup_logging` configures the root logger once per process: human text (default) or JSON
lines (``json=True``: one object per line, ``ts``, ``level``, ``logger``, ``msg`` and any
``event``/fields). Log a well-known event with :func:`log_event`::

    log_event(log, PEER_UP, peer="10.87.2.1", endpoint="192.0.2.7:4242")

The event names are the constants below (:data:`EVENTS`); ``log_event`` refuses any other, so the
vocabulary stays in one place and operators can grep or alert on ``event=peer.down``.
"""

from __future__ import annotations

import json as _json
import logging
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import start_http_server

# ==== log events ==================================================================================

PEER_UP = "peer.up"  # a tunnel session to a peer became usable
PEER_DOWN = "peer.down"  # the last session to a peer expired, or its certificate was revoked
PEER_ROAMED = "peer.roamed"  # a peer's underlay endpoint changed
HANDSHAKE_FAILED = "handshake.failed"  # gave up after REKEY_ATTEMPT_TIME of retries
REKEY = "session.rekeyed"  # a new session replaced the current one
ROUTE_PUSHED = "route.pushed"  # a container route reached the gateway
ROUTE_REMOVED = "route.removed"
ROUTE_PUSH_FAILED = "route.push_failed"
CNI_ADD = "cni.add"
CNI_DEL = "cni.del"
CNI_CHECK = "cni.check"
CNI_FAILED = "cni.failed"
PACKET_DROPPED = "packet.dropped"  # rate-limited in logs: drops are counted, only bursts logged
LIGHTHOUSE_REGISTERED = "lighthouse.registered"
LIGHTHOUSE_UNREACHABLE = "lighthouse.unreachable"
RELAY_BOUND = "relay.bound"
RELAY_CLOSED = "relay.closed"
CONFIG_RELOADED = "config.reloaded"
CONFIG_RELOAD_FAILED = "config.reload_failed"
CERT_REJECTED = "cert.rejected"
SERVICE_STARTED = "service.started"
SERVICE_STOPPING = "service.stopping"

EVENTS: frozenset[str] = frozenset(
    v for k, v in dict(globals()).items() if k.isupper() and isinstance(v, str) and "." in v
)


class JsonLineFormatter(logging.Formatter):
    """One JSON object per record: ts (RFC 3339, UTC), level, logger, msg, then the event fields."""

    _STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in self._STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return _json.dumps(out, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """``time logger level msg key=value ...``: the event fields appended, readable in journalctl."""

    _STANDARD = JsonLineFormatter._STANDARD

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(name)s %(levelname)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if getattr(record, "_fields_in_msg", False):  # log_event's default message has the fields already
            return f"{text} event={record.event}"
        extra = [f"{k}={v}" for k, v in record.__dict__.items() if k not in self._STANDARD and not k.startswith("_")]
        return text + (" " + " ".join(extra) if extra else "")


_HANDLER_MARK = "_flatnet_handler"


def setup_logging(json: bool = False, level: str | int = "INFO", stream=None) -> logging.Handler:
    """Configure the root logger for this process (idempotent: replaces a previous call's handler)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_MARK, False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonLineFormatter() if json else TextFormatter())
    setattr(handler, _HANDLER_MARK, True)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    return handler


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, msg: str | None = None, **fields) -> None:
    """Log one vocabulary event with its fields (``event=`` plus the keyword arguments)."""
    if event not in EVENTS:
        raise ValueError(f"unknown log event {event!r}: add it to flatnet.observability")
    clash = set(fields) & JsonLineFormatter._STANDARD
    if clash:
        raise ValueError(f"field names {sorted(clash)} clash with logging's own attributes")
    if logger.isEnabledFor(level):
        text = msg or event + "".join(f" {k}={v}" for k, v in fields.items())
        logger.log(level, text, extra={"event": event, **fields, "_fields_in_msg": msg is None})


# ==== metrics =====================================================================================


@dataclass(frozen=True)
class MetricDefinition:
    name: str  # without the flatnet_ prefix
    kind: str  # counter | gauge | histogram
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] | None = None


_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

METRIC_DEFINITIONS: tuple[MetricDefinition, ...] = (
    # node: tunnel
    MetricDefinition("peers", "gauge", "Peers the node knows, by state (up, down, pending)", ("state",)),
    MetricDefinition("peer_rung", "gauge", "How a peer is reached (flatnet.escalation.Rung): 0 direct-lan, 1 punched, 2 udp-relay, 3 tcp-relay", ("peer",)),
    MetricDefinition("peer_rung_seconds", "gauge", "Seconds each peer has spent on each rung (Graceful Escalation), since the node started", ("peer", "rung")),
    MetricDefinition("peer_rung_bytes_total", "counter", "Datagram bytes sent to each peer on each rung", ("peer", "rung")),
    MetricDefinition("handshakes_total", "counter", "Handshakes by outcome (initiated, completed, answered, failed)", ("outcome",)),
    MetricDefinition("rekeys_total", "counter", "Sessions replaced by a newer one"),
    MetricDefinition("roams_total", "counter", "Peers heard from a new underlay address (roaming)"),
    MetricDefinition("tunnel_bytes_total", "counter", "Inner bytes through the tunnel", ("direction",)),
    MetricDefinition("tunnel_packets_total", "counter", "Inner packets through the tunnel", ("direction",)),
    MetricDefinition("drops_total", "counter", "Datagrams or packets dropped, by component and reason", ("component", "reason")),
    MetricDefinition("queued_packets", "gauge", "Packets waiting for a handshake, all peers"),
    MetricDefinition("sessions", "gauge", "Live transport sessions"),
    # node: routes, CNI, gateway sync
    MetricDefinition("routes", "gauge", "Container routes this node serves"),
    MetricDefinition("route_pushes_total", "counter", "Gateway route pushes by outcome (ok, failed)", ("outcome",)),
    MetricDefinition("cni_calls_total", "counter", "CNI commands by command and outcome", ("command", "outcome")),
    MetricDefinition("cni_call_seconds", "histogram", "CNI command latency in the node", ("command",), _LATENCY_BUCKETS),
    # lighthouse and relay
    MetricDefinition("lighthouse_nodes", "gauge", "Nodes registered with this lighthouse"),
    MetricDefinition("lighthouse_messages_total", "counter", "Control messages by type", ("type",)),
    MetricDefinition("relay_sessions", "gauge", "Relay sessions bound, by transport", ("transport",)),
    MetricDefinition("relay_bytes_total", "counter", "Bytes relayed, by transport", ("transport",)),
    # every process
    MetricDefinition("config_reloads_total", "counter", "Configuration reloads by outcome (ok, failed)", ("outcome",)),
    MetricDefinition("up_since_seconds", "gauge", "Unix time the process started"),
)

_METRIC_CLASSES = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}


class Metrics:
    """All of one process's metrics in its own registry: ``metrics["drops_total"].labels(...)``."""

    def __init__(self, names: tuple[str, ...] | None = None) -> None:
        """``names``: only these definitions (default: all of them)."""
        self.registry = CollectorRegistry(auto_describe=True)
        self._metrics: dict[str, Any] = {}
        self._absorbed: dict[tuple[str, tuple], float] = {}
        for definition in METRIC_DEFINITIONS:
            if names is not None and definition.name not in names:
                continue
            kwargs: dict[str, Any] = {"registry": self.registry, "labelnames": definition.labels}
            if definition.buckets is not None:
                kwargs["buckets"] = definition.buckets
            cls = _METRIC_CLASSES[definition.kind]
            self._metrics[definition.name] = cls("flatnet_" + definition.name, definition.help, **kwargs)
        if "up_since_seconds" in self._metrics:
            self._metrics["up_since_seconds"].set(time.time())

    def __getitem__(self, name: str):
        return self._metrics[name]

    def __contains__(self, name: str) -> bool:
        return name in self._metrics

    def absorb_counter(self, name: str, counts: Mapping[str, int], label: str, **fixed: str) -> None:
        """Bring counter *name* up to date with a core's ``Counter``: each key becomes *label*'s value.

        Idempotent: calling it again with the same counts adds nothing (the difference is added).
        A count that went backwards (a core replaced) is taken as a fresh start."""
        metric = self._metrics[name]
        for key, value in counts.items():
            labels = {**fixed, label: str(key)}
            ident = (name, tuple(sorted(labels.items())))
            previous = self._absorbed.get(ident, 0)
            delta = value - previous if value >= previous else value
            self._absorbed[ident] = value
            if delta > 0:
                metric.labels(**labels).inc(delta)

    def absorb_total(self, name: str, value: int) -> None:
        """:meth:`absorb_counter` for a counter without labels."""
        ident = (name, ())
        previous = self._absorbed.get(ident, 0)
        delta = value - previous if value >= previous else value
        self._absorbed[ident] = value
        if delta > 0:
            self._metrics[name].inc(delta)

    def sample(self, name: str, **labels: str) -> float | None:
        """The current value of one sample (for tests and `flatnet status`), None if never set."""
        return self.registry.get_sample_value("flatnet_" + name, labels or None)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _RefreshedRegistry:
    """A registry view that calls *refresh* before each scrape (collectors read counters then)."""

    def __init__(self, registry: CollectorRegistry, refresh) -> None:
        self.registry, self.refresh = registry, refresh

    def collect(self):
        self.refresh()
        return self.registry.collect()

    def restricted_registry(self, names):
        self.refresh()
        return self.registry.restricted_registry(names)


def start_exporter(metrics: Metrics, port: int, host: str = "127.0.0.1", before_scrape=None):
    """Serve ``/metrics`` on host:port (port 0: any free port) in a daemon thread.

    *before_scrape*: called (in the exporter's thread) before each scrape, to bring the metrics up
    to date from the cores' counters. Returns ``(server, thread)``; ``server.server_address[1]`` is
    the port; stop it with ``server.shutdown(); server.server_close()``. Loopback by default: see
    the module docstring."""
    registry = metrics.registry if before_scrape is None else _RefreshedRegistry(metrics.registry, before_scrape)
    return start_http_server(port, addr=host, registry=registry)


def metrics_table_markdown() -> str:
    """The metric list as a Markdown table (docs/operations.md is checked against it)."""
    rows = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    for d in METRIC_DEFINITIONS:
        rows.append(f"| `flatnet_{d.name}` | {d.kind} | {', '.join(d.labels) or '-'} | {d.help} |")
    return "\n".join(rows)


# ==== collectors for the sans-I/O cores (call from the I/O layer's periodic tick) ===================


def observe_tunnel(metrics: Metrics, engine, dataplane=None) -> None:
    """Copy a TunnelEngine's (and optionally its Dataplane's) state into *metrics*: peers by state,
    sessions, queued packets, drops by reason, handshakes and bytes."""
    states = {"up": 0, "down": 0, "pending": 0}
    queued = rx = tx = 0
    for status in engine.peers.values():
        states["up" if status.up else "pending" if status.handshake_pending else "down"] += 1
        queued += status.queued_packets
        rx += status.rx_bytes
        tx += status.tx_bytes
    for state, count in states.items():
        metrics["peers"].labels(state=state).set(count)
    metrics["sessions"].set(len(engine._sessions))
    metrics["queued_packets"].set(queued)
    metrics.absorb_counter("drops_total", engine.drops, "reason", component="tunnel")
    # Handshakes: initiations sent, initiations answered, and DH completed on either side (the
    # engine's stats); failed = gave up after REKEY_ATTEMPT_TIME (the data plane counts those events).
    stats = engine.stats
    handshakes = {"initiated": stats.get("initiation-sent", 0), "answered": stats.get("response-sent", 0),
                  "completed": stats.get("handshake-dh", 0)}
    rx_packets = tx_packets = 0
    if dataplane is not None:
        # The data plane's fast path seals and opens without the engine: its per-peer counters.
        for path in list(dataplane.paths.values()):
            rx += path.rx_bytes
            tx += path.tx_bytes
            rx_packets += path.rx_packets
            tx_packets += path.tx_packets
        handshakes["failed"] = dataplane.stats.get("handshakes-failed", 0)
        metrics.absorb_counter("drops_total", dataplane.drops, "reason", component="dataplane")
        metrics.absorb_counter("tunnel_packets_total", {"rx": rx_packets, "tx": tx_packets}, "direction")
    metrics.absorb_counter("tunnel_bytes_total", {"rx": rx, "tx": tx}, "direction")
    metrics.absorb_counter("handshakes_total", handshakes, "outcome")
    metrics.absorb_total("rekeys_total", stats.get("rekeyed", 0))
    metrics.absorb_total("roams_total", stats.get("roamed", 0))


def observe_lighthouse(metrics: Metrics, core, relay_table=None) -> None:
    """Copy a LighthouseCore's (and optionally a RelayTable's) counters into *metrics*."""
    metrics["lighthouse_nodes"].set(len(core))
    received = {k[3:]: v for k, v in core.counters.items() if k.startswith("rx.")}
    metrics.absorb_counter("lighthouse_messages_total", received, "type")
    drops = {k[5:]: v for k, v in core.counters.items() if k.startswith("drop.")}
    metrics.absorb_counter("drops_total", drops, "reason", component="lighthouse")
    if relay_table is not None:
        metrics["relay_sessions"].labels(transport="all").set(len(relay_table))
        for transport, count in relay_table.sessions_by_transport().items():
            metrics["relay_sessions"].labels(transport=transport).set(count)
        counters = relay_table.counters
        metrics.absorb_counter("relay_bytes_total", {
            "all": counters.get("forwarded.bytes", 0),
            "udp": counters.get("forwarded.bytes.udp", 0),
            "tcp": counters.get("forwarded.bytes.tcp", 0),
        }, "transport")
        relay_drops = {k[5:]: v for k, v in relay_table.counters.items() if k.startswith("drop.")}
        metrics.absorb_counter("drops_total", relay_drops, "reason", component="relay")
