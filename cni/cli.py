"""``flatnet cni install``: the conflist and the plugin executable, where Podman looks for them.

The executable is a tiny Python shim started with ``-I -S`` (isolated, no ``site``): skipping the
site machinery and every third-party import keeps VERSION and the node-backed ADD fast. It puts
this source tree first on ``sys.path`` and hands :func:`cni.plugin.main` the site-packages
directories, which only the fallback path (node down, pyroute2 needed) adds.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import site
import sys
from pathlib import Path
from typing import Any

from flatnet.errors import UserError

PLUGIN_TYPE = "flatnet"
CONFLIST_VERSION = "1.0.0"  # Podman 4.3's libcni does not know 1.1.0 in a conflist


def conflist(network: str, subnet: str, data_dir: str, node_socket: str, flatnet_range: str = "10.87.0.0/16",
             mtu: int = 0) -> dict[str, Any]:
    plugin: dict[str, Any] = {
        "type": PLUGIN_TYPE,
        "subnet": subnet,
        "flatnetRange": flatnet_range,
        "dataDir": data_dir,
        "nodeSocket": node_socket,
        "capabilities": {"portMappings": True, "ips": True, "mac": True},
    }
    if mtu:
        plugin["mtu"] = mtu
    return {"cniVersion": CONFLIST_VERSION, "name": network, "plugins": [plugin]}


def shim_source(python: str | None = None) -> str:
    source_root = str(Path(__file__).resolve().parent.parent)
    fallback = [source_root, *site.getsitepackages()]
    return (
        f"#!{python or sys.executable} -IS\n"
        "# flatnet CNI plugin, written by `flatnet cni install`\n"
        "import sys\n"
        f"sys.path.insert(0, {source_root!r})\n"
        "from cni.plugin import main\n"
        f"sys.exit(main(fallback_paths={fallback!r}))\n"
    )


def _write_atomically(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)  # Podman never sees a half-written plugin or conflist


def install(plugin_dir: Path, conf_dir: Path, conf: dict[str, Any]) -> tuple[Path, Path]:
    # Byte-compile the plugin's modules now: the shim runs with -I, and compiling on a first call
    # (or on every call, where the tree is read-only) would cost milliseconds per container start.
    compileall.compile_dir(str(Path(__file__).resolve().parent), quiet=1)
    plugin_path = plugin_dir / PLUGIN_TYPE
    conf_path = conf_dir / f"{conf['name']}.conflist"
    _write_atomically(plugin_path, shim_source(), 0o755)
    _write_atomically(conf_path, json.dumps(conf, indent=2) + "\n", 0o644)
    return plugin_path, conf_path


def _cmd_install(args: argparse.Namespace) -> int:
    from flatnet.node.config import DEFAULT_CONFIG_PATH, NodeConfig, load_node_config

    config_path = Path(args.config) if args.config else DEFAULT_CONFIG_PATH
    node = load_node_config(config_path) if args.config or config_path.exists() else NodeConfig(name="local")
    subnet = args.subnet or (str(node.cni.subnet) if node.cni.subnet else None)
    if not subnet:
        raise UserError(f"no container subnet: set [cni] subnet in {config_path} or pass --subnet")
    conf = conflist(node.cni.network, subnet, str(node.cni.data_dir), str(node.control_socket),
                    str(node.flatnet_range), node.cni.mtu)
    from cni.core import PluginConfig
    from cni.spec import CniError

    try:
        PluginConfig.from_netconf({**conf["plugins"][0], "name": conf["name"]})
    except CniError as exc:
        raise UserError(f"{exc.details}") from None
    plugin_dir = Path(args.plugin_dir) if args.plugin_dir else node.cni.plugin_dir
    conf_dir = Path(args.conf_dir) if args.conf_dir else node.cni.conf_dir
    plugin_path, conf_path = install(plugin_dir, conf_dir, conf)
    print(f"plugin:   {plugin_path}")
    print(f"conflist: {conf_path} (network {conf['name']!r}, subnet {subnet})")
    print(f"make sure {plugin_dir} is in containers.conf [network] cni_plugin_dirs")
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="cni_command", metavar="SUBCOMMAND")
    p = sub.add_parser("install", help="write the conflist and install the plugin executable")
    p.add_argument("--config", help="node configuration (default /etc/flatnet/node.toml)")
    p.add_argument("--plugin-dir", help="directory Podman searches for plugins (cni_plugin_dirs)")
    p.add_argument("--conf-dir", help="directory of CNI network configs (network_config_dir)")
    p.add_argument("--subnet", help="this host's container subnet, overriding [cni] subnet")
    p.set_defaults(func=_cmd_install)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])
