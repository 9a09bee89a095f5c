"""Reload without restart: what a changed ``node.toml`` means for a running flatnet-node. Sans-I/O.

Theory of operation. ``SIGHUP`` or ``flatnet reload`` (control command ``reload``) makes the node
re-read its config file. :func:`plan_reload` compares the running config with the new one (and
the set of referenced files whose *contents* changed: certificate, key, CA bundle, token) and
returns a :class:`ReloadPlan`, a value saying what each component must do. The I/O layer
(``Node.reload`` in ``flatnet/node/main.py``) then lets every component *prepare* its part from the
plan (load certificates, build the new firewall, read the token: anything that can fail) and only
when all preparations succeeded *applies* them. A config that does not load, or a part that does
not prepare, changes nothing: the error (a :class:`~flatnet.config.ConfigError` naming the file and
key) is logged and answered.

What can change live, and what that does:

====================  =======================================================================
pki.ca, pki.blocklist  new trust store (``TunnelEngine.set_trust``): peers now refused are cut
pki.cert, pki.key      new own identity; every peer with a session re-handshakes (the old
                       session carries traffic until the new one is confirmed)
firewall               the rule set is swapped at once; tracked flows the new rules no longer
                       allow are forgotten (their next packet meets the new rules)
peers                  added / removed / endpoints updated; untouched peers keep their sessions
gateway                new admin URL, token file or token contents: a new pusher, full resync
====================  =======================================================================

Everything else (``name``, ``control_socket``, ``flatnet_range``, ``[tunnel]``, ``[cni]``,
``[lighthouse]``) needs a restart: the plan lists those keys in ``needs_restart`` and the running
values stay in force (:attr:`ReloadPlan.config` is the new config with those values put back).
"""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from flatnet.firewall import FirewallConfig
from flatnet.node.config import GatewayPushConfig, NodeConfig, StaticPeer

# Top-level keys and sections a running node cannot take over; each is reported by its key.
RESTART_KEYS = ("name", "control_socket", "flatnet_range")
RESTART_SECTIONS = ("tunnel", "cni", "lighthouse", "metrics")


@dataclass(frozen=True)
class ReloadPlan:
    """What a reload does, component by component (empty: nothing changed)."""

    config: NodeConfig  # the config the node runs with afterwards (restart-only values kept)
    trust: bool = False  # rebuild the trust store (CA bundle, blocklist)
    identity: bool = False  # new own certificate / key: re-handshake the peers
    firewall: FirewallConfig | None = None  # the new rule set, None: unchanged
    peers_added: tuple[StaticPeer, ...] = ()
    peers_removed: tuple[ipaddress.IPv4Address, ...] = ()
    peers_updated: tuple[StaticPeer, ...] = ()  # same IP, other endpoints
    gateway: GatewayPushConfig | None = None  # new push settings (full resync), None: unchanged
    needs_restart: tuple[str, ...] = ()  # keys whose change was NOT applied

    @property
    def empty(self) -> bool:
        return not self.changes and not self.needs_restart

    @property
    def tunnel_changed(self) -> bool:
        return bool(self.trust or self.identity or self.firewall is not None or self.peers_added
                    or self.peers_removed or self.peers_updated)

    @property
    def changes(self) -> list[str]:
        """One line per change applied, for the log and the ``flatnet reload`` answer."""
        out = []
        if self.trust:
            out.append("pki: trust store reloaded (CA bundle / blocklist)")
        if self.identity:
            out.append("pki: own certificate/key reloaded, peers re-handshake")
        if self.firewall is not None:
            out.append(f"firewall: {len(self.firewall.inbound)} inbound, {len(self.firewall.outbound)} outbound rules")
        out += [f"peers: added {p.ip} ({', '.join(p.endpoints) or 'no endpoint'})" for p in self.peers_added]
        out += [f"peers: removed {ip}" for ip in self.peers_removed]
        out += [f"peers: {p.ip} endpoints now {', '.join(p.endpoints) or 'none'}" for p in self.peers_updated]
        if self.gateway is not None:
            out.append(f"gateway: push to {self.gateway.admin_url or 'nowhere'} (full resync)")
        return out

    def summary(self) -> dict:
        return {"changes": self.changes, "needs_restart": list(self.needs_restart)}


def referenced_files(config: NodeConfig) -> tuple[Path, ...]:
    """Files whose contents a reload re-reads even when their path is unchanged."""
    files = [config.pki.ca, config.pki.cert, config.pki.key]
    if config.gateway.token_file is not None:
        files.append(config.gateway.token_file)
    return tuple(files)


def plan_reload(old: NodeConfig, new: NodeConfig, changed_files: frozenset[Path] | set[Path] = frozenset()) -> ReloadPlan:
    """Compare the running config with the newly loaded one. *changed_files*: referenced files
    (see :func:`referenced_files`) whose contents differ from what the node loaded."""
    changed_files = frozenset(Path(p) for p in changed_files)
    needs_restart = []
    kept: dict = {}
    for key in RESTART_KEYS:
        if getattr(old, key) != getattr(new, key):
            needs_restart.append(key)
            kept[key] = getattr(old, key)
    for section in RESTART_SECTIONS:
        old_section, new_section = getattr(old, section), getattr(new, section)
        if old_section != new_section:
            needs_restart += [f"{section}.{name}" for name in _changed_fields(old_section, new_section)]
            kept[section] = old_section
    config = dataclasses.replace(new, **kept)

    trust = (old.pki.ca != new.pki.ca or old.pki.blocklist != new.pki.blocklist
             or new.pki.ca in changed_files)
    identity = (old.pki.cert != new.pki.cert or old.pki.key != new.pki.key
                or new.pki.cert in changed_files or new.pki.key in changed_files)

    old_peers = {p.ip: p for p in old.peers}
    new_peers = {p.ip: p for p in new.peers}
    added = tuple(p for ip, p in new_peers.items() if ip not in old_peers)
    removed = tuple(ip for ip in old_peers if ip not in new_peers)
    updated = tuple(p for ip, p in new_peers.items() if ip in old_peers and old_peers[ip] != p)

    gateway = None
    if (old.gateway != new.gateway
            or (new.gateway.token_file is not None and new.gateway.token_file in changed_files)):
        gateway = new.gateway
    return ReloadPlan(
        config=config,
        trust=trust,
        identity=identity,
        firewall=new.firewall if old.firewall != new.firewall else None,
        peers_added=added,
        peers_removed=removed,
        peers_updated=updated,
        gateway=gateway,
        needs_restart=tuple(needs_restart),
    )


def _changed_fields(old, new) -> list[str]:
    return [f.name for f in dataclasses.fields(old) if getattr(old, f.name) != getattr(new, f.name)]


def changed_files(loaded: dict[Path, bytes | None], current: dict[Path, bytes | None]) -> frozenset[Path]:
    """Files whose digest differs from the one the node loaded (a path new to *loaded* is left
    to :func:`plan_reload`'s comparison of paths)."""
    return frozenset(p for p, digest in current.items() if p in loaded and loaded[p] != digest)
