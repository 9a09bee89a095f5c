"""A simulated UDP network for sans-I/O protocol objects: many nodes, one fake clock, no sleeps.

Theory of operation
-------------------
Each node wraps a protocol object of the aioquic shape (:class:`SansIOProtocol`)::

    receive_datagram(data, addr, now)   a datagram arrived from addr
    handle_timer(now)                   the deadline from get_timer() has come
    get_timer() -> float | None         the next absolute deadline, if any
    datagrams_to_send() -> [(data, addr)]   (a ``datagrams_to_send(now)`` form works too)

:class:`SimNet` keeps one queue of in-flight datagrams ordered by arrival time. A step takes the
earliest thing that is due — a callback scheduled on the :class:`~flatnet.testing.clock.FakeClock`,
a datagram arriving, or a node's timer — sets the clock to its time and hands it over; then it pulls
what that node (every node, after a clock callback) wants to send and puts it on the wire. Ties go
in that order (callbacks, arrivals in send order, timers in node order): a run is reproducible.

A datagram's path, each step narrated in the flow log (``net.flow_log``, ``net.flow_text()``)::

    send ─► NAT outbound mapping (if the sender sits behind a NAT and the destination is not on
            its LAN) ─► tamper hooks (flip bits, truncate, drop, record, ...) ─► link: loss,
            latency + jitter, reordering, duplication ─► ... time passes ...
         ─► arrival: blocked pair? ─► NAT inbound mapping + filtering ─► receive_datagram

Randomness (loss, jitter, ...) comes from one ``random.Random(seed)``: a test with a seed replays
exactly. Addresses are ``(ip, port)`` tuples of strings and ints, as the socket module uses.

NAT behaviour follows RFC 4787's vocabulary: mapping is endpoint-independent (one public port per
internal address: "cone") or address(-and-port)-dependent (a new public port per remote:
"symmetric"); filtering likewise decides which remote may send through a mapping. Mappings expire
after ``mapping_timeout`` seconds without outbound traffic (RFC 4787 REQ-5/6).

Example::

    net = SimNet(seed=1, default_link=LinkProfile(latency=0.010))
    nat = net.add_nat("home", public_ip="198.51.100.1", mapping=SYMMETRIC)
    net.add_node("alice", alice_proto, ("192.168.1.10", 4242), nat=nat)
    net.add_node("bob", bob_proto, ("203.0.113.7", 4242))
    net.set_link("alice", "bob", LinkProfile(latency=0.02, loss=0.2))
    net.add_tamper(flip_bits(probability=0.05))
    net.run_until(lambda: bob_proto.connected, max_time=10)   # raises SimulationTimeout if not
"""

from __future__ import annotations

import heapq
import inspect
import itertools
import logging
import os
import random
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address
from typing import Protocol

from flatnet.testing.clock import FakeClock

log = logging.getLogger("flatnet.simnet")

Address = tuple[str, int]

# RFC 4787 behaviours, for both mapping (section 4.1) and filtering (section 5).
ENDPOINT_INDEPENDENT = "endpoint-independent"
ADDRESS_DEPENDENT = "address-dependent"
ADDRESS_AND_PORT_DEPENDENT = "address-and-port-dependent"
SYMMETRIC = ADDRESS_AND_PORT_DEPENDENT  # "symmetric NAT": a new mapping per remote endpoint
NAT_BEHAVIOURS = (ENDPOINT_INDEPENDENT, ADDRESS_DEPENDENT, ADDRESS_AND_PORT_DEPENDENT)

MAX_EVENTS_PER_INSTANT = 10_000  # more than this at one simulated instant: a timer livelock


class SansIOProtocol(Protocol):
    def receive_datagram(self, data: bytes, addr: Address, now: float) -> None: ...

    def handle_timer(self, now: float) -> None: ...

    def get_timer(self) -> float | None: ...

    def datagrams_to_send(self) -> list[tuple[bytes, Address]]: ...


class SimulationTimeout(AssertionError):
    """run_until's predicate did not become true in time (an AssertionError: pytest shows it plainly)."""


class SimulationError(RuntimeError):
    """The simulation cannot go on (e.g. a protocol's timer never moves past now)."""


@dataclass(frozen=True)
class Datagram:
    """A datagram on the wire: addresses as seen on the current segment; ``note`` narrates tampering."""

    data: bytes
    src: Address
    dst: Address
    note: str = ""


@dataclass(frozen=True)
class LinkProfile:
    """How a path treats datagrams. Probabilities are per datagram, in [0, 1]."""

    latency: float = 0.001  # one-way seconds
    jitter: float = 0.0  # extra delay, uniform in [0, jitter): reorders packets sent close together
    loss: float = 0.0
    duplicate: float = 0.0  # the copy takes its own latency + jitter
    reorder: float = 0.0  # held back by reorder_delay, so later packets overtake it
    reorder_delay: float = 0.010

    def __post_init__(self) -> None:
        for name in ("loss", "duplicate", "reorder"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1]")
        for name in ("latency", "jitter", "reorder_delay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")


@dataclass(frozen=True)
class FlowEntry:
    time: float
    event: str  # send, nat-map, tamper, lost, duplicate, reorder, deliver, drop, inject, timer
    src: Address | None = None
    dst: Address | None = None
    size: int = 0
    note: str = ""

    def __str__(self) -> str:
        where = f"{_fmt(self.src)} -> {_fmt(self.dst)} " if self.src or self.dst else ""
        size = f"{self.size}B " if self.size else ""
        return f"{self.time:12.6f}  {self.event:<9} {where}{size}{self.note}".rstrip()


def _fmt(addr: Address | None) -> str:
    return "?" if addr is None else f"{addr[0]}:{addr[1]}"


def _address(addr) -> Address:
    ip, port = addr
    IPv4Address(ip)  # validates
    if not 0 <= int(port) <= 65535:
        raise ValueError(f"bad port in {addr!r}")
    return (str(ip), int(port))


# -- NAT ---------------------------------------------------------------------------------------------


@dataclass
class NatMapping:
    internal: Address
    external: Address
    remote_key: object  # what the mapping is specific to (None for endpoint-independent)
    created: float
    last_outbound: float
    permitted: set[Address] = field(default_factory=set)  # remotes this mapping has sent to


class NatRouter:
    """A NAT in front of a private LAN, with RFC 4787 mapping and filtering behaviour.

    Build with :meth:`SimNet.add_nat`. ``mapping`` and ``filtering`` are one of
    :data:`NAT_BEHAVIOURS`; the common kinds are ``mapping=filtering=ENDPOINT_INDEPENDENT`` (full
    cone), ``mapping=ENDPOINT_INDEPENDENT, filtering=ADDRESS_AND_PORT_DEPENDENT`` (port-restricted
    cone, the default) and ``mapping=filtering=SYMMETRIC``.
    """

    def __init__(
        self,
        name: str,
        public_ip: str,
        mapping: str = ENDPOINT_INDEPENDENT,
        filtering: str = ADDRESS_AND_PORT_DEPENDENT,
        mapping_timeout: float = 120.0,
        hairpin: bool = True,
        preserve_ports: bool = False,
        port_base: int = 40000,
    ) -> None:
        if mapping not in NAT_BEHAVIOURS or filtering not in NAT_BEHAVIOURS:
            raise ValueError(f"mapping and filtering must be among {NAT_BEHAVIOURS}")
        self.name = name
        self.public_ip = str(IPv4Address(public_ip))
        self.mapping = mapping
        self.filtering = filtering
        self.mapping_timeout = mapping_timeout
        self.hairpin = hairpin
        self.preserve_ports = preserve_ports
        self._next_port = port_base
        self._by_key: dict[tuple, NatMapping] = {}
        self._by_port: dict[int, NatMapping] = {}
        self.inside: dict[Address, SimNode] = {}

    def __repr__(self) -> str:
        return (
            f"NatRouter({self.name!r}, {self.public_ip}, mapping={self.mapping}, filtering={self.filtering})"
        )

    def _remote_key(self, remote: Address):
        if self.mapping == ENDPOINT_INDEPENDENT:
            return None
        if self.mapping == ADDRESS_DEPENDENT:
            return remote[0]
        return remote

    def _expired(self, entry: NatMapping, now: float) -> bool:
        return now - entry.last_outbound > self.mapping_timeout

    def _forget(self, entry: NatMapping) -> None:
        self._by_key.pop((entry.internal, entry.remote_key), None)
        self._by_port.pop(entry.external[1], None)

    def _allocate_port(self, internal: Address) -> int:
        if self.preserve_ports and internal[1] not in self._by_port:
            return internal[1]
        while self._next_port in self._by_port:
            self._next_port += 1
        port = self._next_port
        self._next_port += 1
        if port > 65535:
            raise SimulationError(f"NAT {self.name} ran out of ports")
        return port

    def outbound(self, internal: Address, remote: Address, now: float) -> tuple[Address, bool]:
        """The public address *internal* appears as when sending to *remote*; (address, created?)."""
        key = (internal, self._remote_key(remote))
        entry = self._by_key.get(key)
        if entry is not None and self._expired(entry, now):
            self._forget(entry)
            entry = None
        created = entry is None
        if entry is None:
            port = self._allocate_port(internal)
            entry = NatMapping(internal, (self.public_ip, port), key[1], now, now)
            self._by_key[key] = entry
            self._by_port[port] = entry
        entry.last_outbound = now
        entry.permitted.add(remote)
        return entry.external, created

    def inbound(self, remote: Address, external_port: int, now: float) -> tuple[Address | None, str]:
        """Where a datagram from *remote* to our public port goes: (internal address, "") or (None, why)."""
        entry = self._by_port.get(external_port)
        if entry is None:
            return None, f"NAT {self.name}: no mapping for port {external_port}"
        if self._expired(entry, now):
            self._forget(entry)
            return None, f"NAT {self.name}: mapping for port {external_port} expired"
        if self.filtering == ADDRESS_DEPENDENT and all(r[0] != remote[0] for r in entry.permitted):
            return (
                None,
                f"NAT {self.name}: filtered ({remote[0]} never contacted from {_fmt(entry.internal)})",
            )
        if self.filtering == ADDRESS_AND_PORT_DEPENDENT and remote not in entry.permitted:
            return (
                None,
                f"NAT {self.name}: filtered ({_fmt(remote)} never contacted from {_fmt(entry.internal)})",
            )
        return entry.internal, ""

    def on_lan(self, ip: str) -> bool:
        """Is *ip* one of the private addresses behind this NAT?"""
        return any(addr[0] == ip for addr in self.inside)

    def mappings(self) -> list[NatMapping]:
        return list(self._by_port.values())

    def reset(self) -> None:
        """Forget every mapping (a NAT reboot): the next outbound packet gets a new public port."""
        self._by_key.clear()
        self._by_port.clear()


# -- tamper hooks --------------------------------------------------------------------------------------

# A hook sees each datagram put on the wire (after NAT outbound, before the link) and returns None to
# leave it alone, or the datagrams to carry instead: [] drops it, [changed] alters it, [d, d] doubles it.
TamperHook = Callable[[Datagram, random.Random], "Iterable[Datagram] | None"]
Match = Callable[[Datagram], bool]


def flip_bits(probability: float = 1.0, count: int = 1, match: Match | None = None) -> TamperHook:
    """Flip *count* random bits of a matching datagram, with *probability*."""

    def hook(datagram: Datagram, rng: random.Random):
        if not datagram.data or (match and not match(datagram)) or rng.random() >= probability:
            return None
        data = bytearray(datagram.data)
        flipped = []
        for _ in range(count):
            bit = rng.randrange(len(data) * 8)
            data[bit // 8] ^= 1 << (bit % 8)
            flipped.append(bit)
        return [replace(datagram, data=bytes(data), note=f"flipped bit(s) {flipped}")]

    return hook


def truncate(probability: float = 1.0, match: Match | None = None, keep: int | None = None) -> TamperHook:
    """Cut a matching datagram short (to *keep* bytes, or a random shorter length), with *probability*."""

    def hook(datagram: Datagram, rng: random.Random):
        if not datagram.data or (match and not match(datagram)) or rng.random() >= probability:
            return None
        length = keep if keep is not None else rng.randrange(len(datagram.data))
        length = min(length, len(datagram.data))
        return [
            replace(datagram, data=datagram.data[:length], note=f"truncated {len(datagram.data)}->{length}")
        ]

    return hook


def drop_matching(match: Match) -> TamperHook:
    """Drop every datagram *match* selects (a firewall rule in a lambda)."""

    def hook(datagram: Datagram, rng: random.Random):
        return [] if match(datagram) else None

    return hook


class Recorder:
    """A tamper hook that changes nothing and keeps a copy of each (matching) datagram, for replay:
    ``rec = net.add_tamper(Recorder()); ...; net.inject(rec.datagrams[0])``."""

    def __init__(self, match: Match | None = None) -> None:
        self.match = match
        self.datagrams: list[Datagram] = []

    def __call__(self, datagram: Datagram, rng: random.Random):
        if self.match is None or self.match(datagram):
            self.datagrams.append(datagram)
        return None


# -- nodes and the network -----------------------------------------------------------------------------


class SimNode:
    """A protocol object at an address, maybe behind a NAT. ``sent``/``received`` count datagrams."""

    def __init__(self, name: str, protocol: SansIOProtocol, addr: Address, nat: NatRouter | None) -> None:
        self.name = name
        self.protocol = protocol
        self.addr = addr
        self.nat = nat
        self.sent = 0
        self.received = 0
        self.timers_fired = 0
        self._pull_takes_now = _takes_argument(protocol.datagrams_to_send)

    def __repr__(self) -> str:
        behind = f" behind {self.nat.name}" if self.nat else ""
        return f"SimNode({self.name!r}, {_fmt(self.addr)}{behind})"

    def pull(self, now: float) -> list[tuple[bytes, Address]]:
        if self._pull_takes_now:
            return list(self.protocol.datagrams_to_send(now))
        return list(self.protocol.datagrams_to_send())


def _takes_argument(method) -> bool:
    try:
        parameters = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL) for p in parameters)


@dataclass(order=True)
class _InFlight:
    arrival: float
    seq: int
    datagram: Datagram = field(compare=False)
    origin: Address | None = field(compare=False)  # the sender's own (pre-NAT) address, for blocks
    lan: NatRouter | None = field(compare=False)  # set when the datagram stays on one NAT's LAN


class SimNet:
    """Nodes, NATs, links and the event loop that drives them on one :class:`FakeClock`."""

    def __init__(
        self,
        clock: FakeClock | None = None,
        seed: int = 0,
        default_link: LinkProfile = LinkProfile(),
        narrate: bool | None = None,
        describe: Callable[[bytes], str] | None = None,
        flow_log_limit: int = 200_000,
    ) -> None:
        """*describe(data)* names a datagram in the flow log (e.g. the tunnel's message type);
        *narrate* prints the flow as it happens (default: env ``FLATNET_SIMNET_NARRATE=1``)."""
        self.clock = clock or FakeClock()
        self.rng = random.Random(seed)
        self.default_link = default_link
        self.narrate = os.environ.get("FLATNET_SIMNET_NARRATE") == "1" if narrate is None else narrate
        self.describe = describe
        self.flow_log: deque[FlowEntry] = deque(maxlen=flow_log_limit)
        self.counts: Counter[str] = Counter()
        self.nodes: dict[str, SimNode] = {}
        self.nats: dict[str, NatRouter] = {}
        self._public: dict[Address, SimNode] = {}  # directly reachable nodes by address
        self._nat_by_ip: dict[str, NatRouter] = {}
        self._links: dict[tuple[str, str], LinkProfile] = {}
        self._blocked: set[frozenset] = set()
        self._hooks: list[TamperHook] = []
        self._queue: list[_InFlight] = []
        self._seq = itertools.count()
        self._instant = (None, 0)  # (time, events at that time): livelock guard

    # -- building ----------------------------------------------------------------------------------

    @property
    def now(self) -> float:
        return self.clock.now

    def add_nat(self, name: str, public_ip: str, **behaviour) -> NatRouter:
        """A NAT router; keyword arguments as :class:`NatRouter` (mapping, filtering, ...)."""
        if name in self.nats or name in self.nodes:
            raise ValueError(f"name {name!r} is taken")
        nat = NatRouter(name, public_ip, **behaviour)
        if nat.public_ip in self._nat_by_ip or any(a[0] == nat.public_ip for a in self._public):
            raise ValueError(f"address {nat.public_ip} is taken")
        self.nats[name] = nat
        self._nat_by_ip[nat.public_ip] = nat
        return nat

    def add_node(
        self, name: str, protocol: SansIOProtocol, addr: Address, nat: NatRouter | str | None = None
    ) -> SimNode:
        """Attach *protocol* at *addr*; behind *nat* (a NatRouter or its name), *addr* is private."""
        if name in self.nodes or name in self.nats:
            raise ValueError(f"name {name!r} is taken")
        addr = _address(addr)
        if isinstance(nat, str):
            nat = self.nats[nat]
        if nat is None:
            if addr in self._public or addr[0] in self._nat_by_ip:
                raise ValueError(f"address {_fmt(addr)} is taken")
        elif addr in nat.inside:
            raise ValueError(f"address {_fmt(addr)} is taken behind {nat.name}")
        node = SimNode(name, protocol, addr, nat)
        self.nodes[name] = node
        if nat is None:
            self._public[addr] = node
        else:
            nat.inside[addr] = node
        return node

    def node(self, name: str) -> SimNode:
        return self.nodes[name]

    def _wire_ip(self, name_or_ip: str) -> str:
        if name_or_ip in self.nodes:
            node = self.nodes[name_or_ip]
            return node.nat.public_ip if node.nat else node.addr[0]
        if name_or_ip in self.nats:
            return self.nats[name_or_ip].public_ip
        return str(IPv4Address(name_or_ip))

    def set_link(self, a: str, b: str, profile: LinkProfile, both_ways: bool = True) -> None:
        """The path from *a* to *b* (node names, NAT names or IPs as seen on that path: public IPs
        across the Internet, private IPs between two nodes on one NAT's LAN)."""
        key = (self._wire_ip(a), self._wire_ip(b))
        self._links[key] = profile
        if both_ways:
            self._links[(key[1], key[0])] = profile

    def link(self, src_ip: str, dst_ip: str) -> LinkProfile:
        return self._links.get((src_ip, dst_ip), self.default_link)

    def block(self, a: str | Address, b: str | Address) -> None:
        """Drop UDP between *a* and *b* (an IP for any port, or an (ip, port)), both ways, on arrival.
        A node's private address, its NAT's public mapping and its name all match."""
        self._blocked.add(frozenset((self._endpoint_spec(a), self._endpoint_spec(b))))

    def unblock(self, a: str | Address, b: str | Address) -> None:
        self._blocked.discard(frozenset((self._endpoint_spec(a), self._endpoint_spec(b))))

    def _endpoint_spec(self, spec) -> str | Address:
        if isinstance(spec, str):
            if spec in self.nodes:
                return self.nodes[spec].addr
            return str(IPv4Address(spec))
        return _address(spec)

    def add_tamper(self, hook: TamperHook) -> TamperHook:
        """Run *hook* on every datagram put on the wire from now on; returns it (for remove_tamper)."""
        self._hooks.append(hook)
        return hook

    def remove_tamper(self, hook: TamperHook) -> None:
        self._hooks.remove(hook)

    # -- flow log ---------------------------------------------------------------------------------

    def _flow(self, event: str, src=None, dst=None, size: int = 0, note: str = "") -> None:
        entry = FlowEntry(self.clock.now, event, src, dst, size, note)
        self.flow_log.append(entry)
        self.counts[event] += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s", entry)
        if self.narrate:
            print(entry)

    def flow_text(self, last: int | None = None) -> str:
        entries = list(self.flow_log)
        if last is not None:
            entries = entries[-last:]
        return "\n".join(str(entry) for entry in entries)

    def _what(self, data: bytes) -> str:
        if self.describe is None:
            return ""
        try:
            return self.describe(data)
        except Exception as exc:  # noqa: BLE001 - narration must never break a run
            return f"<describe failed: {exc!r}>"

    # -- sending ----------------------------------------------------------------------------------

    def flush(self) -> None:
        """Put on the wire whatever any node wants to send (call after poking a protocol directly)."""
        for node in self.nodes.values():
            self._flush_node(node)

    def _flush_node(self, node: SimNode) -> None:
        for data, dst in node.pull(self.clock.now):
            node.sent += 1
            self._send(node, bytes(data), _address(dst))

    def _send(self, node: SimNode, data: bytes, dst: Address) -> None:
        now = self.clock.now
        what = self._what(data)
        self._flow("send", node.addr, dst, len(data), f"{node.name} {what}".rstrip())
        src = node.addr
        nat = node.nat
        lan = nat if nat is not None and nat.on_lan(dst[0]) else None
        if nat is not None and lan is None:
            src, created = nat.outbound(node.addr, dst, now)
            if created:
                self._flow("nat-map", node.addr, src, 0, f"NAT {nat.name} new mapping (for {_fmt(dst)})")
            if dst[0] == nat.public_ip and not nat.hairpin:
                self._flow("drop", src, dst, len(data), f"NAT {nat.name} does not hairpin")
                return
        self._put_on_wire(Datagram(data, src, dst), origin=node.addr, lan=lan)

    def _put_on_wire(self, datagram: Datagram, origin: Address, lan: NatRouter | None) -> None:
        now = self.clock.now
        datagrams = [datagram]
        for hook in self._hooks:
            carried = []
            for item in datagrams:
                result = hook(item, self.rng)
                if result is None:
                    carried.append(item)
                    continue
                result = list(result)
                if not result:
                    self._flow("tamper", item.src, item.dst, len(item.data), "dropped by hook")
                for changed in result:
                    if changed.note and changed.note != item.note:
                        self._flow("tamper", changed.src, changed.dst, len(changed.data), changed.note)
                carried.extend(result)
            datagrams = carried
        for item in datagrams:
            profile = self.link(item.src[0], item.dst[0])
            if profile.loss and self.rng.random() < profile.loss:
                self._flow("lost", item.src, item.dst, len(item.data), "link loss")
                continue
            copies = 2 if profile.duplicate and self.rng.random() < profile.duplicate else 1
            for copy in range(copies):
                delay = profile.latency + (self.rng.uniform(0, profile.jitter) if profile.jitter else 0.0)
                if profile.reorder and self.rng.random() < profile.reorder:
                    delay += profile.reorder_delay
                    self._flow(
                        "reorder", item.src, item.dst, len(item.data), f"held back {profile.reorder_delay}s"
                    )
                if copy:
                    self._flow("duplicate", item.src, item.dst, len(item.data))
                heapq.heappush(self._queue, _InFlight(now + delay, next(self._seq), item, origin, lan))

    def inject(
        self,
        datagram: Datagram | bytes,
        src: Address | None = None,
        dst: Address | None = None,
        delay: float = 0.0,
    ) -> None:
        """Put a datagram on the wire as if from *src* (spoofing and replay): it skips the sender's
        NAT, hooks and link, and arrives after *delay* through the receiver's NAT and blocks."""
        if not isinstance(datagram, Datagram):
            if src is None or dst is None:
                raise ValueError("inject(bytes) needs src and dst")
            datagram = Datagram(bytes(datagram), _address(src), _address(dst))
        elif src is not None or dst is not None:
            datagram = replace(datagram, src=_address(src or datagram.src), dst=_address(dst or datagram.dst))
        self._flow("inject", datagram.src, datagram.dst, len(datagram.data), self._what(datagram.data))
        heapq.heappush(self._queue, _InFlight(self.clock.now + delay, next(self._seq), datagram, None, None))

    # -- arriving ---------------------------------------------------------------------------------

    def _is_blocked(self, ends_a: Iterable[Address | None], ends_b: Iterable[Address | None]) -> bool:
        if not self._blocked:
            return False
        specs_a = {spec for addr in ends_a if addr for spec in (addr, addr[0])}
        specs_b = {spec for addr in ends_b if addr for spec in (addr, addr[0])}
        return any(frozenset((x, y)) in self._blocked for x in specs_a for y in specs_b)

    def _arrive(self, flight: _InFlight) -> None:
        datagram = flight.datagram
        now = self.clock.now
        target: SimNode | None
        nat = None if flight.lan is not None else self._nat_by_ip.get(datagram.dst[0])
        if flight.lan is not None:  # between two nodes behind one NAT: never touches the NAT
            target = flight.lan.inside.get(datagram.dst)
            internal = datagram.dst
            why = "port unreachable on the LAN"
        elif nat is not None:
            internal, why = nat.inbound(datagram.src, datagram.dst[1], now)
            target = nat.inside.get(internal) if internal else None
        else:
            internal = datagram.dst
            target = self._public.get(datagram.dst)
            why = "no such host" if all(a[0] != datagram.dst[0] for a in self._public) else "port unreachable"
        if self._is_blocked((datagram.src, flight.origin), (datagram.dst, internal)):
            self._flow("drop", datagram.src, datagram.dst, len(datagram.data), "blocked")
            return
        if target is None:
            self._flow("drop", datagram.src, datagram.dst, len(datagram.data), why)
            return
        via = f" via NAT {nat.name} to {_fmt(internal)}" if nat is not None else ""
        self._flow("deliver", datagram.src, datagram.dst, len(datagram.data), f"{target.name}{via}")
        target.received += 1
        target.protocol.receive_datagram(datagram.data, datagram.src, now)
        self._flush_node(target)

    # -- the event loop ---------------------------------------------------------------------------

    def _next_timer(self) -> tuple[float, SimNode] | None:
        best = None
        for node in self.nodes.values():
            when = node.protocol.get_timer()
            if when is not None and (best is None or when < best[0]):
                best = (when, node)
        return best

    def next_event_time(self) -> float | None:
        """When the next thing happens (an arrival, a timer, a clock callback), None if nothing will."""
        times = []
        if self._queue:
            times.append(self._queue[0].arrival)
        timer = self._next_timer()
        if timer is not None:
            times.append(timer[0])
        clock_call = self.clock.next_call_time()
        if clock_call is not None:
            times.append(clock_call)
        return max(min(times), self.clock.now) if times else None

    def step(self) -> bool:
        """Process the earliest due thing; False if nothing is scheduled at all."""
        when = self.next_event_time()
        if when is None:
            return False
        self._guard_livelock(when)
        clock_call = self.clock.next_call_time()
        self.clock.advance_to(when)  # runs the clock callbacks due by then
        if clock_call is not None and clock_call <= when:
            self.flush()  # a callback may have poked any protocol
            return True
        if self._queue and self._queue[0].arrival <= self.clock.now:
            self._arrive(heapq.heappop(self._queue))
            return True
        timer = self._next_timer()
        if timer is not None and timer[0] <= self.clock.now:
            node = timer[1]
            node.timers_fired += 1
            node.protocol.handle_timer(self.clock.now)
            self._flush_node(node)
        return True

    def _guard_livelock(self, when: float) -> None:
        at, count = self._instant
        count = count + 1 if at == when else 1
        self._instant = (when, count)
        if count > MAX_EVENTS_PER_INSTANT:
            raise SimulationError(
                f"more than {MAX_EVENTS_PER_INSTANT} events at t={when}: a timer that never moves past now?\n"
                + self.flow_text(last=20)
            )

    def run_for(self, seconds: float) -> None:
        """Run every event due within the next *seconds* of simulated time; the clock ends there."""
        deadline = self.clock.now + seconds
        self.flush()
        while (when := self.next_event_time()) is not None and when <= deadline:
            self.step()
        self.clock.advance_to(deadline)
        self.flush()

    def run_until(self, predicate: Callable[[], bool], max_time: float) -> float:
        """Run until *predicate()* is true (checked after every event); returns the simulated seconds
        it took. Raises :class:`SimulationTimeout` (with the flow log's tail) after *max_time* seconds."""
        start = self.clock.now
        deadline = start + max_time
        self.flush()
        while not predicate():
            when = self.next_event_time()
            if when is None or when > deadline:
                self.clock.advance_to(max(deadline, self.clock.now))
                if predicate():
                    break
                raise SimulationTimeout(
                    f"condition not met within {max_time}s of simulated time (t={self.clock.now})\n"
                    + self.flow_text(last=30)
                )
            self.step()
        return self.clock.now - start

    def in_flight(self) -> int:
        return len(self._queue)
