"""Where a forwarder and its connections are: ``port``, ``host``, ``url()``; a record's two ends
as socket addresses, the upstream's local one being the client the target sees; and marks, to
ask for the connections opened since a point."""

from __future__ import annotations

import socket
import threading

import pytest

from peers import TIMEOUT, Gate, Server, connect, echo, recv_exactly, unanswered_listener


def has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


# -- port, host, url() ------------------------------------------------------------------------

def test_port_host_and_url(forwarder_factory):
    fw = forwarder_factory("127.0.0.1:9", connect_timeout=1)
    assert (fw.host, fw.port) == fw.address and fw.port != 0
    assert fw.url("redis://") == f"redis://127.0.0.1:{fw.port}"
    assert fw.url("redis") == f"redis://127.0.0.1:{fw.port}"  # "://" added
    assert fw.url() == f"tcp://127.0.0.1:{fw.port}"
    assert fw.url("postgresql://app:secret@", "/orders") == f"postgresql://app:secret@127.0.0.1:{fw.port}/orders"


@pytest.mark.skipif(not has_ipv6(), reason="no IPv6 loopback")
def test_url_brackets_an_ipv6_host(forwarder_factory):
    fw = forwarder_factory("127.0.0.1:9", listen="[::1]:0", connect_timeout=1)
    assert fw.host == "::1"
    assert fw.url("http://", "/health") == f"http://[::1]:{fw.port}/health"


def test_a_unix_socket_has_no_port_host_or_url(forwarder_factory, tmp_path):
    fw = forwarder_factory("127.0.0.1:9", listen=f"unix:{tmp_path}/fw.sock", connect_timeout=1)
    for read in (lambda: fw.port, lambda: fw.host, lambda: fw.url("redis://")):
        with pytest.raises(ValueError, match="Unix socket"):
            read()


def test_port_before_start_says_so():
    import gproxy
    with pytest.raises(RuntimeError, match="not been started"):
        _ = gproxy.Forwarder("127.0.0.1:0", "127.0.0.1:9").port


# -- a record's two ends ------------------------------------------------------------------------

def test_a_record_has_both_ends_the_upstream_local_one_being_what_the_target_sees(forwarder_factory):
    closed = []
    gate = Gate()
    with Server(gate) as upstream:
        fw = forwarder_factory(upstream.address, on_close=closed.append)
        client = connect(fw.address)
        server_side = gate.get()
        client.sendall(b"x")
        assert recv_exactly(server_side, 1) == b"x"   # connected and flowing
        [record] = fw.connections()
        assert record.client_address == client.getsockname()
        assert record.upstream_local_address == server_side.getpeername()   # pg_stat_activity's view
        assert record.upstream_address == upstream.address
        assert record.client == f"127.0.0.1:{client.getsockname()[1]}"     # the string as before
        client.close()
        server_side.close()
        gate.release()
        forwarder_factory.wait_closed(fw, accepted=1)
    [ended] = closed   # on_close's record keeps them: asked before the sockets closed
    assert (ended.client_address, ended.upstream_local_address, ended.upstream_address) == \
        (record.client_address, record.upstream_local_address, record.upstream_address)


def test_a_record_of_a_connection_still_connecting_has_no_upstream_ends(forwarder_factory):
    opened = threading.Event()
    with unanswered_listener() as target:
        fw = forwarder_factory(target, connect_timeout=TIMEOUT, on_open=lambda record: opened.set())
        client = connect(fw.address)
        assert opened.wait(TIMEOUT)   # accepted; its connect is never answered
        [record] = fw.connections()
        assert record.client_address == client.getsockname()
        assert record.upstream_address is None and record.upstream_local_address is None
        assert fw.abort_connection(record.id)
        client.close()
        forwarder_factory.wait_closed(fw, accepted=1)


@pytest.mark.skipif(not has_ipv6(), reason="no IPv6 loopback")
def test_ipv6_ends_are_host_port_pairs(forwarder_factory):
    listener = socket.socket(socket.AF_INET6)
    listener.bind(("::1", 0))
    listener.listen()
    try:
        fw = forwarder_factory(f"[::1]:{listener.getsockname()[1]}", listen="[::1]:0")
        client = socket.create_connection(fw.address, timeout=TIMEOUT)
        server_side, _ = listener.accept()
        client.sendall(b"x")
        assert recv_exactly(server_side, 1) == b"x"
        [record] = fw.connections()
        assert record.client_address == client.getsockname()[:2]
        assert record.upstream_local_address == server_side.getpeername()[:2]
        assert record.upstream_address == ("::1", listener.getsockname()[1])
        client.close()
        server_side.close()
        forwarder_factory.wait_closed(fw, accepted=1)
    finally:
        listener.close()


def test_a_unix_target_gives_its_path(forwarder_factory, tmp_path):
    path = str(tmp_path / "up.sock")
    with Server(echo, address=path):
        fw = forwarder_factory(f"unix:{path}")
        client = connect(fw.address)
        client.sendall(b"x")
        assert recv_exactly(client, 1) == b"x"
        [record] = fw.connections()
        assert record.upstream_address == path and record.upstream_local_address == ""   # unnamed
        client.close()
        forwarder_factory.wait_closed(fw, accepted=1)


# -- marks --------------------------------------------------------------------------------------

def test_connections_since_a_mark_leave_out_earlier_ones(forwarder_factory):
    with Server(echo) as upstream:
        fw = forwarder_factory(upstream.address)
        assert fw.mark() == 1   # the first connection's id
        earlier = connect(fw.address)
        earlier.sendall(b"a")
        assert recv_exactly(earlier, 1) == b"a"
        mark = fw.mark()
        assert fw.connections(since=mark) == []
        later = connect(fw.address)
        later.sendall(b"b")
        assert recv_exactly(later, 1) == b"b"
        assert [r.client_address for r in fw.connections(since=mark)] == [later.getsockname()]
        assert [r.client_address for r in fw.connections()] == [earlier.getsockname(), later.getsockname()]
        assert all(r.id >= mark for r in fw.connections(since=mark))
        for sock in (earlier, later):
            sock.close()
        forwarder_factory.wait_closed(fw, accepted=2)
