"""Fault test: the relay restarts under live traffic (issue 7), in the real NAT lab.

A pair that can only meet through the relay (one symmetric NAT: the UDP relay rung; UDP blocked
on one side: the TCP relay rung for that side) carries a TCP stream and a steady ping when the
lighthouse that serves the relay is killed (SIGKILL) and started again on the same address with
the same config, hence an empty relay table. Relay sessions are soft state: each node re-BINDs its
session with the token it already holds, the relay re-creates the session from the token, and
traffic resumes without asking the lighthouse for anything.

Checked: the stream arrives intact (one TCP connection across the restart); the longest ping gap
(the outage) is within the bound below; each peer ends on a relay rung, confirmed, with one relay
session (the same one as before: not re-requested); the relay's table holds exactly that session.

The bound (``bound()``): the relay is down from the kill until it listens again
(``restart_seconds``, measured: the pause plus a Python start-up). While it is down every BIND
goes unanswered, so each node re-BINDs every ``unacked_rebind_interval`` (1 s); a TCP relay
connection reconnects within its backoff (``backoff_max``, 2 s) and re-BINDs on connecting. A
restart quicker than that can fall between two keepalive BINDs (every 5 s): then the relay path's
silence is noticed after ``suspect_after`` (3 s) and it is re-bound at once. So traffic is back
within max(restart + 1 s (UDP) or + 2 s (TCP), 3 s) plus ``SLACK`` for the ping spacing, a
probe round trip and a machine shared with other test runs.
"""

from __future__ import annotations

import time

import pytest

from flatnet.lab.nat import CONE, LIGHTHOUSE_ADDRESS, SYMMETRIC
from flatnet.testing.markers import needs_root, require_tools
from tests.escalation.lab_harness import (
    FLATNET,
    SECOND_LIGHTHOUSE_ADDRESS,
    longest_gap,
    node_status,
    wait_for_rung,
)

pytestmark = [pytest.mark.slow, needs_root, require_tools("nft", "ping")]

A_IP, B_IP = FLATNET["a"], FLATNET["b"]
# seconds between the kill and the restart: a quick restart (systemd's default RestartSec=100ms
# plus our start-up), and a crash left down for a while (a supervisor with RestartSec=8s)
DOWN = [pytest.param(1.0, id="quick"), pytest.param(8.0, id="down-8s")]
UNACKED_REBIND, TCP_BACKOFF_MAX, SUSPECT_AFTER = 1.0, 2.0, 3.0  # PathMux, RelayStreamConnection, EscalationSettings
SLACK = 2.0


def bound(restart_seconds: float, transport: str) -> float:
    back = restart_seconds + (UNACKED_REBIND if transport == "udp" else TCP_BACKOFF_MAX)
    return max(back, SUSPECT_AFTER) + SLACK


def _restart_relay_under_traffic(lab, down: float, total: int = 1_500_000, seconds: float = 20.0):
    """Stream + ping; kill the relay, wait *down*, start it; returns (outage, restart_seconds)."""
    pinger = lab.pinger()
    server, client = lab.stream(total, seconds)
    time.sleep(4)
    killed_at = time.time()
    lab.kill_relay()
    time.sleep(down)
    lab.start_relay()
    restart_seconds = time.time() - killed_at
    sent, _ = client.communicate(timeout=120)
    received, _ = server.communicate(timeout=30)
    replies = pinger.finish()
    outage = longest_gap(replies, killed_at, time.time())
    print(f"relay down {restart_seconds:.2f}s (kill to listening), ping outage {outage:.2f}s")
    # one connection, intact
    assert sent == received and sent.split()[0] == str(total // 16384 * 16384), (sent, received, _diagnostics(lab))
    return outage, restart_seconds


def _diagnostics(lab) -> dict:
    """What a failure message shows: each node's escalation status."""
    return {name: node_status(node)["escalation"] for name, node in (("a", lab.a), ("b", lab.b))}


def _assert_one_live_relay_session(lab, peer_statuses, session_before):
    for status, rung in peer_statuses:
        assert status["rung"] == rung and status["confirmed"], status
        assert len(status["relays"]) == 1, status["relays"]  # one session per pair, never re-requested
        assert status["relays"][0]["session"] == session_before
        assert status["relays"][0]["acked_ago"] is not None and status["relays"][0]["acked_ago"] < 10
    metrics = lab.relay_metrics()
    assert metrics['flatnet_relay_sessions{transport="all"}'] == 1  # only the live session


@pytest.mark.parametrize("down", DOWN)
def test_udp_relay_restart_recovers_within_the_rebind_bound(make_lab, down):
    lab = make_lab(nat_a=SYMMETRIC, nat_b=CONE)
    lab.transfer_intact()
    wait_for_rung(lab.a, B_IP, "udp-relay")
    wait_for_rung(lab.b, A_IP, "udp-relay")
    session = node_status(lab.a)["escalation"]["peers"][B_IP]["relays"][0]["session"]

    outage, restart_seconds = _restart_relay_under_traffic(lab, down)

    assert outage < bound(restart_seconds, "udp"), (outage, restart_seconds, _diagnostics(lab))
    a = node_status(lab.a)["escalation"]["peers"][B_IP]
    b = node_status(lab.b)["escalation"]["peers"][A_IP]
    # still UDP: a relay that was down is not mistaken for a firewall that blocks UDP
    assert a["relays"][0]["transport"] == "udp" and b["relays"][0]["transport"] == "udp"
    _assert_one_live_relay_session(lab, [(a, "udp-relay"), (b, "udp-relay")], session)


@pytest.mark.parametrize("down", DOWN)
def test_tcp_relay_restart_reconnects_and_rebinds(make_lab, down):
    lab = make_lab(nat_a=CONE, nat_b=CONE)
    lab.transfer_intact()
    wait_for_rung(lab.a, B_IP, "punched")
    lab.lab.block_udp("a")  # A's network lets only TCP out: A's side of the session is on TCP
    wait_for_rung(lab.a, B_IP, "tcp-relay", timeout=40)
    wait_for_rung(lab.b, A_IP, "udp-relay")
    session = node_status(lab.a)["escalation"]["peers"][B_IP]["relays"][0]["session"]

    outage, restart_seconds = _restart_relay_under_traffic(lab, down)

    assert outage < bound(restart_seconds, "tcp"), (outage, restart_seconds, _diagnostics(lab))
    status = node_status(lab.a)["escalation"]
    a = status["peers"][B_IP]
    b = node_status(lab.b)["escalation"]["peers"][A_IP]
    assert a["relays"][0]["transport"] == "tcp" and b["relays"][0]["transport"] == "udp"
    _assert_one_live_relay_session(lab, [(a, "tcp-relay"), (b, "udp-relay")], session)
    (connection,) = status["relay_tcp"].values()
    assert connection["connected"] and connection["connect"] >= 2 and connection["closed-by-relay"] >= 1


def test_a_relay_that_stays_dead_is_replaced_by_the_second_lighthouses_relay(make_lab):
    """Two lighthouses, each serving a relay; the relay the pair uses dies for good (its lighthouse
    killed, not restarted). After ``relay_dead_after`` (15 s) without a BIND_ACK, the lower IP asks
    the lighthouse that acknowledged it last (the live one) for a new session: both move to the
    other relay, and the dead session is dropped."""
    lab = make_lab(lighthouses=2, nat_a=SYMMETRIC, nat_b=CONE)
    lab.transfer_intact()
    wait_for_rung(lab.a, B_IP, "udp-relay")
    wait_for_rung(lab.b, A_IP, "udp-relay")
    path = node_status(lab.a)["escalation"]["peers"][B_IP]["path"]
    used, other = (lab.lighthouse, SECOND_LIGHTHOUSE_ADDRESS) if LIGHTHOUSE_ADDRESS in path else (lab.lighthouse2, LIGHTHOUSE_ADDRESS)
    pinger = lab.pinger()
    time.sleep(2)
    killed_at = time.time()
    used.proc.kill()
    used.stop()
    lab.processes.remove(used)
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        a = node_status(lab.a)["escalation"]["peers"][B_IP]
        if a["confirmed"] and other in (a["path"] or ""):
            break
        time.sleep(0.5)
    time.sleep(2)
    replies = pinger.finish()
    outage = longest_gap(replies, killed_at, time.time())
    print(f"relay failover: ping outage {outage:.2f}s")
    for node, peer in ((lab.a, B_IP), (lab.b, A_IP)):
        status = node_status(node)["escalation"]
        peer_status = status["peers"][peer]
        assert peer_status["rung"] == "udp-relay" and peer_status["confirmed"] and other in peer_status["path"]
        assert len(peer_status["relays"]) == 1  # the dead session was dropped ...
        assert list(status["relay_tcp"]) == [f"{other}:443"]  # ... and the dead relay's connection
    assert node_status(lab.a)["escalation"]["discovery"]["counters"]["relay-dead"] >= 1
    # 15 s without an ACK (the last keepalive BIND up to 5 s before the death) + asking + binding
    assert outage < 15.0 + 5.0 + SLACK + 3.0, outage
    lab.transfer_intact()
