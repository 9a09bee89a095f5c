"""The anti-replay sliding window (RFC 6479's idea, as a Python int bitmap).

`check(counter)` is read-only and runs *before* decryption (cheap rejection); `update(counter)` runs
only *after* the AEAD tag verified, so forged packets cannot move the window. Bit i of the bitmap
stands for counter `highest - i`.
"""

from __future__ import annotations

from flatnet.proto.constants import REJECT_AFTER_MESSAGES, REPLAY_WINDOW_SIZE


class ReplayWindow:
    __slots__ = ("size", "highest", "bitmap", "_mask")

    def __init__(self, size: int = REPLAY_WINDOW_SIZE):
        self.size = size
        self.highest = -1
        self.bitmap = 0
        self._mask = (1 << size) - 1

    def check(self, counter: int) -> bool:
        """May `counter` be new? (False: replayed, too old or beyond the message limit)"""
        if counter >= REJECT_AFTER_MESSAGES:
            return False
        if counter > self.highest:
            return True
        offset = self.highest - counter
        return offset < self.size and not (self.bitmap >> offset) & 1

    def update(self, counter: int) -> None:
        """Mark `counter` as seen (call only after authentication and a passing `check`)."""
        if counter > self.highest:
            shift = counter - self.highest
            self.bitmap = ((self.bitmap << shift) | 1) & self._mask if shift < self.size else 1
            self.highest = counter
        else:
            self.bitmap |= 1 << (self.highest - counter)
