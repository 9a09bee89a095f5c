"""A process's Prometheus exporter on the asyncio side: the life cycle flatnet-node and
flatnet-lighthouse share.

:class:`LoopExporter` serves one :class:`~flatnet.observability.Metrics` on a ``[metrics] listen``
address in the exporter's thread; at each scrape it asks the event loop to run :meth:`refresh`
(which copies the counters the cores already keep) and waits for it, at most
:data:`REFRESH_TIMEOUT`. A port already in use is logged and the process runs on without an
exporter (its real work matters more than its metrics).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging

from flatnet.node.config import parse_listen
from flatnet.observability import Metrics, start_exporter

REFRESH_TIMEOUT = 2.0  # seconds a scrape waits for the event loop; a busy loop gives the last values


class LoopExporter:
    """Subclasses implement :meth:`refresh` (called on the event loop before each scrape)."""

    log = logging.getLogger("flatnet.metrics")

    def __init__(self, listen: str) -> None:
        self.listen = listen
        self.metrics = Metrics()
        self.server = None
        self._thread = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def address(self) -> tuple[str, int] | None:
        """Where the exporter listens (the real port when the config said 0), None if it does not."""
        return None if self.server is None else self.server.server_address[:2]

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        host, port = parse_listen(self.listen)
        try:
            self.server, self._thread = start_exporter(
                self.metrics, port, host, before_scrape=lambda: refresh_on_loop(self._loop, self.refresh))
        except OSError as exc:
            self.log.error("metrics exporter not started on %s: %s", self.listen, exc.strerror or exc)
            return
        self.log.info("metrics on http://%s:%d/metrics", *self.address)

    async def stop(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            await asyncio.to_thread(server.shutdown)  # waits for a scrape in progress (which needs the loop)
            server.server_close()
            self._thread.join(timeout=5)

    def refresh(self) -> None:
        raise NotImplementedError


def refresh_on_loop(loop: asyncio.AbstractEventLoop | None, refresh) -> None:
    """In the exporter's thread: run *refresh* on the event loop (which owns the cores' state)
    and wait for it, at most REFRESH_TIMEOUT."""
    if loop is None or loop.is_closed():
        return

    async def run() -> None:
        refresh()

    try:
        future = asyncio.run_coroutine_threadsafe(run(), loop)
        future.result(timeout=REFRESH_TIMEOUT)
    except (concurrent.futures.TimeoutError, RuntimeError):  # busy or closing loop: the last values
        return
    except Exception:  # a collector bug must not take the exporter down: scrape what there is
        LoopExporter.log.exception("refreshing metrics failed")
