"""Several targets (failover, round-robin, least-connections, passive health), target functions,
and Unix sockets as listen address and target, through the embedding API on real sockets."""

from __future__ import annotations

import logging
import os
import socket
import threading

import pytest

import gproxy
from peers import TIMEOUT, Server, connect, echo, free_port, payload, recv_all, recv_exactly, send_in_odd_chunks


def tagged(tag: bytes):
    """An upstream that says who it is, then echoes: a client learns which target it reached."""
    def serve(sock):
        sock.sendall(tag)
        echo(sock)
    return serve


def send_then_half_close(sock, data):
    send_in_odd_chunks(sock, data, seed=1)
    sock.shutdown(socket.SHUT_WR)


def reached(address) -> bytes:
    """Connect through the forwarder, read the upstream's one-byte tag, check the echo, close."""
    with connect(address) as client:
        tag = recv_exactly(client, 1)
        client.sendall(b"ping")
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client) == b"ping"
    return tag


class Captured(logging.Handler):
    def __init__(self, logger: str):
        super().__init__(logging.DEBUG)
        self.records = []
        self.logger = logging.getLogger(logger)

    def emit(self, record):
        self.records.append(record)

    def lines(self, level: int):
        return [r.getMessage() for r in self.records if r.levelno == level]

    def __enter__(self):
        self.logger.addHandler(self)
        self.logger.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)
        self.logger.setLevel(logging.NOTSET)


def test_a_dead_first_target_is_never_noticed_by_clients(forwarders):
    dead = f"127.0.0.1:{free_port()}"
    with Server(tagged(b"B")) as live, Captured("gproxy.targets") as log:
        fw = forwarders([dead, live.address], fail_timeout=60)
        data = payload(1_000_003, seed=3)
        for _ in range(3):
            with connect(fw.address) as client:
                assert recv_exactly(client, 1) == b"B"
                client.sendall(data)
                client.shutdown(socket.SHUT_WR)
                assert recv_all(client) == data
        stats = forwarders.wait_closed(fw, accepted=3)
    assert stats.connect_failed == 0
    warnings = log.lines(logging.WARNING)
    assert len(warnings) == 1 and dead in warnings[0] and "down" in warnings[0], warnings
    assert {r.outcome for r in forwarders.records} == {gproxy.Outcome.EOF}
    assert {r.upstream for r in forwarders.records} == {"%s:%d" % live.address}


def test_round_robin_spreads_clients_over_live_targets(forwarder_factory):
    with Server(tagged(b"A")) as a, Server(tagged(b"B")) as b:
        fw = forwarder_factory([a.address, b.address], balance="round-robin")
        tags = [reached(fw.address) for _ in range(6)]
    assert tags == [b"A", b"B"] * 3


def test_failover_prefers_the_first_target(forwarder_factory):
    with Server(tagged(b"A")) as a, Server(tagged(b"B")) as b:
        fw = forwarder_factory([a.address, b.address])
        assert [reached(fw.address) for _ in range(4)] == [b"A"] * 4


def test_least_connections_picks_the_target_with_fewest_open(forwarder_factory):
    with Server(tagged(b"A")) as a, Server(tagged(b"B")) as b:
        fw = forwarder_factory([a.address, b.address], balance="least-connections")
        held = connect(fw.address)  # stays open on its target
        first = recv_exactly(held, 1)
        others = {reached(fw.address) for _ in range(3)}
        held.close()
    assert others == {b"A", b"B"} - {first}


def test_a_down_target_is_skipped_for_fail_timeout(forwarder_factory):
    port = free_port()
    with Server(tagged(b"B")) as b, Captured("gproxy.targets") as log:
        fw = forwarder_factory([f"127.0.0.1:{port}", b.address], fail_timeout=60)
        assert reached(fw.address) == b"B"      # A refused: down, and this client went on to B
        with Server(tagged(b"A"), address=("127.0.0.1", port)):
            # A listens again, but is skipped until fail_timeout has passed
            assert [reached(fw.address) for _ in range(3)] == [b"B"] * 3
    assert len(log.lines(logging.WARNING)) == 1 and not log.lines(logging.INFO), log.records


def test_a_target_that_comes_back_is_logged_up_once(forwarder_factory):
    port = free_port()
    with Server(tagged(b"B")) as b, Captured("gproxy.targets") as log:
        # fail_timeout 0: a down target is tried again by the very next client
        fw = forwarder_factory([f"127.0.0.1:{port}", b.address], fail_timeout=0)
        assert [reached(fw.address) for _ in range(3)] == [b"B"] * 3
        with Server(tagged(b"A"), address=("127.0.0.1", port)):
            assert [reached(fw.address) for _ in range(2)] == [b"A"] * 2
    assert len(log.lines(logging.WARNING)) == 1, log.lines(logging.WARNING)
    ups = log.lines(logging.INFO)
    assert len(ups) == 1 and f"127.0.0.1:{port}" in ups[0] and "up" in ups[0], ups


def test_every_target_failing_is_one_connect_failure_naming_each(forwarder_factory):
    dead = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    fw = forwarder_factory(dead)
    with connect(fw.address) as client:
        assert recv_all(client) == b""
    forwarder_factory.wait_closed(fw, accepted=1)
    record = forwarder_factory.records[-1]
    assert record.outcome is gproxy.Outcome.CONNECT_FAILED
    assert all(d in record.error for d in dead), record.error


def test_a_target_function_routes_each_client(forwarder_factory):
    seen = []
    with Server(tagged(b"A")) as a, Server(tagged(b"B")) as b:
        def route(client):
            seen.append(client)
            return [a.address] if len(seen) % 2 else f"127.0.0.1:{b.address[1]}"
        fw = forwarder_factory(route)
        assert [reached(fw.address) for _ in range(4)] == [b"A", b"B", b"A", b"B"]
    assert all(host == "127.0.0.1" for host, _port in seen)


def test_a_failing_target_function_fails_the_connect_not_the_forwarder(forwarder_factory):
    def route(client):
        raise LookupError("no route")
    fw = forwarder_factory(route)
    with connect(fw.address) as client:
        assert recv_all(client) == b""
    forwarder_factory.wait_closed(fw, accepted=1)
    record = forwarder_factory.records[-1]
    assert record.outcome is gproxy.Outcome.CONNECT_FAILED and "no route" in record.error


# -- Unix sockets -------------------------------------------------------------------------


def test_unix_listener_to_unix_target_keeps_every_byte_and_the_closing_rules(forwarders, tmp_path):
    upstream_path = str(tmp_path / "upstream.sock")
    with Server(echo, address=upstream_path):
        fw = forwarders(f"unix:{upstream_path}", listen=f"unix:{tmp_path / 'gproxy.sock'}")
        assert fw.address == str(tmp_path / "gproxy.sock")
        data = payload(3_000_017, seed=5)
        with connect(fw.address) as client:
            sender = threading.Thread(target=send_then_half_close, args=(client, data))
            sender.start()  # the half-close passes through, and the echo still comes back
            assert recv_all(client) == data
            sender.join(TIMEOUT)
        forwarders.wait_closed(fw, accepted=1)
    record = forwarders.records[-1]
    assert record.outcome is gproxy.Outcome.EOF and record.client == "unix"
    assert record.bytes_upstream == record.bytes_downstream == len(data)
    fw.stop()
    assert not os.path.exists(fw.address)  # our socket file goes with us


def test_abstract_unix_listener(forwarder_factory):
    with Server(echo) as upstream:
        name = f"gproxy-test-{os.getpid()}"
        fw = forwarder_factory(upstream.address, listen=f"unix:@{name}")
        with connect(fw.address) as client:
            client.sendall(b"abstract")
            client.shutdown(socket.SHUT_WR)
            assert recv_all(client) == b"abstract"


def test_a_stale_socket_file_is_replaced(forwarder_factory, tmp_path):
    path = str(tmp_path / "stale.sock")
    crashed = socket.socket(socket.AF_UNIX)
    crashed.bind(path)
    crashed.close()  # the file stays, as after a crash; nobody listens on it
    with Server(echo) as upstream:
        fw = forwarder_factory(upstream.address, listen=f"unix:{path}")
        with connect(fw.address) as client:
            client.sendall(b"x")
            client.shutdown(socket.SHUT_WR)
            assert recv_all(client) == b"x"


def test_a_socket_file_another_process_listens_on_is_an_error(tmp_path):
    path = str(tmp_path / "taken.sock")
    with Server(echo, address=path):
        with pytest.raises(OSError, match="another process listens on it"):
            gproxy.Forwarder(f"unix:{path}", "127.0.0.1:9").start()
        assert os.path.exists(path)


def test_a_path_that_is_not_a_socket_is_left_alone(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("precious")
    with pytest.raises(OSError, match="not a socket"):
        gproxy.Forwarder(f"unix:{path}", "127.0.0.1:9").start()
    assert path.read_text() == "precious"


@pytest.mark.parametrize("listen, target, field", [
    ("127.0.0.1:7000", ["127.0.0.1:7001", "127.0.0.1:7000"], "target"),
    ("unix:/tmp/x.sock", "unix:/tmp/x.sock", "target"),
    ("unix:", "127.0.0.1:1", "listen"),
    ("1", "unix:@", "target"),
    ("1", [], "target"),
    ("1", ["2", "2"], "target"),
    ("1", "2", "balance"),
])
def test_bad_targets_are_config_errors(listen, target, field):
    options = {"balance": "random"} if field == "balance" else {}
    with pytest.raises(gproxy.ConfigError) as caught:
        gproxy.Forwarder(listen, target, **options)
    assert caught.value.field == field
