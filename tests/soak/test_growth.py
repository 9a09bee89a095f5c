"""bench.soak's growth detector on synthetic samples: flat, noisy, leaking, warm-up, too short."""

import random

from bench.soak.growth import count_verdict, rss_verdict, slope

MIB = 2**20
HOUR = 3600.0
SLOPE_LIMIT = 8 * MIB  # per hour
MIN_GROWTH = 4 * MIB


def series(values, step=5.0):
    return [(i * step, v) for i, v in enumerate(values)]


def test_slope_of_a_line():
    assert abs(slope(series([10 + 2 * i for i in range(20)], step=1.0)) - 2.0) < 1e-9
    assert slope([(0.0, 5.0)]) == 0.0


def test_flat_rss_with_noise_passes():
    rng = random.Random(7)
    samples = series([50 * MIB + rng.randint(-MIB, MIB) for _ in range(720)])  # 1 h, ±1 MiB
    verdict = rss_verdict(samples, 120, SLOPE_LIMIT, MIN_GROWTH)
    assert verdict.ok, verdict.detail


def test_steady_rss_leak_fails():
    samples = series([50 * MIB + i * 0.1 * MIB for i in range(720)])  # 72 MiB in an hour
    verdict = rss_verdict(samples, 120, SLOPE_LIMIT, MIN_GROWTH)
    assert not verdict.ok
    assert verdict.slope_per_hour > 60 * MIB


def test_warmup_growth_is_ignored():
    # climbs 24 MiB during the first 2 minutes, then flat
    values = [10 * MIB + i * MIB for i in range(24)] + [34 * MIB] * 36  # 5 minutes
    assert not rss_verdict(series(values), 0, SLOPE_LIMIT, MIN_GROWTH).ok
    assert rss_verdict(series(values), 120, SLOPE_LIMIT, MIN_GROWTH).ok


def test_steep_but_tiny_growth_in_a_short_run_passes():
    # +1 MiB over 10 minutes: 6 MiB/h projected would exceed a 4 MiB/h limit, but 1 MiB is noise
    samples = series([50 * MIB + i * MIB / 120 for i in range(120)])
    assert rss_verdict(samples, 0, 4 * MIB, MIN_GROWTH).ok


def test_too_few_samples_is_no_verdict():
    verdict = rss_verdict(series([1, 2, 3]), 0, SLOPE_LIMIT, MIN_GROWTH)
    assert verdict.ok and "too few" in verdict.detail


def test_fds_that_come_back_down_pass():
    values = [16, 17, 16, 20, 16, 18, 16] * 40  # a scrape or a CNI call opens a few, then closes them
    assert count_verdict(series(values), 0, 4).ok


def test_fd_staircase_fails():
    values = [16 + i // 10 for i in range(300)]  # one more fd every 50 s, never closed
    verdict = count_verdict(series(values), 0, 4)
    assert not verdict.ok
    assert "grows" in verdict.detail


def test_fd_step_within_tolerance_passes():
    values = [16] * 100 + [19] * 100  # a new listener once: not a leak
    assert count_verdict(series(values), 0, 4).ok
