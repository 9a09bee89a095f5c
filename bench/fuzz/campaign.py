"""The fuzz loop, its report, and the mutators every surface shares.

A :class:`Surface` has ``setup(rng)``, ``generate(rng) -> input``, ``feed(input)`` (raises only on a
crash: the component's own contract says what bad input may do), ``check() -> [problems]``
(invariants after the run) and ``teardown()``. :func:`run_campaign` counts open file descriptors
before setup and after teardown; a difference is a leak.
"""

from __future__ import annotations

import os
import random
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

INTERESTING_8 = (0, 1, 0x7F, 0x80, 0xFF, 0x10, 0x20, 0x40)
INTERESTING_16 = (0, 1, 0x7FFF, 0x8000, 0xFFFF, 0x100, 0x5DC, 0x3FFF)
INTERESTING_32 = (0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0x10000, 0xFFFF)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class Surface:
    name = "?"
    description = ""

    def setup(self, rng: random.Random) -> None:
        pass

    def generate(self, rng: random.Random) -> Any:
        raise NotImplementedError

    def feed(self, data: Any) -> None:
        raise NotImplementedError

    def check(self) -> list[str]:
        return []

    def teardown(self) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        """Surface-specific figures for the report (e.g. how many inputs got past the AEAD)."""
        return {}


@dataclass
class Report:
    surface: str
    inputs: int
    seconds: float
    crashes: int
    fds_before: int
    fds_after: int
    examples: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.inputs / self.seconds if self.seconds > 0 else 0.0

    @property
    def leaked_fds(self) -> int:
        return self.fds_after - self.fds_before

    @property
    def ok(self) -> bool:
        return self.crashes == 0 and not self.problems and self.leaked_fds <= 0

    def line(self) -> str:
        return (f"{self.surface:<20} {self.inputs:>10,} inputs {self.seconds:8.1f} s {self.rate:>10,.0f}/s "
                f"crashes {self.crashes}  fds {self.fds_before}->{self.fds_after}  "
                f"{'OK' if self.ok else 'FAIL'}")


def run_campaign(surface: Surface, count: int, seed: int = 1, max_examples: int = 5) -> Report:
    rng = random.Random(seed)
    fds_before = open_fds()
    crashes = 0
    examples: list[str] = []
    surface.setup(rng)
    started = time.perf_counter()
    try:
        for _ in range(count):
            data = surface.generate(rng)
            try:
                surface.feed(data)
            except Exception:
                crashes += 1
                if len(examples) < max_examples:
                    examples.append(f"input {data!r:.300}\n{traceback.format_exc()}")
        seconds = time.perf_counter() - started
        problems = surface.check()
        stats = surface.stats()
    finally:
        surface.teardown()
    return Report(surface.name, count, seconds, crashes, fds_before, open_fds(), examples, problems, stats)


# ==== mutators =====================================================================================


def mutate_bytes(data: bytes, rng: random.Random, corpus: list[bytes] | None = None, max_ops: int = 4) -> bytes:
    """A few byte-level edits of *data* (AFL-style havoc): flips, interesting values, inserts,
    deletes, duplicated chunks, truncation, splices with another corpus entry."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, max_ops)):
        op = rng.randrange(11)
        n = len(buf)
        if op == 0 and n:  # flip one bit
            i = rng.randrange(n)
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and n:  # an interesting byte
            buf[rng.randrange(n)] = rng.choice(INTERESTING_8)
        elif op == 2 and n >= 2:  # an interesting 16-bit value, either byte order
            i = rng.randrange(n - 1)
            buf[i : i + 2] = rng.choice(INTERESTING_16).to_bytes(2, rng.choice(("big", "little")))
        elif op == 3 and n >= 4:
            i = rng.randrange(n - 3)
            buf[i : i + 4] = rng.choice(INTERESTING_32).to_bytes(4, rng.choice(("big", "little")))
        elif op == 4:  # insert random bytes
            i = rng.randint(0, n)
            buf[i:i] = rng.randbytes(rng.randint(1, 16))
        elif op == 5 and n:  # delete a range
            i = rng.randrange(n)
            del buf[i : i + rng.randint(1, 16)]
        elif op == 6 and n:  # duplicate a chunk
            i = rng.randrange(n)
            j = min(n, i + rng.randint(1, 32))
            k = rng.randint(0, n)
            buf[k:k] = buf[i:j]
        elif op == 7 and n:  # truncate
            del buf[rng.randrange(n) :]
        elif op == 8:  # append garbage
            buf += rng.randbytes(rng.randint(1, 64))
        elif op == 9 and corpus:  # splice with another input
            other = rng.choice(corpus)
            if other:
                i, j = rng.randint(0, n), rng.randrange(len(other))
                buf = buf[:i] + other[j:]
        elif op == 10 and n:  # a random byte
            buf[rng.randrange(n)] = rng.randrange(256)
    return bytes(buf)


def random_bytes(rng: random.Random, max_len: int = 256) -> bytes:
    return rng.randbytes(rng.choice((0, 1, 2, 4, 8, 16, 32, rng.randint(0, max_len))))


def random_value(rng: random.Random, depth: int = 0) -> Any:
    """A random JSON/msgpack-able value, biased to edge cases."""
    kind = rng.randrange(12 if depth < 2 else 9)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice((True, False))
    if kind == 2:
        return rng.choice((0, -1, 1, 2**31, 2**32, 2**63 - 1, -(2**63), 65535, 65536, rng.randint(-1000, 1000)))
    if kind == 3:
        return rng.choice((0.0, -0.5, 1e308, 3.14))
    if kind == 4:
        return rng.choice(("", "a", "x" * 300, "../../etc/passwd", "\x00", "é", "10.87.1.2", "10.87.1.2:80",
                           "0.0.0.0/0", "ADD", "flatnet", "eth0", "/proc/self/ns/net", "1.0.0"))
    if kind == 5:
        return rng.randbytes(rng.choice((0, 1, 4, 16, 32, 64)))
    if kind == 6:
        return "".join(chr(rng.randrange(32, 0x2FF)) for _ in range(rng.randint(0, 20)))
    if kind == 7:
        return rng.randint(-(2**64), 2**64)
    if kind == 8:
        return str(rng.randint(0, 10**6))
    if kind in (9, 10):
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {str(random_value(rng, depth + 1))[:8]: random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def mutate_structure(value: Any, rng: random.Random, keys_ok: bool = True) -> Any:
    """*value* (decoded JSON/msgpack) with one node replaced, removed, duplicated or retyped."""
    if isinstance(value, dict) and value and rng.random() < 0.8:
        key = rng.choice(list(value))
        out = dict(value)
        op = rng.randrange(5)
        if op == 0:
            del out[key]
        elif op == 1:
            out[key] = random_value(rng)
        elif op == 2 and keys_ok:
            out[random_value(rng) if rng.random() < 0.2 and not isinstance(key, str) else str(random_value(rng))[:12]] = \
                random_value(rng)
        else:
            out[key] = mutate_structure(value[key], rng, keys_ok)
        return out
    if isinstance(value, list) and value and rng.random() < 0.8:
        out = list(value)
        i = rng.randrange(len(out))
        op = rng.randrange(4)
        if op == 0:
            del out[i]
        elif op == 1:
            out.insert(i, random_value(rng))
        elif op == 2:
            out.extend(out[i:] * rng.randint(1, 3))
        else:
            out[i] = mutate_structure(out[i], rng, keys_ok)
        return out
    return random_value(rng)
