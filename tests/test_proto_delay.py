"""``redis_delay`` and ``http_delay``: protocol toxics that hold matching requests a while and
pass them on (issue 20 item 8's delays). The upstream is a Gate, so the test sees exactly when
each request reaches the server; a delay is checked from below only (a loaded machine makes it
longer, never shorter), and "held" with a delay far beyond the test, ended by removing the
toxic. Then real clients: redis-py against redis-server, urllib against an HTTP server."""

from __future__ import annotations

import http.server
import socket
import threading
import time
import urllib.request

import pytest

from exchange import check
from gproxy import ConfigError, toxics
from gproxy.toxics import make_toxic
from peers import TIMEOUT, recv_exactly
from test_proto_http import HttpExchange
from test_proto_redis import RedisExchange, client, redis_port  # noqa: F401  (a fixture)

pytestmark = pytest.mark.timeout(60)

FOREVER = 600_000   # ms: held for longer than any test runs

GET = b"*2\r\n$3\r\nGET\r\n$1\r\na\r\n"
PING = b"*1\r\n$4\r\nPING\r\n"


def nothing_comes(sock: socket.socket, wait: float = 0.3) -> bool:
    """True if ``sock`` gets no byte for ``wait`` seconds: what a held request looks like
    from the server. (A deliberate wait: a hold that broke would show within it.)"""
    sock.settimeout(wait)
    try:
        sock.recv(1, socket.MSG_PEEK)
    except socket.timeout:
        return True
    finally:
        sock.settimeout(TIMEOUT)
    return False


@pytest.mark.parametrize("kind", ["redis_delay", "http_delay"])
def test_upstream_only_and_a_whole_number_of_ms(kind):
    with pytest.raises(ConfigError, match=f"stream: must be 'upstream' for {kind} toxics"):
        make_toxic(kind, stream="downstream")
    assert make_toxic(kind).stream == "upstream"  # given no stream, it takes its own
    with pytest.raises(ConfigError, match="delay: must be a whole number"):
        make_toxic(kind, stream="upstream", attributes={"delay": -1})


def test_helpers():
    assert toxics.redis_delay("get", 100).attributes == {"command": "get", "delay": 100}
    assert toxics.http_delay(100, "/api").attributes == {"delay": 100, "path": "/api"}
    with pytest.raises(ConfigError, match="command: a command name"):
        toxics.redis_delay("a b c")
    with pytest.raises(ConfigError, match="path: must have no spaces"):
        toxics.http_delay(1, "/a b")


# -- the property: held requests lose, duplicate and reorder nothing ------------------------------

class RedisDelayExchange(RedisExchange):
    toxic_type = "redis_delay"

    def toxic_attributes(self, rng):
        return {"command": rng.choice(["", "GET", "set", "PING", "GET 7"]), "delay": rng.choice([0, 5, 100, 2000])}


class HttpDelayExchange(HttpExchange):
    toxic_type = "http_delay"

    def toxic_attributes(self, rng):
        return {"path": rng.choice(["", "/p/", "/q/", "/p/1", "/nomatch"]), "delay": rng.choice([0, 5, 100, 2000])}


@pytest.mark.parametrize("kind", [RedisDelayExchange, HttpDelayExchange], ids=["redis_delay", "http_delay"])
def test_every_request_reaches_the_server_in_order_however_the_delays_come_and_go(kind):
    """The protocol toxics' property (tests/exchange.py) with toxics that only hold: added,
    updated, removed and reset at random while requests and replies cross, cut anywhere, on
    the fake clock; every request reaches the server whole and in order and gets its reply."""
    for seed in range(60):
        exchange = check(kind, seed)
        assert exchange.answered() == 0


# -- redis_delay ---------------------------------------------------------------------------------

def test_redis_delay_holds_matching_commands_and_those_behind_them_only(forwarder_factory):
    with forwarder_factory.gated() as (fw, client_sock, server):
        fw.add_toxic(toxics.redis_delay("get", FOREVER))
        client_sock.sendall(PING)
        assert recv_exactly(server, len(PING)) == PING            # not matching: passes
        client_sock.sendall(PING + GET + b"PING\r\n")              # a pipeline, inline behind
        assert recv_exactly(server, len(PING)) == PING            # before the held one: passes
        assert nothing_comes(server)
        fw.remove_toxic("redis_delay_upstream")                    # gives back what it held
        assert recv_exactly(server, len(GET) + 6) == GET + b"PING\r\n"


def test_redis_delay_passes_a_command_delay_ms_after_its_name_came(forwarder_factory):
    with forwarder_factory.gated() as (fw, client_sock, server):
        fw.add_toxic("redis_delay", stream="upstream", command="", delay=300)   # every command
        client_sock.sendall(GET[:9])                 # cut inside the name: not decided yet
        assert nothing_comes(server, 0.1)
        sent = time.monotonic()
        client_sock.sendall(GET[9:])
        assert recv_exactly(server, len(GET)) == GET
        assert time.monotonic() - sent >= 0.3


def test_redis_py_waits_for_its_reply(forwarder_factory, redis_port):  # noqa: F811
    fw = forwarder_factory(("127.0.0.1", redis_port))
    app = client(fw.address[1])
    app.set("k", "v")
    fw.add_toxic(toxics.redis_delay("GET", 400))
    started = time.monotonic()
    assert app.get("k") == b"v"
    assert time.monotonic() - started >= 0.4
    fw.update_toxic("redis_delay_upstream", delay=FOREVER)
    assert app.set("k", "w") is True and app.ttl("k") == -1   # SET and TTL are not held
    fw.reset()
    assert app.get("k") == b"w"
    app.close()


# -- http_delay ----------------------------------------------------------------------------------

def request(path: str) -> bytes:
    return b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n"


def test_http_delay_holds_matching_requests_and_those_behind_them_only(forwarder_factory):
    with forwarder_factory.gated() as (fw, client_sock, server):
        fw.add_toxic(toxics.http_delay(FOREVER, path="/slow"))
        fast, slow = request("/fast"), request("/slow/x?y=1")
        client_sock.sendall(fast)
        assert recv_exactly(server, len(fast)) == fast
        client_sock.sendall(fast + slow + fast)                     # pipelined
        assert recv_exactly(server, len(fast)) == fast
        assert nothing_comes(server)
        fw.remove_toxic("http_delay_upstream")
        assert recv_exactly(server, len(slow) + len(fast)) == slow + fast


def test_http_delay_counts_from_the_end_of_the_header_section(forwarder_factory):
    with forwarder_factory.gated() as (fw, client_sock, server):
        fw.add_toxic("http_delay", stream="upstream", delay=300)
        body = b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
        client_sock.sendall(body[:20])
        assert nothing_comes(server, 0.1)
        sent = time.monotonic()
        client_sock.sendall(body[20:])
        assert recv_exactly(server, len(body)) == body
        assert time.monotonic() - sent >= 0.3


class _Hello(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):  # noqa: N802 (http.server's name)
        body = self.path.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_urllib_gets_its_response_that_much_later(forwarder_factory):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        fw = forwarder_factory(httpd.server_address[:2])
        fw.add_toxic(toxics.http_delay(400, path="/slow"))
        url = "http://%s:%d" % fw.address
        started = time.monotonic()
        with urllib.request.urlopen(url + "/slow/1", timeout=TIMEOUT) as response:
            assert response.read() == b"/slow/1"
        assert time.monotonic() - started >= 0.4
        with urllib.request.urlopen(url + "/fast", timeout=TIMEOUT) as response:
            assert response.read() == b"/fast"
    finally:
        httpd.shutdown()
        httpd.server_close()
