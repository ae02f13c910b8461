"""The toxiproxy-compatible HTTP API: ``gproxy --api 127.0.0.1:0`` in a subprocess, driven over
real sockets by a plain HTTP client (urllib) and by a toxiproxy client library from PyPI."""

from __future__ import annotations

import http.client
import json
import os
import queue
import random
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Optional, Tuple

import pytest

import gproxy
import gproxy.toxics
from peers import TIMEOUT, Gate, Proxy, Server, connect, echo, free_port, recv_all, recv_exactly

pytestmark = pytest.mark.timeout(60)


class ApiProcess(Proxy):
    """``python -m gproxy --api 127.0.0.1:0 [args]``; ``url`` is read back from its log."""

    API = re.compile(r"HTTP API \(toxiproxy\) listening on (\S+):(\d+)")

    def __init__(self, *args: str):  # pylint: disable=super-init-not-called
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gproxy", "--api", "127.0.0.1:0", *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: "queue.Queue[Optional[str]]" = queue.Queue()
        self.seen = []
        threading.Thread(target=self._read, daemon=True).start()
        try:
            match = self.API.search(self.wait_for("HTTP API"))
        except BaseException:
            self.kill()
            raise
        self.api = (match.group(1), int(match.group(2)))
        self.url = "http://%s:%d" % self.api

    def call(self, method: str, path: str, body: Any = None, *, raw: Optional[bytes] = None,
             headers: Optional[dict] = None) -> Tuple[int, Any]:
        """(status, decoded JSON body, or the text if it is not JSON, or None if empty)."""
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"User-Agent": "gproxy-tests", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
                status, text = response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            status, text = error.code, error.read().decode()
        if not text:
            return status, None
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text


def exchange(address, data: bytes = b"ping") -> bytes:
    """One echo round trip through a proxy: send, half-close, read to EOF."""
    with connect(address) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)


def address_of(listen: str) -> Tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def refused(address) -> bool:
    try:
        connect(address).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.fixture(scope="module")
def upstream():
    with Server(echo) as server:
        yield server


def serving():
    """A ``gproxy --api`` process for a module's ``server`` fixture (``yield from serving()``):
    stopped after the module's tests, and its stop must be clean."""
    process = ApiProcess()
    yield process
    code, log = process.stop()
    assert code == 0, log
    assert "Traceback" not in log and " ERROR " not in log, log


@pytest.fixture(scope="module")
def server():
    yield from serving()


@pytest.fixture
def api(server):
    """The module's server, emptied after each test (and checked to be alive)."""
    yield server
    assert server.process.poll() is None, server.seen
    status, proxies = server.call("GET", "/proxies")
    assert status == 200
    for name in proxies:
        assert server.call("DELETE", f"/proxies/{name}")[0] == 204


def create(api, name: str, upstream, listen: str = "127.0.0.1:0", **fields) -> dict:
    status, proxy = api.call("POST", "/proxies", {"name": name, "listen": listen,
                                                   "upstream": "%s:%d" % tuple(upstream), **fields})
    assert status == 201, proxy
    return proxy


# -- proxies ------------------------------------------------------------------------------------

def test_version(api):
    assert api.call("GET", "/version") == (200, {"version": gproxy.__version__})


def test_create_reports_the_real_port_and_forwards(api, upstream):
    proxy = create(api, "echo", upstream.address)
    host, port = address_of(proxy["listen"])
    assert host == "127.0.0.1" and port > 0
    assert proxy == {"name": "echo", "listen": f"127.0.0.1:{port}",
                     "upstream": "%s:%d" % upstream.address, "enabled": True, "toxics": []}
    assert exchange((host, port)) == b"ping"
    assert api.call("GET", "/proxies") == (200, {"echo": proxy})
    assert api.call("GET", "/proxies/echo") == (200, proxy)


def test_created_disabled_listens_once_enabled(api, upstream):
    port = free_port()
    proxy = create(api, "later", upstream.address, listen=f"127.0.0.1:{port}", enabled=False)
    assert proxy["enabled"] is False and refused(("127.0.0.1", port))
    status, proxy = api.call("POST", "/proxies/later", {"enabled": True})
    assert status == 200 and proxy["enabled"] is True
    assert exchange(("127.0.0.1", port)) == b"ping"


def test_delete_stops_listening(api, upstream):
    address = address_of(create(api, "gone", upstream.address)["listen"])
    assert api.call("DELETE", "/proxies/gone") == (204, None)
    assert refused(address)
    assert api.call("GET", "/proxies") == (200, {})


def test_update_moves_the_listener(api, upstream):
    old = address_of(create(api, "mover", upstream.address)["listen"])
    port = free_port()
    status, proxy = api.call("PATCH", "/proxies/mover", {"listen": f"127.0.0.1:{port}"})
    assert status == 200 and proxy["listen"] == f"127.0.0.1:{port}"
    assert refused(old) and exchange(("127.0.0.1", port)) == b"ping"
    # the whole proxy sent back as read (what toxiproxy clients' save() does) changes nothing
    status, same = api.call("POST", "/proxies/mover", proxy)
    assert status == 200 and same == proxy


def test_disable_refuses_and_cuts_then_enable_listens_on_the_same_port(api):
    gate = Gate()
    with Server(gate) as held:
        try:
            proxy = create(api, "flaky", held.address)
            address = address_of(proxy["listen"])
            with connect(address) as client:
                gate.get()
                status, proxy = api.call("POST", "/proxies/flaky", {"enabled": False})
                assert status == 200 and proxy["enabled"] is False
                try:
                    assert client.recv(1) == b""      # the open connection was cut...
                except ConnectionResetError:
                    pass                              # ...with a FIN or a RST
            assert refused(address)
            status, proxy = api.call("POST", "/proxies/flaky", {"enabled": True})
            assert status == 200 and proxy["enabled"] is True and proxy["listen"] == "%s:%d" % address
            with connect(address) as again:
                gate.get().sendall(b"up")
                assert recv_exactly(again, 2) == b"up"
        finally:
            gate.release()


def test_populate_creates_keeps_and_replaces(api, upstream):
    with Server(echo) as other:
        entries = [{"name": "a", "listen": "127.0.0.1:0", "upstream": "%s:%d" % upstream.address},
                   {"name": "b", "listen": "127.0.0.1:0", "upstream": "%s:%d" % upstream.address}]
        status, body = api.call("POST", "/populate", entries)
        assert status == 201 and [p["name"] for p in body["proxies"]] == ["a", "b"]
        first = {p["name"]: p for p in body["proxies"]}
        # again, unchanged: left alone (same ports); b now elsewhere: replaced on its port
        entries[1] = {"name": "b", "listen": first["b"]["listen"], "upstream": "%s:%d" % other.address}
        status, body = api.call("POST", "/populate", entries)
        assert status == 201
        second = {p["name"]: p for p in body["proxies"]}
        assert second["a"] == first["a"]
        assert second["b"]["listen"] == first["b"]["listen"]
        assert second["b"]["upstream"] == "%s:%d" % other.address
        assert exchange(address_of(second["b"]["listen"])) == b"ping" and other.accepted == 1
        assert api.call("GET", "/proxies")[1] == second


def test_populate_is_all_or_nothing_when_a_port_is_in_use(api, upstream):
    """toxiproxy keeps the entries before a failing bind; gproxy undoes them and answers
    with the error naming the proxy and the address, and ``"proxies": []``."""
    with Server(echo) as other:
        status, body = api.call("POST", "/populate", [
            {"name": "a", "listen": "127.0.0.1:0", "upstream": "%s:%d" % upstream.address}])
        assert status == 201
        before = api.call("GET", "/proxies")
        a_listen = body["proxies"][0]["listen"]
        fresh = free_port()
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            busy = "127.0.0.1:%d" % taken.getsockname()[1]
            status, body = api.call("POST", "/populate", [
                {"name": "a", "listen": a_listen, "upstream": "%s:%d" % other.address},
                {"name": "c", "listen": "127.0.0.1:%d" % fresh, "upstream": "%s:%d" % upstream.address},
                {"name": "d", "listen": busy, "upstream": "%s:%d" % upstream.address}])
        assert status == 500 and body["proxies"] == [], body
        assert body["error"].startswith(f'proxy "d": cannot listen on {busy}: '), body
        assert api.call("GET", "/proxies") == before
        assert exchange(address_of(a_listen)) == b"ping" and other.accepted == 0
        assert refused(("127.0.0.1", fresh))


def test_a_proxys_connection_lines_carry_its_name(api, upstream):
    proxy = create(api, "named", upstream.address)
    assert exchange(address_of(proxy["listen"])) == b"ping"
    line = api.wait_for("named conn#1 ")
    assert re.search(r" INFO named conn#1 127\.0\.0\.1:\d+ -> \S+ eof, ", line), line


def test_reset_enables_every_proxy(api, upstream):
    port = free_port()
    create(api, "off", upstream.address, listen=f"127.0.0.1:{port}", enabled=False)
    assert api.call("POST", "/reset") == (204, None)
    assert api.call("GET", "/proxies/off")[1]["enabled"] is True
    assert exchange(("127.0.0.1", port)) == b"ping"


# -- bad requests: toxiproxy's error, nothing changed, forwarding goes on ---------------------------

def _taken_port():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


BAD = [
    # (method, path, body or raw bytes, status, error message or its start)
    ("POST", "/proxies", b"{\"name\": ", 400, "bad request body: "),
    ("POST", "/proxies", b"", 400, "bad request body: EOF"),
    ("POST", "/proxies", [1], 400, "bad request body: "),
    ("POST", "/proxies", {"upstream": "127.0.0.1:1"}, 400, "missing required field: name"),
    ("POST", "/proxies", {"name": "x"}, 400, "missing required field: upstream"),
    ("POST", "/proxies", {"name": "x", "upstream": "127.0.0.1:1", "listen": "127.0.0.1:99999"}, 400, "listen: "),
    ("POST", "/proxies", {"name": "x", "upstream": "nowhere", "listen": "127.0.0.1:0"}, 400, "upstream: "),
    ("POST", "/proxies", {"name": "x", "upstream": "127.0.0.1:1", "enabled": "yes"}, 400, "bad request body: "),
    ("POST", "/proxies", {"name": "live", "upstream": "127.0.0.1:1"}, 409, "proxy already exists"),
    ("POST", "/proxies", {"name": "x", "upstream": "127.0.0.1:1", "listen": "TAKEN"}, 500, "cannot listen on"),
    ("GET", "/proxies/missing", None, 404, "proxy not found"),
    ("POST", "/proxies/missing", {"enabled": False}, 404, "proxy not found"),
    ("DELETE", "/proxies/missing", None, 404, "proxy not found"),
    ("POST", "/proxies/live", b"nonsense", 400, "bad request body: "),
    ("POST", "/proxies/live", {"listen": "127.0.0.1:abc"}, 400, "listen: "),
    ("POST", "/proxies/live", {"listen": "TAKEN"}, 500, "cannot listen on"),
    ("POST", "/populate", {"name": "a"}, 400, "bad request body: "),
    ("POST", "/populate", [{"name": "a", "upstream": "127.0.0.1:1"}, {"upstream": "127.0.0.1:1"}], 400,
     "missing required field: name at proxy 2"),
    ("POST", "/populate", [{"name": "a", "upstream": "127.0.0.1:1"}, {"name": "b"}], 400,
     "missing required field: upstream at proxy 2"),
    ("POST", "/populate", [{"name": "a", "upstream": "127.0.0.1:1"},
                           {"name": "b", "upstream": "127.0.0.1:1", "listen": "local373"}],
     400, "proxies[1].listen"),
    ("GET", "/proxies/missing/toxics", None, 404, "proxy not found"),
    ("POST", "/proxies/missing/toxics", {"type": "latency"}, 404, "proxy not found"),
    ("GET", "/proxies/live/toxics/missing", None, 404, "toxic not found"),
    ("POST", "/proxies/live/toxics/missing", {"attributes": {}}, 404, "toxic not found"),
    ("DELETE", "/proxies/live/toxics/missing", None, 404, "toxic not found"),
    ("GET", "/nowhere", None, 404, "not found"),
    ("PUT", "/proxies", {}, 405, "method not allowed"),
    ("POST", "/proxies", b"[" * 100_000, 400, "bad request body: nested too deeply"),
    ("POST", "/populate", b"[" * 100_000, 400, "bad request body: nested too deeply"),
    ("POST", "/proxies/live", b'{"x": ' * 100_000, 400, "bad request body: nested too deeply"),
    ("POST", "/proxies/live/toxics", b"[" * 100_000, 400, "bad request body: nested too deeply"),
    ("POST", "/proxies", {"name": "..", "upstream": "127.0.0.1:1"}, 400, "name: may not be '..'"),
    ("POST", "/proxies", b'{"name": "\\ud800", "upstream": "127.0.0.1:1"}', 400, "name: must be Unicode text"),
    ("POST", "/populate", [{"name": ".", "upstream": "127.0.0.1:1"}], 400, "proxies[0].name: may not be '.'"),
    ("GET", "/proxies/%FF", None, 400, "bad request path: not UTF-8"),
]


@pytest.mark.parametrize("method, path, body, status, message", BAD,
                         ids=[f"{m} {p} {s} {msg}" for m, p, _, s, msg in BAD])
def test_bad_request_gets_toxiproxys_error_and_changes_nothing(api, method, path, body, status, message):
    with Server(echo) as upstream, _taken_port() as taken:
        live = create(api, "live", upstream.address)
        address = address_of(live["listen"])
        client = connect(address)   # open across the bad request, must still work after it
        client.sendall(b"before ")
        assert recv_exactly(client, 7) == b"before "
        before = api.call("GET", "/proxies")
        if isinstance(body, bytes):
            answer = api.call(method, path, raw=body)
        else:
            body = json.loads(json.dumps(body).replace("TAKEN", "127.0.0.1:%d" % taken.getsockname()[1]))
            answer = api.call(method, path, body)
        got_status, error = answer
        assert got_status == status, answer
        assert error["status"] == status and error["error"].startswith(message), answer
        assert api.call("GET", "/proxies") == before
        client.sendall(b"after")
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client) == b"after"
        client.close()


def test_populate_error_keeps_toxiproxys_shape(api):
    status, body = api.call("POST", "/populate", [{"name": "x"}])
    assert status == 400
    assert body == {"error": "missing required field: upstream at proxy 1", "status": 400, "proxies": []}


def test_browsers_are_refused(api):
    status, text = api.call("GET", "/proxies", headers={"User-Agent": "Mozilla/5.0 (X11; Linux x86_64)"})
    assert status == 403 and text.strip() == "User agent not allowed"



def test_api_disconnects_a_silent_client():  # in this process: a short client_timeout
    """An API client that sends nothing, or stops mid-request, is let go after client_timeout;
    malformed HTTP gets a 400; neither is logged as an error."""
    import gevent.socket

    from gproxy._api import Api
    from gproxy.service import Service

    api = Api(Service(), "127.0.0.1:0", client_timeout=0.2).start()   # on this test's hub
    try:
        with gevent.Timeout(TIMEOUT):
            with gevent.socket.create_connection(api.address) as silent:
                started = time.monotonic()
                assert silent.recv(1) == b""
                assert time.monotonic() - started >= 0.15
            with gevent.socket.create_connection(api.address) as half:  # stalls mid-request
                half.sendall(b"GET /version HTTP/1.1\r\nHost: x\r\n")
                assert half.recv(1) == b""
            with gevent.socket.create_connection(api.address) as garbage:  # 400, no ERROR logged
                garbage.sendall(b"NONSENSE\r\n\r\n")
                assert garbage.recv(65536).startswith(b"HTTP/1.1 400 ")
            with gevent.socket.create_connection(api.address) as fine:  # and still serves
                fine.sendall(b"GET /version HTTP/1.0\r\nUser-Agent: t\r\n\r\n")
                reply = b""
                while chunk := fine.recv(65536):
                    reply += chunk
                assert reply.startswith(b"HTTP/1.1 200 ") and b'"version"' in reply
    finally:
        api.stop()


# -- the command line ----------------------------------------------------------------------------

def test_command_line_rule_is_a_named_proxy(upstream):
    with ApiProcess("--name", "web", "127.0.0.1:0", "%s:%d" % upstream.address) as process:
        line = process.seen[0] if "listening on" in process.seen[0] else process.wait_for("listening on")
        status, proxies = process.call("GET", "/proxies")
        assert status == 200 and list(proxies) == ["web"], proxies
        assert proxies["web"]["listen"] in line and proxies["web"]["enabled"] is True
        assert exchange(address_of(proxies["web"]["listen"])) == b"ping"
        code, log = process.stop()
    assert code == 0, log


@pytest.mark.parametrize("args, culprit", [
    (["--api", "127.0.0.1:99999"], "--api"),
    (["--api", "unix:@gproxy-test-api"], "--api: expected HOST:PORT, got a Unix socket"),  # was a traceback
    (["--api", "127.0.0.1:0", "127.0.0.1:0"], "TARGET"),
    (["--api", "127.0.0.1:0", "--name", "a/b", "127.0.0.1:0", "127.0.0.1:1"], "--name"),
    ([], "LISTEN"),
])
def test_bad_api_arguments_are_one_line_and_exit_2(args, culprit):
    result = subprocess.run([sys.executable, "-m", "gproxy", *args], capture_output=True, text=True,
                            timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and culprit in lines[0], result.stderr


def test_api_port_in_use_is_one_line_and_exit_1():
    with _taken_port() as taken:
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "gproxy", "--api", f"127.0.0.1:{port}"],
                                capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    assert result.returncode == 1, result
    assert result.stderr.strip().splitlines()[-1] == \
        f"gproxy: error: cannot listen on 127.0.0.1:{port} (API): address already in use"


# -- toxics ----------------------------------------------------------------------------------------

def timed_exchange(address) -> float:
    started = time.monotonic()
    assert exchange(address) == b"ping"
    return time.monotonic() - started


def test_toxic_lifecycle_and_effect(api, upstream):
    address = address_of(create(api, "slow", upstream.address)["listen"])
    status, toxic = api.call("POST", "/proxies/slow/toxics", {"type": "latency", "attributes": {"latency": 1000}})
    assert status == 200
    assert toxic == {"name": "latency_downstream", "type": "latency", "stream": "downstream",
                     "toxicity": 1.0, "attributes": {"latency": 1000, "jitter": 0}}
    assert api.call("GET", "/proxies/slow/toxics") == (200, [toxic])
    assert api.call("GET", "/proxies/slow/toxics/latency_downstream") == (200, toxic)
    assert api.call("GET", "/proxies/slow")[1]["toxics"] == [toxic]
    assert timed_exchange(address) >= 1.0
    status, changed = api.call("PATCH", "/proxies/slow/toxics/latency_downstream",
                               {"attributes": {"jitter": 10}, "toxicity": 0.5})
    assert status == 200 and changed == {**toxic, "toxicity": 0.5, "attributes": {"latency": 1000, "jitter": 10}}
    assert api.call("DELETE", "/proxies/slow/toxics/latency_downstream") == (204, None)
    assert api.call("GET", "/proxies/slow/toxics") == (200, [])
    assert timed_exchange(address) < 1.0


def test_toxics_survive_a_move_and_go_on_reset(api, upstream):
    create(api, "moving", upstream.address)
    api.call("POST", "/proxies/moving/toxics", {"type": "limit_data", "name": "cap", "stream": "downstream",
                                                 "attributes": {"bytes": 2}})
    status, moved = api.call("POST", "/proxies/moving", {"listen": f"127.0.0.1:{free_port()}"})
    assert status == 200 and [t["name"] for t in moved["toxics"]] == ["cap"]
    assert exchange(address_of(moved["listen"])) == b"pi"   # the toxic acts on the new listener
    assert api.call("POST", "/reset") == (204, None)
    assert api.call("GET", "/proxies/moving")[1]["toxics"] == []
    assert exchange(address_of(moved["listen"])) == b"ping"


def test_a_trigger_over_http_with_string_and_boolean_attributes(api, upstream):
    address = address_of(create(api, "t", upstream.address)["listen"])
    status, toxic = api.call("POST", "/proxies/t/toxics", {"type": "trigger", "attributes": {
        "match": "n(?=g)", "action": "close", "once": False}})
    assert status == 200 and toxic["attributes"] == {"match": "n(?=g)", "after_bytes": 0, "action": "close",
                                                     "delay": 0, "once": False}, toxic
    assert exchange(address) == b"pin"   # closed where the match ends
    for attributes, error in [({"once": "false"}, "once: must be true or false, not 'false'"),
                              ({"match": 1}, "match: must be a string, not 1"),
                              ({"match": "("}, "match: is not a regular expression: "),
                              ({"action": "halt"},
                               "action: must be one of reset, close, drop, delay, not 'halt'")]:
        status, answer = api.call("POST", "/proxies/t/toxics/trigger_downstream", {"attributes": attributes})
        assert status == 400 and answer["error"].startswith(
            f"bad request body: toxic trigger_downstream: {error}"), answer
    assert api.call("GET", "/proxies/t/toxics")[1] == [toxic]


def test_protocol_toxics_over_http(api, upstream):
    address = address_of(create(api, "web", upstream.address)["listen"])   # an echo server
    status, answer = api.call("POST", "/proxies/web/toxics", {"type": "http_response", "stream": "downstream",
                                                             "attributes": {}})
    assert status == 400 and answer["error"] == (
        "bad request body: stream: must be 'upstream' for http_response toxics, not 'downstream'"), answer
    status, toxic = api.call("POST", "/proxies/web/toxics", {"type": "http_response", "stream": "upstream",
                                                             "attributes": {"status": 418, "body": "tea"}})
    assert status == 200 and toxic["attributes"] == {"status": 418, "body": "tea", "path": ""}, toxic
    reply = exchange(address, b"GET /pot HTTP/1.1\r\nHost: x\r\n\r\n")   # the echo never sees it
    assert reply.startswith(b"HTTP/1.1 418 ") and reply.endswith(b"\r\nContent-Length: 3\r\n\r\ntea"), reply
    status, answer = api.call("POST", "/proxies/web/toxics/http_response_upstream",
                              {"attributes": {"status": 100}})
    assert status == 400 and "status: must be a final status, from 200 to 599, not 100" in answer["error"]


TOXIC_BAD = [
    ({"type": "nonsense"}, 400, "invalid toxic type"),
    ({"attributes": {}}, 400, "invalid toxic type"),
    ({"type": "latency", "stream": "sideways"}, 400, "stream was invalid, can be either upstream or downstream"),
    ({"type": "latency"}, 409, "toxic already exists"),
    ({"type": "bandwidth", "name": "latency_downstream"}, 409, "toxic already exists"),
    ({"type": "latency", "stream": "upstream", "attributes": {"latency": -1}}, 400, "bad request body: "),
    ({"type": "latency", "stream": "upstream", "attributes": {"speed": 1}}, 400, "bad request body: "),
    ({"type": "latency", "stream": "upstream", "attributes": [1]}, 400, "bad request body: "),
    ({"type": "latency", "stream": "upstream", "toxicity": "high"}, 400, "bad request body: "),
    ({"type": "latency", "stream": "upstream", "toxicity": 2}, 400, "bad request body: "),
    (b"{", 400, "bad request body: "),
]


@pytest.mark.parametrize("body, status, message", TOXIC_BAD, ids=[str(b) for b, _, _ in TOXIC_BAD])
def test_bad_toxic_gets_toxiproxys_error_and_changes_nothing(api, upstream, body, status, message):
    create(api, "t", upstream.address)
    assert api.call("POST", "/proxies/t/toxics", {"type": "latency", "attributes": {"latency": 5}})[0] == 200
    before = api.call("GET", "/proxies")
    if isinstance(body, bytes):
        answer = api.call("POST", "/proxies/t/toxics", raw=body)
    else:
        answer = api.call("POST", "/proxies/t/toxics", body)
    assert answer[0] == status and answer[1] == {"error": answer[1]["error"], "status": status}, answer
    assert answer[1]["error"].startswith(message), answer
    for change in ({"attributes": {"latency": -5}}, {"toxicity": 7}, {"attributes": {"speed": 1}}):
        got = api.call("POST", "/proxies/t/toxics/latency_downstream", change)
        assert got[0] == 400 and got[1]["error"].startswith("bad request body: "), got
    assert api.call("GET", "/proxies") == before
    assert exchange(address_of(before[1]["t"]["listen"])) == b"ping"


# -- a real toxiproxy client library ---------------------------------------------------------------

def test_toxiproxy_python_client(api, upstream):
    """toxiproxy-python (PyPI), unchanged, pointed at gproxy instead of toxiproxy."""
    from toxiproxy import Toxiproxy
    from toxiproxy.exceptions import NotFound

    client = Toxiproxy()
    client.update_api_consumer(*api.api)
    assert client.running() and json.loads(client.version()) == {"version": gproxy.__version__}
    proxy = client.create(upstream="%s:%d" % upstream.address, name="py", listen="127.0.0.1:0")
    assert proxy.enabled is True and address_of(proxy.listen)[1] > 0
    assert exchange(address_of(proxy.listen)) == b"ping"
    assert set(client.proxies()) == {"py"} and client.get_proxy("py").listen == proxy.listen
    proxy.add_toxic(type="latency", attributes={"latency": 1000})
    assert [t.name for t in proxy.toxics().values()] == ["latency_downstream"]
    assert proxy.get_toxic("latency_downstream").attributes == {"latency": 1000, "jitter": 0}
    assert timed_exchange(address_of(proxy.listen)) >= 1.0
    assert proxy.destroy_toxic("latency_downstream") is True and proxy.toxics() == {}
    with proxy.down():
        assert refused(address_of(proxy.listen)) and client.get_proxy("py").enabled is False
    assert exchange(address_of(proxy.listen)) == b"ping"
    proxy.add_toxic(type="timeout", stream="upstream")
    assert client.reset() is True and proxy.toxics() == {}
    assert proxy.destroy() is True and client.proxies() == {}
    with pytest.raises(NotFound):
        proxy.destroy()


NODE_CLIENT = os.path.join(os.path.dirname(__file__), "node")


@pytest.mark.skipif(not os.path.isdir(os.path.join(NODE_CLIENT, "node_modules", "toxiproxy-node-client")),
                    reason="toxiproxy-node-client not installed: .ci/run does `npm install --prefix tests/node`")
def test_toxiproxy_node_client(api, upstream):
    """toxiproxy-node-client (npm), unchanged: tests/node/toxiproxy_client.js asserts each answer."""
    result = subprocess.run(["node", os.path.join(NODE_CLIENT, "toxiproxy_client.js"), api.url,
                             "%s:%d" % upstream.address], capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0 and "all passed" in result.stdout, result.stdout + result.stderr


# -- atomicity: every call against every other ---------------------------------------------------

class HeldRequest:
    """A request whose body the test holds back. The headers go with ``Expect: 100-continue``;
    once the API answers ``100 Continue`` (``continued``) its handler is waiting for the body,
    so whatever the test does next happens while that call is under way. ``finish()`` sends
    the body (unless the API answered without wanting it) and returns (status, decoded JSON
    or None)."""

    CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

    def __init__(self, api, method: str, path: str, body: Any):
        self.body = json.dumps(body).encode()
        self.sock = connect(api.api)
        self.sock.sendall((f"{method} {urllib.parse.quote(path)} HTTP/1.1\r\nHost: gproxy\r\n"
                           f"User-Agent: gproxy-tests\r\nContent-Type: application/json\r\n"
                           f"Content-Length: {len(self.body)}\r\nExpect: 100-continue\r\n"
                           f"Connection: close\r\n\r\n").encode())
        # peeked, so a final answer stays in the socket for finish() to parse
        start = self.sock.recv(len(self.CONTINUE), socket.MSG_PEEK | socket.MSG_WAITALL)
        self.continued = start == self.CONTINUE
        if self.continued:
            recv_exactly(self.sock, len(self.CONTINUE))

    def finish(self) -> Tuple[int, Any]:
        try:
            if self.continued:
                self.sock.sendall(self.body)
            response = http.client.HTTPResponse(self.sock)
            response.begin()
            text = response.read()
            return response.status, json.loads(text) if text else None
        finally:
            self.sock.close()


def hold(api, method: str, path: str, body: Any) -> HeldRequest:
    request = HeldRequest(api, method, path, body)
    assert request.continued, "the API answered before it read the body"
    return request


def populate_replacing(api, proxy: dict, upstream) -> None:
    """/populate the same name and listen address with another upstream: a new forwarder."""
    status, body = api.call("POST", "/populate", [{"name": proxy["name"], "listen": proxy["listen"],
                                                   "upstream": "%s:%d" % tuple(upstream)}])
    assert status == 201, body


CHANGES = {  # a call held across the race: (method, path, body)
    "update proxy": ("POST", "/proxies/p", {"enabled": False}),
    "add toxic": ("POST", "/proxies/p/toxics", {"type": "limit_data", "name": "cap2", "attributes": {"bytes": 2}}),
    "update toxic": ("POST", "/proxies/p/toxics/cap", {"attributes": {"bytes": 2}}),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_call_on_a_proxy_deleted_meanwhile_is_404(api, upstream, change):
    create(api, "p", upstream.address)
    assert api.call("POST", "/proxies/p/toxics", {"type": "limit_data", "name": "cap",
                                                  "attributes": {"bytes": 5}})[0] == 200
    held = hold(api, *CHANGES[change])
    assert api.call("DELETE", "/proxies/p") == (204, None)
    assert held.finish() == (404, {"error": "proxy not found", "status": 404})
    assert api.call("GET", "/proxies") == (200, {})


@pytest.mark.parametrize("change", ["add toxic", "update toxic"])
@pytest.mark.parametrize("replace", ["upstream", "listen"])
def test_a_toxic_change_acknowledged_while_the_proxy_is_replaced_is_applied(api, upstream, change, replace):
    proxy = create(api, "p", upstream.address)
    assert api.call("POST", "/proxies/p/toxics", {"type": "limit_data", "name": "cap",
                                                  "attributes": {"bytes": 5}})[0] == 200
    with Server(echo) as other:
        held = hold(api, *CHANGES[change])
        fields = ({"upstream": "%s:%d" % other.address} if replace == "upstream"
                  else {"listen": f"127.0.0.1:{free_port()}"})
        status, proxy = api.call("POST", "/proxies/p", fields)
        assert status == 200, proxy
        status, toxic = held.finish()
        assert status == 200 and toxic["attributes"] == {"bytes": 2}, toxic
        assert toxic in api.call("GET", "/proxies/p")[1]["toxics"]
        assert exchange(address_of(proxy["listen"])) == b"pi"   # it acts on the proxy as it is now


def test_a_call_racing_populate_applies_to_the_proxy_populate_left(api, upstream):
    with Server(echo) as other:
        proxy = create(api, "p", upstream.address)
        assert api.call("POST", "/proxies/p/toxics", {"type": "limit_data", "name": "cap",
                                                      "attributes": {"bytes": 5}})[0] == 200
        held = hold(api, *CHANGES["update toxic"])
        populate_replacing(api, proxy, other.address)   # a new proxy: toxiproxy's has no toxics
        assert held.finish() == (404, {"error": "toxic not found", "status": 404})
        held = hold(api, *CHANGES["update proxy"])
        populate_replacing(api, proxy, upstream.address)
        status, after = held.finish()
        assert status == 200 and after["enabled"] is False and after["upstream"] == "%s:%d" % upstream.address
        assert refused(address_of(proxy["listen"]))


@pytest.mark.timeout(120)
def test_concurrent_calls_never_fail(upstream):
    """Clients changing, replacing and deleting the same few proxies at once, each body held
    back until the API asked for it: every answer is one of toxiproxy's, never a 500, and
    nothing is logged as an error. A bounded count of calls, not a duration."""
    names, clients, calls = ["a", "b", "c"], 8, 40
    target = "%s:%d" % upstream.address
    with ApiProcess() as process:
        errors: "queue.Queue[BaseException]" = queue.Queue()

        def client(seed: int, answers: list) -> None:
            try:
                calls_from(random.Random(seed), answers)
            except BaseException as exc:  # handed to the test
                errors.put(exc)

        def calls_from(rng: random.Random, answers: list) -> None:
            for _ in range(calls):
                name = rng.choice(names)
                method, path, body = rng.choice([
                    ("POST", "/proxies", {"name": name, "upstream": target}),
                    ("DELETE", f"/proxies/{name}", None),
                    ("POST", f"/proxies/{name}", {"enabled": rng.random() < 0.5}),
                    ("POST", f"/proxies/{name}", {"upstream": target if rng.random() < 0.5 else "127.0.0.1:1"}),
                    ("POST", "/populate", [{"name": name, "listen": "127.0.0.1:0", "upstream": target}]),
                    ("POST", f"/proxies/{name}/toxics", {"type": "latency", "name": "lag"}),
                    ("POST", f"/proxies/{name}/toxics/lag", {"attributes": {"latency": rng.randrange(10)}}),
                    ("DELETE", f"/proxies/{name}/toxics/lag", None),
                    ("GET", f"/proxies/{name}", None),
                    ("POST", "/reset", None),
                ])
                if body is None:
                    answers.append((method, path, *process.call(method, path)))
                else:
                    answers.append((method, path, *HeldRequest(process, method, path, body).finish()))

        answers = [[] for _ in range(clients)]
        threads = [threading.Thread(target=client, args=(seed, answers[seed])) for seed in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT * 3)
        assert not any(thread.is_alive() for thread in threads)
        assert errors.empty(), errors.get()
        every = [answer for each in answers for answer in each]
        assert len(every) == clients * calls
        failed = [answer for answer in every if answer[2] not in (200, 201, 204, 404, 409)]
        assert not failed, failed
        code, log = process.stop()
    assert code == 0, log
    assert "Traceback" not in log and " ERROR " not in log, log


# -- a proxy that cannot listen again ----------------------------------------------------------------

def test_enable_that_cannot_listen_is_500_and_can_be_tried_again(api, upstream):
    with _taken_port() as taken:
        port = taken.getsockname()[1]
        create(api, "later", upstream.address, listen=f"127.0.0.1:{port}", enabled=False)
        assert api.call("POST", "/proxies/later", {"enabled": True}) == \
            (500, {"error": f"cannot listen on 127.0.0.1:{port}: address already in use", "status": 500})
    status, proxy = api.call("POST", "/proxies/later", {"enabled": True})   # the port is free now
    assert status == 200 and proxy["enabled"] is True, proxy
    assert exchange(("127.0.0.1", port)) == b"ping"


def test_reset_resets_every_proxy_it_can_then_names_each_that_cannot_listen(api, upstream):
    proxies = {name: create(api, name, upstream.address) for name in "abc"}   # port 0 each
    for name in "abc":
        assert api.call("POST", f"/proxies/{name}/toxics", {"type": "limit_data", "name": "cap",
                                                            "attributes": {"bytes": 2}})[0] == 200
        assert api.call("POST", f"/proxies/{name}", {"enabled": False})[0] == 200
    listen = proxies["b"]["listen"]
    with socket.socket() as taken:   # b's real port, taken while b is disabled
        taken.bind(address_of(listen))
        taken.listen()
        status, body = api.call("POST", "/reset")
        failure = f"cannot listen on {listen}: address already in use"
        assert (status, body) == (500, {"error": f'not every proxy could be reset: proxy "b": {failure}',
                                        "status": 500,
                                        "failures": [{"name": "b", "listen": listen, "error": failure}]})
        after = api.call("GET", "/proxies")[1]
        assert [after[name]["enabled"] for name in "abc"] == [True, False, True]   # c too, after b
        assert all(proxy["toxics"] == [] for proxy in after.values()), after
        assert exchange(address_of(proxies["c"]["listen"])) == b"ping"
    assert api.call("POST", "/reset") == (204, None)
    assert exchange(address_of(listen)) == b"ping"


# -- numbers a toxic can run with ---------------------------------------------------------------------

NUMBERS = {kind: [key for key, default in defaults.items() if type(default) is int]
           for kind, defaults in gproxy.toxics.TYPES.items()}
ATTRIBUTES = [(kind, key) for kind, keys in NUMBERS.items() for key in keys]
MAX_ATTRIBUTE = 2**63 - 1   # toxiproxy's: its attributes are Go int64s


LIMITS = {("slicer", "size_variation"): MAX_ATTRIBUTE - 1,   # below average_size
          ("http_response", "status"): 599}                 # a status code


def at_most(kind: str, key: str, value) -> dict:
    """The attributes of a valid ``kind`` toxic with ``key`` set to ``value``."""
    if kind != "slicer":
        return {key: value}
    if key == "size_variation":   # must stay below average_size
        return {"average_size": MAX_ATTRIBUTE, key: value}
    return {"average_size": 10, key: value}


@pytest.mark.parametrize("kind, key", ATTRIBUTES, ids=[f"{k}.{a}" for k, a in ATTRIBUTES])
def test_toxic_numbers_over_the_bound_are_refused_naming_the_attribute(api, upstream, kind, key):
    create(api, "t", upstream.address)
    name = f"{kind}_upstream"
    too_big = MAX_ATTRIBUTE + 1
    for value in (too_big, 10**400, 1e300):
        status, error = api.call("POST", "/proxies/t/toxics", {"type": kind, "stream": "upstream",
                                                              "attributes": at_most(kind, key, value)})
        assert status == 400 and error["error"].startswith(f"bad request body: toxic {name}: {key}: "), error
    assert api.call("GET", "/proxies/t/toxics") == (200, [])
    limit = LIMITS.get((kind, key), MAX_ATTRIBUTE)
    status, toxic = api.call("POST", "/proxies/t/toxics", {"type": kind, "stream": "upstream",
                                                          "attributes": at_most(kind, key, limit)})
    assert status == 200 and toxic["attributes"][key] == limit, toxic
    status, error = api.call("POST", f"/proxies/t/toxics/{name}", {"attributes": {key: too_big}})
    assert status == 400 and error["error"].startswith(f"bad request body: toxic {name}: {key}: "), error


MOST = {  # every attribute of each type at its bound: what a connection must run through
    "latency": {"latency": MAX_ATTRIBUTE, "jitter": MAX_ATTRIBUTE},
    "bandwidth": {"rate": MAX_ATTRIBUTE},
    "slow_close": {"delay": MAX_ATTRIBUTE},
    "timeout": {"timeout": MAX_ATTRIBUTE},
    "reset_peer": {"timeout": MAX_ATTRIBUTE},
    "slicer": {"average_size": MAX_ATTRIBUTE, "size_variation": MAX_ATTRIBUTE - 1, "delay": MAX_ATTRIBUTE},
    "limit_data": {"bytes": MAX_ATTRIBUTE},
    "trigger": {"after_bytes": MAX_ATTRIBUTE, "delay": MAX_ATTRIBUTE, "action": "delay", "once": False},
    "redis_error": {},   # no number: "ping" with no line end is a command not read whole (held)
    "http_response": {"status": 599},   # "ping" with no line end: a request line not read whole
    "redis_delay": {"delay": MAX_ATTRIBUTE},   # held as redis_error holds it
    "http_delay": {"delay": MAX_ATTRIBUTE},    # held as http_response holds it
    "pg_error": {"code": "ZZZZZ", "message": "x" * 1000},
}
PASSES = {"bandwidth", "slicer", "limit_data", "slow_close", "trigger"}  # the others hold the chunk (for ever)


@pytest.mark.parametrize("kind", list(MOST))
def test_a_connection_runs_through_each_toxic_at_its_bound(forwarder_factory, kind):
    """In this process, so that an exception in a stage (OverflowError from a time or a size
    too large) fails the test: no ERROR logged, the chunk passes or is held, the connection
    ends when closed."""
    assert set(MOST) == set(gproxy.toxics.TYPES) and all(
        set(NUMBERS[k]) <= set(MOST[k]) for k in MOST)
    with forwarder_factory.gated() as (fw, client, server):
        fw.add_toxic(kind, stream="upstream", **MOST[kind])
        client.sendall(b"ping")
        if kind in PASSES:
            assert recv_exactly(server, 4) == b"ping"
        deadline = time.monotonic() + TIMEOUT
        while not fw.connections()[0].bytes_upstream:   # read, so it went into the stage
            assert time.monotonic() < deadline
            time.sleep(0.01)  # sleep-ok: polling another thread's counter
        [record] = fw.connections()
        assert fw.close_connection(record.id)
        fw.remove_toxic(f"{kind}_upstream")


# -- names beyond ASCII ------------------------------------------------------------------------------

def test_a_proxy_and_a_toxic_named_in_utf8(api, upstream):
    proxy = create(api, "café", upstream.address)
    path = "/proxies/" + urllib.parse.quote("café")
    assert path == "/proxies/caf%C3%A9"
    assert api.call("GET", path) == (200, proxy)
    status, toxic = api.call("POST", path + "/toxics", {"type": "limit_data", "name": "límite",
                                                        "attributes": {"bytes": 2}})
    assert status == 200 and toxic["name"] == "límite"
    toxic_path = path + "/toxics/" + urllib.parse.quote("límite")
    assert api.call("GET", toxic_path) == (200, toxic)
    assert api.call("POST", toxic_path, {"attributes": {"bytes": 3}})[1]["attributes"] == {"bytes": 3}
    assert exchange(address_of(proxy["listen"])) == b"pin"
    assert api.call("DELETE", toxic_path) == (204, None)
    assert api.call("POST", path, {"enabled": False})[1]["enabled"] is False
    assert api.call("DELETE", path) == (204, None)
    assert api.call("GET", "/proxies") == (200, {})


def test_toxiproxy_python_client_with_a_utf8_name(api, upstream):
    from toxiproxy import Toxiproxy

    client = Toxiproxy()
    client.update_api_consumer(*api.api)
    proxy = client.create(upstream="%s:%d" % upstream.address, name="café", listen="127.0.0.1:0")
    assert client.get_proxy("café").listen == proxy.listen
    proxy.add_toxic(type="limit_data", name="límite", attributes={"bytes": 2})
    assert proxy.get_toxic("límite").attributes == {"bytes": 2}
    assert exchange(address_of(proxy.listen)) == b"pi"
    assert proxy.destroy_toxic("límite") is True
    assert proxy.destroy() is True and client.proxies() == {}


@pytest.mark.parametrize("name", ["a/b", "..", "\ud800"])
def test_a_toxic_name_its_path_cannot_carry_is_refused(api, upstream, name):
    create(api, "t", upstream.address)
    raw = json.dumps({"type": "latency", "name": name}).encode()   # \ud800 stays escaped
    status, error = api.call("POST", "/proxies/t/toxics", raw=raw)
    assert status == 400 and error["error"].startswith("bad request body: name: "), error
    assert api.call("GET", "/proxies/t/toxics") == (200, [])


@pytest.mark.parametrize("type, attributes", [("redis_error", {"error": "OOM command not allowed"}),
                                              ("http_response", {"status": 503})])
def test_a_one_stream_toxic_added_without_a_stream_takes_its_stream(api, upstream, type, attributes):
    """toxiproxy's default stream is downstream; gproxy's protocol toxics work upstream only,
    and a client that leaves the stream out (as toxiproxy-cli does without -u/-d) gets that one
    rather than a 400 for the default it did not choose."""
    create(api, "one", upstream.address)
    status, toxic = api.call("POST", "/proxies/one/toxics", {"type": type, "attributes": attributes})
    assert status == 200, toxic
    assert toxic["stream"] == "upstream" and toxic["name"] == f"{type}_upstream", toxic
    # a stream given is still checked
    status, answer = api.call("POST", "/proxies/one/toxics", {"type": type, "name": "other",
                                                             "stream": "downstream", "attributes": attributes})
    assert status == 400 and "stream" in str(answer), answer
