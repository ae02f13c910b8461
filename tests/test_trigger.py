"""Triggered faults on real sockets: the ``trigger`` toxic, and what Python toxics gained with it
(the EOF, an instance per connection, ``Delay`` with an action).

Timing: lower bounds are firm (a toxic must not act early); upper bounds are generous.
"""

from __future__ import annotations

import socket
import time

import pytest

from gproxy import ConfigError
from gproxy.toxics import CLOSE, RESET, Delay
from peers import TIMEOUT, Server, connect, echo, read_until_closed, recv_all, recv_exactly

SLACK = 2.0


def test_a_match_sent_byte_by_byte_resets_right_after_it(forwarder_factory):
    with forwarder_factory.gated() as (fw, client, server):
        fw.add_toxic("trigger", stream="upstream", match=r"DROP TABLE \w+;", action="reset")
        for byte in b"SELECT 1; DROP TABLE users;":
            client.sendall(bytes([byte]))   # mostly one read each: the match spans many chunks
        assert read_until_closed(server) == b"SELECT 1; DROP TABLE users;"
        with pytest.raises(ConnectionResetError):
            recv_all(client)


def test_reset_a_while_after_a_request_reached_the_server(forwarder_factory):
    """The case triggers exist for: cut a connection while the server works on a query, with no
    side connection watching the server."""
    with forwarder_factory.gated() as (fw, client, server):
        fw.add_toxic("trigger", stream="upstream", match="SLOW", action="reset", delay=300)
        started = time.monotonic()
        client.sendall(b"SLOW query, all of it\n")
        assert recv_exactly(server, 22) == b"SLOW query, all of it\n"   # the rest passed meanwhile
        with pytest.raises(ConnectionResetError):
            recv_all(client)
        assert 0.3 <= time.monotonic() - started < 0.3 + SLACK
        with pytest.raises(ConnectionResetError):
            recv_all(server)


def test_close_after_bytes_ends_both_sides_cleanly(forwarder_factory):
    with forwarder_factory.gated() as (fw, client, server):
        fw.add_toxic("trigger", after_bytes=5, action="close")
        server.sendall(b"12345678")
        assert recv_all(client) == b"12345"
        assert recv_all(server) == b""


def test_drop_is_a_black_hole_until_removed(forwarder_factory):
    with forwarder_factory.gated() as (fw, client, server):
        fw.add_toxic("trigger", name="hole", stream="upstream", match="cut here", action="drop")
        client.sendall(b"before cut here")
        assert recv_exactly(server, 15) == b"before cut here"
        client.sendall(b"x" * 10_000_000)   # read and thrown away: the sender is never pushed back
        client.shutdown(socket.SHUT_WR)      # held: the connection stays open
        server.settimeout(0.3)
        with pytest.raises(socket.timeout):
            server.recv(1)
        server.settimeout(TIMEOUT)
        server.sendall(b"still open")
        assert recv_exactly(client, 10) == b"still open"
        fw.remove_toxic("hole")
        assert recv_all(server) == b""       # the held EOF goes on


def test_delay_pauses_once_per_connection(forwarder_factory):
    with forwarder_factory.gated() as (fw, client, server):
        fw.add_toxic("trigger", match="pause", action="delay", delay=300)
        started = time.monotonic()
        server.sendall(b"now pause then")
        assert recv_exactly(client, 9) == b"now pause"
        assert recv_exactly(client, 5) == b" then"
        assert 0.3 <= time.monotonic() - started < 0.3 + SLACK
        started = time.monotonic()
        server.sendall(b"pause again")
        assert recv_exactly(client, 11) == b"pause again"
        assert time.monotonic() - started < 0.3


def test_every_match_acts_when_not_once(forwarder_factory):
    with forwarder_factory.gated() as (fw, client, server):
        fw.add_toxic("trigger", match="!", action="delay", delay=200, once=False)
        started = time.monotonic()
        server.sendall(b"a!b!c")
        assert recv_exactly(client, 5) == b"a!b!c"
        assert 0.4 <= time.monotonic() - started < 0.4 + SLACK


def test_a_trigger_rolled_out_by_toxicity_never_acts(forwarder_factory):
    with forwarder_factory.gated() as (fw, client, server):
        fw.add_toxic("trigger", match="x", action="reset", toxicity=0.0)
        server.sendall(b"xxx")
        assert recv_exactly(client, 3) == b"xxx"


@pytest.mark.parametrize("attributes, culprit, message", [
    ({"match": "("}, "match", "is not a regular expression"),
    ({"match": 5}, "match", "must be a string, not 5"),
    ({"once": "yes"}, "once", "must be true or false, not 'yes'"),
    ({"once": 1}, "once", "must be true or false, not 1"),
    ({"action": "explode"}, "action", "must be one of reset, close, drop, delay"),
    ({"match": "x", "after_bytes": 3}, "after_bytes", "give match or after_bytes, not both"),
    ({"once": False}, "after_bytes", "must be at least 1 when once is false"),
    ({"delay": -1}, "delay", "must be a whole number"),
    ({"delay": True}, "delay", "must be a whole number"),
])
def test_bad_trigger_attributes_name_the_culprit(forwarder_factory, attributes, culprit, message):
    fw = forwarder_factory(("127.0.0.1", 9))
    with pytest.raises(ConfigError) as info:
        fw.add_toxic("trigger", **attributes)
    assert f"toxic trigger_downstream: {culprit}: {message}" in str(info.value)
    assert fw.toxics() == []


def test_an_update_keeps_what_the_trigger_saw(forwarder_factory):
    with forwarder_factory.gated() as (fw, client, server):
        fw.add_toxic("trigger", name="t", after_bytes=6, action="close")
        server.sendall(b"abcd")
        assert recv_exactly(client, 4) == b"abcd"
        fw.update_toxic("t", after_bytes=5)   # 4 seen already: one more byte
        server.sendall(b"efgh")
        assert recv_all(client) == b"e"


# -- Python toxics: EOF, per-connection state, Delay with an action ------------------------------------

def test_a_class_toxic_gets_an_instance_per_connection_and_sees_the_eof(forwarder_factory):
    class Count:
        """Counts its connection's bytes and says how many before the EOF."""

        def __init__(self):
            self.total = 0

        def __call__(self, chunk, record):
            self.total += len(chunk)

        def eof(self, record):
            return b"[%d]" % self.total

    with Server(echo) as upstream:
        fw = forwarder_factory(upstream.address)
        toxic = fw.add_toxic(Count)
        assert toxic.name == "Count_downstream" and toxic.type == "python"
        for message in (b"abc", b"hello", b"xy"):   # each connection counts its own bytes
            with connect(fw.address) as client:
                client.sendall(message)
                client.shutdown(socket.SHUT_WR)
                assert recv_all(client) == message + b"[%d]" % len(message)


def test_the_eof_may_be_replaced_by_a_reset(forwarder_factory):
    class NoFin:
        def __call__(self, chunk, record):
            return None

        def eof(self, record):
            return RESET

    with forwarder_factory.gated() as (fw, client, server):
        fw.add_toxic(NoFin)
        server.sendall(b"data")
        server.shutdown(socket.SHUT_WR)
        assert recv_exactly(client, 4) == b"data"
        with pytest.raises(ConnectionResetError):
            recv_all(client)


def test_a_function_without_eof_never_sees_it(forwarder_factory):
    seen = []
    with forwarder_factory.gated() as (fw, client, server):
        fw.add_toxic(lambda chunk, record: seen.append(chunk))
        server.sendall(b"x")
        server.shutdown(socket.SHUT_WR)
        assert recv_all(client) == b"x" and seen == [b"x"]


def test_delay_with_an_action_passes_the_chunk_then_ends_later(forwarder_factory):
    with forwarder_factory.gated() as (fw, client, server):
        fw.add_toxic(lambda chunk, record: Delay(0.3, action=RESET) if b"query" in chunk else None,
                     stream="upstream", name="cut")
        started = time.monotonic()
        client.sendall(b"query")
        assert recv_exactly(server, 5) == b"query"
        with pytest.raises(ConnectionResetError):
            recv_all(client)
        assert 0.3 <= time.monotonic() - started < 0.3 + SLACK
    with forwarder_factory.gated() as (fw, client, server):
        fw.add_toxic(lambda chunk, record: Delay(0, b"bye", CLOSE), name="close")
        server.sendall(b"anything")
        assert recv_all(client) == b"bye"


@pytest.mark.parametrize("action", [CLOSE, "close", 1])
def test_delay_refuses_an_action_that_is_not_one(action):
    if action is CLOSE:
        assert Delay(1, action=action).action is CLOSE
        return
    with pytest.raises(TypeError, match="action must be CLOSE, RESET or None"):
        Delay(1, action=action)


def test_a_delay_at_the_attribute_bound_holds_without_failing(forwarder_factory):
    with forwarder_factory.gated() as (fw, client, server):
        fw.add_toxic("trigger", stream="upstream", action="delay", delay=2**63 - 1)   # at byte 0
        client.sendall(b"ping")
        deadline = time.monotonic() + TIMEOUT
        while not fw.connections()[0].bytes_upstream:   # read, so it went into the stage
            assert time.monotonic() < deadline
            time.sleep(0.01)  # sleep-ok: polling another thread's counter
        server.settimeout(0.2)
        with pytest.raises(socket.timeout):
            server.recv(1)
        assert fw.close_connection(fw.connections()[0].id)
