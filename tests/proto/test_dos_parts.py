"""The DoS defence's parts on their own: token buckets, the per-source table, cookies and macs."""

from __future__ import annotations

import random

from flatnet.proto.cookie_reply import encode_cookie_reply, parse_cookie_reply
from flatnet.proto.cookies import ZERO_MAC, CookieChecker, NetworkMacs
from flatnet.proto.ratelimit import HandshakeRateLimiter, TokenBucket


def test_token_bucket_refills_at_its_rate_up_to_its_burst():
    bucket = TokenBucket(rate=2.0, burst=3.0)
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(100.4) is False  # 0.8 of a token
    assert bucket.take(100.5) is True
    assert sum(bucket.take(1000.0) for _ in range(10)) == 3  # never more than the burst


def test_limiter_under_load_and_per_source_shares():
    limiter = HandshakeRateLimiter(rate=10, burst=2, per_source_rate=1, per_source_burst=2, max_sources=3)
    assert not limiter.under_load(0.0)
    assert limiter.take_global(0.0) and limiter.take_global(0.0)
    assert limiter.under_load(0.0)
    assert [limiter.take_source("198.51.100.1", 0.0) for _ in range(3)] == [True, True, False]
    assert limiter.take_source("198.51.100.2", 0.0)
    for n in range(3, 10):  # the table stays bounded; the oldest source is forgotten first
        limiter.take_source(f"198.51.100.{n}", 0.0)
    assert len(limiter._sources) == 3
    assert limiter.take_source("198.51.100.1", 0.0)  # forgotten, so a fresh bucket


def test_cookie_round_trip_and_mac2():
    rng = random.Random(1)
    macs = NetworkMacs(b"\x01" * 32)
    checker = CookieChecker(macs, rng.randbytes)
    body = b"initiation body" * 10
    signed, mac1 = macs.sign(body, None)
    assert signed.endswith(ZERO_MAC) and macs.mac1_valid(body, mac1)
    addr = ("198.51.100.1", 4242)
    reply = parse_cookie_reply(encode_cookie_reply(checker.make_reply(7, mac1, addr, 0.0)))
    cookie = macs.open_cookie(reply, mac1)
    assert cookie is not None
    assert macs.open_cookie(reply, b"\x00" * 16) is None  # bound to the initiation's mac1
    assert NetworkMacs(b"\x02" * 32).open_cookie(reply, mac1) is None  # and to the network key
    signed, _ = macs.sign(body, cookie)
    assert checker.mac2_valid(signed[:-16], signed[-16:], addr, 1.0)
    assert not checker.mac2_valid(signed[:-16], signed[-16:], ("198.51.100.2", 4242), 1.0)  # other source
    assert checker.mac2_valid(signed[:-16], signed[-16:], addr, 150.0)  # previous secret still good
    assert not checker.mac2_valid(signed[:-16], signed[-16:], addr, 300.0)  # two rotations later
