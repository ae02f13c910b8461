"""Helpers for users' own test suites: a started forwarder in front of any address.

Typical use, as a pytest plugin (in a conftest.py)::

    pytest_plugins = ["gproxy.testing"]

    def test_app_survives_a_cut(gproxy_forwarder):
        fw = gproxy_forwarder(("127.0.0.1", 5432), idle_timeout=5)
        app = connect_app(port=fw.address[1])
        ...
        print(fw.statistics())

or without pytest::

    with forwarding(("127.0.0.1", 5432)) as fw:
        ...

Each forwarder listens on 127.0.0.1 with a free port and is stopped at the end
of the test (open connections are aborted at once: a test ends when it ends).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, List

from gproxy.config import AddressLike
from gproxy.forwarder import Forwarder

__all__ = ["forwarding", "gproxy_forwarder"]


@contextlib.contextmanager
def forwarding(target: AddressLike, listen: AddressLike = "127.0.0.1:0", **options) -> Iterator[Forwarder]:
    """A started forwarder to ``target`` for the ``with`` block; stopped (no drain) after it."""
    fw = Forwarder(listen, target, **options).start()
    try:
        yield fw
    finally:
        fw.stop(timeout=0)


try:
    import pytest
except ImportError:  # the helpers above work without pytest
    pytest = None

if pytest is not None:
    @pytest.fixture
    def gproxy_forwarder() -> Iterator[Callable[..., Forwarder]]:
        """A factory: ``gproxy_forwarder(target, listen="127.0.0.1:0", **options)`` returns a
        started Forwarder; every one it made is stopped when the test ends."""
        started: List[Forwarder] = []

        def make(target: AddressLike, listen: AddressLike = "127.0.0.1:0", **options) -> Forwarder:
            fw = Forwarder(listen, target, **options).start()
            started.append(fw)
            return fw

        try:
            yield make
        finally:
            for fw in started:
                fw.stop(timeout=0)
