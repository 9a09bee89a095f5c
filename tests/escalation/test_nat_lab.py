"""The NAT lab, for real: network namespaces, nftables NAT routers, the lighthouse and its relay in
an "internet" namespace, and the real tunnel component on each host finding its peer only through
the lighthouse. Each test asserts which rung carries the traffic and that a TCP stream through the
tunnel arrives intact."""

from __future__ import annotations

import time

import pytest

from flatnet.lab.nat import CONE, SYMMETRIC
from flatnet.testing.markers import needs_root, require_tools
from tests.escalation.lab_harness import FLATNET, node_status, start_node, wait_for_rung

pytestmark = [pytest.mark.slow, needs_root, require_tools("nft")]

A_IP, B_IP = FLATNET["a"], FLATNET["b"]


def test_cone_nats_punch_through(make_lab):
    lab = make_lab(nat_a=CONE, nat_b=CONE)
    lab.transfer_intact()  # first packets: through the relay while punching (never waiting)
    wait_for_rung(lab.a, B_IP, "punched")
    wait_for_rung(lab.b, A_IP, "punched")
    lab.transfer_intact()


def test_two_hosts_on_one_lan_go_direct(make_lab):
    lab = make_lab(same_lan=True)
    lab.transfer_intact()
    wait_for_rung(lab.a, B_IP, "direct-lan")
    wait_for_rung(lab.b, A_IP, "direct-lan")
    lab.transfer_intact()


def test_one_symmetric_nat_goes_through_the_udp_relay(make_lab):
    lab = make_lab(nat_a=SYMMETRIC, nat_b=CONE)
    lab.transfer_intact()
    wait_for_rung(lab.a, B_IP, "udp-relay")
    wait_for_rung(lab.b, A_IP, "udp-relay")
    time.sleep(12)  # two rounds of upgrade probes: punching keeps failing, the relay stays
    status = node_status(lab.a)["escalation"]["peers"][B_IP]
    assert status["rung"] == "udp-relay" and status["confirmed"]
    lab.transfer_intact()
    status = node_status(lab.a)["escalation"]["peers"][B_IP]
    assert status["bytes_sent"]["udp-relay"] > 1_000_000  # the transfer went through the relay


def test_udp_blocked_escalates_to_tcp_relay_and_back_to_direct_under_a_live_tcp_stream(make_lab):
    lab = make_lab(nat_a=CONE, nat_b=CONE)
    lab.transfer_intact()
    wait_for_rung(lab.a, B_IP, "punched")
    lab.lab.block_udp("a")  # A's network lets only TCP out
    wait_for_rung(lab.a, B_IP, "tcp-relay", timeout=40)
    wait_for_rung(lab.b, A_IP, "udp-relay")  # the same relay session, B's side still on UDP
    lab.transfer_intact()
    # A long TCP stream starts on the TCP relay; UDP comes back in the middle of it
    server, client = lab.stream(total=6_000_000, seconds=30)
    time.sleep(5)
    lab.lab.unblock_udp("a")
    wait_for_rung(lab.a, B_IP, "punched", timeout=40)
    sent, _ = client.communicate(timeout=90)
    received, _ = server.communicate(timeout=30)
    assert sent == received and sent.split()[0] == str(6_000_000 // 16384 * 16384)  # one connection, intact
    status = node_status(lab.a)["escalation"]["peers"][B_IP]
    assert status["rung"] == "punched"
    assert status["bytes_sent"]["tcp-relay"] > 1_000_000 and status["seconds"]["tcp-relay"] > 5


def test_underlay_address_change_mid_transfer_recovers(make_lab):
    lab = make_lab(nat_a=CONE, nat_b=CONE)
    lab.transfer_intact()
    wait_for_rung(lab.a, B_IP, "punched")
    server, client = lab.stream(total=4_000_000, seconds=25)
    time.sleep(4)
    lab.lab.readdress_a("192.168.1.11")  # DHCP hands host A another address mid-transfer
    sent, _ = client.communicate(timeout=120)
    received, _ = server.communicate(timeout=30)
    assert sent == received and sent.split()[0] == str(4_000_000 // 16384 * 16384)
    wait_for_rung(lab.a, B_IP, "punched", timeout=40)  # and back on a direct path
    status = node_status(lab.a)["escalation"]
    assert status["discovery"]["counters"].get("underlay-changed", 0) >= 1


def test_a_lighthouse_killed_while_a_second_is_up(make_lab):
    lab = make_lab(lighthouses=2, nat_a=CONE, nat_b=CONE)
    lab.transfer_intact()
    wait_for_rung(lab.a, B_IP, "punched")
    lab.lighthouse.stop()  # the first lighthouse (and its relay) dies
    lab.transfer_intact()  # the existing tunnel carries on
    # a node that starts now (B restarted: no state at all) finds its peer through the second one
    lab.b.stop()
    lab.b = start_node(lab.lab.host_b, lab.configs["b"])
    lab.processes.append(lab.b)
    lab.transfer_intact()
    wait_for_rung(lab.b, A_IP, "punched")
    lighthouses = node_status(lab.b)["escalation"]["discovery"]["lighthouses"]
    assert lighthouses["10.87.255.1"]["acked_at"] is None and lighthouses["10.87.255.2"]["acked_at"] is not None
