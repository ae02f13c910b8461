"""The bytes and the closing rules, with each pump (splice and copy), in process."""

from __future__ import annotations

import hashlib
import socket
import struct
import threading
import time

import pytest

from gproxy import Outcome
from peers import (
    TIMEOUT,
    Exchange,
    Gate,
    Server,
    connect,
    echo,
    free_port,
    payload,
    recv_all,
    recv_exactly,
    reset,
    send_in_odd_chunks,
    unanswered_listener,
)


def test_both_directions_at_once_many_connections_byte_exact(forwarders):
    """20 clients each send and receive a different random payload at the same time."""
    sizes = {stream: 200_003 + stream * 77_777 for stream in range(20)}
    exchange = Exchange(sizes.__getitem__)
    with Server(exchange) as upstream:
        fw = forwarders(upstream.address)
        failures = []

        def client(stream):
            try:
                sock = connect(fw.address)
                sock.sendall(struct.pack("!I", stream))
                data = payload(sizes[stream] + 5, seed=stream)
                sender = threading.Thread(target=send_in_odd_chunks, args=(sock, data, stream))
                sender.start()
                received = recv_all(sock, 4093)
                sender.join(TIMEOUT)
                sock.shutdown(socket.SHUT_WR)
                sock.close()
                assert received == payload(sizes[stream], seed=10_000 + stream), f"stream {stream} downstream"
                results[stream] = hashlib.sha256(data).hexdigest(), len(data) + 4
            except BaseException as exc:
                failures.append(exc)

        results = {}
        threads = [threading.Thread(target=client, args=(s,)) for s in sizes]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT * 2)
        assert not failures, failures
        for _ in sizes:
            stream, digest, count = exchange.results.get(timeout=TIMEOUT)
            assert (digest, count + 4) == results[stream], f"stream {stream} upstream"
        stats = forwarders.wait_closed(fw, accepted=len(sizes))
    assert stats.bytes_upstream == sum(size + 5 + 4 for size in sizes.values())
    assert stats.bytes_downstream == sum(sizes.values())
    assert all(r.outcome is Outcome.EOF for r in forwarders.records)


def test_client_half_close_still_gets_whole_reply(forwarders):
    """Client sends, half-closes, and still receives everything the upstream answers."""
    with forwarders.gated() as (fw, client, server):
        client.sendall(b"request")
        client.shutdown(socket.SHUT_WR)
        assert recv_all(server) == b"request"  # the FIN came through
        reply = payload(3_000_001, seed=1)
        server.sendall(reply)
        server.close()
        assert recv_all(client) == reply
    assert forwarders.records[-1].outcome is Outcome.EOF


def test_upstream_half_close_still_gets_client_data(forwarders):
    """Upstream sends and half-closes first; the client's later data still reaches it."""
    with forwarders.gated() as (fw, client, server):
        banner = payload(100_000, seed=2)
        server.sendall(banner)
        server.shutdown(socket.SHUT_WR)
        assert recv_all(client) == banner  # the FIN came through
        late = payload(2_000_003, seed=3)
        client.sendall(late)
        client.close()
        assert recv_all(server) == late
    stats = fw.statistics()
    assert (stats.bytes_upstream, stats.bytes_downstream) == (len(late), len(banner))


@pytest.mark.parametrize("side", ["client", "upstream"])
def test_reset_aborts_both_sides(forwarders, side):
    with forwarders.gated() as (fw, client, server):
        client.sendall(b"x")
        assert recv_exactly(server, 1) == b"x"  # fully established end to end
        if side == "client":
            reset(client)
            other = server
        else:
            reset(server)
            other = client
        with pytest.raises(ConnectionResetError):
            recv_all(other)
    record = forwarders.records[-1]
    assert record.outcome is Outcome.RESET
    assert record.error == f"{side} reset: connection reset by peer", record.error


@pytest.mark.parametrize("side", ["client", "upstream"])
def test_a_reset_names_its_side_while_bytes_were_going_to_it(forwarders, side):
    """Issue 15 item 17: the error names the side that reset also when the pump that met the
    reset was writing to that side (the error comes from its destination, not its source):
    the side stops reading, the other fills every buffer on the way, then the side resets."""
    with forwarders.gated() as (fw, client, server):
        resetter, pusher = (client, server) if side == "client" else (server, client)
        block = b"p" * 65536
        pusher.settimeout(0.2)
        try:
            while True:  # until nothing moves: the proxy's pump waits to write to the resetter
                pusher.sendall(block)
        except socket.timeout:
            pass
        reset(resetter)
        pusher.settimeout(TIMEOUT)
        with pytest.raises(ConnectionResetError):
            recv_all(pusher)
    record = forwarders.records[-1]
    assert record.outcome is Outcome.RESET
    assert record.error.startswith(f"{side} reset: "), record.error


@pytest.mark.parametrize("target, why", [
    (None, "refused"),                                          # a port nobody listens on
    ("no-such-host.invalid:80", "cannot resolve no-such-host.invalid"),
], ids=["refused", "unresolvable"])
def test_failed_upstream_closes_client_at_once(forwarders, target, why):
    fw = forwarders(target or ("127.0.0.1", free_port()))
    client = connect(fw.address)
    assert recv_all(client) == b""
    client.close()
    stats = forwarders.wait_closed(fw, accepted=1)
    assert stats.connect_failed == 1
    record = forwarders.records[-1]
    assert record.outcome is Outcome.CONNECT_FAILED and why in record.error, record.error


def test_unanswered_connect_hits_connect_timeout(forwarders):
    """A target whose accept queue is full drops our SYN: the connect must time out."""
    with unanswered_listener() as target:
        fw = forwarders(target, connect_timeout=0.3)
        client = connect(fw.address)
        started = time.monotonic()
        assert recv_all(client) == b""
        assert time.monotonic() - started < TIMEOUT / 2
        client.close()
        forwarders.wait_closed(fw, accepted=1)
        assert forwarders.records[-1].outcome is Outcome.CONNECT_TIMEOUT


@pytest.mark.parametrize("via", ["on_open", "allow", "proxy_protocol"])
def test_unanswered_connect_on_the_greenlet_path_hits_connect_timeout(forwarders, via):
    """As above, for a client whose connect waits in a greenlet (Connection.run): a rule with
    an on_open hook, access rules, or a PROXY header to send (issue 16 item 3)."""
    option = {"on_open": lambda record: None, "allow": ["127.0.0.1"], "proxy_protocol": "v1"}[via]
    with unanswered_listener() as target:
        fw = forwarders(target, connect_timeout=0.3, **{via: option})
        context = fw._context  # white box: not the callback path (Connection.start)
        assert context.direct is None or context.on_open is not None
        client = connect(fw.address)
        started = time.monotonic()
        assert recv_all(client) == b""
        assert time.monotonic() - started < TIMEOUT / 2
        client.close()
        forwarders.wait_closed(fw, accepted=1)
        record = forwarders.records[-1]
        assert record.outcome is Outcome.CONNECT_TIMEOUT, record


def test_a_connect_under_way_ends_at_once_when_closed(forwarders):
    """A plain rule's client connects in callbacks on the hub, with no greenlet waiting
    (Connection.start): closing it while the target has not answered must end it at once,
    not at the connect timeout."""
    with unanswered_listener() as target:
        fw = forwarders(target, connect_timeout=60)
        client = connect(fw.address)
        deadline = time.monotonic() + TIMEOUT
        while not fw.connections():
            assert time.monotonic() < deadline, "never accepted"
            time.sleep(0.01)  # sleep-ok: polling the open connections another thread adds
        (record,) = fw.connections()
        started = time.monotonic()
        assert fw.close_connection(record.id)
        assert recv_all(client) == b""
        client.close()
        forwarders.wait_closed(fw, accepted=1)
        assert time.monotonic() - started < TIMEOUT / 2
        assert forwarders.records[-1].outcome is Outcome.CLOSED


def test_idle_timeout_closes_a_silent_connection(forwarders):
    with forwarders.gated(idle_timeout=0.3) as (fw, client, server):
        client.sendall(b"hello")
        assert recv_exactly(server, 5) == b"hello"
        assert recv_all(client) == b""      # closed by gproxy, not by a peer
        assert recv_all(server) == b""
    assert forwarders.records[-1].outcome is Outcome.IDLE_TIMEOUT


def test_idle_timeout_spares_a_one_way_stream(forwarders):
    """Traffic in only one direction keeps the connection alive past the idle timeout."""
    with forwarders.gated(idle_timeout=0.3) as (fw, client, server):
        ticks = 30
        for i in range(ticks):  # 1.5 s of a slow one-way stream, five idle timeouts long
            server.sendall(b"tick %03d\n" % i)
            time.sleep(0.05)  # sleep-ok: models a slow source, not a wait for readiness
        server.close()
        assert recv_all(client) == b"".join(b"tick %03d\n" % i for i in range(ticks))
    assert forwarders.records[-1].outcome is Outcome.EOF


def test_echo_round_trips(forwarders):
    with Server(echo) as upstream:
        fw = forwarders(upstream.address)
        client = connect(fw.address)
        for size in (1, 63, 64, 1000, 65535, 65536, 65537, 1 << 20):
            data = payload(size, seed=size)
            client.sendall(data)
            assert recv_exactly(client, size) == data
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client) == b""
        client.close()
        forwarders.wait_closed(fw, accepted=1)


def test_target_name_tries_every_address(forwarders):
    """'localhost' may resolve to ::1 first; the echo server listens on 127.0.0.1 only, so a
    refused first address must lead to the next one, not to a failed connection."""
    with Server(echo) as upstream:
        fw = forwarders(f"localhost:{upstream.address[1]}")
        client = connect(fw.address)
        client.sendall(b"by name")
        assert recv_exactly(client, 7) == b"by name"
        client.close()
        forwarders.wait_closed(fw, accepted=1)
    assert forwarders.records[-1].upstream == f"localhost:{upstream.address[1]}"


def test_ipv6_listen_and_target(forwarders):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    listener = socket.socket(socket.AF_INET6)
    try:
        listener.bind(("::1", 0))
    except OSError:
        listener.close()
        pytest.skip("no ::1 on this machine")
    listener.listen()
    with listener:
        fw = forwarders(f"[::1]:{listener.getsockname()[1]}", listen="[::1]:0")
        assert fw.address[0] == "::1"
        client = socket.create_connection(fw.address, timeout=TIMEOUT)
        server, _ = listener.accept()
        server.settimeout(TIMEOUT)
        client.sendall(b"six")
        assert recv_exactly(server, 3) == b"six"
        server.close()
        assert recv_all(client) == b""
        client.close()
        forwarders.wait_closed(fw, accepted=1)


def test_half_close_timeout_ends_a_quiet_half_closed_connection(forwarders):
    """The client has said all it will (FIN) and the upstream goes quiet without closing:
    half_close_timeout ends it, while a quiet open connection on the same forwarder stays."""
    gate = Gate()
    with Server(gate) as upstream:
        fw = forwarders(upstream.address, half_close_timeout=0.3)
        quiet = connect(fw.address)
        quiet_server = gate.get()
        done = connect(fw.address)
        done_server = gate.get()
        done.sendall(b"last words")
        done.shutdown(socket.SHUT_WR)
        assert recv_all(done_server) == b"last words"
        assert recv_all(done) == b""                 # ended by gproxy, not by the upstream
        done.close()
        quiet.sendall(b"still open")                 # the other one was not touched
        assert recv_exactly(quiet_server, 10) == b"still open"
        quiet.close()
        assert recv_all(quiet_server) == b""
        done_server.close()
        quiet_server.close()
        gate.release()
        forwarders.wait_closed(fw, accepted=2)
    outcomes = sorted((r.outcome.value, r.error or "") for r in forwarders.records)
    assert outcomes == [("eof", ""), ("idle timeout", "half-closed")], outcomes


def test_splice_pump_copies_when_no_pipe_can_be_had(forwarder_factory):
    """Out of fds for pipes, the splice pump must fall back to copying, byte for byte."""
    with Server(echo) as upstream:
        fw = forwarder_factory(upstream.address, splice=True)
        splicer = fw._context.splicer   # white box: the forwarder's Splicer
        takes = []
        splicer.take = lambda: takes.append(1)  # None, as if pipe2() failed with EMFILE
        client = connect(fw.address)
        data = payload(5_000_011, seed=31)   # bulk: reads fill the buffer, so it would splice
        sender = threading.Thread(target=client.sendall, args=(data,))
        sender.start()
        assert recv_exactly(client, len(data)) == data
        sender.join(TIMEOUT)
        client.close()
        forwarder_factory.wait_closed(fw, accepted=1)
    assert takes, "the pump never tried to splice: the fallback was not exercised"
