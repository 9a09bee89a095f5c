"""In-memory twin of flatnet.node.tun.TunDevice: frames (virtio-net header + IP packet) in and out."""

from __future__ import annotations

from collections import deque


class TunTwin:
    """What the kernel would hand the node is put in with :meth:`inject`; writes land in :attr:`written`."""

    def __init__(self, name: str = "tun-twin", mtu: int = 1440) -> None:
        self.name = name
        self.mtu = mtu
        self.inbox: deque = deque()
        self.written: list[bytes] = []
        self.closed = False

    def inject(self, frame: bytes) -> None:
        self.inbox.append(bytes(frame))

    def read(self) -> bytes | None:
        return self.inbox.popleft() if self.inbox else None

    def write(self, frame) -> None:
        if self.closed:
            raise OSError("TUN twin closed")
        self.written.append(bytes(frame))

    def close(self) -> None:
        self.closed = True
