"""LighthouseClient against real LighthouseCores, in memory on a fake clock (the tunnel is elided:
control payloads are handed across directly, tagged with the sender's certificate)."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flatnet.proto.control import (
    TRANSPORT_UDP,
    ControlMessageError,
    QueryReply,
    Register,
    Relay,
    Service,
    ServicePublish,
    encode_control_message,
    parse_control_message,
)
from lighthouse.client import (
    CatalogueReceived,
    ClientSettings,
    LighthouseClient,
    LighthouseRefused,
    PeerResolved,
    PunchRequested,
    QueryFailed,
    RelayOffered,
)
from lighthouse.core import LighthouseCore, LighthouseSettings
from lighthouse.testing import host_certificate

LH1, LH2 = IPv4Address("10.87.255.1"), IPv4Address("10.87.255.2")
RELAYS = (Relay(TRANSPORT_UDP, ("192.0.2.1", 4243)),)


class Network:
    """Lighthouses and nodes wired together; a lighthouse that is down silently loses messages."""

    def __init__(self, lighthouses=(LH1, LH2), client_settings=None, core_settings=None):
        self.cores = {
            lh: LighthouseCore(core_settings, relays=RELAYS, relay_secret=b"s" * 32) for lh in lighthouses
        }
        self.down: set = set()
        self.nodes: dict[IPv4Address, tuple] = {}
        self.client_settings = client_settings or ClientSettings()
        self.sent: list[tuple] = []  # (lighthouse, message) as they left nodes

    def add_node(self, n: int, observed, lan=()):
        cert = host_certificate(n)
        client = LighthouseClient(list(self.cores), cert.ip.ip, cert.subnets, self.client_settings)
        client.set_endpoints(list(lan), 0.0)
        self.nodes[cert.ip.ip] = (client, cert, observed)
        return client

    def pump(self, now):
        moved = True
        while moved:
            moved = False
            for client, cert, observed in list(self.nodes.values()):
                for out in client.messages_to_send():
                    moved = True
                    self.sent.append((out.lighthouse, parse_control_message(out.payload)))
                    if out.lighthouse in self.down:
                        continue
                    for reply in self.cores[out.lighthouse].handle_control(out.payload, cert, observed, now):
                        target = self.nodes[reply.peer_ip][0]
                        target.handle_control(reply.payload, out.lighthouse, now)

    def run(self, until, step=1.0, start=0.0):
        now = start
        while now <= until:
            for client, _, _ in self.nodes.values():
                client.tick(now)
            self.pump(now)
            for core in self.cores.values():
                core.tick(now)
            now += step
        return now


def events(client):
    out = []
    while (event := client.next_event()) is not None:
        out.append(event)
    return out


ALICE_NAT, BOB_NAT = ("203.0.113.10", 40001), ("198.51.100.20", 50002)


def test_registers_with_every_lighthouse_and_resolves_a_peer_with_punch_notification():
    net = Network()
    alice = net.add_node(1, ALICE_NAT, lan=[("192.168.1.10", 4242)])
    bob = net.add_node(2, BOB_NAT)
    net.run(until=0.0)
    assert all(len(core) == 2 for core in net.cores.values())
    assert alice.lighthouse_status()[LH1] == (0.0, ALICE_NAT)
    assert bob.resolve(IPv4Address("10.87.1.7"), 1.0) is None
    net.pump(1.0)
    resolved = events(bob)
    assert resolved[0] == PeerResolved(
        IPv4Address("10.87.1.7"), IPv4Address("10.87.1.1"), (ALICE_NAT, ("192.168.1.10", 4242)), RELAYS, LH1
    )
    assert len(resolved) == 1  # the second lighthouse added nothing new
    # Both lighthouses told Alice to punch back; she sees it once.
    assert events(alice) == [PunchRequested(IPv4Address("10.87.2.1"), (BOB_NAT,))]
    assert alice.counters["punch.duplicate"] == 1
    # The answer is cached: no new query.
    sent_before = len(net.sent)
    assert bob.resolve(IPv4Address("10.87.1.7"), 2.0) == resolved[0]
    net.pump(2.0)
    assert len(net.sent) == sent_before


def test_one_lighthouse_down_still_resolves_through_the_other():
    net = Network()
    alice = net.add_node(1, ALICE_NAT)
    bob = net.add_node(2, BOB_NAT)
    net.down.add(LH1)
    net.run(until=0.0)
    assert len(net.cores[LH1]) == 0 and len(net.cores[LH2]) == 2
    bob.resolve(IPv4Address("10.87.1.1"), 1.0)
    net.pump(1.0)
    (resolved,) = events(bob)
    assert isinstance(resolved, PeerResolved) and resolved.lighthouse == LH2
    assert resolved.endpoints == (ALICE_NAT,)
    # The pending query still ends at its deadline without a spurious failure.
    bob.tick(10.0)
    assert events(bob) == []
    assert events(alice) == [PunchRequested(IPv4Address("10.87.2.1"), (BOB_NAT,))]


def test_lighthouse_killed_after_registration_loses_nothing():
    net = Network()
    net.add_node(1, ALICE_NAT)
    bob = net.add_node(2, BOB_NAT)
    net.run(until=5.0)
    net.down.add(LH2)
    bob.resolve(IPv4Address("10.87.1.1"), 6.0)
    net.pump(6.0)
    assert [type(e) for e in events(bob)] == [PeerResolved]


def test_unacknowledged_registration_is_retried_and_restarted_lighthouse_gets_services_again():
    settings = ClientSettings(register_interval=30.0, retry_interval=5.0)
    net = Network(client_settings=settings)
    alice = net.add_node(1, ALICE_NAT)
    alice.set_services([Service("web", IPv4Address("10.87.1.5"), 8080)])
    net.down.add(LH1)
    net.run(until=12.0)
    registers_to_lh1 = [m for lh, m in net.sent if lh == LH1 and isinstance(m, Register)]
    assert len(registers_to_lh1) == 3  # at 0, 5 and 10 s
    registers_to_lh2 = [m for lh, m in net.sent if lh == LH2 and isinstance(m, Register)]
    assert len(registers_to_lh2) == 1  # acknowledged: next one at 30 s
    # LH1 comes back (empty, as after a restart): registration and services follow.
    net.down.discard(LH1)
    net.run(until=16.0, start=13.0)
    assert len(net.cores[LH1]) == 1
    assert net.cores[LH1].node(alice.ip).services == (Service("web", IPv4Address("10.87.1.5"), 8080),)
    assert (LH1, ServicePublish(alice.services)) in net.sent


def test_registration_keeps_soft_state_alive_and_stopping_lets_it_expire():
    net = Network(core_settings=LighthouseSettings(node_ttl=120.0))
    net.add_node(1, ALICE_NAT)
    net.run(until=400.0, step=5.0)
    assert all(len(core) == 1 for core in net.cores.values())
    net.nodes.clear()  # the node goes away
    for core in net.cores.values():
        core.tick(400.0 + 121.0)
        assert len(core) == 0


def test_unknown_address_fails_as_not_found_and_is_negatively_cached():
    net = Network(client_settings=ClientSettings(negative_ttl=5.0))
    bob = net.add_node(2, BOB_NAT)
    net.run(until=0.0)
    bob.resolve(IPv4Address("10.87.9.9"), 1.0)
    net.pump(1.0)
    assert events(bob) == [QueryFailed(IPv4Address("10.87.9.9"), "not-found")]
    queries = len(net.sent)
    assert bob.resolve(IPv4Address("10.87.9.9"), 3.0) is None
    net.pump(3.0)
    assert len(net.sent) == queries  # cached not-found: not asked again
    bob.resolve(IPv4Address("10.87.9.9"), 7.0)
    net.pump(7.0)
    assert len(net.sent) == queries + 2  # expired: asked again, both lighthouses


def test_query_times_out_when_every_lighthouse_is_down():
    net = Network(client_settings=ClientSettings(query_timeout=2.0))
    bob = net.add_node(2, BOB_NAT)
    net.down.update((LH1, LH2))
    bob.resolve(IPv4Address("10.87.1.1"), 0.0)
    net.pump(0.0)
    assert bob.next_deadline() == 0.0  # registrations are due
    bob.tick(1.9)
    assert [e for e in events(bob) if isinstance(e, QueryFailed)] == []
    bob.tick(2.0)
    assert events(bob) == [QueryFailed(IPv4Address("10.87.1.1"), "timeout")]
    assert bob.counters["query.timeout"] == 1


def test_answers_from_several_lighthouses_are_merged():
    net = Network()
    bob = net.add_node(2, BOB_NAT)
    bob.resolve(IPv4Address("10.87.1.1"), 0.0)
    request_id = parse_control_message(bob.messages_to_send()[-1].payload).request_id
    first = QueryReply(
        request_id, IPv4Address("10.87.1.1"), True, IPv4Address("10.87.1.1"), (ALICE_NAT,), (), 60
    )
    second = QueryReply(
        request_id,
        IPv4Address("10.87.1.1"),
        True,
        IPv4Address("10.87.1.1"),
        (("192.168.1.10", 4242), ALICE_NAT),
        RELAYS,
        60,
    )
    bob.handle_control(encode_control_message(first), LH2, 0.1)
    bob.handle_control(encode_control_message(second), LH1, 0.2)
    bob.handle_control(encode_control_message(second), LH1, 0.3)  # a duplicate is dropped
    one, two = events(bob)
    assert (one.endpoints, one.lighthouse, one.merged) == ((ALICE_NAT,), LH2, False)
    assert (two.endpoints, two.relays, two.merged) == ((ALICE_NAT, ("192.168.1.10", 4242)), RELAYS, True)
    assert bob.resolve(IPv4Address("10.87.1.1"), 1.0) == two
    assert bob.counters["drop.unexpected-reply"] == 1


def test_replies_from_strangers_and_garbage_are_dropped_and_counted():
    net = Network()
    bob = net.add_node(2, BOB_NAT)
    bob.handle_control(b"\x00garbage", LH1, 0.0)
    bob.handle_control(b"\x80", IPv4Address("10.87.77.1"), 0.0)
    assert bob.counters["drop.malformed.malformed"] == 1
    assert bob.counters["drop.not-a-lighthouse"] == 1
    assert events(bob) == []


def test_catalogue_is_fetched_page_by_page_from_the_first_lighthouse_to_answer():
    net = Network(core_settings=LighthouseSettings(catalogue_page=2))
    nodes = [net.add_node(n, ("192.0.2.1", 1000 + n)) for n in (1, 2, 3)]
    for n, client in zip((1, 2, 3), nodes, strict=True):
        client.set_services([Service(f"s{i}", IPv4Address(f"10.87.{n}.{i + 2}"), 80) for i in range(n)])
    net.run(until=0.0)
    reader = nodes[0]
    reader.request_catalogue(1.0)
    net.pump(1.0)
    (received,) = [e for e in events(reader) if isinstance(e, CatalogueReceived)]
    assert received.lighthouse == LH1
    assert [(e.host_name, e.service.name) for e in received.entries] == [
        ("host-1", "s0"),
        ("host-2", "s0"),
        ("host-2", "s1"),
        ("host-3", "s0"),
        ("host-3", "s1"),
        ("host-3", "s2"),
    ]


def test_relay_offers_reach_both_nodes():
    net = Network()
    alice = net.add_node(1, ALICE_NAT)
    bob = net.add_node(2, BOB_NAT)
    net.run(until=0.0)
    events(alice)
    alice.request_relay(IPv4Address("10.87.2.1"), 1.0)
    net.pump(1.0)
    (to_alice,) = events(alice)
    (to_bob,) = events(bob)
    assert isinstance(to_alice, RelayOffered) and isinstance(to_bob, RelayOffered)
    assert to_alice.offer.session_id == to_bob.offer.session_id
    assert (to_alice.offer.side, to_bob.offer.side) == (0, 1)


def test_refusal_comes_out_as_an_event_and_not_registered_triggers_a_register():
    net = Network()
    alice = net.add_node(1, ALICE_NAT)
    for client, *_ in net.nodes.values():
        client.tick(0.0)
    alice.messages_to_send()  # the registrations get lost
    alice.set_services([Service("web", IPv4Address("10.87.1.5"), 80)])
    net.pump(0.5)
    refused = events(alice)
    assert refused == [
        LighthouseRefused(LH1, 0, "not-registered"),
        LighthouseRefused(LH2, 0, "not-registered"),
    ]
    assert alice.next_deadline() == 0.5
    net.run(until=1.5, start=0.5)
    assert all(core.node(alice.ip).services for core in net.cores.values())


@pytest.mark.parametrize("pending_cap", [3])
def test_pending_queries_are_capped(pending_cap):
    net = Network(client_settings=ClientSettings(max_pending_queries=pending_cap))
    bob = net.add_node(2, BOB_NAT)
    for i in range(5):
        bob.resolve(IPv4Address(f"10.87.9.{i}"), 0.0)
    assert bob.counters["query.sent"] == 3
    assert bob.counters["query.dropped-too-many-pending"] == 2


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1300))
def test_garbage_from_a_lighthouse_changes_nothing(data):
    client = LighthouseClient([LH1, LH2], IPv4Address("10.87.2.1"))
    client.resolve(IPv4Address("10.87.1.1"), 0.0)
    client.messages_to_send()
    pending_before = {rid: (p.answered.copy(), p.result) for rid, p in client._pending.items()}
    try:
        parse_control_message(data)
        return  # (practically never: a valid message is not garbage)
    except ControlMessageError:
        pass
    client.handle_control(data, LH1, 0.1)
    assert client.next_event() is None and client.messages_to_send() == []
    assert {rid: (p.answered, p.result) for rid, p in client._pending.items()} == pending_before
    assert sum(v for k, v in client.counters.items() if k.startswith("drop.malformed.")) == 1
