"""Per-target max_connections and the rule's queue: clients beyond every target's limit wait,
in order, and go when a slot frees; a timeout, a full queue, a client that leaves, a stop."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

import gproxy
from gproxy import ConfigError, Forwarder, metrics
from peers import TIMEOUT, Gate, Server, connect, recv_exactly, reset


def wait_for(predicate, timeout: float = TIMEOUT):
    """Poll another thread's state (the forwarder's hub runs in a thread of its own)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)  # sleep-ok: polling a counter another thread changes


def queued(fw) -> int:
    return fw.targets()[0].queued


def limited(address, limit: int) -> dict:
    return {"address": "127.0.0.1:%d" % address[1], "max_connections": limit}


def page(fw) -> dict:
    found = {}
    for family in text_string_to_metric_families(metrics.render([fw])):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def tagged_client(fw, tag: bytes) -> socket.socket:
    client = connect(fw.address)
    client.sendall(tag)  # waits in the kernel for the target, while the client waits in the queue
    return client


@pytest.mark.timeout(60)
def test_clients_beyond_the_limit_wait_and_go_in_order(forwarder_factory):
    gate = Gate()
    with Server(gate) as upstream:
        fw = forwarder_factory([limited(upstream.address, 2)], queue_timeout=30)
        clients = {tag: tagged_client(fw, tag) for tag in (b"A", b"B")}
        servers = {}
        for _ in range(2):
            server = gate.get()
            servers[recv_exactly(server, 1)] = server
        assert sorted(servers) == [b"A", b"B"]
        for number, tag in enumerate((b"C", b"D", b"E"), 1):
            clients[tag] = tagged_client(fw, tag)
            wait_for(lambda n=number: queued(fw) == n)  # each in the queue before the next comes
        status = fw.targets()[0]
        assert (status.active, status.queued, status.max_connections) == (2, 3, 2)
        assert upstream.accepted == 2

        for done, expected, left in ((b"A", b"C", 2), (b"B", b"D", 1), (b"C", b"E", 0)):
            clients.pop(done).close()  # a connection ends, its slot frees: the oldest waiter takes it
            servers.pop(done).close()
            server = gate.get()
            assert recv_exactly(server, 1) == expected
            servers[expected] = server
            assert queued(fw) == left
            assert fw.targets()[0].active <= 2
        assert upstream.accepted == 5
        clients[b"E"].sendall(b"hello")
        assert recv_exactly(servers[b"E"], 5) == b"hello"
        servers[b"E"].sendall(b"world")
        assert recv_exactly(clients[b"E"], 5) == b"world"
        found = page(fw)
        for sock in list(clients.values()) + list(servers.values()):
            sock.close()
        gate.release()
        forwarder_factory.wait_closed(fw, accepted=5)
    rule, target = fw.name, "127.0.0.1:%d" % upstream.address[1]
    assert found[("gproxy_queue_length", frozenset({("rule", rule)}))] == 0
    assert found[("gproxy_queued_total", frozenset({("rule", rule)}))] == 3
    assert found[("gproxy_queue_wait_seconds_total", frozenset({("rule", rule)}))] > 0
    assert found[("gproxy_target_max_connections", frozenset({("rule", rule), ("target", target)}))] == 2
    assert fw.targets()[0].active == 0


@pytest.mark.timeout(60)
def test_a_full_target_is_skipped_and_waiters_take_any_target_with_room(forwarder_factory):
    first, second = Gate(), Gate()
    with Server(first) as one, Server(second) as two:
        fw = forwarder_factory([limited(one.address, 1), limited(two.address, 1)], queue_timeout=30)
        a = tagged_client(fw, b"A")
        at_one = first.get()
        b = tagged_client(fw, b"B")  # failover's first target is full: the second has room
        at_two = second.get()
        assert recv_exactly(at_one, 1) == b"A" and recv_exactly(at_two, 1) == b"B"
        c = tagged_client(fw, b"C")
        wait_for(lambda: queued(fw) == 1)  # both full: it waits, not refused
        at_two.close()  # the second frees first: the waiter goes there
        b.close()
        at_two = second.get()
        assert recv_exactly(at_two, 1) == b"C"
        assert one.accepted == 1 and two.accepted == 2
        for sock in (a, b, c, at_one, at_two):
            sock.close()
        first.release()
        second.release()
        forwarder_factory.wait_closed(fw, accepted=3)


@pytest.mark.timeout(60)
def test_a_wait_past_queue_timeout_ends_the_client_with_its_own_outcome(forwarder_factory, caplog):
    gate = Gate()
    records = []
    with Server(gate) as upstream:
        fw = forwarder_factory([limited(upstream.address, 1)], queue_timeout=0.3, on_close=records.append)
        held = connect(fw.address)
        server = gate.get()
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="gproxy.relay"):
            with connect(fw.address) as late:
                assert late.recv(1) == b""  # closed once its time in the queue is up
            waited = time.monotonic() - started
            wait_for(lambda: len(records) == 1)
        assert 0.25 <= waited < 5
        found = page(fw)
        held.close()
        server.close()
        gate.release()
        forwarder_factory.wait_closed(fw, accepted=2)
    (record,) = [r for r in records if r.outcome is gproxy.Outcome.QUEUE_TIMEOUT]
    assert "waited 0.3s in the queue" in record.error and "1/1" in record.error
    lines = [r.getMessage() for r in caplog.records if "queue timeout" in r.getMessage()]
    assert len(lines) == 1 and caplog.records[0].levelno == logging.WARNING
    assert found[("gproxy_connections_total", frozenset({("rule", fw.name), ("outcome", "queue_timeout")}))] == 1
    assert found[("gproxy_queued_total", frozenset({("rule", fw.name)}))] == 1


@pytest.mark.timeout(60)
def test_a_full_queue_turns_the_next_client_away_at_once(forwarder_factory):
    gate = Gate()
    records = []
    with Server(gate) as upstream:
        fw = forwarder_factory([limited(upstream.address, 1)], queue_timeout=30, max_queue=1,
                               on_close=records.append)
        held = connect(fw.address)
        server = gate.get()
        waiting = connect(fw.address)
        wait_for(lambda: queued(fw) == 1)
        with connect(fw.address) as turned_away:
            assert turned_away.recv(1) == b""
        wait_for(lambda: len(records) == 1)
        assert records[0].outcome is gproxy.Outcome.QUEUE_TIMEOUT
        assert "the queue is full: 1 clients wait (max_queue 1)" in records[0].error
        server.close()  # the waiter still gets its turn
        held.close()
        server = gate.get()
        waiting.sendall(b"x")
        assert recv_exactly(server, 1) == b"x"
        for sock in (held, waiting, server):
            sock.close()
        gate.release()
        forwarder_factory.wait_closed(fw, accepted=3)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["close", "reset"])
def test_a_waiter_whose_client_leaves_leaves_the_queue_and_no_slot(forwarder_factory, how):
    gate = Gate()
    records = []
    with Server(gate) as upstream:
        fw = forwarder_factory([limited(upstream.address, 1)], queue_timeout=30, on_close=records.append)
        held = connect(fw.address)
        server = gate.get()
        leaver = connect(fw.address)
        wait_for(lambda: queued(fw) == 1)
        if how == "reset":
            reset(leaver)
        else:
            leaver.close()
        wait_for(lambda: len(records) == 1)  # gone at once, not when a slot frees
        assert queued(fw) == 0
        expected = gproxy.Outcome.EOF if how == "close" else gproxy.Outcome.RESET
        assert records[0].outcome is expected, records[0]
        assert "waited in the queue" in records[0].error
        held.close()
        server.close()
        forwarder_factory.wait_closed(fw, accepted=2)
        # the slot the first client freed is free: the next client goes at once, twice over
        for _ in range(2):
            with connect(fw.address) as client:
                server = gate.get()
                client.sendall(b"n")
                assert recv_exactly(server, 1) == b"n"
                server.close()
            forwarder_factory.wait_closed(fw)
        gate.release()
    assert upstream.accepted == 3


@pytest.mark.timeout(60)
def test_stop_ends_the_waiters(forwarder_factory):
    gate = Gate()
    records = []
    with Server(gate) as upstream:
        fw = forwarder_factory([limited(upstream.address, 1)], queue_timeout=30, on_close=records.append)
        held = connect(fw.address)
        server = gate.get()
        waiters = [connect(fw.address), connect(fw.address)]
        wait_for(lambda: queued(fw) == 2)
        fw.stop(timeout=0)
        for sock in waiters + [held]:
            with pytest.raises(ConnectionResetError):  # aborted (a stop's reset), not left waiting
                sock.recv(1)
            sock.close()
        server.close()
        gate.release()
    outcomes = sorted(str(r.outcome) for r in records)
    assert outcomes == ["shutdown", "shutdown", "shutdown"], records
    assert fw.statistics().active == 0


def test_max_connections_is_validated_naming_the_target():
    with pytest.raises(ConfigError, match=r"target 1 \(127.0.0.1:9\): max_connections: expected a whole "
                                          r"number from 0 \(no limit\) to 1000000, got -1"):
        Forwarder("127.0.0.1:0", [{"address": "127.0.0.1:9", "max_connections": -1}])
    with pytest.raises(ConfigError, match="max_queue"):
        Forwarder("127.0.0.1:0", "127.0.0.1:9", max_queue=-1)
    with pytest.raises(ConfigError, match="queue_timeout"):
        Forwarder("127.0.0.1:0", "127.0.0.1:9", queue_timeout=-1)
    fw = Forwarder("127.0.0.1:0", [gproxy.Target("127.0.0.1:9", max_connections=5)])
    assert fw.rule.target_list[0].max_connections == 5
    with pytest.raises(ConfigError, match="max_connections"):
        fw.set_target("127.0.0.1:9", max_connections=True)


@pytest.mark.timeout(60)
def test_a_limit_set_at_run_time_holds_the_plain_rules_open_connections(forwarder_factory):
    gate = Gate()
    with Server(gate) as upstream:
        fw = forwarder_factory(upstream.address, queue_timeout=30)  # one target: the plain path
        held = connect(fw.address)
        server = gate.get()
        assert fw.set_target(upstream.address, max_connections=1).max_connections == 1
        waiting = tagged_client(fw, b"w")  # the open connection holds the one slot
        wait_for(lambda: queued(fw) == 1)
        server.close()
        held.close()
        server = gate.get()
        assert recv_exactly(server, 1) == b"w"
        assert fw.set_target(upstream.address, max_connections=0).max_connections == 0
        for sock in (held, waiting, server):
            sock.close()
        gate.release()
        forwarder_factory.wait_closed(fw, accepted=2)


@pytest.mark.timeout(60)
def test_a_reload_keeps_a_limit_set_at_run_time_and_shares_the_slots():
    """count_on (a reload's changed rule): the limit set at run time stays, and the old
    forwarder's open connection holds the target's slot against the new one's clients."""
    gate = Gate()
    with Server(gate) as upstream:
        target = "127.0.0.1:%d" % upstream.address[1]
        old = Forwarder("127.0.0.1:0", [target, "127.0.0.1:9"], name="r", queue_timeout=30).start()
        new = Forwarder("127.0.0.1:0", [target, "127.0.0.1:9"], name="r", queue_timeout=30, idle_timeout=60)
        try:
            old.set_target(target, max_connections=1)
            old.set_target("127.0.0.1:9", state="disabled")
            held = connect(old.address)
            server = gate.get()
            new.count_on(old)
            new.start()
            new.show_own_targets()
            assert new.set_target(target).max_connections == 1
            waiting = tagged_client(new, b"w")
            wait_for(lambda: new.targets()[0].queued == 1)
            held.close()  # the old forwarder's connection ends: the new one's waiter goes
            server.close()
            server = gate.get()
            assert recv_exactly(server, 1) == b"w"
            waiting.close()
            server.close()
        finally:
            gate.release()
            new.stop()
            old.stop()


def check_file(tmp_path, rule_lines: str) -> subprocess.CompletedProcess:
    path = tmp_path / "gproxy.toml"
    path.write_text('[[rule]]\nname = "redis"\nlisten = "127.0.0.1:16380"\n' + rule_lines)
    return subprocess.run([sys.executable, "-m", "gproxy", "--check", "-c", str(path)], capture_output=True,
                          text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)


def test_a_config_file_gives_limits_in_target_tables(tmp_path):
    good = check_file(tmp_path, 'targets = [{address = "127.0.0.1:6379", max_connections = 100}, '
                                '"127.0.0.1:6380"]\nqueue_timeout = 2.5\nmax_queue = 50\n')
    assert good.returncode == 0, good.stderr
    assert "127.0.0.1:6379 (max_connections 100)" in good.stdout, good.stdout
    for lines, culprit in (('targets = [{address = "127.0.0.1:6379", max_connections = -1}]\n',
                            "rule 'redis': targets: target 1 (127.0.0.1:6379): max_connections: expected a "
                            "whole number from 0 (no limit) to 1000000, got -1"),
                           ('targets = [{address = "127.0.0.1:6379", max_conections = 1}]\n',
                            "unknown key \"max_conections\" (did you mean \"max_connections\"?)"),
                           ('target = "127.0.0.1:6379"\nqueue_timeout = "soon"\n', "rule 'redis': queue_timeout"),
                           ('target = "127.0.0.1:6379"\nmax_queue = -1\n', "rule 'redis': max_queue")):
        bad = check_file(tmp_path, lines)
        assert bad.returncode == 2 and culprit in bad.stderr, (lines, bad.stderr)
        assert len(bad.stderr.strip().splitlines()) == 1
