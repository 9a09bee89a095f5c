"""Graceful Escalation: which path carries a peer's traffic, sans-I/O.

Theory of operation
-------------------
A node may reach a peer over several *paths*, each on a *rung* of a ladder, best first::

    DIRECT_LAN  the peer's own (LAN) address, no NAT between us
    PUNCHED     the peer's public address (its NAT mapping, as a lighthouse observed it), reached
                by both sides sending at once (hole punching)
    UDP_RELAY   a relay session over UDP (symmetric NAT on one side)
    TCP_RELAY   the same relay session over TCP, e.g. port 443 (UDP blocked)

One :class:`PathSelector` per peer decides, from ``now`` and events, which path the tunnel's
datagrams take. It never touches a socket: it returns :class:`Probe` values to send, exposes
``current()`` (the path to send on now) and ``get_timer()``, and queues :class:`PathChanged`
events. The node's I/O glue (``flatnet/node/paths.py``) carries probes out and reports PONGs
back with :meth:`pong_received`.

Rules (Tailscale's magicsock works the same way; the numbers are :class:`EscalationSettings`):

- **Never wait.** Until some path is confirmed, ``current()`` is a *fallback*: a relay path if
  one exists (UDP before TCP), else the best direct candidate. Packets go out at once while
  probes try every candidate in parallel (``discovery_interval``, ``discovery_probes`` times).
- **Confirmed** = a PONG to one of our PINGs on that path. A path is *alive* while its last
  PONG is younger than ``dead_after``.
- **Step down (upgrade)** to a better rung only when that path has answered
  ``confirmations`` probes in a row and is not held down. Better candidates are re-probed every
  ``upgrade_interval`` while a worse rung carries the traffic: when UDP comes back, the node
  returns to direct by itself.
- **Step up (downgrade)** only when the current path is *dead*. The current path is probed every
  ``keepalive_interval``; once ``suspect_after`` passes without a PONG it is probed every
  ``discovery_interval``, so a path is declared dead only after many lost probes in a row
  (at 5 % loss each way, ~14 probes lost in a row: never in practice). A path that died is held
  down (not taken again) for ``holddown`` seconds, doubled per failure up to ``holddown_max``:
  a path that works only now and then does not make the peer flap. A hold-down never leaves a
  peer without a path, though: when nothing else has answered for ``probe_timeout``, a held-down
  path that answers is taken (a relay that restarted is back when it answers, not a hold-down
  later).
- Same rung, different path (two LAN addresses): no switch while the current one answers; once
  it has been quiet for ``suspect_after`` and an equal path answers (the peer roamed and a
  lighthouse told us its new address), that one takes over without waiting for ``dead_after``.
- **Roaming.** :meth:`underlay_changed` (our own address changed) forgets every confirmation
  and re-probes everything at once, sending on the relay meanwhile. A peer that roams is found
  again by its authenticated PINGs from the new address (the glue adds it as a candidate).

Accounting: seconds and bytes per rung (:meth:`rung_seconds`, ``bytes_sent``/``bytes_received``),
and ``counters`` (switches by reason, probes, pongs, late/unknown pongs).
"""

from __future__ import annotations

import enum
import os
from collections import Counter, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass


class Rung(enum.IntEnum):
    DIRECT_LAN = 0
    PUNCHED = 1
    UDP_RELAY = 2
    TCP_RELAY = 3

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")


RELAY_RUNGS = frozenset({Rung.UDP_RELAY, Rung.TCP_RELAY})


@dataclass(frozen=True, slots=True)
class Path:
    """One way to reach a peer. ``address`` is opaque to the selector: a UDP ``(host, port)`` for
    direct rungs, the glue's relay-session key for relay rungs."""

    rung: Rung
    address: Hashable

    def __str__(self) -> str:
        return f"{self.rung.label} {self.address}"


@dataclass(frozen=True)
class EscalationSettings:
    keepalive_interval: float = 2.0  # probe the current path this often while it answers
    suspect_after: float = 3.0  # no PONG on the current path for this long: probe it faster
    discovery_interval: float = 0.5  # fast probing: new candidates, a suspect current path
    discovery_probes: int = 6  # fast probes to a new candidate before slowing to upgrade_interval
    dead_after: float = 6.5  # no PONG for this long: the path is dead
    probe_timeout: float = 2.0  # a PONG later than this does not count (the PING is forgotten)
    upgrade_interval: float = 5.0  # probe better-rung candidates this often
    standby_interval: float = 10.0  # probe worse-rung (fallback) paths this often
    confirmations: int = 2  # PONGs in a row before stepping down to a better rung
    holddown: float = 5.0  # a path that died is not taken again for this long ...
    holddown_max: float = 60.0  # ... doubled per failure up to this
    failure_memory: float = 600.0  # failures older than this no longer double the hold-down


@dataclass(frozen=True, slots=True)
class Probe:
    """Send a PING with *nonce* on *path* (a decision for the I/O layer)."""

    path: Path
    nonce: bytes


@dataclass(frozen=True, slots=True)
class PathChanged:
    old: Path | None
    new: Path | None
    reason: str  # "first" | "upgrade" | "dead" | "roamed" | "fallback" | "removed" | "suspect" | "only-path"
    at: float


class PathState:
    __slots__ = (
        "path", "added_at", "last_pong_at", "streak", "outstanding", "next_probe_at", "fast_probes_left",
        "holddown_until", "failures", "last_failure_at", "rtt",
    )

    def __init__(self, path: Path, now: float, fast_probes: int) -> None:
        self.path = path
        self.added_at = now
        self.last_pong_at: float | None = None
        self.streak = 0  # PONGs in a row (a PING that times out resets it)
        self.outstanding: dict[bytes, float] = {}  # nonce -> sent at
        self.next_probe_at = now
        self.fast_probes_left = fast_probes
        self.holddown_until = 0.0
        self.failures = 0
        self.last_failure_at: float | None = None
        self.rtt: float | None = None

    def alive(self, now: float, dead_after: float) -> bool:
        # compared as a deadline (not now - last < dead_after): get_timer() returns exactly this
        return self.last_pong_at is not None and now < self.last_pong_at + dead_after


class PathSelector:
    """The paths to one peer and the choice among them (see the module docstring)."""

    def __init__(
        self,
        settings: EscalationSettings | None = None,
        random_bytes: Callable[[int], bytes] | None = None,
        now: float = 0.0,
    ) -> None:
        self.settings = settings or EscalationSettings()
        self._random_bytes = random_bytes or os.urandom
        self._paths: dict[Path, PathState] = {}
        self._current: Path | None = None
        self._confirmed_current = False  # False: current() is a fallback nobody has confirmed
        self._events: deque[PathChanged] = deque()
        self._rung_since = now
        self._rung_time: Counter[Rung] = Counter()
        self.bytes_sent: Counter[Rung] = Counter()
        self.bytes_received: Counter[Rung] = Counter()
        self.counters: Counter[str] = Counter()

    # ---- candidates ------------------------------------------------------------------------

    def add_path(self, path: Path, now: float) -> bool:
        """A candidate (from config, a lighthouse answer, a punch notice, a relay offer, an
        authenticated PING from a new address). Returns False if it was known already."""
        if path in self._paths:
            return False
        self._paths[path] = PathState(path, now, self.settings.discovery_probes)
        self.counters["paths-added"] += 1
        if self._current is None or (not self._confirmed_current and self._fallback_rank(path) < self._fallback_rank(self._current)):
            self._switch(self._fallback(now), "first" if self._current is None else "fallback", now, confirmed=False)
        return True

    def remove_path(self, path: Path, now: float) -> None:
        if self._paths.pop(path, None) is None:
            return
        if path == self._current:
            self._reselect(now, "removed")

    def paths(self) -> list[Path]:
        return list(self._paths)

    def state(self, path: Path) -> PathState | None:
        return self._paths.get(path)

    # ---- what to send on -------------------------------------------------------------------

    def current(self) -> Path | None:
        return self._current

    @property
    def confirmed(self) -> bool:
        """Is current() a path that has answered (False: a fallback used while discovering)."""
        return self._confirmed_current

    def next_event(self) -> PathChanged | None:
        return self._events.popleft() if self._events else None

    def record_sent(self, nbytes: int) -> None:
        if self._current is not None:
            self.bytes_sent[self._current.rung] += nbytes

    def record_received(self, path: Path, nbytes: int) -> None:
        self.bytes_received[path.rung] += nbytes

    def rung_seconds(self, now: float) -> dict[Rung, float]:
        out = dict(self._rung_time)
        if self._current is not None:
            out[self._current.rung] = out.get(self._current.rung, 0.0) + (now - self._rung_since)
        return out

    # ---- events in -------------------------------------------------------------------------

    def pong_received(self, path: Path, nonce: bytes, now: float) -> bool:
        """An authenticated PONG arrived on *path*; True if it answered one of our PINGs there."""
        state = self._paths.get(path)
        sent_at = state.outstanding.pop(nonce, None) if state is not None else None
        if sent_at is None or now >= sent_at + self.settings.probe_timeout:
            self.counters["pong-unexpected"] += 1
            return False
        self.counters["pong"] += 1
        earlier = [n for n, t in state.outstanding.items() if t < sent_at]
        if earlier:  # a PING sent before this one went unanswered: the run of answers is broken
            for n in earlier:
                del state.outstanding[n]
            self.counters["probe-lost"] += len(earlier)
            state.streak = 0
        state.last_pong_at = now
        state.streak += 1
        state.rtt = now - sent_at
        if state.streak < self.settings.confirmations and (self._current is None or path.rung < self._current.rung):
            state.next_probe_at = now  # a better path answered: confirm it at once, not a probe interval later
        if path == self._current and not self._confirmed_current:
            self._confirmed_current = True
            self.counters["confirmed"] += 1
        self._reselect(now, "upgrade")
        return True

    def probe_now(self, now: float, path: Path | None = None) -> None:
        """Probe every path that is not alive (only *path*, if given) at once, fast (a punch
        notice; the probe key just became known; a relay acknowledged a BIND again)."""
        for state in self._paths.values():
            if path is not None and state.path != path:
                continue
            if not state.alive(now, self.settings.dead_after):
                state.next_probe_at = now
                state.fast_probes_left = max(state.fast_probes_left, self.settings.discovery_probes)

    def heard_from(self, path: Path, now: float) -> None:
        """An authenticated PING from the peer came by *path*: if that path is not alive here, probe
        it now (once; the peer can reach us that way, so we can likely reach it: both ends of a
        relay that came back find it within one round trip of the later one's return)."""
        state = self._paths.get(path)
        if state is not None and not state.alive(now, self.settings.dead_after) and not state.outstanding:
            state.next_probe_at = min(state.next_probe_at, now)

    def underlay_changed(self, now: float) -> None:
        """Our own underlay address changed: nothing we confirmed is known to work any more."""
        self.counters["underlay-changed"] += 1
        for state in self._paths.values():
            state.last_pong_at = None
            state.streak = 0
            state.outstanding.clear()
            state.next_probe_at = now
            state.fast_probes_left = self.settings.discovery_probes
            state.holddown_until = 0.0
        self._switch(self._fallback(now), "roamed", now, confirmed=False)

    # ---- time ------------------------------------------------------------------------------

    def tick(self, now: float) -> list[Probe]:
        """Expire PINGs, notice dead paths, switch if needed, and return the probes due now."""
        s = self.settings
        for state in self._paths.values():
            for nonce, sent_at in list(state.outstanding.items()):
                if now >= sent_at + s.probe_timeout:
                    del state.outstanding[nonce]
                    state.streak = 0
                    self.counters["probe-lost"] += 1
        current = self._paths.get(self._current) if self._current is not None else None
        if current is not None and self._confirmed_current and not current.alive(now, s.dead_after):
            self._fail(current, now)
            self._reselect(now, "dead")
        probes = []
        for state in self._paths.values():
            if now >= state.next_probe_at:
                probes.append(self._probe(state, now))
        return probes

    def get_timer(self) -> float | None:
        deadlines = [state.next_probe_at for state in self._paths.values()]
        for state in self._paths.values():
            for sent_at in state.outstanding.values():
                deadlines.append(sent_at + self.settings.probe_timeout)
        current = self._paths.get(self._current) if self._current is not None else None
        if current is not None and self._confirmed_current and current.last_pong_at is not None:
            deadlines.append(current.last_pong_at + self.settings.dead_after)
        return min(deadlines) if deadlines else None

    # ---- internals -------------------------------------------------------------------------

    def _probe(self, state: PathState, now: float) -> Probe:
        nonce = self._random_bytes(8)
        state.outstanding[nonce] = now
        self.counters["probe"] += 1
        state.next_probe_at = now + self._probe_interval(state, now)
        if state.fast_probes_left > 0:
            state.fast_probes_left -= 1
        if len(state.outstanding) > 16:  # bounded: forget the oldest
            del state.outstanding[next(iter(state.outstanding))]
        return Probe(state.path, nonce)

    def _probe_interval(self, state: PathState, now: float) -> float:
        s = self.settings
        if state.path == self._current:
            if state.last_pong_at is None or now - state.last_pong_at >= s.suspect_after:
                return s.discovery_interval
            return s.keepalive_interval
        if state.fast_probes_left > 1:
            return s.discovery_interval
        if self._current is None or state.path.rung < self._current.rung:
            return s.upgrade_interval
        return s.standby_interval

    def _usable(self, state: PathState, now: float) -> bool:
        s = self.settings
        return state.alive(now, s.dead_after) and state.streak >= s.confirmations and now >= state.holddown_until

    def _reselect(self, now: float, reason: str) -> None:
        """Keep, upgrade, or fall back, by the rules in the module docstring."""
        s = self.settings
        current = self._paths.get(self._current) if self._current is not None else None
        current_ok = current is not None and self._confirmed_current and current.alive(now, s.dead_after)
        best = None
        for state in self._paths.values():
            if not self._usable(state, now):
                continue
            if best is None or (state.path.rung, state.rtt or 0.0) < (best.path.rung, best.rtt or 0.0):
                best = state
        if current_ok:
            if best is not None and best.path.rung < current.path.rung:
                self._switch(best.path, "upgrade", now, confirmed=True)
            elif (
                best is not None
                and best.path.rung == current.path.rung
                and now - current.last_pong_at >= s.suspect_after
                and best.last_pong_at > current.last_pong_at
            ):  # the current path went quiet and an equal one answers: the peer probably roamed
                self._switch(best.path, "suspect", now, confirmed=True)
            return
        if best is not None:
            self._switch(best.path, reason if reason != "upgrade" else "first", now, confirmed=True)
            return
        # Nothing has answered confirmations times: any alive path (one PONG) beats a guess.
        alive = [st for st in self._paths.values() if st.alive(now, s.dead_after) and now >= st.holddown_until]
        if alive:
            pick = min(alive, key=lambda st: (st.path.rung, st.rtt or 0.0))
            if pick.path != self._current or not self._confirmed_current:
                self._switch(pick.path, reason if reason != "upgrade" else "first", now, confirmed=True)
            return
        # Hold-downs keep a flapping path from displacing a working one; with no working one, a
        # held-down path that answers beats a guess (the only path to the peer came back) once
        # the guess has had a probe's time to answer.
        held = [st for st in self._paths.values() if st.alive(now, s.dead_after)]
        if held and (current is None or now - self._rung_since >= s.probe_timeout):
            pick = min(held, key=lambda st: (st.path.rung, st.rtt or 0.0))
            if pick.path != self._current or not self._confirmed_current:
                self.counters["held-down-taken"] += 1
                self._switch(pick.path, "only-path", now, confirmed=True)
            return
        if current is None or self._confirmed_current:
            self._switch(self._fallback(now), "fallback" if reason == "upgrade" else reason, now, confirmed=False)

    def _fallback_rank(self, path: Path) -> tuple[int, int]:
        # Relays first (they work through any NAT), then direct candidates best rung first.
        return (0, path.rung) if path.rung in RELAY_RUNGS else (1, path.rung)

    def _fallback(self, now: float) -> Path | None:
        candidates = [st for st in self._paths.values() if now >= st.holddown_until] or list(self._paths.values())
        if not candidates:
            return None
        return min(candidates, key=lambda st: (self._fallback_rank(st.path), st.added_at)).path

    def _fail(self, state: PathState, now: float) -> None:
        s = self.settings
        if state.last_failure_at is None or now - state.last_failure_at > s.failure_memory:
            state.failures = 0
        state.failures += 1
        state.last_failure_at = now
        state.holddown_until = now + min(s.holddown * 2 ** (state.failures - 1), s.holddown_max)
        state.streak = 0
        self.counters["path-died"] += 1

    def _switch(self, new: Path | None, reason: str, now: float, confirmed: bool) -> None:
        old = self._current
        self._confirmed_current = confirmed and new is not None
        if new == old:
            return
        if old is not None:
            self._rung_time[old.rung] += now - self._rung_since
        self._rung_since = now
        self._current = new
        self.counters[f"switch.{reason}"] += 1
        self._events.append(PathChanged(old, new, reason, now))
        if new is not None:  # probe the new current path on its own schedule from now
            state = self._paths[new]
            state.next_probe_at = min(state.next_probe_at, now + self._probe_interval(state, now))
