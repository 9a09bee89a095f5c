"""A TCP stream through the tunnel for the NAT lab: ``serve HOST PORT`` accepts one connection and
prints the byte count and SHA-256 of what it read; ``send HOST PORT BYTES SECONDS`` sends BYTES of
pseudo-random data spread over SECONDS and prints the same. Equal lines = the data arrived intact."""

from __future__ import annotations

import hashlib
import random
import socket
import sys
import time


def serve(host: str, port: int) -> None:
    with socket.create_server((host, port)) as server:
        print("listening", flush=True)
        server.settimeout(120)
        conn, _ = server.accept()
        digest, count = hashlib.sha256(), 0
        with conn:
            conn.settimeout(120)
            while chunk := conn.recv(65536):
                digest.update(chunk)
                count += len(chunk)
            print(f"{count} {digest.hexdigest()}", flush=True)


def send(host: str, port: int, total: int, seconds: float) -> None:
    rng = random.Random(7)
    digest, sent = hashlib.sha256(), 0
    chunk_size = 16384
    chunks = max(1, total // chunk_size)
    with socket.create_connection((host, port), timeout=120) as conn:
        start = time.monotonic()
        for i in range(chunks):
            data = rng.randbytes(chunk_size)
            conn.sendall(data)
            digest.update(data)
            sent += len(data)
            delay = start + seconds * (i + 1) / chunks - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1)
    print(f"{sent} {digest.hexdigest()}", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]))
    else:
        send(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]))
