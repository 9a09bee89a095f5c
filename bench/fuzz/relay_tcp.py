"""Relay over TCP: what anyone who can open a TCP connection to a relay can send.

A connection's bytes go through :class:`flatnet.proto.relay.StreamFrameDecoder`; each frame to
:meth:`lighthouse.relay_table.RelayTable.receive`. Inputs: streams of valid frames (BIND with a real
token, DATA), mutated, and random bytes, cut into random chunks as TCP delivers them. Contract: the
decoder raises only ``RelayFrameError`` (the service then closes the connection), never buffers more
than one frame, and the table never raises and stays within ``max_sessions``.
"""

from __future__ import annotations

import random

from bench.fuzz.campaign import Surface, mutate_bytes, random_bytes
from flatnet.proto import relay as R
from lighthouse.relay_table import RelayLimits, RelayTable

SECRET = b"relay-secret-for-fuzzing-000000"


class RelayTcpSurface(Surface):
    name = "relay-tcp"
    description = "StreamFrameDecoder + RelayTable.receive"

    def setup(self, rng: random.Random) -> None:
        self.limits = RelayLimits(max_sessions=8, idle_timeout=5.0)
        self.table = RelayTable(SECRET, self.limits)
        self.now = 1_800_000_000.0
        self.connections = 0
        self.frames = 0
        self.closed = 0
        sessions = [bytes([n]) * R.SESSION_ID_SIZE for n in range(12)]
        self.seeds = []
        for sid in sessions:
            for side in (0, 1):
                token = R.mint_relay_token(SECRET, sid, side)
                self.seeds.append(R.encode_stream_frame(R.encode_relay_frame(R.TYPE_BIND, side, sid, token)))
                self.seeds.append(R.encode_stream_frame(R.encode_relay_frame(R.TYPE_DATA, side, sid, b"x" * 100)))
        self.seeds.append(R.encode_stream_frame(R.encode_relay_frame(R.TYPE_BIND_ACK, 0, sessions[0])))

    def generate(self, rng: random.Random):
        stream = b"".join(rng.choice(self.seeds) for _ in range(rng.randint(1, 6)))
        r = rng.random()
        if r < 0.5:
            stream = mutate_bytes(stream, rng, self.seeds)
        elif r < 0.6:
            stream = random_bytes(rng, 3000)
        cuts = sorted(rng.randrange(len(stream) + 1) for _ in range(rng.randint(0, 4)))
        chunks, at = [], 0
        for cut in cuts + [len(stream)]:
            chunks.append(stream[at:cut])
            at = cut
        return chunks

    def feed(self, chunks) -> None:
        self.connections += 1
        conn = ("tcp", self.connections % 16)
        decoder = R.StreamFrameDecoder()
        self.now += 0.05
        try:
            for chunk in chunks:
                for frame in decoder.feed(chunk):
                    self.frames += 1
                    self.table.receive(frame, conn, self.now)
                if decoder.buffered > R.MAX_RELAY_FRAME + R.STREAM_LENGTH_SIZE:
                    raise AssertionError(f"decoder buffers {decoder.buffered} bytes")
        except R.RelayFrameError:
            self.closed += 1  # the contract: the service closes this connection
        self.table.forget_address(conn)
        if self.connections % 100 == 0:
            self.table.tick(self.now)

    def check(self) -> list[str]:
        problems = []
        if len(self.table) > self.limits.max_sessions:
            problems.append(f"{len(self.table)} relay sessions > {self.limits.max_sessions}")
        self.table.tick(self.now + 3600)
        if len(self.table):
            problems.append("idle relay sessions outlived idle_timeout")
        return problems

    def stats(self) -> dict:
        return {"frames": self.frames, "closed_connections": self.closed,
                "top_counters": dict(self.table.counters.most_common(8))}
