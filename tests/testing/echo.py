"""A toy sans-I/O protocol of the aioquic shape, to test the simulated network without the tunnel.

``EchoPeer`` answers ``PING <n>`` with ``PONG <n>`` and, if given a peer, sends ``count`` pings one
``interval`` apart from its timer. It records every datagram it receives with its time and source.
"""

from __future__ import annotations


class EchoPeer:
    def __init__(self, peer=None, interval: float = 1.0, count: int = 0, start: float | None = None) -> None:
        self.peer = peer
        self.interval = interval
        self.count = count
        self.sent_pings = 0
        self.received: list[tuple[float, bytes, tuple[str, int]]] = []
        self.pongs: list[int] = []
        self.pings_seen: list[int] = []
        self._out: list[tuple[bytes, tuple[str, int]]] = []
        self._timer = start if (peer is not None and count) else None

    def send(self, data: bytes, addr) -> None:
        self._out.append((data, addr))

    def ping(self, addr=None) -> None:
        self.send(b"PING %d" % self.sent_pings, addr or self.peer)
        self.sent_pings += 1

    # -- the sans-I/O interface --------------------------------------------------------------------

    def receive_datagram(self, data: bytes, addr, now: float) -> None:
        self.received.append((now, data, addr))
        kind, _, number = data.partition(b" ")
        if kind == b"PING" and number.isdigit():
            self.pings_seen.append(int(number))
            self.send(b"PONG " + number, addr)
        elif kind == b"PONG" and number.isdigit():
            self.pongs.append(int(number))

    def handle_timer(self, now: float) -> None:
        if self._timer is None or now < self._timer:
            return
        self.ping()
        self._timer = now + self.interval if self.sent_pings < self.count else None

    def get_timer(self) -> float | None:
        return self._timer

    def datagrams_to_send(self) -> list[tuple[bytes, tuple[str, int]]]:
        out, self._out = self._out, []
        return out


class EchoPeerWithNow(EchoPeer):
    """The same, with aioquic's ``datagrams_to_send(now)`` signature."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pulled_at: list[float] = []

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, tuple[str, int]]]:  # type: ignore[override]
        self.pulled_at.append(now)
        return super().datagrams_to_send()
