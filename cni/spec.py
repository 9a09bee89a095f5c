"""The CNI contract: versions, error codes, the request a runtime makes, and the results we give.

Everything the CNI specification fixes lives in this file (SPEC.md of containernetworking/cni,
"Execution Protocol", "Result Types" and "Error" sections). Imports nothing at module level (not
even json, dataclasses or ipaddress: together they would double the executable's start-up time),
because the plugin imports this module on every call and Podman calls VERSION on every reload.

A request is the process environment (``CNI_COMMAND``, ``CNI_CONTAINERID``, ``CNI_NETNS``,
``CNI_IFNAME``, ``CNI_ARGS``, ``CNI_PATH``) plus the network configuration on stdin.
:func:`parse_request` validates both and raises :class:`CniError` with the spec's code; the
plugin prints ``error.to_json()`` on stdout and exits 1.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not `from typing import ...`: typing costs ~5 ms of start-up

if TYPE_CHECKING:  # typing only: at run time this module imports nothing (start-up time, see above)
    from collections.abc import Mapping
    from typing import Any

# Versions whose ADD result format we produce. GC and STATUS exist from 1.1.0 on, CHECK from 0.4.0.
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
CHECK_SINCE = "0.4.0"
GC_STATUS_SINCE = "1.1.0"
COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "GC", "STATUS")

# Well-known error codes (SPEC.md, "Error"): 1-99 are reserved by the spec, 100+ are ours.
ERR_INCOMPATIBLE_VERSION = 1
ERR_UNSUPPORTED_FIELD = 2
ERR_CONTAINER_UNKNOWN = 3
ERR_INVALID_ENV = 4
ERR_IO = 5
ERR_DECODE = 6
ERR_INVALID_CONFIG = 7
ERR_TRY_AGAIN_LATER = 11
ERR_PLUGIN_NOT_AVAILABLE = 50
ERR_PLUGIN_NOT_AVAILABLE_LIMITED = 51
# Plugin-specific codes.
ERR_ADDRESSES_EXHAUSTED = 100  # no free address left in this host's subnet
ERR_CHECK_FAILED = 101  # CHECK found the container's network differs from what ADD set up
ERR_INTERNAL = 102  # an unexpected failure (a bug): details carry the exception
ERR_ADDRESS_TAKEN = 103  # the requested address (runtimeConfig "ips") is another container's

# Capability / runtimeConfig keys and CNI_ARGS keys Podman 4.3 sends (seen on the wire).
ARG_POD_NAME = "K8S_POD_NAME"  # Podman puts the container's name here
GC_VALID_ATTACHMENTS = "cni.dev/valid-attachments"


class CniError(Exception):
    """A failure reported to the runtime as the spec's error object."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(f"{msg}: {details}" if details else msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_json(self, cni_version: str = "1.0.0") -> dict[str, Any]:
        out: dict[str, Any] = {"cniVersion": cni_version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CniError:
        return cls(int(data.get("code", ERR_INTERNAL)), str(data.get("msg", "")), str(data.get("details", "")))


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


class CniRequest:
    """One invocation: the environment's CNI_* variables and the parsed network configuration.

    ``podman_env``: Podman's own configuration files (``CONTAINERS_CONF``...), passed through so the
    node can ask the same Podman for the container's labels. ``runtime_pid``: the process that ran
    the plugin (Podman): its command line carries ``podman run --label ...`` (see the node).
    """

    __slots__ = ("command", "container_id", "netns", "ifname", "args", "path", "config", "podman_env", "runtime_pid")

    def __init__(self, command: str, container_id: str = "", netns: str = "", ifname: str = "",
                 args: dict[str, str] | None = None, path: str = "", config: dict[str, Any] | None = None,
                 podman_env: dict[str, str] | None = None, runtime_pid: int = 0) -> None:
        self.command = command
        self.container_id = container_id
        self.netns = netns
        self.ifname = ifname
        self.args = args or {}
        self.path = path
        self.config = config or {}
        self.podman_env = podman_env or {}
        self.runtime_pid = runtime_pid

    def __repr__(self) -> str:
        return f"CniRequest({self.command} {self.container_id[:12]} {self.ifname} {self.netns})"

    @property
    def cni_version(self) -> str:
        return str(self.config.get("cniVersion", "1.0.0"))

    @property
    def network_name(self) -> str:
        return str(self.config.get("name", ""))

    @property
    def runtime_config(self) -> dict[str, Any]:
        rc = self.config.get("runtimeConfig")
        return rc if isinstance(rc, dict) else {}

    def to_json(self) -> dict[str, Any]:
        return {
            "command": self.command,
            "containerId": self.container_id,
            "netns": self.netns,
            "ifname": self.ifname,
            "args": self.args,
            "path": self.path,
            "config": self.config,
            "podmanEnv": self.podman_env,
            "runtimePid": self.runtime_pid,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CniRequest:
        return cls(
            command=str(data["command"]),
            container_id=str(data.get("containerId", "")),
            netns=str(data.get("netns", "")),
            ifname=str(data.get("ifname", "")),
            args={str(k): str(v) for k, v in dict(data.get("args") or {}).items()},
            path=str(data.get("path", "")),
            config=dict(data.get("config") or {}),
            podman_env={str(k): str(v) for k, v in dict(data.get("podmanEnv") or {}).items()},
            runtime_pid=int(data.get("runtimePid") or 0),
        )


PODMAN_ENV_KEYS = ("CONTAINERS_CONF", "CONTAINERS_STORAGE_CONF", "CONTAINERS_REGISTRIES_CONF")


def parse_cni_args(text: str) -> dict[str, str]:
    """``CNI_ARGS``: ``K1=V1;K2=V2`` (SPEC.md "Parameters")."""
    out: dict[str, str] = {}
    for part in text.split(";"):
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise CniError(ERR_INVALID_ENV, "invalid CNI_ARGS", f"expected KEY=VALUE, got {part!r}")
        out[key] = value
    return out


def valid_container_id(text: str) -> bool:
    """SPEC.md "Parameters": alphanumeric, then alphanumerics, ``_``, ``.`` or ``-``."""
    return text.isascii() and text[0].isalnum() and all(c.isalnum() or c in "_.-" for c in text)


def valid_ifname(text: str) -> bool:
    """What the kernel accepts (dev_valid_name): 1-15 bytes, no ``/``, ``:`` or whitespace, not . or .."""
    return (0 < len(text.encode()) <= 15 and text not in (".", "..")
            and not any(c in "/:" or c.isspace() for c in text))


def parse_request(environ: Mapping[str, str], stdin: bytes, runtime_pid: int = 0) -> CniRequest:
    """Validate the environment and the configuration; raise :class:`CniError` with the spec's code."""
    from cni import jsonwire

    command = environ.get("CNI_COMMAND", "")
    if command not in COMMANDS:
        raise CniError(ERR_INVALID_ENV, "invalid CNI_COMMAND", f"expected one of {', '.join(COMMANDS)}, got {command!r}")
    try:
        config = jsonwire.loads(stdin) if stdin.strip() else None
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CniError(ERR_DECODE, "failed to decode network configuration", str(exc)) from None
    if command == "VERSION":
        # VERSION's stdin carries only {"cniVersion": ...}; it may be empty for old runtimes.
        return CniRequest(command, config=config if isinstance(config, dict) else {})
    if not isinstance(config, dict):
        raise CniError(ERR_DECODE, "failed to decode network configuration", "expected a JSON object on stdin")
    version = config.get("cniVersion")
    if not isinstance(version, str) or not version:
        raise CniError(ERR_INVALID_CONFIG, "invalid network configuration", "cniVersion is missing")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(
            ERR_INCOMPATIBLE_VERSION,
            "incompatible CNI version",
            f"{version} not supported; supported: {', '.join(SUPPORTED_VERSIONS)}",
        )
    if command == "CHECK" and version_tuple(version) < version_tuple(CHECK_SINCE):
        raise CniError(ERR_INCOMPATIBLE_VERSION, "incompatible CNI version", f"CHECK needs {CHECK_SINCE} or later")
    if command in ("GC", "STATUS") and version_tuple(version) < version_tuple(GC_STATUS_SINCE):
        raise CniError(ERR_INCOMPATIBLE_VERSION, "incompatible CNI version", f"{command} needs {GC_STATUS_SINCE} or later")
    if not isinstance(config.get("name"), str) or not config["name"]:
        raise CniError(ERR_INVALID_CONFIG, "invalid network configuration", "name is missing")
    required = {"ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"), "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
                "DEL": ("CNI_CONTAINERID", "CNI_IFNAME")}.get(command, ())
    for key in required:
        if not environ.get(key):
            raise CniError(ERR_INVALID_ENV, f"missing environment variable {key}", f"{command} needs {key}")
    container_id = environ.get("CNI_CONTAINERID", "")
    if container_id and not valid_container_id(container_id):
        raise CniError(ERR_INVALID_ENV, "invalid CNI_CONTAINERID",
                       "expected an alphanumeric start then letters, digits, '_', '.' or '-'")
    ifname = environ.get("CNI_IFNAME", "")
    if ifname and not valid_ifname(ifname):
        raise CniError(ERR_INVALID_ENV, "invalid CNI_IFNAME", f"not a Linux interface name: {ifname!r}")
    return CniRequest(
        command=command,
        container_id=environ.get("CNI_CONTAINERID", ""),
        netns=environ.get("CNI_NETNS", ""),
        ifname=environ.get("CNI_IFNAME", ""),
        args=parse_cni_args(environ.get("CNI_ARGS", "")),
        path=environ.get("CNI_PATH", ""),
        config=config,
        podman_env={k: environ[k] for k in PODMAN_ENV_KEYS if k in environ},
        runtime_pid=runtime_pid,
    )


def requested_version(stdin: bytes) -> str | None:
    """VERSION's ``cniVersion`` without the json module (VERSION must answer fast, see module doc)."""
    text = stdin.decode("utf-8", "replace")
    key = text.find('"cniVersion"')
    if key < 0:
        return None
    start = text.find('"', text.find(":", key) + 1)
    end = text.find('"', start + 1)
    return text[start + 1:end] if start >= 0 and end > start else None


def version_answer(requested: str | None) -> str:
    """The VERSION answer (JSON text); ``cniVersion`` echoes the runtime's version when we speak it."""
    version = requested if requested in SUPPORTED_VERSIONS else "1.0.0"
    supported = ", ".join(f'"{v}"' for v in SUPPORTED_VERSIONS)
    return f'{{"cniVersion": "{version}", "supportedVersions": [{supported}]}}'


def add_result(cni_version: str, interfaces: list[dict[str, Any]], ips: list[dict[str, Any]],
               routes: list[dict[str, Any]]) -> dict[str, Any]:
    """An ADD result in *cni_version*'s format: before 1.0.0 each IP carries ``"version": "4"``."""
    if version_tuple(cni_version) < (1, 0, 0):
        ips = [{**ip, "version": "4"} for ip in ips]
    return {"cniVersion": cni_version, "interfaces": interfaces, "ips": ips, "routes": routes, "dns": {}}
