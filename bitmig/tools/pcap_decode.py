"""Decode bitmig sessions from a packet capture (pcap or pcapng) into trace records.

Each TCP connection to the destination port is reassembled per direction by sequence
number (out-of-order segments wait, retransmitted bytes are dropped), and the two byte
streams are fed, in capture order, to a pair of sans-IO Connections: a DESTINATION view
that receives what the source sent and a SOURCE view that receives what the destination
sent. Every decoded frame becomes a `bitmig.daemon.trace_writer.frame_record`, seen from
the side the caller picks, so `bitmig trace show/summary` read captures and daemon traces alike.

Needs dpkt (the `pcap` extra).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from bitmig.daemon.trace_writer import frame_record
from bitmig.protocol import spec
from bitmig.protocol.codec import decode_body
from bitmig.protocol.connection import Connection
from bitmig.protocol.errors import ProtocolError
from bitmig.protocol.events import BitmapFailed, Event
from bitmig.protocol.spec import Role

# Link-layer types met in practice (tcpdump -i lo/eth0/any, raw IP captures).
DLT_NULL, DLT_EN10MB, DLT_RAW, DLT_RAW_OPENBSD, DLT_LOOP = 0, 1, 101, 12, 108
DLT_LINUX_SLL, DLT_LINUX_SLL2, DLT_IPV4, DLT_IPV6 = 113, 276, 228, 229

Endpoint = tuple[str, int]


def _open_reader(f: Any) -> Any:
    import dpkt

    magic = f.read(4)
    f.seek(0)
    if magic == b"\x0a\x0d\x0d\x0a":
        return dpkt.pcapng.Reader(f)
    return dpkt.pcap.Reader(f)


def _ip_of(linktype: int, buf: bytes) -> Any:
    """The IPv4/IPv6 packet inside one link-layer frame, or None."""
    import dpkt

    try:
        if linktype == DLT_EN10MB:
            eth = dpkt.ethernet.Ethernet(buf)
            return eth.data if isinstance(eth.data, (dpkt.ip.IP, dpkt.ip6.IP6)) else None
        if linktype == DLT_LINUX_SLL:
            ip = dpkt.sll.SLL(buf).data
        elif linktype == DLT_LINUX_SLL2:
            (proto,) = struct.unpack_from(">H", buf, 0)
            payload = buf[20:]
            ip = dpkt.ip6.IP6(payload) if proto == 0x86DD else dpkt.ip.IP(payload)
        elif linktype in (DLT_NULL, DLT_LOOP):
            payload = buf[4:]
            ip = dpkt.ip6.IP6(payload) if payload[:1] and payload[0] >> 4 == 6 \
                else dpkt.ip.IP(payload)
        elif linktype in (DLT_RAW, DLT_RAW_OPENBSD, DLT_IPV4, DLT_IPV6):
            ip = dpkt.ip6.IP6(buf) if buf[:1] and buf[0] >> 4 == 6 else dpkt.ip.IP(buf)
        else:
            raise ValueError(f"unsupported link-layer type {linktype}")
    except (dpkt.UnpackError, struct.error, IndexError):
        return None
    return ip if isinstance(ip, (dpkt.ip.IP, dpkt.ip6.IP6)) else None


def _addr(ip: Any, raw: bytes) -> str:
    import dpkt

    fam = socket.AF_INET6 if isinstance(ip, dpkt.ip6.IP6) else socket.AF_INET
    return socket.inet_ntop(fam, raw)


@dataclass
class _Direction:
    """One direction of a TCP connection, reassembled by sequence number."""

    base: int | None = None  # sequence number of the first data byte
    next: int = 0  # relative offset of the next byte expected
    pending: dict[int, bytes] = field(default_factory=dict)  # out-of-order, by offset
    fin: bool = False

    def segment(self, seq: int, syn: bool, data: bytes) -> bytes:
        """Take one segment; return the bytes that became contiguous (maybe none)."""
        if syn:  # a retransmitted SYN carries the same sequence number
            if self.base is None:
                self.base = (seq + 1) & 0xFFFFFFFF
            seq = (seq + 1) & 0xFFFFFFFF
        if not data:
            return b""
        if self.base is None:  # capture began mid-connection: start at the first data seen
            self.base = seq
        off = (seq - self.base) & 0xFFFFFFFF
        if off >= 1 << 31:  # before the base: an old retransmission
            off -= 1 << 32
        end = off + len(data)
        if end <= self.next:
            return b""  # retransmission of delivered bytes
        if off > self.next:
            old = self.pending.get(off)
            if old is None or len(old) < len(data):
                self.pending[off] = data
            return b""
        out = [data[self.next - off:]]
        self.next = end
        while self.pending:  # pull in segments that are now contiguous
            ready = [o for o in self.pending if o <= self.next]
            if not ready:
                break
            for o in sorted(ready):
                d = self.pending.pop(o)
                if o + len(d) > self.next:
                    out.append(d[self.next - o:])
                    self.next = o + len(d)
        return b"".join(out)


class _Framer:
    """Splits one direction's byte stream into whole frames (prefix included)."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def frames(self, data: bytes) -> list[bytes]:
        self.buf += data
        out: list[bytes] = []
        p = spec.LENGTH_PREFIX.size
        pos = 0
        while len(self.buf) - pos >= p:
            (n,) = spec.LENGTH_PREFIX.unpack_from(self.buf, pos)
            if len(self.buf) - pos < p + n:
                break
            out.append(bytes(self.buf[pos:pos + p + n]))
            pos += p + n
        del self.buf[:pos]
        return out


Decoded = tuple[Event | None, int, str | None]  # event, frame bytes, problem


class _Session:
    """One TCP connection: both directions, framed, and both protocol views.

    Each whole frame is fed to the receiving side's Connection, which validates it
    against the state machine; the other view then "sends" the same event so both views
    keep in step. After the first violation frames are only decoded, not validated.
    """

    def __init__(self, source: Endpoint, dest: Endpoint) -> None:
        self.source, self.dest = source, dest
        self.dirs = {source: _Direction(), dest: _Direction()}
        self.framers = {source: _Framer(), dest: _Framer()}
        # The destination's view receives the source's bytes, and the other way round.
        self.views = {source: Connection(Role.DESTINATION), dest: Connection(Role.SOURCE)}
        self.validating = True

    def feed(self, sender: Endpoint, data: bytes) -> list[Decoded]:
        out: list[Decoded] = []
        other = self.dest if sender == self.source else self.source
        for frame in self.framers[sender].frames(data):
            if self.validating:
                try:
                    (ev,) = self.views[sender].receive_data(frame)
                    if type(ev) is BitmapFailed:  # one bitmap fails; the connection goes on
                        out.append((decode_body(frame[spec.LENGTH_PREFIX.size:]), len(frame),
                                    f"{ev.code}: {ev.message}"))
                        continue
                    self.views[other].send(ev)
                    out.append((ev, len(frame), None))
                    continue
                except ProtocolError as e:
                    self.validating = False
                    problem = f"{e.code}: {e.message}"
            else:
                problem = None
            try:
                out.append((decode_body(frame[spec.LENGTH_PREFIX.size:]), len(frame), problem))
            except ProtocolError as e:
                out.append((None, len(frame), problem or f"{e.code}: {e.message}"))
        return out


def packets(path: str) -> Iterator[tuple[float, int, bytes]]:
    """(time, link type, frame bytes) of every packet in a pcap or pcapng file."""
    import dpkt

    with open(path, "rb") as f:
        r = _open_reader(f)
        if isinstance(r, dpkt.pcapng.Reader):
            # dpkt's pcapng reader reports only the first interface's link type.
            for ts, buf in r:
                yield ts, r.datalink(), buf
        else:
            lt = r.datalink()
            for ts, buf in r:
                yield ts, lt, buf


def decode_capture(path: str, port: int, view: str = Role.SOURCE) -> list[dict[str, Any]]:
    """Trace records of every bitmig frame on TCP `port` in the capture at `path`.

    `view` is "source" or "destination": whose trace the records imitate (the direction
    of each frame and the peer named). Records carry "mono"/"wall" (capture time),
    "side", and "conn" (source endpoint -> destination endpoint). Protocol violations
    become records of type "decode_error"; decoding then goes on without validation.
    """
    import dpkt

    if view not in list(Role):
        raise ValueError(f"view must be source or destination, not {view!r}")
    sessions: dict[tuple[Endpoint, Endpoint], _Session] = {}
    records: list[dict[str, Any]] = []
    for ts, lt, buf in packets(path):
        ip = _ip_of(lt, buf)
        if ip is None or not isinstance(ip.data, dpkt.tcp.TCP):
            continue
        tcp = ip.data
        if port not in (tcp.sport, tcp.dport):
            continue
        src: Endpoint = (_addr(ip, ip.src), tcp.sport)
        dst: Endpoint = (_addr(ip, ip.dst), tcp.dport)
        key = (src, dst) if tcp.dport == port else (dst, src)  # (source, destination)
        s = sessions.get(key)
        syn = bool(tcp.flags & dpkt.tcp.TH_SYN)
        if s is None or (syn and not tcp.flags & dpkt.tcp.TH_ACK and s.dirs[src].next > 0):
            s = sessions[key] = _Session(*key)  # new (or reused 4-tuple) connection
        data = s.dirs[src].segment(tcp.seq, syn, bytes(tcp.data))
        if not data:
            continue
        from_source = src == key[0]
        for event, nbytes, problem in s.feed(src, data):
            if view == Role.SOURCE:
                direction = "send" if from_source else "recv"
                peer = f"{key[1][0]}:{key[1][1]}"
            else:
                direction = "recv" if from_source else "send"
                peer = f"{key[0][0]}:{key[0][1]}"
            base = {"mono": ts, "wall": ts, "side": view,
                    "conn": f"{key[0][0]}:{key[0][1]}->{key[1][0]}:{key[1][1]}"}
            if problem is not None:
                records.append({**base, "type": "decode_error", "dir": direction,
                                "peer": peer, "bytes": nbytes, "error": problem})
            if event is not None:
                records.append({**base, **frame_record(direction, peer, event, nbytes)})
    for s in sessions.values():
        for sender, framer in s.framers.items():
            left = len(framer.buf)
            if left:
                records.append({"mono": records[-1]["mono"] if records else 0.0,
                                "wall": records[-1]["wall"] if records else 0.0,
                                "side": view, "type": "decode_error",
                                "conn": f"{s.source[0]}:{s.source[1]}->{s.dest[0]}:"
                                        f"{s.dest[1]}",
                                "error": f"capture ends inside a frame ({left} bytes from "
                                         f"{sender[0]}:{sender[1]} buffered)"})
    return records
