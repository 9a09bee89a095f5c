"""CA rotation: while both the old and the new CA are trusted, hosts on either reach each other.

mac1 is keyed on the signer's CA fingerprint (an IX initiator cannot know the responder's static
key). A node signs with its own issuer's key and accepts any trusted CA's, so a rolling rotation
works; a CA that is not trusted still stops an initiation at mac1, before any DH.
"""

from flatnet.pki.cert import TrustStore
from flatnet.proto.cookies import NetworkMacs

from .harness import Wire, ipv4_packet, make_ca, make_identity, make_node
from .test_tunnel_refusals import _junk_initiation

A_IP, B_IP = "10.87.1.1", "10.87.2.1"


def _rotating_pair(trust_a_cas, trust_b_cas, old, new):
    wire = Wire()
    a = make_node(wire, old, "alpha", "10.87.1.1/16", ("192.0.2.1", 4242), ["10.87.1.0/24"], seed=1,
                  trust=TrustStore([c[0] for c in trust_a_cas]))
    b = make_node(wire, new, "bravo", "10.87.2.1/16", ("192.0.2.2", 4242), ["10.87.2.0/24"], seed=2,
                  trust=TrustStore([c[0] for c in trust_b_cas]))
    a.engine.add_peer(B_IP, [b.addr])
    b.engine.add_peer(A_IP, [a.addr])
    return wire, a, b


def test_hosts_on_old_and_new_ca_talk_while_both_are_trusted():
    old, new = make_ca("old-ca"), make_ca("new-ca")
    wire, a, b = _rotating_pair([old, new], [old, new], old, new)
    a.engine.send_packet(ipv4_packet(A_IP, B_IP, b"old to new"), wire.now)
    wire.run()
    b.engine.send_packet(ipv4_packet(B_IP, A_IP, b"new to old"), wire.now)
    wire.run()
    assert b.received == [ipv4_packet(A_IP, B_IP, b"old to new")]
    assert a.received == [ipv4_packet(B_IP, A_IP, b"new to old")]
    assert not a.engine.drops and not b.engine.drops


def test_untrusted_ca_still_stops_at_mac1():
    old, new = make_ca("old-ca"), make_ca("new-ca")
    wire, a, b = _rotating_pair([old], [new], old, new)  # b does not trust a's CA
    a.engine.send_packet(ipv4_packet(A_IP, B_IP, b"x"), wire.now)
    wire.run()
    assert b.engine.drops["bad-mac1"] >= 1
    assert b.engine.stats["handshake-dh"] == 0 and b.received == []


def test_cookie_reply_under_load_is_sealed_for_the_initiators_ca():
    import random

    old, new = make_ca("old-ca"), make_ca("new-ca")
    wire, a, b = _rotating_pair([old, new], [old, new], old, new)
    rng = random.Random(3)
    flood_macs = NetworkMacs(new[0].fingerprint())
    for _ in range(200):  # put b under load
        b.engine.receive_datagram(_junk_initiation(flood_macs, rng), ("198.18.0.9", 1), wire.now)
    b.engine.datagrams_to_send()
    a.engine.send_packet(ipv4_packet(A_IP, B_IP, b"through"), wire.now)
    wire.run()
    assert a.engine.stats["cookie-received"] == 1  # opened: sealed under a's (the old) CA key
    assert a.engine.drops["bad-cookie"] == 0


def test_identity_helper_is_signed_by_the_given_ca():
    old = make_ca("old-ca")
    cert, _ = make_identity(old, "x", "10.87.3.1/16")
    assert cert.issuer == old[0].fingerprint()
