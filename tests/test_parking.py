"""Quiet connections give up their greenlets ("parking") and every closing rule still holds.

gproxy parks a pump that moved nothing for a while (1 to 2 s); here the period is cut to
20 ms so the tests stay short, and each test checks that both pumps really were parked.
"""

from __future__ import annotations

import socket
import time

import gevent
import pytest

from gproxy import Outcome, relay
from gproxy import forwarder as forwarder_module
from peers import TIMEOUT, Gate, Server, connect, echo, payload, recv_all, recv_exactly, reset

PARK_EVERY = 0.02


@pytest.fixture(autouse=True)
def park_quickly(monkeypatch):
    monkeypatch.setattr(forwarder_module, "_PARK_EVERY", PARK_EVERY)


def parked_pumps(fw) -> int:
    """How many pumps of fw's open connections are parked (white box, read across threads)."""
    count = 0
    for conn in list(fw._context.active.values()):
        for _src, _dst, readable, _writable in conn._ends:
            count += readable.active and getattr(readable.callback, "__self__", None) is conn
    return count


def wait_parked(fw) -> None:
    deadline = time.monotonic() + TIMEOUT
    while parked_pumps(fw) < 2:
        assert time.monotonic() < deadline, "the pumps never parked"
        time.sleep(PARK_EVERY)  # sleep-ok: staying quiet is the condition under test


def open_quiet_connection(forwarders, gate, **options):
    fw = forwarders(gate.address, **options)
    client = connect(fw.address)
    server = gate.gate.get()
    client.sendall(b"hi")
    assert recv_exactly(server, 2) == b"hi"
    wait_parked(fw)
    return fw, client, server


class GateServer(Server):
    def __init__(self):
        self.gate = Gate()
        super().__init__(self.gate)

    def close(self):
        self.gate.release()
        super().close()


def test_parked_connection_resumes_both_ways_and_closes_cleanly(forwarders):
    with GateServer() as upstream:
        fw, client, server = open_quiet_connection(forwarders, upstream)
        late = payload(3_000_001, seed=21)
        client.sendall(late)
        assert recv_exactly(server, len(late)) == late
        server.sendall(late[::-1])
        assert recv_exactly(client, len(late)) == late[::-1]
        wait_parked(fw)  # quiet again, then the half-close dance, from parked pumps
        client.shutdown(socket.SHUT_WR)
        assert recv_all(server) == b""
        server.sendall(b"bye")
        server.close()
        assert recv_all(client) == b"bye"
        client.close()
        forwarders.wait_closed(fw, accepted=1)
    assert forwarders.records[-1].outcome is Outcome.EOF


def test_reset_while_parked_aborts_both_sides(forwarders):
    with GateServer() as upstream:
        fw, client, server = open_quiet_connection(forwarders, upstream)
        reset(server)
        with pytest.raises(ConnectionResetError):
            recv_all(client)
        client.close()
        forwarders.wait_closed(fw, accepted=1)
    assert forwarders.records[-1].outcome is Outcome.RESET
    assert forwarders.records[-1].error == "upstream reset: connection reset by peer"


def test_idle_timeout_applies_to_parked_connections(forwarders):
    hooked = []

    def on_close(record):
        gevent.sleep(0)  # sleep-ok: a hook may use gevent; it must not run on the hub itself
        hooked.append(record.outcome)

    with GateServer() as upstream:
        fw, client, server = open_quiet_connection(forwarders, upstream, idle_timeout=0.5, on_close=on_close)
        assert recv_all(client) == b""
        assert recv_all(server) == b""
        client.close()
        forwarders.wait_closed(fw, accepted=1)
    assert forwarders.records[-1].outcome is Outcome.IDLE_TIMEOUT
    assert hooked == [Outcome.IDLE_TIMEOUT]


def test_stop_aborts_parked_connections(forwarders):
    with GateServer() as upstream:
        fw, client, server = open_quiet_connection(forwarders, upstream)
        fw.stop(timeout=0)
        with pytest.raises(ConnectionResetError):
            recv_all(client)
        client.close()
    assert forwarders.records[-1].outcome is Outcome.SHUTDOWN
    assert fw.statistics().active == 0


def test_a_drained_pump_parks_at_once_so_a_connection_that_spoke_holds_no_greenlet(
        forwarders, monkeypatch):
    """Issue 10, memory after traffic: a pump whose source is drained gives its greenlet back
    at once, not at the next parking pass (disabled here), whether the message was small (moved
    in the watcher's callback) or bulk (a pump in a worker, then parked)."""
    monkeypatch.setattr(forwarder_module, "_PARK_EVERY", 3600.0)
    with Server(echo) as upstream:
        fw = forwarders(upstream.address)
        client = connect(fw.address)
        for size in (64, 3_000_017):
            data = payload(size, seed=size)
            client.sendall(data)
            assert recv_exactly(client, size) == data
            deadline = time.monotonic() + TIMEOUT
            while parked_pumps(fw) < 2:
                assert time.monotonic() < deadline, f"a pump still holds a greenlet after {size} B"
                time.sleep(0.01)  # sleep-ok: polling state another thread changes
        client.close()


def _waiting_in_chain(fw) -> int:
    """How many pumps wait for their source inside a toxic chain (a greenlet, not _unpark,
    on the readable watcher): what a parking pass throws _Park into."""
    count = 0
    for conn in list(fw._context.active.values()):
        for _src, _dst, readable, _writable in conn._ends:
            count += readable.active and getattr(readable.callback, "__self__", None) is not conn
    return count


def _round_trips(clients, seed: int) -> None:
    for i, client in enumerate(clients):
        data = payload(100 + i, seed=seed + i)
        client.sendall(data)
        assert recv_exactly(client, len(data)) == data


def test_a_toxic_change_racing_the_parking_pass_throws_into_no_connection(forwarders, monkeypatch):
    """Issue 15 item 4. A parking pass finds pumps waiting in a toxic chain and has _Park
    thrown into them on the next pass of the loop; a toxic change's kicks, queued before those
    throws (gevent runs callbacks in slices of its switch interval, and the sweep's timer can
    fire in between), run first: the toxic is gone, each pump takes the fast path and parks.
    The throw must then go nowhere; gevent's cancel_wait threw into the watcher's callback's
    ``__self__``, the Connection: "AttributeError: 'Connection' object has no attribute
    'throw'" printed by the hub (no_greenlet_died catches it). The interleaving is forced on
    the hub: the kicks, then two parking passes (the second sees the pumps quiet), in one go."""
    monkeypatch.setattr(forwarder_module, "_PARK_EVERY", 3600.0)  # only the passes run here
    with Server(echo) as upstream:
        fw = forwarders(upstream.address)
        clients = [connect(fw.address) for _ in range(20)]
        try:
            _round_trips(clients, seed=1)
            fw.add_toxic("latency", name="lag", stream="downstream", latency=1)
            _round_trips(clients, seed=2)
            deadline = time.monotonic() + TIMEOUT
            while _waiting_in_chain(fw) < len(clients):
                assert time.monotonic() < deadline, "the downstream pumps never waited in the chain"
                time.sleep(0.01)  # sleep-ok: polling state another thread changes

            def race():
                context = fw._context
                context.toxics.remove("lag")
                relay.toxics_changed(context)  # kicks queued: each leaves the chain and parks
                now = time.monotonic() - context.stalled
                relay.sweep(context, now, True)  # notes the byte counts
                relay.sweep(context, now, True)  # quiet since: throws _Park, after the kicks
            fw._on_hub(race)
            _round_trips(clients, seed=3)  # bytes intact, the pumps (parked now) answer
            assert _waiting_in_chain(fw) == 0
        finally:
            for client in clients:
                client.close()
        forwarders.wait_closed(fw, accepted=len(clients))
    assert all(r.outcome is Outcome.EOF for r in forwarders.records)


@pytest.mark.timeout(120)
def test_toxic_churn_on_many_keep_alive_connections_under_parking(forwarder_factory):
    """Issue 15 item 4 as the soak met it: many keep-alive connections, a toxic added and
    removed over and over while parking passes run every 20 ms and some clients talk. No hub
    error (no_greenlet_died), and every byte comes back in order."""
    count, rounds = 300, 30
    with Server(echo) as upstream:
        fw = forwarder_factory(upstream.address)
        clients = [connect(fw.address) for _ in range(count)]
        try:
            _round_trips(clients, seed=0)
            for k in range(rounds):
                fw.add_toxic("latency", name="lag", stream="downstream", latency=0)
                _round_trips(clients[k::rounds], seed=1000 * (k + 1))
                fw.remove_toxic("lag")
            _round_trips(clients, seed=99_000)
        finally:
            for client in clients:
                client.close()
        forwarder_factory.wait_closed(fw, accepted=count)
    assert all(r.outcome is Outcome.EOF for r in forwarder_factory.records)
