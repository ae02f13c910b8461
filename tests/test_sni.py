"""route_sni: a target chosen by the TLS ClientHello's server name, TLS passed through untouched.

The backends are real TLS servers (Python's ssl, certificates from a trustme CA) that say
which one was reached; the clients are Python's ssl, openssl s_client and curl, and raw
sockets that write a ClientHello byte by byte, split into many records, or not at all.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import socket
import ssl
import subprocess
import threading

import pytest
import trustme

import gproxy
from gproxy._sni import MAX_HELLO, MAX_READ, Hello, HelloError, HelloParser, Routes
from gproxy.config import Address, ConfigError, Rule
from gproxy.stats import Outcome
from peers import TIMEOUT, Proxy, Server, connect, echo, payload, read_until_closed, recv_all, send_in_odd_chunks

NAMES = ["db.example", "*.cache.example", "default.example", "other.example"]


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture(scope="module")
def server_context(ca):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*NAMES).configure_cert(context)
    return context


def client_context(ca, alpn=None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    if alpn:
        context.set_alpn_protocols(alpn)
    return context


class Backend(Server):
    """A TLS server that answers one message with its label, the name the client asked for
    and the message (an HTTP request gets an HTTP answer with the label as its body), then
    closes."""

    def __init__(self, context: ssl.SSLContext, label: str):
        self.label = label
        self.context = context
        super().__init__(self._serve)

    def _serve(self, sock: socket.socket) -> None:
        with self.context.wrap_socket(sock, server_side=True) as tls:
            data = tls.recv(65536)
            if data.startswith(b"GET "):
                body = self.label.encode()
                tls.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                            % (len(body), body))
            else:
                tls.sendall(f"{self.label}:".encode() + data)


def ask(address, name, ca, message=b"hello", alpn=None) -> bytes:
    """One TLS exchange through ``address``, asking for ``name`` (None: no SNI)."""
    context = client_context(ca, alpn)
    if name is None:
        context.check_hostname = False
    with connect(address) as sock:
        with context.wrap_socket(sock, server_hostname=name) as tls:
            tls.sendall(message)
            return tls.recv(65536)


@pytest.fixture
def backends(server_context):
    made = {label: Backend(server_context, label) for label in ("db", "cache", "default")}
    yield made
    for backend in made.values():
        backend.close()


def routed(forwarders, backends, **options) -> gproxy.Forwarder:
    return forwarders(backends["default"].address, route_sni={
        "db.example": backends["db"].address, "*.cache.example": backends["cache"].address}, **options)


# -- real clients -----------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_names_choose_targets(forwarders, backends, ca):
    fw = routed(forwarders, backends)
    assert ask(fw.address, "db.example", ca) == b"db:hello"
    assert ask(fw.address, "a.cache.example", ca) == b"cache:hello"
    assert ask(fw.address, "DB.Example", ca) == b"db:hello"  # names compare case-insensitively
    assert ask(fw.address, "default.example", ca) == b"default:hello"   # no route: target
    assert ask(fw.address, None, ca) == b"default:hello"                # no SNI: target
    forwarders.wait_closed(fw, accepted=5)
    records = sorted(forwarders.records, key=lambda r: r.id)
    assert [r.outcome for r in records] == [Outcome.EOF] * 5
    assert [(r.sni, r.route) for r in records] == [
        ("db.example", "db.example"), ("a.cache.example", "*.cache.example"), ("DB.Example", "db.example"),
        ("default.example", None), (None, None)]
    assert [r.upstream for r in records] == [
        f"127.0.0.1:{backends['db'].address[1]}", f"127.0.0.1:{backends['cache'].address[1]}",
        f"127.0.0.1:{backends['db'].address[1]}", *[f"127.0.0.1:{backends['default'].address[1]}"] * 2]
    # every route's target is counted like any target: metrics and targets() show them
    by_name = {status.address: status for status in fw.targets()}
    assert set(by_name) >= {f"127.0.0.1:{backends[b].address[1]}" for b in backends}
    counts = fw._counters.targets
    assert counts[f"127.0.0.1:{backends['db'].address[1]}"].outcomes[Outcome.EOF] == 2
    assert counts[f"127.0.0.1:{backends['cache'].address[1]}"].outcomes[Outcome.EOF] == 1


@pytest.mark.timeout(60)
@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
def test_openssl_s_client(forwarder_factory, backends, ca, tmp_path):
    fw = routed(forwarder_factory, backends)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    for name, label in (("db.example", "db"), ("x.cache.example", "cache"), ("other.example", "default")):
        done = subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{fw.port}", "-servername", name,
             "-CAfile", str(ca_file), "-verify_return_error", "-quiet"],
            input=b"ping\n", capture_output=True, timeout=TIMEOUT)
        assert done.stdout == f"{label}:ping\n".encode(), (name, done.stdout, done.stderr)
    forwarder_factory.wait_closed(fw, accepted=3)


@pytest.mark.timeout(60)
@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_curl_resolve(forwarder_factory, backends, ca, tmp_path):
    fw = routed(forwarder_factory, backends)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    for name, label in (("db.example", "db"), ("b.cache.example", "cache"), ("default.example", "default")):
        done = subprocess.run(
            ["curl", "-sS", "--http1.0", "--cacert", str(ca_file), "--resolve", f"{name}:{fw.port}:127.0.0.1",
             f"https://{name}:{fw.port}/"], capture_output=True, timeout=TIMEOUT)
        assert done.stdout == label.encode(), (name, done.stdout, done.stderr)
    forwarder_factory.wait_closed(fw, accepted=3)


# -- what a raw client writes -------------------------------------------------------------------

def client_hello(name, alpn=None, version=None) -> bytes:
    """The first flight Python's ssl (OpenSSL) sends for ``name``."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if alpn:
        context.set_alpn_protocols(alpn)
    if version is not None:
        context.maximum_version = version
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def records(hello: bytes, size: int) -> bytes:
    """The same handshake bytes in records of at most ``size`` bytes."""
    out = bytearray()
    at = 0
    while at < len(hello):
        length = int.from_bytes(hello[at + 3:at + 5], "big")
        body = hello[at + 5:at + 5 + length]
        for start in range(0, len(body), size):
            piece = body[start:start + size]
            out += hello[at:at + 3] + len(piece).to_bytes(2, "big") + piece
        at += 5 + length
    return bytes(out)


def handshake_by_hand(sock, name, ca, write_first) -> bytes:
    """A real TLS handshake over ``sock`` whose first flight ``write_first(sock, bytes)``
    writes (byte by byte, re-split into records...); then one exchange. The name the
    backend answers with proves the route, the finished handshake that no byte changed."""
    context = client_context(ca)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=name)
    first = True
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            pass
        data = outgoing.read()
        if data:
            if first:
                write_first(sock, data)
                first = False
            else:
                sock.sendall(data)
        chunk = sock.recv(65536)
        assert chunk, "closed during the handshake"
        incoming.write(chunk)
    tls.write(b"by hand")
    sock.sendall(outgoing.read())
    got = b""
    while True:
        try:
            got += tls.read(65536)
        except ssl.SSLWantReadError:
            chunk = sock.recv(65536)
            if not chunk:
                return got
            incoming.write(chunk)
            continue
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            return got
        if got.endswith(b"by hand"):
            return got


def byte_by_byte(sock, data):
    for index in range(len(data)):
        sock.sendall(data[index:index + 1])


@pytest.mark.timeout(60)
def test_hello_written_byte_by_byte(forwarders, backends, ca):
    fw = routed(forwarders, backends)
    with connect(fw.address) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assert handshake_by_hand(sock, "q.cache.example", ca, byte_by_byte) == b"cache:by hand"
    forwarders.wait_closed(fw, accepted=1)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("size", [1, 7, 100])
def test_hello_split_into_many_records(forwarder_factory, backends, ca, size):
    """OpenSSL's server takes a ClientHello split into many handshake records; so must the
    router, and each record must reach the backend as written."""
    fw = routed(forwarder_factory, backends)
    with connect(fw.address) as sock:
        assert handshake_by_hand(sock, "db.example", ca,
                                 lambda s, data: s.sendall(records(data, size))) == b"db:by hand"
    forwarder_factory.wait_closed(fw, accepted=1)


def plain_echo_rule(forwarders, **options):
    """A route_sni rule whose target is a plain echo server (routes lead nowhere useful)."""
    server = Server(echo)
    fw = forwarders(server.address, route_sni={"db.example": "127.0.0.1:1"}, **options)
    return server, fw


@pytest.mark.timeout(30)
@pytest.mark.parametrize("first", [b"SSH-2.0-OpenSSH_9.2\r\n", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                                   b"\x80\x2e\x01\x03\x01", b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00",
                                   b"\x16\x03\x01\x00\x00"])
def test_not_tls_goes_to_the_target_untouched(forwarders, first):
    """Bytes that are not a ClientHello (SSH, HTTP, an SSLv2 hello, another handshake
    message, a zero-length record) reach the rule's target as written, and the connection
    goes on as any other (nginx's ssl_preread, HAProxy's default_backend)."""
    server, fw = plain_echo_rule(forwarders)
    with server:
        with connect(fw.address) as sock:
            sock.sendall(first)
            sock.sendall(b" and more")
            sock.shutdown(socket.SHUT_WR)
            assert recv_all(sock) == first + b" and more"
        forwarders.wait_closed(fw, accepted=1)
    [record] = forwarders.records
    assert record.outcome is Outcome.EOF and record.sni is None
    assert record.bytes_upstream == len(first) + 9


@pytest.mark.timeout(60)
def test_bulk_after_the_hello_keeps_every_byte_in_order(forwarders):
    """The routed connection is an ordinary one once the hello is replayed: 8 MiB after it,
    in odd chunks, come back whole and in order (through splice on the splice run), and the
    byte counts include the hello."""
    hello = client_hello("db.example")
    data = payload(8 << 20, seed=19)
    with Server(echo) as server:
        fw = forwarders("127.0.0.1:1", route_sni={"db.example": server.address})
        with connect(fw.address) as sock:
            received = []
            reader = threading.Thread(target=lambda: received.append(recv_all(sock)))
            reader.start()
            sock.sendall(hello[:7])
            send_in_odd_chunks(sock, hello[7:] + data, seed=3)
            sock.shutdown(socket.SHUT_WR)
            reader.join(TIMEOUT)
        forwarders.wait_closed(fw, accepted=1)
    assert hashlib.sha256(received[0]).digest() == hashlib.sha256(hello + data).digest()
    [record] = forwarders.records
    assert (record.outcome, record.route) == (Outcome.EOF, "db.example")
    assert record.bytes_upstream == record.bytes_downstream == len(hello) + len(data)


@pytest.mark.timeout(30)
def test_a_client_that_sends_nothing_is_closed_in_time_and_its_slot_freed(forwarder_factory, backends, ca):
    fw = routed(forwarder_factory, backends, proxy_header_timeout=0.3, max_connections=1)
    with connect(fw.address) as silent:
        assert read_until_closed(silent) == b""  # closed by gproxy, not by this test
    # the one slot is free again: a real client is served
    assert ask(fw.address, "db.example", ca) == b"db:hello"
    forwarder_factory.wait_closed(fw, accepted=2)
    first = min(forwarder_factory.records, key=lambda r: r.id)
    assert first.outcome is Outcome.DENIED
    assert first.error == "no complete byte within 0.3s (0 B read)"


@pytest.mark.timeout(30)
def test_a_client_that_stops_inside_its_hello(forwarder_factory, backends):
    fw = routed(forwarder_factory, backends, proxy_header_timeout=0.3)
    hello = client_hello("db.example")
    with connect(fw.address) as stalled:
        stalled.sendall(hello[:100])
        assert read_until_closed(stalled) == b""
    with connect(fw.address) as closing:
        closing.sendall(hello[:100])
        closing.shutdown(socket.SHUT_WR)
        assert read_until_closed(closing) == b""
    forwarder_factory.wait_closed(fw, accepted=2)
    errors = [r.error for r in sorted(forwarder_factory.records, key=lambda r: r.id)]
    assert errors == ["no complete ClientHello within 0.3s (100 B read)",
                      "closed inside its ClientHello (100 B read)"]
    assert all(b.accepted == 0 for b in backends.values())  # nothing was dialled


@pytest.mark.timeout(30)
def test_a_hello_longer_than_gproxy_reads_is_refused_at_once(forwarder_factory, backends):
    """A real ClientHello longer than one record (a long ALPN list makes OpenSSL split it):
    its declared length is past MAX_HELLO, so the client is closed as soon as the first
    record's handshake header is in, with a line that says so."""
    hello = client_hello("db.example", alpn=[("p%03d" % i) * 60 for i in range(100)])
    assert 16384 * 2 > len(hello) - 10 > 16384 and hello[5] == 1  # two records, two headers
    fw = routed(forwarder_factory, backends)
    with connect(fw.address) as sock:
        sock.sendall(hello[:4096])
        assert read_until_closed(sock) == b""
    forwarder_factory.wait_closed(fw, accepted=1)
    [record] = forwarder_factory.records
    assert record.outcome is Outcome.DENIED
    assert record.error == f"a ClientHello of {len(hello) - 10} bytes (gproxy reads at most {MAX_HELLO})"


@pytest.mark.timeout(60)
def test_a_hello_over_several_records_below_the_bound(forwarder_factory, backends, ca):
    """A long real ClientHello (about 9 KiB of ALPN) written in records of 4000 bytes."""
    fw = routed(forwarder_factory, backends)
    alpn = [("q%03d" % i) * 60 for i in range(36)]

    def write(sock, data):
        assert len(data) > 8000
        sock.sendall(records(data, 4000))

    context = client_context(ca, alpn)
    with connect(fw.address) as sock:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing, server_hostname="db.example")
        with pytest.raises(ssl.SSLWantReadError):
            tls.do_handshake()
        write(sock, outgoing.read())
        # the backend answers with its ServerHello: proof enough the route took it
        assert sock.recv(5)[:1] == b"\x16"
    forwarder_factory.wait_closed(fw, accepted=1)
    [record] = forwarder_factory.records
    assert record.route == "db.example"


@pytest.mark.timeout(30)
def test_a_route_whose_target_refuses(forwarder_factory, backends, ca):
    with socket.socket() as bound:  # bound, never listening: refused, and no one else's port
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]
        refused(forwarder_factory, backends, ca, port)


def refused(forwarder_factory, backends, ca, port):
    fw = forwarder_factory(backends["default"].address, route_sni={"db.example": f"127.0.0.1:{port}"})
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        ask(fw.address, "db.example", ca)
    forwarder_factory.wait_closed(fw, accepted=1)
    [record] = forwarder_factory.records
    assert record.outcome is Outcome.CONNECT_FAILED and record.upstream == f"127.0.0.1:{port}"
    assert fw._counters.targets[f"127.0.0.1:{port}"].failures  # counted against that target
    assert backends["default"].accepted == 0  # the client asked for db.example: no stand-in


@pytest.mark.timeout(30)
def test_a_route_to_the_listening_port_is_a_loop(forwarder_factory, backends):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()
    with pytest.raises(ConfigError, match="forwarding loop"):
        forwarder_factory(backends["default"].address, listen=f"0.0.0.0:{port}",
                          route_sni={"db.example": f"127.0.0.1:{port}"})


# -- the parser -------------------------------------------------------------------------------

def test_random_splits_of_real_hellos_parse_the_same():
    """Property: however TCP splits a real ClientHello, and however its handshake is split
    into records, the parser gives the same answer as for the whole (seeded, so a failure
    reproduces; the seed is in the message)."""
    hellos = [(client_hello(name, alpn, version), name) for name, alpn, version in [
        ("db.example", None, None), ("a.cache.example", ["h2", "http/1.1"], None),
        (None, None, None), ("x" * 60 + ".example", None, ssl.TLSVersion.TLSv1_2),
        ("long.example", [("r%03d" % i) * 50 for i in range(40)], None)]]
    for seed in range(300):
        rng = random.Random(seed)
        hello, name = hellos[seed % len(hellos)]
        if rng.random() < 0.5:  # (tiny records of a long hello would pass MAX_READ: a bound)
            hello = records(hello, rng.choice([1, 2, 3, 50, 517, 4096] if len(hello) < 4000 else [50, 517, 4096]))
        cuts = sorted(rng.sample(range(1, len(hello)), rng.randint(1, min(40, len(hello) - 1))))
        parser = HelloParser()
        answer = None
        for start, end in zip([0, *cuts], [*cuts, len(hello)]):
            answer = parser.feed(hello[start:end])
            if answer is not None:
                assert end == len(hello), (seed, "answered before the hello was complete")
                break
        assert answer == Hello(True, name), (seed, answer)


def test_parser_bounds_what_it_reads():
    """A 12 KiB ClientHello in records of one byte each (six bytes a byte) is not waited for
    past MAX_READ bytes."""
    parser = HelloParser()
    for byte in b"\x01\x00\x30\x00":
        parser.feed(b"\x16\x03\x01\x00\x01" + bytes([byte]))
    tiny = b"\x16\x03\x01\x00\x01\x00"
    with pytest.raises(HelloError, match="no ClientHello in the first"):
        for _ in range(100000):
            parser.feed(tiny)
    assert parser._seen <= MAX_READ + len(tiny)


@pytest.mark.parametrize("bad, why", [
    (b"\x16\x03\x01\x00\x04\x01\x00\x00\x00", "a malformed ClientHello: cut short in the session id"),
    (b"\x16\x02\x00", "not TLS (record version)"),
    (b"\x16\x03\x01\x00\x02\x01\x00\x15\x03\x01", "a record of type 21 inside the ClientHello"),
])
def test_malformed_hellos_say_why(bad, why):
    assert HelloParser().feed(bad) == Hello(False, None, why)


def test_routes_match_one_label_exact_first_case_and_dot():
    a, b, c = Address("10.0.0.1", 1), Address("10.0.0.2", 2), Address("10.0.0.3", 3)
    routes = Routes(Rule.build("127.0.0.1:0", "127.0.0.1:9", route_sni={
        "*.cache.example": a, "hot.cache.example": b, "Cache.Example.": c}).route_sni)
    assert routes.match("x.cache.example") == ("*.cache.example", a)
    assert routes.match("X.CACHE.EXAMPLE.") == ("*.cache.example", a)
    assert routes.match("hot.cache.example") == ("hot.cache.example", b)  # exact beats wildcard
    assert routes.match("cache.example") == ("cache.example", c)
    assert routes.match("a.b.cache.example") is None  # one label only
    assert routes.match(".cache.example") is None
    assert routes.match("example") is None


@pytest.mark.parametrize("value, message", [
    ({"a.*.example": "1.2.3.4:5"}, "a wildcard is only a whole first label"),
    ({"*": "1.2.3.4:5"}, "a wildcard is only a whole first label"),
    ({"10.0.0.1": "1.2.3.4:5"}, "SNI carries host names, never IP addresses"),
    ({"db.example": "1.2.3.4:0"}, "port 0 cannot be connected to"),
    ({"db..example": "1.2.3.4:5"}, "empty label"),
    ({"DB.example": "1.2.3.4:5", "db.example.": "1.2.3.4:6"}, "is routed twice"),
    ({"db.example": "127.0.0.1:7000"}, "a forwarding loop"),
    ("db.example=1.2.3.4:5", "expected a table of server names to addresses"),
])
def test_bad_routes_name_the_key(value, message):
    with pytest.raises(ConfigError, match="route_sni") as caught:
        Rule.build("127.0.0.1:7000", "127.0.0.1:9", route_sni=value)
    assert message in str(caught.value)


# -- the command line, the file, the log --------------------------------------------------------

@pytest.mark.timeout(60)
def test_cli_route_sni_and_json_log(backends, ca):
    db, default = backends["db"].address, backends["default"].address
    with Proxy("--log-format", "json", "--route-sni", f"db.example=127.0.0.1:{db[1]}",
               "--route-sni", "*.cache.example=127.0.0.1:1", f"127.0.0.1:{default[1]}") as proxy:
        assert ask(proxy.address, "db.example", ca) == b"db:hello"
        line = json.loads(proxy.wait_for('"sni"'))
        assert line["sni"] == "db.example" and line["route"] == "db.example"
        assert line["target"] == f"127.0.0.1:{db[1]}"
        assert ask(proxy.address, "other.example", ca) == b"default:hello"
        line = json.loads(proxy.wait_for('"sni"'))
        assert (line["sni"], line["route"]) == ("other.example", "default")


@pytest.mark.timeout(60)
def test_config_file_and_text_log(backends, ca, tmp_path):
    db, default = backends["db"].address, backends["default"].address
    path = tmp_path / "gproxy.toml"
    path.write_text(f'[[rule]]\nname = "tls"\nlisten = "127.0.0.1:0"\ntarget = "127.0.0.1:{default[1]}"\n'
                    f'route_sni = {{ "db.example" = "127.0.0.1:{db[1]}", "*.cache.example" = "127.0.0.1:1" }}\n')
    with Proxy(argv=["-c", str(path)]) as proxy:
        assert ask(proxy.address, "db.example", ca) == b"db:hello"
        assert proxy.wait_for("conn#1").endswith(", sni db.example (route db.example)")
        assert ask(proxy.address, None, ca) == b"default:hello"
        assert proxy.wait_for("conn#2").endswith(", no sni")
        with connect(proxy.address) as sock:
            sock.sendall(b"PING\r\n")
            read_until_closed(sock)  # the TLS backend refuses it, which ends the connection
        assert proxy.wait_for("conn#3").endswith(", not TLS")
    path.write_text('[[rule]]\nlisten = "127.0.0.1:0"\ntarget = "127.0.0.1:1"\n'
                    'route_sni = { "*.*.x" = "1.2.3.4:5" }\n')
    done = subprocess.run(["python", "-m", "gproxy", "--check", "-c", str(path)], capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert done.returncode == 2
    assert 'rule #1: route_sni: "*.*.x": a wildcard is only a whole first label' in done.stderr


def test_cli_bad_route_is_exit_2():
    done = subprocess.run(["python", "-m", "gproxy", "--route-sni", "db.example", "127.0.0.1:0", "127.0.0.1:1"],
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 2
    assert "--route-sni" in done.stderr and "NAME=HOST:PORT" in done.stderr, done.stderr

