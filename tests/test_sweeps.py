"""The periodic sweeps of many forwarders on one hub (gproxy/_sweeps.py): one timer per hub,
the sweeps taken in turn, a slice per loop pass. Checked by counting loop passes (libev's
iteration number), not by timing them."""

from __future__ import annotations

import collections
import socket

import gevent
import pytest

from gproxy import _sweeps
from gproxy.forwarder import Forwarder
from gproxy.service import Service
from peers import TIMEOUT, free_port

RULES = 100


def _run_until(done, timeout: float = TIMEOUT) -> None:
    """Let the test's hub run (its timers fire) until ``done()``."""
    with gevent.Timeout(timeout, AssertionError("timed out")):
        while not done():
            gevent.sleep(0.01)  # sleep-ok: the hub runs the sweeps meanwhile


@pytest.mark.timeout(30)
def test_the_sweeps_of_many_forwarders_do_not_run_in_one_loop_pass(monkeypatch):
    """A hundred rules started together on one hub: their sweeps (idle timeouts, parking) come
    due together, but run at most a slice per loop pass, the loop polling for I/O between
    slices. With a timer per forwarder, all of them ran in the pass where their timers
    expired. (The order they take turns in is checked with a clock of the test's own below:
    here the rules start over a time that a loaded machine stretches.)"""
    loop = gevent.get_hub().loop
    passes = collections.Counter()  # loop pass -> sweeps run in it
    swept = collections.Counter()   # forwarder -> its sweeps
    sweep = Forwarder._sweep

    def counting_sweep(fw):
        passes[loop.iteration] += 1
        swept[fw] += 1
        sweep(fw)
    monkeypatch.setattr(Forwarder, "_sweep", counting_sweep)
    service = Service(drain_timeout=0)
    # The target's port stays bound (never listening) for the whole test: a port from
    # free_port(), closed at once, could be handed to one of the rules' port 0 listeners, and
    # that rule would refuse to start as a forwarding loop onto itself.
    reserved = socket.socket()
    try:
        reserved.bind(("127.0.0.1", 0))
        target = reserved.getsockname()
        for i in range(RULES):  # idle_timeout 0.8 s: swept every 0.1 s
            service.create(f"rule-{i}", "127.0.0.1:0", target, idle_timeout=0.8)
        _run_until(lambda: len(swept) == RULES and min(swept.values()) >= 3)
    finally:
        service.stop()
        reserved.close()
    assert max(passes.values()) <= _sweeps.SLICE, passes
    assert len(passes) >= 3 * RULES // _sweeps.SLICE


class _Clock:
    """time.monotonic for _sweeps, moved by the test."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class _Loop:
    """Just enough of a libev loop for Sweeps: timers the test fires by hand."""

    def __init__(self):
        self.armed = []  # started and not closed: (delay, callback)

    def timer(self, after):
        loop = self

        class Timer:
            def start(self, callback):
                self.entry = (after, callback)
                loop.armed.append(self.entry)

            def close(self):
                if getattr(self, "entry", None) in loop.armed:
                    loop.armed.remove(self.entry)
        return Timer()

    def fire(self):
        """Run the one armed timer's callback: one loop pass's worth of sweeps."""
        (entry,) = self.armed
        entry[1]()
        return entry[0]


def test_due_sweeps_take_turns_a_slice_per_pass(monkeypatch):
    """Sweeps that come due together run a slice per pass, the timer armed for the next pass
    (delay 0) while more are due, then for the next due time; each round in the same order,
    so none is swept twice while another is due."""
    clock = _Clock()
    monkeypatch.setattr(_sweeps.time, "monotonic", clock)
    loop = _Loop()
    hub = type("Hub", (), {"loop": loop})()
    order = []
    sweeps = _sweeps.Sweeps(hub)
    handles = []
    for i in range(RULES):
        handles.append(sweeps.add(1.0, lambda i=i: order.append(i)))
    for round_ in range(3):
        clock.now += 1.0
        assert loop.armed[0][0] <= 1.0
        passes = []
        while True:
            before = len(order)
            loop.fire()
            passes.append(len(order) - before)
            if not loop.armed or loop.armed[0][0] > 0:
                break
        assert max(passes) == _sweeps.SLICE and sum(passes) == RULES, passes
        assert order[-RULES:] == list(range(RULES)), f"round {round_}: not in turn"
        assert loop.armed[0][0] == pytest.approx(1.0), "not armed for the next round"
    for handle in handles:
        handle.close()
    assert not loop.armed


def test_a_late_sweep_runs_once_and_is_not_made_up_for(monkeypatch):
    """After the loop stalled for several intervals, a sweep runs once, then an interval
    later: the missed ones are not run back to back."""
    clock = _Clock()
    monkeypatch.setattr(_sweeps.time, "monotonic", clock)
    loop = _Loop()
    hub = type("Hub", (), {"loop": loop})()
    calls = []
    handle = _sweeps.Sweeps(hub).add(1.0, lambda: calls.append(clock.now))
    clock.now += 5.5  # a stall of five intervals
    loop.fire()
    assert calls == [clock.now]
    assert loop.armed[0][0] == pytest.approx(1.0)  # next in an interval, not at once
    handle.close()


def test_one_timer_per_hub_and_none_once_its_forwarders_stop():
    """The hub's sweeps are one object with one timer, shared by its forwarders; when the
    last one stops, no timer of ours is left on the hub."""
    hub = gevent.get_hub()
    service = Service(drain_timeout=0)
    try:
        target = ("127.0.0.1", free_port())
        for i in range(3):
            service.create(f"rule-{i}", "127.0.0.1:0", target)
        sweeps = _sweeps._by_hub[hub]  # white box
        assert sweeps._live == 3 and sweeps._timer is not None
    finally:
        service.stop()
    assert hub not in _sweeps._by_hub and sweeps._timer is None


def test_a_sweep_that_raises_does_not_stop_the_others():
    """A callback that raises is reported by the hub; the other sweeps go on."""
    hub = gevent.get_hub()
    calls = collections.Counter()

    def good():
        calls["good"] += 1

    def bad():
        calls["bad"] += 1
        raise RuntimeError("a bug in one sweep")

    printed = []
    original = hub.print_exception
    hub.print_exception = lambda *args: printed.append(args)  # expected: not a test failure
    handles = [_sweeps.every(hub, 0.01, bad), _sweeps.every(hub, 0.01, good)]
    try:
        _run_until(lambda: calls["good"] >= 3 and calls["bad"] >= 3)
    finally:
        for handle in handles:
            handle.close()
        del hub.print_exception
        assert hub.print_exception == original
    assert printed and all(isinstance(args[2], RuntimeError) for args in printed)


@pytest.mark.timeout(30)
def test_a_forwarder_without_timeouts_or_toxics_walks_none_of_its_connections(monkeypatch):
    """The periodic watch has two jobs: timeouts (none set here) and parking pumps that sit in
    a toxic chain (none has ever had one). Then its passes must not walk the open connections:
    that walk cost about 0.35 us per idle connection per second (benchmarks/scale.py at
    100,000 connections). Once a toxic has run, the parking passes walk again."""
    import threading

    from gproxy import forwarder as forwarder_module
    from peers import Server, connect, echo, recv_exactly

    walks = []
    real_walk = forwarder_module.sweep
    monkeypatch.setattr(forwarder_module, "sweep", lambda *args: (walks.append(args[2]), real_walk(*args)))
    passes = [0]
    passed = threading.Condition()
    real_sweep = Forwarder._sweep

    def counting_sweep(fw):
        real_sweep(fw)
        with passed:
            passes[0] += 1
            passed.notify_all()
    monkeypatch.setattr(Forwarder, "_sweep", counting_sweep)

    def wait_passes(more: int) -> None:
        with passed:
            goal = passes[0] + more
            assert passed.wait_for(lambda: passes[0] >= goal, TIMEOUT), passes

    with Server(echo) as upstream, Forwarder("127.0.0.1:0", upstream.address) as fw, \
            connect(fw.address) as client:
        client.sendall(b"ping")
        assert recv_exactly(client, 4) == b"ping"
        wait_passes(3)  # at least two parking passes (one a second) with the connection open
        assert walks == []
        with fw.toxic("latency", latency=1):
            client.sendall(b"pong")
            assert recv_exactly(client, 4) == b"pong"  # through the chain
            wait_passes(3)
        assert True in walks  # a parking pass walked the connections
