"""The underlay UDP socket: GSO on send (UDP_SEGMENT), GRO on receive (UDP_GRO), never blocking.

One ``sendmsg`` with a ``UDP_SEGMENT`` control message sends a buffer of equal-sized datagrams
(all but the last): the kernel cuts it, on the wire they are ordinary datagrams. With ``UDP_GRO``
set, the kernel may hand several datagrams of one flow back as one buffer, with their size in a
control message: :meth:`DatagramEndpoint.recv` returns it as ``segment_size``.
"""

from __future__ import annotations

import errno
import socket
import struct

SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
RECV_SIZE = 65535 + 1024
SOCKET_BUFFER = 8 * 1024 * 1024
SO_SNDBUFFORCE = 32  # <asm-generic/socket.h>; Python's socket module lacks the *FORCE names
SO_RCVBUFFORCE = 33
_CMSG_SPACE = socket.CMSG_SPACE(4)
_U16 = struct.Struct("=H")


class DatagramEndpoint:
    def __init__(self, host: str = "0.0.0.0", port: int = 0, gro: bool = True) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self.sock.setblocking(False)
            for option, fallback in ((SO_RCVBUFFORCE, socket.SO_RCVBUF), (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
                try:
                    self.sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
                except OSError:
                    self.sock.setsockopt(socket.SOL_SOCKET, fallback, SOCKET_BUFFER)
            self.gro = False
            if gro:
                try:
                    self.sock.setsockopt(SOL_UDP, UDP_GRO, 1)
                    self.gro = True
                except OSError:
                    pass
            self.sock.bind((host, port))
        except OSError:
            self.sock.close()
            raise
        self.address = self.sock.getsockname()

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv(self):
        """(data, addr, segment_size) or None when nothing is waiting; segment_size 0 if not coalesced."""
        try:
            data, ancdata, _flags, addr = self.sock.recvmsg(RECV_SIZE, _CMSG_SPACE)
        except BlockingIOError:
            return None
        except ConnectionRefusedError:
            return b"", None, 0  # an ICMP error for an earlier send; nothing to read
        segment = 0
        for level, kind, value in ancdata:
            if level == SOL_UDP and kind == UDP_GRO and len(value) >= 2:
                segment = _U16.unpack_from(value)[0] if len(value) < 4 else struct.unpack_from("=i", value)[0]
        return data, addr, segment

    def send(self, buffer, addr, segment_size: int = 0) -> bool:
        """False if the socket buffer is full (the caller waits for writability and retries)."""
        try:
            if segment_size and len(buffer) > segment_size:
                self.sock.sendmsg([buffer], [(SOL_UDP, UDP_SEGMENT, _U16.pack(segment_size))], 0, addr)
            else:
                self.sock.sendto(buffer, addr)
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EMSGSIZE):
                return True  # the datagram is lost, as on a wire; TCP inside recovers
            raise
        return True

    def close(self) -> None:
        self.sock.close()
