"""A static peer's container subnets are in its certificate: routes to them before the first handshake.

The lab bug this guards (22:00): wsl1 could reach wsl2's node address but not wsl2's container
(10.87.2.2) unless something had first been sent to 10.87.2.1 — the packet to the container found
no route ("no-route") and nothing ever asked wsl2 for its certificate.
"""

from __future__ import annotations

from ipaddress import IPv4Address

from flatnet.proto.constants import REKEY_ATTEMPT_TIME, REKEY_TIMEOUT, SIMULTANEOUS_INITIATION_RETRY
from flatnet.proto.events import PacketReceived
from flatnet.proto.header import MessageType
from tests.proto.harness import Wire, ipv4_packet, make_ca, make_node, pair

A_IP, B_IP = "10.87.1.1", "10.87.2.1"
B_CONTAINER = "10.87.2.2"


def test_packet_to_an_unknown_peers_container_waits_for_its_certificate_and_is_delivered():
    wire, a, b = pair()
    first = ipv4_packet(A_IP, B_CONTAINER, b"first")
    a.engine.send_packet(first, wire.now)
    assert not a.engine.drops  # held: a peer's certificate is being learned ...
    [(initiation, to)] = a.engine.datagrams_to_send()  # ... and asked for, exactly once
    assert initiation[0] == MessageType.HANDSHAKE_INITIATION and to == b.addr
    b.engine.receive_datagram(initiation, a.addr, wire.now)
    wire.run()
    # The certificate brought the route, and the held packet went with it.
    assert a.engine.route(IPv4Address(B_CONTAINER)) is a.engine._peers[IPv4Address(B_IP)]
    assert b.received == [first]
    second = ipv4_packet(A_IP, B_CONTAINER, b"second")
    a.engine.send_packet(second, wire.now)
    wire.run()
    assert b.received == [first, second]
    assert not a.engine.drops


def test_a_held_packet_nobody_owns_is_dropped_once_learning_ends():
    wire, a, b = pair()
    nobody = ipv4_packet(A_IP, "10.87.9.9", b"to nowhere")
    a.engine.send_packet(nobody, wire.now)
    assert not a.engine.drops and a.engine.get_timer() is not None
    wire.run()  # b's certificate arrives: it does not own 10.87.9.9, and no one else is being learned
    a.engine.handle_timer(wire.now)
    assert a.engine.drops["no-route"] == 1 and not b.received
    # Once every certificate is known, such a packet is dropped at once, not held.
    a.engine.send_packet(nobody, wire.now)
    assert a.engine.drops["no-route"] == 2 and not a.engine._unrouted


def test_learn_routes_at_start_so_the_first_packet_is_not_lost():
    wire, a, b = pair()
    assert a.engine.learn_routes(wire.now) == 1
    assert a.engine.learn_routes(wire.now) == 0  # one pending handshake per peer
    wire.run()
    packet = ipv4_packet(A_IP, B_CONTAINER, b"hello")
    a.engine.send_packet(packet, wire.now)
    wire.run()
    assert b.received == [packet] and not a.engine.drops
    assert a.engine.learn_routes(wire.now) == 0  # every certificate known: nothing to ask


def test_no_route_traffic_to_an_unreachable_peer_costs_one_initiation_per_retry_interval():
    wire = Wire()
    ca = make_ca()
    a = make_node(wire, ca, "alpha", "10.87.1.1/16", ("192.0.2.1", 4242), ["10.87.1.0/24"], seed=1)
    a.engine.add_peer(B_IP, [("192.0.2.99", 4242)])  # nobody there
    a.engine.add_peer("10.87.3.1", [])  # no endpoint yet (discovery): not asked
    for i in range(50):
        a.engine.send_packet(ipv4_packet(A_IP, B_CONTAINER, b"%d" % i), wire.now)
    assert len(a.engine.datagrams_to_send()) == 1
    wire.advance(REKEY_TIMEOUT + 1)
    assert a.engine.stats["initiation-sent"] == 2  # the engine's own retry, not one per packet
    assert a.engine.drops["no-route"] == 50  # held UNROUTED_HOLD_TIME while learning, then dropped
    wire.advance(REKEY_ATTEMPT_TIME)
    # The series gave up; the next unrouted packet starts a new one.
    sent = a.engine.stats["initiation-sent"]
    a.engine.send_packet(ipv4_packet(A_IP, B_CONTAINER, b"later"), wire.now)
    assert a.engine.stats["initiation-sent"] == sent + 1
    assert not [e for e in a.events if isinstance(e, PacketReceived)]


def test_both_nodes_starting_together_meet_without_waiting_for_the_retry_timer():
    # Both learn routes at start; the lower static key's initiation is lost (its peer was not
    # listening yet). Before: the higher key's initiation was dropped as "simultaneous" and both
    # waited REKEY_TIMEOUT. Now the lower key retries after SIMULTANEOUS_INITIATION_RETRY.
    wire, a, b = pair()
    low, high = (a, b) if a.engine.certificate.public_key < b.engine.certificate.public_key else (b, a)
    start = wire.now
    low.engine.learn_routes(wire.now)
    low.engine.datagrams_to_send()  # lost
    high.engine.learn_routes(wire.now)
    wire.run()
    assert low.engine.stats["simultaneous-initiation-kept"] == 1
    assert low.engine.get_timer() == start + SIMULTANEOUS_INITIATION_RETRY
    wire.advance(SIMULTANEOUS_INITIATION_RETRY)
    assert wire.now - start < REKEY_TIMEOUT
    assert low.engine.session_for(IPv4Address(high.ip.split("/")[0]), wire.now) is not None
    assert high.engine.session_for(IPv4Address(low.ip.split("/")[0]), wire.now) is not None
    assert not low.engine.drops and not high.engine.drops


def test_simultaneous_initiations_that_both_arrive_cost_two_handshakes_and_no_drops():
    wire, a, b = pair()
    a.engine.learn_routes(wire.now)
    b.engine.learn_routes(wire.now)
    wire.run()  # one side keeps its initiation, the other yields and answers it
    wire.advance(REKEY_TIMEOUT + 1)  # the earlier retry timer found nothing left to do
    assert a.engine.stats["handshake-dh"] + b.engine.stats["handshake-dh"] == 2
    assert a.engine.stats["initiation-sent"] == b.engine.stats["initiation-sent"] == 1
    assert not a.engine.drops and not b.engine.drops
    packet = ipv4_packet(A_IP, B_CONTAINER, b"after")
    a.engine.send_packet(packet, wire.now)
    wire.run()
    assert b.received == [packet]
