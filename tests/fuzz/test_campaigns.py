"""A short run of every fuzz campaign in bench/fuzz (the long ones: python -m bench.fuzz --count 1000000),
and hypothesis feeding arbitrary bytes into the same entry points."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.fuzz.campaign import Surface, mutate_bytes, run_campaign
from bench.fuzz.surfaces import SURFACES
from flatnet.testing.markers import needs_root, require_tools

COUNTS = {"node-udp": 4000, "lighthouse-control": 4000, "relay-tcp": 4000, "certificates": 2000,
          "cni-stdin": 3000}


def assert_clean(report) -> None:
    assert report.crashes == 0, "\n\n".join(report.examples)
    assert not report.problems, report.problems
    assert report.leaked_fds <= 0, f"fds {report.fds_before} -> {report.fds_after}"
    assert report.inputs > 0 and report.seconds > 0


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_short_campaign(name):
    report = run_campaign(SURFACES[name](), COUNTS[name], seed=7)
    assert_clean(report)


def test_node_udp_campaign_reaches_past_the_aead():
    """A campaign that only ever hit decrypt failures would prove little: inputs must reach the
    batch parser, the anti-spoofing check and the TUN."""
    report = run_campaign(SURFACES["node-udp"](), 2000, seed=3)
    assert_clean(report)
    drops = report.stats["top_drops"]
    assert report.stats["tun_writes"] > 0
    assert any(reason.startswith("rx_") or reason == "batch_malformed" for reason in drops), drops


@pytest.mark.slow
@needs_root
@require_tools("nginx")
def test_short_gateway_admin_campaign():
    report = run_campaign(SURFACES["gateway-admin"](), 1500, seed=7)
    assert_clean(report)
    statuses = report.stats["statuses"]
    assert statuses.get(200, 0) > 0 and statuses.get(400, 0) > 0 and statuses.get(401, 0) > 0, statuses


class _Broken(Surface):
    name = "broken"

    def generate(self, rng):
        return rng.randbytes(4)

    def feed(self, data):
        if data[0] < 16:
            raise ValueError("boom")


def test_the_loop_counts_crashes_and_keeps_examples():
    report = run_campaign(_Broken(), 2000, seed=1)
    assert 0 < report.crashes < 2000 and len(report.examples) == 5 and "boom" in report.examples[0]
    assert not report.ok


def test_mutations_change_inputs_and_stay_bytes():
    rng = random.Random(1)
    seed = bytes(range(64))
    outs = [mutate_bytes(seed, rng, [seed, b"other"]) for _ in range(500)]
    assert all(isinstance(o, bytes) for o in outs)
    assert sum(o != seed for o in outs) > 450
    assert {len(o) for o in outs} > {64}


# ---- hypothesis: arbitrary bytes into the same entry points -----------------------------------------

_HYPOTHESIS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def node_surface():
    surface = SURFACES["node-udp"]()
    surface.setup(random.Random(5))
    yield surface
    assert not surface.check()
    surface.teardown()


@_HYPOTHESIS
@given(data=st.binary(max_size=1600), segment=st.sampled_from([0, 0, 16, 1472]))
def test_node_udp_any_bytes(node_surface, data, segment):
    node_surface.feed(("raw", data, segment, False))


@_HYPOTHESIS
@given(payload=st.binary(max_size=3000), msg_type=st.sampled_from([4, 5, 6]))
def test_node_udp_any_sealed_plaintext(node_surface, payload, msg_type):
    from flatnet.proto.header import MessageType

    node_surface.feed(("sealed", MessageType(msg_type), payload, len(payload) > 300, False))


@pytest.fixture(scope="module")
def lighthouse_surface():
    surface = SURFACES["lighthouse-control"]()
    surface.setup(random.Random(5))
    yield surface
    surface.teardown()


@_HYPOTHESIS
@given(payload=st.binary(max_size=700))
def test_lighthouse_any_bytes(lighthouse_surface, payload):
    lighthouse_surface.feed((payload, lighthouse_surface.certs[0], ("192.0.2.1", 4242)))


@_HYPOTHESIS
@given(chunks=st.lists(st.binary(max_size=2000), max_size=5))
def test_relay_stream_any_chunks(chunks):
    surface = SURFACES["relay-tcp"]()
    surface.setup(random.Random(5))
    surface.feed(chunks)
    assert not surface.check()


@pytest.fixture(scope="module")
def certificate_surface():
    surface = SURFACES["certificates"]()
    surface.setup(random.Random(5))
    yield surface
    surface.teardown()


@_HYPOTHESIS
@given(data=st.binary(max_size=600))
def test_certificate_any_bytes(certificate_surface, data):
    certificate_surface.feed(data)


@pytest.fixture(scope="module")
def cni_surface():
    surface = SURFACES["cni-stdin"]()
    surface.setup(random.Random(5))
    yield surface
    surface.teardown()


@_HYPOTHESIS
@given(stdin=st.binary(max_size=400), command=st.sampled_from(["ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION", "X"]))
def test_cni_any_stdin(cni_surface, stdin, command):
    cni_surface.feed(({**cni_surface.env, "CNI_COMMAND": command}, stdin))
