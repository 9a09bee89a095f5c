"""`flatnet cni install`: the conflist and the plugin shim, where Podman finds them."""

from __future__ import annotations

import json
import subprocess

import pytest

from cni import cli as cni_cli
from flatnet.cli import main as flatnet_main
from flatnet.podman import PodmanEnv
from flatnet.testing.markers import needs_root, require_tools


def node_toml(tmp_path, subnet="10.87.3.0/24"):
    path = tmp_path / "node.toml"
    lines = ['name = "wsl-a"', f'control_socket = "{tmp_path}/node.sock"', "[cni]", f'data_dir = "{tmp_path}/data"']
    if subnet:
        lines.append(f'subnet = "{subnet}"')
    path.write_text("\n".join(lines) + "\n")
    return path


def test_install_writes_conflist_and_an_executable_shim(tmp_path):
    status = flatnet_main(["cni", "install", "--config", str(node_toml(tmp_path)), "--plugin-dir",
                           str(tmp_path / "plugins"), "--conf-dir", str(tmp_path / "net.d")])
    assert status == 0
    conf = json.loads((tmp_path / "net.d" / "flatnet.conflist").read_text())
    (plugin,) = conf["plugins"]
    assert conf["name"] == "flatnet" and plugin["type"] == "flatnet" and plugin["subnet"] == "10.87.3.0/24"
    assert plugin["nodeSocket"] == f"{tmp_path}/node.sock" and plugin["capabilities"]["portMappings"]
    shim = tmp_path / "plugins" / "flatnet"
    assert shim.stat().st_mode & 0o111
    assert shim.read_text().startswith("#!") and " -IS\n" in shim.read_text().splitlines()[0] + "\n"
    proc = subprocess.run([str(shim)], input=b'{"cniVersion":"0.4.0"}', env={"CNI_COMMAND": "VERSION"},
                          capture_output=True, timeout=30)
    assert proc.returncode == 0 and json.loads(proc.stdout)["cniVersion"] == "0.4.0"


def test_install_without_a_subnet_is_a_user_error(tmp_path, capsys):
    status = flatnet_main(["cni", "install", "--config", str(node_toml(tmp_path, subnet=None)),
                           "--plugin-dir", str(tmp_path / "p"), "--conf-dir", str(tmp_path / "c")])
    assert status == 1 and "subnet" in capsys.readouterr().err
    status = flatnet_main(["cni", "install", "--config", str(node_toml(tmp_path)), "--subnet", "10.99.0.0/24",
                           "--plugin-dir", str(tmp_path / "p"), "--conf-dir", str(tmp_path / "c")])
    assert status == 1 and "Flatnet range" in capsys.readouterr().err


def test_conflist_helper_matches_the_plugin_config_parser():
    from cni.core import PluginConfig

    conf = cni_cli.conflist("flatnet", "10.87.9.0/24", "/d", "/s", mtu=1400)
    parsed = PluginConfig.from_netconf({**conf["plugins"][0], "name": conf["name"], "cniVersion": "1.0.0"})
    assert (str(parsed.subnet), str(parsed.gateway), parsed.mtu) == ("10.87.9.0/24", "10.87.9.1", 1400)


@pytest.mark.slow
@needs_root
@require_tools("podman")
def test_podman_network_ls_shows_flatnet(tmp_path):
    env = PodmanEnv.create(tmp_path / "podman", [tmp_path / "plugins"])
    assert flatnet_main(["cni", "install", "--config", str(node_toml(tmp_path)), "--plugin-dir",
                         str(tmp_path / "plugins"), "--conf-dir", str(env.network_config_dir)]) == 0
    names = env.podman(["network", "ls", "--format", "{{.Name}}"]).stdout.split()
    assert "flatnet" in names
    (info,) = json.loads(env.podman(["network", "inspect", "flatnet"]).stdout)
    assert info["driver"] == "flatnet"


def test_the_plugin_hot_path_imports_nothing_heavy():
    """VERSION and the node-backed ADD must not pull in json/re/typing/enum/pyroute2 (start-up cost)."""
    import sys as _sys
    from pathlib import Path

    repo = str(Path(cni_cli.__file__).resolve().parent.parent)
    code = (f"import sys; sys.path.insert(0, {repo!r}); import cni.plugin, cni.spec, cni.jsonwire, _socket; "
            "print(' '.join(sorted(sys.modules)))")
    proc = subprocess.run([_sys.executable, "-IS", "-c", code], capture_output=True, text=True, timeout=30)
    loaded = set(proc.stdout.split())
    assert "cni.plugin" in loaded
    heavy = {"json", "re", "typing", "enum", "dataclasses", "ipaddress", "socket", "asyncio", "pyroute2"}
    assert not heavy & loaded
