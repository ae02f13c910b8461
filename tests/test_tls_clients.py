"""TLS with real clients and servers (openssl s_client, curl, redis-cli, a TLS-only Python
server), origination, toxics on plaintext, reloading certificates, metrics, JSON fields, the
config file and the command line."""

from __future__ import annotations

import functools
import http.server
import json
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time

import pytest

import gproxy
from gproxy import metrics
from gproxy.testing import ThrowawayCA
from peers import (
    TIMEOUT,
    Gate,
    Proxy,
    Server,
    connect,
    echo,
    need,
    payload,
    read_until_closed,
    recv_all,
    recv_exactly,
)
from peers import redis_server as peers_redis_server

pytest.importorskip("trustme")




@pytest.fixture(scope="module")
def ca():
    with ThrowawayCA() as authority:
        yield authority


def tls_client(ca, address, name="localhost", cert=None) -> ssl.SSLSocket:
    return ca.client_context(cert).wrap_socket(connect(address), server_hostname=name)


class TLSEcho:
    """A TLS-only echo server (the target of an originating rule): echoes until the client's
    close_notify or FIN, then closes its side with close_notify. ``context`` decides what it
    asks of clients."""

    def __init__(self, context: ssl.SSLContext):
        self.context = context
        self.failures: list = []
        self.server = Server(self._serve)
        self.address = self.server.address

    def _serve(self, sock: socket.socket) -> None:
        try:
            tls = self.context.wrap_socket(sock, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            self.failures.append(exc)
            return
        while True:
            try:
                data = tls.recv(65536)
            except ssl.SSLEOFError:
                data = b""
            if not data:
                break
            tls.sendall(data)
        try:
            tls.unwrap()
        except (ssl.SSLError, OSError):
            pass

    def close(self) -> None:
        self.server.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# -- origination ----------------------------------------------------------------------------------

def test_origination_to_a_tls_only_target_carries_the_bytes(forwarder_factory, ca):
    with TLSEcho(ca.server_context()) as target:
        fw = forwarder_factory(target.address, target_tls_server_name="localhost", **ca.origination_options())
        client = connect(fw.address)
        data = payload(1_000_003, seed=21)
        sender = threading.Thread(target=client.sendall, args=(data,), daemon=True)
        sender.start()
        assert recv_exactly(client, len(data)) == data
        sender.join(TIMEOUT)
        client.shutdown(socket.SHUT_WR)          # our FIN -> close_notify to the target, which closes
        assert recv_all(client) == b""
        client.close()
        forwarder_factory.wait_closed(fw, accepted=1)
    record = forwarder_factory.records[-1]
    assert record.outcome is gproxy.Outcome.EOF, record
    assert fw._counters.tls.results[("upstream", "ok")] == 1


def test_origination_checks_the_target_certificate(forwarder_factory, ca, caplog):
    with ThrowawayCA() as stranger, TLSEcho(stranger.server_context()) as target:
        fw = forwarder_factory(target.address, target_tls=True, target_tls_ca=ca.ca_file,
                               target_tls_server_name="localhost")
        client = connect(fw.address)
        assert recv_all(client) == b""            # closed: the target is not who it says
        client.close()
        forwarder_factory.wait_closed(fw, accepted=1)
        record = forwarder_factory.records[-1]
        assert record.outcome is gproxy.Outcome.TLS_HANDSHAKE_FAILED
        assert record.error.startswith("upstream: certificate verify failed"), record.error
        # verify off: said at start, and then it works
        with caplog.at_level(logging.WARNING, logger="gproxy.tls"):
            fw2 = forwarder_factory(target.address, target_tls=True, target_tls_verify=False)
        assert any("target_tls_verify = false" in r.getMessage() for r in caplog.records)
        with connect(fw2.address) as client:
            client.sendall(b"unchecked")
            assert recv_exactly(client, 9) == b"unchecked"
        forwarder_factory.wait_closed(fw2, accepted=1)


def test_origination_with_a_wrong_server_name_fails_the_check(forwarder_factory, ca):
    with TLSEcho(ca.server_context()) as target:
        fw = forwarder_factory(target.address, target_tls_server_name="elsewhere.example",
                               **ca.origination_options())
        client = connect(fw.address)
        assert recv_all(client) == b""
        client.close()
        forwarder_factory.wait_closed(fw, accepted=1)
    assert "hostname mismatch" in forwarder_factory.records[-1].error


def test_origination_presents_a_client_certificate(forwarder_factory, ca):
    context = ca.server_context()
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(ca.ca_file)
    cert, key = ca.issue("gproxy.client")
    with TLSEcho(context) as target:
        fw = forwarder_factory(target.address, target_tls_server_name="localhost", target_tls_cert=cert,
                               target_tls_key=key, **ca.origination_options())
        with connect(fw.address) as client:
            client.sendall(b"mtls")
            assert recv_exactly(client, 4) == b"mtls"
        forwarder_factory.wait_closed(fw, accepted=1)
    assert not target.failures


def test_a_target_that_never_answers_the_handshake_times_out(forwarder_factory, ca):
    gate = Gate()
    with Server(gate) as target:
        fw = forwarder_factory(target.address, tls_handshake_timeout=0.3, target_tls_server_name="localhost",
                               **ca.origination_options())
        client = connect(fw.address)
        silent = gate.get()                      # accepts, reads the ClientHello, says nothing
        assert recv_all(client) == b""
        client.close()
        silent.close()
        gate.release()
        forwarder_factory.wait_closed(fw, accepted=1)
    record = forwarder_factory.records[-1]
    assert record.outcome is gproxy.Outcome.TLS_HANDSHAKE_FAILED
    assert record.error == "upstream: no TLS handshake within 0.3s"
    assert fw._counters.tls.results[("upstream", "timeout")] == 1


def test_stopping_ends_a_handshake_under_way(forwarder_factory, ca):
    with Server(echo) as upstream:
        opened = threading.Event()
        fw = forwarder_factory(upstream.address, on_open=lambda record: opened.set(), **ca.server_options())
        client = connect(fw.address)            # never sends its ClientHello
        assert opened.wait(TIMEOUT)             # (the handshake comes after on_open)
        fw.stop(timeout=0)
        assert read_until_closed(client) == b""   # (aborted: RST)
        client.close()
        forwarder_factory.wait_closed(fw, accepted=1)
    assert forwarder_factory.records[-1].outcome is gproxy.Outcome.SHUTDOWN


def test_tls_on_both_sides(forwarder_factory, ca):
    with TLSEcho(ca.server_context()) as target:
        fw = forwarder_factory(target.address, target_tls_server_name="localhost",
                               **ca.origination_options(), **ca.server_options())
        client = tls_client(ca, fw.address)
        client.sendall(b"twice encrypted, once in plaintext")
        assert recv_exactly(client, 34) == b"twice encrypted, once in plaintext"
        client.unwrap().close()
        forwarder_factory.wait_closed(fw, accepted=1)
    assert forwarder_factory.records[-1].outcome is gproxy.Outcome.EOF


def test_route_sni_and_termination_together(forwarder_factory, ca):
    """The ClientHello read to route by starts gproxy's own handshake: the route picks the
    target, the name picks the certificate, the target gets plaintext."""
    db_cert = ca.issue("db.example")
    with Server(echo) as default, Server(echo) as db:
        fw = forwarder_factory(default.address, route_sni={"db.example": f"127.0.0.1:{db.address[1]}"},
                               tls_cert=[ca.cert_file, db_cert[0]], tls_key=[ca.key_file, db_cert[1]])
        with tls_client(ca, fw.address, name="db.example") as client:
            client.sendall(b"to the db")
            assert recv_exactly(client, 9) == b"to the db"
        forwarder_factory.wait_closed(fw, accepted=1)
        assert (db.accepted, default.accepted) == (1, 0)
    record = forwarder_factory.records[-1]
    assert (record.bytes_upstream, record.bytes_downstream) == (9, 9), record


# -- what still works: toxics, metrics, logs --------------------------------------------------------

def test_a_latency_toxic_delays_the_plaintext_not_the_handshake(forwarder_factory, ca):
    with Server(echo) as upstream:
        fw = forwarder_factory(upstream.address, **ca.server_options())
        fw.add_toxic("latency", stream="downstream", latency=1000)
        began = time.monotonic()
        client = tls_client(ca, fw.address)
        handshake = time.monotonic() - began
        began = time.monotonic()
        client.sendall(b"ping")
        assert recv_exactly(client, 4) == b"ping"
        round_trip = time.monotonic() - began
        client.close()
        forwarder_factory.wait_closed(fw, accepted=1)
    assert round_trip >= 1.0
    assert handshake < 1.0, handshake   # (the toxic would have made it at least 1 s)


def test_metrics_and_json_fields_of_a_tls_rule(forwarder_factory, ca, caplog):
    from prometheus_client.parser import text_string_to_metric_families
    with Server(echo) as upstream, caplog.at_level(logging.INFO, logger="gproxy.relay"):
        fw = forwarder_factory(upstream.address, tls_alpn=["h2", "http/1.1"], **ca.server_options())
        context = ca.client_context()
        context.set_alpn_protocols(["http/1.1"])
        with context.wrap_socket(connect(fw.address), server_hostname="localhost") as client:
            client.sendall(b"x")
            assert recv_exactly(client, 1) == b"x"
        plain = connect(fw.address)
        plain.sendall(b"not tls\r\n\r\n")
        recv_all(plain)
        plain.close()
        forwarder_factory.wait_closed(fw, accepted=2)
        page = metrics.render([fw], process=False)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(page) for s in family.samples}
    rule = ("rule", fw.name)
    assert samples[("gproxy_tls_handshakes_total", (("result", "ok"), rule, ("side", "client")))] == 1
    assert samples[("gproxy_tls_handshakes_total", (("result", "failed"), rule, ("side", "client")))] == 1
    assert samples[("gproxy_tls_handshake_duration_seconds_count", (rule, ("side", "client")))] == 2
    assert samples[("gproxy_connections_total", (("outcome", "tls_handshake_failed"), rule))] == 1
    fields = [dict(r.connection) for r in caplog.records if hasattr(r, "connection")]
    ok = next(f for f in fields if f["outcome"] == "eof")
    assert ok["tls_version"] in ("TLSv1.2", "TLSv1.3") and ok["tls_cipher"]
    assert ok["tls_sni"] == "localhost" and ok["tls_alpn"] == "http/1.1"
    json.dumps(ok)


# -- reloading certificates --------------------------------------------------------------------------

def test_reload_takes_new_files_keeps_open_connections_and_refuses_bad_files(forwarder_factory, ca, tmp_path,
                                                                              caplog):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    shutil.copy(ca.cert_file, cert)
    shutil.copy(ca.key_file, key)
    with Server(echo) as upstream:
        fw = forwarder_factory(upstream.address, tls_cert=str(cert), tls_key=str(key))
        old = tls_client(ca, fw.address)
        renewed = ca.issue("renewed.example")
        shutil.copy(renewed[0], cert)
        shutil.copy(renewed[1], key)
        assert fw.reload_certificates() == []
        with tls_client(ca, fw.address, name="renewed.example") as new:
            new.sendall(b"new")
            assert recv_exactly(new, 3) == b"new"
        old.sendall(b"old")                      # the open connection kept its session
        assert recv_exactly(old, 3) == b"old"
        cert.write_text("half a certificate")
        with caplog.at_level(logging.WARNING, logger="gproxy.forwarder"):
            problems = fw.reload_certificates()
        assert len(problems) == 1 and problems[0].startswith(f"tls_cert: cannot load {cert}"), problems
        assert any("keeping the TLS files loaded before" in r.getMessage() for r in caplog.records)
        with tls_client(ca, fw.address, name="renewed.example") as new:   # the last good files
            new.sendall(b"still")
            assert recv_exactly(new, 5) == b"still"
        old.close()
        forwarder_factory.wait_closed(fw, accepted=3)


# -- real clients ----------------------------------------------------------------------------------------

def test_openssl_s_client_through_termination(forwarder_factory, ca):
    openssl = need("openssl")
    with Server(echo) as upstream:
        fw = forwarder_factory(upstream.address, **ca.server_options())
        process = subprocess.Popen(
            [openssl, "s_client", "-connect", f"{fw.address[0]}:{fw.address[1]}", "-CAfile", ca.ca_file,
             "-servername", "localhost", "-verify_return_error", "-quiet", "-no_ign_eof"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            process.stdin.write(b"hello through s_client\n")
            process.stdin.flush()
            line = []
            reader = threading.Thread(target=lambda: line.append(process.stdout.readline()), daemon=True)
            reader.start()
            reader.join(TIMEOUT)
            assert line == [b"hello through s_client\n"], line
            process.stdin.close()                # s_client's close_notify; the echo's FIN comes back
            assert process.wait(TIMEOUT) == 0
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()
            process.stdout.close()
            process.stderr.close()
        forwarder_factory.wait_closed(fw, accepted=1)
    assert forwarder_factory.records[-1].outcome is gproxy.Outcome.EOF, forwarder_factory.records[-1]


def test_curl_https_to_a_plaintext_http_server(forwarder_factory, ca, tmp_path):
    curl = need("curl")
    body = payload(300_007, seed=5)
    (tmp_path / "blob").write_bytes(body)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        fw = forwarder_factory(server.server_address, **ca.server_options())
        result = subprocess.run(
            [curl, "-sS", "--fail", "--cacert", ca.ca_file, "--resolve", f"localhost:{fw.address[1]}:127.0.0.1",
             f"https://localhost:{fw.address[1]}/blob", "-o", str(tmp_path / "got")],
            capture_output=True, timeout=TIMEOUT)
        assert result.returncode == 0, result.stderr
        assert (tmp_path / "got").read_bytes() == body
        forwarder_factory.wait_closed(fw, accepted=1)
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def redis_server():
    with peers_redis_server() as port:
        yield port


def test_redis_cli_tls_to_a_plaintext_redis(forwarder_factory, ca, redis_server):
    cli = need("redis-cli")
    probe = subprocess.run([cli, "--tls", "--version"], capture_output=True, text=True, timeout=TIMEOUT)
    if probe.returncode != 0:
        pytest.skip("this redis-cli has no TLS")
    fw = forwarder_factory(("127.0.0.1", redis_server), **ca.server_options())
    base = [cli, "--tls", "--cacert", ca.ca_file, "--sni", "localhost", "-h", "127.0.0.1",
            "-p", str(fw.address[1])]
    value = payload(100_003, seed=8).hex()
    stored = subprocess.run([*base, "-x", "SET", "k"], input=value, capture_output=True, text=True,
                            timeout=TIMEOUT)
    assert stored.stdout.strip() == "OK", stored
    got = subprocess.run([*base, "--raw", "GET", "k"], capture_output=True, text=True, timeout=TIMEOUT)
    assert got.stdout.rstrip("\n") == value
    forwarder_factory.wait_closed(fw, accepted=2)
    assert all(r.outcome is gproxy.Outcome.EOF for r in forwarder_factory.records)


# -- the command line and the config file ---------------------------------------------------------------

def test_the_command_line_terminates_and_sighup_reloads_the_certificates(ca):
    with Server(echo) as upstream, Proxy("--tls-cert", ca.cert_file, "--tls-key", ca.key_file,
                                         f"127.0.0.1:{upstream.address[1]}") as proxy:
        with tls_client(ca, proxy.address) as client:
            client.sendall(b"cli")
            assert recv_exactly(client, 3) == b"cli"
        proxy.wait_for("eof")
        proxy.process.send_signal(signal.SIGHUP)
        proxy.wait_for("SIGHUP: reading the TLS certificate files again")
        code, output = proxy.stop()
    assert code == 0 and "Traceback" not in output


def test_a_config_file_with_tls_keys_checks_and_names_a_bad_file(ca, tmp_path):
    good = tmp_path / "good.toml"
    good.write_text(f'[[rule]]\nname = "redis"\nlisten = "127.0.0.1:0"\ntarget = "127.0.0.1:6379"\n'
                    f'tls_cert = ["{ca.cert_file}"]\ntls_key = ["{ca.key_file}"]\ntls_alpn = ["http/1.1"]\n'
                    f'tls_handshake_timeout = 3\n')
    result = subprocess.run([sys.executable, "-m", "gproxy", "--check", "-c", str(good)],
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text(good.read_text().replace(ca.cert_file, str(tmp_path / "missing.pem")))
    result = subprocess.run([sys.executable, "-m", "gproxy", "--check", "-c", str(bad)],
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 2
    assert f"rule 'redis': tls_cert: cannot load {tmp_path / 'missing.pem'}: no such file" in result.stderr
    assert "Traceback" not in result.stderr


# -- backpressure --------------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_a_client_that_stops_reading_stalls_the_target_as_on_a_plain_rule(forwarder_factory, ca):
    def stalled_total(options, wrap) -> int:
        sockets, ready, done = [], threading.Event(), threading.Event()

        def serve(sock):
            sockets.append(sock)
            ready.set()
            done.wait(TIMEOUT * 2)

        with Server(serve) as upstream:
            fw = forwarder_factory(upstream.address, **options)
            client = wrap(connect(fw.address))
            assert ready.wait(TIMEOUT)
            target = sockets[0]
            target.settimeout(1.0)               # a send not taken for 1 s: the path is full
            chunk, total = b"x" * 65536, 0
            try:
                while total < 256 << 20:
                    total += target.send(chunk)
            except TimeoutError:
                pass
            client.close()
            target.close()
            done.set()
            forwarder_factory.wait_closed(fw)
        return total

    plain = stalled_total({}, lambda sock: sock)
    tls = stalled_total(ca.server_options(), lambda sock: ca.client_context().wrap_socket(
        sock, server_hostname="localhost"))
    assert tls < 256 << 20, "never stalled"
    assert tls <= plain + 4 * 262144, (tls, plain)


# -- fork ------------------------------------------------------------------------------------------------

_FORK_PROGRAM = r'''
import os, socket, ssl, sys, threading
import gproxy
from gproxy.testing import ThrowawayCA

listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen()

def echo():
    sock, _ = listener.accept()
    while True:
        data = sock.recv(65536)
        if not data:
            break
        sock.sendall(data)

threading.Thread(target=echo, daemon=True).start()
with ThrowawayCA() as ca:
    fw = gproxy.Forwarder("127.0.0.1:0", listener.getsockname(), **ca.server_options()).start()
    client = ca.client_context().wrap_socket(socket.create_connection(fw.address, timeout=5),
                                             server_hostname="localhost")
    client.sendall(b"before fork")
    assert client.recv(100) == b"before fork"
    pid = os.fork()
    if pid == 0:  # the child forgets the parent's connections, and must say nothing on them
        os._exit(0)
    os.waitpid(pid, 0)
    client.sendall(b"after fork")
    assert client.recv(100) == b"after fork", "the child ended the parent's TLS session"
    client.close()
    fw.stop(timeout=0)
print("OK")
'''


def test_a_forked_child_sends_no_close_notify_on_the_parents_connections():
    result = subprocess.run([sys.executable, "-c", _FORK_PROGRAM], capture_output=True, text=True,
                            timeout=TIMEOUT, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0 and result.stdout.strip() == "OK", result.stderr


def test_a_config_file_reload_renews_the_certificates_of_an_unchanged_rule(ca, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    shutil.copy(ca.cert_file, cert)
    shutil.copy(ca.key_file, key)
    config = tmp_path / "gproxy.toml"
    with Server(echo) as upstream:
        config.write_text(f'[[rule]]\nname = "tls"\nlisten = "127.0.0.1:0"\n'
                          f'target = "127.0.0.1:{upstream.address[1]}"\ntls_cert = "{cert}"\ntls_key = "{key}"\n')
        files = gproxy.load_config(str(config)).start()
        try:
            address = files.service["tls"].address
            with tls_client(ca, address) as client:
                client.sendall(b"1")
                assert recv_exactly(client, 1) == b"1"
            renewed = ca.issue("renewed.example")
            shutil.copy(renewed[0], cert)
            shutil.copy(renewed[1], key)
            assert files.reload()                 # the rule is unchanged; its files are new
            with tls_client(ca, address, name="renewed.example") as client:
                client.sendall(b"2")
                assert recv_exactly(client, 1) == b"2"
            assert files.service["tls"].address == address   # the same listener, never rebound
        finally:
            files.stop(timeout=0)
