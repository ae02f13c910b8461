"""PROXY protocol headers against the bytes of haproxy's doc/proxy-protocol.txt."""

from __future__ import annotations

import socket

import pytest

from gproxy import _proxyproto
from gproxy._proxyproto import ProxyProtocolError, header_size, parse

SIG = b"\x0D\x0A\x0D\x0A\x00\x0D\x0A\x51\x55\x49\x54\x0A"  # section 2.2, byte by byte


def test_signature_is_the_specs():
    assert _proxyproto.SIGNATURE == SIG
    assert len(SIG) == 12 and SIG[4] == 0


def test_v1_tcp4_is_the_specs_example():
    line = _proxyproto.encode(1, ("192.168.0.1", 56324), ("192.168.0.11", 443))
    assert line == b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
    info = parse(line)
    assert (info.version, info.family) == (1, socket.AF_INET)
    assert info.source == ("192.168.0.1", 56324) and info.destination == ("192.168.0.11", 443)
    assert info.length == len(line)


def test_v1_longest_lines_fit_the_limits():
    v4 = _proxyproto.encode_v1(("255.255.255.255", 65535), ("255.255.255.255", 65535))
    assert len(v4) == 56
    full = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    v6 = _proxyproto.encode_v1((full, 65535), (full, 65535))
    assert v6 == f"PROXY TCP6 {full} {full} 65535 65535\r\n".encode() and len(v6) == 104
    assert header_size(v6) == 104
    worst = f"PROXY UNKNOWN {full} {full} 65535 65535\r\n".encode()
    assert len(worst) == _proxyproto.V1_MAX == 107
    assert parse(worst).family is None and parse(worst).local


def test_v1_tcp6_canonical_form():
    line = _proxyproto.encode(1, ("::1", 40000), ("2001:0db8:0000:0000:0000:0000:0000:0001", 80))
    assert line == b"PROXY TCP6 ::1 2001:db8::1 40000 80\r\n"
    assert parse(line).source == ("::1", 40000)
    # upper case hex is allowed on reading
    assert parse(b"PROXY TCP6 2001:DB8::1 ::1 1 2\r\n").source == ("2001:db8::1", 1)


@pytest.mark.parametrize("version", [1, 2])
def test_an_ipv4_client_of_a_dual_stack_socket_is_sent_as_tcp4(version):
    """A [::] listener reports an IPv4 peer as ::ffff:a.b.c.d; the header says what the client
    is, TCP4, so that the receiver's IPv4 allow lists match it."""
    header = _proxyproto.encode(version, ("::ffff:127.0.0.3", 999), ("::FFFF:127.0.0.1", 443))
    info = parse(header)
    assert info.family == socket.AF_INET
    assert info.source == ("127.0.0.3", 999) and info.destination == ("127.0.0.1", 443)
    # one mapped end and one real IPv6 end cannot both be TCP4: the pair stays TCP6
    mixed = parse(_proxyproto.encode(version, ("::ffff:127.0.0.3", 999), ("::1", 443)))
    assert mixed.family == socket.AF_INET6 and mixed.source == ("::ffff:7f00:3", 999)


def test_v1_unknown_for_what_it_cannot_carry():
    assert _proxyproto.encode_v1(b"/run/client.sock", "/run/gproxy.sock") == b"PROXY UNKNOWN\r\n"
    assert _proxyproto.encode(1, None, None) == b"PROXY UNKNOWN\r\n"
    info = parse(b"PROXY UNKNOWN\r\n")
    assert info.family is None and info.source is None and info.length == 15


@pytest.mark.parametrize("line", [
    b"PROXY TCP4 192.168.0.1 192.168.0.11 056324 443\r\n",   # leading zero in a port
    b"PROXY TCP4 192.168.0.01 192.168.0.11 56324 443\r\n",   # leading zero in an address
    b"PROXY TCP4 192.168.0.1 192.168.0.11 65536 443\r\n",    # port out of range
    b"PROXY TCP4 192.168.0.1  192.168.0.11 56324 443\r\n",   # two spaces
    b"PROXY TCP4 ::1 ::1 1 2\r\n",                          # family and address disagree
    b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n",
    b"PROXY TCP5 1.2.3.4 1.2.3.4 1 2\r\n",                  # no such protocol
    b"PROXY TCP4 1.2.3.4 1.2.3.4 1 +2\r\n",
    b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\n\r\n",                # a lone LF inside
    b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2 3\r\n",                # a field too many
])
def test_v1_invalid_lines_are_refused(line):
    with pytest.raises(ProxyProtocolError):
        parse(line)


def test_v1_needs_crlf_within_107_bytes():
    assert header_size(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r") is None   # CR seen, LF not yet
    assert header_size(b"PROX") is None
    with pytest.raises(ProxyProtocolError):
        header_size(b"PROXY " + b"x" * 101)          # 107 bytes and no CRLF
    with pytest.raises(ProxyProtocolError):
        header_size(b"GET / HTTP/1.1\r\n")           # not PROXY: refused at once
    with pytest.raises(ProxyProtocolError):
        header_size(b"PROXYX")


def test_v1_header_size_stops_at_the_first_crlf():
    line = b"PROXY TCP4 10.0.0.1 10.0.0.2 1000 2000\r\n"
    assert header_size(line + b"GET / HTTP/1.1\r\n\r\n") == len(line)


def test_v2_tcp4_bytes():
    header = _proxyproto.encode(2, ("192.168.0.1", 56324), ("192.168.0.11", 443))
    assert header == (SIG + b"\x21\x11\x00\x0c"
                      + bytes([192, 168, 0, 1]) + bytes([192, 168, 0, 11])
                      + (56324).to_bytes(2, "big") + (443).to_bytes(2, "big"))
    assert len(header) == 16 + 12
    info = parse(header)
    assert (info.version, info.family, info.local) == (2, socket.AF_INET, False)
    assert info.source == ("192.168.0.1", 56324) and info.destination == ("192.168.0.11", 443)


def test_v2_tcp6_bytes():
    header = _proxyproto.encode(2, ("::1", 40000), ("2001:db8::2", 8443))
    assert header[:16] == SIG + b"\x21\x21\x00\x24"   # 36 bytes of addresses
    assert header[16:32] == b"\x00" * 15 + b"\x01"
    assert header[32:48] == b"\x20\x01\x0d\xb8" + b"\x00" * 11 + b"\x02"
    assert header[48:] == (40000).to_bytes(2, "big") + (8443).to_bytes(2, "big")
    info = parse(header)
    assert info.family == socket.AF_INET6 and info.source == ("::1", 40000)
    assert info.destination == ("2001:db8::2", 8443)


def test_v2_unix_bytes():
    header = _proxyproto.encode(2, b"", "/run/gproxy.sock", socket.AF_UNIX)
    assert header[:16] == SIG + b"\x21\x31\x00\xd8"   # 216 = 2 * 108
    assert header[16:124] == b"\x00" * 108
    assert header[124:] == b"/run/gproxy.sock".ljust(108, b"\x00")
    info = parse(header)
    assert info.family == socket.AF_UNIX and info.source == b"" and info.destination == b"/run/gproxy.sock"
    abstract = parse(_proxyproto.encode_v2(b"\x00client", b"\x00srv", socket.AF_UNIX))
    assert abstract.source == b"\x00client"


def test_v2_local_has_no_addresses():
    header = _proxyproto.encode_v2(local=True)
    assert header == SIG + b"\x20\x00\x00\x00"
    assert _proxyproto.encode(2, None, None) == header
    info = parse(header)
    assert info.local and info.family is None and info.length == 16


def test_v2_local_with_an_address_block_is_skipped_by_its_length():
    header = SIG + b"\x20\x11\x00\x0c" + bytes(12)
    assert header_size(header + b"payload") == 28
    info = parse(header)
    assert info.local and info.family is None


def test_v2_tlvs_are_kept_and_counted_in_the_length():
    tlv = b"\x04\x00\x03abc"   # PP2_TYPE_NOOP with 3 bytes
    block = bytes([10, 0, 0, 1, 10, 0, 0, 2]) + (1).to_bytes(2, "big") + (2).to_bytes(2, "big") + tlv
    header = SIG + b"\x21\x11" + len(block).to_bytes(2, "big") + block
    assert header_size(header + b"x") == len(header)
    info = parse(header)
    assert info.source == ("10.0.0.1", 1) and info.tlvs == tlv


def test_v2_unspec_and_dgram_fall_back_to_the_real_endpoints():
    assert parse(SIG + b"\x21\x00\x00\x00").family is None
    udp = SIG + b"\x21\x12\x00\x0c" + bytes(12)
    assert parse(udp).family is None


@pytest.mark.parametrize("header", [
    SIG + b"\x11\x11\x00\x00",                    # version 1 in the binary format
    SIG + b"\x22\x11\x00\x0c" + bytes(12),        # command 2 is unassigned
    SIG + b"\x21\x41\x00\x00",                    # family 4 does not exist
    SIG + b"\x21\x13\x00\x0c" + bytes(12),        # protocol 3 does not exist
    SIG + b"\x21\x11\x00\x04" + bytes(4),         # address block too short for TCP4
])
def test_v2_invalid_headers_are_refused(header):
    with pytest.raises(ProxyProtocolError):
        parse(header)


def test_v2_header_size_needs_16_bytes_and_checks_early():
    assert header_size(SIG[:5]) is None
    assert header_size(SIG + b"\x21\x11\x00") is None
    assert header_size(SIG + b"\x21\x11\x00\x0c") == 28
    with pytest.raises(ProxyProtocolError):
        header_size(SIG[:6] + b"X")                # diverges from the signature
    with pytest.raises(ProxyProtocolError):
        header_size(SIG + b"\x31")                 # version 3
    with pytest.raises(ProxyProtocolError):
        header_size(b"\x16\x03\x01\x02\x00")       # a TLS ClientHello


def test_parse_wants_exactly_one_header():
    header = _proxyproto.encode(2, ("1.2.3.4", 5), ("6.7.8.9", 10))
    with pytest.raises(ProxyProtocolError):
        parse(header + b"x")
    with pytest.raises(ProxyProtocolError):
        parse(header[:-1])


def test_mixed_families_are_sent_as_ipv6():
    # a dual-stack listener: client and local address both IPv6 (IPv4-mapped for v4 clients)
    line = _proxyproto.encode(1, ("::ffff:127.0.0.1", 1234), ("::", 80))
    assert line == b"PROXY TCP6 ::ffff:7f00:1 :: 1234 80\r\n"
    mixed = _proxyproto.encode(2, ("::1", 1), ("127.0.0.1", 2))
    assert parse(mixed).destination == ("::ffff:7f00:1", 2)
