"""A self-contained Podman environment for tests and the lab: its own config, storage and image.

Podman is pointed at files of our own through ``CONTAINERS_CONF`` and ``CONTAINERS_STORAGE_CONF``
(never /etc): runc, the CNI network backend, a private ``network_config_dir`` (where
``flatnet cni install`` writes the conflist), ``cni_plugin_dirs`` that list the directory holding
the flatnet plugin before Debian's ``/usr/lib/cni``, and a private storage root, run root and
libpod tmp dir so several environments (parallel tests, other engineers) never share a lock or a
database.

The image is made offline: a root filesystem of Debian's ``busybox-static`` (one binary plus
applet symlinks and a ``/www/index.html``) is ``podman import``-ed as :data:`IMAGE`. A web server is
``podman run ... flatnet-busybox httpd -f -p 80 -h /www``.

Podman runs inside a network namespace through ``nsenter --net=/run/netns/NAME`` (see
:mod:`flatnet.netns` for why not ``ip netns exec``); the CNI plugin then runs there too, so the
host side of each container's veth lands in that namespace.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

IMAGE = "localhost/flatnet-busybox:latest"
BUSYBOX = "/usr/bin/busybox"
REFERENCE_PLUGIN_DIR = "/usr/lib/cni"
BUSYBOX_APPLETS = ("sh", "httpd", "sleep", "ip", "ifconfig", "wget", "cat", "ls", "ps", "true", "hostname")
INDEX_HTML = "<html><body><h1>hello from a flatnet container</h1></body></html>\n"


def _toml_list(items: Sequence[str]) -> str:
    return "[" + ", ".join(f'"{i}"' for i in items) + "]"


@dataclass
class PodmanEnv:
    """Podman with private config and storage under *base*. Build with :meth:`create`."""

    base: Path
    plugin_dirs: list[Path] = field(default_factory=list)

    @property
    def containers_conf(self) -> Path:
        return self.base / "containers.conf"

    @property
    def storage_conf(self) -> Path:
        return self.base / "storage.conf"

    @property
    def network_config_dir(self) -> Path:
        return self.base / "net.d"

    @classmethod
    def create(cls, base: str | Path, plugin_dirs: Sequence[str | Path] = ()) -> PodmanEnv:
        """Write the config files under *base* (made if missing); *plugin_dirs* come before /usr/lib/cni."""
        env = cls(Path(base).resolve(), [Path(p).resolve() for p in plugin_dirs])
        env.base.mkdir(parents=True, exist_ok=True)
        env.network_config_dir.mkdir(exist_ok=True)
        for sub in ("root", "runroot", "tmp", "volumes"):
            (env.base / sub).mkdir(exist_ok=True)
        dirs = [str(p) for p in env.plugin_dirs] + [REFERENCE_PLUGIN_DIR]
        env.containers_conf.write_text(
            "[containers]\n"
            'default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]\n'
            "[engine]\n"
            'runtime = "runc"\n'
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
            f'events_logfile_path = "{env.base}/events.log"\n'
            f'tmp_dir = "{env.base}/tmp"\n'
            f'volume_path = "{env.base}/volumes"\n'
            f'static_dir = "{env.base}/root/libpod"\n'
            "[network]\n"
            'network_backend = "cni"\n'
            f'network_config_dir = "{env.network_config_dir}"\n'
            f"cni_plugin_dirs = {_toml_list(dirs)}\n"
        )
        env.storage_conf.write_text(
            "[storage]\n"
            'driver = "vfs"\n'
            f'graphroot = "{env.base}/root"\n'
            f'runroot = "{env.base}/runroot"\n'
        )
        return env

    def env(self) -> dict[str, str]:
        """Environment for running ``podman`` against this configuration."""
        env = dict(os.environ)
        env["CONTAINERS_CONF"] = str(self.containers_conf)
        env["CONTAINERS_STORAGE_CONF"] = str(self.storage_conf)
        env.pop("CONTAINERS_REGISTRIES_CONF", None)
        return env

    def command(self, args: Sequence[str], netns: str | None = None) -> list[str]:
        argv = ["podman", *args]
        if netns:
            argv = ["nsenter", f"--net=/run/netns/{netns}", "--", *argv]
        return argv

    def podman(
        self, args: Sequence[str], netns: str | None = None, check: bool = True, timeout: float = 120, **kwargs
    ) -> subprocess.CompletedProcess:
        """Run podman with *args* (inside network namespace *netns* if given); output as text."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        proc = subprocess.run(self.command(args, netns), env=self.env(), timeout=timeout, **kwargs)
        if check and proc.returncode != 0:
            raise PodmanError(list(args), proc.returncode, proc.stderr)
        return proc

    def ensure_image(self) -> str:
        """Import the busybox image unless present; returns its name."""
        if self.podman(["image", "exists", IMAGE], check=False).returncode == 0:
            return IMAGE
        self.podman(["import", "--change", 'CMD ["/bin/sh"]', "-", IMAGE], input=busybox_rootfs_tar(), text=False)
        return IMAGE

    def reset(self) -> None:
        """Remove every container of this environment (images stay)."""
        self.podman(["rm", "--all", "--force", "--time", "0"], check=False)

    def destroy(self) -> None:
        """Remove containers, then the whole storage (vfs layers are plain directories)."""
        self.reset()
        self.podman(["system", "reset", "--force"], check=False)
        shutil.rmtree(self.base, ignore_errors=True)


class PodmanError(RuntimeError):
    def __init__(self, args: list[str], code: int, stderr: str) -> None:
        super().__init__(f"podman {' '.join(args)} exited {code}: {stderr.strip()[-2000:]}")
        self.code = code
        self.stderr = stderr


def busybox_rootfs_tar() -> bytes:
    """A root filesystem tar: busybox-static, applet symlinks, /www/index.html, /etc basics."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:

        def add_dir(name: str) -> None:
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)

        def add_file(name: str, data: bytes, mode: int = 0o644) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = mode
            tar.addfile(info, io.BytesIO(data))

        for d in ("bin", "etc", "www", "tmp", "proc", "sys", "dev", "run"):
            add_dir(d)
        with open(BUSYBOX, "rb") as f:
            add_file("bin/busybox", f.read(), 0o755)
        for applet in BUSYBOX_APPLETS:
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type = tarfile.SYMTYPE
            info.linkname = "busybox"
            tar.addfile(info)
        add_file("etc/passwd", b"root:x:0:0:root:/:/bin/sh\n")
        add_file("etc/group", b"root:x:0:\n")
        add_file("www/index.html", INDEX_HTML.encode())
    return buf.getvalue()
