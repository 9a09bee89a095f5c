"""bench/udp_recv: receive CPU per datagram of DatagramEndpoint.recv, recvmsg vs recvmmsg, on loopback.

    .venv/bin/python -m bench.udp_recv [--datagrams 100000] [--batches 0,32] [--repeats 3]

Each case sends ~1400-byte datagrams from another process to an endpoint on 127.0.0.1 and times
the receiving thread (``time.thread_time``: user + kernel CPU of the reads, no waiting) over a
loop shaped like ``DataplaneIO.read_udp`` (``recv()`` until None). Two ways of arriving:

* ``prefilled``: the sender fills the socket buffer (a few thousand datagrams), then the receiver
  drains it: every read finds data waiting, as when the node is the bottleneck.
* ``streaming``: the sender blasts while the receiver reads, waking on ``select``: batches are as
  big as what piled up since the last wakeup (on a 2-core machine, small).

Three kinds: ``plain`` (one datagram per read, UDP_GRO off), ``gro-plain`` (UDP_GRO on, datagrams
sent one by one: still one per read, the 1%-loss benchmark's case), ``gro-train`` (UDP_GRO on,
UDP_SEGMENT sends of 16 segments: loopback hands each train over whole; a batched endpoint reads
trains with recvmsg after the first, so this shows that switch costs nothing). ``--batches`` lists
the recv_batch values to compare (0 = one recvmsg per datagram). Prints the median µs per datagram
and each run's figure; cases run interleaved, so a change in the machine's load hits all alike.
"""

from __future__ import annotations

import argparse
import multiprocessing
import select
import statistics
import time

from flatnet.node.udp import RECV_BATCH, DatagramEndpoint

PAYLOAD = 1400
TRAIN = 16
KINDS = {"plain": (False, 0), "gro-plain": (True, 0), "gro-train": (True, TRAIN)}


def _send(target, count: int, segment: int, go, stop, sent_all) -> None:
    """Sends ``count`` datagrams (in UDP_SEGMENT trains of TRAIN if ``segment``) each time ``go`` is set."""
    sender = DatagramEndpoint("127.0.0.1", 0, gro=False, recv_batch=0)
    one = (bytes(range(256)) * 6)[:PAYLOAD]
    buffer, per_send = (one * TRAIN, TRAIN) if segment else (one, 1)
    try:
        while True:
            go.wait()
            go.clear()
            if stop.is_set():
                return
            sent = 0
            while sent < count:
                if sender.send(buffer, target, segment):
                    sent += per_send
                else:
                    select.select([], [sender], [], 0.1)
            sent_all.set()
    finally:
        sender.close()


def drain(endpoint: DatagramEndpoint) -> int:
    recv, n = endpoint.recv, 0
    while True:
        got = recv()
        if got is None:
            return n
        n += (len(got[0]) + got[2] - 1) // got[2] if got[2] else 1


def run_case(kind: str, batch: int, mode: str, datagrams: int) -> float:
    gro, segment = KINDS[kind]
    receiver = DatagramEndpoint("127.0.0.1", 0, gro=gro, recv_batch=batch)
    if batch and not receiver.batched:
        raise SystemExit("recvmmsg is not available here")
    context = multiprocessing.get_context("fork")
    go, stop, sent_all = context.Event(), context.Event(), context.Event()
    per_round = 2000 if mode == "prefilled" else datagrams
    sender = context.Process(
        target=_send, args=(receiver.address, per_round, segment and PAYLOAD, go, stop, sent_all)
    )
    sender.start()
    cpu, got = 0.0, 0
    try:
        while got < datagrams:
            sent_all.clear()
            go.set()
            if mode == "prefilled":
                sent_all.wait(30)
                time.sleep(0.01)  # loopback delivery is synchronous with the send, but be sure
                start = time.thread_time()
                got += drain(receiver)
                cpu += time.thread_time() - start
            else:  # streaming: one round of all the datagrams
                while not sent_all.is_set() or select.select([receiver], [], [], 0)[0]:
                    if not select.select([receiver], [], [], 0.05)[0]:
                        continue
                    start = time.thread_time()
                    got += drain(receiver)
                    cpu += time.thread_time() - start
                if got == 0:
                    raise SystemExit("nothing received")
    finally:
        stop.set()
        go.set()
        sender.join(10)
        receiver.close()
    return cpu / got * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.udp_recv")
    parser.add_argument("--datagrams", type=int, default=100_000, help="per case and repeat")
    parser.add_argument("--batches", default=f"0,{RECV_BATCH}", help="recv_batch values (0: recvmsg)")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--modes", default="prefilled,streaming")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    print(
        f"{'mode':<10} {'kind':<10} "
        + " ".join(f"{('recvmsg' if b == 0 else f'mmsg/{b}'):>10}" for b in batches)
        + "   µs CPU per datagram, median of runs"
    )
    for mode in args.modes.split(","):
        for kind in args.kinds.split(","):
            runs: dict[int, list[float]] = {b: [] for b in batches}
            for _ in range(args.repeats):
                for b in batches:
                    runs[b].append(run_case(kind, b, mode, args.datagrams))
            medians = [statistics.median(runs[b]) for b in batches]
            print(
                f"{mode:<10} {kind:<10} "
                + " ".join(f"{m:>10.3f}" for m in medians)
                + "   "
                + "  ".join("[" + ", ".join(f"{x:.2f}" for x in runs[b]) + "]" for b in batches)
            )


if __name__ == "__main__":
    main()
