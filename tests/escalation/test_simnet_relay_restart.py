"""The relay restarts under traffic, on the simulated network (fake clock): the in-memory twin of
tests/escalation/test_relay_restart.py. A restart = the relay unreachable for a while, then back
with an empty table (same address, same secret). SimNet carries the TCP rung as datagrams to the
relay's port 443, so this checks the mux and the selector (re-BIND, probing a re-opened relay
path, hold-down); the TCP connection's reconnects are the lab test's part."""

from __future__ import annotations

import pytest

from flatnet.escalation import EscalationSettings, Rung
from flatnet.testing.simnet import SYMMETRIC
from lighthouse.relay_table import RelayTable
from tests.escalation.topology import RELAY_IP, RELAY_SECRET, block_udp, build

CONE = {}
SYMMETRIC_NAT = {"mapping": SYMMETRIC, "filtering": SYMMETRIC}
SETTINGS = EscalationSettings()
UNACKED_REBIND = 1.0  # PathMux.unacked_rebind_interval


def bound(down: float) -> float:
    """The longest outage allowed: the relay back plus one unanswered-BIND interval, or (relay back
    between two keepalive BINDs) the relay path's silence noticed after suspect_after; plus
    a few round trips (SimNet's links: 15 ms) and the traffic's 50 ms spacing."""
    return max(down + UNACKED_REBIND, SETTINGS.suspect_after) + 0.5


def restart_relay(world, down: float) -> float:
    """Cut the relay off for *down* seconds, then bring it back with an empty table; returns the
    time it went down."""
    went_down = world.clock.now
    for host in ("alpha", "bravo"):
        world.net.block(host, RELAY_IP)
    world.net.run_for(down)
    table = RelayTable(RELAY_SECRET)
    for name in ("relay-udp", "relay-tcp"):
        world.net.node(name).protocol.table = table
    world.relay = table
    for host in ("alpha", "bravo"):
        world.net.unblock(host, RELAY_IP)
    return went_down


def outage(world, start: float) -> float:
    """The longest gap between packets B received, from the last one before *start* on."""
    times = [t for t in world.b.received_at if t >= start]
    before = [t for t in world.b.received_at if t < start]
    times = before[-1:] + times
    return max(b - a for a, b in zip(times, times[1:], strict=False))


@pytest.mark.parametrize("down", [1.0, 8.0, 30.0])
def test_udp_relay_restart(down):
    world = build(nat_a=SYMMETRIC_NAT, nat_b=CONE)
    world.start_traffic(int((20 + down + 30) / 0.05))
    world.net.run_for(20)
    assert (world.a.rung(world.b), world.b.rung(world.a)) == (Rung.UDP_RELAY, Rung.UDP_RELAY)
    went_down = restart_relay(world, down)
    world.net.run_for(30)
    gap = outage(world, went_down)
    print(f"down {down}s: outage {gap:.2f}s")
    assert (world.a.rung(world.b), world.b.rung(world.a)) == (Rung.UDP_RELAY, Rung.UDP_RELAY)
    assert world.a.selector(world.b).confirmed and world.b.selector(world.a).confirmed
    assert len(world.relay) == 1  # the same session, re-created from the tokens: nothing stale
    assert world.a.mux.counters["relay.failover-to-tcp"] == world.b.mux.counters["relay.failover-to-tcp"] == 0
    assert gap < bound(down)
    assert world.all_received_intact()


@pytest.mark.parametrize("down", [1.0, 8.0, 30.0])
def test_tcp_relay_restart(down):
    world = build(nat_a=CONE, nat_b=CONE)
    world.start_traffic(int((40 + down + 30) / 0.05))
    world.net.run_for(10)
    block_udp(world, world.a)
    world.net.run_for(30)
    assert (world.a.rung(world.b), world.b.rung(world.a)) == (Rung.TCP_RELAY, Rung.UDP_RELAY)
    went_down = restart_relay(world, down)
    world.net.run_for(30)
    gap = outage(world, went_down)
    print(f"down {down}s: outage {gap:.2f}s")
    assert (world.a.rung(world.b), world.b.rung(world.a)) == (Rung.TCP_RELAY, Rung.UDP_RELAY)
    assert world.a.selector(world.b).confirmed and world.b.selector(world.a).confirmed
    assert len(world.relay) == 1
    assert gap < bound(down)
    assert world.all_received_intact()
