"""Token buckets on the caller's clock (`now`): the handshake rate limits (sans-I/O, no timers)."""

from __future__ import annotations

from collections import OrderedDict

from flatnet.proto.constants import (
    HANDSHAKE_BURST,
    HANDSHAKE_BURST_PER_SOURCE,
    HANDSHAKES_PER_SECOND,
    HANDSHAKES_PER_SECOND_PER_SOURCE,
    MAX_RATE_LIMITED_SOURCES,
)


class TokenBucket:
    __slots__ = ("rate", "burst", "tokens", "updated")

    def __init__(self, rate: float, burst: float, now: float | None = None):
        self.rate, self.burst = rate, burst
        self.tokens = burst
        self.updated = now

    def _refill(self, now: float) -> None:
        if self.updated is not None and now > self.updated:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        if self.updated is None or now > self.updated:
            self.updated = now

    def available(self, now: float) -> bool:
        """Would `take` succeed? (no side effect beyond the time-only refill)"""
        self._refill(now)
        return self.tokens >= 1.0

    def take(self, now: float) -> bool:
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class HandshakeRateLimiter:
    """Whether the node is under load, and each source's share when it is.

    Not under load (the global bucket has a token): a handshake is processed and takes the token.
    Under load: only initiations with a valid mac2 (a proven source address) are considered, each
    source at HANDSHAKES_PER_SECOND_PER_SOURCE. The per-source table is bounded (least recently
    used source forgotten first); only proven sources ever enter it.
    """

    def __init__(
        self,
        rate: float = HANDSHAKES_PER_SECOND,
        burst: float = HANDSHAKE_BURST,
        per_source_rate: float = HANDSHAKES_PER_SECOND_PER_SOURCE,
        per_source_burst: float = HANDSHAKE_BURST_PER_SOURCE,
        max_sources: int = MAX_RATE_LIMITED_SOURCES,
    ):
        self._global = TokenBucket(rate, burst)
        self._per_source_rate, self._per_source_burst = per_source_rate, per_source_burst
        self._sources: OrderedDict[object, TokenBucket] = OrderedDict()
        self._max_sources = max_sources

    def under_load(self, now: float) -> bool:
        return not self._global.available(now)

    def take_global(self, now: float) -> bool:
        return self._global.take(now)

    def take_source(self, source, now: float) -> bool:
        bucket = self._sources.get(source)
        if bucket is None:
            bucket = TokenBucket(self._per_source_rate, self._per_source_burst, now)
            self._sources[source] = bucket
            while len(self._sources) > self._max_sources:
                self._sources.popitem(last=False)
        else:
            self._sources.move_to_end(source)
        return bucket.take(now)
