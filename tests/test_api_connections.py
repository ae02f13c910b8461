"""gproxy's own API routes for a proxy's open connections (issue 20 item 10): list them (both
ends, target, state, age, bytes), reset or close one, reset or close all of them or those
since a mark. ``gproxy --api 127.0.0.1:0`` in a subprocess, driven over real HTTP; each
upstream is a Gate, so the test holds the server's end of every connection and checks what
each peer saw (an RST, an EOF) and that the proxy's own view matches the server's."""

from __future__ import annotations

import socket
import time

import pytest

from peers import TIMEOUT, Gate, Server, connect, recv_all, recv_exactly, unanswered_listener
from test_api import create, serving

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def server():
    yield from serving()


@pytest.fixture
def gate():
    gate = Gate()
    with Server(gate) as upstream:
        gate.address = upstream.address
        yield gate
        gate.release()


@pytest.fixture
def api(server):
    yield server
    assert server.process.poll() is None, server.seen
    status, proxies = server.call("GET", "/proxies")
    assert status == 200
    for name in proxies:
        assert server.call("DELETE", f"/proxies/{name}")[0] == 204


def address_of(proxy: dict):
    host, _, port = proxy["listen"].rpartition(":")
    return host, int(port)


def opened(proxy: dict, gate: Gate):
    """A connection through the proxy, both pumps running: (client end, server end)."""
    client = connect(address_of(proxy))
    upstream = gate.get()
    client.sendall(b"ping")
    assert recv_exactly(upstream, 4) == b"ping"
    upstream.sendall(b"pong!")
    assert recv_exactly(client, 5) == b"pong!"
    return client, upstream


def listed(api, name: str, query: str = "") -> dict:
    status, body = api.call("GET", f"/proxies/{name}/connections{query}")
    assert status == 200, body
    return body


def test_list_gives_both_ends_as_each_peer_sees_them(api, gate):
    proxy = create(api, "p", gate.address)
    assert listed(api, "p") == {"mark": 1, "connections": []}
    before = time.time()
    client, upstream = opened(proxy, gate)
    body = listed(api, "p")
    assert body["mark"] == 2
    [conn] = body["connections"]
    assert conn["id"] == 1
    assert conn["client"] == list(client.getsockname()[:2])
    assert conn["upstream"] == list(upstream.getsockname()[:2]) == list(gate.address)
    assert conn["upstream_local"] == list(upstream.getpeername()[:2])  # the server's view of its client
    assert conn["target"] == "%s:%d" % gate.address
    assert conn["state"] == "open"
    assert (conn["bytes_upstream"], conn["bytes_downstream"]) == (4, 5)
    assert 0 <= conn["age"] <= time.time() - before + 1
    assert api.call("GET", "/proxies/p/connections/1") == (200, conn | {"age": pytest.approx(conn["age"], abs=5)})
    client.close()
    upstream.close()


def test_state_follows_each_sides_eof(api, gate):
    proxy = create(api, "p", gate.address)
    client, upstream = opened(proxy, gate)
    client.shutdown(socket.SHUT_WR)
    assert recv_all(upstream) == b""  # the client's EOF passed on: the state changed before
    assert api.call("GET", "/proxies/p/connections/1")[1]["state"] == "client_eof"
    upstream.sendall(b"still")
    assert recv_exactly(client, 5) == b"still"  # half-closed, the other way still flows
    client2, upstream2 = opened(proxy, gate)
    upstream2.shutdown(socket.SHUT_WR)
    assert recv_all(client2) == b""
    assert api.call("GET", "/proxies/p/connections/2")[1]["state"] == "upstream_eof"
    for sock in (client, upstream, client2, upstream2):
        sock.close()


def test_reset_one_resets_both_sides_and_leaves_the_others(api, gate):
    proxy = create(api, "p", gate.address)
    kept_client, kept_upstream = opened(proxy, gate)
    client, upstream = opened(proxy, gate)
    assert api.call("POST", "/proxies/p/connections/2/reset") == (204, None)
    with pytest.raises(ConnectionResetError):
        recv_all(client)
    with pytest.raises(ConnectionResetError):
        recv_all(upstream)
    assert api.call("POST", "/proxies/p/connections/2/reset") == \
        (404, {"error": "connection not found", "status": 404})
    assert [c["id"] for c in listed(api, "p")["connections"]] == [1]
    kept_client.sendall(b"on")
    assert recv_exactly(kept_upstream, 2) == b"on"
    kept_client.close()
    kept_upstream.close()


def test_close_one_gives_each_side_an_eof(api, gate):
    proxy = create(api, "p", gate.address)
    client, upstream = opened(proxy, gate)
    assert api.call("POST", "/proxies/p/connections/1/close") == (204, None)
    assert recv_all(client) == b""
    assert recv_all(upstream) == b""
    assert api.call("POST", "/proxies/p/connections/1/close")[0] == 404
    client.close()
    upstream.close()


@pytest.mark.parametrize("action", ["reset", "close"])
def test_all_since_a_mark_reaches_only_the_connections_after_it(api, gate, action):
    proxy = create(api, "p", gate.address)
    old_client, old_upstream = opened(proxy, gate)
    mark = listed(api, "p")["mark"]
    new = [opened(proxy, gate) for _ in range(3)]
    assert [c["id"] for c in listed(api, "p", f"?since={mark}")["connections"]] == [2, 3, 4]
    assert api.call("POST", f"/proxies/p/connections/{action}?since={mark}") == (200, {"ids": [2, 3, 4]})
    for client, upstream in new:
        if action == "reset":
            with pytest.raises(ConnectionResetError):
                recv_all(client)
        else:
            assert recv_all(client) == b""
        client.close()
        upstream.close()
    old_client.sendall(b"alive")
    assert recv_exactly(old_upstream, 5) == b"alive"
    assert api.call("POST", f"/proxies/p/connections/{action}") == (200, {"ids": [1]})
    if action == "reset":
        with pytest.raises(ConnectionResetError):
            recv_all(old_upstream)
    else:
        assert recv_all(old_upstream) == b""
    assert listed(api, "p") == {"mark": 5, "connections": []}
    old_client.close()
    old_upstream.close()


@pytest.mark.parametrize("method, path, status, message", [
    ("GET", "/proxies/none/connections", 404, "proxy not found"),
    ("POST", "/proxies/none/connections/reset", 404, "proxy not found"),
    ("GET", "/proxies/p/connections/7", 404, "connection not found"),
    ("GET", "/proxies/p/connections/x1", 400, "bad connection id: expected a whole number, got 'x1'"),
    ("POST", "/proxies/p/connections/-1/close", 400, "bad connection id: expected a whole number, got '-1'"),
    ("GET", "/proxies/p/connections?since=a", 400, "since: expected a mark, a whole number from 0, got 'a'"),
    ("GET", "/proxies/p/connections?since=1&since=2", 400,
     "since: expected a mark, a whole number from 0, got '1,2'"),
    ("POST", "/proxies/p/connections/reset?snice=3", 400,
     "bad query: unknown parameter 'snice' (these routes take since)"),
    ("GET", "/proxies/p/connections/1?since=1", 400, "bad query: a connection by its id takes no since"),
    ("GET", "/proxies/p/connections/reset", 405, "method not allowed"),
    ("DELETE", "/proxies/p/connections", 405, "method not allowed"),
    ("POST", "/proxies/p/connections/1/explode", 404, "not found"),
    ("GET", "/proxies/p/connections/1/reset", 405, "method not allowed"),
])
def test_bad_requests_are_4xx_naming_the_culprit(api, gate, method, path, status, message):
    create(api, "p", gate.address)
    assert api.call(method, path) == (status, {"error": message, "status": status})


def test_toxiproxys_routes_do_not_list_connections(api, gate):
    proxy = create(api, "p", gate.address)
    client, upstream = opened(proxy, gate)
    assert api.call("GET", "/proxies/p") == (200, proxy)  # toxiproxy's shape, unchanged
    client.close()
    upstream.close()


def test_the_connection_routes_refuse_browsers(api, gate):
    create(api, "p", gate.address)
    status, _ = api.call("POST", "/proxies/p/connections/reset", headers={"User-Agent": "Mozilla/5.0"})
    assert status == 403


def test_a_connection_that_is_still_connecting_shows_so(api):
    """The target accepts nothing (its accept queue full): the connection waits for its connect."""
    with unanswered_listener() as address:
        create(api, "p", address)
        proxy = api.call("GET", "/proxies/p")[1]
        with connect(address_of(proxy)) as client:
            deadline = time.monotonic() + TIMEOUT
            while not (conns := listed(api, "p")["connections"]):
                assert time.monotonic() < deadline, "the connection never showed"
                time.sleep(0.01)  # sleep-ok: polling the other process's accept
            [conn] = conns
            assert (conn["state"], conn["upstream"], conn["upstream_local"]) == ("connecting", None, None)
            assert api.call("POST", "/proxies/p/connections/1/reset") == (204, None)
            with pytest.raises(ConnectionResetError):
                recv_all(client)


# -- the same state in Python: ConnectionRecord.state --------------------------------------------

def test_a_records_state_in_python(forwarder_factory):
    closed = []
    with forwarder_factory.gated(on_close=closed.append) as (fw, client, server):
        client.sendall(b"x")
        assert recv_exactly(server, 1) == b"x"
        assert [r.state for r in fw.connections()] == ["open"]
        server.shutdown(socket.SHUT_WR)
        assert recv_all(client) == b""
        assert [r.state for r in fw.connections()] == ["upstream_eof"]
    assert [r.state for r in closed] == ["closed"]
