"""The ``flatnet`` CNI plugin executable: thin, fast, and still working when the node is down.

Podman runs this for every container start and stop (and VERSION on every config reload), so
start-up time is the plugin's cost. The installed shim starts Python with ``-I -S`` and imports only
this module and :mod:`cni.spec`, which import nothing else at module level: VERSION answers without
even the json module, and ADD adds only ``_json`` (see :mod:`cni.jsonwire`) and ``_socket``. The
netlink and IPAM work is done by the running ``flatnet-node``: the plugin sends it the request over
the control socket (wire format in :mod:`flatnet.node.control`) and prints what comes back. The node
also registers the container with the gateway.

If the node cannot be reached (socket missing or refusing), the plugin does the work itself with
:mod:`cni.core` (another ~50 ms of imports). ADD still succeeds; the node finds the lease in the IPAM
store and registers the container when it starts.
"""

from __future__ import annotations

import os
import sys

from cni.spec import (
    ERR_INTERNAL,
    ERR_TRY_AGAIN_LATER,
    SUPPORTED_VERSIONS,
    CniError,
    CniRequest,
    parse_request,
    requested_version,
    version_answer,
)

TYPE_CHECKING = False  # not `from typing import ...`: typing costs ~5 ms of start-up

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from typing import Any

DEFAULT_NODE_SOCKET = "/run/flatnet/node.sock"
NODE_TIMEOUT = 30.0  # seconds; the node's own work is bounded well below this
NODE_UNKNOWN_COMMAND = 404  # flatnet.node.control.UNKNOWN_COMMAND: a node without the CNI service


class NodeUnavailable(Exception):
    """The node is not running (or does not serve CNI): do the work here."""


def ask_node(socket_path: str, request: CniRequest, timeout: float = NODE_TIMEOUT) -> dict[str, Any] | None:
    """Send *request* to the node; its stdout JSON (or None), or raise CniError / NodeUnavailable."""
    import _socket  # not `socket`: that one imports enum and costs ~5 ms of start-up

    from cni import jsonwire

    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(socket_path)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError) as exc:
            raise NodeUnavailable(str(exc)) from None
        message = {"cmd": "cni", "request": request.to_json()}
        sock.sendall(jsonwire.dumps(message).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except TimeoutError:
        raise CniError(ERR_TRY_AGAIN_LATER, "flatnet-node did not answer in time", socket_path) from None
    except OSError as exc:
        raise CniError(ERR_TRY_AGAIN_LATER, "talking to flatnet-node failed", str(exc)) from None
    finally:
        sock.close()
    if not data:
        # The node died mid-request. Doing the work here is safe: ADD starts from a clean slate,
        # DEL and CHECK are idempotent, so whatever the node had done is redone or undone.
        raise NodeUnavailable("flatnet-node closed the connection without an answer")
    try:
        answer = jsonwire.loads(data)
    except ValueError as exc:
        raise CniError(ERR_INTERNAL, "flatnet-node sent a malformed answer", str(exc)) from None
    if not answer.get("ok"):
        if answer.get("code") == NODE_UNKNOWN_COMMAND:
            raise NodeUnavailable(answer.get("error", ""))
        raise CniError(ERR_INTERNAL, "flatnet-node refused the request", str(answer.get("error")))
    if "cniError" in answer:
        raise CniError.from_json(answer["cniError"])
    return answer.get("result")


def run_locally(request: CniRequest, fallback_paths: Sequence[str] = ()) -> dict[str, Any] | None:
    """The self-contained path: import the core (and pyroute2) and do the work in this process."""
    for path in fallback_paths:
        if path not in sys.path:
            sys.path.append(path)
    from cni.core import CniCore

    return CniCore().handle(request)


def run(environ: Mapping[str, str], stdin: bytes, fallback_paths: Sequence[str] = ()) -> tuple[dict[str, Any] | None, int]:
    """One invocation: (JSON for stdout or None, exit status)."""
    from cni import jsonwire

    version = "1.0.0"
    try:
        request = parse_request(environ, stdin, os.getppid())
        if request.cni_version in SUPPORTED_VERSIONS:
            version = request.cni_version
        if request.command == "VERSION":
            return jsonwire.loads(version_answer(request.config.get("cniVersion"))), 0
        node_socket = str(request.config.get("nodeSocket") or DEFAULT_NODE_SOCKET)
        try:
            return ask_node(node_socket, request), 0
        except NodeUnavailable:
            return run_locally(request, fallback_paths), 0
    except CniError as exc:
        return exc.to_json(version), 1
    except Exception as exc:  # e.g. pyroute2 missing on the fallback path: still the spec's format
        return CniError(ERR_INTERNAL, "plugin failed", f"{type(exc).__name__}: {exc}").to_json(version), 1


def main(fallback_paths: Sequence[str] = ()) -> int:
    if os.environ.get("CNI_COMMAND") == "VERSION":  # the hot path: no json, no parsing
        sys.stdout.write(version_answer(requested_version(sys.stdin.buffer.read())) + "\n")
        return 0
    from cni import jsonwire

    output, status = run(os.environ, sys.stdin.buffer.read(), fallback_paths)
    if output is not None:
        sys.stdout.write(jsonwire.dumps(output) + "\n")
        sys.stdout.flush()
    return status


if __name__ == "__main__":
    sys.exit(main())
