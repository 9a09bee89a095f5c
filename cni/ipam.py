"""Address management for one host's Flatnet subnet: a directory of files, one per leased address.

Layout of ``<data_dir>/<network>/`` (the same idea as the reference ``host-local`` plugin)::

    lock            flock(2)-ed exclusively around every read-modify-write
    last_reserved   the last address handed out: the next search starts after it, so an
                    address just freed is not reused at once (a stale route or ARP entry for the
                    old container would otherwise reach the new one)
    10.87.1.7       one file per leased address: the lease as JSON (container id, ifname, ...)
    recent          the last RECENT_MAX released leases' (container, ifname, address): an ADD for
                    the same container gets its old address back if still free. Podman 4.3's
                    ``network reload`` is a DEL then an ADD without asking for the old address.

Why it is crash-safe: a lease file is written in full under a temporary name and then
``link(2)``-ed to its address name, which fails if the name exists. So a lease is either complete
or absent, and one address can never be leased twice even if the lock were bypassed. A process
killed at any point leaves at worst a temporary file (removed by the next locked operation) or a
complete lease whose container never started (freed by DEL, which runs when the runtime cleans
up, or by GC / the node's reconcile). No fsync: a power loss restarts the WSL2 VM and with it every
container; GC frees the leases then.

Standard library only: the plugin's fallback path and the node both use it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

LOCK_FILE = "lock"
LAST_RESERVED_FILE = "last_reserved"
RECENT_FILE = "recent"
RECENT_MAX = 256
TMP_PREFIX = ".tmp-"


class AddressesExhausted(Exception):
    """Every address of the subnet is leased."""


class AddressTaken(Exception):
    """The requested address is leased to another container."""


@dataclass(frozen=True)
class Lease:
    """Who holds an address, and what the node needs to register and clean up the container."""

    container_id: str
    ifname: str
    host_ifname: str = ""
    name: str = ""  # the container's name (Podman passes it as K8S_POD_NAME)
    netns: str = ""
    port_mappings: list[dict[str, Any]] = field(default_factory=list)
    podman_env: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Lease:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


class AddressPool:
    """Leases for one network on one host. Safe across processes and threads (each call locks)."""

    def __init__(self, data_dir: str | Path, network: str, subnet: ipaddress.IPv4Network,
                 gateway: ipaddress.IPv4Address | None = None) -> None:
        if subnet.num_addresses < 4:
            raise ValueError(f"subnet {subnet} is too small")
        self.dir = Path(data_dir) / network
        self.subnet = subnet
        self.gateway = gateway or next(subnet.hosts())

    # -- queries ------------------------------------------------------------------------------

    def leases(self) -> dict[ipaddress.IPv4Address, Lease]:
        with self._locked():
            return dict(self._scan())

    def find(self, container_id: str, ifname: str) -> tuple[ipaddress.IPv4Address, Lease] | None:
        with self._locked():
            return self._find(container_id, ifname)

    # -- changes ------------------------------------------------------------------------------

    def allocate(self, lease: Lease, requested: ipaddress.IPv4Address | None = None) -> ipaddress.IPv4Address:
        """Lease a free address to *lease*'s (container, ifname); the same one again if it has one.

        *requested*: this address or none (``podman run --ip``, and Podman's ``network reload``,
        which asks for the container's previous address); raises :class:`AddressTaken` if another
        container holds it, ``ValueError`` if it is not a usable address of the subnet.
        """
        with self._locked():
            found = self._find(lease.container_id, lease.ifname)
            if found and requested is not None and found[0] != requested:
                os.unlink(self.dir / str(found[0]))  # moving to the requested address
                found = None
            if found:
                address, old = found
                if old != lease:
                    self._write(address, lease, replace=True)
                return address
            if requested is not None:
                if requested not in self.subnet or requested in (self.gateway, self.subnet.network_address,
                                                                 self.subnet.broadcast_address):
                    raise ValueError(f"{requested} is not a usable address of {self.subnet}")
                try:
                    self._write(requested, lease, replace=False)
                except FileExistsError:
                    holder = self._read(requested)
                    raise AddressTaken(f"{requested} is leased to {holder.container_id[:12] if holder else '?'}") from None
                return requested
            taken = {a for a, _ in self._scan()}
            previous = self._read_recent().get(f"{lease.container_id}/{lease.ifname}")
            if previous is not None and previous not in taken and previous in set(self._candidates()):
                self._write(previous, lease, replace=False)
                return previous
            for address in self._candidates():
                if address in taken:
                    continue
                try:
                    self._write(address, lease, replace=False)
                except FileExistsError:  # cannot happen under the lock; never lease twice anyway
                    continue
                self._write_last_reserved(address)
                return address
            raise AddressesExhausted(f"no free address in {self.subnet} ({len(taken)} leased)")

    def release(self, container_id: str, ifname: str) -> list[tuple[ipaddress.IPv4Address, Lease]]:
        """Free what (container, ifname) holds; returns what was freed (nothing the second time)."""
        with self._locked():
            freed = [(a, lease) for a, lease in self._scan() if (lease.container_id, lease.ifname) == (container_id, ifname)]
            for address, _ in freed:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.dir / str(address))
            if freed:
                recent = self._read_recent()
                recent.pop(f"{container_id}/{ifname}", None)
                recent[f"{container_id}/{ifname}"] = freed[0][0]
                self._write_recent(dict(list(recent.items())[-RECENT_MAX:]))
            return freed

    def release_address(self, address: ipaddress.IPv4Address, container_id: str) -> bool:
        """Free *address* if *container_id* still holds it (GC, reconcile)."""
        with self._locked():
            lease = self._read(address)
            if lease is None or lease.container_id != container_id:
                return False
            os.unlink(self.dir / str(address))
            return True

    # -- internals ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._remove_temporaries()
            yield
        finally:
            os.close(fd)  # closing drops the flock

    def _remove_temporaries(self) -> None:
        # Under the lock no one else is writing, so any temporary file is a crashed writer's.
        for entry in os.scandir(self.dir):
            if entry.name.startswith(TMP_PREFIX):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)

    def _candidates(self) -> Iterator[ipaddress.IPv4Address]:
        """Usable addresses (not network, gateway or broadcast), starting after the last reserved."""
        hosts = [a for a in self.subnet.hosts() if a != self.gateway]
        last = self._read_last_reserved()
        start = hosts.index(last) + 1 if last in hosts else 0
        yield from hosts[start:]
        yield from hosts[:start]

    def _scan(self) -> Iterator[tuple[ipaddress.IPv4Address, Lease]]:
        for entry in os.scandir(self.dir):
            try:
                address = ipaddress.IPv4Address(entry.name)
            except ValueError:
                continue
            lease = self._read(address)
            if lease is not None:
                yield address, lease

    def _find(self, container_id: str, ifname: str) -> tuple[ipaddress.IPv4Address, Lease] | None:
        for address, lease in self._scan():
            if lease.container_id == container_id and lease.ifname == ifname:
                return address, lease
        return None

    def _read(self, address: ipaddress.IPv4Address) -> Lease | None:
        try:
            data = json.loads((self.dir / str(address)).read_text())
            return Lease.from_json(data)
        except FileNotFoundError:
            return None
        except (ValueError, TypeError):
            # A lease file we cannot read still holds its address: never hand it out twice.
            return Lease(container_id="?", ifname="?")

    def _write(self, address: ipaddress.IPv4Address, lease: Lease, replace: bool) -> None:
        tmp = self.dir / f"{TMP_PREFIX}{os.getpid()}-{address}"
        tmp.write_text(json.dumps(lease.to_json()))
        try:
            if replace:
                os.replace(tmp, self.dir / str(address))
            else:
                try:
                    os.link(tmp, self.dir / str(address))
                except OSError as exc:
                    if exc.errno == errno.EEXIST:
                        raise FileExistsError(str(address)) from None
                    raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def _read_recent(self) -> dict[str, ipaddress.IPv4Address]:
        try:
            return {k: ipaddress.IPv4Address(v) for k, v in json.loads((self.dir / RECENT_FILE).read_text()).items()}
        except (FileNotFoundError, ValueError, TypeError, AttributeError):
            return {}

    def _write_recent(self, recent: dict[str, ipaddress.IPv4Address]) -> None:
        tmp = self.dir / f"{TMP_PREFIX}{os.getpid()}-recent"
        tmp.write_text(json.dumps({k: str(v) for k, v in recent.items()}))
        os.replace(tmp, self.dir / RECENT_FILE)

    def _read_last_reserved(self) -> ipaddress.IPv4Address | None:
        try:
            return ipaddress.IPv4Address((self.dir / LAST_RESERVED_FILE).read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def _write_last_reserved(self, address: ipaddress.IPv4Address) -> None:
        tmp = self.dir / f"{TMP_PREFIX}{os.getpid()}-last"
        tmp.write_text(str(address))
        os.replace(tmp, self.dir / LAST_RESERVED_FILE)
