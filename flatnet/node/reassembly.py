"""Putting fragmented DATA_BATCH messages back together (see flatnet/proto/batch.py). Sans-I/O.

Bounded: at most ``max_messages`` partial messages at once (the oldest is forgotten first) and each
waits at most ``timeout`` seconds of the caller's clock. A partial message costs memory only until
then; a forged piece can only make its message fail authentication after reassembly.
"""

from __future__ import annotations

from collections import Counter

from flatnet.proto.batch import Fragment

DEFAULT_TIMEOUT = 2.0
DEFAULT_MAX_MESSAGES = 256


class _Partial:
    __slots__ = ("pieces", "missing", "expiry")

    def __init__(self, count: int, expiry: float) -> None:
        self.pieces: list = [None] * count
        self.missing = count
        self.expiry = expiry


class Reassembly:
    def __init__(self, timeout: float = DEFAULT_TIMEOUT, max_messages: int = DEFAULT_MAX_MESSAGES) -> None:
        self.timeout = timeout
        self.max_messages = max_messages
        self._partials: dict[tuple, _Partial] = {}
        self.drops: Counter = Counter()

    def __len__(self) -> int:
        return len(self._partials)

    def add(self, fragment: Fragment, addr, now: float) -> bytes | None:
        """Take one fragment; the whole message once its last missing piece arrives, else None."""
        key = (addr, fragment.message_id)
        partial = self._partials.get(key)
        if partial is None:
            if len(self._partials) >= self.max_messages:
                self.expire(now)
                if len(self._partials) >= self.max_messages:
                    del self._partials[next(iter(self._partials))]
                    self.drops["reassembly_evicted"] += 1
            partial = self._partials[key] = _Partial(fragment.count, now + self.timeout)
        elif len(partial.pieces) != fragment.count:
            self.drops["fragment_inconsistent"] += 1
            return None
        if partial.pieces[fragment.index] is not None:
            self.drops["fragment_duplicate"] += 1
            return None
        partial.pieces[fragment.index] = fragment.piece
        partial.missing -= 1
        if partial.missing:
            return None
        del self._partials[key]
        return b"".join(partial.pieces)

    def expire(self, now: float) -> None:
        expired = [k for k, p in self._partials.items() if p.expiry <= now]
        for k in expired:
            del self._partials[k]
        if expired:
            self.drops["reassembly_timeout"] += len(expired)

    def next_deadline(self) -> float | None:
        if not self._partials:
            return None
        return min(p.expiry for p in self._partials.values())
