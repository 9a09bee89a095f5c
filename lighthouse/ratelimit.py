"""A token bucket driven by the caller's clock (sans-I/O: ``now`` comes in, nothing reads time)."""

from __future__ import annotations


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; each message takes one.

    Rate and burst are passed to :meth:`take` rather than stored, so the thousands of buckets a
    lighthouse keeps cost two floats each (a :class:`~lighthouse.core.NodeRecord` *is* a bucket).
    A bucket starts full.
    """

    __slots__ = ("tokens", "stamp")

    def __init__(self, burst: float, now: float) -> None:
        self.tokens = float(burst)
        self.stamp = now

    def take(self, now: float, rate: float, burst: float, cost: float = 1.0) -> bool:
        elapsed = now - self.stamp
        if elapsed > 0:  # a clock that steps back refills nothing (and takes nothing away)
            self.tokens = min(burst, self.tokens + elapsed * rate)
            self.stamp = now
        if self.tokens >= cost:
            self.tokens -= cost
            return True
        return False
