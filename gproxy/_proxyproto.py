"""HAProxy's PROXY protocol, versions 1 and 2: pure functions to build and read the header.

Typical use::

    header = proxyproto.encode(2, ("192.0.2.7", 50312), ("198.51.100.1", 443))
    upstream.sendall(header)                     # once, before any payload

    size = proxyproto.header_size(seen)          # None: read more; raises on garbage
    info = proxyproto.parse(seen[:size])         # ProxyHeader(source=..., destination=...)

The specification is haproxy's ``doc/proxy-protocol.txt``. Everything here works on
bytes; reading a header off a socket without taking a byte of payload (peek, then
read exactly ``header_size``) is the caller's job, see ``relay.Connection``.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

__all__ = [
    "ProxyHeader", "ProxyProtocolError", "SIGNATURE", "V1_MAX", "encode", "encode_v1", "encode_v2",
    "header_size", "parse",
]

#: the 12 bytes every version 2 header starts with
SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: the longest version 1 line a receiver must accept, CRLF included
V1_MAX = 107

_V1_PREFIX = b"PROXY "
_V2_FIXED = 16                      # signature, version/command, family/protocol, length
_UNIX_PATH = 108                    # sizeof(sun_path), the width of each AF_UNIX address
_LOCAL, _PROXY = 0x0, 0x1           # v2 commands (low nibble of byte 13)
_FAMILIES: Dict[int, int] = {socket.AF_INET: 0x1, socket.AF_INET6: 0x2, socket.AF_UNIX: 0x3}
_ADDRESS_LENGTH = {0x1: 12, 0x2: 36, 0x3: 216}

Endpoint = Union[Tuple[str, int], str, bytes]


class ProxyProtocolError(ValueError):
    """Bytes that are not a valid PROXY header; the connection must be dropped."""


@dataclass(frozen=True)
class ProxyHeader:
    """One parsed header.

    ``family`` is ``AF_INET``, ``AF_INET6`` or ``AF_UNIX``, or ``None`` when the header
    carries no usable address (v1 ``UNKNOWN``, v2 ``LOCAL``, or a v2 family/protocol
    this module does not read): the receiver then uses the real connection's addresses.
    ``source``/``destination`` are ``(ip, port)`` for TCP, the path (bytes, NULs
    stripped from the right) for AF_UNIX, ``None`` without an address. ``tlvs`` is the
    raw TLV block of a v2 header (ignored by gproxy, kept for callers)."""

    version: int
    family: Optional[int]
    source: Optional[Endpoint]
    destination: Optional[Endpoint]
    length: int
    local: bool = False
    tlvs: bytes = b""


# -- building ---------------------------------------------------------------------------

def encode(version: int, source, destination, family: Optional[int] = None) -> bytes:
    """The header of ``version`` (1 or 2) for a client at ``source`` that reached ``destination``.

    ``family`` defaults to the one the addresses spell; TCP endpoints are ``(ip, port)``
    (IPv6 scope ids are dropped), AF_UNIX endpoints are paths (str or bytes, possibly
    empty for an unnamed client). Without a family there is no address to tell: v1 sends
    ``PROXY UNKNOWN``, v2 a ``LOCAL`` header with no address block."""
    if family is None:
        family = _family_of(source)
        if family == socket.AF_INET6 and _mapped(source) and _mapped(destination):
            # an IPv4 client of a dual-stack listener: say TCP4, as the client is, so that a
            # receiver's IPv4 allow list matches it (both ends are IPv4 or neither is: v1
            # and v2 carry one family for the pair)
            family = socket.AF_INET
    if version == 1:
        return encode_v1(source, destination, family)
    if version == 2:
        return encode_v2(source, destination, family)
    raise ValueError(f"PROXY protocol version must be 1 or 2, got {version!r}")


def encode_v1(source, destination, family: Optional[int] = None) -> bytes:
    """``PROXY TCP4|TCP6 SRC DST SPORT DPORT\\r\\n``, or ``PROXY UNKNOWN\\r\\n`` for anything
    but TCP over IPv4/IPv6 (v1 has no AF_UNIX)."""
    if family is None:
        family = _family_of(source)
    if family not in (socket.AF_INET, socket.AF_INET6):
        return b"PROXY UNKNOWN\r\n"
    src_ip, src_port = _ip_endpoint(source, family)
    dst_ip, dst_port = _ip_endpoint(destination, family)
    proto = "TCP4" if family == socket.AF_INET else "TCP6"
    return f"PROXY {proto} {_ip_text(src_ip)} {_ip_text(dst_ip)} {src_port} {dst_port}\r\n".encode("ascii")


def encode_v2(source=None, destination=None, family: Optional[int] = None, *, local: bool = False) -> bytes:
    """The binary header: PROXY over TCP/IPv4 (0x11), TCP/IPv6 (0x21) or UNIX stream (0x31);
    ``local`` (or no family) makes a LOCAL header with family UNSPEC and no addresses."""
    if family is None and not local and source is not None:
        family = _family_of(source)
    if local or family is None:
        return SIGNATURE + bytes((0x20 | _LOCAL, 0x00)) + b"\x00\x00"
    if family in (socket.AF_INET, socket.AF_INET6):
        src_ip, src_port = _ip_endpoint(source, family)
        dst_ip, dst_port = _ip_endpoint(destination, family)
        block = src_ip + dst_ip + struct.pack("!HH", src_port, dst_port)
    elif family == socket.AF_UNIX:
        block = _unix_path(source) + _unix_path(destination)
    else:
        raise ValueError(f"no PROXY v2 family for address family {family!r}")
    fam = (_FAMILIES[family] << 4) | 0x1  # STREAM: gproxy forwards TCP and UNIX stream only
    return SIGNATURE + bytes((0x20 | _PROXY, fam)) + struct.pack("!H", len(block)) + block


def _family_of(endpoint) -> Optional[int]:
    if isinstance(endpoint, tuple) and len(endpoint) >= 2:
        host = endpoint[0]
        if not isinstance(host, str):
            return None
        return socket.AF_INET6 if ":" in host else socket.AF_INET
    if isinstance(endpoint, (str, bytes)):
        return socket.AF_UNIX
    return None


def _mapped(endpoint) -> bool:
    """Whether ``endpoint`` is ``(ip, port)`` with an IPv4-mapped IPv6 ip (``::ffff:a.b.c.d``,
    as a dual-stack socket reports an IPv4 peer)."""
    host = endpoint[0] if isinstance(endpoint, tuple) and endpoint and isinstance(endpoint[0], str) else ""
    return host[:7].lower() == "::ffff:" and "." in host


def _strip_scope(host: str) -> str:
    return host.split("%", 1)[0]


_MAPPED = b"\x00" * 10 + b"\xff\xff"  # ::ffff:0:0/96, IPv4-mapped IPv6 addresses


def _ip_endpoint(endpoint, family: int) -> Tuple[bytes, int]:
    """(address in network order for ``family``, port). inet_pton, not ipaddress: it is the
    per-connection path, and glibc's parser is strict (no leading zeroes in IPv4)."""
    if not (isinstance(endpoint, tuple) and len(endpoint) >= 2 and isinstance(endpoint[0], str)):
        raise ValueError(f"expected (ip, port), got {endpoint!r}")
    host = _strip_scope(endpoint[0])
    try:
        if ":" in host:
            ip = socket.inet_pton(socket.AF_INET6, host)
            if family == socket.AF_INET:
                if ip[:12] != _MAPPED:
                    raise ValueError(f"{host} is not an IPv4 address")
                ip = ip[12:]
        else:
            ip = socket.inet_pton(socket.AF_INET, host)
            if family == socket.AF_INET6:
                ip = _MAPPED + ip
    except OSError:
        raise ValueError(f"not an IP address: {host!r}") from None
    port = int(endpoint[1])
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range: {port}")
    return ip, port


def _ip_text(packed: bytes) -> str:
    """The canonical text of a packed address: dotted quad for IPv4; for IPv6 hex groups
    without leading zeroes, the longest run of two or more zero groups as "::" (RFC 5952),
    and never the dotted tail inet_ntop prints for IPv4-mapped addresses, which the spec's
    v1 grammar does not allow."""
    if len(packed) == 4:
        return socket.inet_ntop(socket.AF_INET, packed)
    text = socket.inet_ntop(socket.AF_INET6, packed)
    return _v6_text(packed) if "." in text else text


def _v6_text(packed: bytes) -> str:
    groups = [int.from_bytes(packed[i:i + 2], "big") for i in range(0, 16, 2)]
    best_start, best_len, start = -1, 1, None
    for i, group in enumerate(groups + [1]):
        if group == 0 and start is None:
            start = i
        elif group != 0 and start is not None:
            if i - start > best_len:
                best_start, best_len = start, i - start
            start = None
    text = [f"{g:x}" for g in groups]
    if best_start < 0:
        return ":".join(text)
    return ":".join(text[:best_start]) + "::" + ":".join(text[best_start + best_len:])


def _unix_path(endpoint) -> bytes:
    if endpoint is None:
        endpoint = b""
    path = endpoint.encode() if isinstance(endpoint, str) else bytes(endpoint)
    if len(path) > _UNIX_PATH:
        raise ValueError(f"a Unix socket path has at most {_UNIX_PATH} bytes, got {len(path)}")
    return path.ljust(_UNIX_PATH, b"\x00")


# -- reading ----------------------------------------------------------------------------

def header_size(data: bytes) -> Optional[int]:
    """How many bytes the header at the start of ``data`` has, or ``None`` if more bytes are
    needed to tell. Raises :class:`ProxyProtocolError` as soon as ``data`` cannot be the
    start of a header (so a client speaking something else is dropped without waiting).

    Bytes before the answer are all header: a reader may consume them and ask again with
    more, and must then read exactly the size, never more."""
    n = len(data)
    if not n:
        return None
    if data[0] == 0x0D:  # version 2 (v1 starts with "P")
        if data[:12] != SIGNATURE[:min(n, 12)]:
            raise ProxyProtocolError("not a PROXY protocol header")
        if n < _V2_FIXED:
            if n > 12 and data[12] & 0xF0 != 0x20:
                raise ProxyProtocolError(f"unsupported PROXY protocol version {data[12] >> 4}")
            return None
        if data[12] & 0xF0 != 0x20:
            raise ProxyProtocolError(f"unsupported PROXY protocol version {data[12] >> 4}")
        return _V2_FIXED + struct.unpack_from("!H", data, 14)[0]
    prefix = _V1_PREFIX[:min(n, len(_V1_PREFIX))]
    if data[:len(prefix)] != prefix:
        raise ProxyProtocolError("not a PROXY protocol header")
    end = data.find(b"\r\n", 0, V1_MAX)
    if end >= 0:
        return end + 2
    if n >= V1_MAX:
        raise ProxyProtocolError(f"PROXY v1 line without CRLF in its first {V1_MAX} bytes")
    return None


def parse(header: bytes) -> ProxyHeader:
    """Parse exactly one header (``header_size(header) == len(header)``)."""
    size = header_size(header)
    if size is None or size != len(header):
        raise ProxyProtocolError("incomplete PROXY protocol header" if size is None
                                 else "bytes after the PROXY protocol header")
    if header[0] == 0x0D:
        return _parse_v2(header)
    return _parse_v1(header)


def _parse_v1(header: bytes) -> ProxyHeader:
    try:
        line = header[:-2].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyProtocolError("PROXY v1 line is not US-ASCII") from None
    if "\r" in line or "\n" in line:
        raise ProxyProtocolError("PROXY v1 line has a lone CR or LF")
    parts = line.split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        # the receiver must ignore whatever follows UNKNOWN up to the CRLF
        return ProxyHeader(1, None, None, None, len(header), local=True)
    if len(parts) != 6 or parts[0] != "PROXY" or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyProtocolError(f"malformed PROXY v1 line {line!r}")
    family = socket.AF_INET if parts[1] == "TCP4" else socket.AF_INET6
    src = _v1_ip(parts[2], family)
    dst = _v1_ip(parts[3], family)
    return ProxyHeader(1, family, (src, _v1_port(parts[4])), (dst, _v1_port(parts[5])), len(header))


def _v1_ip(text: str, family: int) -> str:
    try:
        # glibc's inet_pton: no leading zeroes in IPv4 (octal confusion), no IPv6 zone
        return _ip_text(socket.inet_pton(family, text))
    except (OSError, ValueError):
        raise ProxyProtocolError(f"bad address {text!r} in PROXY v1 line") from None


def _v1_port(text: str) -> int:
    # decimal only, no sign, no leading zero (octal confusion), 0..65535
    if not text.isascii() or not text.isdigit() or (len(text) > 1 and text[0] == "0") or len(text) > 5:
        raise ProxyProtocolError(f"bad port {text!r} in PROXY v1 line")
    port = int(text)
    if port > 65535:
        raise ProxyProtocolError(f"bad port {text!r} in PROXY v1 line")
    return port


def _parse_v2(header: bytes) -> ProxyHeader:
    command = header[12] & 0x0F
    fam, proto = header[13] >> 4, header[13] & 0x0F
    body = header[_V2_FIXED:]
    if command not in (_LOCAL, _PROXY):
        raise ProxyProtocolError(f"unsupported PROXY v2 command {command:#x}")
    if fam > 0x3 or proto > 0x2:
        raise ProxyProtocolError(f"invalid PROXY v2 family/protocol byte {header[13]:#04x}")
    if command == _LOCAL:
        # the real endpoints count; the address block (if any) is skipped by its length
        return ProxyHeader(2, None, None, None, len(header), local=True)
    need = _ADDRESS_LENGTH.get(fam)
    if need is None or proto == 0x0:
        # UNSPEC: nothing usable, use the real endpoints (allowed by the spec)
        return ProxyHeader(2, None, None, None, len(header))
    if len(body) < need:
        raise ProxyProtocolError(f"PROXY v2 address block of {len(body)} bytes, needs {need}")
    tlvs = bytes(body[need:])
    if proto != 0x1:  # DGRAM: gproxy forwards streams; a datagram header tells it nothing usable
        return ProxyHeader(2, None, None, None, len(header), tlvs=tlvs)
    if fam == 0x1:
        src = _ip_text(bytes(body[0:4]))
        dst = _ip_text(bytes(body[4:8]))
        sport, dport = struct.unpack_from("!HH", body, 8)
        return ProxyHeader(2, socket.AF_INET, (src, sport), (dst, dport), len(header), tlvs=tlvs)
    if fam == 0x2:
        src = _ip_text(bytes(body[0:16]))
        dst = _ip_text(bytes(body[16:32]))
        sport, dport = struct.unpack_from("!HH", body, 32)
        return ProxyHeader(2, socket.AF_INET6, (src, sport), (dst, dport), len(header), tlvs=tlvs)
    src_path = bytes(body[0:_UNIX_PATH]).rstrip(b"\x00")
    dst_path = bytes(body[_UNIX_PATH:2 * _UNIX_PATH]).rstrip(b"\x00")
    return ProxyHeader(2, socket.AF_UNIX, src_path, dst_path, len(header), tlvs=tlvs)
