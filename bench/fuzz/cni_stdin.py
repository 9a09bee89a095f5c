"""CNI stdin: what Podman (or anything that can run the plugin) hands the plugin.

The plugin's entry function :func:`cni.plugin.run` (and, every few inputs, :func:`cni.plugin.main`
with stdin/stdout/environment swapped) runs in this process on mutated network configurations
(JSON values replaced, removed, retyped; bytes mutated) and mutated environments (``CNI_*``
variables dropped, garbled, overlong). The node side is a stub on a Unix socket in a temporary
directory that answers like flatnet-node — results, CNI errors, refusals, garbage, a closed
connection — so the plugin's handling of the node's answers is fuzzed too. The no-node fallback
(:func:`cni.plugin.run_locally`, which would create real links and leases) is replaced by a stub
that only validates the configuration, so no input can touch this machine's network or files.
Contract: the output is always JSON; on failure it is the spec's error object
(``cniVersion``, integer ``code``, ``msg``), never a traceback.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import socketserver
import sys
import tempfile
import threading
from pathlib import Path

from bench.fuzz.campaign import Surface, mutate_bytes, mutate_structure, random_value
from cni import plugin
from cni.spec import ERR_TRY_AGAIN_LATER, CniError

COMMANDS = ("ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION")
RESULT = {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0", "mac": "02:00:00:00:00:01", "sandbox": "/x"}],
          "ips": [{"address": "10.87.1.5/24", "gateway": "10.87.1.1", "interface": 0}],
          "routes": [{"dst": "0.0.0.0/0"}], "dns": {}}
ANSWERS = [
    b'{"ok": true, "result": ' + json.dumps(RESULT).encode() + b"}\n",
    b'{"ok": true, "result": null}\n',
    b'{"ok": true, "cniError": {"code": 7, "msg": "invalid", "details": "x"}}\n',
    b'{"ok": true, "cniError": "not an object"}\n',
    b'{"ok": true, "cniError": {"code": "seven"}}\n',
    b'{"ok": false, "error": "busy"}\n',
    b'{"ok": false}\n',
    b"[1, 2, 3]\n",
    b"\xff\xfe garbage\n",
    b"",  # closes without a word
    b'{"ok": true, "result": ' + b"[" * 5000 + b"]" * 5000 + b"}\n",
]


class _StubNode(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        self.rfile.readline(1 << 20)
        server = self.server
        server.answered += 1  # type: ignore[attr-defined]
        self.wfile.write(server.rng.choice(ANSWERS))  # type: ignore[attr-defined]


def _fallback_stub(request, fallback_paths=()):
    """Stands in for run_locally: validates the configuration as the core would, touches nothing."""
    from cni.core import PluginConfig

    PluginConfig.from_netconf(request.config)
    raise CniError(ERR_TRY_AGAIN_LATER, "fuzz: the local fallback is stubbed")


class CniStdinSurface(Surface):
    name = "cni-stdin"
    description = "cni.plugin.run / main on mutated config JSON and CNI_* environment"

    def setup(self, rng: random.Random) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="flatnet-fuzz-cni-"))
        self.socket_path = str(self.dir / "node.sock")
        self.server = socketserver.UnixStreamServer(self.socket_path, _StubNode)
        self.server.rng = random.Random(rng.random())  # type: ignore[attr-defined]
        self.server.answered = 0  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self._saved = (plugin.run_locally, plugin.DEFAULT_NODE_SOCKET)
        plugin.run_locally = _fallback_stub
        plugin.DEFAULT_NODE_SOCKET = self.socket_path  # a config that lost nodeSocket still reaches the stub
        self.conf = {"cniVersion": "1.0.0", "name": "flatnet", "type": "flatnet", "subnet": "10.87.1.0/24",
                     "nodeSocket": self.socket_path, "dataDir": str(self.dir / "data"), "mtu": 1400,
                     "runtimeConfig": {"ips": ["10.87.1.9/24"], "mac": "02:00:00:00:00:09"},
                     "prevResult": RESULT, "args": {"cni": {"ips": ["10.87.1.9"]}}}
        self.env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "0123456789abcdef", "CNI_NETNS": "/run/netns/fuzz",
                    "CNI_IFNAME": "eth0", "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAME=web", "CNI_PATH": "/opt/cni/bin"}
        self.failures = self.successes = self.main_calls = 0

    def generate(self, rng: random.Random):
        env = dict(self.env, CNI_COMMAND=rng.choice(COMMANDS))
        for _ in range(rng.choice((0, 0, 1, 2))):
            key = rng.choice(list(self.env) + ["CNI_COMMAND"])
            op = rng.randrange(3)
            if op == 0:
                env.pop(key, None)
            elif op == 1:
                env[key] = mutate_bytes(env.get(key, "").encode(), rng).decode("utf-8", "replace").replace("\x00", "")
            else:
                env[key] = str(random_value(rng)).replace("\x00", "")
        r = rng.random()
        conf = self.conf
        if r < 0.6:
            conf = mutate_structure(conf, rng)
            if isinstance(conf, dict) and "nodeSocket" in conf and rng.random() < 0.9:
                conf["nodeSocket"] = self.socket_path  # mostly keep talking to the stub
            try:
                stdin = json.dumps(conf).encode()
            except (ValueError, TypeError):
                stdin = json.dumps(self.conf).encode()
        elif r < 0.9:
            stdin = mutate_bytes(json.dumps(conf).encode(), rng)
        else:
            stdin = rng.choice((b"", b" ", b"null", b"[]", b"{}", b'{"cniVersion": "1.0.0"}', rng.randbytes(40)))
        return env, stdin

    def feed(self, item) -> None:
        env, stdin = item
        self.main_calls += 1
        if self.main_calls % 50 == 0:
            self._through_main(env, stdin)
            return
        output, status = plugin.run(env, stdin)
        self._check(output, status)

    def _check(self, output, status: int) -> None:
        from cni import jsonwire

        text = jsonwire.dumps(output) if output is not None else ""
        if status != 0:
            self.failures += 1
            if not (isinstance(output, dict) and isinstance(output.get("code"), int) and isinstance(output.get("msg"), str)
                    and isinstance(output.get("cniVersion"), str)):
                raise AssertionError(f"status {status} without the spec's error object: {text[:200]}")
        else:
            self.successes += 1
        if text:
            json.loads(text)

    def _through_main(self, env: dict, stdin: bytes) -> None:
        saved_env = {k: os.environ.get(k) for k in set(env) | set(self.env) | {"CNI_COMMAND"}}
        saved_io = sys.stdin, sys.stdout
        out = io.StringIO()
        try:
            for key in saved_env:
                os.environ.pop(key, None)
            os.environ.update(env)
            sys.stdin = io.TextIOWrapper(io.BytesIO(stdin))
            sys.stdout = out
            status = plugin.main()
        finally:
            sys.stdin, sys.stdout = saved_io
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        text = out.getvalue()
        if text.count("\n") > 1 or (text and not text.endswith("\n")):
            raise AssertionError(f"main printed more than one JSON line: {text[:200]!r}")
        self._check(json.loads(text) if text else None, status)

    def teardown(self) -> None:
        plugin.run_locally, plugin.DEFAULT_NODE_SOCKET = self._saved
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
        shutil.rmtree(self.dir, ignore_errors=True)

    def stats(self) -> dict:
        return {"errors_reported": self.failures, "successes": self.successes,
                "node_answers": self.server.answered}  # type: ignore[attr-defined]
