"""What the tunnel refuses: tampered, replayed and foreign packets, untrusted certificates, spoofed
inner sources, handshake floods. Each refusal is counted under its reason and changes nothing."""

from __future__ import annotations

import random
import struct
from ipaddress import IPv4Address

import pytest

from flatnet.pki.cert import TrustStore
from flatnet.proto import handshake
from flatnet.proto.constants import HANDSHAKE_BURST, HANDSHAKES_PER_SECOND, REKEY_TIMEOUT
from flatnet.proto.cookie_reply import COOKIE_REPLY_SIZE
from flatnet.proto.cookies import NetworkMacs
from flatnet.proto.handshake_messages import encode_handshake_initiation_body
from flatnet.proto.header import MessageType
from flatnet.proto.noise import public_bytes
from tests.proto.harness import T0, Wire, ipv4_packet, make_ca, make_identity, make_node, pair, snapshot

A_IP, B_IP = "10.87.1.1", "10.87.2.1"


def established():
    wire, a, b = pair()
    a.engine.send_packet(ipv4_packet(A_IP, B_IP, b"first"), wire.now)
    wire.run()
    assert b.received == [ipv4_packet(A_IP, B_IP, b"first")]
    return wire, a, b


def sealed(a, payload: bytes, now: float) -> bytes:
    datagram = bytes(a.engine.session_for(B_IP, now).seal(payload, MessageType.DATA, now))
    a.engine.datagrams_to_send()
    return datagram


def assert_dropped(node, datagram: bytes, reason: str, addr, now: float) -> None:
    before = snapshot(node.engine)
    count = node.engine.drops[reason]
    node.engine.receive_datagram(datagram, addr, now)
    assert node.engine.drops[reason] == count + 1, dict(node.engine.drops)
    assert snapshot(node.engine) == before
    assert node.engine.next_event() is None


def test_replayed_truncated_bitflipped_and_foreign_key_packets_are_dropped_and_counted():
    wire, a, b = established()
    good = sealed(a, ipv4_packet(A_IP, B_IP, b"x" * 100), wire.now)
    b.engine.receive_datagram(good, a.addr, wire.now)
    assert len(b.engine._events) == 1
    b.engine.next_event()

    assert_dropped(b, good, "replay", a.addr, wire.now)
    fresh = sealed(a, ipv4_packet(A_IP, B_IP, b"y" * 100), wire.now)
    for cut in (1, 10, 16, 31):
        assert_dropped(b, fresh[:cut], "truncated", a.addr, wire.now)
    assert_dropped(b, fresh[:-1], "decrypt-failed", a.addr, wire.now)
    for position in (20, 40, len(fresh) - 1, 9):  # ciphertext, tag, counter byte (associated data)
        flipped = bytearray(fresh)
        flipped[position] ^= 0x01
        assert_dropped(b, bytes(flipped), "decrypt-failed", a.addr, wire.now)
    flipped = bytearray(fresh)
    flipped[4] ^= 0x01  # receiver index
    assert_dropped(b, bytes(flipped), "unknown-index", a.addr, wire.now)

    # A third node with its own session to bravo: its packets, re-addressed to alpha's index at
    # bravo, do not open with alpha's keys.
    ca = wire.ca
    c = make_node(wire, ca, "charlie", "10.87.3.1/16", ("192.0.2.3", 4242), seed=3)
    c.engine.add_peer(B_IP, [b.addr])
    c.engine.send_packet(ipv4_packet("10.87.3.1", B_IP, b"c"), wire.now)
    wire.run()
    c_session = c.engine.session_for(B_IP, wire.now)
    for _ in range(5):  # a counter alpha's session has not seen yet, so the replay check passes
        foreign = bytearray(c_session.seal(ipv4_packet("10.87.3.1", B_IP, b"z" * 50), MessageType.DATA, wire.now))
    struct.pack_into("<I", foreign, 4, b.engine.session_for(A_IP, wire.now).local_index)
    assert_dropped(b, bytes(foreign), "decrypt-failed", c.addr, wire.now)

    # The genuine, unreplayed packet still gets through after all that.
    b.engine.receive_datagram(fresh, a.addr, wire.now)
    assert b.engine.next_event().packet == ipv4_packet(A_IP, B_IP, b"y" * 100)


def test_versions_and_types_we_do_not_speak_are_refused():
    wire, a, b = established()
    fresh = bytearray(sealed(a, ipv4_packet(A_IP, B_IP, b"v"), wire.now))
    newer = bytearray(fresh)
    newer[1] = 2
    assert_dropped(b, bytes(newer), "bad-version", a.addr, wire.now)
    for unknown_type in (0, 9, 0x7F, 0xFB):
        other = bytearray(fresh)
        other[0] = unknown_type
        assert_dropped(b, bytes(other), "unknown-type", a.addr, wire.now)
    reserved = bytearray(fresh)
    reserved[2] = 1
    assert_dropped(b, bytes(reserved), "bad-reserved", a.addr, wire.now)
    # A PUNCH is understood and changes nothing.
    before = snapshot(b.engine)
    b.engine.receive_datagram(bytes([MessageType.PUNCH, 1, 0, 0]), ("203.0.113.9", 1), wire.now)
    assert snapshot(b.engine) == before and b.engine.stats["punch-received"] == 1


def test_inner_source_outside_the_peers_certificate_is_dropped():
    wire, a, b = established()
    allowed = [ipv4_packet(A_IP, B_IP, b"own"), ipv4_packet("10.87.1.77", B_IP, b"subnet")]
    for p in allowed:
        b.engine.receive_datagram(sealed(a, p, wire.now), a.addr, wire.now)
    spoofed = [ipv4_packet("10.87.2.5", B_IP, b"bravo's own subnet"), ipv4_packet("192.168.1.1", B_IP, b"lan")]
    for p in spoofed:
        b.engine.receive_datagram(sealed(a, p, wire.now), a.addr, wire.now)
    b.drain_events()
    assert b.received[1:] == allowed
    assert b.engine.drops["spoofed-source"] == 2
    b.engine.receive_datagram(sealed(a, b"\x60" + bytes(39), wire.now), a.addr, wire.now)  # IPv6
    assert b.engine.drops["bad-inner-packet"] == 1


@pytest.mark.parametrize(
    "make_identity_for_a, reason",
    [
        (lambda ca: make_identity(make_ca("rogue-ca"), "alpha", "10.87.1.1/16"), "cert-unknown-issuer"),
        (lambda ca: make_identity(ca, "alpha", "10.87.1.1/16", not_after=int(T0) - 1), "cert-expired"),
        (lambda ca: make_identity(ca, "alpha", "10.87.1.1/16", not_before=int(T0) + 3600), "cert-not-yet-valid"),
    ],
    ids=["foreign-ca", "expired", "not-yet-valid"],
)
def test_untrusted_initiator_certificates_are_refused(make_identity_for_a, reason):
    # The rogue knows the network key (our CA's fingerprint), so it gets past mac1 to the certificate.
    wire = Wire()
    ca = make_ca()
    a_identity = make_identity_for_a(ca)
    a = make_node(wire, ca, "alpha", "10.87.1.1/16", ("192.0.2.1", 4242), identity=a_identity,
                  network_key=ca[0].fingerprint())
    b = make_node(wire, ca, "bravo", "10.87.2.1/16", ("192.0.2.2", 4242))
    a.engine.add_peer(B_IP, [b.addr])
    a.engine.send_packet(ipv4_packet(A_IP, B_IP, b"hi"), wire.now)
    [(initiation, _)] = a.engine.datagrams_to_send()
    assert_dropped(b, initiation, reason, a.addr, wire.now)
    assert b.engine.peers == {} and b.engine.stats["handshake-dh"] == 0


def test_foreign_network_initiation_fails_mac1_before_any_work():
    wire = Wire()
    ca, rogue_ca = make_ca(), make_ca("rogue-ca")
    a = make_node(wire, rogue_ca, "alpha", "10.87.1.1/16", ("192.0.2.1", 4242))
    b = make_node(wire, ca, "bravo", "10.87.2.1/16", ("192.0.2.2", 4242))
    a.engine.add_peer(B_IP, [b.addr])
    a.engine.send_packet(ipv4_packet(A_IP, B_IP, b"hi"), wire.now)
    [(initiation, _)] = a.engine.datagrams_to_send()
    assert_dropped(b, initiation, "bad-mac1", a.addr, wire.now)
    assert b.engine.stats["initiation-processed"] == 0


def test_blocklisted_initiator_is_refused():
    wire = Wire()
    ca = make_ca()
    a_identity = make_identity(ca, "alpha", "10.87.1.1/16")
    a = make_node(wire, ca, "alpha", "10.87.1.1/16", ("192.0.2.1", 4242), identity=a_identity)
    b = make_node(wire, ca, "bravo", "10.87.2.1/16", ("192.0.2.2", 4242),
                  trust=TrustStore([ca[0]], blocklist=[a_identity[0].fingerprint()]))
    a.engine.add_peer(B_IP, [b.addr])
    a.engine.send_packet(ipv4_packet(A_IP, B_IP, b"hi"), wire.now)
    [(initiation, _)] = a.engine.datagrams_to_send()
    assert_dropped(b, initiation, "cert-blocklisted", a.addr, wire.now)


def test_blocklisted_or_wrong_ip_responder_is_refused_by_the_initiator():
    for case in ("blocklisted", "wrong-ip"):
        wire = Wire()
        ca = make_ca()
        b_identity = make_identity(ca, "bravo", "10.87.2.1/16" if case == "blocklisted" else "10.87.3.1/16")
        trust = TrustStore([ca[0]], blocklist=[b_identity[0].fingerprint()] if case == "blocklisted" else [])
        a = make_node(wire, ca, "alpha", "10.87.1.1/16", ("192.0.2.1", 4242), trust=trust)
        b = make_node(wire, ca, "bravo", "", ("192.0.2.2", 4242), identity=b_identity)
        b.engine.add_peer(A_IP, [a.addr])
        # alpha believes 10.87.2.1 lives at bravo's address
        a.engine.add_peer(B_IP, [b.addr])
        a.engine.send_packet(ipv4_packet(A_IP, B_IP, b"hi"), wire.now)
        [(initiation, _)] = a.engine.datagrams_to_send()
        b.engine.receive_datagram(initiation, a.addr, wire.now)
        [(response, _)] = b.engine.datagrams_to_send()
        reason = "cert-blocklisted" if case == "blocklisted" else "cert-wrong-ip"
        assert_dropped(a, response, reason, b.addr, wire.now)
        assert a.engine.session_for(B_IP, wire.now) is None
        assert a.engine.peers[IPv4Address(B_IP)].handshake_pending  # still waiting, as before


def test_replayed_initiation_is_refused():
    wire, a, b = pair()
    a.engine.send_packet(ipv4_packet(A_IP, B_IP, b"hi"), wire.now)
    wire.run()
    [initiation] = [d for _, _, _, d in wire.log if d[0] == MessageType.HANDSHAKE_INITIATION]
    assert_dropped(b, initiation, "replayed-initiation", a.addr, wire.now + 1)


def _junk_initiation(macs: NetworkMacs, rng: random.Random) -> bytes:
    """What a flooder who knows the network key sends: mac1 valid, the rest garbage."""
    body = encode_handshake_initiation_body(rng.getrandbits(32), rng.randbytes(32 + 32 + 8 + 300))
    return macs.sign(body, None)[0]


def test_handshake_flood_gets_cookies_and_no_dh_beyond_the_limit():
    wire, a, b = pair()
    macs = NetworkMacs(wire.ca[0].fingerprint())
    rng = random.Random(7)
    flood_per_second = 2000
    # 3 s of flooding from spoofed sources, at 1 ms steps.
    for step in range(3000):
        now = wire.now + step / 1000
        for _ in range(flood_per_second // 1000):
            b.engine.receive_datagram(_junk_initiation(macs, rng), (f"198.18.{rng.randrange(256)}.{rng.randrange(256)}", 1), now)
    processed = b.engine.stats["initiation-processed"]
    assert processed <= HANDSHAKE_BURST + 3 * HANDSHAKES_PER_SECOND + 1
    assert b.engine.stats["cookie-sent"] == 6000 - processed
    assert b.engine.drops["cookie-required"] == 6000 - processed
    replies = b.engine.datagrams_to_send()
    assert all(len(d) == COOKIE_REPLY_SIZE for d, _ in replies)  # 52 bytes: smaller than what came in
    assert b.engine.stats["handshake-dh"] == 0 and not b.engine._sessions
    assert not any(p.up for p in b.engine.peers.values())


def test_legitimate_peer_gets_through_a_flood_with_its_cookie():
    wire, a, b = pair()
    macs = NetworkMacs(wire.ca[0].fingerprint())
    rng = random.Random(8)

    def flood(now):
        for _ in range(200):
            b.engine.receive_datagram(_junk_initiation(macs, rng), (f"198.18.0.{rng.randrange(256)}", 1), now)
        b.engine.datagrams_to_send()  # cookie replies to spoofed addresses go nowhere

    flood(wire.now)
    a.engine.send_packet(ipv4_packet(A_IP, B_IP, b"through the flood"), wire.now)
    wire.run()
    assert a.engine.stats["cookie-received"] == 1 and b.engine.stats["handshake-dh"] == 0
    # The retry carries mac2 made with the cookie; the flood goes on.
    for _ in range(int(REKEY_TIMEOUT) + 1):
        wire.advance(1.0)
        flood(wire.now)
    assert b.received == [ipv4_packet(A_IP, B_IP, b"through the flood")]
    assert b.engine.stats["handshake-dh"] == 1


def test_response_with_wrong_static_key_for_certificate_is_refused():
    # A responder that presents bravo's certificate without holding bravo's key.
    wire, a, b = pair()
    a.engine.send_packet(ipv4_packet(A_IP, B_IP, b"hi"), wire.now)
    [(initiation, _)] = a.engine.datagrams_to_send()
    impostor_key = make_identity(wire.ca, "x", "10.87.9.9/16")[1]
    msg = initiation[8:-32]
    from flatnet.proto.noise import HandshakeState

    state = HandshakeState(handshake.PROTOCOL, False, handshake.NOISE_PROLOGUE, s=impostor_key)
    state.read_message(msg)
    noise_response = handshake.write_response(state, b.engine.certificate.encode())
    from flatnet.proto.handshake_messages import encode_handshake_response_body

    sender = struct.unpack_from("<I", initiation, 4)[0]
    response = NetworkMacs(wire.ca[0].fingerprint()).sign(encode_handshake_response_body(1234, sender, noise_response), None)[0]
    assert public_bytes(impostor_key) != b.engine.certificate.public_key
    assert_dropped(a, response, "cert-key-mismatch", b.addr, wire.now)


def test_set_trust_cuts_off_a_newly_blocklisted_peer_at_once():
    wire, a, b = established()
    alpha_cert = a.engine.certificate
    revoked = b.engine.set_trust(TrustStore([wire.ca[0]], blocklist=[alpha_cert.fingerprint()]), wire.now)
    assert revoked == [IPv4Address(A_IP)]
    assert [type(e).__name__ for e in [b.engine.next_event()]] == ["PeerDown"]
    assert b.engine.session_for(A_IP, wire.now) is None
    # alpha's packets now hit an unknown index, and its next handshake is refused.
    a.engine.send_packet(ipv4_packet(A_IP, B_IP, b"after"), wire.now)
    wire.run()
    assert b.engine.drops["unknown-index"] == 1
    wire.advance(20)
    assert b.engine.drops["cert-blocklisted"] >= 1
    assert b.received == [ipv4_packet(A_IP, B_IP, b"first")]
