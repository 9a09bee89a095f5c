"""In-memory twin of flatnet.node.udp.DatagramEndpoint, and a tiny network joining several.

A GSO send (segment_size > 0) is cut into datagrams as the kernel would; the network may drop,
reorder or tamper with single datagrams (``impair``), then the receiving endpoint gets them one by
one (no GRO), which exercises the fragment reassembly the real GRO path skips when all is well.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable


class UdpNetwork:
    def __init__(self, impair: Callable[[bytes, tuple, tuple], list[bytes]] | None = None, gro: bool = False) -> None:
        self.endpoints: dict[tuple, UdpTwin] = {}
        self.impair = impair
        self.gro = gro  # hand a GSO send over whole, as the kernel does between a veth's ends with UDP_GRO
        self.sent_datagrams = 0

    def endpoint(self, addr: tuple[str, int]) -> UdpTwin:
        twin = UdpTwin(self, addr)
        self.endpoints[addr] = twin
        return twin

    def carry(self, datagram: bytes, src: tuple, dst: tuple) -> None:
        self.sent_datagrams += 1
        target = self.endpoints.get(tuple(dst))
        if target is None:
            return
        delivered = self.impair(datagram, src, dst) if self.impair else [datagram]
        for d in delivered:
            target.inbox.append((d, src, 0))


class UdpTwin:
    def __init__(self, network: UdpNetwork, addr: tuple[str, int]) -> None:
        self.network = network
        self.addr = addr
        self.inbox: deque = deque()
        self.closed = False

    def recv(self):
        """(data, addr, segment_size) or None when nothing is waiting."""
        return self.inbox.popleft() if self.inbox else None

    recv_lone = recv  # one datagram likely (after a quiet spell): the same here

    # Read-ahead held outside the "socket": none (the inbox is the socket; pump() reads it again).
    pending = 0

    def send(self, buffer, addr, segment_size: int = 0) -> bool:
        """Always True: the twin's socket buffer never fills."""
        data = bytes(buffer)
        if segment_size and self.network.gro and self.network.impair is None:
            target = self.network.endpoints.get(tuple(addr))
            self.network.sent_datagrams += -(-len(data) // segment_size)
            if target is not None:
                target.inbox.append((data, self.addr, segment_size))
        elif segment_size:
            for at in range(0, len(data), segment_size):
                self.network.carry(data[at : at + segment_size], self.addr, addr)
        else:
            self.network.carry(data, self.addr, addr)
        return True

    def close(self) -> None:
        self.closed = True
