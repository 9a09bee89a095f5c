"""The node's data plane decisions, sans-I/O: TUN frames and UDP datagrams in, writes and sends out.

Theory of operation
-------------------
Outbound (TUN -> peer). :meth:`Dataplane.tun_frame` takes one TUN read: a virtio-net header and an
IP packet, often a TCP super-packet of up to 64 KB (TSO offload). It finds the peer that owns the
destination (``engine.session_for``), checks the source is this node's and the firewall allows the
flow, then turns the packet into batch *records* (flatnet/proto/batch.py): a super-packet is cut
into super-packets of at most ``cap`` segments, each sealed alone as one DATA_BATCH message (one
AEAD call for up to ``cap`` segments); small packets wait in a per-peer batch until :meth:`flush`
(the I/O layer calls it once the TUN fd would block) so a burst of ACKs costs one AEAD call too.
A sealed message bigger than the datagram budget leaves as fragments in one GSO send.

Inbound (peer -> TUN). :meth:`udp_datagram` takes one UDP read, possibly several datagrams GRO
coalesced (``segment_size``). Fragments are reassembled, DATA/DATA_BATCH messages opened by the
tunnel (AEAD + replay window), anything else (handshakes, ...) is handed to the engine. Each record
must pass anti-spoofing (the inner source is one the peer's certificate allows), be addressed to
this node or its containers, and pass the firewall. Consecutive in-order segments of one TCP flow
are merged into one super-packet, so the kernel gets one large TUN write and sends fewer ACKs.

Loss adapts the format. A lost datagram loses its whole message, so when the sender sees a TCP
retransmission toward a peer (a sequence number below what was already sent) it (1) sends that
retransmission unbatched, one segment per datagram, (2) adds a parity fragment to each message for
``parity_hold`` seconds, so a message survives any one lost fragment, and (3) if loss goes on with
parity on, halves the peer's segment cap (AIMD: +1 after ``cap_growth_interval`` clean messages,
between 1 and ``max_cap``).

Errors: bad input from the network is dropped and counted in :attr:`drops` by reason, never raised.
"""

from __future__ import annotations

import ipaddress
import logging
import struct
from collections import Counter, deque
from dataclasses import dataclass, field

from flatnet.firewall import INBOUND, OUTBOUND, Firewall, PeerIdentity, identity_of
from flatnet.node import packet as P
from flatnet.node.reassembly import Reassembly
from flatnet.observability import HANDSHAKE_FAILED, PEER_DOWN, PEER_ROAMED, PEER_UP, REKEY, log_event
from flatnet.proto import batch as B

log = logging.getLogger("flatnet.node.dataplane")

_H = struct.Struct("!H")
_HH = struct.Struct("!HH")
_I = struct.Struct("!I")
_RECORD_PACK = B.RECORD_HEADER.pack
# Bytes into a TUN frame (virtio-net header + IPv4 header without options) and into a DATA_BATCH
# plaintext of one record (record header + the same), as the express paths read them.
_V = P.VNET_HDR_LEN
_R = B.RECORD_HEADER_LEN
EXPRESS_PROTOCOLS = frozenset((P.PROTO_ICMP, P.PROTO_UDP))
EXPRESS_CACHE_MAX = 4096  # cached address pairs per direction (cleared when full)

MAX_SUPERPACKET = 65535 - 256
DECREASE_COOLDOWN = 8  # messages sent between two decreases of a peer's segment cap (no parity)
DECREASE_COOLDOWN_WITH_PARITY = 64  # with parity, a message survives one lost fragment: shrink rarely  # headroom below the IP length limit for a merged super-packet


@dataclass(frozen=True)
class DataplaneSettings:
    local_ip: ipaddress.IPv4Address  # this node's Flatnet IP (on the TUN device)
    local_networks: tuple  # networks delivered here: this node's IP and its container subnets
    overlay_mtu: int  # the largest inner packet carried whole; bigger ones with DF get ICMP too-big
    datagram_budget: int  # the largest UDP payload that crosses the underlay unfragmented
    max_cap: int = 16  # segments per DATA_BATCH message at most
    adaptive_cap: bool = True
    cap_growth_interval: int = 32  # clean messages before the cap grows by one
    parity: str = "auto"  # parity fragments: "auto" (while loss is seen), "always", "never"
    parity_hold: float = 10.0  # seconds parity stays on after the last retransmission seen
    data_type: int = 5  # the tunnel's DATA_BATCH message type
    single_type: int = 4  # the tunnel's DATA message type (one packet, sent by the engine itself)


@dataclass
class PeerPath:
    """What the data plane knows of one peer: counters, its current cap, flows for loss detection."""

    cap: int
    clean_messages: int = 0
    tx_bytes: int = 0
    rx_bytes: int = 0
    tx_packets: int = 0
    rx_packets: int = 0
    tx_messages: int = 0
    rx_messages: int = 0
    retransmissions_seen: int = 0
    since_decrease: int = 0
    parity_until: float = 0.0
    endpoint: object = None
    up_since: float | None = None
    flows: dict = field(default_factory=dict)  # (src, dst, sport, dport) -> next expected seq


class _RxSuper:
    """A received TCP packet being merged with its flow's following segments before the TUN write."""

    __slots__ = ("flow_key", "buf", "flow", "hdr_len", "gso_size", "next_seq", "closed", "merged", "needs_csum")

    def __init__(self, flow_key, buf: bytearray, flow: P.Flow, hdr_len: int, gso_size: int, needs_csum: bool) -> None:
        self.flow_key = flow_key
        self.buf = buf
        self.flow = flow
        self.hdr_len = hdr_len
        self.gso_size = gso_size
        payload = len(buf) - hdr_len
        self.next_seq = (_I.unpack_from(buf, flow.l4_offset + 4)[0] + payload) & 0xFFFFFFFF
        # More may join only while every segment so far is full-sized.
        self.closed = payload % gso_size != 0 if gso_size else True
        self.merged = False
        self.needs_csum = needs_csum


class _Train:
    """The pieces so far of the message whose fragments are arriving in order, one per read."""

    __slots__ = ("addr", "message_id", "count", "length", "piece_size", "pieces", "total", "parity", "fragment")

    def __init__(self, addr, message_id: int, count: int, length: int, piece_size: int, first, fragment) -> None:
        self.addr = addr
        self.message_id = message_id
        self.count = count
        self.length = length
        self.piece_size = piece_size
        self.pieces = [first]
        self.total = piece_size
        self.parity = None
        self.fragment = fragment  # the datagram taken last (so the caller knows it was taken)


class Dataplane:
    def __init__(self, engine, firewall: Firewall, settings: DataplaneSettings, *, rng=None) -> None:
        self.engine = engine
        self.firewall = firewall
        self.settings = settings
        self.drops: Counter = Counter()
        self.stats: Counter = Counter()  # how the fast path went (not errors)
        self.reassembly = Reassembly()
        self._train: _Train | None = None
        self.paths: dict = {}  # peer Flatnet IP -> PeerPath
        self._local_ip_raw = settings.local_ip.packed
        self._local_nets = [ipaddress.ip_network(n) for n in settings.local_networks]
        self._pending: dict = {}  # id(session) -> [session, [record parts], size]
        self._tun_out: list = []
        self._rx: list = []  # _RxSuper or ready bytes, in arrival order
        self._udp_out: list = []
        self.control_inbox: deque = deque()  # (peer_ip, msg_type, payload) for the node's control side
        self._local_cache: dict[bytes, bool] = {}
        self._spoof_cache: dict = {}
        self._identity_cache: dict = {}
        # The express paths' caches, filled by the full path once a packet passed every check:
        # out: src+dst (8 raw bytes) -> (route generation, peer, session, identity, path);
        # in: src+dst -> (session, identity, path).
        self._express_out: dict = {}
        self._express_in: dict = {}
        seed = rng.getrandbits(32) if rng is not None else 0x5EED
        self._message_id = seed & 0xFFFFFFFF
        self._last_tick = None
        self._now: float | None = None
        # Space for records in one unfragmented message: the tunnel header and tag come off the budget.
        self._small_batch_limit = settings.datagram_budget - 32
        # The largest TUN frame the express path seals alone: fits the overlay MTU and one datagram.
        self._data_type = settings.data_type
        self._express_max = _V + min(settings.overlay_mtu, self._small_batch_limit - _R)
        self._max_train_bytes = min(
            B.MAX_RECORD_LENGTH - 512, B.MAX_FRAGMENTS * B.fragment_piece_size(settings.datagram_budget) - 512
        )

    # ------------------------------------------------------------------ outbound

    def express_out(self, frame, now: float):
        """The express path for a lone small packet (a ping, a DNS query, a UDP request).

        A plain IPv4 ICMP or UDP packet (no IP options, not a fragment, not a super-packet, small
        enough for one datagram) whose source and destination the full path (:meth:`tun_frame`)
        has already passed is sealed alone, at once: the route, the session and the peer's identity
        come from one cache lookup, the firewall still judges every packet. Returns (datagram,
        addr) to send, ``()`` when the firewall dropped it, or None: not an express packet (or the
        cache is stale) -- the caller hands it to :meth:`tun_frame`. It exists for latency: an
        idle ping pays every Python call of its path with cold caches, at each of its four hops.
        """
        if len(frame) > self._express_max or frame[1] or frame[_V] != 0x45 or frame[_V + 6] & 0x3F or frame[_V + 7]:
            return None
        proto = frame[_V + 9]
        if proto == P.PROTO_ICMP:
            sport = dport = 0
        elif proto == P.PROTO_UDP and len(frame) >= _V + 28:
            sport, dport = _HH.unpack_from(frame, _V + 20)
        else:
            return None
        entry = self._express_out.get(frame[_V + 12 : _V + 20])
        if entry is None:
            return None
        generation, peer, session, identity, path = entry
        if generation != self.engine.route_generation or peer.current is not session:
            return None
        if not self.firewall.allow(OUTBOUND, proto, frame[_V + 12 : _V + 16], sport, frame[_V + 16 : _V + 20], dport,
                                   identity, now):
            self.drops["firewall_outbound"] += 1
            return ()
        size = len(frame) - _V
        flags = B.FLAG_NEEDS_CSUM if frame[0] & P.VNET_NEEDS_CSUM else 0
        try:
            datagram = session.seal(_RECORD_PACK(B.RECORD_IP_PACKET, flags, size, 0) + frame[_V:], self._data_type, now)
        except Exception:  # expired under our feet: the full path handshakes
            return None
        addr = peer.endpoint
        path.tx_bytes += len(datagram)  # as _count_sent, less the segment cap's bookkeeping (no segments)
        path.tx_packets += 1
        path.tx_messages += 1
        path.endpoint = addr
        self.stats["express_out"] += 1
        self._now = now  # sealing can start a rekey: take_udp_sends collects the engine's datagrams
        return datagram, addr

    def tun_frame(self, frame, now: float) -> bool | None:
        """One TUN read (virtio-net header + IP packet). True when it was a small packet now waiting
        in its peer's batch that someone waits for (not a pure TCP ACK): the I/O layer may
        :meth:`flush` at once rather than after the read that would block."""
        if len(frame) <= P.VNET_HDR_LEN:
            self.drops["tun_short"] += 1
            return
        flags, gso_type, _hdr_len, gso_size, _cs, _co = P.VNET_HDR.unpack_from(frame, 0)
        pkt = memoryview(frame)[P.VNET_HDR_LEN :]
        flow = P.parse_flow(pkt)
        if flow is None:
            self.drops["tun_not_ip"] += 1
            return
        if not self._is_local(flow.src):
            self.drops["tun_source_not_local"] += 1
            return
        gso = gso_type & ~P.GSO_ECN
        if (
            gso == P.GSO_NONE
            and len(pkt) > self.settings.overlay_mtu
            and (flow.version == 6 or P.ipv4_dont_fragment(pkt))
        ):
            self._too_big(pkt)
            return
        session = self.engine.session_for(flow.dst, now)  # the raw 4 bytes: no address object per packet
        if session is None:
            self._slow_path(pkt, flow, flags, gso, gso_size, now)
            return
        peer = self._identity(session)
        if not self.firewall.allow(
            OUTBOUND, flow.proto, flow.src, flow.sport, flow.dst, flow.dport, peer, now, flow.first_fragment,
            P.tcp_flags(pkt, flow),
        ):
            self.drops["firewall_outbound"] += 1
            return
        path = self._path(session)
        if flow.proto in EXPRESS_PROTOCOLS and gso == P.GSO_NONE and flow.l4_offset == 20 and flow.first_fragment:
            if len(self._express_out) >= EXPRESS_CACHE_MAX:
                self._express_out.clear()
            self._express_out[flow.src + flow.dst] = (self.engine.route_generation, session.peer, session, peer, path)
        # A retransmission travels unbatched, one segment per datagram: were it batched, losing any
        # datagram of its message would lose it again, and a lost retransmission costs TCP a timeout.
        resent = flow.proto == P.PROTO_TCP and self._watch_retransmission(path, pkt, flow, now)
        if resent:
            pending = self._pending.get(id(session))
            if pending is not None and pending[2]:
                self._flush_one(pending, now)  # keep order with what was queued before
        needs_csum = bool(flags & P.VNET_NEEDS_CSUM)
        rflags = B.FLAG_NEEDS_CSUM if needs_csum else 0
        if gso in (P.GSO_TCPV4, P.GSO_TCPV6) and gso_size:
            if flow.proto != P.PROTO_TCP:
                self.drops["tun_bad_gso"] += 1
                return
            # A message must fit one record (64 KB) and MAX_FRAGMENTS datagrams, whatever the MSS.
            segments = 1 if resent else max(1, min(path.cap, self._max_train_bytes // gso_size))
            pieces = P.split_tcp_superpacket(pkt, gso_size, segments)
            if pieces is None:
                self.drops["tun_bad_gso"] += 1
                return
            for piece in pieces:
                single = len(piece) - (flow.l4_offset + P.tcp_header_len(piece, flow.l4_offset)) <= gso_size
                record = B.record_header(len(piece), B.FLAG_NEEDS_CSUM, 0 if single else gso_size) + piece
                self._seal_and_send(session, path, record, 1, now)
            return
        if gso != P.GSO_NONE:
            self.drops["tun_unsupported_gso"] += 1
            return
        record = B.record_header(len(pkt), rflags, 0) + pkt
        if resent or len(record) > self._small_batch_limit:
            self._seal_and_send(session, path, record, 1, now)
            return
        pending = self._pending.get(id(session))
        if pending is None:
            pending = self._pending[id(session)] = [session, path, [], 0]
        elif pending[3] + len(record) > self._small_batch_limit:
            self._flush_one(pending, now)
        pending[2].append(record)
        pending[3] += len(record)
        if flow.proto != P.PROTO_TCP:
            return True
        l4 = flow.l4_offset
        # Urgent unless a pure ACK: those gather (one AEAD call for a burst of them).
        return len(pkt) >= l4 + P.TCP_MIN_HEADER and (
            len(pkt) > l4 + P.tcp_header_len(pkt, l4) or bool(pkt[l4 + 13] & 0x07)
        )

    def flush(self, now: float) -> None:
        """Seal the small packets gathered since the last flush (call when the TUN fd would block)."""
        if self._pending:
            for pending in self._pending.values():
                if pending[2]:
                    self._flush_one(pending, now)
            self._pending.clear()
        self._drain_engine(now)  # sealing may have started a rekey

    def _flush_one(self, pending, now: float) -> None:
        session, path, records, _ = pending
        self._seal_and_send(session, path, b"".join(records), len(records), now)
        pending[2] = []
        pending[3] = 0

    def _seal_and_send(self, session, path: PeerPath, payload: bytes, packets: int, now: float) -> None:
        try:
            datagram = session.seal(payload, self.settings.data_type, now)
        except Exception:  # expired under our feet (SessionExpiredError): the next packet handshakes
            self.drops["seal_refused"] += packets
            return
        addr = _endpoint(session)
        budget = self.settings.datagram_budget
        if len(datagram) <= budget:
            self._udp_out.append((datagram, addr, 0))
        else:
            self._message_id = (self._message_id + 1) & 0xFFFFFFFF
            mode = self.settings.parity
            parity = mode == "always" or (mode == "auto" and now < path.parity_until)
            buffer, segment = B.encode_fragments(datagram, self._message_id, budget, parity)
            if parity:
                self.stats["parity_sent"] += 1
            self._udp_out.append((buffer, addr, segment))
        self._count_sent(path, len(datagram), packets, addr)

    def _count_sent(self, path: PeerPath, size: int, packets: int, addr) -> None:
        """A message went out: the peer's counters, and a clean message toward growing its cap."""
        path.tx_bytes += size
        path.tx_packets += packets
        path.tx_messages += 1
        path.endpoint = addr
        path.since_decrease += 1
        if self.settings.adaptive_cap:
            path.clean_messages += 1
            if path.clean_messages >= self.settings.cap_growth_interval and path.cap < self.settings.max_cap:
                path.cap += 1
                path.clean_messages = 0

    def _watch_retransmission(self, path: PeerPath, pkt, flow: P.Flow, now: float) -> bool:
        """Is this TCP packet a retransmission (data behind what this flow already sent)?"""
        l4 = flow.l4_offset
        if len(pkt) < l4 + P.TCP_MIN_HEADER:
            return False
        key = (flow.src, flow.dst, flow.sport, flow.dport)
        if P.tcp_flags(pkt, flow) & 0x05:  # FIN or RST: the flow ends, forget it (bounded table)
            path.flows.pop(key, None)
            return False
        payload = len(pkt) - l4 - P.tcp_header_len(pkt, l4)
        if payload <= 0:
            return False
        seq = _I.unpack_from(pkt, l4 + 4)[0]
        expected = path.flows.get(key)
        end = (seq + payload) & 0xFFFFFFFF
        if expected is not None and 0 < ((expected - seq) & 0xFFFFFFFF) < 0x80000000:
            # seq is behind what was already sent: a retransmission, so a message was lost.
            path.retransmissions_seen += 1
            # Loss seen. First answer: parity (a message then survives one lost fragment). Second,
            # if loss goes on although parity is on (or parity is off): smaller messages. At most
            # one decrease per few messages: one loss makes TCP resend several segments.
            parity_was_on = self.settings.parity == "always" or (
                self.settings.parity == "auto" and now < path.parity_until
            )
            cooldown = DECREASE_COOLDOWN_WITH_PARITY if parity_was_on else DECREASE_COOLDOWN
            if self.settings.parity == "auto" and not parity_was_on:
                cooldown = None  # parity alone may do
            path.parity_until = now + self.settings.parity_hold
            if self.settings.adaptive_cap and cooldown is not None and path.since_decrease >= cooldown:
                path.cap = max(1, path.cap // 2)
                path.clean_messages = 0
                path.since_decrease = 0
            if ((end - expected) & 0xFFFFFFFF) < 0x80000000:
                path.flows[key] = end  # it also carries new data past the old end
            return True
        if len(path.flows) > 4096:
            path.flows.clear()
        path.flows[key] = end
        return False

    def _slow_path(self, pkt, flow: P.Flow, flags: int, gso: int, gso_size: int, now: float) -> None:
        """No session yet: the engine queues the packet and handshakes; checksums done here."""
        if gso != P.GSO_NONE:
            # A super-packet (a TCP sender's first burst after its session ended while idle): cut
            # into plain segments with full checksums for the engine to queue, so the handshake
            # starts now rather than at TCP's retransmission timeout, and nothing is lost.
            pieces = None
            if gso in (P.GSO_TCPV4, P.GSO_TCPV6) and flow.proto == P.PROTO_TCP and gso_size:
                pieces = P.split_tcp_superpacket(pkt, gso_size, 1)
            if pieces is None:
                self.drops["no_session_superpacket"] += 1
                return
            for piece in pieces:
                P.complete_checksum(piece, P.parse_flow(piece))
                self.engine.send_packet(bytes(piece), now)
            self._drain_engine(now)
            return
        if flags & P.VNET_NEEDS_CSUM:
            pkt = bytearray(pkt)
            P.complete_checksum(pkt, flow)
        self.engine.send_packet(bytes(pkt), now)
        self._drain_engine(now)

    def _too_big(self, pkt) -> None:
        self.drops["too_big"] += 1
        version = pkt[0] >> 4
        reporter = self._local_ip_raw if version == 4 else None
        if reporter is None:
            return
        icmp = P.icmp_too_big(pkt, self.settings.overlay_mtu, reporter)
        if icmp is not None:
            self._tun_out.append(P.ZERO_VNET_HDR + icmp)

    # ------------------------------------------------------------------ inbound

    def udp_datagram(self, data, addr, now: float, segment_size: int = 0) -> None:
        """One UDP read; *segment_size* > 0 when the kernel coalesced datagrams of that size (GRO)."""
        if segment_size and len(data) > segment_size:
            if data[0] == B.FRAGMENT_TYPE:
                message = B.join_fragment_train(data, segment_size)
                if message is not None:
                    self.stats["gro_trains_joined"] += 1
                    self._datagram(message, addr, now)
                    return
            view = memoryview(data)
            for at in range(0, len(view), segment_size):
                self._datagram(view[at : at + segment_size], addr, now)
        else:
            self._datagram(data, addr, now)

    def udp_burst_done(self, now: float) -> None:
        """The socket would block: rebuild from parity the messages still one piece short."""
        self._spill_train(now)
        for addr, message in self.reassembly.recover_pending():
            self._datagram(message, addr, now)

    def _datagram(self, data, addr, now: float) -> None:
        if not data:
            self.drops["udp_empty"] += 1
            return
        if data[0] == B.FRAGMENT_TYPE:
            message = self._in_order_fragment(data, addr, now)
            if message is None:
                if self._train is not None and self._train.fragment is data:
                    return  # taken by the train
                self._spill_train(now)
                fragment = B.parse_fragment(data)
                if fragment is None:
                    self.drops["fragment_malformed"] += 1
                    return
                message = self.reassembly.add(fragment, addr, now)
                if message is None:
                    return
            data = message
        opened = self._open(data, addr, now)
        if opened is not None:
            self._opened(opened, len(data), now)

    def express_in(self, data, addr, now: float):
        """The express path for one whole small message (not a fragment): the TUN frame to write,
        or None when there is nothing to write now -- then the message went the full way.

        After the tunnel opened it (replay window, AEAD: as always), a message holding one plain
        IPv4 ICMP or UDP packet (no IP options, not a fragment, no checksum left to do) between
        addresses the full path (:meth:`_deliver`) already passed for this session -- anti-spoofing,
        addressed to this node -- is checked by the firewall alone and becomes the frame. Anything
        else goes on as :meth:`udp_datagram` would take it.
        """
        opened = self._open(data, addr, now)
        if opened is None:
            return None
        session, msg_type, plaintext = opened
        if (
            msg_type == self._data_type
            and len(plaintext) >= _R + 20
            and plaintext[0] == B.RECORD_IP_PACKET
            and not plaintext[1]
            and plaintext[_R] == 0x45
            and not plaintext[_R + 6] & 0x3F
            and not plaintext[_R + 7]
        ):
            entry = self._express_in.get(plaintext[_R + 12 : _R + 20])
            length, gso_size = _HH.unpack_from(plaintext, 2)
            proto = plaintext[_R + 9]
            if (
                entry is not None
                and entry[0] is session
                and not gso_size
                and length == len(plaintext) - _R
                and _H.unpack_from(plaintext, _R + 2)[0] == length
                and proto in EXPRESS_PROTOCOLS
                and (proto != P.PROTO_UDP or length >= 28)
            ):
                _, identity, path = entry
                path.rx_bytes += len(data)
                path.rx_messages += 1
                sport, dport = _HH.unpack_from(plaintext, _R + 20) if proto == P.PROTO_UDP else (0, 0)
                self._now = now  # opening can start a rekey: take_udp_sends collects the engine's datagrams
                if not self.firewall.allow(INBOUND, proto, plaintext[_R + 16 : _R + 20], dport,
                                           plaintext[_R + 12 : _R + 16], sport, identity, now):
                    self.drops["firewall_inbound"] += 1
                    return None
                path.rx_packets += 1
                self.stats["express_in"] += 1
                return P.ZERO_VNET_HDR + plaintext[_R:]
        self._opened(opened, len(data), now)
        return None

    def _open(self, data, addr, now: float):
        """(session, msg_type, plaintext) of an authentic transport message, else None."""
        try:
            opened = self.engine.open_data(data, addr, now)
        except Exception:  # the engine promises not to raise; a data path never lets one through
            self.drops["tunnel_internal_error"] += 1
            opened = None
        if opened is None:
            # A handshake, cookie reply, keepalive, or a message that failed: the engine has dealt
            # with it (and counted it); collect what it wants sent or reported.
            self._drain_engine(now)
        return opened

    def _opened(self, opened, size: int, now: float) -> None:
        session, msg_type, plaintext = opened
        path = self._path(session)
        path.rx_bytes += size
        path.rx_messages += 1
        if msg_type == self.settings.data_type:
            records = B.parse_batch(plaintext)
            if records is None:
                self.drops["batch_malformed"] += 1
                return
            for record in records:
                self._deliver(session, path, record.packet, record.flags, record.gso_size, now)
        elif msg_type == self.settings.single_type:
            self._deliver(session, path, memoryview(plaintext), 0, 0, now)
        else:
            # CONTROL / RELAY: not the data plane's; kept (bounded) for the node's control side.
            if len(self.control_inbox) >= 256:
                self.drops["control_inbox_full"] += 1
            else:
                self.control_inbox.append((session.peer_ip, int(msg_type), bytes(plaintext)))
        self._now = now  # opening can start a rekey: take_udp_sends collects the engine's datagrams

    def _in_order_fragment(self, data, addr, now: float):
        """The fast path for fragments arriving one datagram at a time, in order (no GRO: e.g. the
        underlay's segmentation offload is off): appended to the current train with a header check,
        no per-fragment objects or dictionary. The whole message once its last piece is in, else
        None; ``self._train.fragment is data`` tells the caller the train took it. Anything out of
        order goes through :class:`Reassembly` (the caller spills the train into it first)."""
        if len(data) <= B.FRAGMENT_HEADER_LEN:
            return None
        _kind, index, count, flags, message_id, length = B.FRAGMENT_HEADER.unpack_from(data, 0)
        size = len(data) - B.FRAGMENT_HEADER_LEN
        train = self._train
        if (
            train is not None
            and message_id == train.message_id
            and count == train.count
            and length == train.length
            and addr == train.addr
        ):
            if flags == 0 and index == len(train.pieces):
                if index == count - 1:
                    if train.total + size != length:
                        return None
                    train.pieces.append(memoryview(data)[B.FRAGMENT_HEADER_LEN :])
                    self._train = None
                    self.reassembly.note_complete(addr, message_id)
                    self.stats["fragment_trains_in_order"] += 1
                    return b"".join(train.pieces)
                if size == train.piece_size:
                    train.pieces.append(memoryview(data)[B.FRAGMENT_HEADER_LEN :])
                    train.total += size
                    train.fragment = data
                return None
            if flags == B.FRAGMENT_PARITY and index == count and train.parity is None and size == train.piece_size:
                train.parity = memoryview(data)[B.FRAGMENT_HEADER_LEN :]
                train.fragment = data
            return None
        if flags == 0 and index == 0 and 2 <= count <= B.MAX_FRAGMENTS and (count - 1) * size < length <= count * size:
            if train is not None:
                self._spill_train(now)
            self._train = _Train(addr, message_id, count, length, size, memoryview(data)[B.FRAGMENT_HEADER_LEN :], data)
        return None

    def _spill_train(self, now: float) -> None:
        """Hand an unfinished train's pieces to :class:`Reassembly` (a gap, another message, the
        burst's end): from there parity can rebuild it, or it expires."""
        train = self._train
        if train is None:
            return
        self._train = None
        add = self.reassembly.add
        done = []
        for index, piece in enumerate(train.pieces):
            message = add(B.Fragment(index, train.count, train.message_id, train.length, False, piece), train.addr, now)
            if message is not None:
                done.append(message)
        if train.parity is not None:
            fragment = B.Fragment(train.count, train.count, train.message_id, train.length, True, train.parity)
            message = add(fragment, train.addr, now)
            if message is not None:
                done.append(message)
        for message in done:
            self._datagram(message, train.addr, now)

    def _deliver(self, session, path: PeerPath, pkt: memoryview, rflags: int, gso_size: int, now: float) -> None:
        flow = P.parse_flow(pkt)
        if flow is None:
            self.drops["rx_not_ip"] += 1
            return
        if not self._allowed_source(session, flow.src):
            self.drops["rx_spoofed_source"] += 1
            return
        if not self._is_local(flow.dst):
            self.drops["rx_not_for_us"] += 1
            return
        peer = self._identity(session)
        if not self.firewall.allow(
            INBOUND, flow.proto, flow.dst, flow.dport, flow.src, flow.sport, peer, now, flow.first_fragment,
            P.tcp_flags(pkt, flow),
        ):
            self.drops["firewall_inbound"] += 1
            return
        if flow.proto in EXPRESS_PROTOCOLS and flow.l4_offset == 20 and flow.first_fragment and not gso_size:
            if len(self._express_in) >= EXPRESS_CACHE_MAX:
                self._express_in.clear()
            self._express_in[flow.src + flow.dst] = (session, peer, path)
        path.rx_packets += 1
        if flow.version == 4 and _H.unpack_from(pkt, 2)[0] != len(pkt) and not gso_size:
            self.drops["rx_bad_length"] += 1
            return
        if flow.proto == P.PROTO_TCP and flow.first_fragment and len(pkt) >= flow.l4_offset + P.TCP_MIN_HEADER:
            self._receive_tcp(pkt, flow, rflags, gso_size)
            return
        buf = bytearray(pkt)
        if rflags & B.FLAG_NEEDS_CSUM:
            spot = P.prepare_partial_checksum(buf, flow)
            if spot is None:
                self.drops["rx_bad_checksum_request"] += 1
                return
            hdr = P.VNET_HDR.pack(P.VNET_NEEDS_CSUM, P.GSO_NONE, 0, 0, spot[0], spot[1])
            self._rx.append(hdr + buf)
        else:
            self._rx.append(P.ZERO_VNET_HDR + buf)

    def _receive_tcp(self, pkt: memoryview, flow: P.Flow, rflags: int, gso_size: int) -> None:
        l4 = flow.l4_offset
        hdr_len = l4 + P.tcp_header_len(pkt, l4)
        if hdr_len < l4 + P.TCP_MIN_HEADER or hdr_len > len(pkt):
            self.drops["rx_bad_tcp"] += 1
            return
        payload = len(pkt) - hdr_len
        flow_key = (flow.src, flow.dst, flow.sport, flow.dport)
        last = self._rx[-1] if self._rx else None
        if (
            payload
            and type(last) is _RxSuper
            and last.flow_key == flow_key
            and not last.closed
            and (gso_size or payload) <= last.gso_size
            and last.next_seq == _I.unpack_from(pkt, l4 + 4)[0]
            and len(last.buf) + payload <= MAX_SUPERPACKET
            and self._mergeable(last, pkt, l4, hdr_len)
        ):
            last.buf += pkt[hdr_len:]
            last.buf[l4 + 13] |= pkt[l4 + 13] & P.TCP_PSH
            last.next_seq = (last.next_seq + payload) & 0xFFFFFFFF
            last.merged = True
            seg = gso_size or payload
            if seg < last.gso_size or payload % last.gso_size:
                last.closed = True
            return
        needs_csum = bool(rflags & B.FLAG_NEEDS_CSUM) or gso_size > 0
        segment = gso_size or payload
        entry = _RxSuper(flow_key, bytearray(pkt), flow, hdr_len, segment, needs_csum)
        if not payload or pkt[l4 + 13] & ~(0x10 | P.TCP_PSH):
            entry.closed = True  # SYN/FIN/RST/URG/ECE/CWR or a bare ACK: deliver as is
        if pkt[l4 + 13] & P.TCP_PSH:
            entry.closed = True
        self._rx.append(entry)

    @staticmethod
    def _mergeable(last: _RxSuper, pkt, l4: int, hdr_len: int) -> bool:
        """Same header but for sequence number and checksum (so same ACK, window, options)."""
        if hdr_len != last.hdr_len:
            return False
        flags = pkt[l4 + 13]
        if flags & ~(0x10 | P.TCP_PSH):
            return False
        b = last.buf
        return (
            pkt[l4 + 8 : l4 + 13] == b[l4 + 8 : l4 + 13]
            and pkt[l4 + 14 : l4 + 16] == b[l4 + 14 : l4 + 16]
            and pkt[l4 + 20 : hdr_len] == b[l4 + 20 : hdr_len]
            and (last.flow.version == 6 or pkt[1] == b[1])
        )

    # ------------------------------------------------------------------ outputs and timers

    def take_tun_writes(self) -> list:
        """Frames (virtio-net header + IP packet) to write to the TUN device, in order."""
        out = self._tun_out
        for item in self._rx:
            out.append(item if type(item) is not _RxSuper else self._finish(item))
        self._rx = []
        self._tun_out = []
        return out

    def _finish(self, entry: _RxSuper) -> bytes:
        buf, flow, l4 = entry.buf, entry.flow, entry.flow.l4_offset
        if flow.version == 4:
            if entry.merged or _H.unpack_from(buf, 2)[0] != len(buf):
                _H.pack_into(buf, 2, len(buf))
                _H.pack_into(buf, 10, P.ipv4_header_checksum(buf, l4))
        else:
            _H.pack_into(buf, 4, len(buf) - P.IPV6_HEADER)
        if not (entry.needs_csum or entry.merged):
            return P.ZERO_VNET_HDR + buf
        _H.pack_into(buf, l4 + P.TCP_CHECKSUM_OFFSET, P.pseudo_header_sum(buf, flow))
        payload = len(buf) - entry.hdr_len
        if payload > entry.gso_size:
            gso_type = P.GSO_TCPV4 if flow.version == 4 else P.GSO_TCPV6
            hdr = P.VNET_HDR.pack(P.VNET_NEEDS_CSUM, gso_type, entry.hdr_len, entry.gso_size, l4, P.TCP_CHECKSUM_OFFSET)
        else:
            hdr = P.VNET_HDR.pack(P.VNET_NEEDS_CSUM, P.GSO_NONE, entry.hdr_len, 0, l4, P.TCP_CHECKSUM_OFFSET)
        return hdr + buf

    def has_output(self) -> bool:
        """Anything for :meth:`take_udp_sends` or :meth:`take_tun_writes` (a cheap check per wakeup)."""
        return bool(self._udp_out or self._tun_out or self._rx) or self.engine.has_output()

    def take_udp_sends(self) -> list:
        """(buffer, addr, segment_size): segment_size > 0 means one GSO send of equal-sized datagrams."""
        if self._now is not None:
            self._drain_engine(self._now)
        out, self._udp_out = self._udp_out, []
        return out

    def handle_timer(self, now: float) -> None:
        self.engine.handle_timer(now)
        self.reassembly.expire(now)
        if self._last_tick is None or now - self._last_tick >= 10.0:
            self.firewall.tick(now)
            self._last_tick = now
        self._drain_engine(now)

    def get_timer(self) -> float | None:
        deadlines = [d for d in (self.engine.get_timer(), self.reassembly.next_deadline()) if d is not None]
        return min(deadlines) if deadlines else None

    def _drain_engine(self, now: float) -> None:
        if not self.engine.has_output():
            return
        for datagram, addr in self.engine.datagrams_to_send():
            self._udp_out.append((datagram, addr, 0))
        while True:
            event = self.engine.next_event()
            if event is None:
                break
            name = type(event).__name__
            peer_ip = getattr(event, "peer_ip", None)
            if name == "PacketReceived":
                self._deliver_event_packet(event, now)
            elif peer_ip is not None and name == "PeerUp":
                self.paths.setdefault(peer_ip, PeerPath(self.settings.max_cap)).up_since = now
                self._identity_cache.clear()
                log_event(log, PEER_UP, peer=str(peer_ip), endpoint=_format_endpoint(getattr(event, "endpoint", None)))
            elif peer_ip is not None and name == "PeerDown":
                path = self.paths.get(peer_ip)
                if path is not None:
                    path.up_since = None
                log_event(log, PEER_DOWN, peer=str(peer_ip), reason=getattr(event, "reason", ""))
            elif peer_ip is not None and name == "Rekeyed":
                log_event(log, REKEY, peer=str(peer_ip))
            elif peer_ip is not None and name == "PeerRoamed":
                log_event(log, PEER_ROAMED, peer=str(peer_ip), old=_format_endpoint(event.old),
                          new=_format_endpoint(event.new))
            elif peer_ip is not None and name == "HandshakeFailed":
                self.stats["handshakes-failed"] += 1
                log_event(log, HANDSHAKE_FAILED, logging.WARNING, peer=str(peer_ip), reason=getattr(event, "reason", ""))

    def _deliver_event_packet(self, event, now: float) -> None:
        pkt = memoryview(event.packet)
        session = self.engine.session_for(event.peer_ip, now)
        if session is None:
            self.drops["rx_no_session"] += 1
            return
        self._deliver(session, self._path(session), pkt, 0, 0, now)

    # ------------------------------------------------------------------ helpers

    def _path(self, session) -> PeerPath:
        ip = session.peer_ip
        path = self.paths.get(ip)
        if path is None:
            path = self.paths[ip] = PeerPath(self.settings.max_cap)
        return path

    def _identity(self, session) -> PeerIdentity:
        key = id(session)
        identity = self._identity_cache.get(key)
        if identity is None or identity[0] is not session:
            if len(self._identity_cache) > 1024:
                self._identity_cache.clear()
            identity = self._identity_cache[key] = (session, identity_of(session))
        return identity[1]

    def _is_local(self, raw: bytes) -> bool:
        known = self._local_cache.get(raw)
        if known is None:
            if len(self._local_cache) > 4096:
                self._local_cache.clear()
            address = ipaddress.ip_address(raw)
            known = self._local_cache[raw] = any(address in net for net in self._local_nets)
        return known

    def _allowed_source(self, session, raw: bytes) -> bool:
        key = (id(session), raw)
        known = self._spoof_cache.get(key)
        if known is None:
            if len(self._spoof_cache) > 4096:
                self._spoof_cache.clear()
            known = self._spoof_cache[key] = bool(session.allows_source(raw))
        return known

    def status(self, now: float) -> dict:
        """Peers, their path, handshake age, bytes and drops by reason: what ``flatnet status`` shows."""
        peers = {}
        for ip, path in self.paths.items():
            peers[str(ip)] = {
                "endpoint": _format_endpoint(path.endpoint),
                "up_for": None if path.up_since is None else round(now - path.up_since, 1),
                "tx_bytes": path.tx_bytes,
                "rx_bytes": path.rx_bytes,
                "tx_packets": path.tx_packets,
                "rx_packets": path.rx_packets,
                "tx_messages": path.tx_messages,
                "rx_messages": path.rx_messages,
                "segment_cap": path.cap,
                "retransmissions_seen": path.retransmissions_seen,
                "parity": self.settings.parity == "always" or (self.settings.parity == "auto" and now < path.parity_until),
            }
        drops = Counter(self.drops)
        drops.update(self.reassembly.drops)
        drops.update({f"firewall.{k}": v for k, v in self.firewall.drops.items()})
        drops.update({f"tunnel.{k}": v for k, v in dict(getattr(self.engine, "drops", {}) or {}).items()})
        stats = dict(self.stats)
        stats["messages_rebuilt_from_parity"] = self.reassembly.recovered
        return {"peers": peers, "drops": dict(drops), "stats": stats, "firewall": self.firewall.status()}


def _endpoint(session):
    for name in ("endpoint", "remote", "addr"):
        value = getattr(session, name, None)
        if value is not None:
            return value
    raise AttributeError("the tunnel session has no endpoint")


def _format_endpoint(endpoint) -> str | None:
    if endpoint is None:
        return None
    if isinstance(endpoint, tuple) and len(endpoint) >= 2:
        return f"{endpoint[0]}:{endpoint[1]}"
    return str(endpoint)
