"""Inner IP packets as the data plane sees them: virtio-net headers, flows, TCP super-packets, ICMP.

Sans-I/O and allocation-light: these functions run once per TUN read or per received record, so
they use ``struct`` on the raw bytes and never build ``ipaddress`` objects on the fast path.

The virtio-net header (``include/uapi/linux/virtio_net.h``) prefixes every TUN read and write
once the device is opened with ``IFF_VNET_HDR``; it is in the host's byte order (little-endian
on every machine Flatnet runs on)::

     0        1        2                 4                 6                 8                10
     +--------+--------+-----------------+-----------------+-----------------+-----------------+
     | flags  |gso_type|     hdr_len     |    gso_size     |   csum_start    |   csum_offset   |
     +--------+--------+-----------------+-----------------+-----------------+-----------------+

``flags & NEEDS_CSUM``: the L4 checksum field holds only the pseudo-header sum; whoever puts the
packet on a wire (the kernel, for a TUN write) completes it. ``gso_type`` TCPV4/TCPV6 with
``gso_size``: a TCP "super-packet" (up to 64 KB) to be cut into ``gso_size``-byte segments.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

VNET_HDR = struct.Struct("<BBHHHH")
VNET_HDR_LEN = VNET_HDR.size  # 10
VNET_NEEDS_CSUM = 0x01
VNET_DATA_VALID = 0x02
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3
GSO_TCPV6 = 4
GSO_ECN = 0x80
ZERO_VNET_HDR = bytes(VNET_HDR_LEN)

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58

IPV4_MIN_HEADER = 20
IPV6_HEADER = 40
TCP_MIN_HEADER = 20
TCP_CHECKSUM_OFFSET = 16
TCP_FLAGS_OFFSET = 13
UDP_CHECKSUM_OFFSET = 6
MAX_IP_PACKET = 65535

TCP_FIN = 0x01
TCP_PSH = 0x08
TCP_CWR = 0x80

IPV4_DF = 0x4000
IPV4_MF = 0x2000
IPV4_FRAG_OFFSET = 0x1FFF

_H = struct.Struct("!H")
_I = struct.Struct("!I")


class VnetHeader(NamedTuple):
    flags: int
    gso_type: int
    hdr_len: int
    gso_size: int
    csum_start: int
    csum_offset: int


class Flow(NamedTuple):
    """What the firewall and anti-spoofing need from an inner packet (addresses as raw bytes)."""

    version: int
    proto: int
    src: bytes
    dst: bytes
    sport: int  # 0 for protocols without ports and for non-first fragments
    dport: int
    l4_offset: int  # bytes from the start of the IP packet to the L4 header
    first_fragment: bool


def parse_flow(pkt) -> Flow | None:
    """The flow of an IPv4/IPv6 packet, or None if it is too short or not IP."""
    n = len(pkt)
    if n < 1:
        return None
    version = pkt[0] >> 4
    if version == 4:
        if n < IPV4_MIN_HEADER:
            return None
        ihl = (pkt[0] & 0x0F) * 4
        if ihl < IPV4_MIN_HEADER or n < ihl:
            return None
        proto = pkt[9]
        frag = _H.unpack_from(pkt, 6)[0]
        first = (frag & IPV4_FRAG_OFFSET) == 0
        src = bytes(pkt[12:16])
        dst = bytes(pkt[16:20])
        l4 = ihl
    elif version == 6:
        if n < IPV6_HEADER:
            return None
        proto = pkt[6]
        src = bytes(pkt[8:24])
        dst = bytes(pkt[24:40])
        l4 = IPV6_HEADER
        first = True
    else:
        return None
    sport = dport = 0
    if first and proto in (PROTO_TCP, PROTO_UDP) and n >= l4 + 4:
        sport, dport = struct.unpack_from("!HH", pkt, l4)
    return Flow(version, proto, src, dst, sport, dport, l4, first)


def fold(total: int) -> int:
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def ones_sum(data) -> int:
    """Unfolded one's-complement sum of *data* as 16-bit big-endian words (odd length padded)."""
    if len(data) % 2:
        data = bytes(data) + b"\x00"
    # int.from_bytes on the whole buffer and a modulus is the fastest pure-Python route: the sum of
    # 16-bit words is congruent to the number modulo 0xFFFF (RFC 1071 section 2, "deferred carries").
    value = int.from_bytes(data, "big") % 0xFFFF
    return value if value or not any(data) else 0xFFFF


def internet_checksum(data) -> int:
    return (~fold(ones_sum(data))) & 0xFFFF


def pseudo_header_sum(pkt, flow: Flow) -> int:
    """Folded (not complemented) pseudo-header sum for the L4 segment of *pkt* (RFC 793, RFC 8200 8.1)."""
    l4_len = len(pkt) - flow.l4_offset
    total = ones_sum(flow.src) + ones_sum(flow.dst) + flow.proto + l4_len
    return fold(total)


def l4_checksum_offset(proto: int) -> int | None:
    if proto == PROTO_TCP:
        return TCP_CHECKSUM_OFFSET
    if proto == PROTO_UDP:
        return UDP_CHECKSUM_OFFSET
    return None


def prepare_partial_checksum(pkt: bytearray, flow: Flow) -> tuple[int, int] | None:
    """Write the pseudo-header sum into *pkt*'s L4 checksum field, as a NEEDS_CSUM TUN write expects.

    Returns (csum_start, csum_offset) for the virtio-net header, or None if *pkt* has no TCP/UDP
    header to checksum.
    """
    offset = l4_checksum_offset(flow.proto)
    if offset is None or not flow.first_fragment or len(pkt) < flow.l4_offset + offset + 2:
        return None
    _H.pack_into(pkt, flow.l4_offset + offset, pseudo_header_sum(pkt, flow))
    return flow.l4_offset, offset


def complete_checksum(pkt: bytearray, flow: Flow) -> bool:
    """Compute the full TCP/UDP checksum in Python (slow path only: packets sent before a session)."""
    offset = l4_checksum_offset(flow.proto)
    if offset is None or len(pkt) < flow.l4_offset + offset + 2:
        return False
    at = flow.l4_offset + offset
    pkt[at : at + 2] = b"\x00\x00"
    total = ones_sum(flow.src) + ones_sum(flow.dst) + flow.proto + (len(pkt) - flow.l4_offset)
    total += ones_sum(memoryview(pkt)[flow.l4_offset :])
    value = (~fold(total)) & 0xFFFF
    if value == 0 and flow.proto == PROTO_UDP:
        value = 0xFFFF  # RFC 768: a computed zero is sent as all ones
    _H.pack_into(pkt, at, value)
    return True


def ipv4_header_checksum(pkt, ihl: int) -> int:
    header = bytes(pkt[:10]) + b"\x00\x00" + bytes(pkt[12:ihl])
    return internet_checksum(header)


def tcp_flags(pkt, flow: Flow) -> int:
    """The TCP flags byte (FIN 0x01, SYN 0x02, RST 0x04, ACK 0x10) of a first fragment, else 0:
    what ``Firewall.allow(..., tcp_flags=)`` takes to forget ended connections early."""
    if flow.proto != PROTO_TCP or not flow.first_fragment or len(pkt) <= flow.l4_offset + TCP_FLAGS_OFFSET:
        return 0
    return pkt[flow.l4_offset + TCP_FLAGS_OFFSET]


def tcp_header_len(pkt, l4_offset: int) -> int:
    return (pkt[l4_offset + 12] >> 4) * 4


def split_tcp_superpacket(pkt, gso_size: int, max_segments: int) -> list[bytearray] | None:
    """Cut a TCP super-packet into super-packets of at most *max_segments* segments each.

    Each piece gets a header of its own: sequence number advanced, IPv4 total length / IPv6 payload
    length and IPv4 ID and header checksum fixed, FIN/PSH only on the last piece and CWR only on the
    first (as the kernel's own TSO does, ``tcp_gso_segment``). The TCP checksum is left for the
    receiver to prepare (it rewrites the pseudo-header sum anyway). None if the packet is malformed.
    """
    flow = parse_flow(pkt)
    if flow is None or flow.proto != PROTO_TCP or gso_size <= 0 or max_segments <= 0:
        return None
    l4 = flow.l4_offset
    if len(pkt) < l4 + TCP_MIN_HEADER:
        return None
    thl = tcp_header_len(pkt, l4)
    hdr_len = l4 + thl
    if thl < TCP_MIN_HEADER or len(pkt) < hdr_len:
        return None
    payload = memoryview(pkt)[hdr_len:]
    chunk = gso_size * max_segments
    if len(payload) <= chunk:
        return [bytearray(pkt)]
    header = bytes(pkt[:hdr_len])
    seq = _I.unpack_from(header, l4 + 4)[0]
    flags = header[l4 + 13]
    ip_id = _H.unpack_from(header, 4)[0] if flow.version == 4 else 0
    pieces = []
    starts = range(0, len(payload), chunk)
    last_start = starts[-1]
    for start in starts:
        body = payload[start : start + chunk]
        piece = bytearray(header)
        piece += body
        _I.pack_into(piece, l4 + 4, (seq + start) & 0xFFFFFFFF)
        piece_flags = flags
        if start != last_start:
            piece_flags &= ~(TCP_FIN | TCP_PSH)
        if start != 0:
            piece_flags &= ~TCP_CWR
        piece[l4 + 13] = piece_flags
        if flow.version == 4:
            _H.pack_into(piece, 2, len(piece))
            _H.pack_into(piece, 4, (ip_id + start // gso_size) & 0xFFFF)
            _H.pack_into(piece, 10, ipv4_header_checksum(piece, l4))
        else:
            _H.pack_into(piece, 4, len(piece) - IPV6_HEADER)
        pieces.append(piece)
    return pieces


def ipv4_dont_fragment(pkt) -> bool:
    return len(pkt) >= IPV4_MIN_HEADER and bool(_H.unpack_from(pkt, 6)[0] & IPV4_DF)


def icmp_too_big(pkt, mtu: int, reporter: bytes) -> bytes | None:
    """The ICMP error telling *pkt*'s sender that *mtu* is the largest packet the path carries.

    IPv4: type 3 code 4 "fragmentation needed and DF set" with the next-hop MTU (RFC 792, RFC 1191
    section 4), quoting the IP header and the first 8 bytes of data. IPv6: type 2 "Packet Too Big"
    (RFC 4443 section 3.2), quoting as much as fits in the minimum MTU. *reporter* is the address
    the error comes from (the node's own Flatnet address of the same family). None if *pkt* must
    not get one (not IP, an ICMP error itself, a non-first fragment).
    """
    flow = parse_flow(pkt)
    if flow is None or not flow.first_fragment:
        return None
    if flow.version == 4:
        if len(reporter) != 4:
            return None
        if flow.proto == PROTO_ICMP and len(pkt) > flow.l4_offset and pkt[flow.l4_offset] not in (0, 8):
            return None  # never answer an ICMP error with an error (RFC 1122 3.2.2)
        quoted = bytes(pkt[: flow.l4_offset + 8])
        icmp = bytearray(struct.pack("!BBHHH", 3, 4, 0, 0, mtu & 0xFFFF)) + quoted
        _H.pack_into(icmp, 2, internet_checksum(icmp))
        total = IPV4_MIN_HEADER + len(icmp)
        ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0xC0, total, 0, 0, 64, PROTO_ICMP, 0, reporter, flow.src))
        _H.pack_into(ip, 10, internet_checksum(ip))
        return bytes(ip + icmp)
    if len(reporter) != 16:
        return None
    if flow.proto == PROTO_ICMPV6 and len(pkt) > flow.l4_offset and pkt[flow.l4_offset] < 128:
        return None
    quoted = bytes(pkt[: 1280 - IPV6_HEADER - 8])
    icmp = bytearray(struct.pack("!BBHI", 2, 0, 0, mtu)) + quoted
    pseudo = ones_sum(reporter) + ones_sum(flow.src) + len(icmp) + PROTO_ICMPV6
    _H.pack_into(icmp, 2, (~fold(pseudo + ones_sum(icmp))) & 0xFFFF)
    ip = struct.pack("!IHBB16s16s", 0x60000000, len(icmp), PROTO_ICMPV6, 64, reporter, flow.src)
    return ip + bytes(icmp)
