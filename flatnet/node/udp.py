"""The underlay UDP socket: GSO on send (UDP_SEGMENT), GRO on receive (UDP_GRO), never blocking.

One ``sendmsg`` with a ``UDP_SEGMENT`` control message sends a buffer of equal-sized datagrams
(all but the last): the kernel cuts it, on the wire they are ordinary datagrams. With ``UDP_GRO``
set, the kernel may hand several datagrams of one flow back as one buffer, with their size in a
control message: :meth:`DatagramEndpoint.recv` returns it as ``segment_size``.

Batched receive (``recv_batch`` > 0). Python's socket module has no ``recvmmsg(2)``: a
:class:`BatchReceiver` calls libc's through ``ctypes`` into buffers allocated once (an ``mmsghdr``
array, a 64 KB slot per message so that a GRO train always fits, source addresses, control
buffers), and :meth:`DatagramEndpoint.recv` hands the messages out one per call, each copied out as
its own ``bytes`` (the slots are reused by the next call). That saves a syscall and a 64 KB
allocation per datagram when datagrams come one by one, and the read that would block after a
batch that came back short. A GRO train
is already one syscall for many datagrams, and copying it out of a slot cost more than
``recvmsg`` writing it straight into the ``bytes`` it returns: after a read that brought a train,
the endpoint reads with ``recvmsg`` until a single datagram comes again. Measured in
``docs/dataplane.md`` (Inbound, step 1); ``bench/udp_recv`` measures it.

Batched, messages can wait in the endpoint where the socket's readiness does not show them
(:attr:`DatagramEndpoint.pending`): a caller that stops calling ``recv()`` before None must come
back without waiting for the fd.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import socket
import struct
import sys

SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
RECV_SIZE = 65535 + 1024
SOCKET_BUFFER = 8 * 1024 * 1024
SO_SNDBUFFORCE = 32  # <asm-generic/socket.h>; Python's socket module lacks the *FORCE names
SO_RCVBUFFORCE = 33
MSG_CTRUNC = 0x08  # <bits/socket.h>: control data cut (a train's segment size would be lost)
MSG_TRUNC = 0x20  # the datagram was longer than the buffer
MSG_DONTWAIT = 0x40
RECV_BATCH = 32  # messages per recvmmsg when batching (measured: docs/dataplane.md, Inbound step 1)
ADDRESS_CACHE = 4096  # source addresses remembered as tuples (peers and relays are few)
_CMSG_SPACE = socket.CMSG_SPACE(4)
_U16 = struct.Struct("=H")
_I32 = struct.Struct("=i")


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):  # struct msghdr, <bits/socket.h>
    _fields_ = [
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.c_void_p),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    ]


class _MMsgHdr(ctypes.Structure):  # struct mmsghdr
    _fields_ = [("msg_hdr", _MsgHdr), ("msg_len", ctypes.c_uint)]


class _SockAddrIn(ctypes.Structure):  # struct sockaddr_in, <netinet/in.h>
    _fields_ = [
        ("sin_family", ctypes.c_ushort),
        ("sin_port", ctypes.c_uint16),  # network order
        ("sin_addr", ctypes.c_uint8 * 4),
        ("sin_zero", ctypes.c_uint8 * 8),
    ]


# What the kernel writes back into one mmsghdr, read with struct rather than ctypes attributes:
#
#   0        8           12    16        24           32            40               48          52    56        60
#   msg_name | msg_namelen | pad | msg_iov | msg_iovlen | msg_control | msg_controllen | msg_flags | pad | msg_len | pad
#
# (LP64; other layouts get no batching, see _LAYOUT_OK). A sockaddr_in's first 8 bytes (family,
# port, address) read as one integer are the key of the source-address cache.
_MMSG_RESULT = struct.Struct("=40xQi4xI4x")  # msg_controllen, msg_flags, msg_len
_SOCKADDR_KEY = struct.Struct("=Q8x")
_CMSG_HEADER = struct.Struct("=Qii")  # cmsg_len, cmsg_level, cmsg_type
_LAYOUT_OK = (
    ctypes.sizeof(ctypes.c_void_p) == 8
    and ctypes.sizeof(_MMsgHdr) == _MMSG_RESULT.size
    and _MsgHdr.msg_controllen.offset == 40
    and _MsgHdr.msg_flags.offset == 48
    and _MMsgHdr.msg_len.offset == 56
    and ctypes.sizeof(_SockAddrIn) == _SOCKADDR_KEY.size
    and _CMSG_HEADER.size == socket.CMSG_LEN(0)
)

_recvmmsg = None  # libc's recvmmsg once looked up; False where it cannot be used


def load_recvmmsg():
    """libc's ``recvmmsg`` as a ctypes function, or None (not Linux, not LP64, no such symbol)."""
    global _recvmmsg
    if _recvmmsg is None:
        _recvmmsg = False
        if sys.platform.startswith("linux") and _LAYOUT_OK:
            try:
                # No argtypes: converting through them cost 1.1 µs a call (of 1.6). The arguments
                # are ints that fit a C int, the mmsghdr array (passed as its address) and None.
                _recvmmsg = ctypes.CDLL(None, use_errno=True).recvmmsg
            except (OSError, AttributeError):
                pass
    return _recvmmsg or None


class BatchReceiver:
    """Up to ``vlen`` datagrams (or GRO trains) of one socket per ``recvmmsg``.

    :meth:`receive` returns what one call brought, as ``[(data, addr, segment_size), ...]``
    *last first* (to be handed out with ``pop()``), each ``data`` an independent ``bytes``; None
    when nothing is waiting. It raises OSError as the socket module would (ConnectionRefusedError
    for an ICMP error of an earlier send). Messages the kernel cut (longer than ``slot_size``, or
    their control data cut) are dropped and counted in :attr:`truncated`.
    """

    def __init__(self, fd: int, vlen: int, slot_size: int = RECV_SIZE) -> None:
        function = load_recvmmsg()
        if function is None:
            raise OSError(errno.ENOSYS, "recvmmsg is not available")
        if vlen < 1:
            raise ValueError(f"vlen must be at least 1, not {vlen}")
        self.fd = fd
        self.vlen = vlen
        self.slot_size = slot_size
        self.truncated = 0
        self.full = False  # the last call filled every slot: more may be waiting
        self.trains = False  # the last call brought a GRO train
        self._recvmmsg = function
        # Anonymous memory, so only the pages the kernel writes become resident (a datagram
        # touches the first page of its 64 KB slot).
        self._slots = mmap.mmap(-1, vlen * slot_size)
        self._names = (_SockAddrIn * vlen)()
        self._control = ctypes.create_string_buffer(vlen * _CMSG_SPACE)
        self._iovecs = (_IoVec * vlen)()
        self._headers = (_MMsgHdr * vlen)()
        slots = ctypes.addressof(ctypes.c_char.from_buffer(self._slots))
        names, control = ctypes.addressof(self._names), ctypes.addressof(self._control)
        for i in range(vlen):
            self._iovecs[i].iov_base = slots + i * slot_size
            self._iovecs[i].iov_len = slot_size
            hdr = self._headers[i].msg_hdr
            hdr.msg_name = names + i * ctypes.sizeof(_SockAddrIn)
            hdr.msg_namelen = ctypes.sizeof(_SockAddrIn)
            hdr.msg_iov = ctypes.addressof(self._iovecs[i])
            hdr.msg_iovlen = 1
            hdr.msg_control = control + i * _CMSG_SPACE
            hdr.msg_controllen = _CMSG_SPACE
        self._headers_view = memoryview(self._headers).cast("B")
        # The kernel overwrites msg_namelen, msg_controllen and msg_flags of each message it
        # fills; the used headers are put back from this copy before the next call.
        self._pristine = bytes(self._headers_view)
        self._used = 0
        self._slots_view = memoryview(self._slots)
        self._names_view = memoryview(self._names).cast("B")
        self._control_view = memoryview(self._control).cast("B")
        self._addresses: dict[int, tuple[str, int]] = {}
        self._starts = [i * slot_size for i in range(vlen)]
        # One unpack per call, not per message: (controllen, flags, length) * n and key * n.
        self._results = [struct.Struct("=" + _MMSG_RESULT.format[1:] * n) for n in range(vlen + 1)]
        self._keys = [struct.Struct("=" + _SOCKADDR_KEY.format[1:] * n) for n in range(vlen + 1)]

    def receive(self) -> list | None:
        if self._used:
            end = self._used * _MMSG_RESULT.size
            self._headers_view[:end] = self._pristine[:end]
            self._used = 0
        while True:
            count = self._recvmmsg(self.fd, self._headers, self.vlen, MSG_DONTWAIT, None)
            if count > 0:
                break
            code = ctypes.get_errno() if count < 0 else errno.EAGAIN
            if code == errno.EINTR:
                continue
            self.full = self.trains = False
            if code in (errno.EAGAIN, errno.EWOULDBLOCK):
                return None
            raise OSError(code, os.strerror(code))
        self._used = count
        self.full = count == self.vlen
        data, addresses = self._slots_view, self._addresses
        results = self._results[count].unpack_from(self._headers_view)
        keys = self._keys[count].unpack_from(self._names_view)
        starts, lengths = self._starts[count - 1 :: -1], results[-1::-3]  # last first
        if not any(results[0::3]) and not any(results[1::3]) and keys.count(keys[0]) == count:
            # The usual case: datagrams one by one from one source, no control data, none cut.
            self.trains = False
            addr = addresses.get(keys[0]) or self._address(0, keys[0])
            return [
                (data[start : start + length].tobytes(), addr, 0)
                for start, length in zip(starts, lengths, strict=True)
            ]
        out = []
        trains = False
        for start, key, controllen, flags, length in zip(
            starts, keys[::-1], results[-3::-3], results[-2::-3], lengths, strict=True
        ):
            if flags & (MSG_TRUNC | MSG_CTRUNC):
                self.truncated += 1
                continue
            i = start // self.slot_size
            addr = addresses.get(key) or self._address(i, key)
            segment = self._segment_size(i, controllen) if controllen else 0
            trains = trains or segment != 0
            out.append((data[start : start + length].tobytes(), addr, segment))
        self.trains = trains
        return out

    def _address(self, i: int, key: int) -> tuple[str, int]:
        name = self._names[i]
        if name.sin_family != socket.AF_INET:
            raise OSError(errno.EAFNOSUPPORT, "recvmmsg: not an IPv4 source address")
        addr = (socket.inet_ntoa(bytes(name.sin_addr)), socket.ntohs(name.sin_port))
        if len(self._addresses) >= ADDRESS_CACHE:
            self._addresses.clear()  # any source can send to us: bounded
        self._addresses[key] = addr
        return addr

    def _segment_size(self, i: int, controllen: int) -> int:
        control, base = self._control_view, i * _CMSG_SPACE
        at, segment = 0, 0
        while at + _CMSG_HEADER.size <= controllen:
            length, level, kind = _CMSG_HEADER.unpack_from(control, base + at)
            if length < _CMSG_HEADER.size:
                break
            value = length - _CMSG_HEADER.size
            if level == SOL_UDP and kind == UDP_GRO and value >= 2:
                start = base + at + _CMSG_HEADER.size
                segment = (
                    _U16.unpack_from(control, start)[0] if value < 4 else _I32.unpack_from(control, start)[0]
                )
            at += socket.CMSG_SPACE(value)
        return segment


class DatagramEndpoint:
    """The node's UDP socket (IPv4).

    ``recv_batch``: messages per ``recvmmsg`` (:data:`RECV_BATCH` is the measured choice); 0, the
    default, or no usable ``recvmmsg`` reads one ``recvmsg`` per datagram (``flatnet-node`` batches).
    A reader that stops before None must come back for :attr:`pending` messages on its own:
    readiness does not show them (``service.DataplaneService`` does).
    ``recv_size``: the longest datagram or GRO train a read takes whole (longer ones are dropped
    and counted in :attr:`truncated`; tests shrink it).
    """

    def __init__(
        self,
        host: str = "0.0.0.0",
        port: int = 0,
        gro: bool = True,
        recv_batch: int = 0,
        recv_size: int = RECV_SIZE,
    ) -> None:
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
        self.recv_size = recv_size
        self._receiver: BatchReceiver | None = None
        if recv_batch > 0 and load_recvmmsg() is not None:
            self._receiver = BatchReceiver(self.sock.fileno(), recv_batch, recv_size)
        self._batch: list = []  # received, not handed out yet; last first
        self._drained = False  # the last batch came back short: the next recv() finding none is None
        self._train = False  # the last read brought a GRO train: read with recvmsg
        self._truncated = 0  # by recvmsg

    @property
    def batched(self) -> bool:
        """Whether reads go through ``recvmmsg``."""
        return self._receiver is not None

    @property
    def truncated(self) -> int:
        """Datagrams dropped because the kernel cut them (longer than ``recv_size``)."""
        return self._truncated + (self._receiver.truncated if self._receiver is not None else 0)

    @property
    def pending(self) -> int:
        """Messages received from the kernel and not handed out yet (batched only)."""
        return len(self._batch)

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv(self):
        """(data, addr, segment_size) or None when nothing is waiting; segment_size 0 if not coalesced.

        ``(b"", None, 0)`` when the socket reports an ICMP error for an earlier send. Batched, a
        ``recvmmsg`` that came back short (the socket had no more) is followed by None without
        asking the kernel again: what arrived since keeps the socket readable.
        """
        batch = self._batch
        if batch:
            return batch.pop()
        receiver = self._receiver
        if receiver is None:
            return self.recv_lone()
        if self._drained:
            self._drained = False
            return None
        if self._train:
            got = self.recv_lone()
            if got is not None and not got[2]:
                self._train = False  # a datagram on its own: batches pay again
            return got
        while True:
            try:
                got = receiver.receive()
            except ConnectionRefusedError:
                return b"", None, 0  # an ICMP error for an earlier send; nothing to read
            if got is None:
                return None
            if got:
                break
            # Every message of that call was cut and dropped: read on.
        self._drained = not receiver.full
        self._train = receiver.trains
        if len(got) > 1:
            self._batch = got
        return got.pop()

    def recv_lone(self):
        """As :meth:`recv`, for a read that likely finds one datagram (the first after a quiet
        spell): one plain ``recvmsg``, which costs a lone datagram less than a batched receive
        (measured on the ping path: ~45 vs ~20 µs, cold). Read-ahead already held comes first.
        Also the whole of :meth:`recv` when not batching."""
        if self._batch:
            return self._batch.pop()
        self._drained = False
        while True:
            try:
                data, ancdata, flags, addr = self.sock.recvmsg(self.recv_size, _CMSG_SPACE)
            except BlockingIOError:
                return None
            except ConnectionRefusedError:
                return b"", None, 0  # an ICMP error for an earlier send; nothing to read
            if flags & (MSG_TRUNC | MSG_CTRUNC):
                self._truncated += 1
                continue
            segment = 0
            for level, kind, value in ancdata:
                if level == SOL_UDP and kind == UDP_GRO and len(value) >= 2:
                    segment = _U16.unpack_from(value)[0] if len(value) < 4 else _I32.unpack_from(value)[0]
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
        if self._receiver is not None:
            self._receiver.fd = -1  # the number may go to the next file opened: EBADF, as recvmsg gives
        self.sock.close()
