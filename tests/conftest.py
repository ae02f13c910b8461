"""Fixtures: forwarders that must end every test with no connection open and no error logged."""

from __future__ import annotations

import contextlib
import logging
import threading

import gevent.hub
import pytest

import gproxy
from peers import TIMEOUT, Gate, Server, connect
from statecheck import checking_states


class _ErrorLog(logging.Handler):
    """Collects ERROR records from the gproxy loggers: a bug inside a connection."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture(autouse=True)
def no_errors_logged():
    handler = _ErrorLog()
    logger = logging.getLogger("gproxy")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    assert not handler.records, [handler.format(r) for r in handler.records]


@pytest.fixture(autouse=True)
def no_greenlet_died():
    """Fails the test if any hub reported an error: a greenlet or a loop callback died with an
    exception, which gevent prints on stderr and otherwise ignores (gevent's own test harness
    makes that fatal). Forwarders run their hubs in threads; every hub reports here."""
    errors = []
    original = gevent.hub.Hub.print_exception

    def print_exception(hub, context, kind, value, tb):
        errors.append(f"{context!r}: {getattr(kind, '__name__', kind)}: {value}")
        return original(hub, context, kind, value, tb)

    gevent.hub.Hub.print_exception = print_exception
    try:
        yield errors
    finally:
        gevent.hub.Hub.print_exception = original
    assert not errors, errors


@pytest.fixture(autouse=True)
def checked_states():
    """Fails the test if a connection's direction states broke relay.MOVES: a move not in
    the table, a direction ended twice or never, a teardown before both ended or twice
    (statecheck.py). Yields the ledger, for tests that look at the moves."""
    with checking_states() as ledger:
        yield ledger
        problems = ledger.problems()
    assert not problems, problems


class Forwarders:
    """Starts in-process forwarders (a hub in a daemon thread: this process is not patched)
    and, after the test, checks that every connection has ended, then stops them."""

    def __init__(self, splice: bool):
        self.splice = splice
        self.started = []
        self.closed = threading.Condition()
        self.records = []
        self.reported = {}

    def __call__(self, target, listen="127.0.0.1:0", **options) -> gproxy.Forwarder:
        options.setdefault("splice", self.splice)
        user_hook = options.pop("on_close", None)
        reported = [0]  # this forwarder's connections whose on_close has run

        def on_close(record):
            try:
                if user_hook:
                    user_hook(record)
            finally:  # a test's hook may raise on purpose
                with self.closed:
                    self.records.append(record)
                    reported[0] += 1
                    self.closed.notify_all()

        fw = gproxy.Forwarder(listen, target, on_close=on_close, **options)
        self.reported[id(fw)] = reported
        fw.start()
        self.started.append(fw)
        return fw

    def wait_closed(self, fw: gproxy.Forwarder, accepted: int = None, timeout: float = TIMEOUT):
        """Wait until fw has no open connection (and, if given, has accepted that many), and
        every connection's on_close has run: a connection leaves ``active`` before its record
        is handed to the hook, so ``active == 0`` alone can be seen before the last record."""
        reported = self.reported[id(fw)]

        def done():
            stats = fw.statistics()
            return (stats.active == 0 and (accepted is None or stats.accepted >= accepted)
                    and reported[0] >= stats.accepted)
        with self.closed:
            assert self.closed.wait_for(done, timeout), fw.statistics()
        return fw.statistics()

    @contextlib.contextmanager
    def gated(self, **options):
        """A client connected through a new forwarder to an upstream the test drives by hand:
        yields (fw, client, server); afterwards both are closed and the connection has ended."""
        gate = Gate()
        with Server(gate) as upstream:
            fw = self(upstream.address, **options)
            client = connect(fw.address)
            server = gate.get()
            try:
                yield fw, client, server
            finally:
                client.close()
                server.close()
                gate.release()
            self.wait_closed(fw, accepted=1)

    def stop_all(self):
        for fw in self.started:
            self.wait_closed(fw)
            fw.stop()


@pytest.fixture(params=["splice", "copy"])
def forwarders(request):
    """A factory of started forwarders, once with each pump."""
    factory = Forwarders(splice=request.param == "splice")
    try:
        yield factory
    finally:
        factory.stop_all()


@pytest.fixture
def forwarder_factory():
    """Like ``forwarders``, with the default pump only (for tests about the API, not the bytes)."""
    factory = Forwarders(splice=True)
    try:
        yield factory
    finally:
        factory.stop_all()
