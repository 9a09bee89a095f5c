"""The data plane's thin I/O shell: moves frames between the TUN device, the UDP socket and the
sans-I/O :class:`~flatnet.node.dataplane.Dataplane`, on asyncio (uvloop) readers.

:func:`pump` is the whole per-wakeup cycle, shared by the asyncio service and the in-memory tests:
read each ready fd until it would block (bounded, so one side cannot starve the other), then carry
out what the data plane decided. UDP sends that would block are kept, in order, and the TUN is not
read again until the socket drains: backpressure instead of loss.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

from flatnet.proto.batch import FRAGMENT_TYPE

BURST = 512  # reads per fd per wakeup
# A wakeup this long after the previous one on the same fd comes after a quiet spell: its first
# packet is likely alone (a ping, a request), so it is not followed by the read that would block
# (a syscall and an exception on its way). The readers are level-triggered: anything else already
# waiting brings the loop straight back.
QUIET_GAP = 0.001
# Seconds after a burst of I/O callbacks before the timer deadline is read again: packets move the
# engine's deadlines (keepalive, rekey) a little each time; a timer may fire this much late.
TIMER_RECHECK = 0.05


class DataplaneIO:
    def __init__(self, dataplane, tun, udp) -> None:
        self.dataplane = dataplane
        self.tun = tun
        self.udp = udp
        self.backlog: deque = deque()  # UDP sends waiting for socket space
        self.tun_write_errors = 0
        self._tun_woken = self._udp_woken = 0.0  # when each fd's last wakeup began
        self.wrote_lone = False  # read_udp's quiet wakeup wrote its one packet to the TUN

    def read_tun(self, now: float) -> int:
        dp, read = self.dataplane, self.tun.read
        quiet = now - self._tun_woken > QUIET_GAP
        self._tun_woken = now
        n = 0
        while n < BURST:
            frame = read()
            if frame is None:
                break
            n += 1
            if n == 1:
                # The first packet of a wakeup is often a lone one someone waits for (a ping): the
                # express path sends it now, with a fraction of the full path's calls.
                express = dp.express_out(frame, now)
                if express is not None:
                    if express and (self.backlog or not self.udp.send(express[0], express[1], 0)):
                        self.backlog.append((express[0], express[1], 0))  # behind what waits
                    if quiet:
                        return n
                    continue
            urgent = dp.tun_frame(frame, now)
            if urgent and n == 1:
                # A lone small packet (a request): sent before the read that would block. Bulk
                # (super-packets) and pure ACKs still gather: a burst of ACKs costs one AEAD call.
                dp.flush(now)
                self.emit()
                if quiet:
                    return n
        dp.flush(now)
        return n

    def read_udp(self, now: float) -> int:
        dp, recv = self.dataplane, self.udp.recv
        quiet = now - self._udp_woken > QUIET_GAP
        self._udp_woken = now
        n = 0
        while n < BURST:
            got = self.udp.recv_lone() if quiet and not n else recv()
            if got is None:
                break
            data, addr, segment = got
            n += 1
            if n == 1 and not segment and data and data[0] != FRAGMENT_TYPE:
                # One whole message, first of a wakeup: onto the TUN before the read that would block.
                frame = dp.express_in(data, addr, now)
                if frame is not None:
                    self.write_tun(frame)
                else:
                    self.emit()
                if quiet:
                    # A whole message leaves no fragment train or parity work behind. What the
                    # local stack answers at once (an echo request, anything the kernel replies to
                    # itself) is already on the TUN when the write returns: DataplaneService reads it.
                    self.wrote_lone = frame is not None
                    return n
                continue
            dp.udp_datagram(data, addr, now, segment)
        if n:
            dp.udp_burst_done(now)
        return n

    def emit(self) -> None:
        backlog = self.backlog
        if not backlog and not self.dataplane.has_output():
            return
        backlog.extend(self.dataplane.take_udp_sends())
        send = self.udp.send
        while backlog:
            buffer, addr, segment = backlog[0]
            if not send(buffer, addr, segment):
                break
            backlog.popleft()
        for frame in self.dataplane.take_tun_writes():
            self.write_tun(frame)

    def write_tun(self, frame) -> None:
        try:
            self.tun.write(frame)
        except BlockingIOError:
            self.tun_write_errors += 1  # the kernel's queue is full: lost, as on a wire
        except OSError:
            self.tun_write_errors += 1
            self.dataplane.drops["tun_write_rejected"] += 1


def pump(io: DataplaneIO, now: float) -> int:
    """One cycle, for tests: read both sides until quiet, carry out the decisions. Returns reads."""
    n = io.read_tun(now)
    n += io.read_udp(now)
    if io.dataplane.get_timer() is not None and io.dataplane.get_timer() <= now:
        io.dataplane.handle_timer(now)
    io.emit()
    return n


class DataplaneService:
    """Runs a :class:`DataplaneIO` on the running loop until :meth:`close`."""

    def __init__(self, io: DataplaneIO, loop: asyncio.AbstractEventLoop | None = None, clock=None) -> None:
        self.io = io
        self.loop = loop or asyncio.get_running_loop()
        # The tunnel's clock is Unix time (certificates are checked against it); timers are armed
        # on the loop's monotonic clock by the difference.
        self.clock = clock or time.time
        self._timer: asyncio.TimerHandle | None = None
        self._recheck: asyncio.TimerHandle | None = None
        self._tun_paused = False
        self._writer = False
        self._udp_again: asyncio.Handle | None = None

    def start(self) -> None:
        self.loop.add_reader(self.io.tun.fileno(), self._on_tun)
        self.loop.add_reader(self.io.udp.fileno(), self._on_udp)
        self._arm_timer()

    def _on_tun(self) -> None:
        io = self.io
        io.read_tun(self.clock())
        # _after() only if it has something to do: on a lone packet's way every Python call is paid
        # with cold caches (docs/dataplane.md, "The express paths").
        if io.backlog or self._recheck is None or self._tun_paused or self._writer or io.dataplane.has_output():
            self._after()

    def _on_udp(self) -> None:
        if self._udp_again is not None:
            self._udp_again.cancel()  # this call reads whatever it was for
            self._udp_again = None
        io = self.io
        io.read_udp(self.clock())
        if io.backlog or self._recheck is None or self._tun_paused or self._writer or io.dataplane.has_output():
            self._after()
        if io.wrote_lone:
            # A lone packet went to the TUN after a quiet spell: its answer, if the local stack gave
            # it at once (a ping's echo reply), is read now rather than after another loop turn.
            io.wrote_lone = False
            if not self._tun_paused:
                self._on_tun()
        if io.udp.pending and self._udp_again is None:
            # Datagrams read ahead (a batched receive, relay frames) that readiness does not show:
            # the wakeup stopped early (a quiet spell's lone message, BURST). Come straight back.
            self._udp_again = self.loop.call_soon(self._on_udp)

    def _on_timer(self) -> None:
        self._timer = None
        self.io.dataplane.handle_timer(self.clock())
        self._after()
        self._arm_timer()

    def _on_writable(self) -> None:
        self._after()

    def _after(self) -> None:
        self.io.emit()
        blocked = bool(self.io.backlog)
        if blocked and not self._tun_paused:
            self.loop.remove_reader(self.io.tun.fileno())
            self._tun_paused = True
        elif not blocked and self._tun_paused:
            self.loop.add_reader(self.io.tun.fileno(), self._on_tun)
            self._tun_paused = False
        if blocked and not self._writer:
            self.loop.add_writer(self.io.udp.fileno(), self._on_writable)
            self._writer = True
        elif not blocked and self._writer:
            self.loop.remove_writer(self.io.udp.fileno())
            self._writer = False
        if self._recheck is None:
            # Re-reading every timer (O(peers)) after each packet cost ~10% of an idle ping's round
            # trip: what a burst of callbacks changed is looked at once, TIMER_RECHECK later.
            self._recheck = self.loop.call_later(TIMER_RECHECK, self._on_recheck)

    def _on_recheck(self) -> None:
        self._recheck = None
        self._arm_timer()

    def kick(self) -> None:
        """Run the timers now and send what they produced (after a reload changed the engine)."""
        self.io.dataplane.handle_timer(self.clock())
        self._after()
        self._arm_timer()

    def _arm_timer(self) -> None:
        deadline = self.io.dataplane.get_timer()
        if self._timer is not None:
            if deadline is not None and abs(self._timer.when() - self.loop.time() - (deadline - self.clock())) < 1e-3:
                return
            self._timer.cancel()
            self._timer = None
        if deadline is not None:
            delay = max(0.0, deadline - self.clock())
            self._timer = self.loop.call_later(delay, self._on_timer)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._recheck is not None:
            self._recheck.cancel()
            self._recheck = None
        if self._udp_again is not None:
            self._udp_again.cancel()
            self._udp_again = None
        if not self._tun_paused:
            self.loop.remove_reader(self.io.tun.fileno())
        self.loop.remove_reader(self.io.udp.fileno())
        if self._writer:
            self.loop.remove_writer(self.io.udp.fileno())
