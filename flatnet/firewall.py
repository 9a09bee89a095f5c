"""The group firewall: which inner packets may leave toward, or arrive from, which peer. Sans-I/O.

Theory of operation (as Nebula's firewall, which Flatnet users know):

* Every peer is known by its certificate: host name, groups, Flatnet IP. Rules match on those and
  on the packet: protocol, the local port, and CIDRs of the remote or local inner address.
* Rules only allow. A packet passes if the connection-tracking table already knows its flow, or if
  a rule of its direction (``outbound`` toward a peer, ``inbound`` from one) matches; then its flow
  is tracked so the replies pass the other way. Anything else is dropped and counted.
* The default (no ``[firewall]`` section) is one "any" rule each way: every holder of a
  certificate from the team's CA may reach everything — the CA is the trust boundary. A team that
  wants less lists its rules, e.g. inbound TCP 80 only from group "web-admins".
* Conntrack entries expire after a timeout per protocol (TCP 12 min, UDP 3 min, other 10 min, as
  Nebula), driven by the ``now`` the caller passes: no clock is read here. Expired entries are
  swept lazily on lookup and in :meth:`Firewall.tick`.
* A TCP flow that has shown a FIN or RST (the caller passes the TCP flags) is closing: from then on
  each of its packets keeps it only ``tcp_closing_timeout`` (120 s, as Linux's TIME_WAIT) instead
  of 12 minutes; a SYN without ACK (the 4-tuple reused for a new connection) reopens it. Without
  this, every short connection (each HTTP request the gateway relays) stays tracked 12 minutes
  after it ended: the table, and the node's memory, grow for 12 minutes to rate x 720 s flows, and
  a rate above ``max_tracked_flows`` / 720 s (139 new connections/s) fills it (``conntrack_full``).

Ports: a rule's port is the *local* side's port for inbound (the service), the *remote* side's for
outbound (the service we reach). ICMP and non-first fragments have port 0 and match only rules
with port "any". A non-first IPv4 fragment is allowed if its (proto, addresses) pair has a tracked
flow — ports are not in the fragment, so this is the best a stateless router-side check can do.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from flatnet.config import ConfigError

PROTOCOLS = {"any": None, "tcp": 6, "udp": 17, "icmp": 1}
TCP_FIN, TCP_SYN, TCP_RST, TCP_ACK = 0x01, 0x02, 0x04, 0x10  # TCP header flag bits (byte 13)
INBOUND = "inbound"
OUTBOUND = "outbound"
# A tracked flow's expiry is restarted at most this often (seconds): the hot path's per-packet cost.
TRACK_REFRESH = 1.0


@dataclass(frozen=True)
class FirewallRuleConfig:
    """One allow rule, as written in the node's TOML under ``[[firewall.inbound]]`` / ``outbound``."""

    proto: Literal["any", "tcp", "udp", "icmp"] = "any"
    port: str = "any"  # "any", "80" or "8000-8100"
    host: str = "any"  # the remote certificate's host name, or "any"
    groups: list[str] = field(default_factory=list)  # the remote must be in all of these
    cidr: str = "any"  # the remote inner address must be in this CIDR
    local_cidr: str = "any"  # the local inner address (this node or its containers) must be in it


def _allow_all() -> list[FirewallRuleConfig]:
    return [FirewallRuleConfig()]


@dataclass(frozen=True)
class FirewallConfig:
    outbound: list[FirewallRuleConfig] = field(default_factory=_allow_all)
    inbound: list[FirewallRuleConfig] = field(default_factory=_allow_all)
    tcp_timeout: float = 720.0
    tcp_closing_timeout: float = 120.0  # after a FIN or RST (the module docstring)
    udp_timeout: float = 180.0
    default_timeout: float = 600.0
    max_tracked_flows: int = 100_000


@dataclass(frozen=True)
class PeerIdentity:
    """What the firewall knows of a peer: from its verified certificate."""

    name: str
    groups: frozenset[str]
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None


@dataclass(frozen=True)
class Rule:
    proto: int | None
    port_low: int
    port_high: int
    host: str | None
    groups: frozenset[str]
    cidr: ipaddress.IPv4Network | ipaddress.IPv6Network | None
    local_cidr: ipaddress.IPv4Network | ipaddress.IPv6Network | None

    @classmethod
    def from_config(cls, rule: FirewallRuleConfig, key: str = "firewall") -> Rule:
        proto = PROTOCOLS[rule.proto]
        if rule.port == "any":
            low, high = 0, 65535
        else:
            try:
                text_low, _, text_high = rule.port.partition("-")
                low = int(text_low)
                high = int(text_high) if text_high else low
            except ValueError:
                raise ConfigError("", f"{key}.port", f"expected 'any', a port or a range, got {rule.port!r}") from None
            if not 0 <= low <= high <= 65535:
                raise ConfigError("", f"{key}.port", f"port range out of 0..65535: {rule.port!r}")
        return cls(
            proto=proto,
            port_low=low,
            port_high=high,
            host=None if rule.host == "any" else rule.host,
            groups=frozenset(rule.groups),
            cidr=_network(rule.cidr, f"{key}.cidr"),
            local_cidr=_network(rule.local_cidr, f"{key}.local_cidr"),
        )

    @property
    def any_port(self) -> bool:
        return self.port_low == 0 and self.port_high == 65535

    def matches(self, proto: int, port: int, peer: PeerIdentity, remote, local) -> bool:
        if self.proto is not None and self.proto != proto:
            return False
        if not self.any_port and not (port and self.port_low <= port <= self.port_high):
            return False
        if self.host is not None and self.host != peer.name:
            return False
        if self.groups and not self.groups <= peer.groups:
            return False
        if self.cidr is not None and remote not in self.cidr:
            return False
        return not (self.local_cidr is not None and local not in self.local_cidr)


def _network(text: str, key: str):
    if text == "any":
        return None
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError as exc:
        raise ConfigError("", key, str(exc)) from None


# A tracked flow, oriented from this node's side: (proto, local addr, local port, remote addr, remote port).
FlowKey = tuple[int, bytes, int, bytes, int]


class Firewall:
    def __init__(self, config: FirewallConfig | None = None) -> None:
        config = config or FirewallConfig()
        self.config = config
        self.inbound = [Rule.from_config(r, f"firewall.inbound[{i}]") for i, r in enumerate(config.inbound)]
        self.outbound = [Rule.from_config(r, f"firewall.outbound[{i}]") for i, r in enumerate(config.outbound)]
        self._timeouts = {6: config.tcp_timeout, 17: config.udp_timeout}
        self.conntrack: dict[FlowKey, float] = {}  # flow -> expiry time
        self._pairs: dict[tuple[int, bytes, bytes], float] = {}  # (proto, local, remote) -> expiry: fragments
        self.drops: Counter = Counter()
        self._opened_by: dict[FlowKey, str] = {}  # flow -> the direction whose rule admitted it (reload)
        self._closing: set[FlowKey] = set()  # TCP flows that showed a FIN or RST
        # A rule list that is a single unconditional rule needs no per-packet rule evaluation; the
        # flow is still tracked, so swapping in stricter rules later behaves the same.
        self._allow_all = {
            INBOUND: self._unconditional(self.inbound),
            OUTBOUND: self._unconditional(self.outbound),
        }

    @staticmethod
    def _unconditional(rules: list[Rule]) -> bool:
        return any(
            r.proto is None and r.any_port and r.host is None and not r.groups and r.cidr is None and r.local_cidr is None
            for r in rules
        )

    def allow(
        self,
        direction: str,
        proto: int,
        local: bytes,
        local_port: int,
        remote: bytes,
        remote_port: int,
        peer: PeerIdentity,
        now: float,
        first_fragment: bool = True,
        tcp_flags: int = 0,
    ) -> bool:
        """May this packet pass? Tracks the flow when it may. Addresses are raw (4 or 16 bytes).

        *tcp_flags*: byte 13 of a TCP header (0 for other protocols, or when unknown): a FIN or RST
        shortens the flow's tracking to ``tcp_closing_timeout``."""
        timeout = self._timeouts.get(proto, self.config.default_timeout)
        if not first_fragment:
            expiry = self._pairs.get((proto, local, remote))
            if expiry is not None and expiry > now:
                return True
            self.drops[f"{direction}_fragment"] += 1
            return False
        key = (proto, local, local_port, remote, remote_port)
        expiry = self.conntrack.get(key)
        if expiry is not None and expiry > now:
            # Refreshed less than TRACK_REFRESH ago and nothing to note (FIN, SYN, RST): the expiry
            # stands (at most TRACK_REFRESH short of exact), one dictionary lookup per packet.
            if not tcp_flags & (TCP_FIN | TCP_SYN | TCP_RST) and expiry - now > timeout - TRACK_REFRESH:
                return True
            self._track(key, now, timeout, tcp_flags)
            return True
        if not self._allow_all[direction]:
            rules = self.inbound if direction == INBOUND else self.outbound
            port = local_port if direction == INBOUND else remote_port
            remote_addr = ipaddress.ip_address(remote)
            local_addr = ipaddress.ip_address(local)
            if not any(r.matches(proto, port, peer, remote_addr, local_addr) for r in rules):
                self.drops[f"{direction}_no_rule"] += 1
                return False
        if len(self.conntrack) >= self.config.max_tracked_flows:
            self.tick(now)
            if len(self.conntrack) >= self.config.max_tracked_flows:
                self.drops["conntrack_full"] += 1
                return False
        self._closing.discard(key)  # the mark of an expired flow on the same ports
        self._track(key, now, timeout, tcp_flags)
        self._opened_by[key] = direction
        return True

    def _track(self, key: FlowKey, now: float, timeout: float, tcp_flags: int) -> None:
        """(Re)start an allowed flow's expiry; a TCP FIN or RST marks it closing (a SYN alone clears that)."""
        if tcp_flags and key[0] == PROTOCOLS["tcp"]:
            if tcp_flags & (TCP_FIN | TCP_RST):
                self._closing.add(key)
            elif tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN:
                self._closing.discard(key)  # a new connection on the same ports
        if self._closing and key in self._closing:
            timeout = self.config.tcp_closing_timeout
        expiry = self.conntrack[key] = now + timeout
        pair = (key[0], key[1], key[3])
        if self._pairs.get(pair, 0.0) < expiry:  # a closing flow must not cut short another's fragments
            self._pairs[pair] = expiry

    def replace_rules(self, config: FirewallConfig, identity_for) -> int:
        """Swap in a new rule set (a config reload) at once, keeping the tracked flows it still
        allows; returns how many flows were forgotten. *identity_for(remote: bytes)* gives the
        PeerIdentity owning a remote inner address (None: no peer, the flow goes).

        A flow is checked against the new rules of the direction that opened it (inbound by its
        local port, outbound by its remote port). The rules are built first: a bad rule raises
        ConfigError and nothing changes."""
        replacement = Firewall(config)
        dropped = 0
        for key in list(self.conntrack):
            proto, local, local_port, remote, remote_port = key
            peer = identity_for(remote)
            opened_by = self._opened_by.get(key, INBOUND)
            port = local_port if opened_by == INBOUND else remote_port
            if peer is None or not replacement._admits(opened_by, proto, port, local, remote, peer):
                del self.conntrack[key]
                self._opened_by.pop(key, None)
                self._closing.discard(key)
                dropped += 1
        kept_pairs = {(proto, local, remote) for proto, local, _, remote, _ in self.conntrack}
        for pair in [p for p in self._pairs if p not in kept_pairs]:
            del self._pairs[pair]
        self.config = config
        self.inbound, self.outbound = replacement.inbound, replacement.outbound
        self._timeouts = replacement._timeouts
        self._allow_all = replacement._allow_all
        return dropped

    def _admits(self, direction: str, proto: int, port: int, local: bytes, remote: bytes, peer: PeerIdentity) -> bool:
        if self._allow_all[direction]:
            return True
        rules = self.inbound if direction == INBOUND else self.outbound
        remote_addr, local_addr = ipaddress.ip_address(remote), ipaddress.ip_address(local)
        return any(r.matches(proto, port, peer, remote_addr, local_addr) for r in rules)

    def tick(self, now: float) -> None:
        """Forget expired flows."""
        for table in (self.conntrack, self._pairs):
            expired = [k for k, expiry in table.items() if expiry <= now]
            for k in expired:
                del table[k]
        if len(self._opened_by) > len(self.conntrack):
            self._opened_by = {k: v for k, v in self._opened_by.items() if k in self.conntrack}
        if self._closing:
            self._closing = {k for k in self._closing if k in self.conntrack}

    def status(self) -> dict:
        return {
            "tracked_flows": len(self.conntrack),
            "closing_flows": len(self._closing),
            "inbound_rules": len(self.inbound),
            "outbound_rules": len(self.outbound),
            "drops": dict(self.drops),
        }


def identity_of(session_or_peer, fallback_ip=None) -> PeerIdentity:
    """The firewall identity of a tunnel session or peer, whatever the protocol core calls its fields."""
    cert = getattr(session_or_peer, "certificate", None) or getattr(session_or_peer, "peer_cert", None)
    source = cert if cert is not None else session_or_peer
    name = getattr(source, "name", None) or getattr(source, "host", None) or getattr(session_or_peer, "peer_name", "")
    groups: Iterable[str] = getattr(source, "groups", None) or getattr(session_or_peer, "peer_groups", ()) or ()
    ip = getattr(source, "ip", None) or getattr(session_or_peer, "peer_ip", None) or fallback_ip
    ip = getattr(ip, "ip", ip)  # a certificate's IPv4Interface
    return PeerIdentity(str(name), frozenset(groups), ip)
