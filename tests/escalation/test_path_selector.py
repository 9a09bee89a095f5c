"""PathSelector alone, on hand-driven time: every rule of flatnet/escalation.py's docstring."""

from __future__ import annotations

import itertools
import random

import pytest

from flatnet.escalation import EscalationSettings, Path, PathSelector, Rung

LAN = Path(Rung.DIRECT_LAN, ("192.168.1.20", 4242))
LAN2 = Path(Rung.DIRECT_LAN, ("192.168.1.21", 4242))
PUNCHED = Path(Rung.PUNCHED, ("198.51.100.2", 40000))
UDP_RELAY = Path(Rung.UDP_RELAY, "relay-udp")
TCP_RELAY = Path(Rung.TCP_RELAY, "relay-tcp")


def counter_bytes():
    n = itertools.count()
    return lambda size: next(n).to_bytes(size, "big")


class Driver:
    """Runs a selector's timer; answers probes on the paths in `working` (after `rtt`)."""

    def __init__(self, selector: PathSelector, working=(), rtt: float = 0.02, loss: float = 0.0, seed: int = 1):
        self.selector, self.working, self.rtt, self.loss = selector, set(working), rtt, loss
        self.now = 0.0
        self.rng = random.Random(seed)
        self.pending: list[tuple[float, Path, bytes]] = []
        self.probes: list = []

    def run_until(self, end: float) -> None:
        while True:
            timer = self.selector.get_timer()
            due = [t for t in (timer, *(p[0] for p in self.pending)) if t is not None]
            when = max(min(due), self.now) if due else None
            if when is None or when > end:
                break
            self.now = when
            for item in sorted((p for p in self.pending if p[0] <= self.now), key=lambda p: p[0]):
                self.pending.remove(item)
                self.selector.pong_received(item[1], item[2], self.now)
            for probe in self.selector.tick(self.now):
                self.probes.append((self.now, probe))
                if probe.path in self.working and self.rng.random() >= self.loss:
                    self.pending.append((self.now + self.rtt, probe.path, probe.nonce))
        self.now = end


def selector(now: float = 0.0, **settings) -> PathSelector:
    return PathSelector(EscalationSettings(**settings), counter_bytes(), now)


def test_first_path_is_used_at_once_and_a_relay_is_preferred_while_nothing_is_confirmed():
    s = selector()
    s.add_path(LAN, 0.0)
    assert s.current() == LAN and not s.confirmed
    s.add_path(UDP_RELAY, 0.0)
    assert s.current() == UDP_RELAY and not s.confirmed  # works through any NAT: the better guess
    s.add_path(TCP_RELAY, 0.0)
    assert s.current() == UDP_RELAY
    reasons = [e.reason for e in iter(s.next_event, None)]
    assert reasons == ["first", "fallback"]


def test_confirmed_direct_path_wins_and_probes_cover_every_candidate():
    s = selector()
    for p in (UDP_RELAY, LAN, PUNCHED):
        s.add_path(p, 0.0)
    d = Driver(s, working={UDP_RELAY, LAN, PUNCHED})
    d.run_until(2.0)
    assert s.current() == LAN and s.confirmed
    assert {p.path for _, p in d.probes} == {UDP_RELAY, LAN, PUNCHED}


class AlternatingDriver(Driver):
    """Answers only every other probe on `flaky` (a path that works now and then)."""

    def __init__(self, *args, flaky=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.flaky, self.flip = flaky, False

    def run_until(self, end):
        original = self.selector.tick

        def tick(now):
            probes = original(now)
            for probe in probes:
                if probe.path == self.flaky:
                    self.flip = not self.flip
                    if self.flip:
                        self.working.discard(self.flaky)
                    else:
                        self.working.add(self.flaky)
            return probes

        self.selector.tick = tick
        try:
            super().run_until(end)
        finally:
            self.selector.tick = original


def test_upgrade_needs_confirmations_in_a_row_which_are_asked_for_at_once():
    s = selector(confirmations=3)
    s.add_path(UDP_RELAY, 0.0)
    s.add_path(PUNCHED, 0.0)
    d = Driver(s, working={UDP_RELAY})
    d.run_until(3.0)
    assert s.current() == UDP_RELAY and s.confirmed
    d.working.add(PUNCHED)
    d.run_until(d.now + 6.0)
    switch = [e for e in iter(s.next_event, None) if e.new == PUNCHED]
    assert len(switch) == 1 and s.counters["switch.upgrade"] == 1
    # three PINGs answered in a row, the 2nd and 3rd sent as soon as the one before was answered
    pings = [t for t, p in d.probes if p.path == PUNCHED and t <= switch[0].at]
    assert pings[-1] - pings[-3] == pytest.approx(2 * d.rtt)
    assert s.state(PUNCHED).streak >= 3


def test_a_path_answering_every_other_probe_is_never_taken():
    s = selector(confirmations=2)
    s.add_path(UDP_RELAY, 0.0)
    s.add_path(PUNCHED, 0.0)
    d = AlternatingDriver(s, working={UDP_RELAY}, flaky=PUNCHED)
    d.run_until(120)
    assert s.current() == UDP_RELAY
    assert s.counters["switch.upgrade"] == 0 and s.state(PUNCHED).last_pong_at is not None


def test_current_path_is_dropped_only_when_dead_and_then_held_down():
    s = selector()
    s.add_path(UDP_RELAY, 0.0)
    s.add_path(PUNCHED, 0.0)
    d = Driver(s, working={UDP_RELAY, PUNCHED})
    d.run_until(5.0)
    assert s.current() == PUNCHED
    d.working.discard(PUNCHED)
    d.run_until(d.now + 0.1)  # a PONG already on its way still arrives
    last_pong = s.state(PUNCHED).last_pong_at
    d.run_until(last_pong + 6.0)
    assert s.current() == PUNCHED  # quiet, suspect, not dead yet
    d.run_until(last_pong + 6.6)
    assert s.current() == UDP_RELAY
    events = [e for e in iter(s.next_event, None)]
    assert events[-1].reason == "dead" and events[-1].old == PUNCHED
    state = s.state(PUNCHED)
    assert state.holddown_until == pytest.approx(s.settings.holddown + state.last_failure_at)
    # it works again at once, but the hold-down keeps the selector from taking it back yet
    d.working.add(PUNCHED)
    d.run_until(state.holddown_until - 0.1)
    assert s.current() == UDP_RELAY
    d.run_until(state.holddown_until + 11)
    assert s.current() == PUNCHED


def test_a_held_down_path_that_answers_is_taken_when_nothing_else_does():
    """The relay is the only path that works (symmetric NAT); it restarts: the path dies and is
    held down. When it answers again (the mux probes it at once on the relay's BIND_ACK) it is
    taken back before the hold-down ends: a hold-down never leaves a peer without a path."""
    s = selector()
    s.add_path(UDP_RELAY, 0.0)
    s.add_path(LAN, 0.0)  # a LAN address of the peer's that never answers
    d = Driver(s, working={UDP_RELAY})
    d.run_until(20.0)
    assert s.current() == UDP_RELAY and s.confirmed
    d.working.clear()
    state = s.state(UDP_RELAY)
    while state.last_failure_at is None:
        d.run_until(d.now + 0.1)
    d.run_until(d.now + 2.5)  # the guess has had its chance (probe_timeout)
    assert s.current() == LAN and not s.confirmed  # a guess: the relay died and is held down
    d.working.add(UDP_RELAY)  # the relay is back
    s.probe_now(d.now, UDP_RELAY)
    d.run_until(d.now + 0.1)
    assert d.now < state.holddown_until
    assert s.current() == UDP_RELAY and s.confirmed
    assert [e.reason for e in iter(s.next_event, None)][-1] == "only-path"


def test_a_ping_heard_on_a_quiet_path_has_it_probed_at_once():
    s = selector()
    s.add_path(UDP_RELAY, 0.0)
    s.add_path(LAN, 0.0)
    d = Driver(s, working={LAN})
    d.run_until(60.0)  # the relay is a standby path, probed every standby_interval, not alive
    state = s.state(UDP_RELAY)
    assert state.next_probe_at > d.now + 1.0 and not state.alive(d.now, s.settings.dead_after)
    state.outstanding.clear()
    s.heard_from(UDP_RELAY, d.now)
    assert [p.path for p in s.tick(d.now)] == [UDP_RELAY]
    s.heard_from(UDP_RELAY, d.now)  # a PING is outstanding: no second one
    assert s.tick(d.now) == []
    s.heard_from(LAN, d.now)  # alive: nothing to do
    assert s.state(LAN).next_probe_at > d.now


def test_hold_down_doubles_for_a_path_that_keeps_failing():
    s = selector()
    s.add_path(UDP_RELAY, 0.0)
    s.add_path(PUNCHED, 0.0)
    d = Driver(s, working={UDP_RELAY, PUNCHED})
    holddowns = []
    for _ in range(4):
        d.run_until(d.now + 80)
        assert s.current() == PUNCHED
        d.working.discard(PUNCHED)
        d.run_until(d.now + 8)
        state = s.state(PUNCHED)
        holddowns.append(round(state.holddown_until - state.last_failure_at, 3))
        d.working.add(PUNCHED)
    assert holddowns == [5.0, 10.0, 20.0, 40.0]


def test_keeps_the_current_path_among_equals_while_it_answers():
    s = selector()
    s.add_path(LAN, 0.0)
    s.add_path(LAN2, 0.0)
    d = Driver(s, working={LAN, LAN2}, loss=0.05)
    d.run_until(120)
    switches = [e for e in iter(s.next_event, None)]
    assert len(switches) == 1 and s.current() == LAN


def test_no_flapping_between_rungs_under_loss():
    s = selector()
    for p in (UDP_RELAY, TCP_RELAY, PUNCHED):
        s.add_path(p, 0.0)
    d = Driver(s, working={UDP_RELAY, TCP_RELAY, PUNCHED}, loss=0.0975, seed=7)  # 5 % each way
    d.run_until(1800)
    events = list(iter(s.next_event, None))
    assert [e.new for e in events][-1] == PUNCHED
    assert len(events) == 2, events  # first (relay), then punched; never back and forth
    assert s.counters["probe-lost"] > 50


def test_roaming_forgets_confirmations_and_falls_back_to_the_relay():
    s = selector()
    s.add_path(UDP_RELAY, 0.0)
    s.add_path(PUNCHED, 0.0)
    d = Driver(s, working={UDP_RELAY, PUNCHED})
    d.run_until(5)
    assert s.current() == PUNCHED
    s.underlay_changed(d.now)
    assert s.current() == UDP_RELAY and not s.confirmed
    assert all(s.state(p).last_pong_at is None for p in s.paths())
    assert s.get_timer() == d.now  # everything is probed at once
    d.run_until(d.now + 2)
    assert s.current() == PUNCHED


def test_pongs_must_answer_our_pings_on_that_path_in_time():
    s = selector()
    s.add_path(UDP_RELAY, 0.0)
    s.add_path(PUNCHED, 0.0)
    probes = {p.path: p for p in s.tick(0.0)}
    assert not s.pong_received(PUNCHED, b"\x00" * 8 if probes[PUNCHED].nonce != b"\x00" * 8 else b"x" * 8, 0.1)
    assert not s.pong_received(PUNCHED, probes[UDP_RELAY].nonce, 0.1)  # nonce of another path
    assert not s.pong_received(PUNCHED, probes[PUNCHED].nonce, 2.5)  # too late
    assert s.counters["pong-unexpected"] == 3
    assert s.current() == UDP_RELAY and not s.confirmed


def test_time_and_bytes_per_rung():
    s = selector()
    s.add_path(UDP_RELAY, 0.0)
    s.add_path(PUNCHED, 0.0)
    s.record_sent(100)
    d = Driver(s, working={UDP_RELAY, PUNCHED})
    d.run_until(1.0)
    s.record_sent(1000)
    s.record_received(PUNCHED, 70)
    seconds = s.rung_seconds(10.0)
    switched = next(e.at for e in iter(s.next_event, None) if e.new == PUNCHED)
    assert seconds[Rung.UDP_RELAY] == pytest.approx(switched)
    assert seconds[Rung.PUNCHED] == pytest.approx(10.0 - switched)
    assert s.bytes_sent == {Rung.UDP_RELAY: 100, Rung.PUNCHED: 1000}
    assert s.bytes_received == {Rung.PUNCHED: 70}


def test_removing_the_current_path_reselects():
    s = selector()
    s.add_path(UDP_RELAY, 0.0)
    s.add_path(PUNCHED, 0.0)
    d = Driver(s, working={UDP_RELAY, PUNCHED})
    d.run_until(3)
    s.remove_path(PUNCHED, d.now)
    assert s.current() == UDP_RELAY
    s.remove_path(UDP_RELAY, d.now)
    assert s.current() is None and s.paths() == []


def test_the_selector_module_does_no_io():
    import ast
    from pathlib import Path as FilePath

    import flatnet.escalation

    tree = ast.parse(FilePath(flatnet.escalation.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"asyncio", "socket", "time", "selectors", "threading"}
