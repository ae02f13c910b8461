"""The pcap file format, and TCP conversations synthesised into it: bytes in, packets out.

Typical use (``_capture.py`` drives it; nothing here does I/O)::

    out.write(file_header())
    conv = Conversation(("10.0.0.1", 50000), ("10.0.0.2", 6379))   # opener, acceptor
    out.write(conv.handshake(time.time()))
    out.write(conv.send(0, b"PING\\r\\n", time.time()))            # side 0 -> side 1
    out.write(conv.fin(0, time.time()))                             # side 0 half-closes
    out.write(conv.rst(1, time.time()))                             # side 1 resets

The file is classic libpcap (magic ``a1b2c3d4``, version 2.4, microsecond timestamps,
little-endian as written), link type ``LINKTYPE_RAW`` (101): each record is one IP
packet, IPv4 or IPv6 by its first nibble, so one file holds both families without a made-up
Ethernet header. The packets are what a TCP stack would have put on the wire for the bytes
a side sent, as far as a reader needs to rebuild the streams:

- a handshake (SYN, SYN-ACK, ACK) with an MSS option (the segment size below) and a
  window-scale one, so the advertised window (65535 << 7, 8 MiB) never reads as full;
- data segments (PSH|ACK) of at most what one IPv4 packet carries (65495 bytes, for IPv6
  too), sequence numbers that follow the bytes from a random initial
  number (wrapping at 2**32), and an ACK of everything the other side sent;
- a pure ACK from the receiver once it holds ``ACK_EVERY`` unacknowledged bytes, so a
  long one-way stream does not look like a stalled one;
- FIN|ACK (it takes one sequence number) and RST|ACK;
- IPv4 header and TCP checksums computed, so Wireshark and tcpdump flag none.

Checksums use one identity: the 16-bit one's-complement sum of a byte string is its value as
a big-endian integer modulo 0xffff (2**16 = 1 mod 0xffff), which CPython computes in C; and
the same bytes sent on both conversations of a connection are summed once.
"""

from __future__ import annotations

import ipaddress
import random
import struct
from typing import List, Optional, Tuple

__all__ = ["LINKTYPE_RAW", "file_header", "Conversation", "checksum", "word_sum", "MAX_SEGMENT", "ACK_EVERY"]

MAGIC = 0xA1B2C3D4
LINKTYPE_RAW = 101
#: the largest record a reader must accept: an IPv6 packet with a full 65535-byte payload
SNAPLEN = 65535 + 40
#: data bytes per segment: what an IPv4 packet's 16-bit total length leaves after the headers
#: (IPv6 could carry 20 more; one size for both lets two conversations of a connection cut a
#: chunk alike, and share its payload sums, see ``Conversation.send``)
MAX_SEGMENT = 65535 - 20 - 20
#: unacknowledged bytes after which the receiver sends a pure ACK
ACK_EVERY = 1 << 20
_WSCALE = 7
_WINDOW = 65535

_FIN, _SYN, _RST, _PSH, _ACK = 0x01, 0x02, 0x04, 0x08, 0x10

_RECORD = struct.Struct("<IIII")        # ts_sec, ts_usec, incl_len, orig_len
_TCP = struct.Struct("!HHIIBBHHH")      # ports, seq, ack, offset, flags, window, checksum, urgent
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_IPV6 = struct.Struct("!IHBB16s16s")


def file_header() -> bytes:
    """The 24 bytes a pcap file starts with."""
    return struct.pack("<IHHiIII", MAGIC, 2, 4, 0, 0, SNAPLEN, LINKTYPE_RAW)


def word_sum(data) -> int:
    """The sum of ``data``'s big-endian 16-bit words (a last odd byte zero-padded), modulo
    0xffff: its value as an integer, folded in halves (a shift and an add each, at memory
    speed; a division of a 64 KiB integer costs twice as much)."""
    value = int.from_bytes(data, "big")
    bits = len(data) * 8
    if bits & 8:
        value <<= 8   # the odd byte is the high half of a last, zero-padded word
        bits += 8
    while bits > 64:
        half = bits // 32 * 16            # a multiple of 16 bits: 2**half = 1 (mod 0xffff)
        value = (value >> half) + (value & ((1 << half) - 1))
        bits = max(bits - half, half) + 1
    return value % 0xFFFF


def checksum(*parts, payload_sum: int = 0) -> int:
    """The Internet checksum (RFC 1071) of the concatenation of ``parts`` and a payload whose
    ``word_sum`` is ``payload_sum``; every part before the payload has an even length. A
    non-zero sum that folds to zero is 0xffff in one's complement: its checksum is 0."""
    total = payload_sum
    for part in parts:
        total += word_sum(part)
    total %= 0xFFFF
    if total == 0 and not payload_sum and not any(any(part) for part in parts):
        return 0xFFFF   # all zeros (never a header of ours)
    return ~total & 0xFFFF


class _End:
    """One side of a conversation: its address and what it sent so far."""

    __slots__ = ("ip", "port", "packed", "next", "acked")

    def __init__(self, address: Tuple[str, int], isn: int):
        self.ip = ipaddress.ip_address(address[0].split("%", 1)[0])
        self.port = address[1]
        self.packed = self.ip.packed
        self.next = isn          # the sequence number of its next byte
        self.acked = isn         # what the other side acknowledged of it


class Conversation:
    """One TCP connection between ``opener`` and ``acceptor`` (``(host, port)`` each, of one
    IP family): side 0 is the opener, side 1 the acceptor. Each method returns the records to
    append to the file (bytes, possibly empty); ``t`` is a ``time.time()`` timestamp."""

    def __init__(self, opener: Tuple[str, int], acceptor: Tuple[str, int],
                 isns: Optional[Tuple[int, int]] = None) -> None:
        if isns is None:
            isns = (random.getrandbits(32), random.getrandbits(32))
        self.ends = (_End(opener, isns[0]), _End(acceptor, isns[1]))
        self.version = self.ends[0].ip.version
        if self.ends[1].ip.version != self.version:
            raise ValueError(f"one conversation, two IP families: {opener} and {acceptor}")
        self.ident = [0, 0]      # IPv4 identification, per side
        self.closed = [False, False]   # FIN sent, per side
        self.reset = False

    def handshake(self, t: float) -> bytes:
        a, b = self.ends
        # MSS (what one packet carries), NOP, window scale
        options = struct.pack("!BBHBBBB", 2, 4, MAX_SEGMENT, 1, 3, 3, _WSCALE)
        out = [self._packet(0, _SYN, t, 0, options=options)]
        a.next = (a.next + 1) & 0xFFFFFFFF
        out.append(self._packet(1, _SYN | _ACK, t, a.next, options=options))
        b.next = (b.next + 1) & 0xFFFFFFFF
        a.acked, b.acked = a.next, b.next
        out.append(self._packet(0, _ACK, t))
        return b"".join(out)

    def send(self, side: int, data, t: float, sums: Optional[List[int]] = None) -> bytes:
        """``data`` (bytes-like) sent by ``side``: data segments, and the receiver's ACK
        when it is due. Nothing after a FIN from that side or a reset. ``sums``: the payload
        sums of ``data``'s segments, if known (another conversation sent the same bytes), else
        an empty list to fill, or None. A segment's checksum is most of a capture's cost."""
        if self.closed[side] or self.reset or not data:
            return b""
        end = self.ends[side]
        view = memoryview(data).cast("B")
        known = bool(sums)
        out: List[bytes] = []
        for index, start in enumerate(range(0, len(view), MAX_SEGMENT)):
            piece = view[start:start + MAX_SEGMENT]
            if known:
                piece_sum = sums[index]   # type: ignore[index]
            else:
                piece_sum = word_sum(piece)
                if sums is not None:
                    sums.append(piece_sum)
            out.append(self._packet(side, _PSH | _ACK, t, payload=piece, payload_sum=piece_sum))
            end.next = (end.next + len(piece)) & 0xFFFFFFFF
            if (end.next - end.acked) & 0xFFFFFFFF >= ACK_EVERY:
                out.append(self._packet(1 - side, _ACK, t))
        return b"".join(out)

    def fin(self, side: int, t: float) -> bytes:
        """``side`` half-closes (once; nothing after a reset)."""
        if self.closed[side] or self.reset:
            return b""
        self.closed[side] = True
        end = self.ends[side]
        packet = self._packet(side, _FIN | _ACK, t)
        end.next = (end.next + 1) & 0xFFFFFFFF
        return packet

    def rst(self, side: int, t: float) -> bytes:
        """``side`` resets the connection (once: after that nothing more is sent)."""
        if self.reset:
            return b""
        self.reset = True
        return self._packet(side, _RST | _ACK, t)

    def _packet(self, side: int, flags: int, t: float, ack: Optional[int] = None,
                payload=b"", options: bytes = b"", payload_sum: int = 0) -> bytes:
        src, dst = self.ends[side], self.ends[1 - side]
        if ack is None:
            ack = dst.next
            dst.acked = ack
        tcp_length = 20 + len(options) + len(payload)
        header = _TCP.pack(src.port, dst.port, src.next, ack if flags & _ACK else 0,
                           (20 + len(options)) << 2, flags, _WINDOW, 0, 0) + options
        if self.version == 4:
            pseudo = src.packed + dst.packed + struct.pack("!BBH", 0, 6, tcp_length)
        else:
            pseudo = src.packed + dst.packed + struct.pack("!I3xB", tcp_length, 6)
        tcp_sum = checksum(pseudo, header, payload_sum=payload_sum)
        header = header[:16] + struct.pack("!H", tcp_sum) + header[18:]
        if self.version == 4:
            ident = self.ident[side] = (self.ident[side] + 1) & 0xFFFF
            ip = _IPV4.pack(0x45, 0, 20 + tcp_length, ident, 0x4000, 64, 6, 0, src.packed, dst.packed)
            ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
        else:
            ip = _IPV6.pack(0x60000000, tcp_length, 6, 64, src.packed, dst.packed)
        length = len(ip) + tcp_length
        seconds = int(t)
        record = _RECORD.pack(seconds, min(int((t - seconds) * 1e6), 999999), length, length)
        return b"".join((record, ip, header, payload))
