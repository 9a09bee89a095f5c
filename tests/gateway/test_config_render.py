"""gateway.toml and what render() makes of it, without running nginx (except `nginx -t`)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from flatnet.cli import main as flatnet_main
from flatnet.config import ConfigError, from_dict
from flatnet.gateway.config import GatewayConfig, load_gateway_config
from flatnet.gateway.render import fill, render

BASE = {"listen": "0.0.0.0:80", "state_dir": "/srv/gw"}


def config(**kw) -> GatewayConfig:
    return from_dict({**BASE, **kw}, GatewayConfig, source="gateway.toml")


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"listen": "0.0.0.0"}, "listen"),
        ({"listen": "example:80"}, "listen"),
        ({"listen": "::1:80"}, "listen"),
        ({"admin_listen": []}, "admin_listen"),
        ({"admin_listen": ["127.0.0.1:99999"]}, "admin_listen"),
        ({"admin_allow": ["10.0.0.300/8"]}, "admin_allow[0]"),
        ({"domain": "Flat Net"}, "domain"),
        ({"dedicated_ports": [8001, 8001]}, "dedicated_ports"),
        ({"workers": -1}, "workers"),
        ({"max_body_size": "lots"}, "max_body_size"),
        ({"health_interval": 0}, "health_interval"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_bad_config_names_the_key(raw, key):
    with pytest.raises(ConfigError) as err:
        from_dict({**BASE, **raw}, GatewayConfig, source="gateway.toml")
    assert err.value.key == key and "gateway.toml" in str(err.value)


def test_config_file_errors_name_the_file(tmp_path):
    path = tmp_path / "gateway.toml"
    path.write_text('listen = "0.0.0.0:80"\nworkers = "many"\n')
    with pytest.raises(ConfigError) as err:
        load_gateway_config(path)
    assert str(err.value).startswith(f"{path}: key 'workers'")


def test_linux_render():
    files = render(config(dedicated_ports=[8001], domain="flat.lan", admin_listen=["127.0.0.1:8081", "172.20.0.1:8081"]))
    conf = files["conf/nginx.conf"]
    assert "{{" not in conf and "{{" not in files["conf/flatnet_proxy.conf"]
    assert "load_module /usr/lib/nginx/modules/ngx_http_lua_module.so;" in conf
    assert "daemon off;" in conf and "master_process on;" in conf and "user www-data;" in conf
    assert "listen 0.0.0.0:80 default_server;" in conf and "listen 0.0.0.0:8001;" in conf
    admin = files["conf/flatnet_admin_listen.conf"]
    assert "listen 127.0.0.1:8081;" in admin and "listen 172.20.0.1:8081;" in admin
    assert "allow 127.0.0.0/8;" in admin and "deny all;" in conf and "include flatnet_admin_listen.conf;" in conf
    assert "/srv/gw/routes.json" in conf and "/srv/gw/admin.token" in conf
    assert "lua_shared_dict flatnet_routes" in conf and "balancer_by_lua_block" in conf
    assert "client_max_body_size 1g;" in conf
    assert conf.index("balancer_by_lua_block") < conf.index("keepalive 64;")
    assert {"lua/flatnet/state.lua", "lua/flatnet/router.lua", "lua/flatnet/admin.lua", "lua/flatnet/pages.lua",
            "lua/flatnet/health.lua"} <= set(files)


def test_windows_render():
    files = render(from_dict({"listen": "0.0.0.0:80"}, GatewayConfig), "windows")
    conf = files["conf/nginx.conf"]
    assert "worker_processes 1;" in conf
    assert "C:/flatnet/gateway/routes.json" in conf and "C:/flatnet/gateway/nginx/lua/?.lua" in conf
    assert "load_module" not in conf and "daemon off" not in conf and "\nuser " not in conf
    assert "C:\\" not in conf
    conf = render(from_dict({"state_dir": "D:\\Flatnet\\gw"}, GatewayConfig), "windows")["conf/nginx.conf"]
    assert "pid D:/Flatnet/gw/nginx/logs/nginx.pid;" in conf


def test_render_rejects_port_clashes():
    with pytest.raises(ValueError, match="dedicated port 80"):
        render(config(dedicated_ports=[80]))
    with pytest.raises(ValueError, match="admin_listen"):
        render(config(admin_listen=["127.0.0.1:80"]))


def test_fill_refuses_unknown_placeholders():
    assert fill("a {{x}} b", {"x": "1"}) == "a 1 b"
    with pytest.raises(KeyError):
        fill("{{y}}", {})


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx not installed")
def test_rendered_config_passes_nginx_t(tmp_path):
    cfg = config(state_dir=str(tmp_path / "state"), dedicated_ports=[8001], domain="flat.lan", user="root")
    out = tmp_path / "state" / "nginx"
    assert flatnet_main(["gateway", "render", "--config", str(write_toml(tmp_path, cfg)), "--out", str(out)]) == 0
    (out / "logs").mkdir()
    (out / "tmp").mkdir()
    result = subprocess.run(["nginx", "-t", "-q", "-p", f"{out}/", "-c", str(out / "conf/nginx.conf")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def write_toml(tmp_path, cfg: GatewayConfig):
    path = tmp_path / "gateway.toml"
    lines = [
        f'listen = "{cfg.listen}"',
        f'state_dir = "{cfg.state_dir}"',
        f"dedicated_ports = {cfg.dedicated_ports}",
        f'domain = "{cfg.domain}"',
        f'user = "{cfg.user}"',
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_cli_reports_config_errors(tmp_path, capsys):
    path = tmp_path / "gateway.toml"
    path.write_text('listen = "nowhere"\n')
    assert flatnet_main(["gateway", "render", "--config", str(path), "--out", str(tmp_path / "out")]) == 1
    assert f"{path}: key 'listen'" in capsys.readouterr().err
