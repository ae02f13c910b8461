"""The PROXY header through a forwarder: sent before any payload, read from trusted clients
without swallowing a payload byte, refused when missing or wrong."""

from __future__ import annotations

import socket
import time

import pytest

from gproxy import _proxyproto
from peers import TIMEOUT, Gate, Server, connect, recv_all, recv_exactly
from test_access import connect_from


def read_header(sock: socket.socket) -> _proxyproto.ProxyHeader:
    """Read one header off a blocking socket the way a careful receiver does: peek, then take
    exactly the header's bytes."""
    seen, size = b"", None
    while size is None or len(seen) < size:
        data = sock.recv(200 if size is None else size - len(seen), socket.MSG_PEEK)
        assert data, f"EOF after {seen!r}"
        if size is None:
            size = _proxyproto.header_size(seen + data)
        take = len(data) if size is None else min(len(data), size - len(seen))
        seen += recv_exactly(sock, take)
    return _proxyproto.parse(seen)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_header_goes_first_with_the_real_client(forwarders, version):
    gate = Gate()
    with Server(gate) as upstream:
        fw = forwarders(upstream.address, proxy_protocol=version)
        client = connect_from("127.0.0.3", fw.address)
        client.sendall(b"hello")
        server = gate.get()
        info = read_header(server)
        assert info.version == int(version[1])
        assert info.source == client.getsockname() and info.destination == fw.address
        assert recv_exactly(server, 5) == b"hello"
        server.sendall(b"world")
        assert recv_exactly(client, 5) == b"world"
        client.close()
        assert recv_all(server) == b""
        server.close()
        gate.release()
        forwarders.wait_closed(fw, accepted=1)
    # the header is not payload: the counters hold the client's bytes only
    assert forwarders.records[-1].bytes_upstream == 5


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback")
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_header_for_an_ipv6_client(forwarder_factory, version):
    gate = Gate()
    with Server(gate) as upstream:
        fw = forwarder_factory(upstream.address, listen="[::1]:0", proxy_protocol=version)
        client = socket.create_connection(("::1", fw.address[1]), timeout=TIMEOUT)
        server = gate.get()
        info = read_header(server)
        assert info.family == socket.AF_INET6
        assert info.source == ("::1", client.getsockname()[1]) and info.destination == ("::1", fw.address[1])
        client.close()
        assert recv_all(server) == b""
        server.close()
        gate.release()
        forwarder_factory.wait_closed(fw, accepted=1)


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback")
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_header_for_an_ipv4_client_of_a_dual_stack_listener_says_tcp4(forwarder_factory, version):
    gate = Gate()
    with Server(gate) as upstream:
        fw = forwarder_factory(upstream.address, listen="[::]:0", proxy_protocol=version)
        client = connect_from("127.0.0.3", ("127.0.0.1", fw.address[1]))
        server = gate.get()
        info = read_header(server)
        assert info.family == socket.AF_INET
        assert info.source == client.getsockname() and info.destination == ("127.0.0.1", fw.address[1])
        client.close()
        assert recv_all(server) == b""
        server.close()
        gate.release()
        forwarder_factory.wait_closed(fw, accepted=1)


@pytest.mark.parametrize("incoming", ["v1", "v2"])
@pytest.mark.parametrize("outgoing", ["off", "v1", "v2"])
def test_a_trusted_header_is_read_exactly_and_passed_on(forwarder_factory, incoming, outgoing):
    gate = Gate()
    claimed = ("192.0.2.7", 50312), ("198.51.100.1", 443)
    header = _proxyproto.encode(int(incoming[1]), *claimed)
    with Server(gate) as upstream:
        fw = forwarder_factory(upstream.address, accept_proxy_from=["127.0.0.0/8"], proxy_protocol=outgoing,
                               allow=["192.0.2.0/24"])   # allow/deny judge the claimed address
        client = connect(fw.address)
        client.sendall(header + b"payload right behind it")   # one segment: nothing to peek apart
        server = gate.get()
        if outgoing != "off":
            info = read_header(server)
            assert (info.source, info.destination) == claimed
        assert recv_exactly(server, 23) == b"payload right behind it"
        client.close()
        assert recv_all(server) == b""
        server.close()
        gate.release()
        forwarder_factory.wait_closed(fw, accepted=1)
    record = forwarder_factory.records[-1]
    assert record.client == "192.0.2.7:50312" and record.bytes_upstream == 23


def test_a_header_in_pieces_is_waited_for(forwarder_factory):
    gate = Gate()
    header = _proxyproto.encode(1, ("192.0.2.7", 50312), ("198.51.100.1", 443))
    with Server(gate) as upstream:
        fw = forwarder_factory(upstream.address, accept_proxy_from=["127.0.0.1"], proxy_protocol="v2")
        client = connect(fw.address)
        for piece in (header[:3], header[3:20], header[20:-1], header[-1:] + b"x"):
            client.sendall(piece)
            time.sleep(0.05)  # sleep-ok: a slow proxy, so the pieces arrive apart
        server = gate.get()
        assert read_header(server).source == ("192.0.2.7", 50312)
        assert recv_exactly(server, 1) == b"x"
        client.close()
        server.close()
        gate.release()
        forwarder_factory.wait_closed(fw, accepted=1)


@pytest.mark.parametrize("sent", [b"GET / HTTP/1.1\r\n\r\n", b"PROXY TCP4 1.2.3.4\r\n", b""])
def test_a_trusted_client_without_a_valid_header_is_refused(forwarder_factory, sent):
    with Server(Gate()) as upstream:
        fw = forwarder_factory(upstream.address, accept_proxy_from=["127.0.0.1"], proxy_header_timeout=0.3)
        client = connect(fw.address)
        client.sendall(sent)
        try:
            assert client.recv(1) == b""
        except ConnectionResetError:
            pass
        client.close()
        forwarder_factory.wait_closed(fw, accepted=1)
        assert upstream.accepted == 0
    record = forwarder_factory.records[-1]
    assert str(record.outcome) == "denied" and ("PROXY" in record.error), record


def test_an_untrusted_client_is_an_ordinary_client(forwarder_factory):
    gate = Gate()
    with Server(gate) as upstream:
        fw = forwarder_factory(upstream.address, accept_proxy_from=["10.0.0.0/8"])
        client = connect(fw.address)
        client.sendall(b"PROXY TCP4 192.0.2.7 198.51.100.1 1 2\r\n")   # from 127.0.0.1: payload
        server = gate.get()
        assert recv_exactly(server, 39) == b"PROXY TCP4 192.0.2.7 198.51.100.1 1 2\r\n"
        client.close()
        server.close()
        gate.release()
        forwarder_factory.wait_closed(fw, accepted=1)
    assert forwarder_factory.records[-1].client.startswith("127.0.0.1:")


@pytest.mark.parametrize("version, family", [("v2", socket.AF_UNIX), ("v1", None)])
def test_a_unix_socket_client_is_sent_as_af_unix_or_unknown(forwarder_factory, tmp_path, version, family):
    gate = Gate()
    path = str(tmp_path / "gproxy.sock")
    with Server(gate) as upstream:
        fw = forwarder_factory(upstream.address, listen=f"unix:{path}", proxy_protocol=version)
        client = socket.socket(socket.AF_UNIX)
        client.settimeout(TIMEOUT)
        client.connect(path)
        client.sendall(b"hi")
        server = gate.get()
        info = read_header(server)
        assert info.family == family
        if family == socket.AF_UNIX:
            assert info.source == b"" and info.destination == path.encode()   # an unnamed client
        assert recv_exactly(server, 2) == b"hi"
        client.close()
        assert recv_all(server) == b""
        server.close()
        gate.release()
        forwarder_factory.wait_closed(fw, accepted=1)
