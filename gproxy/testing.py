"""Helpers for users' own test suites: a started forwarder in front of any address.

Typical use, as a pytest plugin (in a conftest.py)::

    pytest_plugins = ["gproxy.testing"]

    def test_app_survives_a_cut(gproxy_forwarder):
        fw = gproxy_forwarder(("127.0.0.1", 5432), idle_timeout=5)
        app = connect_app(port=fw.address[1])
        ...
        print(fw.statistics())

    @pytest.fixture(scope="session")
    def db_proxy(gproxy_session_forwarder):      # one forwarder for the whole session
        return gproxy_session_forwarder(("127.0.0.1", 5432))

    def test_app_retries_while_the_database_is_down(db_proxy):
        app = App(db_port=db_proxy.address[1])
        with db_proxy.down():                    # refused, open connections cut
            assert app.get("key") is None        # degraded, not crashed
        assert app.get("key") == "value"         # and back once it is up again
        db_proxy.add_toxic("latency", latency=500)
        assert app.get("key") is None            # its 0.1 s timeout fires

or without pytest::

    with forwarding(("127.0.0.1", 5432)) as fw:
        ...

The target comes first and ``listen`` is keyword-only (default ``127.0.0.1:0``, a free
port): ``Forwarder(listen, target)`` puts listen first, so a positional listen here would
be read the wrong way round; it is a ``TypeError`` instead. Every forwarder is stopped at
the end of its test (or session) with open connections aborted at once: a test ends when
it ends. After every test the plugin resets the forwarders these fixtures made that are
still running (``Forwarder.reset()``: every toxic removed, enabled again), so what one test
did to a shared proxy never leaks into the next.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable, Iterator, List

from gproxy.config import AddressLike, TargetLike
from gproxy.forwarder import Forwarder, State

__all__ = ["forwarding", "gproxy_forwarder", "gproxy_session_forwarder"]

LOCAL = "127.0.0.1:0"

#: forwarders the fixtures made: reset after every test while they run
_made: "weakref.WeakSet[Forwarder]" = weakref.WeakSet()


@contextlib.contextmanager
def forwarding(target: TargetLike, *, listen: AddressLike = LOCAL, **options: Any) -> Iterator[Forwarder]:
    """A started forwarder to ``target`` for the ``with`` block; stopped (no drain) after it.
    ``options`` are Forwarder's keyword options."""
    fw = Forwarder(listen, target, **options).start()
    try:
        yield fw
    finally:
        fw.stop(timeout=0)


@contextlib.contextmanager
def _factory() -> Iterator[Callable[..., Forwarder]]:
    started: List[Forwarder] = []

    def make(target: TargetLike, *, listen: AddressLike = LOCAL, **options: Any) -> Forwarder:
        fw = Forwarder(listen, target, **options).start()
        started.append(fw)
        _made.add(fw)
        return fw

    try:
        yield make
    finally:
        for fw in started:
            fw.stop(timeout=0)


try:
    import pytest
except ImportError:  # the helpers above work without pytest
    pytest = None

if pytest is not None:
    @pytest.fixture
    def gproxy_forwarder() -> Iterator[Callable[..., Forwarder]]:
        """A factory: ``gproxy_forwarder(target, *, listen="127.0.0.1:0", **options)`` returns
        a started Forwarder; every one it made is stopped when the test ends."""
        with _factory() as make:
            yield make

    @pytest.fixture(scope="session")
    def gproxy_session_forwarder() -> Iterator[Callable[..., Forwarder]]:
        """The same factory for session-scoped fixtures (a database proxy every test shares):
        its forwarders are stopped when the test session ends."""
        with _factory() as make:
            yield make

    @pytest.fixture(autouse=True)
    def _gproxy_reset() -> Iterator[None]:
        """After each test: the fixtures' running forwarders lose their toxics and listen again."""
        yield
        for fw in list(_made):
            if fw.state is State.RUNNING:
                fw.reset()
