"""A simulated week of a small Flatnet site: real tunnel engines, a lighthouse, NATs, faults, one fake clock.

Theory of operation
-------------------
:func:`run_week` builds, on :class:`~flatnet.testing.simnet.SimNet`:

    lighthouse (public)      host-1 (public)      host-2 .. host-N (each behind its own full-cone NAT)

Every host is a :class:`WeekHost`: a real :class:`~flatnet.proto.engine.TunnelEngine` (Noise IX,
certificates from a real CA) plus a real :class:`~lighthouse.client.LighthouseClient`, in SimNet's
protocol shape; the lighthouse is a TunnelEngine plus a :class:`~lighthouse.core.LighthouseCore`,
wired as ``lighthouse/service.py`` wires them. Hosts behind NATs are found through the lighthouse
(``resolve`` -> ``PeerResolved`` -> ``add_peer``), as a node does.

Every timer runs: tunnel rekeys (120 s), keepalives, session expiry, handshake retries, lighthouse
registrations (30 s) and record expiry. On top, scheduled on the fake clock:

- every simulated minute each host sends one numbered packet to every other host, and one host
  "starts or stops a container" (its published services change: ``ServicePublish``);
- every ``roam_every`` seconds a NATed host roams: its NAT forgets every mapping (a NAT reboot or
  a new network), so it reappears from a new public port and peers and the lighthouse must follow;
- once a simulated day, a fault hour: 20 % loss on one host's link, then an hour of bit flips.

Invariants, checked every simulated hour (:meth:`Week.check`) and collected in
``Week.violations``:

- no lost keys: for every pair that is up, each side's current session key is held by the other
  (its ``remote_index`` is one of the other's live sessions);
- every packet sent more than a few seconds before the check arrived exactly once, unless it was
  sent in a fault window or just after one of its two hosts roamed (those are excused and counted);
- bounded state: sessions <= 3 per peer, handshakes pending <= peers, queues empty, replay windows
  within their size, lighthouse records <= hosts, client caches and pending queries bounded,
  the network's in-flight queue small;
- the lighthouse knows each host at its current public address and with its current services;
- drop counters move only in fault windows (or, for ``roaming_drops``, right after a roam).

The caller asserts ``not week.violations`` and reads the figures (rekeys, packets, wall time).
"""

from __future__ import annotations

import random
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from flatnet.pki.cert import TrustStore, new_ca, sign_host
from flatnet.proto.constants import MAX_QUEUED_PACKETS, REPLAY_WINDOW_SIZE
from flatnet.proto.engine import TunnelEngine
from flatnet.proto.events import ControlReceived, PacketReceived, PeerDown, PeerUp
from flatnet.testing.clock import FakeClock
from flatnet.testing.simnet import ENDPOINT_INDEPENDENT, LinkProfile, SimNet, flip_bits
from lighthouse.client import ClientSettings, LighthouseClient, PeerResolved
from lighthouse.core import LighthouseCore, LighthouseSettings

T0 = 1_800_000_000.0
DAY = 86_400.0
WEEK = 7 * DAY
FAR_FUTURE = 2**40
LIGHTHOUSE_IP = IPv4Address("10.87.250.1")
LIGHTHOUSE_ADDR = ("203.0.113.250", 4242)
PORT = 4242
MAX_STASHED_CONTROL = 64
SETTLE = 10.0  # seconds a packet may take (handshake included) before it counts as lost
ROAM_GRACE = 150.0  # packets toward a roamed host are excused this long (until it speaks again)


def _identity(ca, name: str, ip: str, subnets=()):
    ca_cert, ca_key = ca
    key = X25519PrivateKey.generate()
    cert = sign_host(ca_cert, ca_key, name, ip, list(subnets), ["hosts"], key.public_key().public_bytes_raw(),
                     0, FAR_FUTURE)
    return cert, key


def ipv4_udp(src: IPv4Address, dst: IPv4Address, payload: bytes) -> bytes:
    """A minimal IPv4/UDP packet (the engine checks addresses; checksums are the TUN's business)."""
    udp = struct.pack("!HHHH", 5000, 5000, 8 + len(payload), 0) + payload
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, src.packed, dst.packed) + udp


class CountingEngine(TunnelEngine):
    """A TunnelEngine that counts completed handshakes (for the week's rekey figure)."""

    handshakes = 0
    rekeys = 0

    def _install_current(self, peer, session, now):
        if session.is_initiator:  # each handshake completes once on each side: count it once
            self.handshakes += 1
            if peer.current is not None:
                self.rekeys += 1
        return super()._install_current(peer, session, now)


class WeekHost:
    """One WSL2 host: tunnel engine + lighthouse client, in SimNet's protocol shape."""

    def __init__(self, week: Week, n: int, ca, trust, now: float) -> None:
        self.week = week
        self.n = n
        self.name = f"host-{n}"
        self.ip = IPv4Address(f"10.87.{n}.1")
        self.subnet = IPv4Network(f"10.87.{n}.0/24")
        self.engine = CountingEngine(_identity(ca, self.name, f"{self.ip}/16", [self.subnet]), trust,
                                     rng=random.Random(n))
        self.engine.add_peer(LIGHTHOUSE_IP, [LIGHTHOUSE_ADDR])
        self.client = LighthouseClient([LIGHTHOUSE_IP], self.ip, [self.subnet], ClientSettings(), now=now)
        self.services: tuple = ()
        self.stash: list[bytes] = []  # control payloads waiting for the lighthouse session
        self.counters: Counter[str] = Counter()
        self._timer: float | None = None
        self._timer_dirty = True

    # -- SimNet protocol --------------------------------------------------------------------------

    def receive_datagram(self, data: bytes, addr, now: float) -> None:
        self.engine.receive_datagram(data, addr, now)
        self._drain(now)

    def handle_timer(self, now: float) -> None:
        timer = self.engine.get_timer()
        if timer is not None and timer <= now:
            self.engine.handle_timer(now)
        if self.client.next_deadline() <= now:
            self.client.tick(now)
        self._drain(now)

    def get_timer(self) -> float | None:
        # SimNet asks every node for its timer at every step; the answer changes only when this
        # host was called (every call ends in _drain), so it is cached until then.
        if self._timer_dirty:
            timer = self.engine.get_timer()
            deadline = self.client.next_deadline()
            self._timer = deadline if timer is None else min(timer, deadline)
            self._timer_dirty = False
        return self._timer

    def datagrams_to_send(self):
        return self.engine.datagrams_to_send()

    # -- glue, as the node does it ----------------------------------------------------------------

    def _drain(self, now: float) -> None:
        self._timer_dirty = True
        engine, client = self.engine, self.client
        while (event := engine.next_event()) is not None:
            if isinstance(event, PacketReceived):
                self.week.delivered(self, event.packet)
            elif isinstance(event, ControlReceived):
                if event.peer_ip == LIGHTHOUSE_IP:
                    client.handle_control(event.payload, LIGHTHOUSE_IP, now)
                else:
                    self.counters["control-from-non-lighthouse"] += 1
            elif isinstance(event, PeerUp):
                self.counters["peer-up"] += 1
            elif isinstance(event, PeerDown):
                self.counters[f"peer-down.{event.reason}"] += 1
        while (cevent := client.next_event()) is not None:
            if isinstance(cevent, PeerResolved) and cevent.endpoints:
                engine.add_peer(cevent.host_ip, [tuple(e) for e in cevent.endpoints])
                self.counters["resolved"] += 1
        outgoing = self.stash + [m.payload for m in client.messages_to_send()]
        self.stash = []
        for payload in outgoing:
            if not engine.send_control(payload, LIGHTHOUSE_IP, now):
                self.stash.append(payload)  # the session to the lighthouse is (re)handshaking
        if len(self.stash) > MAX_STASHED_CONTROL:
            self.counters["control-stash-overflow"] += len(self.stash) - MAX_STASHED_CONTROL
            del self.stash[:-MAX_STASHED_CONTROL]


class WeekLighthouse:
    """The lighthouse: tunnel engine + LighthouseCore, glued as lighthouse/service.py glues them."""

    def __init__(self, ca, trust) -> None:
        self.engine = CountingEngine(_identity(ca, "lighthouse", f"{LIGHTHOUSE_IP}/16"), trust, rng=random.Random(99))
        self.core = LighthouseCore(LighthouseSettings())
        self.certificates: dict = {}
        self.counters: Counter[str] = Counter()
        self._timer: float | None = None
        self._timer_dirty = True

    def receive_datagram(self, data: bytes, addr, now: float) -> None:
        self.engine.receive_datagram(data, addr, now)
        self._drain(addr, now)

    def handle_timer(self, now: float) -> None:
        timer = self.engine.get_timer()
        if timer is not None and timer <= now:
            self.engine.handle_timer(now)
        deadline = self.core.next_deadline()
        if deadline is not None and deadline <= now:
            self.core.tick(now)
        self._drain(None, now)

    def get_timer(self) -> float | None:
        if self._timer_dirty:  # cached as in WeekHost.get_timer
            times = [t for t in (self.engine.get_timer(), self.core.next_deadline()) if t is not None]
            self._timer = min(times) if times else None
            self._timer_dirty = False
        return self._timer

    def datagrams_to_send(self):
        return self.engine.datagrams_to_send()

    def _drain(self, addr, now: float) -> None:
        self._timer_dirty = True
        while (event := self.engine.next_event()) is not None:
            if isinstance(event, PeerUp):
                self.certificates[event.peer_ip] = event.certificate
            elif isinstance(event, PeerDown):
                self.certificates.pop(event.peer_ip, None)
            elif isinstance(event, ControlReceived):
                certificate = self.certificates.get(event.peer_ip)
                if certificate is None or addr is None:
                    self.counters["control-without-certificate"] += 1
                    continue
                for out in self.core.handle_control(event.payload, certificate, addr, now):
                    if not self.engine.send_control(out.payload, out.peer_ip, now):
                        self.counters["send.no-session"] += 1
            else:
                self.counters[f"drop.{type(event).__name__}"] += 1


@dataclass
class WeekResult:
    simulated_seconds: float
    wall_seconds: float
    cpu_seconds: float  # this process's CPU time: the figure that does not depend on the machine's load
    handshakes: int
    rekeys: int
    packets_sent: int
    packets_delivered: int
    packets_excused: int
    roams: int
    service_changes: int
    checks: int
    fault_drops: Counter
    violations: list[str] = field(default_factory=list)


class Week:
    def __init__(self, hosts: int = 3, seed: int = 1, roam_every: float = 6 * 3600.0, faults: bool = True) -> None:
        if hosts < 2:
            raise ValueError("a week needs at least two hosts")
        self.rng = random.Random(seed)
        self.clock = FakeClock(start=T0)
        self.net = SimNet(clock=self.clock, seed=seed, default_link=LinkProfile(latency=0.005, jitter=0.002),
                          flow_log_limit=64)
        ca = new_ca("week-ca", not_after=FAR_FUTURE)
        trust = TrustStore([ca[0]])
        self.lighthouse = WeekLighthouse(ca, trust)
        self.net.add_node("lighthouse", self.lighthouse, LIGHTHOUSE_ADDR)
        self.hosts: list[WeekHost] = []
        self.nats = {}
        for n in range(1, hosts + 1):
            host = WeekHost(self, n, ca, trust, T0)
            self.hosts.append(host)
            if n == 1:
                self.net.add_node(host.name, host, (f"198.51.100.{n}", PORT))
            else:
                nat = self.net.add_nat(f"nat-{n}", f"203.0.113.{n}", mapping=ENDPOINT_INDEPENDENT,
                                       filtering=ENDPOINT_INDEPENDENT, mapping_timeout=3600.0,
                                       port_base=20000 + 1000 * n)
                self.nats[host.name] = nat
                self.net.add_node(host.name, host, (f"192.168.{n}.10", PORT), nat=nat)
        self.by_ip = {h.ip: h for h in self.hosts}
        self.roam_every = roam_every
        self.faults = faults
        self.violations: list[str] = []
        self.seq = 0
        self.sent: dict[tuple[int, int, int], float] = {}  # (src n, dst n, seq) -> sent at, until delivered
        self.delivered_count = 0
        self.excused: set[tuple[int, int, int]] = set()
        self.excused_lost = 0
        self.fault_until = 0.0
        self.roamed_at: dict[int, float] = {}
        self.roams = 0
        self.service_changes = 0
        self.checks = 0
        self.fault_drops: Counter[str] = Counter()
        self._last_drops: dict[int, Counter] = {}
        self._tamper = None
        self._last_check = T0

    # -- traffic and events -----------------------------------------------------------------------

    def delivered(self, host: WeekHost, packet: bytes) -> None:
        try:
            src_n, dst_n, seq = (int(x) for x in packet[28:].decode().split(":"))
        except ValueError:
            self.violations.append(f"{host.name} received a packet that was never sent: {packet[:40]!r}")
            return
        key = (src_n, dst_n, seq)
        if dst_n != host.n or self.sent.pop(key, None) is None:
            self.violations.append(f"{host.name} received {key} twice or misdelivered at t={self.clock.now - T0:.0f}")
            return
        self.excused.discard(key)
        self.delivered_count += 1

    def _minute(self) -> None:
        now = self.clock.now
        for src in self.hosts:
            for dst in self.hosts:
                if src is dst:
                    continue
                self.seq += 1
                key = (src.n, dst.n, self.seq)
                self.sent[key] = now
                if now < self.fault_until or now - self.roamed_at.get(dst.n, -1e9) < ROAM_GRACE \
                        or now - self.roamed_at.get(src.n, -1e9) < ROAM_GRACE:
                    self.excused.add(key)
                src.engine.send_packet(ipv4_udp(src.ip, dst.ip, b"%d:%d:%d" % key), now)
            src._drain(now)
        host = self.rng.choice(self.hosts)  # a container starts or stops on one host
        from flatnet.proto.control import Service

        if host.services and self.rng.random() < 0.5:
            host.services = host.services[:-1]
        else:
            k = len(host.services)
            host.services = (*host.services, Service(f"app{k}", IPv4Address(f"10.87.{host.n}.{10 + k % 200}"), 8080))[-8:]
        host.client.set_services(host.services)
        host._drain(now)
        self.service_changes += 1
        self.clock.call_at(now + 60.0, self._minute)

    def _roam(self) -> None:
        now = self.clock.now
        movers = [h for h in self.hosts if h.name in self.nats]
        host = movers[self.roams % len(movers)]
        self.nats[host.name].reset()
        self.roamed_at[host.n] = now
        self.roams += 1
        host.client.set_endpoints((), now)  # as a node does on a network change: register at once
        host._drain(now)
        self.clock.call_at(now + self.roam_every, self._roam)

    def _fault_day(self) -> None:
        now = self.clock.now
        victim = self.hosts[self.rng.randrange(len(self.hosts))]
        self.fault_until = now + 2 * 3600.0 + SETTLE
        for other in ["lighthouse", *(h.name for h in self.hosts if h is not victim)]:
            self.net.set_link(victim.name, other, LinkProfile(latency=0.005, loss=0.2))
        self.clock.call_at(now + 3600.0, self._fault_bits)
        self.clock.call_at(now + DAY, self._fault_day)
        self._fault_victim = victim

    def _fault_bits(self) -> None:
        victim = self._fault_victim
        for other in ["lighthouse", *(h.name for h in self.hosts if h is not victim)]:
            self.net.set_link(victim.name, other, LinkProfile(latency=0.005, jitter=0.002))
        self._tamper = self.net.add_tamper(flip_bits(probability=0.05))
        self.clock.call_at(self.clock.now + 3600.0, self._fault_end)

    def _fault_end(self) -> None:
        self.net.remove_tamper(self._tamper)
        self._tamper = None

    # -- invariants -------------------------------------------------------------------------------

    def _violation(self, text: str) -> None:
        if len(self.violations) < 50:
            self.violations.append(f"t={self.clock.now - T0:.0f}s: {text}")

    def check(self) -> None:
        now = self.clock.now
        self.checks += 1
        # A fault or a roam anywhere in the interval since the last check excuses what it caused.
        since = self._last_check
        self._last_check = now
        in_fault = now < self.fault_until or self.fault_until > since
        recently_roamed = any(t > since - ROAM_GRACE for t in self.roamed_at.values())
        engines = [(h.name, h.engine) for h in self.hosts] + [("lighthouse", self.lighthouse.engine)]
        for name, engine in engines:
            peers = engine._peers
            if len(engine._sessions) > 3 * len(peers):
                self._violation(f"{name}: {len(engine._sessions)} sessions for {len(peers)} peers")
            if len(engine._pending) > len(peers):
                self._violation(f"{name}: {len(engine._pending)} pending handshakes")
            for ip, peer in peers.items():
                if len(peer.queue) > MAX_QUEUED_PACKETS or (peer.queue and not in_fault and not recently_roamed):
                    self._violation(f"{name}: {len(peer.queue)} packets queued for {ip}")
                for session in peer.sessions():
                    if session.replay.bitmap.bit_length() > REPLAY_WINDOW_SIZE:
                        self._violation(f"{name}: replay window for {ip} grew past its size")
            drops = Counter(engine.drops)
            delta = drops - self._last_drops.get(id(engine), Counter())
            self._last_drops[id(engine)] = drops
            if delta:
                if in_fault or recently_roamed:
                    self.fault_drops.update(delta)
                else:
                    self._violation(f"{name}: drops outside any fault: {dict(delta)}")
        # no lost keys: both ends of every live session hold its keys
        for name, engine in engines:
            for ip, peer in engine._peers.items():
                other = self.by_ip.get(ip).engine if ip in self.by_ip else (
                    self.lighthouse.engine if ip == LIGHTHOUSE_IP else None)
                if other is None or not peer.up or peer.current is None:
                    continue
                theirs = {s.local_index for p in other._peers.values() for s in p.sessions()}
                if peer.current.remote_index not in theirs and not in_fault:
                    self._violation(f"{name}: current session to {ip} has no counterpart")
        # every packet arrived, except excused ones
        for key, sent_at in list(self.sent.items()):
            if sent_at > now - SETTLE:
                continue
            del self.sent[key]
            if key in self.excused:
                self.excused.discard(key)
                self.excused_lost += 1
            else:
                self._violation(f"packet {key} sent at t={sent_at - T0:.0f}s never arrived")
        # the lighthouse follows every host: current address, current services, bounded records
        core = self.lighthouse.core
        if len(core) > len(self.hosts):
            self._violation(f"lighthouse holds {len(core)} records for {len(self.hosts)} hosts")
        if not in_fault and not recently_roamed:
            for host in self.hosts:
                record = core.node(host.ip)
                if record is None:
                    self._violation(f"lighthouse lost {host.name}")
                    continue
                nat = self.nats.get(host.name)
                if nat is not None:
                    public = {m.external for m in nat.mappings()}
                    if core.endpoints_of(host.ip)[:1] and core.endpoints_of(host.ip)[0] not in public:
                        self._violation(f"lighthouse has {host.name} at {core.endpoints_of(host.ip)[0]}, "
                                        f"its NAT maps {sorted(public)}")
                if record.services != host.services:
                    self._violation(f"lighthouse has {len(record.services)} services of {host.name}, "
                                    f"it publishes {len(host.services)}")
        for host in self.hosts:
            client = host.client
            if len(client._cache) > client.settings.max_cache_entries or len(client._pending) > len(self.hosts) + 1:
                self._violation(f"{host.name}: client cache {len(client._cache)}, pending {len(client._pending)}")
            if host.counters["control-stash-overflow"]:
                self._violation(f"{host.name}: control messages overflowed the stash")
        if self.net.in_flight() > 1000:
            self._violation(f"{self.net.in_flight()} datagrams in flight")
        self.clock.call_at(now + 3600.0, self.check)

    # -- running ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Register everyone and resolve the NATed hosts through the lighthouse, as nodes do."""
        self.net.run_for(5.0)
        for host in self.hosts:
            for other in self.hosts:
                if other is host:
                    continue
                if other.name in self.nats:
                    host.client.resolve(other.ip, self.clock.now)
                else:
                    host.engine.add_peer(other.ip, [self.net.node(other.name).addr])
            host._drain(self.clock.now)
        self.net.run_for(5.0)
        for host in self.hosts:
            for other in self.hosts:
                if other is not host and other.ip not in host.engine._peers:
                    self.violations.append(f"{host.name} could not resolve {other.name} through the lighthouse")
        start = self.clock.now
        self.clock.call_at(start + 1.0, self._minute)
        self.clock.call_at(start + 3600.0, self.check)
        if self.roam_every:
            self.clock.call_at(start + self.roam_every + 1020.0, self._roam)
        if self.faults:
            self.clock.call_at(start + DAY / 2 + 300.0, self._fault_day)

    def run(self, seconds: float = WEEK) -> WeekResult:
        started, cpu_started = time.perf_counter(), time.process_time()
        self.start()
        self.net.run_for(seconds)
        self.check()
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        engines = [h.engine for h in self.hosts] + [self.lighthouse.engine]
        initiated = sum(e.handshakes for e in engines)
        return WeekResult(
            simulated_seconds=seconds,
            wall_seconds=wall,
            cpu_seconds=cpu,
            handshakes=initiated,
            rekeys=sum(e.rekeys for e in engines),
            packets_sent=self.seq,
            packets_delivered=self.delivered_count,
            packets_excused=self.excused_lost,
            roams=self.roams,
            service_changes=self.service_changes,
            checks=self.checks,
            fault_drops=self.fault_drops,
            violations=list(self.violations),
        )


def run_week(hosts: int = 3, seconds: float = WEEK, seed: int = 1) -> WeekResult:
    return Week(hosts=hosts, seed=seed).run(seconds)




def main(argv: list[str] | None = None) -> int:
    """``python -m flatnet.testing.week [--hosts N] [--days D] [--seed S]``: run it, print the figures."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m flatnet.testing.week", description=main.__doc__)
    parser.add_argument("--hosts", type=int, default=2)
    parser.add_argument("--days", type=float, default=7.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    result = Week(hosts=args.hosts, seed=args.seed).run(args.days * DAY)
    for key, value in vars(result).items():
        if key != "violations":
            print(f"{key}: {dict(value) if isinstance(value, Counter) else value}")
    for violation in result.violations:
        print("VIOLATION:", violation)
    return 1 if result.violations else 0


if __name__ == "__main__":
    raise SystemExit(main())
