"""The simulated network, driven by the toy EchoPeer: time, links, tampering, NAT, blocks, flow log."""

from __future__ import annotations

import pytest

from flatnet.testing.clock import FakeClock
from flatnet.testing.simnet import (
    ADDRESS_AND_PORT_DEPENDENT,
    ADDRESS_DEPENDENT,
    ENDPOINT_INDEPENDENT,
    SYMMETRIC,
    Datagram,
    LinkProfile,
    Recorder,
    SimNet,
    SimulationError,
    SimulationTimeout,
    drop_matching,
    flip_bits,
    truncate,
)
from tests.testing.echo import EchoPeer, EchoPeerWithNow

A = ("203.0.113.1", 4242)
B = ("203.0.113.2", 4242)
C = ("203.0.113.3", 4242)


def pair(link=LinkProfile(latency=0.010), seed=0, **peer_args):
    net = SimNet(seed=seed, default_link=link)
    a = EchoPeer(peer=B, **peer_args)
    b = EchoPeer()
    net.add_node("a", a, A)
    net.add_node("b", b, B)
    return net, a, b


# -- time ------------------------------------------------------------------------------------------


def test_round_trip_takes_exactly_two_latencies_of_simulated_time():
    net, a, b = pair()
    a.ping()
    elapsed = net.run_until(lambda: a.pongs, max_time=1)
    assert elapsed == pytest.approx(0.020)
    assert b.received == [(pytest.approx(0.010), b"PING 0", A)]
    assert a.received == [(pytest.approx(0.020), b"PONG 0", B)]


def test_timers_drive_pings_without_sleeping():
    net, a, b = pair(interval=1.0, count=5, start=0.0)
    net.run_for(10)
    assert net.clock.now == 10
    assert b.pings_seen == [0, 1, 2, 3, 4]
    assert [t for t, _, _ in b.received] == pytest.approx([0.01, 1.01, 2.01, 3.01, 4.01])
    assert a.pongs == [0, 1, 2, 3, 4]
    assert net.node("a").timers_fired == 5 and net.node("a").sent == 5 and net.node("b").received == 5


def test_run_until_timeout_raises_with_the_flow_log():
    net, a, b = pair()
    net.block("a", "b")
    a.ping()
    with pytest.raises(SimulationTimeout) as info:
        net.run_until(lambda: a.pongs, max_time=3)
    assert "blocked" in str(info.value)
    assert net.clock.now == 3


def test_run_until_returns_at_once_if_already_true():
    net, _, _ = pair()
    assert net.run_until(lambda: True, max_time=5) == 0


def test_shared_clock_and_its_callbacks_drive_the_scenario():
    clock = FakeClock(start=1000)
    net = SimNet(clock=clock, default_link=LinkProfile(latency=0.05))
    a, b = EchoPeer(peer=B), EchoPeer()
    net.add_node("a", a, A)
    net.add_node("b", b, B)
    clock.call_at(1005, a.ping)  # a test scripts an action at t=1005
    net.run_until(lambda: a.pongs, max_time=10)
    assert clock.now == pytest.approx(1005.1)
    assert b.received[0][0] == pytest.approx(1005.05)


def test_timer_livelock_is_detected():
    class Stuck(EchoPeer):
        def get_timer(self):
            return 0.0  # always due, never moves on

    net = SimNet()
    net.add_node("stuck", Stuck(), A)
    with pytest.raises(SimulationError, match="never moves past now"):
        net.run_for(1)


def test_the_aioquic_datagrams_to_send_now_signature_works_too():
    net = SimNet(default_link=LinkProfile(latency=0.5))
    a, b = EchoPeerWithNow(peer=B), EchoPeer()
    net.add_node("a", a, A)
    net.add_node("b", b, B)
    net.clock.advance(7)
    a.ping()
    net.run_until(lambda: a.pongs, max_time=5)
    assert a.pulled_at[0] == 7
    assert a.pongs == [0]


# -- links -----------------------------------------------------------------------------------------


def run_pings(seed, link, count=400):
    net, a, b = pair(link=link, seed=seed, interval=0.001, count=count, start=0.0)
    net.run_for(5)
    return net, a, b


def test_loss_is_about_the_configured_rate_and_replays_exactly_with_a_seed():
    net, a, b = run_pings(7, LinkProfile(latency=0.01, loss=0.2))
    lost = net.counts["lost"]
    sent = net.counts["send"]
    assert sent == 400 + len(b.pings_seen)  # pings plus one pong per ping that arrived
    assert 0.12 < lost / sent < 0.28
    assert len(b.pings_seen) < 400 and len(a.pongs) < len(b.pings_seen)
    again, _, b_again = run_pings(7, LinkProfile(latency=0.01, loss=0.2))
    assert again.flow_text() == net.flow_text() and b_again.pings_seen == b.pings_seen
    other, _, b_other = run_pings(8, LinkProfile(latency=0.01, loss=0.2))
    assert b_other.pings_seen != b.pings_seen


def test_jitter_reorders_but_delivers_each_packet_once():
    _, _, b = run_pings(1, LinkProfile(latency=0.01, jitter=0.02))
    assert sorted(b.pings_seen) == list(range(400))
    assert b.pings_seen != list(range(400))


def test_reorder_holds_some_packets_back():
    net, _, b = run_pings(2, LinkProfile(latency=0.01, reorder=0.1, reorder_delay=0.05))
    assert sorted(b.pings_seen) == list(range(400))
    overtaken = sum(1 for x, y in zip(b.pings_seen, b.pings_seen[1:], strict=False) if x > y)
    assert overtaken > 10 and net.counts["reorder"] > 10


def test_duplication_delivers_twice():
    _, _, b = run_pings(3, LinkProfile(latency=0.01, duplicate=1.0), count=10)
    assert sorted(b.pings_seen) == sorted(list(range(10)) * 2)


def test_link_between_two_nodes_overrides_the_default():
    net = SimNet(default_link=LinkProfile(latency=0.001))
    a, b, c = EchoPeer(), EchoPeer(), EchoPeer()
    net.add_node("a", a, A)
    net.add_node("b", b, B)
    net.add_node("c", c, C)
    net.set_link("a", "c", LinkProfile(latency=0.3))
    a.send(b"PING 1", B)
    a.send(b"PING 2", C)
    net.run_until(lambda: len(a.pongs) == 2, max_time=2)
    assert b.received[0][0] == pytest.approx(0.001)
    assert c.received[0][0] == pytest.approx(0.3)
    assert a.received[-1][0] == pytest.approx(0.6)  # the override applies both ways


def test_link_profile_refuses_nonsense():
    with pytest.raises(ValueError):
        LinkProfile(loss=1.5)
    with pytest.raises(ValueError):
        LinkProfile(latency=-1)


# -- tampering -------------------------------------------------------------------------------------


def test_flip_bits_changes_exactly_one_bit_and_is_narrated():
    net, a, b = pair()
    net.add_tamper(flip_bits(probability=1.0, match=lambda d: d.dst == B))
    a.send(b"PING 12345", B)
    net.run_for(1)
    ((_, got, _),) = b.received
    assert len(got) == len(b"PING 12345")
    assert sum(bin(x ^ y).count("1") for x, y in zip(got, b"PING 12345", strict=True)) == 1
    assert "flipped bit" in net.flow_text()


def test_truncate_shortens():
    net, a, b = pair()
    hook = net.add_tamper(truncate(keep=3))
    a.send(b"PING 1", B)
    net.run_for(1)
    assert b.received[0][1] == b"PIN"
    net.remove_tamper(hook)
    a.send(b"PING 2", B)
    net.run_for(1)
    assert b.received[-1][1] == b"PING 2"


def test_drop_matching_and_record_then_replay():
    net, a, b = pair()
    recorder = net.add_tamper(Recorder(match=lambda d: d.data.startswith(b"PING")))
    net.add_tamper(drop_matching(lambda d: d.data == b"PING 2"))
    for n in range(3):
        a.send(b"PING %d" % n, B)
    net.run_for(1)
    assert b.pings_seen == [0, 1]
    assert [d.data for d in recorder.datagrams] == [b"PING 0", b"PING 1", b"PING 2"]
    net.inject(recorder.datagrams[0])  # replay, as an attacker on the path would
    net.inject(b"PING 9", src=("198.51.100.66", 1), dst=B, delay=0.5)  # spoofed source
    net.run_for(1)
    assert b.pings_seen == [0, 1, 0, 9]
    assert b.received[-1][2] == ("198.51.100.66", 1)


def test_a_hook_may_duplicate():
    net, a, b = pair()
    net.add_tamper(lambda d, rng: [d, Datagram(d.data + b"!", d.src, d.dst, note="extra copy")])
    a.send(b"PING 1", B)
    net.run_for(1)
    assert [data for _, data, _ in b.received] == [b"PING 1", b"PING 1!"]


# -- blocking --------------------------------------------------------------------------------------


def test_block_and_unblock_between_two_addresses():
    net, a, b = pair()
    net.block(A, B)
    a.ping()
    net.run_for(1)
    assert b.received == []
    net.unblock(A, B)
    a.ping()
    net.run_for(1)
    assert b.pings_seen == [1] and a.pongs == [1]


def test_block_by_ip_covers_every_port_and_both_directions():
    net, a, b = pair()
    net.block(B[0], A[0])
    b.send(b"PING 0", A)
    a.send(b"PING 1", B)
    net.run_for(1)
    assert a.received == [] and b.received == []
    assert net.counts["drop"] == 2


def test_block_by_private_address_applies_behind_a_nat():
    net = SimNet()
    nat = net.add_nat("home", "198.51.100.1")
    a, b = EchoPeer(), EchoPeer()
    net.add_node("a", a, ("192.168.1.10", 4242), nat=nat)
    net.add_node("b", b, B)
    net.block("a", "b")
    a.send(b"PING 0", B)
    net.run_for(1)
    assert b.received == []


# -- NAT -------------------------------------------------------------------------------------------

PRIVATE = ("192.168.1.10", 4242)


def behind_nat(**behaviour):
    net = SimNet(default_link=LinkProfile(latency=0.01))
    nat = net.add_nat("home", "198.51.100.1", **behaviour)
    inside = EchoPeer()
    servers = {name: EchoPeer() for name in ("s1", "s2", "s3")}
    net.add_node("inside", inside, PRIVATE, nat=nat)
    net.add_node("s1", servers["s1"], ("203.0.113.1", 4242))
    net.add_node("s2", servers["s2"], ("203.0.113.2", 4242))
    net.add_node("s3", servers["s3"], ("203.0.113.1", 5353))  # same host as s1, other port
    return net, nat, inside, servers


def test_endpoint_independent_mapping_shows_one_public_address_to_everyone():
    net, nat, inside, servers = behind_nat(mapping=ENDPOINT_INDEPENDENT)
    inside.send(b"PING 0", ("203.0.113.1", 4242))
    inside.send(b"PING 1", ("203.0.113.2", 4242))
    net.run_until(lambda: len(inside.pongs) == 2, max_time=1)
    seen = {servers["s1"].received[0][2], servers["s2"].received[0][2]}
    assert len(seen) == 1 and next(iter(seen))[0] == "198.51.100.1"
    assert len(nat.mappings()) == 1
    assert "new mapping" in net.flow_text()


def test_symmetric_mapping_shows_a_new_port_per_destination():
    net, nat, inside, servers = behind_nat(mapping=SYMMETRIC, filtering=SYMMETRIC)
    inside.send(b"PING 0", ("203.0.113.1", 4242))
    inside.send(b"PING 1", ("203.0.113.2", 4242))
    net.run_until(lambda: len(inside.pongs) == 2, max_time=1)  # replies still come back
    assert servers["s1"].received[0][2] != servers["s2"].received[0][2]
    assert len(nat.mappings()) == 2


@pytest.mark.parametrize(
    ("filtering", "same_host_other_port", "other_host"),
    [
        (ENDPOINT_INDEPENDENT, True, True),  # full cone
        (ADDRESS_DEPENDENT, True, False),  # restricted cone
        (ADDRESS_AND_PORT_DEPENDENT, False, False),  # port-restricted cone
    ],
)
def test_filtering_decides_who_may_send_in_through_a_mapping(filtering, same_host_other_port, other_host):
    net, _, inside, servers = behind_nat(mapping=ENDPOINT_INDEPENDENT, filtering=filtering)
    inside.send(b"PING 0", ("203.0.113.1", 4242))
    net.run_until(lambda: inside.pongs, max_time=1)
    public = servers["s1"].received[0][2]
    servers["s3"].send(b"PING 30", public)
    servers["s2"].send(b"PING 20", public)
    net.run_for(1)
    assert (30 in inside.pings_seen) is same_host_other_port
    assert (20 in inside.pings_seen) is other_host
    if not other_host:
        assert "filtered" in net.flow_text()


def test_unsolicited_inbound_has_no_mapping():
    net, _, inside, servers = behind_nat()
    servers["s1"].send(b"PING 0", ("198.51.100.1", 40000))
    net.run_for(1)
    assert inside.received == []
    assert "no mapping" in net.flow_text()


def test_mappings_expire_and_a_new_one_gets_a_new_port():
    net, nat, inside, servers = behind_nat(mapping_timeout=30)
    inside.send(b"PING 0", ("203.0.113.1", 4242))
    net.run_for(1)
    first = servers["s1"].received[0][2]
    net.run_for(40)
    servers["s1"].send(b"PING 5", first)  # too late: the mapping has gone
    net.run_for(1)
    assert 5 not in inside.pings_seen and "expired" in net.flow_text()
    inside.send(b"PING 1", ("203.0.113.1", 4242))
    net.run_for(1)
    assert servers["s1"].received[-1][2] != first


def test_nat_reset_forgets_mappings():
    net, nat, inside, servers = behind_nat()
    inside.send(b"PING 0", ("203.0.113.1", 4242))
    net.run_for(1)
    nat.reset()
    assert nat.mappings() == []


def test_lan_traffic_between_nodes_behind_one_nat_skips_the_nat():
    net = SimNet()
    nat = net.add_nat("office", "198.51.100.1")
    a, b = EchoPeer(), EchoPeer()
    net.add_node("a", a, ("192.168.1.10", 4242), nat=nat)
    net.add_node("b", b, ("192.168.1.11", 4242), nat=nat)
    a.send(b"PING 0", ("192.168.1.11", 4242))
    net.run_until(lambda: a.pongs, max_time=1)
    assert b.received[0][2] == ("192.168.1.10", 4242)
    assert nat.mappings() == []


def test_hairpin_through_the_public_address_or_not():
    for hairpin in (True, False):
        net = SimNet()
        nat = net.add_nat("office", "198.51.100.1", filtering=ENDPOINT_INDEPENDENT, hairpin=hairpin)
        a, b, server = EchoPeer(), EchoPeer(), EchoPeer()
        net.add_node("a", a, ("192.168.1.10", 4242), nat=nat)
        net.add_node("b", b, ("192.168.1.11", 4242), nat=nat)
        net.add_node("server", server, C)
        b.send(b"PING 0", C)  # b gets a public mapping
        net.run_for(1)
        b_public = server.received[0][2]
        a.send(b"PING 1", b_public)
        net.run_for(1)
        assert (1 in b.pings_seen) is hairpin


def punch(mapping):
    """Two hosts behind two NATs learn each other's public address from a server, then both send."""
    net = SimNet(default_link=LinkProfile(latency=0.02))
    nat_a = net.add_nat("nat-a", "198.51.100.1", mapping=mapping)
    nat_b = net.add_nat("nat-b", "198.51.100.2", mapping=mapping)
    a, b, server = EchoPeer(), EchoPeer(), EchoPeer()
    net.add_node("a", a, ("192.168.1.10", 4242), nat=nat_a)
    net.add_node("b", b, ("192.168.2.10", 4242), nat=nat_b)
    net.add_node("lighthouse", server, C)
    a.send(b"HELLO", C)
    b.send(b"HELLO", C)
    net.run_for(1)
    assert len(server.received) == 2
    a_public, b_public = server.received[0][2], server.received[1][2]
    a.send(b"PING 1", b_public)
    b.send(b"PING 2", a_public)
    net.run_for(1)
    return a, b


def test_hole_punching_works_through_cone_nats():
    a, b = punch(ENDPOINT_INDEPENDENT)
    # Each side's outbound packet opened its NAT for the other before the other's packet arrived.
    assert b.pings_seen == [1] and a.pings_seen == [2]
    assert a.pongs == [1] and b.pongs == [2]


def test_hole_punching_fails_between_symmetric_nats():
    a, b = punch(SYMMETRIC)
    assert a.pings_seen == [] and b.pings_seen == []


# -- flow log --------------------------------------------------------------------------------------


def test_flow_log_narrates_each_step_with_the_describe_hook(capsys):
    net = SimNet(
        default_link=LinkProfile(latency=0.01), narrate=True, describe=lambda d: d.split()[0].decode()
    )
    nat = net.add_nat("home", "198.51.100.1")
    a, b = EchoPeer(), EchoPeer()
    net.add_node("alice", a, ("192.168.1.10", 4242), nat=nat)
    net.add_node("bob", b, B)
    a.send(b"PING 0", B)
    net.run_until(lambda: a.pongs, max_time=1)
    text = net.flow_text()
    lines = text.splitlines()
    assert [line.split()[1] for line in lines] == ["send", "nat-map", "deliver", "send", "deliver"]
    assert "192.168.1.10:4242 -> 203.0.113.2:4242 6B alice PING" in lines[0]
    assert "bob" in lines[2] and "via NAT home to 192.168.1.10:4242" in lines[4]
    assert capsys.readouterr().out == text + "\n"


def test_names_and_addresses_are_unique():
    net = SimNet()
    net.add_node("a", EchoPeer(), A)
    with pytest.raises(ValueError):
        net.add_node("a", EchoPeer(), B)
    with pytest.raises(ValueError):
        net.add_node("b", EchoPeer(), A)
    with pytest.raises(ValueError):
        net.add_nat("n", A[0])
