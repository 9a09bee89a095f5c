"""Does a resource grow? Pure functions on ``(seconds, value)`` samples (bench/soak and its test).

A long-running process may move around a lot in its first minutes (imports, caches, the first
handshakes, the allocator finding its size), so everything here ignores the samples before
*warmup* seconds. After that:

- **RSS**: the least-squares slope, scaled to an hour, must stay under ``slope_limit`` *or* the
  growth from the first to the last quarter (medians, so one burst does not count) must stay
  under ``min_growth``. Both must be exceeded to fail: a short run's slope is mostly noise, a long
  run's small absolute growth is the allocator settling.
- **fds, threads**: growing means the lowest value of the last quarter is above the highest value
  of the first quarter by more than ``tolerance`` — a count that goes up and comes back down (a
  scrape, a CNI call) is not a leak; a staircase that never returns is.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

Sample = tuple[float, float]  # (seconds since the start, value)

MIN_SAMPLES = 8  # fewer after warm-up: no verdict (too short to tell), reported as such


@dataclass(frozen=True)
class Verdict:
    ok: bool
    detail: str
    first: float | None = None  # median of the first quarter after warm-up
    last: float | None = None  # median of the last quarter
    slope_per_hour: float | None = None


def slope(samples: Sequence[Sample]) -> float:
    """Least-squares slope (value per second); 0 for fewer than two distinct times."""
    if len(samples) < 2:
        return 0.0
    mean_t = statistics.fmean(t for t, _ in samples)
    mean_v = statistics.fmean(v for _, v in samples)
    den = sum((t - mean_t) ** 2 for t, _ in samples)
    if den == 0:
        return 0.0
    return sum((t - mean_t) * (v - mean_v) for t, v in samples) / den


def _quarters(samples: Sequence[Sample]) -> tuple[list[float], list[float]]:
    n = max(1, len(samples) // 4)
    return [v for _, v in samples[:n]], [v for _, v in samples[-n:]]


def after_warmup(samples: Sequence[Sample], warmup: float) -> list[Sample]:
    return sorted(s for s in samples if s[0] >= warmup)


def rss_verdict(samples: Sequence[Sample], warmup: float, slope_limit: float, min_growth: float) -> Verdict:
    """*samples* in bytes; *slope_limit* in bytes per hour; *min_growth* in bytes."""
    kept = after_warmup(samples, warmup)
    if len(kept) < MIN_SAMPLES:
        return Verdict(True, f"too few samples after warm-up ({len(kept)}): no verdict")
    head, tail = _quarters(kept)
    first, last = statistics.median(head), statistics.median(tail)
    per_hour = slope(kept) * 3600
    growth = last - first
    ok = not (per_hour > slope_limit and growth > min_growth)
    detail = f"{first / 2**20:.1f} -> {last / 2**20:.1f} MiB, slope {per_hour / 2**20:+.2f} MiB/h"
    if not ok:
        detail += f" (limits: {slope_limit / 2**20:.1f} MiB/h and {min_growth / 2**20:.1f} MiB)"
    return Verdict(ok, detail, first, last, per_hour)


def count_verdict(samples: Sequence[Sample], warmup: float, tolerance: float) -> Verdict:
    """fds or threads: fails when the last quarter never comes back down to the first quarter's range."""
    kept = after_warmup(samples, warmup)
    if len(kept) < MIN_SAMPLES:
        return Verdict(True, f"too few samples after warm-up ({len(kept)}): no verdict")
    head, tail = _quarters(kept)
    ok = min(tail) <= max(head) + tolerance
    per_hour = slope(kept) * 3600
    detail = f"{statistics.median(head):g} -> {statistics.median(tail):g} (range {min(v for _, v in kept):g}..{max(v for _, v in kept):g})"
    if not ok:
        detail += f": grows, last quarter's lowest {min(tail):g} > first quarter's highest {max(head):g} + {tolerance:g}"
    return Verdict(ok, detail, statistics.median(head), statistics.median(tail), per_hour)
