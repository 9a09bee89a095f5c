"""`python -m bench.protocol [--seconds S]`: handshakes/s and data packets/s (seal + open, 1400 B).

Every figure is printed beside a baseline measured in the same run, as a ratio:
- Noise IX handshakes: flatnet.proto.noise against the `noiseprotocol` package (if installed);
- full tunnel handshakes (initiation, response, keepalive; certificates verified both ways);
- data: TransportSession.seal + TunnelEngine.open_data, and receive_datagram (with the event),
  against the floor of one bare ChaCha20Poly1305 encrypt + decrypt of the same payload.
One process, one core; each figure is the best of 3 short runs (the machine is shared).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

PAYLOAD_SIZE = 1400


REPEATS = 3


def _rate(fn, seconds: float) -> tuple[float, int]:
    """Operations per second of fn() (which returns how many it did): the best of REPEATS runs of
    seconds/REPEATS each, since the machine is shared and interference only ever slows a run."""
    best, total = 0.0, 0
    for _ in range(REPEATS):
        done, start = 0, time.perf_counter()
        deadline = start + seconds / REPEATS
        while True:
            done += fn()
            now = time.perf_counter()
            if now >= deadline:
                break
        best = max(best, done / (now - start))
        total += done
    return best, total


def bench_noise_ix(seconds: float) -> dict[str, float]:
    from flatnet.proto.noise import HandshakeState, public_bytes  # noqa: F401

    name = "Noise_IX_25519_ChaChaPoly_BLAKE2s"
    i_s, r_s = X25519PrivateKey.generate(), X25519PrivateKey.generate()

    def ours() -> int:
        init = HandshakeState(name, True, b"", s=i_s)
        resp = HandshakeState(name, False, b"", s=r_s)
        resp.read_message(init.write_message(b""))
        init.read_message(resp.write_message(b""))
        return 1

    out = {"flatnet.proto.noise IX": _rate(ours, seconds)[0]}
    try:
        from noise.connection import Keypair, NoiseConnection
    except ImportError:
        return out
    i_raw, r_raw = i_s.private_bytes_raw(), r_s.private_bytes_raw()

    def theirs() -> int:
        init, resp = NoiseConnection.from_name(name.encode()), NoiseConnection.from_name(name.encode())
        init.set_as_initiator()
        resp.set_as_responder()
        init.set_keypair_from_private_bytes(Keypair.STATIC, i_raw)
        resp.set_keypair_from_private_bytes(Keypair.STATIC, r_raw)
        init.start_handshake()
        resp.start_handshake()
        resp.read_message(init.write_message(b""))
        init.read_message(resp.write_message(b""))
        return 1

    out["noiseprotocol 0.3.1 IX"] = _rate(theirs, seconds)[0]
    return out


def _pair():
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.proto.harness import pair

    return pair()


def bench_tunnel_handshake(seconds: float) -> float:
    from flatnet.proto.ratelimit import HandshakeRateLimiter
    from tests.proto.harness import ipv4_packet

    wire, a, b = _pair()
    unlimited = HandshakeRateLimiter(rate=1e9, burst=1e9)
    a.engine._limiter = b.engine._limiter = unlimited
    packet = ipv4_packet("10.87.1.1", "10.87.2.1", b"x")
    peer_a = a.engine._peers[next(iter(a.engine._peers))]
    peer_b = b.engine._peers[next(iter(b.engine._peers))]

    def one() -> int:
        a.engine._begin_handshake(peer_a, wire.now)
        [(init, _)] = a.engine.datagrams_to_send()
        wire.now += 0.001  # initiation timestamps must grow
        b.engine.receive_datagram(init, a.addr, wire.now)
        [(resp, _)] = b.engine.datagrams_to_send()
        a.engine.receive_datagram(resp, b.addr, wire.now)
        [(keepalive, _)] = a.engine.datagrams_to_send()
        b.engine.receive_datagram(keepalive, a.addr, wire.now)
        assert peer_b.current.remote_index == peer_a.current.local_index
        while a.engine.next_event() or b.engine.next_event():
            pass
        return 1

    a.engine.send_packet(packet, wire.now)
    wire.run()
    return _rate(one, seconds)[0]


def bench_data(seconds: float) -> dict[str, float]:
    from flatnet.proto.header import MessageType
    from tests.proto.harness import ipv4_packet

    wire, a, b = _pair()
    a.engine.send_packet(ipv4_packet("10.87.1.1", "10.87.2.1", b"x"), wire.now)
    wire.run()
    session = a.engine.session_for("10.87.2.1", wire.now)
    payload = ipv4_packet("10.87.1.1", "10.87.2.1", bytes(PAYLOAD_SIZE - 20))
    now, addr = wire.now, a.addr
    seal, open_data, receive, drain = session.seal, b.engine.open_data, b.engine.receive_datagram, b.engine.next_event
    DATA = MessageType.DATA

    def seal_open() -> int:
        for _ in range(100):
            if open_data(seal(payload, DATA, now), addr, now) is None:
                raise AssertionError("did not open")
        return 100

    def seal_receive() -> int:
        for _ in range(100):
            receive(seal(payload, DATA, now), addr, now)
            if drain() is None:
                raise AssertionError("no event")
        return 100

    key = ChaCha20Poly1305.generate_key()
    aead = ChaCha20Poly1305(key)
    header = bytes(16)
    counter = [0]

    def floor() -> int:
        for _ in range(100):
            c = counter[0] = counter[0] + 1
            nonce = b"\0\0\0\0" + c.to_bytes(8, "little")
            aead.decrypt(nonce, aead.encrypt(nonce, payload, header), header)
        return 100

    a.engine.datagrams_to_send()
    return {
        "bare ChaCha20Poly1305 encrypt+decrypt (floor)": _rate(floor, seconds)[0],
        "session.seal + engine.open_data": _rate(seal_open, seconds)[0],
        "session.seal + receive_datagram + event": _rate(seal_receive, seconds)[0],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.protocol", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=1.5, help="time per figure (default 1.5)")
    args = parser.parse_args(argv)
    random.seed(1)

    print(f"flatnet protocol benchmark — one process, {args.seconds:g} s per figure\n")
    print("Handshakes")
    noise = bench_noise_ix(args.seconds)
    base = noise.get("noiseprotocol 0.3.1 IX")
    for label, rate in noise.items():
        ratio = f"  ({rate / base:.2f}x noiseprotocol)" if base else ""
        print(f"  {label:<48} {rate:>10,.0f} /s{ratio}")
    tunnel = bench_tunnel_handshake(args.seconds)
    ours = noise["flatnet.proto.noise IX"]
    print(f"  {'tunnel handshake (IX + certs + keepalive)':<48} {tunnel:>10,.0f} /s  ({tunnel / ours:.2f}x bare Noise IX)")

    print(f"\nData packets, {PAYLOAD_SIZE}-byte payload (encrypt + decrypt each)")
    data = bench_data(args.seconds)
    floor = data["bare ChaCha20Poly1305 encrypt+decrypt (floor)"]
    for label, rate in data.items():
        gbit = rate * PAYLOAD_SIZE * 8 / 1e9
        print(f"  {label:<48} {rate:>10,.0f} /s  {1e6 / rate:6.2f} us  {gbit:5.2f} Gbit/s  ({rate / floor:.2f}x floor)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
