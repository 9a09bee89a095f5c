"""Putting fragmented DATA_BATCH messages back together (see flatnet/proto/batch.py). Sans-I/O.

Bounded: at most ``max_messages`` partial messages at once (the oldest is forgotten first) and each
waits at most ``timeout`` seconds of the caller's clock. A partial message costs memory only until
then; a forged piece can only make its message fail authentication after reassembly.

With a parity piece, a message missing exactly one data piece is rebuilt: the missing piece is the
XOR of the parity and every other piece (each zero-padded), trimmed to its length when it is the
last. A parity piece arriving after its message completed is recognised and ignored. Rebuilding waits
for :meth:`Reassembly.recover_pending` (the end of a read burst): the missing piece is usually
just behind the parity.
"""

from __future__ import annotations

from collections import Counter, OrderedDict

from flatnet.proto.batch import Fragment, xor_pieces

DEFAULT_TIMEOUT = 2.0
DEFAULT_MAX_MESSAGES = 256
RECENT_MESSAGES = 512  # completed message ids remembered, so late parity pieces are not kept


class _Partial:
    __slots__ = ("pieces", "missing", "expiry", "parity", "length")

    def __init__(self, count: int, length: int, expiry: float) -> None:
        self.pieces: list = [None] * count
        self.missing = count
        self.expiry = expiry
        self.parity = None
        self.length = length


class Reassembly:
    def __init__(self, timeout: float = DEFAULT_TIMEOUT, max_messages: int = DEFAULT_MAX_MESSAGES) -> None:
        self.timeout = timeout
        self.max_messages = max_messages
        self._partials: dict[tuple, _Partial] = {}
        self._recent: OrderedDict = OrderedDict()
        self.drops: Counter = Counter()
        self.recovered = 0  # messages rebuilt from parity
        self._recoverable: dict[tuple, None] = {}  # one piece short, parity in hand

    def __len__(self) -> int:
        return len(self._partials)

    def add(self, fragment: Fragment, addr, now: float) -> bytes | None:
        """Take one fragment; the whole message once it can be had, else None."""
        key = (addr, fragment.message_id)
        partial = self._partials.get(key)
        if partial is None:
            if key in self._recent:
                if not fragment.parity:
                    self.drops["fragment_after_rebuild"] += 1  # or a duplicate of a completed message
                return None
            if len(self._partials) >= self.max_messages:
                self.expire(now)
                if len(self._partials) >= self.max_messages:
                    oldest = next(iter(self._partials))
                    del self._partials[oldest]
                    self._recoverable.pop(oldest, None)
                    self.drops["reassembly_evicted"] += 1
            partial = self._partials[key] = _Partial(fragment.count, fragment.message_length, now + self.timeout)
        elif len(partial.pieces) != fragment.count or partial.length != fragment.message_length:
            self.drops["fragment_inconsistent"] += 1
            return None
        if fragment.parity:
            if partial.parity is not None:
                self.drops["fragment_duplicate"] += 1
                return None
            partial.parity = fragment.piece
        else:
            if partial.pieces[fragment.index] is not None:
                self.drops["fragment_duplicate"] += 1
                return None
            partial.pieces[fragment.index] = fragment.piece
            partial.missing -= 1
        if partial.missing == 0:
            self._recoverable.pop(key, None)
            return self._complete(key, partial)
        if partial.missing == 1 and partial.parity is not None:
            if partial.pieces[-1] is not None:
                # Pieces come in order, the last one is here: the missing one is lost. Rebuild now
                # (waiting would deliver this message after later ones: TCP reads that as loss).
                self._recoverable.pop(key, None)
                return self._recover(key, partial)
            # The sender puts the parity just before the last piece, which is usually on its way:
            # recover_pending() rebuilds what is still short once the read burst is over.
            self._recoverable[key] = None
        return None

    def note_complete(self, addr, message_id: int) -> None:
        """A message put together elsewhere (the data plane's in-order fast path): its late or
        duplicate pieces are then recognised here, as for a message completed here."""
        self._recent[(addr, message_id)] = None
        if len(self._recent) > RECENT_MESSAGES:
            self._recent.popitem(last=False)

    def recover_pending(self) -> list[tuple]:
        """(addr, message) for every message still one piece short with its parity: rebuilt now."""
        out = []
        for key in self._recoverable:
            partial = self._partials.get(key)
            if partial is not None and partial.missing == 1 and partial.parity is not None:
                message = self._recover(key, partial)
                if message is not None:
                    out.append((key[0], message))
        self._recoverable.clear()
        return out

    def _complete(self, key, partial: _Partial) -> bytes | None:
        del self._partials[key]
        self._recent[key] = None
        if len(self._recent) > RECENT_MESSAGES:
            self._recent.popitem(last=False)
        message = b"".join(partial.pieces)
        if len(message) != partial.length:
            self.drops["fragment_inconsistent"] += 1
            return None
        return message

    def _recover(self, key, partial: _Partial) -> bytes | None:
        size = len(partial.parity)
        count = len(partial.pieces)
        missing = partial.pieces.index(None)
        rebuilt = xor_pieces([partial.parity, *(p for p in partial.pieces if p is not None)], size)
        if missing == count - 1:
            last = partial.length - (count - 1) * size
            if not 0 < last <= size:
                self.drops["fragment_inconsistent"] += 1
                return None
            rebuilt = rebuilt[:last]
        partial.pieces[missing] = rebuilt
        partial.missing = 0
        self.recovered += 1
        return self._complete(key, partial)

    def expire(self, now: float) -> None:
        expired = [k for k, p in self._partials.items() if p.expiry <= now]
        for k in expired:
            del self._partials[k]
            self._recoverable.pop(k, None)
        if expired:
            self.drops["reassembly_timeout"] += len(expired)

    def next_deadline(self) -> float | None:
        if not self._partials:
            return None
        return min(p.expiry for p in self._partials.values())
