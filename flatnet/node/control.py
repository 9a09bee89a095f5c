"""The node's control socket: one JSON object per line, over a unix stream socket.

Wire format (one module per wire format; the CNI executable carries a copy of the client half
in ``cni/plugin.py`` because importing asyncio would double its start-up time)::

    request   {"cmd": "<name>", ...arguments}\\n
    answer    {"ok": true, ...fields}\\n
              {"ok": false, "code": N, "error": "text"}\\n

A connection may carry several requests; answers come back in order. Handlers are registered by
name (``server.register("status", handler)``); a handler is ``async def h(request: dict) -> dict``
and raises :class:`ControlError` for an answer with a code. Codes follow HTTP's meaning so they are
familiar: 400 bad request, 404 unknown command, 500 handler failed, 503 not ready.

The socket file is created mode 0660: only root (and the socket's group) may talk to the node.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

BAD_REQUEST = 400
UNKNOWN_COMMAND = 404
HANDLER_FAILED = 500
NOT_READY = 503
MAX_LINE = 1024 * 1024  # a CNI request with a large prevResult still fits

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class ControlError(Exception):
    """Raised by a handler (or the client) for an ``{"ok": false}`` answer."""

    def __init__(self, code: int, error: str) -> None:
        super().__init__(f"{error} (code {code})")
        self.code = code
        self.error = error


def encode_message(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def decode_message(line: bytes) -> dict[str, Any]:
    """Parse one line; raises :class:`ControlError` (400) for anything but a JSON object."""
    try:
        message = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ControlError(BAD_REQUEST, f"not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise ControlError(BAD_REQUEST, "expected a JSON object")
    return message


class ControlServer:
    """Serves registered handlers on a unix socket; :meth:`start` / :meth:`close`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._handlers: dict[str, Handler] = {}
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[asyncio.Task] = set()
        self.requests_served = 0
        self.bad_requests = 0

    def register(self, name: str, handler: Handler) -> None:
        if name in self._handlers:
            raise ValueError(f"control command {name!r} registered twice")
        self._handlers[name] = handler

    @property
    def commands(self) -> list[str]:
        return sorted(self._handlers)

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a stale socket from a node that crashed
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path), limit=MAX_LINE)
        os.chmod(self.path, 0o660)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    writer.write(encode_message({"ok": False, "code": BAD_REQUEST, "error": "request too long"}))
                    break
                if not line:
                    break
                writer.write(encode_message(await self.dispatch(line)))
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            if task is not None:
                self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def dispatch(self, line: bytes) -> dict[str, Any]:
        """One request line to one answer (never raises)."""
        try:
            request = decode_message(line)
            name = request.get("cmd")
            handler = self._handlers.get(name) if isinstance(name, str) else None
            if handler is None:
                raise ControlError(UNKNOWN_COMMAND, f"unknown command {name!r}; known: {', '.join(self.commands)}")
            answer = await handler(request)
            self.requests_served += 1
            return {"ok": True, **answer}
        except ControlError as exc:
            self.bad_requests += 1
            return {"ok": False, "code": exc.code, "error": exc.error}
        except Exception as exc:
            log.exception("control handler failed")
            return {"ok": False, "code": HANDLER_FAILED, "error": f"{type(exc).__name__}: {exc}"}


class ControlClient:
    """Blocking client (for the CLI and tests): ``call("status")`` returns the answer's fields."""

    def __init__(self, path: str | Path, timeout: float = 10.0) -> None:
        self.path = str(path)
        self.timeout = timeout

    def call(self, cmd: str, **arguments: Any) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.timeout)
            sock.connect(self.path)
            sock.sendall(encode_message({"cmd": cmd, **arguments}))
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("node closed the control connection")
                data += chunk
        answer = decode_message(data)
        if not answer.get("ok"):
            raise ControlError(int(answer.get("code", HANDLER_FAILED)), str(answer.get("error", "")))
        answer.pop("ok")
        return answer
