"""A pcap reader for the capture tests, written from the formats' specs (libpcap, RFC 791,
RFC 8200, RFC 793), independent of gproxy._pcap: it checks what it reads (lengths, both
checksums, sequence numbers that follow the bytes) and rebuilds each TCP stream."""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10

Endpoint = Tuple[str, int]


def internet_checksum_ok(data: bytes) -> bool:
    """RFC 1071, word by word: the sum over a header including its checksum folds to 0xffff."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total == 0xFFFF


@dataclass
class Segment:
    time: float
    src: Endpoint
    dst: Endpoint
    seq: int
    ack: int
    flags: int
    window: int
    payload: bytes


def read(path) -> Tuple[int, List[Segment]]:
    """(link type, every TCP segment in order), asserting each record is well formed."""
    with open(path, "rb") as f:
        data = f.read()
    magic, major, minor, _zone, _sigfigs, snaplen, linktype = struct.unpack("<IHHiIII", data[:24])
    assert magic == 0xA1B2C3D4 and (major, minor) == (2, 4), (hex(magic), major, minor)
    segments = []
    offset = 24
    while offset < len(data):
        sec, usec, incl, orig = struct.unpack("<IIII", data[offset:offset + 16])
        assert incl == orig <= snaplen and usec < 1_000_000
        packet = data[offset + 16:offset + 16 + incl]
        assert len(packet) == incl, "truncated record"
        offset += 16 + incl
        version = packet[0] >> 4
        if version == 4:
            ihl = (packet[0] & 15) * 4
            total, proto = struct.unpack("!H", packet[2:4])[0], packet[9]
            assert total == len(packet) <= 65535 and proto == 6
            assert internet_checksum_ok(packet[:ihl]), "IPv4 header checksum"
            src_ip, dst_ip = packet[12:16], packet[16:20]
            tcp = packet[ihl:]
            pseudo = src_ip + dst_ip + struct.pack("!BBH", 0, 6, len(tcp))
        else:
            assert version == 6
            length, next_header = struct.unpack("!HB", packet[4:7])
            assert length == len(packet) - 40 and next_header == 6
            src_ip, dst_ip = packet[8:24], packet[24:40]
            tcp = packet[40:]
            pseudo = src_ip + dst_ip + struct.pack("!I3xB", len(tcp), 6)
        assert internet_checksum_ok(pseudo + tcp), "TCP checksum"
        sport, dport, seq, ack, offset_byte, flags, window = struct.unpack("!HHIIBBH", tcp[:16])
        header = (offset_byte >> 4) * 4
        segments.append(Segment(sec + usec / 1e6, (str(ipaddress.ip_address(src_ip)), sport),
                                (str(ipaddress.ip_address(dst_ip)), dport), seq, ack, flags, window,
                                tcp[header:]))
    return linktype, segments


@dataclass
class Half:
    """One direction of a TCP conversation, rebuilt."""
    syn: bool = False
    data: bytearray = field(default_factory=bytearray)
    fin: bool = False
    rst: bool = False
    next: int = 0


@dataclass
class Stream:
    opener: Endpoint
    acceptor: Endpoint
    halves: Dict[Endpoint, Half] = field(default_factory=dict)

    def sent_by(self, end: Endpoint) -> Half:
        return self.halves[end]


def streams(segments: List[Segment]) -> List[Stream]:
    """Each conversation in the order it opened, its two halves rebuilt: every one must open
    with SYN / SYN-ACK, every data segment and FIN must carry the next sequence number of its
    side, every ACK must acknowledge what the other side sent before it, nothing may follow
    a side's FIN or RST, and timestamps never go back."""
    found: Dict[frozenset, Stream] = {}
    last_time = 0.0
    for seg in segments:
        assert seg.time >= last_time
        last_time = seg.time
        key = frozenset((seg.src, seg.dst))
        stream = found.get(key)
        if stream is None:
            assert seg.flags == SYN, f"conversation {seg.src}->{seg.dst} does not start with SYN"
            stream = found[key] = Stream(seg.src, seg.dst)
            stream.halves[seg.src] = Half(syn=True, next=(seg.seq + 1) & 0xFFFFFFFF)
            continue
        half = stream.halves.get(seg.src)
        other = stream.halves.get(seg.dst)
        if half is None:
            assert seg.flags == SYN | ACK and seg.ack == other.next, "SYN-ACK"
            stream.halves[seg.src] = Half(syn=True, next=(seg.seq + 1) & 0xFFFFFFFF)
            continue
        assert not half.fin and not half.rst and not other.rst, f"{seg.src} sent after its end"
        assert seg.flags & ACK and seg.ack == other.next, (seg, other.next)
        assert seg.seq == half.next, f"{seg.src}: seq {seg.seq}, expected {half.next}"
        if seg.flags & RST:
            half.rst = True
            continue
        half.data += seg.payload
        half.next = (half.next + len(seg.payload)) & 0xFFFFFFFF
        if seg.flags & FIN:
            half.fin = True
            half.next = (half.next + 1) & 0xFFFFFFFF
    return list(found.values())
