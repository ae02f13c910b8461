"""TLS termination and origination (docs/tls.md): bytes, half-closes both ways, handshake
failures as outcomes, mutual TLS, SNI, reload, toxics on plaintext, metrics, slow handshakes."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import ssl
import threading
import time

import pytest

import gproxy
from gproxy.config import ConfigError
from gproxy.testing import ThrowawayCA
from peers import TIMEOUT, Gate, Server, connect, echo, payload, recv_all, recv_exactly

pytest.importorskip("trustme")


@pytest.fixture(scope="module")
def ca():
    with ThrowawayCA() as authority:
        yield authority


def tls_client(ca, address, name="localhost", cert=None, context=None) -> ssl.SSLSocket:
    ctx = context or ca.client_context(cert)
    return ctx.wrap_socket(connect(address), server_hostname=name)


def records_of(forwarders, fw, accepted=1):
    forwarders.wait_closed(fw, accepted=accepted)
    return [r for r in forwarders.records if r.id]


def one_record(forwarders, fw):
    forwarders.wait_closed(fw, accepted=1)
    return forwarders.records[-1]


# -- termination: the bytes ------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_terminated_stream_carries_every_byte_both_ways_in_order(forwarder_factory, ca):
    size = 3 * 1024 * 1024 + 17
    with Server(echo) as upstream:
        fw = forwarder_factory(upstream.address, **ca.server_options())
        client = tls_client(ca, fw.address)
        data = payload(size, seed=7)
        got = exchange(client, data, size)
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
        assert client.version() in ("TLSv1.2", "TLSv1.3")
        client.unwrap().close()  # close_notify: the echo half-closes back
        record = one_record(forwarder_factory, fw)
    assert record.outcome is gproxy.Outcome.EOF, record
    assert (record.bytes_upstream, record.bytes_downstream) == (size, size)


def test_a_small_buffer_leaves_plaintext_inside_tls_and_it_still_arrives(forwarder_factory, ca):
    """A buffer smaller than a record: every read is full, a turn ends with plaintext left
    inside the session, where the socket's watcher cannot see it."""
    size = 200_000
    with Server(echo) as upstream:
        fw = forwarder_factory(upstream.address, buffer_size=1000, **ca.server_options())
        client = tls_client(ca, fw.address)
        data = payload(size, seed=9)
        client.sendall(data)
        assert recv_exactly(client, size) == data
        client.close()
        forwarder_factory.wait_closed(fw, accepted=1)


def test_bytes_that_come_with_the_end_of_the_handshake_are_relayed(forwarder_factory, ca):
    """The client's Finished and its first request in one segment: OpenSSL holds the request
    once the handshake is done, and the socket has nothing more to say."""
    with Server(echo) as upstream:
        fw = forwarder_factory(upstream.address, **ca.server_options())
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        session = ca.client_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
        raw = connect(fw.address)
        while True:
            try:
                session.do_handshake()
                break
            except ssl.SSLWantReadError:
                raw.sendall(outgoing.read())
                incoming.write(raw.recv(65536))
        session.write(b"first words")
        raw.sendall(outgoing.read())   # Finished + the request, one write
        plaintext = b""
        while len(plaintext) < 11:
            try:
                plaintext += session.read(65536)
            except ssl.SSLWantReadError:
                incoming.write(raw.recv(65536))
        assert plaintext == b"first words"
        raw.close()
        forwarder_factory.wait_closed(fw, accepted=1)


# -- half-close: close_notify and FIN ------------------------------------------------------------

def test_client_close_notify_is_a_fin_upstream_and_the_reply_still_flows(forwarder_factory, ca):
    """The client's close_notify reaches a plaintext target as a FIN (stunnel's way); the
    target's answer still reaches the client, then its FIN as close_notify and FIN."""
    gate = Gate()
    with Server(gate) as upstream:
        fw = forwarder_factory(upstream.address, **ca.server_options())
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        session = ca.client_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
        raw = connect(fw.address)
        _bio_handshake(session, raw, incoming, outgoing)
        server = gate.get()
        session.write(b"ping")
        try:
            session.unwrap()
        except ssl.SSLWantReadError:
            pass                            # our close_notify is made; theirs will come
        raw.sendall(outgoing.read())
        assert recv_exactly(server, 4) == b"ping"
        assert server.recv(100) == b""      # close_notify -> FIN upstream
        server.sendall(b"pong after your close")
        server.shutdown(socket.SHUT_WR)     # FIN from the target -> close_notify + FIN to us
        plaintext, ended = _bio_read_all(session, raw, incoming)
        assert plaintext == b"pong after your close"
        assert ended == "close_notify"
        raw.close()
        server.close()
        gate.release()
        record = one_record(forwarder_factory, fw)
    assert record.outcome is gproxy.Outcome.EOF, record


def test_target_fin_is_close_notify_and_the_client_keeps_sending(forwarder_factory, ca):
    gate = Gate()
    with Server(gate) as upstream:
        fw = forwarder_factory(upstream.address, **ca.server_options())
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        session = ca.client_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
        raw = connect(fw.address)
        _bio_handshake(session, raw, incoming, outgoing)
        server = gate.get()
        server.sendall(b"banner")
        server.shutdown(socket.SHUT_WR)     # the target is done talking
        plaintext, ended = _bio_read_all(session, raw, incoming)
        assert (plaintext, ended) == (b"banner", "close_notify")
        late = b"still sending after your close_notify"
        session.write(late)
        raw.sendall(outgoing.read())
        assert recv_exactly(server, len(late)) == late
        try:
            session.unwrap()                # completes the TLS shutdown: the client's close_notify
        except ssl.SSLWantReadError:
            pass
        raw.sendall(outgoing.read())
        assert server.recv(100) == b""      # -> FIN upstream
        raw.close()
        server.close()
        gate.release()
        record = one_record(forwarder_factory, fw)
    assert record.outcome is gproxy.Outcome.EOF, record
    assert record.error is None


def test_a_fin_without_close_notify_is_eof_and_the_line_says_so(forwarder_factory, ca):
    gate = Gate()
    with Server(gate) as upstream:
        fw = forwarder_factory(upstream.address, **ca.server_options())
        client = tls_client(ca, fw.address)
        server = gate.get()
        client.sendall(b"last words")
        assert recv_exactly(server, 10) == b"last words"
        # a FIN under the TLS session: the stream is truncated, no close_notify
        socket.socket(fileno=os.dup(client.fileno())).shutdown(socket.SHUT_WR)
        assert server.recv(100) == b""      # passed on as EOF, not as a reset
        server.sendall(b"answer")
        server.close()
        assert client.recv(100) == b"answer"
        client.close()
        gate.release()
        record = one_record(forwarder_factory, fw)
    assert record.outcome is gproxy.Outcome.EOF, record
    assert record.error == "client ended TLS without close_notify"


# -- handshakes that fail ----------------------------------------------------------------------------

def test_a_plaintext_client_on_a_tls_port_is_a_failed_handshake_and_no_connect(forwarder_factory, ca, caplog):
    with Server(echo) as upstream:
        fw = forwarder_factory(upstream.address, **ca.server_options())
        with caplog.at_level(logging.INFO, logger="gproxy.relay"):
            client = connect(fw.address)
            client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            recv_all(client)                # gproxy closes: an alert at most, never a reply
            client.close()
            record = one_record(forwarder_factory, fw)
        assert upstream.accepted == 0       # nothing was dialled
    assert record.outcome is gproxy.Outcome.TLS_HANDSHAKE_FAILED
    assert record.error == "client: http request"
    lines = [r for r in caplog.records if "tls handshake failed" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO and not lines[0].exc_info


def test_a_truncated_handshake_is_a_failed_handshake(forwarder_factory, ca):
    with Server(echo) as upstream:
        fw = forwarder_factory(upstream.address, **ca.server_options())
        hello = _client_hello(ca)
        client = connect(fw.address)
        client.sendall(hello[:len(hello) // 2])
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client) == b""
        client.close()
        record = one_record(forwarder_factory, fw)
    assert record.outcome is gproxy.Outcome.TLS_HANDSHAKE_FAILED
    assert record.error == "client closed during the TLS handshake"


def test_an_expired_certificate_is_refused_by_the_client_and_warned_of_at_start(forwarder_factory, ca, caplog):
    cert, key = ca.issue("localhost", expired=True)
    with Server(echo) as upstream:
        with caplog.at_level(logging.WARNING, logger="gproxy"):
            fw = forwarder_factory(upstream.address, tls_cert=cert, tls_key=key)
        assert any("expired" in r.getMessage() for r in caplog.records)
        with pytest.raises(ssl.SSLCertVerificationError, match="expired"):
            tls_client(ca, fw.address)
        record = one_record(forwarder_factory, fw)
    assert record.outcome is gproxy.Outcome.TLS_HANDSHAKE_FAILED
    assert "certificate expired" in record.error or "certificate unknown" in record.error, record.error


def test_sni_picks_the_certificate_and_a_wrong_name_gets_the_default(forwarder_factory, ca):
    first = ca.issue("a.example")
    second = ca.issue("*.b.example")
    with Server(echo) as upstream:
        fw = forwarder_factory(upstream.address, tls_cert=[first[0], second[0]], tls_key=[first[1], second[1]])
        for name in ("a.example", "x.b.example"):
            with tls_client(ca, fw.address, name=name) as client:
                client.sendall(b"hi")
                assert recv_exactly(client, 2) == b"hi"
        with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
            tls_client(ca, fw.address, name="c.example")   # the default (a.example) is not c's
        forwarder_factory.wait_closed(fw, accepted=3)
    outcomes = [r.outcome for r in forwarder_factory.records]
    assert outcomes.count(gproxy.Outcome.TLS_HANDSHAKE_FAILED) == 1


def test_mutual_tls_takes_our_clients_and_refuses_the_others(forwarder_factory, ca):
    client_cert = ca.issue("client.example")
    with ThrowawayCA() as stranger:
        stranger_cert = stranger.issue("client.example")
        with Server(echo) as upstream:
            fw = forwarder_factory(upstream.address, tls_ca=ca.ca_file, tls_verify_client=True,
                                   **ca.server_options())
            with tls_client(ca, fw.address, cert=client_cert) as client:
                client.sendall(b"trusted")
                assert recv_exactly(client, 7) == b"trusted"
            for cert in (stranger_cert, None):
                client = tls_client(ca, fw.address, cert=cert)  # TLS 1.3: refused after the handshake
                with pytest.raises((ssl.SSLError, ConnectionResetError)):
                    client.sendall(b"x")
                    client.recv(10)
                client.close()
            forwarder_factory.wait_closed(fw, accepted=3)
    failed = [r for r in forwarder_factory.records if r.outcome is gproxy.Outcome.TLS_HANDSHAKE_FAILED]
    assert len(failed) == 2
    assert "certificate verify failed" in failed[0].error
    assert "peer did not return a certificate" in failed[1].error


@pytest.mark.timeout(60)
def test_handshakes_that_stop_halfway_time_out_and_free_their_slots(forwarder_factory, ca):
    count = 200
    fds_before = len(os.listdir("/proc/self/fd"))
    with Server(echo) as upstream:
        fw = forwarder_factory(upstream.address, tls_handshake_timeout=0.5, max_connections=50,
                               **ca.server_options())
        hello = _client_hello(ca)
        stalled = []
        for i in range(count):
            sock = socket.socket()
            sock.settimeout(TIMEOUT)
            sock.connect(fw.address)   # a full accept queue holds the rest until slots free up
            sock.sendall(hello[: len(hello) // 2] if i % 2 else b"")
            stalled.append(sock)
        forwarder_factory.wait_closed(fw, accepted=count, timeout=TIMEOUT * 2)
        for sock in stalled:
            sock.close()
        with tls_client(ca, fw.address) as client:  # a slot for a real client
            client.sendall(b"ok")
            assert recv_exactly(client, 2) == b"ok"
        forwarder_factory.wait_closed(fw, accepted=count + 1)
        assert upstream.accepted == 1
    records = forwarder_factory.records
    timed_out = [r for r in records if r.outcome is gproxy.Outcome.TLS_HANDSHAKE_FAILED]
    assert len(timed_out) == count
    assert all(r.error == "client: no TLS handshake within 0.5s" for r in timed_out)
    tls = fw._counters.tls
    assert tls.results[("client", "timeout")] == count and tls.results[("client", "ok")] == 1
    assert len(os.listdir("/proc/self/fd")) <= fds_before + 5   # (the forwarder's listener and hub)


# -- the options ---------------------------------------------------------------------------------------

def test_bad_tls_options_name_the_key(ca, tmp_path):
    cases = [
        (dict(tls_cert=str(tmp_path / "missing.pem")), "tls_cert: cannot load"),
        (dict(tls_cert=ca.ca_file), "tls_cert: cannot load"),
        (dict(tls_key=ca.key_file), "tls_key: only with tls_cert"),
        (dict(tls_verify_client=True, **ca.server_options()), "tls_verify_client: needs tls_ca"),
        (dict(tls_min_version="1.4", **ca.server_options()), "tls_min_version: expected one of"),
        (dict(tls_ciphers="NOPE", **ca.server_options()), "tls_ciphers: OpenSSL knows none"),
        (dict(tls_handshake_timeout=0, **ca.server_options()), "tls_handshake_timeout"),
        (dict(tls_cert=[ca.cert_file, ca.cert_file], tls_key=[ca.key_file]), "tls_key: 1 key(s) for 2"),
        (dict(target_tls_ca=ca.ca_file), "target_tls_ca: only with target_tls"),
    ]
    for options, message in cases:
        with pytest.raises(ConfigError) as caught:
            gproxy.Forwarder("127.0.0.1:0", "127.0.0.1:1", **options)
        assert message in str(caught.value), (options, str(caught.value))


def test_keys_are_never_logged(forwarder_factory, ca, caplog):
    with open(ca.key_file) as f:
        key_text = f.read().splitlines()[1]
    with Server(echo) as upstream, caplog.at_level(logging.DEBUG, logger="gproxy"):
        fw = forwarder_factory(upstream.address, **ca.server_options())
        connect(fw.address).close()
        forwarder_factory.wait_closed(fw, accepted=1)
    assert not any(key_text in r.getMessage() for r in caplog.records)


# -- helpers -----------------------------------------------------------------------------------------

def exchange(client: ssl.SSLSocket, data: bytes, expect: int) -> bytes:
    """Send ``data`` in odd chunks while reading ``expect`` bytes, from this one thread: an
    OpenSSL session must not be read and written by two threads at once (a TLS 1.3 ticket
    read while a record is written corrupts the stream)."""
    import random
    import selectors
    rng = random.Random(3)
    client.setblocking(False)
    view, sent, got = memoryview(data), 0, bytearray()
    deadline = time.monotonic() + TIMEOUT
    with selectors.DefaultSelector() as sel:
        sel.register(client, selectors.EVENT_READ | selectors.EVENT_WRITE)
        while len(got) < expect:
            assert time.monotonic() < deadline, f"stalled: sent {sent}, got {len(got)}"
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if sent < len(data) else 0)
            sel.modify(client, events)
            sel.select(1)
            if sent < len(data):
                try:
                    sent += client.send(view[sent:sent + rng.choice((1, 333, 4097, 65537))])
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    pass
            while True:
                try:
                    chunk = client.recv(1 << 16)
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    break
                assert chunk, f"EOF after {len(got)} of {expect} bytes"
                got += chunk
    client.setblocking(True)
    client.settimeout(TIMEOUT)
    return bytes(got)

def _client_hello(ca) -> bytes:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    session = ca.client_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        session.do_handshake()
    return outgoing.read()


def _bio_handshake(session, raw, incoming, outgoing) -> None:
    while True:
        try:
            session.do_handshake()
            raw.sendall(outgoing.read())
            return
        except ssl.SSLWantReadError:
            raw.sendall(outgoing.read())
            data = raw.recv(65536)
            assert data, "closed during the handshake"
            incoming.write(data)


def _bio_read_all(session, raw, incoming):
    """Read plaintext until the session ends: (plaintext, "close_notify" or "eof")."""
    got = b""
    while True:
        try:
            chunk = session.read(65536)
            if not chunk:
                return got, "close_notify"
            got += chunk
            continue
        except ssl.SSLZeroReturnError:
            return got, "close_notify"
        except ssl.SSLWantReadError:
            pass
        data = raw.recv(65536)
        if not data:
            return got, "eof"
        incoming.write(data)


class _CountingSession:
    """An SSLObject that counts its reads, and the reads that only said "want more"."""

    def __init__(self, obj):
        self.obj, self.reads, self.wanted = obj, 0, 0

    def read(self, *args):
        self.reads += 1
        try:
            return self.obj.read(*args)
        except ssl.SSLWantReadError:
            self.wanted += 1
            raise

    def __getattr__(self, name):
        return getattr(self.obj, name)


def test_a_small_record_costs_one_openssl_read_and_no_exception(ca):
    """The copy path's cost per small message: asking OpenSSL for plaintext it cannot have
    raises SSLWantReadError, and each one cost about a tenth of a small request's CPU (twice
    per read: before the socket's bytes and after them). recv_into asks only when OpenSSL
    holds ciphertext, plaintext or the end."""
    import select
    import threading

    from gproxy import _tls

    raw, peer = socket.socketpair()
    try:
        raw.setblocking(False)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        stream = _tls.TLSSocket(raw, ca.server_context().wrap_bio(incoming, outgoing, server_side=True),
                                incoming, outgoing)
        client = []

        def connect_and_send():
            tls = ca.client_context().wrap_socket(peer, server_hostname="localhost")
            tls.recv(1)  # (the session tickets; then the server's byte)
            tls.sendall(b"small")
            client.append(tls)

        thread = threading.Thread(target=connect_and_send)
        thread.start()

        def wait(events, seconds):
            lists = ([raw], [], []) if events == 1 else ([], [raw], [])
            return bool(select.select(*lists, max(0.0, seconds))[events - 1])

        _tls.handshake(stream, wait, TIMEOUT, "client")
        assert stream.send(b"!") == 1
        thread.join(TIMEOUT)
        assert select.select([raw], [], [], TIMEOUT)[0]
        counting = stream.obj = _CountingSession(stream.obj)
        buffer = bytearray(65536)
        assert stream.recv_into(buffer) == 5 and buffer[:5] == b"small"
        assert (counting.reads, counting.wanted) == (1, 0)
        with pytest.raises(BlockingIOError):  # nothing more: the socket is asked, not OpenSSL
            stream.recv_into(buffer)
        assert (counting.reads, counting.wanted) == (1, 0)
        client[0].close()
    finally:
        raw.close()
        peer.close()


def test_a_half_close_waits_for_plaintext_still_inside_the_session(ca):
    """close_notify goes out only once the plaintext OpenSSL holds has been read: its
    shutdown would take the next record for data after the close and fail, losing it."""
    import select

    from gproxy import _sockets, _tls
    from gproxy.config import Rule
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    raw = _sockets.raw_socket(ours.family, fileno=ours.detach())
    stream = _tls.Terminator(Rule.build("127.0.0.1:0", "127.0.0.1:1", **ca.server_options())).wrap(raw)
    client = ca.client_context().wrap_socket(theirs, server_hostname="localhost", do_handshake_on_connect=False)
    shaking = threading.Thread(target=client.do_handshake, daemon=True)
    shaking.start()

    def wait(events, remaining):
        readable, writable, _ = select.select([raw] if events == 1 else [], [raw] if events == 2 else [], [],
                                              remaining)
        return bool(readable or writable)

    _tls.handshake(stream, wait, TIMEOUT, "client")
    shaking.join(TIMEOUT)
    data = payload(16000, seed=4)
    client.sendall(data)                      # one record
    got = bytearray(100)
    assert wait(1, TIMEOUT) and stream.recv_into(got) == 100
    assert stream.buffered()
    stream.shutdown(socket.SHUT_WR)          # a half-close passed on while plaintext waits
    rest = bytearray()
    while True:
        chunk = bytearray(1000)
        try:
            n = stream.recv_into(chunk)
        except BlockingIOError:
            break
        rest += chunk[:n]
    assert bytes(got) + rest == data          # every byte, and only then ...
    client.settimeout(TIMEOUT)
    assert client.recv(100) == b""            # ... the close_notify
    stream.close()
    client.close()
