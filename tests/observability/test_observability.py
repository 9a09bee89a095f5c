"""The metrics vocabulary, the exporter's binding, and structured (JSON) log events."""

from __future__ import annotations

import io
import json
import logging
import re
import urllib.request
from pathlib import Path

import pytest

from flatnet import observability as obs

DOCS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def test_every_metric_is_flatnet_prefixed_and_each_process_has_its_own_registry():
    a, b = obs.Metrics(), obs.Metrics()
    a["rekeys_total"].inc(3)
    assert a.sample("rekeys_total") == 3
    assert b.sample("rekeys_total") == 0  # not the global registry: b saw nothing
    names = {m.name for m in a.registry.collect()}
    assert names and all(n.startswith("flatnet_") for n in names)
    assert len({d.name for d in obs.METRIC_DEFINITIONS}) == len(obs.METRIC_DEFINITIONS)
    for d in obs.METRIC_DEFINITIONS:
        assert re.fullmatch(r"[a-z][a-z0-9_]*", d.name), d.name
        assert (d.kind == "counter") == d.name.endswith("_total"), d.name


def test_absorbing_a_core_counter_adds_only_the_difference():
    m = obs.Metrics()
    drops = {"bad-mac": 3, "replayed": 1}
    m.absorb_counter("drops_total", drops, "reason", component="tunnel")
    m.absorb_counter("drops_total", drops, "reason", component="tunnel")  # same counts: nothing added
    assert m.sample("drops_total", component="tunnel", reason="bad-mac") == 3
    m.absorb_counter("drops_total", {"bad-mac": 10, "replayed": 1}, "reason", component="tunnel")
    assert m.sample("drops_total", component="tunnel", reason="bad-mac") == 10
    # a core that restarted from zero: its new counts are added, the metric never goes backwards
    m.absorb_counter("drops_total", {"bad-mac": 2}, "reason", component="tunnel")
    assert m.sample("drops_total", component="tunnel", reason="bad-mac") == 12
    assert m.sample("drops_total", component="lighthouse", reason="bad-mac") is None


def test_exporter_serves_metrics_on_loopback_only_by_default():
    m = obs.Metrics()
    m["handshakes_total"].labels(outcome="completed").inc()
    server, thread = obs.start_exporter(m, 0)
    try:
        host, port = server.server_address[:2]
        assert host == "127.0.0.1"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
        assert 'flatnet_handshakes_total{outcome="completed"} 1.0' in text
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_json_logging_writes_one_object_per_line_with_the_event_fields():
    stream = io.StringIO()
    handler = obs.setup_logging(json=True, level="DEBUG", stream=stream)
    try:
        log = logging.getLogger("flatnet.test")
        obs.log_event(log, obs.PEER_UP, peer="10.87.2.1", endpoint="192.0.2.7:4242")
        obs.log_event(log, obs.PACKET_DROPPED, logging.WARNING, reason="bad-mac", count=5)
        log.info("plain message")
    finally:
        logging.getLogger().removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line.get("event") for line in lines] == ["peer.up", "packet.dropped", None]
    assert lines[0]["peer"] == "10.87.2.1" and lines[0]["level"] == "info" and lines[0]["logger"] == "flatnet.test"
    assert lines[1]["count"] == 5 and lines[1]["level"] == "warning"
    assert lines[2]["msg"] == "plain message"
    assert all(line["ts"].endswith("Z") for line in lines)


def test_text_logging_appends_fields_and_setup_is_idempotent():
    stream = io.StringIO()
    obs.setup_logging(json=False, level="INFO", stream=io.StringIO())
    handler = obs.setup_logging(json=False, level="INFO", stream=stream)
    try:
        marked = [h for h in logging.getLogger().handlers if getattr(h, "_flatnet_handler", False)]
        assert marked == [handler]
        obs.log_event(logging.getLogger("flatnet.test"), obs.ROUTE_PUSHED, route="web")
    finally:
        logging.getLogger().removeHandler(handler)
    assert "event=route.pushed" in stream.getvalue() and "route=web" in stream.getvalue()


def test_events_outside_the_vocabulary_are_refused():
    log = logging.getLogger("flatnet.test")
    with pytest.raises(ValueError, match="unknown log event"):
        obs.log_event(log, "peer.upp")
    with pytest.raises(ValueError, match="clash"):
        obs.log_event(log, obs.PEER_UP, msg_extra=1, name="x")
    assert {"peer.up", "peer.down", "handshake.failed", "route.pushed", "cni.add", "packet.dropped"} <= obs.EVENTS


def test_operations_manual_lists_every_metric_and_event():
    text = DOCS.read_text()
    for d in obs.METRIC_DEFINITIONS:
        assert f"flatnet_{d.name}" in text, d.name
    for event in obs.EVENTS:
        assert f"`{event}`" in text, event


def test_observe_tunnel_and_lighthouse_from_real_cores():
    """The collectors read real engines: a week's first simulated minutes give peers, sessions,
    lighthouse nodes and message counts."""
    from flatnet.testing.week import Week

    week = Week(hosts=2, seed=4, faults=False, roam_every=0)
    week.start()
    week.net.run_for(120)
    m = obs.Metrics()
    host = week.hosts[0]
    host.engine.drops["replay"] += 2  # as if two replayed datagrams had come in
    obs.observe_tunnel(m, host.engine)
    assert m.sample("peers", state="up") == 2  # the other host and the lighthouse
    assert m.sample("sessions") >= 2
    assert m.sample("drops_total", component="tunnel", reason="replay") == 2
    assert m.sample("tunnel_bytes_total", direction="rx") > 0
    obs.observe_lighthouse(m, week.lighthouse.core)
    assert m.sample("lighthouse_nodes") == 2
    assert m.sample("lighthouse_messages_total", type="Register") >= 2
    text = m.exposition().decode()
    assert 'flatnet_peers{state="up"} 2.0' in text
    # Rekeys and roams are fed from the engine's counters (absorbed: a second call adds nothing).
    host.engine.stats["rekeyed"] += 3
    host.engine.stats["roamed"] += 1
    obs.observe_tunnel(m, host.engine)
    obs.observe_tunnel(m, host.engine)
    assert m.sample("rekeys_total") == host.engine.stats["rekeyed"] >= 3
    assert m.sample("roams_total") == 1
