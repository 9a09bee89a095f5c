"""Two tunnel engines back to back in memory, on a fake clock: handshake, data, loss, rekey, expiry."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from flatnet.proto.constants import (
    KEEPALIVE_TIMEOUT,
    MAX_QUEUED_PACKETS,
    REJECT_AFTER_TIME,
    REKEY_AFTER_TIME,
    REKEY_ATTEMPT_TIME,
    REKEY_TIMEOUT,
)
from flatnet.proto.errors import SessionExpiredError
from flatnet.proto.events import HandshakeFailed, PacketReceived, PeerDown, PeerRoamed, PeerUp, Rekeyed
from flatnet.proto.header import MessageType
from flatnet.proto.transport_header import TRANSPORT_OVERHEAD
from tests.proto.harness import Wire, ipv4_packet, make_node, pair

A_IP, B_IP = "10.87.1.1", "10.87.2.1"


def packet(src, dst, n: int) -> bytes:
    return ipv4_packet(src, dst, b"payload %06d " % n + bytes(40))


def test_handshake_on_demand_then_data_both_ways():
    wire, a, b = pair()
    first = packet(A_IP, B_IP, 0)
    a.engine.send_packet(first, wire.now)
    [(initiation, to)] = a.engine.datagrams_to_send()
    assert to == b.addr
    cert_len = len(a.engine.certificate.encode())
    # type/version/reserved + sender index + e + s + timestamp + certificate + mac1 + mac2
    assert initiation[0] == MessageType.HANDSHAKE_INITIATION and initiation[1] == 1
    assert len(initiation) == 4 + 4 + 32 + 32 + 8 + cert_len + 32
    b.engine.receive_datagram(initiation, a.addr, wire.now)
    [(response, to)] = b.engine.datagrams_to_send()
    assert to == a.addr
    b_cert_len = len(b.engine.certificate.encode())
    assert len(response) == 4 + 8 + 32 + 48 + b_cert_len + 16 + 32
    a.engine.receive_datagram(response, b.addr, wire.now)
    a.drain_events()
    assert [type(e) for e in a.events] == [PeerUp]
    assert a.events[0].peer_ip == IPv4Address(B_IP) and a.events[0].certificate.name == "bravo"
    # The queued packet goes out sealed on the new session: exactly header + packet + tag.
    [(data, to)] = a.engine.datagrams_to_send()
    assert to == b.addr and len(data) == len(first) + TRANSPORT_OVERHEAD
    b.engine.receive_datagram(data, a.addr, wire.now)
    b.drain_events()
    assert [type(e) for e in b.events] == [PeerUp, PacketReceived]
    assert b.received == [first]
    # Each side did its DH exactly once.
    assert a.engine.stats["handshake-dh"] == b.engine.stats["handshake-dh"] == 1

    replies = [packet(B_IP, A_IP, n) for n in range(5)]
    for p in replies:
        b.engine.send_packet(p, wire.now)
    wire.run()
    assert a.received == replies
    status = a.engine.peers[IPv4Address(B_IP)]
    assert status.up and status.name == "bravo" and status.endpoint == b.addr
    assert status.last_handshake_at == wire.now and status.rx_bytes > 0 and status.tx_bytes > 0
    assert not a.engine.drops and not b.engine.drops


def test_hot_path_session_for_seal_open_data():
    wire, a, b = pair()
    assert a.engine.session_for(B_IP, wire.now) is None
    a.engine.send_packet(packet(A_IP, B_IP, 0), wire.now)
    wire.run()
    session = a.engine.session_for(IPv4Address(B_IP), wire.now)
    assert session is not None and session.peer_ip == IPv4Address(B_IP)
    assert a.engine.session_for("10.87.2.77", wire.now) is session  # in bravo's certified subnet
    assert session.peer_certificate.name == "bravo"
    assert session.allows_source(IPv4Address("10.87.2.9")) and not session.allows_source(IPv4Address("10.87.3.9"))
    batch = b"opaque batch payload" * 50
    datagram = session.seal(batch, MessageType.DATA_BATCH, wire.now)
    opened = b.engine.open_data(bytes(datagram), a.addr, wire.now)
    assert opened is not None
    b_session, msg_type, plaintext = opened
    assert msg_type is MessageType.DATA_BATCH and plaintext == batch and b_session.peer_ip == IPv4Address(A_IP)
    assert b.engine.open_data(bytes(datagram), a.addr, wire.now) is None  # replay
    assert b.engine.drops["replay"] == 1
    # Through receive_datagram, a batch is an event for the data plane.
    b.engine.receive_datagram(bytes(session.seal(batch, MessageType.DATA_BATCH, wire.now)), a.addr, wire.now)
    event = b.engine.next_event()
    assert type(event).__name__ == "BatchReceived" and event.payload == batch
    with pytest.raises(ValueError):
        session.seal(b"x", MessageType.HANDSHAKE_INITIATION, wire.now)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_loss_reordering_duplication_deliver_exactly_once(seed):
    wire = Wire(seed=seed, loss=0.2, duplicate=0.2, reorder=0.3)
    wire, a, b = pair(wire)
    sent_ab = [packet(A_IP, B_IP, n) for n in range(300)]
    sent_ba = [packet(B_IP, A_IP, n) for n in range(300)]
    for n in range(300):
        a.engine.send_packet(sent_ab[n], wire.now)
        b.engine.send_packet(sent_ba[n], wire.now)
        wire.run(rounds=2)
        wire.advance(0.1)
    wire.advance(30, step=1)
    for node, sender, sent in ((b, a, sent_ab), (a, b, sent_ba)):
        assert len(node.received) == len(set(node.received)), "a packet was delivered twice"
        assert set(node.received) <= set(sent)
        # Exactly what arrived: one delivery per distinct DATA datagram that reached the node.
        arrived = {d for src, dst, d in wire.delivered
                   if src == sender.addr and dst == node.addr and d[0] == MessageType.DATA and len(d) > TRANSPORT_OVERHEAD}
        assert len(node.received) == len(arrived)
        # Loss is 20% per datagram; what arrives is delivered (no dropped-as-replay of fresh packets).
        assert len(node.received) >= 0.5 * len(sent)
        assert node.engine.drops["decrypt-failed"] == 0
    assert a.engine.peers[IPv4Address(B_IP)].up and b.engine.peers[IPv4Address(A_IP)].up


def test_rekey_at_120s_loses_nothing():
    wire, a, b = pair()
    a.engine.send_packet(packet(A_IP, B_IP, -1), wire.now)  # alpha initiates the first session
    wire.run()
    b.received.clear()
    start = wire.now
    sent_ab, sent_ba = [], []
    first_index = None
    for n in range(250):  # one packet per second each way, 250 s: two rekeys
        p, q = packet(A_IP, B_IP, n), packet(B_IP, A_IP, n)
        sent_ab.append(p)
        sent_ba.append(q)
        a.engine.send_packet(p, wire.now)
        b.engine.send_packet(q, wire.now)
        wire.run()
        if first_index is None:
            first_index = a.engine.session_for(B_IP, wire.now).local_index
        wire.advance(1.0)
    assert b.received == sent_ab and a.received == sent_ba
    assert a.engine.stats["initiation-sent"] == 3  # first handshake, then at 120 s and 240 s
    initiations = [t - start for t, src, _, d in wire.log if d[0] == MessageType.HANDSHAKE_INITIATION]
    assert [round(t) for t in initiations] == [0, REKEY_AFTER_TIME, 2 * REKEY_AFTER_TIME]
    assert b.engine.stats["initiation-sent"] == 0  # only the initiator of a session renews it by time
    assert a.engine.session_for(B_IP, wire.now).local_index != first_index
    assert not a.engine.drops and not b.engine.drops
    # Each rekey is reported once on both sides (logged as session.rekeyed, counted in rekeys_total).
    assert [type(e) for e in a.events if not isinstance(e, PacketReceived)] == [PeerUp, Rekeyed, Rekeyed]
    b.drain_events()
    assert [type(e) for e in b.events if not isinstance(e, PacketReceived)] == [PeerUp, Rekeyed, Rekeyed]
    assert a.engine.stats["rekeyed"] == b.engine.stats["rekeyed"] == 2


def test_old_key_refused_after_180s():
    wire, a, b = pair()
    a.engine.send_packet(packet(A_IP, B_IP, 0), wire.now)
    wire.run()
    start = wire.now
    session = a.engine.session_for(B_IP, wire.now)
    late = bytes(session.seal(packet(A_IP, B_IP, 1), MessageType.DATA, start + REJECT_AFTER_TIME - 1))
    a.engine.datagrams_to_send()
    # Without any timer having run at the receiver, the key is refused by age...
    b.engine.receive_datagram(late, a.addr, start + REJECT_AFTER_TIME + 0.5)
    assert b.engine.drops["expired-key"] == 1
    # ...and once its timers run, the session is forgotten altogether.
    b.engine.handle_timer(start + REJECT_AFTER_TIME + 1)
    b.engine.receive_datagram(late, a.addr, start + REJECT_AFTER_TIME + 1)
    assert b.engine.drops["unknown-index"] == 1
    assert b.received == [packet(A_IP, B_IP, 0)]
    assert isinstance(b.engine.next_event(), PeerDown)
    # The sender refuses to use it as well.
    assert a.engine.session_for(B_IP, start + REJECT_AFTER_TIME) is None
    with pytest.raises(SessionExpiredError):
        session.seal(b"x", MessageType.DATA, start + REJECT_AFTER_TIME)


def test_passive_keepalive_after_10s():
    wire, a, b = pair()
    a.engine.send_packet(packet(A_IP, B_IP, 0), wire.now)
    wire.run()
    before = b.engine.stats["keepalive-sent"]
    wire.advance(KEEPALIVE_TIMEOUT + 0.5)
    assert b.engine.stats["keepalive-sent"] == before + 1
    assert a.engine.stats["keepalive-received"] >= 1
    assert a.engine.stats["handshake-after-silence"] == 0  # the keepalive answered a's data


def test_handshake_retries_then_gives_up_after_90s():
    wire, a, b = pair()
    del wire.nodes[b.addr]  # bravo is unreachable
    for n in range(3):
        a.engine.send_packet(packet(A_IP, B_IP, n), wire.now)
    wire.run()
    assert a.engine.stats["initiation-sent"] == 1
    timer = a.engine.get_timer()
    assert REKEY_TIMEOUT <= timer - wire.now <= REKEY_TIMEOUT + 0.334
    wire.advance(REKEY_ATTEMPT_TIME + 10)
    a.drain_events()
    failed = [e for e in a.events if isinstance(e, HandshakeFailed)]
    assert failed == [HandshakeFailed(IPv4Address(B_IP), "timeout", 3)]
    assert 17 <= a.engine.stats["initiation-sent"] <= 19  # every ~5 s for 90 s
    assert a.engine.drops["handshake-failed"] == 3
    assert a.engine.get_timer() is None


def test_queue_is_bounded_while_handshaking():
    wire, a, b = pair()
    sent = [packet(A_IP, B_IP, n) for n in range(MAX_QUEUED_PACKETS + 44)]
    for p in sent:
        a.engine.send_packet(p, wire.now)
    assert a.engine.drops["queue-full"] == 44
    wire.run()
    assert b.received == sent[44:]


def test_simultaneous_initiation_converges():
    wire, a, b = pair()
    a.engine.send_packet(packet(A_IP, B_IP, 0), wire.now)
    b.engine.send_packet(packet(B_IP, A_IP, 0), wire.now)
    wire.run()
    assert b.received == [packet(A_IP, B_IP, 0)] and a.received == [packet(B_IP, A_IP, 0)]
    kept = a.engine.stats["simultaneous-initiation-kept"] + b.engine.stats["simultaneous-initiation-kept"]
    yielded = a.engine.stats["simultaneous-initiation-yielded"] + b.engine.stats["simultaneous-initiation-yielded"]
    assert kept == 1 and yielded == 1
    # One session each way, the same pair on both sides.
    sa, sb = a.engine.session_for(B_IP, wire.now), b.engine.session_for(A_IP, wire.now)
    assert sa.remote_index == sb.local_index and sb.remote_index == sa.local_index
    assert a.engine.stats["handshake-dh"] + b.engine.stats["handshake-dh"] == 2
    for n in range(1, 4):
        a.engine.send_packet(packet(A_IP, B_IP, n), wire.now)
        b.engine.send_packet(packet(B_IP, A_IP, n), wire.now)
    wire.run()
    assert len(a.received) == len(b.received) == 4


def test_restarted_peer_is_reached_again():
    wire, a, b = pair()
    a.engine.send_packet(packet(A_IP, B_IP, 0), wire.now)
    wire.run()
    identity = (b.engine.certificate, b.engine._static_key)
    del wire.nodes[b.addr]
    b2 = make_node(wire, wire.ca, "bravo", "10.87.2.1/16", b.addr, identity=identity, seed=99)
    b2.engine.add_peer(A_IP, [a.addr])
    for n in range(1, 30):  # one packet a second; the first few hit the unknown index at bravo
        a.engine.send_packet(packet(A_IP, B_IP, n), wire.now)
        wire.run()
        wire.advance(1.0)
    assert b2.engine.drops["unknown-index"] >= 1
    assert a.engine.stats["handshake-after-silence"] == 1
    assert packet(A_IP, B_IP, 29) in b2.received


def test_roaming_endpoint_follows_authenticated_source():
    wire, a, b = pair()
    a.engine.send_packet(packet(A_IP, B_IP, 0), wire.now)
    wire.run()
    datagram = bytes(a.engine.session_for(B_IP, wire.now).seal(packet(A_IP, B_IP, 1), MessageType.DATA, wire.now))
    a.engine.datagrams_to_send()
    b.drain_events()
    b.events.clear()
    b.engine.receive_datagram(datagram, ("198.51.100.7", 5000), wire.now)
    assert b.engine.peers[IPv4Address(A_IP)].endpoint == ("198.51.100.7", 5000)
    b.drain_events()
    roams = [e for e in b.events if isinstance(e, PeerRoamed)]
    assert roams == [PeerRoamed(IPv4Address(A_IP), a.addr, ("198.51.100.7", 5000))]
    assert b.engine.stats["roamed"] == 1
    # More data from the same new address is no new roam.
    again = bytes(a.engine.session_for(B_IP, wire.now).seal(packet(A_IP, B_IP, 2), MessageType.DATA, wire.now))
    b.engine.receive_datagram(again, ("198.51.100.7", 5000), wire.now)
    assert b.engine.stats["roamed"] == 1


def test_rekey_after_messages_and_refusal_at_the_message_limit():
    from flatnet.proto.constants import REJECT_AFTER_MESSAGES, REKEY_AFTER_MESSAGES

    wire, a, b = pair()
    a.engine.send_packet(packet(A_IP, B_IP, 0), wire.now)
    wire.run()
    session = a.engine.session_for(B_IP, wire.now)
    session.send_counter = REKEY_AFTER_MESSAGES - 1
    b.engine.session_for(A_IP, wire.now).replay.highest = REKEY_AFTER_MESSAGES - 2
    a.engine.send_packet(packet(A_IP, B_IP, 1), wire.now)
    assert a.engine.stats["initiation-sent"] == 2  # the counter reached REKEY_AFTER_MESSAGES
    wire.run()
    assert b.received[-1] == packet(A_IP, B_IP, 1)
    assert a.engine.session_for(B_IP, wire.now) is not session
    session.send_counter = REJECT_AFTER_MESSAGES
    assert not session.can_send(wire.now)
    with pytest.raises(SessionExpiredError):
        session.seal(b"", MessageType.DATA, wire.now)


def test_initiator_renews_on_receive_when_only_the_responder_talks():
    from flatnet.proto.constants import REKEY_ON_RECEIVE_AGE

    wire, a, b = pair()
    a.engine.send_packet(packet(A_IP, B_IP, 0), wire.now)
    wire.run()
    start = wire.now
    for n in range(200):
        b.engine.send_packet(packet(B_IP, A_IP, n), wire.now)
        wire.run()
        wire.advance(1.0)
    assert len(a.received) == 200
    initiations = [t - start for t, src, _, d in wire.log if d[0] == MessageType.HANDSHAKE_INITIATION and src == a.addr]
    # alpha only sends keepalives; the first one after 120 s renews the session (as WireGuard's
    # keepKeyFreshSending), at the latest a received packet at REKEY_ON_RECEIVE_AGE would.
    assert len(initiations) == 2 and REKEY_AFTER_TIME <= initiations[1] <= REKEY_ON_RECEIVE_AGE + 1
    assert b.engine.stats["initiation-sent"] == 0 and b.engine.stats["handshake-after-silence"] == 0
    assert not a.engine.drops and not b.engine.drops


def test_initiator_renews_when_receiving_on_a_165s_old_session():
    from flatnet.proto.constants import REKEY_ON_RECEIVE_AGE

    wire, a, b = pair()
    a.engine.send_packet(packet(A_IP, B_IP, 0), wire.now)
    wire.run()
    later = wire.now + REKEY_ON_RECEIVE_AGE
    datagram = b.engine.session_for(A_IP, later).seal(packet(B_IP, A_IP, 1), MessageType.DATA, later)
    assert a.engine.stats["initiation-sent"] == 1
    a.engine.receive_datagram(datagram, b.addr, later)
    assert a.engine.stats["initiation-sent"] == 2
    assert b.engine.stats["initiation-sent"] == 0
    assert not a.engine.drops and not b.engine.drops


def test_renewed_certificate_is_announced_again():
    from tests.proto.harness import make_identity

    wire, a, b = pair()
    a.engine.send_packet(packet(A_IP, B_IP, 0), wire.now)
    wire.run()
    renewed_cert, renewed_key = make_identity(wire.ca, "bravo-renewed", "10.87.2.1/16", ["10.87.2.0/24"])
    del wire.nodes[b.addr]
    b2 = make_node(wire, wire.ca, "bravo", "", b.addr, identity=(renewed_cert, renewed_key), seed=5)
    b2.engine.add_peer(A_IP, [a.addr])
    b2.engine.send_packet(packet(B_IP, A_IP, 1), wire.now)
    wire.run()
    ups = [e for e in a.events if isinstance(e, PeerUp)]
    assert [e.certificate.name for e in ups] == ["bravo", "bravo-renewed"]
    assert a.received == [packet(B_IP, A_IP, 1)]
