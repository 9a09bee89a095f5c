"""Just enough rtnetlink (RFC 3549; linux/rtnetlink.h) for ADD and DEL, in the standard library.

Why not pyroute2 here: importing it costs ~0.3 s and each of its calls runs an asyncio loop, so a
veth setup through it takes ~20 ms of the ~30 ms ADD budget. ADD and DEL need six message kinds;
they are encoded here with :mod:`struct`, several requests go out in one ``send`` and every
acknowledgement is checked. Everything else (CHECK, listings) still uses pyroute2.

Message layout (all integers in host byte order)::

    nlmsghdr   u32 length | u16 type | u16 flags | u32 seq | u32 pid          (16 bytes)
    ifinfomsg  u8 family | u8 pad | u16 type | i32 index | u32 flags | u32 change   (16)
    ifaddrmsg  u8 family | u8 prefixlen | u8 flags | u8 scope | u32 index          (8)
    rtmsg      u8 family | u8 dst_len | u8 src_len | u8 tos | u8 table | u8 protocol
               | u8 scope | u8 type | u32 flags                                     (12)
    rtattr     u16 length | u16 type | payload, padded to 4 bytes
    nlmsgerr   i32 error (0 = ACK, else -errno) | the request's nlmsghdr ...

A veth pair is one RTM_NEWLINK: IFLA_LINKINFO { IFLA_INFO_KIND "veth", IFLA_INFO_DATA {
VETH_INFO_PEER: ifinfomsg + the peer's attributes (name, IFLA_NET_NS_FD to create it directly in
the container's namespace, MTU, MAC) } }. ``ifi_flags = ifi_change = IFF_UP`` brings the host end
up; the container end is brought up by a separate RTM_SETLINK in the container's batch.
"""

from __future__ import annotations

import errno
import os
import socket
import struct

NLMSG_ERROR = 2
NLMSG_DONE = 3
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK, RTM_SETLINK = 16, 17, 18, 19
RTM_NEWADDR = 20
RTM_NEWROUTE = 24

NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400

IFLA_ADDRESS = 1
IFLA_IFNAME = 3
IFLA_MTU = 4
IFLA_LINKINFO = 18
IFLA_NET_NS_FD = 28
IFLA_INFO_KIND = 1
IFLA_INFO_DATA = 2
VETH_INFO_PEER = 1
IFA_ADDRESS = 1
IFA_LOCAL = 2
RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5

IFF_UP = 0x1
RT_TABLE_MAIN = 254
RTPROT_STATIC = 4
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RTN_UNICAST = 1
LOOPBACK_INDEX = 1  # "lo" is ifindex 1 in every network namespace

_NLMSGHDR = struct.Struct("=IHHII")
_IFINFOMSG = struct.Struct("=BBHiII")
_IFADDRMSG = struct.Struct("=BBBBI")
_RTMSG = struct.Struct("=BBBBBBBBI")
_RTATTR = struct.Struct("=HH")


def attr(kind: int, payload: bytes) -> bytes:
    length = _RTATTR.size + len(payload)
    return _RTATTR.pack(length, kind) + payload + b"\0" * (-length % 4)


def attr_str(kind: int, text: str) -> bytes:
    return attr(kind, text.encode() + b"\0")


def attr_u32(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack("=I", value))


def ifinfomsg(index: int = 0, flags: int = 0, change: int = 0) -> bytes:
    return _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, index, flags, change)


def mac_bytes(mac: str) -> bytes:
    return bytes(int(part, 16) for part in mac.split(":"))


def parse_attrs(data: bytes, offset: int = 0) -> dict[int, bytes]:
    attrs: dict[int, bytes] = {}
    while offset + _RTATTR.size <= len(data):
        length, kind = _RTATTR.unpack_from(data, offset)
        if length < _RTATTR.size:
            break
        attrs[kind & 0x3FFF] = data[offset + _RTATTR.size: offset + length]
        offset += (length + 3) & ~3
    return attrs


class Rtnl:
    """One rtnetlink socket (optionally created in another namespace by the caller)."""

    def __init__(self, sock: socket.socket | None = None) -> None:
        self.sock = sock or socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
        self.sock.bind((0, 0))
        self._seq = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _message(self, kind: int, flags: int, body: bytes) -> tuple[int, bytes]:
        self._seq += 1
        return self._seq, _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, flags, self._seq, 0) + body

    def transact(self, requests: list[tuple[int, int, bytes]]) -> dict[int, bytes]:
        """Send (type, flags, body) requests in one datagram; wait for every answer.

        Returns seq -> reply payload for requests that got data (GETLINK); raises ``OSError`` with
        the first failing request's errno. Every request carries NLM_F_ACK so each one answers.
        """
        pending: dict[int, int] = {}
        out = []
        for kind, flags, body in requests:
            seq, msg = self._message(kind, flags | NLM_F_REQUEST | NLM_F_ACK, body)
            pending[seq] = kind
            out.append(msg)
        self.sock.send(b"".join(out))
        replies: dict[int, bytes] = {}
        first_error: OSError | None = None
        while pending:
            data = self.sock.recv(65536)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, kind, _flags, seq, _pid = _NLMSGHDR.unpack_from(data, offset)
                payload = data[offset + _NLMSGHDR.size: offset + length]
                offset += (length + 3) & ~3
                if seq not in pending:
                    continue
                if kind == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", payload)
                    pending.pop(seq)
                    if code and first_error is None:
                        first_error = OSError(-code, f"{os.strerror(-code)} (rtnetlink request {seq})")
                else:
                    replies[seq] = payload
                if length == 0:
                    break
        if first_error is not None:
            raise first_error
        return replies

    # -- the operations ADD and DEL need --------------------------------------------------------

    def link_info(self, ifname: str) -> tuple[int, str]:
        """(ifindex, MAC) of *ifname*; OSError(ENODEV) if there is none."""
        seq = self._seq + 1
        replies = self.transact([(RTM_GETLINK, 0, ifinfomsg() + attr_str(IFLA_IFNAME, ifname))])
        payload = replies[seq]
        _family, _pad, _type, index, _flags, _change = _IFINFOMSG.unpack_from(payload)
        mac = parse_attrs(payload, _IFINFOMSG.size).get(IFLA_ADDRESS, b"")
        return index, ":".join(f"{b:02x}" for b in mac)

    def delete_link(self, ifname: str) -> bool:
        """Delete *ifname* (a veth takes its peer along); False if it did not exist."""
        try:
            self.transact([(RTM_DELLINK, 0, ifinfomsg() + attr_str(IFLA_IFNAME, ifname))])
        except OSError as exc:
            if exc.errno in (errno.ENODEV, errno.ENOENT):
                return False
            raise
        return True

    def add_veth(self, ifname: str, peer_ifname: str, peer_netns_fd: int, mtu: int = 0,
                 peer_mac: str | None = None) -> None:
        peer_attrs = attr_str(IFLA_IFNAME, peer_ifname) + attr_u32(IFLA_NET_NS_FD, peer_netns_fd)
        own_attrs = attr_str(IFLA_IFNAME, ifname)
        if mtu:
            peer_attrs += attr_u32(IFLA_MTU, mtu)
            own_attrs += attr_u32(IFLA_MTU, mtu)
        if peer_mac:
            peer_attrs += attr(IFLA_ADDRESS, mac_bytes(peer_mac))
        # The peer cannot be created up (the kernel answers ENOTCONN): the caller sets it up later.
        peer = attr(VETH_INFO_PEER, ifinfomsg() + peer_attrs)
        linkinfo = attr(IFLA_LINKINFO, attr(IFLA_INFO_KIND, b"veth") + attr(IFLA_INFO_DATA, peer))
        body = ifinfomsg(flags=IFF_UP, change=IFF_UP) + own_attrs + linkinfo
        self.transact([(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body)])


def set_up(index: int) -> tuple[int, int, bytes]:
    return RTM_SETLINK, 0, ifinfomsg(index, IFF_UP, IFF_UP)


def add_address(index: int, address: str, prefixlen: int) -> tuple[int, int, bytes]:
    raw = socket.inet_aton(address)
    body = _IFADDRMSG.pack(socket.AF_INET, prefixlen, 0, RT_SCOPE_UNIVERSE, index)
    return RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE, body + attr(IFA_LOCAL, raw) + attr(IFA_ADDRESS, raw)


def replace_route(dst: str, dst_len: int, oif: int, gateway: str | None = None,
                  scope: int = RT_SCOPE_UNIVERSE) -> tuple[int, int, bytes]:
    body = _RTMSG.pack(socket.AF_INET, dst_len, 0, 0, RT_TABLE_MAIN, RTPROT_STATIC, scope, RTN_UNICAST, 0)
    if dst_len:
        body += attr(RTA_DST, socket.inet_aton(dst))
    body += attr_u32(RTA_OIF, oif)
    if gateway:
        body += attr(RTA_GATEWAY, socket.inet_aton(gateway))
    return RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, body
