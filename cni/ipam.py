"""Address management for one host's Flatnet subnet: a directory of files, one per leased address.

Layout of ``<data_dir>/<network>/`` (the same idea as the reference ``host-local`` plugin)::

    lock            flock(2)-ed exclusively around every read-modify-write. Its content is the
                    last address handed out (a hint): the next search starts after it, so an
                    address just freed is not reused at once (a stale route or ARP entry for the
                    old container would otherwise reach the new one)
    10.87.1.7       one file per leased address: the lease as JSON (container id, ifname, ...).
                    These files are the truth; everything else is a hint.
    id.<cid>.<if>   symlink -> "10.87.1.7": the address this (container, ifname) has or last had,
                    so ADD and DEL need not read every lease. It stays after DEL: an ADD for the
                    same container gets its old address back if still free (Podman 4.3's
                    ``network reload`` is a DEL then an ADD that does not ask for the old address).
                    At most INDEX_MAX are kept; stale ones go first.

ADD writes the index link before the lease, so every lease is reachable from its index and DEL
never misses one. Why it is crash-safe: a lease file is created with ``O_EXCL`` (which fails if the name exists, so
one address can never be leased twice even if the lock were bypassed) and filled by one small
``write(2)``, which a kill cannot split. A process killed at any point leaves at worst an empty
lease file, which its index link (written just before) still points to, so DEL frees it; or a
complete lease whose container never started (freed by DEL, which runs when the runtime cleans
up, or by GC / the node's reconcile). Each step is one metadata operation, because on a loaded
disk each costs about a millisecond and ADD's budget is a few tens of them. No fsync: a power loss restarts the WSL2 VM and with it every
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
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

LOCK_FILE = "lock"
INDEX_PREFIX = "id."
INDEX_MAX = 1024
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
        first, last = int(subnet.network_address) + 1, int(subnet.broadcast_address) - 1
        # Usable addresses as text (what the lease files are called), gateway excluded.
        self._usable = [_ntoa(n) for n in range(first, last + 1) if n != int(self.gateway)]
        self._usable_set = set(self._usable)
        self._lock_fd = -1

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

        *requested*: this address or none (``podman run --ip``); raises :class:`AddressTaken` if
        another container holds it, ``ValueError`` if it is not a usable address of the subnet.
        """
        if requested is not None and str(requested) not in self._usable_set:
            raise ValueError(f"{requested} is not a usable address of {self.subnet}")
        with self._locked():
            found = self._find(lease.container_id, lease.ifname)
            if found and requested is not None and found[0] != requested:
                _unlink(self.dir / str(found[0]))  # moving to the requested address
                found = None
            if found:
                address, old = found
                if old != lease:
                    self._write_lease(str(address), lease, replace=True)
                return address
            if requested is not None:
                self._claim(str(requested), lease)
                return requested
            previous = self._index_target(lease.container_id, lease.ifname)
            if previous in self._usable_set and not os.path.lexists(self.dir / previous):
                self._claim(previous, lease)
                return ipaddress.IPv4Address(previous)
            taken = set(os.listdir(self.dir))
            for address in self._candidates():
                if address in taken:
                    continue
                self._claim(address, lease)
                self._write_last_reserved(address)
                if len(taken) > INDEX_MAX + len(self._usable):
                    self._prune_index(taken)
                return ipaddress.IPv4Address(address)
            leased = len(self._usable_set & taken)
            raise AddressesExhausted(f"no free address in {self.subnet} ({leased} leased)")

    def release(self, container_id: str, ifname: str) -> list[tuple[ipaddress.IPv4Address, Lease]]:
        """Free what (container, ifname) holds; returns what was freed (nothing the second time)."""
        with self._locked():
            found = self._find(container_id, ifname)
            if found is None:
                return []
            _unlink(self.dir / str(found[0]))  # the index link stays: the address may come back
            return [found]

    def release_address(self, address: ipaddress.IPv4Address, container_id: str) -> bool:
        """Free *address* if *container_id* still holds it (GC, reconcile)."""
        with self._locked():
            lease = self._read(str(address))
            if lease is None or lease.container_id != container_id:
                return False
            _unlink(self.dir / str(address))
            return True

    # -- internals ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            fd = os.open(self.dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._lock_fd = fd
            self._remove_temporaries()
            yield
        finally:
            self._lock_fd = -1
            os.close(fd)  # closing drops the flock

    def _remove_temporaries(self) -> None:
        # Under the lock no one else is writing, so any temporary file is a crashed writer's.
        for name in os.listdir(self.dir):
            if name.startswith(TMP_PREFIX):
                _unlink(self.dir / name)

    def _candidates(self) -> Iterator[str]:
        """Usable addresses, starting after the last reserved one."""
        last = self._read_last_reserved()
        start = self._usable.index(last) + 1 if last in self._usable_set else 0
        yield from self._usable[start:]
        yield from self._usable[:start]

    def _index_path(self, container_id: str, ifname: str) -> Path:
        if "/" in container_id or "/" in ifname or container_id in ("", ".", ".."):
            raise ValueError(f"bad container id or ifname: {container_id!r} {ifname!r}")
        return self.dir / f"{INDEX_PREFIX}{container_id}.{ifname}"

    def _index_target(self, container_id: str, ifname: str) -> str | None:
        try:
            return os.readlink(self._index_path(container_id, ifname))
        except (FileNotFoundError, OSError):
            return None

    def _claim(self, address: str, lease: Lease) -> None:
        """Index link first, then the lease: a crash in between leaves only a harmless link."""
        index = self._index_path(lease.container_id, lease.ifname)
        if self._index_target(lease.container_id, lease.ifname) != address:
            _unlink(index)  # under the lock; a crash right here leaves no lease to lose
            os.symlink(address, index)
        try:
            self._write_lease(address, lease, replace=False)
        except FileExistsError:
            holder = self._read(address)
            raise AddressTaken(f"{address} is leased to {holder.container_id[:12] if holder else '?'}") from None

    def _prune_index(self, names: set[str]) -> None:
        """Drop index links whose address is free or held by someone else (bounded directory size)."""
        for name in names:
            if not name.startswith(INDEX_PREFIX):
                continue
            try:
                target = os.readlink(self.dir / name)
            except OSError:
                target = None
            lease = self._read(target) if target in self._usable_set else None
            if lease is None or name != f"{INDEX_PREFIX}{lease.container_id}.{lease.ifname}":
                _unlink(self.dir / name)

    def _scan(self) -> Iterator[tuple[ipaddress.IPv4Address, Lease]]:
        for name in os.listdir(self.dir):
            if name in self._usable_set:
                lease = self._read(name)
                if lease is not None:
                    yield ipaddress.IPv4Address(name), lease

    def _find(self, container_id: str, ifname: str) -> tuple[ipaddress.IPv4Address, Lease] | None:
        address = self._index_target(container_id, ifname)
        if address is None or address not in self._usable_set:
            return None
        lease = self._read(address)
        if lease is None:
            return None
        if lease.container_id == "?":
            # Empty or torn: a writer killed between create and write. Our index link was written
            # just before it under the lock, so it is ours to free (see the module doc).
            lease = Lease(container_id, ifname)
        if (lease.container_id, lease.ifname) != (container_id, ifname):
            return None
        return ipaddress.IPv4Address(address), lease

    def _read(self, address: str) -> Lease | None:
        try:
            with open(self.dir / address) as f:
                return Lease.from_json(json.load(f))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError):
            # A lease file we cannot read still holds its address: never hand it out twice.
            return Lease(container_id="?", ifname="?")

    def _write_lease(self, address: str, lease: Lease, replace: bool) -> None:
        data = json.dumps(lease.to_json()).encode()
        if replace:  # an update of our own lease: write aside, rename over (atomic)
            tmp = self.dir / f"{TMP_PREFIX}{os.getpid()}-{threading.get_ident()}-{address}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, self.dir / address)
            return
        # O_EXCL: fails if the name exists, so never two holders.
        fd = os.open(self.dir / address, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            if os.write(fd, data) != len(data):
                raise OSError(errno.EIO, f"short write of lease {address}")
        finally:
            os.close(fd)

    def _read_last_reserved(self) -> str | None:
        return os.pread(self._lock_fd, 64, 0).decode("ascii", "replace").strip() or None

    def _write_last_reserved(self, address: str) -> None:
        data = address.ljust(15).encode()  # fixed width: no truncate needed, a torn write is only a bad hint
        os.pwrite(self._lock_fd, data, 0)


def _ntoa(n: int) -> str:
    return f"{n >> 24 & 255}.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
