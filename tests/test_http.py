"""The two HTTP servers (the API, /metrics) keep the same rules against bad clients: malformed
HTTP is a 400 and a DEBUG line, a silent client is let go, a client that stops reading an
answer is let go without a traceback. In this process, on the test's hub, with a short timeout."""

from __future__ import annotations

import logging
import socket

import gevent
import gevent.event
import gevent.socket
import pytest

from gproxy import metrics
from gproxy._api import Api
from gproxy.service import Service
from gproxy.stats import Counters
from peers import TIMEOUT

_CLIENT_TIMEOUT = 0.2
#: bytes a client leaves unread so that the server's write must wait: more than the kernel
#: buffers both ends (net.ipv4.tcp_wmem's largest default is 4 MiB)
_BIG = 16 << 20


class _Rule:
    """A source for metrics.render: a rule whose long name makes a big page."""

    def __init__(self, name: str):
        self.name = name
        self.counters = Counters()


@pytest.fixture(params=["api", "metrics"])
def http_server(request):
    """A server on this test's hub: its address, a path that answers, and one whose answer
    is over _BIG bytes (/metrics is: its rules have long names)."""
    if request.param == "api":
        api = Api(Service(), "127.0.0.1:0", client_timeout=_CLIENT_TIMEOUT)
        api.mount("GET", "/big", lambda environ: (200, [("Content-Type", "text/plain")], b"x" * _BIG))
        api.start()
        yield api.address, "/version", "/big"
        api.stop()
    else:
        # each sample line repeats the rule's name, and a rule has 31 lines
        rules = [_Rule(f"{i}" + "r" * (1 << 16)) for i in range(_BIG // (31 << 16) + 1)]
        server = metrics.serve("127.0.0.1:0", lambda: rules, client_timeout=_CLIENT_TIMEOUT)
        yield server.address, "/metrics", "/metrics"
        server.stop(timeout=1)


def _exchange(address, request: bytes) -> bytes:
    """Send ``request`` and read the answer to EOF."""
    with gevent.socket.create_connection(address) as client:
        client.sendall(request)
        reply = b""
        while chunk := client.recv(65536):
            reply += chunk
        return reply


@pytest.mark.timeout(30)
def test_malformed_http_is_a_400_and_no_error(http_server, caplog):
    address, ok, _big = http_server
    caplog.set_level(logging.DEBUG, logger="gproxy")
    garbage = b"\x16\x03\x01\x02\x00GARBAGE-FROM-CLIENT \x01\x02 HTTP/9\r\n\r\n"
    with gevent.Timeout(TIMEOUT):
        reply = _exchange(address, garbage)
        assert reply.startswith(b"HTTP/1.1 400 "), reply[:100]
        fine = _exchange(address, f"GET {ok} HTTP/1.0\r\nUser-Agent: t\r\n\r\n".encode())
        assert fine.startswith(b"HTTP/1.1 200 "), fine[:100]  # and it still serves
    said = [r for r in caplog.records if r.name.startswith("gproxy")]
    assert not [r for r in said if r.levelno >= logging.WARNING], [r.getMessage() for r in said]
    assert any("bad request" in r.getMessage() for r in said if r.levelno == logging.DEBUG)
    # the client's bytes are not written raw into the log, even at DEBUG
    assert not any("\x01\x02" in r.getMessage() or "\r" in r.getMessage() for r in said)


@pytest.mark.timeout(30)
def test_a_silent_client_is_let_go(http_server):
    address, _ok, _big = http_server
    with gevent.Timeout(TIMEOUT):
        with gevent.socket.create_connection(address) as silent:
            assert silent.recv(1) == b""  # EOF: the server closed it
        with gevent.socket.create_connection(address) as half:  # stalls mid-request
            half.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
            assert half.recv(1) == b""


@pytest.mark.timeout(30)
def test_a_client_that_stops_reading_is_let_go_without_a_traceback(http_server):
    """The answer is bigger than what the kernel buffers: the server's write waits for the
    client, which reads nothing until the server has given up (its DEBUG line), then finds
    the answer cut short. Before, pywsgi printed the timeout's traceback (no_greenlet_died)."""
    address, _ok, big = http_server
    gave_up = gevent.event.Event()

    class Watch(logging.Handler):
        def emit(self, record):
            if "stopped reading" in record.getMessage() or "timed out" in record.getMessage():
                gave_up.set()

    watch = Watch(logging.DEBUG)
    logger = logging.getLogger("gproxy")
    level = logger.level
    logger.addHandler(watch)
    logger.setLevel(logging.DEBUG)
    try:
        with gevent.Timeout(TIMEOUT):
            with gevent.socket.socket() as client:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                client.connect(address)
                client.sendall(f"GET {big} HTTP/1.0\r\nUser-Agent: t\r\n\r\n".encode())
                assert gave_up.wait(TIMEOUT)
                got = 0
                try:
                    while chunk := client.recv(1 << 20):
                        got += len(chunk)
                except ConnectionResetError:
                    pass
                assert got < _BIG
    finally:
        logger.removeHandler(watch)
        logger.setLevel(level)
