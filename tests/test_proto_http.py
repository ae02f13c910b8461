"""The ``http_response`` toxic: HTTP/1.x parsed at every cut, the exchange property on the fake clock,
each rule on its own, and real clients (http.client, urllib) against a keep-alive HTTP server.
"""

from __future__ import annotations

import http.client
import http.server
import socket
import threading
import urllib.request
from collections import deque

import pytest

from exchange import Exchange, check_many
from gproxy import ConfigError
from gproxy._chain import _EOF
from gproxy._proto_http import HttpRequests, HttpResponses
from gproxy._protocol import EARLY
from gproxy.toxics import Toxics, make_toxic
from peers import TIMEOUT
from test_proto_redis import request_events
from test_toxic_chain import Direction, FakeConn

UPSTREAM, DOWNSTREAM = 0, 1


# -- the parsers, cut everywhere --------------------------------------------------------------------

REQUESTS = (b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
            b"\r\n"                                                      # an empty line between: filler
            b"POST /b?q=1 HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"
            b"PUT /c HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3;ext=1\r\nabc\r\n0\r\nX-T: 1\r\n\r\n"
            b"HEAD http://h:80/d?e HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
            b"DELETE /e HTTP/1.0\n\n"                                     # LF alone; 1.0 closes
            b"GET /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")


def summary(events):
    return [(offset, event[0], (event[1].method, event[1].path(), event[1].close, event[3])
             if event[0] == "key" else None) for offset, event in events]


def test_requests_parse_the_same_however_they_are_cut():
    whole = request_events([REQUESTS], HttpRequests)
    assert summary(whole) == [
        (28, "key", (b"GET", b"/a", False, False)), (28, "end", None),
        (30, "end", None),
        (73, "key", (b"POST", b"/b?q=1", False, False)), (78, "end", None),
        (131, "key", (b"PUT", b"/c", False, False)), (158, "end", None),
        (215, "key", (b"HEAD", b"/d?e", False, False)), (215, "end", None),
        (235, "key", (b"DELETE", b"/e", True, False)), (235, "end", None),
        (296, "key", (b"GET", b"/ws", False, True)), (296, "end", None)]
    for cut in range(len(REQUESTS)):
        assert summary(request_events([REQUESTS[:cut], REQUESTS[cut:]], HttpRequests)) == summary(whole), cut
    one_by_one = [REQUESTS[i:i + 1] for i in range(len(REQUESTS))]
    assert summary(request_events(one_by_one, HttpRequests)) == summary(whole)


@pytest.mark.parametrize("garbage", [
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",                        # HTTP/2 with prior knowledge
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\n",   # a TLS ClientHello
    b"GET /x HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",      # no chunked: no length
    b"GET /x HTTP/1.1\r\nContent-Length: 1, 2\r\n\r\n",
    b"GET /x HTTP/1.1\r\nBad Header: x\r\n\r\n",
    b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0x10\r\n",   # not HEXDIG
    b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n",  # longer than said
    b"GET /x HTTP/1.1\r\n" + b"X: " + b"y" * 70_000 + b"\r\n\r\n",
])
def test_what_is_not_http_1_turns_the_parser_off(garbage):
    events = request_events([garbage], HttpRequests)
    assert events and events[-1][1] == ("off",)


RESPONSES = (b"HTTP/1.1 100 Continue\r\n\r\n"
             b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"
             b"HTTP/1.1 204 No Content\r\nContent-Length: 9\r\n\r\n"      # no body whatever it says
             b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\nT: x\r\n\r\n"
             b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"             # to a HEAD: no body
             b"HTTP/1.0 304 Not Modified\r\n\r\n"
             b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
METHODS = [b"GET", b"GET", b"POST", b"HEAD", b"GET", b"GET"]


def test_responses_count_the_same_however_they_are_cut():
    def count(chunks):
        counter = HttpResponses(deque(METHODS))
        return sum(counter.feed(chunk) for chunk in chunks), counter.between(), list(counter.infos)
    assert count([RESPONSES]) == (6, True, [])
    for cut in range(1, len(RESPONSES)):
        assert count([RESPONSES[:cut], RESPONSES[cut:]]) == (6, True, []), cut
    assert count([RESPONSES[i:i + 1] for i in range(len(RESPONSES))]) == (6, True, [])


def test_a_response_read_until_close_is_never_between():
    counter = HttpResponses(deque([b"GET"]))
    assert counter.feed(b"HTTP/1.0 200 OK\r\n\r\nbody until the end") == 0 and not counter.between()


# -- the property ------------------------------------------------------------------------------------

class HttpExchange(Exchange):
    """Requests for /p/ID or /q/ID (GET, HEAD, POST with a length or chunked); the server answers
    each with X-Id: ID (a body, chunked, or 204; now and then after a 100 Continue)."""

    toxic_type = "http_response"

    def requests(self, rng, count):
        self.methods = {}
        requests = []
        for i in range(count):
            ident = b"%d" % i
            shape = rng.random()
            if shape < 0.06:
                requests.append((b"\r\n", None))
                continue
            method = rng.choice([b"GET", b"GET", b"HEAD", b"POST", b"POST"])
            self.methods[ident] = method
            head = b"%s /%s/%s HTTP/1.1\r\nHost: test\r\n" % (method, rng.choice([b"p", b"q"]), ident)
            if method != b"POST":
                requests.append((head + b"\r\n", ident))
                continue
            size = rng.choice([0, 5, 300, 3000]) if rng.random() < 0.99 else rng.randint(EARLY, 2 * EARLY)
            body = (b"%d," % i * (size // 2 + 1))[:size]
            if rng.random() < 0.5:
                requests.append((head + b"Content-Length: %d\r\n\r\n" % size + body, ident))
            else:
                chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[j:j + 700]), body[j:j + 700])
                                  for j in range(0, len(body), 700))
                requests.append((head + b"Transfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n", ident))
        return requests

    def server_read(self, data, pos):
        if data[pos:pos + 2] == b"\r\n":
            return None, pos + 2
        end = data.find(b"\r\n\r\n", pos)
        if end < 0:
            return None
        lines = data[pos:end].split(b"\r\n")
        method, target, version = lines[0].split(b" ")
        assert version == b"HTTP/1.1" and method in (b"GET", b"HEAD", b"POST"), lines[0]
        fields = dict(line.lower().split(b": ", 1) for line in lines[1:])
        pos = end + 4
        if b"content-length" in fields:
            pos += int(fields[b"content-length"])
            if pos > len(data):
                return None
        elif b"transfer-encoding" in fields:
            while True:
                end = data.find(b"\r\n", pos)
                if end < 0:
                    return None
                size = int(data[pos:end], 16)
                if len(data) < end + 4 + size:
                    return None
                assert data[end + 2 + size:end + 4 + size] == b"\r\n"
                pos = end + 4 + size
                if not size:
                    break
        return target.rsplit(b"/", 1)[1], pos

    def server_reply(self, ident):
        rng = self.rng
        head = b"HTTP/1.1 100 Continue\r\n\r\n" if rng.random() < 0.1 else b""
        shape = rng.random()
        if shape < 0.15:
            return head + b"HTTP/1.1 204 No Content\r\nX-Id: %s\r\n\r\n" % ident
        if shape < 0.5 and self.methods[ident] != b"HEAD":
            return head + (b"HTTP/1.1 200 OK\r\nX-Id: %s\r\nTransfer-Encoding: chunked\r\n\r\n"
                           b"%x\r\n%s\r\n0\r\n\r\n") % (ident, len(ident), ident)
        body = b"" if self.methods[ident] == b"HEAD" else ident
        return head + b"HTTP/1.1 200 OK\r\nX-Id: %s\r\nContent-Length: %d\r\n\r\n%s" % (ident, len(ident), body)

    def client_read(self, data):
        methods = [self.methods[ident] for _e, ident in self.commands if ident]
        replies, pos = [], 0
        while True:
            end = data.find(b"\r\n\r\n", pos)
            if end < 0:
                return replies
            lines = data[pos:end].split(b"\r\n")
            status = int(lines[0].split(b" ")[1])
            fields = dict(line.lower().split(b": ", 1) for line in lines[1:])
            pos = end + 4
            if status < 200:
                continue
            method = methods[len(replies)]
            if method != b"HEAD" and status not in (204, 304):
                if b"transfer-encoding" in fields:
                    while True:
                        end = data.find(b"\r\n", pos)
                        if end < 0:
                            return replies
                        size = int(data[pos:end], 16)
                        if len(data) < end + 4 + size:
                            return replies
                        pos = end + 4 + size
                        if not size:
                            break
                else:
                    pos += int(fields[b"content-length"])
                    if pos > len(data):
                        return replies
            replies.append(fields.get(b"x-id"))

    def toxic_attributes(self, rng):
        status = rng.choice([503, 500, 429, 200, 204])
        return {"path": rng.choice(["", "/p/", "/q/", "/p/1", "/nomatch"]), "status": status,
                "body": "" if status == 204 else rng.choice(["", "injected"])}


def test_requests_answered_or_passed_always_line_up_with_their_responses():
    check_many(HttpExchange, range(120), answered_at_least=50)


# -- each rule on its own, on the fake clock ----------------------------------------------------------

def through(**attributes):
    toxics = Toxics()
    conn = FakeConn()
    up = Direction(conn, UPSTREAM, toxics, 1)
    down = Direction(conn, DOWNSTREAM, toxics, 2)
    toxics.add(make_toxic("http_response", name="t", stream="upstream", attributes=attributes))
    for end in (up, down):
        end.sync(0.0, 1)

    def run(version=1):
        for _ in range(3):
            up.run(0.0, version)
            down.run(0.0, version)
    return toxics, up, down, run


GET = b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n"


@pytest.mark.parametrize("request_head, expected", [
    (b"GET /down HTTP/1.1\r\n\r\n", b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; "
                                    b"charset=utf-8\r\nContent-Length: 4\r\n\r\ngone"),
    (b"HEAD /down HTTP/1.1\r\n\r\n", b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; "
                                     b"charset=utf-8\r\nContent-Length: 4\r\n\r\n"),
    (b"GET /down HTTP/1.0\r\n\r\n", b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; "
                                    b"charset=utf-8\r\nContent-Length: 4\r\nConnection: close\r\n\r\ngone"),
    (b"GET /down HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
     b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 4"
     b"\r\nConnection: keep-alive\r\n\r\ngone"),
    (b"GET http://example.com/down/here HTTP/1.1\r\nConnection: close\r\n\r\n",
     b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 4"
     b"\r\nConnection: close\r\n\r\ngone"),
])
def test_the_answer(request_head, expected):
    toxics, up, down, run = through(path="/down", body="gone")
    up.feed(request_head, 0.0, 1)
    run()
    assert up.got == b"" and down.got == expected


def test_an_answer_waits_for_the_response_before_it_and_the_connection_goes_on():
    toxics, up, down, run = through(path="/b", status=500, body="no")
    up.feed(GET.replace(b"/x", b"/a") + GET.replace(b"/x", b"/b") + GET.replace(b"/x", b"/c"), 0.0, 1)
    run()
    assert up.got == GET.replace(b"/x", b"/a") and down.got == b""
    down.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n", 0.0, 1)
    run()
    assert up.got == GET.replace(b"/x", b"/a")   # half a response: not yet
    down.feed(b"0\r\n\r\n", 0.0, 1)
    run()
    assert up.got == GET.replace(b"/x", b"/a") + GET.replace(b"/x", b"/c")
    assert down.got.endswith(b"0\r\n\r\nHTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain; "
                             b"charset=utf-8\r\nContent-Length: 2\r\n\r\nno")


def test_a_body_is_swallowed_with_its_request_and_only_then_answered():
    toxics, up, down, run = through(path="/upload", status=413)
    request = b"POST /upload HTTP/1.1\r\nContent-Length: 10\r\n\r\n0123456789"
    up.feed(request[:-3], 0.0, 1)
    run()
    assert down.got == b""
    up.feed(request[-3:] + GET, 0.0, 1)
    run()
    assert up.got == GET and down.got.startswith(b"HTTP/1.1 413 ")   # the phrase is Python's


def test_after_an_upgrade_passes_everything_passes():
    toxics, up, down, run = through(path="/x")
    upgrade = b"GET /ws HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
    up.feed(upgrade + GET, 0.0, 1)
    run()
    assert up.got == upgrade + GET and down.got == b""


@pytest.mark.parametrize("start", [b"\x16\x03\x01\x00\xa5\x01\x00", b"PRI * HTTP/2.0\r\n"])
def test_what_is_not_http_1_passes_at_once(start):
    """TLS has no line end, HTTP/2 has one: either way, held, the client would wait for ever."""
    toxics, up, down, run = through()
    up.feed(start, 0.0, 1)
    run()
    assert up.got == start


def test_a_request_cut_by_the_end_of_the_stream_passes():
    toxics, up, down, run = through()
    up.feed(GET[:10], 0.0, 1)
    up.feed(_EOF, 0.0, 1)
    run()
    assert up.got == GET[:10] and up.eof


@pytest.mark.parametrize("attributes, culprit", [
    ({"status": 99}, "status: must be a final status, from 200 to 599, not 99"),
    ({"status": 600}, "status: must be a final status"),
    ({"status": "503"}, "status: must be a whole number"),
    ({"status": 204, "body": "x"}, "body: must be empty: a 204 response has no body"),
    ({"path": "/a b"}, "path: must have no spaces or control characters"),
    ({"body": 5}, "body: must be a string"),
])
def test_bad_http_response_attributes_name_the_culprit(attributes, culprit):
    with pytest.raises(ConfigError) as info:
        make_toxic("http_response", stream="upstream", attributes=attributes)
    assert f"toxic http_response_upstream: {culprit}" in str(info.value)


# -- real clients ---------------------------------------------------------------------------------------

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive

    def do_GET(self):
        body = b"real " + self.path.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[::-1])

    def log_message(self, *args):
        pass


@pytest.fixture
def web():
    """A keep-alive HTTP/1.1 server; yields (address, the paths it served)."""
    served = []

    class Recording(Handler):
        # Recorded as each request is parsed, before its answer goes out: recorded after
        # handle_one_request() instead, a test reading ``served`` once it has the last answer
        # could miss that request, and the read that finds the client's EOF, which leaves the
        # last request's command and path set, recorded that request a second time.
        def parse_request(self):
            parsed = super().parse_request()
            if parsed:
                served.append((self.command, self.path))
            return parsed

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recording)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address, served
    server.shutdown()
    server.server_close()


def test_http_client_keeps_its_connection_through_answers(forwarder_factory, web):
    address, served = web
    fw = forwarder_factory(address)
    fw.add_toxic("http_response", stream="upstream", path="/api/", status=503, body="maintenance")
    connection = http.client.HTTPConnection(*fw.address, timeout=TIMEOUT)
    for path, status, body in [("/index", 200, b"real /index"), ("/api/users", 503, b"maintenance"),
                               ("/other", 200, b"real /other"), ("/api/", 503, b"maintenance")]:
        connection.request("GET", path)
        response = connection.getresponse()
        assert (response.status, response.read()) == (status, body), path
    connection.request("POST", "/api/upload", body=b"x" * (3 * EARLY))   # answered, body swallowed
    response = connection.getresponse()
    assert response.status == 503 and response.read() == b"maintenance"
    connection.request("POST", "/echo", body=b"abc")
    response = connection.getresponse()
    assert response.read() == b"cba"
    assert served == [("GET", "/index"), ("GET", "/other"), ("POST", "/echo")]
    assert fw.statistics().accepted == 1   # one connection all along
    connection.close()


def test_urllib_gets_the_status_as_an_error(forwarder_factory, web):
    address, served = web
    fw = forwarder_factory(address)
    fw.add_toxic("http_response", stream="upstream", status=429, body="slow down")
    url = "http://%s:%d/anything" % fw.address
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(url, timeout=TIMEOUT)
    assert info.value.code == 429 and info.value.read() == b"slow down"
    assert served == []


@pytest.mark.parametrize("one_byte_at_a_time", [False, True], ids=["pipelined", "byte-by-byte"])
def test_pipelined_requests_over_a_raw_socket(forwarder_factory, web, one_byte_at_a_time):
    address, served = web
    fw = forwarder_factory(address)
    fw.add_toxic("http_response", stream="upstream", path="/blocked", status=403, body="no")
    requests = b"".join(b"GET /%s HTTP/1.1\r\nHost: t\r\n\r\n" % path for path in
                        (b"a", b"blocked", b"b", b"blocked/too", b"c"))
    with socket.create_connection(fw.address, timeout=TIMEOUT) as sock:
        if one_byte_at_a_time:
            for byte in requests:
                sock.sendall(bytes([byte]))
        else:
            sock.sendall(requests)
        got = b""
        while got.count(b"real /") < 3 or got.count(b"\r\n\r\nno") < 2:
            data = sock.recv(65536)
            assert data
            got += data
    bodies = [part for part in got.split(b"HTTP/1.") if part]
    assert [b"403" in part for part in bodies] == [False, True, False, True, False]
    for part, path in zip(bodies, (b"a", b"blocked", b"b", b"blocked/too", b"c")):
        assert part.endswith(b"no" if path.startswith(b"blocked") else b"real /" + path), part
    assert served == [("GET", "/a"), ("GET", "/b"), ("GET", "/c")]
