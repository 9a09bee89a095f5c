"""Gateway admin token rotation against a real nginx on loopback: a new token takes effect at
reload, the old one stops working at once, routes survive; a token file others can read is refused
and the running gateway keeps its old token."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from bench.fuzz.gateway_admin import free_port
from flatnet.config import from_dict
from flatnet.errors import UserError
from flatnet.gateway.config import GatewayConfig
from flatnet.gateway.runner import GatewayProcess
from flatnet.testing.markers import needs_root, require_tools

pytestmark = [pytest.mark.slow, needs_root, require_tools("nginx")]


def call(port: int, method: str, path: str, token: str, body: dict | None = None) -> int:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.fixture
def gateway():
    work = Path(tempfile.mkdtemp(prefix="flatnet-token-"))
    work.chmod(0o755)
    admin_port = free_port()
    config = from_dict({"listen": f"127.0.0.1:{free_port()}", "admin_listen": [f"127.0.0.1:{admin_port}"],
                        "state_dir": str(work / "gateway"), "workers": 1, "access_log": False},
                       GatewayConfig, source="<test>")
    process = GatewayProcess(config)
    try:
        process.start()
        yield process, admin_port, Path(config.paths().token_file)
    finally:
        process.stop()
        shutil.rmtree(work, ignore_errors=True)


def write_token(path: Path, token: str, mode: int = 0o600) -> None:
    tmp = path.with_suffix(".new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.chmod(tmp, mode)
    os.replace(tmp, path)  # atomic: nginx never reads half a token


def test_rotation_takes_effect_at_reload_and_routes_survive(gateway):
    process, port, token_file = gateway
    old = token_file.read_text().strip()
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert call(port, "PUT", "/api/v1/routes/web", old, {"backends": ["10.87.1.2:8080"]}) == 200
    new = secrets.token_urlsafe(32)
    write_token(token_file, new)
    assert call(port, "GET", "/api/v1/routes", old) == 200  # until the reload, the old token holds
    process.reload()
    assert call(port, "GET", "/api/v1/routes", old) == 401
    assert call(port, "GET", "/api/v1/routes/web", new) == 200  # the route survived the reload


def test_a_token_file_others_can_read_is_refused_and_the_old_token_stays(gateway):
    process, port, token_file = gateway
    old = token_file.read_text().strip()
    write_token(token_file, secrets.token_urlsafe(32), mode=0o644)
    with pytest.raises(UserError, match="readable by others"):
        process.reload()
    assert call(port, "GET", "/api/v1/routes", old) == 200
    write_token(token_file, "short")
    with pytest.raises(UserError, match="at least 16"):
        process.reload()
    assert call(port, "GET", "/api/v1/routes", old) == 200
