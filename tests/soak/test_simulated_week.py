"""A week of continuous operation on a fake clock (flatnet/testing/week.py): real tunnel engines,
a lighthouse, NATs, roaming, daily fault hours, every timer — with invariants checked every hour.
And proof that the invariant checks can fail."""

from __future__ import annotations

import pytest

from flatnet.testing.simnet import drop_matching
from flatnet.testing.week import DAY, WEEK, Week


@pytest.mark.timeout(900)
def test_a_simulated_week_keeps_every_invariant():
    week = Week(hosts=2, seed=1)
    result = week.run(WEEK)
    print(f"\nsimulated week: {result.wall_seconds:.1f} s wall, {result.cpu_seconds:.1f} s CPU; "
          f"{result.handshakes} handshakes ({result.rekeys} rekeys), {result.packets_sent} packets "
          f"({result.packets_delivered} delivered, {result.packets_excused} lost in fault windows), "
          f"{result.roams} roams, {result.service_changes} container changes, {result.checks} checks, "
          f"drops in fault windows {dict(result.fault_drops)}")
    assert not result.violations, "\n".join(result.violations)
    assert result.rekeys >= 5000
    assert result.checks >= 7 * 24
    assert result.roams >= 7 * 24 * 3600 // week.roam_every - 1
    assert result.service_changes >= 7 * 24 * 60 - 1
    assert result.fault_drops, "the daily fault hours should have made the engines drop something"
    assert result.packets_delivered >= 0.98 * result.packets_sent
    assert result.packets_delivered + result.packets_excused <= result.packets_sent


def test_the_checks_catch_a_lost_key():
    week = Week(hosts=2, seed=2, faults=False, roam_every=0)
    week.start()
    week.net.run_for(1800)
    host = week.hosts[0]
    for peer in host.engine._peers.values():  # forget every key this host holds, behind the engine's back
        for session in peer.sessions():
            host.engine._retire(session)
        peer.current = peer.previous = peer.next = None
    week.check()
    assert any("no counterpart" in v for v in week.violations), week.violations


def test_the_checks_catch_lost_packets_outside_a_fault():
    week = Week(hosts=2, seed=3, faults=False, roam_every=0)
    week.start()
    week.net.run_for(600)
    week.net.add_tamper(drop_matching(lambda d: True))  # a black hole nobody declared as a fault
    week.net.run_for(DAY / 24)
    week.check()
    assert any("never arrived" in v for v in week.violations), week.violations
