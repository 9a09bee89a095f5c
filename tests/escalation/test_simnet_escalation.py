"""Graceful Escalation with real TunnelEngines on the simulated network (fake clock, no sleeps):
the same cases as the NAT lab, asserting which rung carries the traffic and that it arrives intact."""

from __future__ import annotations

from flatnet.escalation import Rung
from flatnet.testing.simnet import SYMMETRIC, LinkProfile
from tests.escalation.topology import block_udp, build, lighthouse_punch, move_host, unblock

CONE = {}  # endpoint-independent mapping, port-restricted filtering (SimNet's default NAT)
SYMMETRIC_NAT = {"mapping": SYMMETRIC, "filtering": SYMMETRIC}


def rungs(world):
    return world.a.rung(world.b), world.b.rung(world.a)


def test_two_hosts_on_one_lan_go_direct():
    world = build(same_lan=True)
    world.start_traffic(200)
    world.net.run_for(12)
    assert rungs(world) == (Rung.DIRECT_LAN, Rung.DIRECT_LAN)
    assert world.all_received_intact() and len(world.b.received) == len(world.sent) == 200
    seconds = world.a.selector(world.b).rung_seconds(world.clock.now)
    assert seconds[Rung.DIRECT_LAN] > 10
    assert world.a.selector(world.b).bytes_sent[Rung.DIRECT_LAN] > 0


def test_both_behind_endpoint_independent_nats_punch_through():
    world = build(nat_a=CONE, nat_b=CONE)
    world.start_traffic(200)
    world.net.run_for(12)
    assert rungs(world) == (Rung.PUNCHED, Rung.PUNCHED)
    assert world.all_received_intact() and len(world.b.received) == 200
    # the punched path carries the bulk; the relay carried only the first moments
    sent = world.a.selector(world.b).bytes_sent
    assert sent[Rung.PUNCHED] > 5 * sent[Rung.UDP_RELAY] > 0


def test_first_packets_go_by_relay_without_waiting_for_discovery():
    world = build(nat_a=CONE, nat_b=CONE)
    world.start_traffic(100)
    world.net.run_for(6)
    first_direct = next(e.at for e in world.a.path_events if e.new is not None and e.new.rung == Rung.PUNCHED)
    assert world.b.received_at[0] < first_direct  # arrived through the relay before direct was found
    assert world.b.received_at[0] < world.a.path_events[0].at + 0.5  # one handshake over the relay
    assert world.a.path_events[0].new.rung == Rung.UDP_RELAY


def test_one_symmetric_nat_stays_on_the_udp_relay():
    world = build(nat_a=SYMMETRIC_NAT, nat_b=CONE)
    world.start_traffic(400)
    world.net.run_for(25)
    assert rungs(world) == (Rung.UDP_RELAY, Rung.UDP_RELAY)
    assert world.all_received_intact() and len(world.b.received) == 400
    # it kept trying direct all along (that is how it would notice a better path)
    assert world.a.selector(world.b).counters["probe"] > 20
    assert world.a.selector(world.b).counters["switch.upgrade"] == 0


def test_symmetric_nat_to_a_public_host_goes_direct():
    world = build(nat_a=SYMMETRIC_NAT, nat_b=None)
    world.start_traffic(200)
    world.net.run_for(12)
    assert rungs(world) == (Rung.PUNCHED, Rung.PUNCHED)


def test_udp_blocked_escalates_to_tcp_relay_and_comes_back_to_direct():
    world = build(nat_a=CONE, nat_b=CONE)
    world.start_traffic(2000)
    world.net.run_for(10)
    assert rungs(world) == (Rung.PUNCHED, Rung.PUNCHED)
    blocked = block_udp(world, world.a)
    world.net.run_for(30)
    # A's side reaches the relay by TCP only; B's side still uses UDP to the same session
    assert rungs(world) == (Rung.TCP_RELAY, Rung.UDP_RELAY)
    assert world.a.mux.counters["relay.failover-to-tcp"] == 1
    t = world.clock.now
    assert world.received_between(t - 10, t) >= 190  # traffic flows through the TCP rung
    unblock(world, blocked)
    world.net.run_for(30)
    assert rungs(world) == (Rung.PUNCHED, Rung.PUNCHED)
    t = world.clock.now
    assert world.received_between(t - 10, t) >= 195
    assert world.all_received_intact()
    a = world.a.selector(world.b)
    assert a.bytes_sent[Rung.TCP_RELAY] > 0 and a.counters["switch.dead"] == 1


def test_underlay_address_change_mid_transfer_recovers_direct():
    world = build(nat_a=CONE, nat_b=CONE)
    world.start_traffic(1000)
    world.net.run_for(10)
    assert rungs(world) == (Rung.PUNCHED, Rung.PUNCHED)
    cafe = world.net.add_nat("cafe", public_ip="198.51.100.9")
    move_host(world, world.a, ("10.1.1.5", 4242), cafe)
    world.a.mux.underlay_changed(world.clock.now)
    world.net.run_for(1)
    assert world.a.rung(world.b) == Rung.UDP_RELAY  # carried by the relay meanwhile
    lighthouse_punch(world, world.a)  # A re-registered and queried: both learn the new endpoints
    world.net.run_for(20)
    assert rungs(world) == (Rung.PUNCHED, Rung.PUNCHED)
    assert world.b.selector(world.a).current().address[0] == "198.51.100.9"
    t = world.clock.now
    assert world.received_between(t - 10, t) == 200
    assert world.all_received_intact()
    assert len(world.sent) - len(world.b.received) <= 40  # at most ~2 s of packets lost on the way


def test_no_flapping_under_five_percent_loss():
    world = build(nat_a=CONE, nat_b=CONE, link=LinkProfile(latency=0.015, jitter=0.005, loss=0.05), seed=3)
    world.start_traffic(6000)
    world.net.run_for(300)
    for me, peer in ((world.a, world.b), (world.b, world.a)):
        selector = me.selector(peer)
        assert selector.current().rung == Rung.PUNCHED
        switches = [e for e in me.path_events if e.reason != "first" or e.old is not None]
        assert len(switches) <= 1, switches  # relay -> punched once, then never again
        assert selector.counters["probe-lost"] > 5  # the loss was real and seen
    assert world.all_received_intact() and len(world.b.received) > 0.9 * 6000
