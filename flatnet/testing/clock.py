"""A fake clock for tests: time moves only when the test says so.

Protocol objects take ``now`` as an argument and never read a clock; the code around them (the node's
``tick(now)`` loops, the simulated network) reads it from one place. In tests that place is a
:class:`FakeClock`::

    clock = FakeClock(start=1000.0)
    tunnel.handle_timer(clock.now)
    clock.advance(120)                 # two minutes pass, instantly
    clock.call_at(clock.now + 5, retry)   # runs when a later advance() passes that time

``clock()`` returns ``clock.now`` too, so a FakeClock can stand in wherever a ``time.time``- or
``loop.time``-like callable is injected.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(order=True)
class ScheduledCall:
    """A callback registered with :meth:`FakeClock.call_at`; ``cancel()`` it to skip it."""

    when: float
    seq: int
    callback: Callable[[], object] = field(compare=False)
    cancelled: bool = field(default=False, compare=False)

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """Simulated time in seconds. Monotonic: it never goes backwards."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)
        self._calls: list[ScheduledCall] = []
        self._seq = itertools.count()

    @property
    def now(self) -> float:
        return self._now

    def __call__(self) -> float:
        return self._now

    def __repr__(self) -> str:
        return f"FakeClock(now={self._now!r}, pending={self.pending()})"

    def call_at(self, when: float, callback: Callable[[], object]) -> ScheduledCall:
        """Run *callback* when the clock reaches *when* (during advance/advance_to/run_due)."""
        call = ScheduledCall(float(when), next(self._seq), callback)
        heapq.heappush(self._calls, call)
        return call

    def call_later(self, delay: float, callback: Callable[[], object]) -> ScheduledCall:
        return self.call_at(self._now + delay, callback)

    def pending(self) -> int:
        return sum(1 for call in self._calls if not call.cancelled)

    def next_call_time(self) -> float | None:
        while self._calls and self._calls[0].cancelled:
            heapq.heappop(self._calls)
        return self._calls[0].when if self._calls else None

    def advance(self, dt: float) -> float:
        """Move time forward by *dt* seconds, running due callbacks in time order; returns now."""
        if dt < 0:
            raise ValueError(f"time does not go backwards (advance({dt}))")
        return self.advance_to(self._now + dt)

    def advance_to(self, when: float) -> float:
        """Move time forward to *when*; each due callback runs with ``now`` set to its own time."""
        if when < self._now:
            raise ValueError(f"time does not go backwards ({when} < now {self._now})")
        while True:
            next_time = self.next_call_time()
            if next_time is None or next_time > when:
                break
            call = heapq.heappop(self._calls)
            self._now = max(self._now, call.when)
            call.callback()
        self._now = float(when)
        return self._now

    def run_due(self) -> int:
        """Run callbacks already due at ``now`` (e.g. ones scheduled for the past); returns how many."""
        ran = 0
        while (next_time := self.next_call_time()) is not None and next_time <= self._now:
            heapq.heappop(self._calls).callback()
            ran += 1
        return ran
