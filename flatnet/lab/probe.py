"""Looking at the lab from inside its hosts: HTTP requests made from within a namespace.

A thread may switch its own network namespace with ``setns(2)``; sockets it then opens live in
that namespace for good. :func:`in_namespace` runs a function on such a throw-away thread, so the
lab can check "what a colleague on the LAN sees" without starting a curl for each probe.
"""

from __future__ import annotations

import ctypes
import http.client
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from flatnet.netns import NETNS_DIR

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def in_namespace(ns_name: str, fn: Callable[[], T]) -> T:
    """Run *fn()* on a thread that has entered network namespace *ns_name*; returns its result."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            fd = os.open(os.path.join(NETNS_DIR, ns_name), os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into {ns_name}: {os.strerror(err)}")
            finally:
                os.close(fd)
            outcome["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, name=f"netns-{ns_name}")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


@dataclass(frozen=True)
class HttpAnswer:
    status: int
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    body: str

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


def http_get(
    ns_name: str, host: str, port: int, path: str, timeout: float = 3.0, headers: dict[str, str] | None = None
) -> HttpAnswer:
    """One GET from inside *ns_name*; redirects are returned, not followed. Raises OSError."""

    def request() -> HttpAnswer:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            conn.request("GET", path, headers=headers or {})
            resp = conn.getresponse()
            body = resp.read().decode("utf-8", errors="replace")
            merged: dict[str, str] = {}
            for k, v in resp.getheaders():
                merged[k.lower()] = f"{merged[k.lower()]}, {v}" if k.lower() in merged else v
            return HttpAnswer(resp.status, merged, body)
        finally:
            conn.close()

    return in_namespace(ns_name, request)


def try_http_get(ns_name: str, host: str, port: int, path: str, timeout: float = 3.0) -> HttpAnswer | str:
    """As :func:`http_get`, but a failure comes back as a one-line reason instead of an exception."""
    try:
        return http_get(ns_name, host, port, path, timeout)
    except (OSError, http.client.HTTPException) as exc:
        return f"{type(exc).__name__}: {exc}"
