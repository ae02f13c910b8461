"""``gproxy.client``, the typed client for the HTTP API (issue 20 item 10), against
``gproxy --api`` in a subprocess over real HTTP: toxiproxy's routes (what a toxiproxy server
answers too), gproxy's own (connections, targets), and the typed errors. A toxiproxy server
is not built here (no Go toolchain in CI); a stand-in answers the way toxiproxy's Go server
answers what it does not know (a plain-text 404), which is what gproxy's own routes meet there."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import gproxy
from gproxy import toxics
from gproxy.client import (
    ApiError,
    BadRequest,
    Client,
    Conflict,
    Connection,
    NotFound,
    Proxy,
    Toxic,
    Unreachable,
)
from peers import TIMEOUT, Gate, Server, connect, echo, free_port, recv_all, recv_exactly
from test_api import exchange, serving

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def server():
    yield from serving()


@pytest.fixture
def api(server):
    """A client of the module's server, emptied after each test."""
    client = Client(server.url, timeout=TIMEOUT)
    yield client
    assert server.process.poll() is None, server.seen
    for name in client.proxies():
        client.delete_proxy(name)


@pytest.fixture(scope="module")
def upstream():
    with Server(echo) as server:
        yield server


def target(server) -> str:
    return "%s:%d" % server.address


def test_proxies_round_trip(api, upstream):
    assert api.version() == gproxy.__version__
    proxy = api.create_proxy("echo", target(upstream), listen="127.0.0.1:0")
    assert isinstance(proxy, Proxy) and proxy.name == "echo" and proxy.enabled and proxy.toxics == []
    assert proxy.host == "127.0.0.1" and proxy.port > 0 and proxy.upstream == target(upstream)
    assert exchange((proxy.host, proxy.port)) == b"ping"
    assert api.proxies() == {"echo": proxy} and api.proxy("echo") == proxy
    assert api.disable("echo").enabled is False
    with pytest.raises(ConnectionRefusedError):
        connect((proxy.host, proxy.port)).close()
    assert api.enable("echo").enabled is True
    port = free_port()
    moved = api.update_proxy("echo", listen=f"127.0.0.1:{port}")
    assert moved.port == port and exchange((moved.host, moved.port)) == b"ping"
    api.delete_proxy("echo")
    assert api.proxies() == {}


def test_a_proxy_created_without_listen_gets_the_servers_default(api, upstream):
    proxy = api.create_proxy("d", target(upstream))
    assert proxy.host == "127.0.0.1" and proxy.port > 0


def test_toxics_typed_helpers_and_type_names(api, upstream):
    api.create_proxy("p", target(upstream))
    latency = api.add_toxic("p", toxics.latency(100, jitter=10, stream="upstream"), toxicity=0.5)
    assert latency == Toxic("latency_upstream", "latency", "upstream", 0.5, {"latency": 100, "jitter": 10})
    named = api.add_toxic("p", "bandwidth", name="slow", attributes={"rate": 64})
    assert (named.name, named.stream, named.toxicity) == ("slow", "downstream", 1.0)
    assert named.attributes == {"rate": 64}
    assert api.toxics("p") == [latency, named] == api.proxy("p").toxics
    updated = api.update_toxic("p", "latency_upstream", attributes={"jitter": 5})
    assert updated.attributes == {"latency": 100, "jitter": 5} and updated.toxicity == 0.5  # toxicity kept
    assert api.update_toxic("p", "slow", toxicity=0.25).toxicity == 0.25
    assert api.toxic("p", "slow").toxicity == 0.25
    trigger = api.add_toxic("p", toxics.trigger(match="QUIT", action="close", once=False))
    assert trigger.attributes["once"] is False and trigger.stream == "downstream"
    api.remove_toxic("p", "slow")
    assert [t.name for t in api.toxics("p")] == ["latency_upstream", trigger.name]
    api.reset()
    assert api.toxics("p") == []
    with pytest.raises(TypeError, match="helper"):
        api.add_toxic("p", toxics.latency(5), attributes={"latency": 6})  # type: ignore[call-overload]


def test_errors_carry_the_status_and_the_servers_message(api, upstream):
    api.create_proxy("p", target(upstream))
    with pytest.raises(Conflict) as conflict:
        api.create_proxy("p", target(upstream))
    assert (conflict.value.status, conflict.value.message) == (409, "proxy already exists")
    assert str(conflict.value) == "HTTP 409: proxy already exists"
    with pytest.raises(NotFound) as missing:
        api.proxy("nope")
    assert (missing.value.status, missing.value.message) == (404, "proxy not found")
    with pytest.raises(NotFound, match="toxic not found"):
        api.remove_toxic("p", "nope")
    with pytest.raises(BadRequest) as bad:
        api.add_toxic("p", "latency", attributes={"latency": -1})
    assert bad.value.status == 400 and "latency" in bad.value.message
    with pytest.raises(BadRequest, match="invalid toxic type"):
        api.add_toxic("p", "latencyy")  # type: ignore[call-overload]
    api.add_toxic("p", "latency")
    with pytest.raises(Conflict, match="toxic already exists"):
        api.add_toxic("p", "latency")
    assert all(issubclass(kind, ApiError) for kind in (BadRequest, NotFound, Conflict))


def test_names_are_percent_encoded_in_paths(api, upstream):
    for name in ("café", "a b", "what?", "100%"):
        proxy = api.create_proxy(name, target(upstream))
        assert api.proxy(name) == proxy
        assert api.add_toxic(name, toxics.latency(1, name="t?%")).name == "t?%"
        api.remove_toxic(name, "t?%")


def test_populate(api, upstream):
    made = api.populate([{"name": "a", "upstream": target(upstream)},
                         {"name": "b", "upstream": target(upstream), "enabled": False}])
    assert [(p.name, p.enabled) for p in made] == [("a", True), ("b", False)]
    with pytest.raises(BadRequest, match="missing required field: upstream"):
        api.populate([{"name": "c"}])
    assert sorted(api.proxies()) == ["a", "b"]


def test_unreachable_is_its_own_error():
    client = Client(f"127.0.0.1:{free_port()}", timeout=TIMEOUT)
    assert client.url.startswith("http://")
    with pytest.raises(Unreachable, match="connection refused"):
        client.proxies()


def test_the_default_url_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("TOXIPROXY_URL", "http://10.9.8.7:1234/")
    assert Client().url == "http://10.9.8.7:1234"
    monkeypatch.delenv("TOXIPROXY_URL")
    assert Client().url == "http://localhost:8474"


def test_connections_marks_and_cuts(api):
    gate = Gate()
    with Server(gate) as server:
        try:
            proxy = api.create_proxy("p", target(server))
            first = connect((proxy.host, proxy.port))
            first_upstream = gate.get()
            first.sendall(b"1")
            assert recv_exactly(first_upstream, 1) == b"1"
            mark = api.mark("p")
            assert mark == 2
            later = [(connect((proxy.host, proxy.port)), gate.get()) for _ in range(2)]
            for client, up in later:
                client.sendall(b"2")
                assert recv_exactly(up, 1) == b"2"
            listing = api.connections("p", since=mark)
            assert listing.mark == 4 and [c.id for c in listing.connections] == [2, 3]
            conn = api.connection("p", 2)
            assert isinstance(conn, Connection) and conn.state == "open" and conn.bytes_upstream == 1
            assert conn.client == later[0][0].getsockname()[:2]
            assert conn.upstream_local == later[0][1].getpeername()[:2]
            api.close_connection("p", 2)
            assert recv_all(later[0][0]) == b""
            with pytest.raises(NotFound, match="connection not found"):
                api.reset_connection("p", 2)
            assert api.reset_connections("p", since=mark) == [3]
            with pytest.raises(ConnectionResetError):
                recv_all(later[1][0])
            assert [c.id for c in api.connections("p").connections] == [1]
            assert api.close_connections("p") == [1]
            assert recv_all(first_upstream) == b""
            for sock in (first, first_upstream, *(s for pair in later for s in pair)):
                sock.close()
        finally:
            gate.release()


def test_targets(api, upstream):
    api.create_proxy("p", target(upstream))
    [row] = api.targets("p")
    assert (row.address, row.state, row.weight, row.backup) == (target(upstream), "enabled", 1, False)
    assert api.set_target("p", target(upstream), state="drain").state == "drain"
    with pytest.raises(BadRequest, match="state"):
        api.set_target("p", target(upstream), state="maint")


def test_captures(api, upstream, tmp_path):
    proxy = api.create_proxy("p", target(upstream))
    path = str(tmp_path / "p.pcap")
    started = api.start_capture("p", path)
    assert (started.path, started.connection, started.running, started.connections) == (path, None, True, 0)
    assert exchange((proxy.host, proxy.port)) == b"ping"
    assert api.capture("p").path == path
    with pytest.raises(Conflict):
        api.start_capture("p", str(tmp_path / "other.pcap"))
    stopped = api.stop_capture("p")
    assert stopped.running is False and stopped.connections == 1
    with open(path, "rb") as pcap:
        assert pcap.read(4) in (b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4", b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d")
    with pytest.raises(NotFound, match="no capture running"):
        api.capture("p")
    with pytest.raises(Conflict):
        api.start_capture("p", path, connection=1)   # the file exists


# -- a server that is not gproxy ------------------------------------------------------------------

class _GoLike(http.server.BaseHTTPRequestHandler):
    """Answers as toxiproxy's server answers a route it has no handler for: Go's plain text."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        body = b"404 page not found\n"
        self.send_response(404)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_gproxys_own_routes_on_a_server_without_them_are_not_found():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _GoLike)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        client = Client("http://%s:%d" % httpd.server_address[:2], timeout=TIMEOUT)
        with pytest.raises(NotFound) as missing:
            client.connections("redis")
        assert (missing.value.status, missing.value.message) == (404, "404 page not found")
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_an_answer_that_is_not_http_is_unreachable():
    listener = socket.create_server(("127.0.0.1", 0))

    def answer():
        sock, _ = listener.accept()
        with sock:
            sock.recv(65536)
            sock.sendall(b"-ERR this is redis\r\n")
    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        with pytest.raises(Unreachable):
            Client("http://%s:%d" % listener.getsockname(), timeout=TIMEOUT).proxies()
    finally:
        thread.join(TIMEOUT)
        listener.close()


def test_the_client_imports_no_gevent():
    """Usable in any program, patched or not: importing it loads neither gevent nor gproxy's
    forwarding machinery."""
    code = "import sys, gproxy.client; print(sorted(m for m in sys.modules if m.startswith(('gevent', 'gproxy'))))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT,
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode == 0, result.stderr
    loaded = eval(result.stdout)  # noqa: S307 (a list literal printed above)
    assert not [m for m in loaded if m.startswith("gevent")], loaded
    assert "gproxy.forwarder" not in loaded and "gproxy.toxics" not in loaded, loaded
