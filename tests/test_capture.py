"""Captures: fw.capture() writes what crossed the proxy as a pcap file; tests/pcapread.py (an
independent reader) checks its every checksum and sequence number and rebuilds the streams,
and Wireshark's tshark dissects the Redis commands in one."""

from __future__ import annotations

import errno
import io
import os
import random
import socket
import subprocess
import sys
import threading

import pytest

import pcapread
from gproxy import _pcap
from peers import (
    TIMEOUT,
    Proxy,
    Server,
    connect,
    echo,
    need,
    payload,
    read_until_closed,
    recv_all,
    recv_exactly,
    redis_server,
    reset,
    send_in_odd_chunks,
)


def _sides(path, client_end, listener, target):
    """The client <-> listener and proxy <-> target conversations of the file's only connection."""
    linktype, segments = pcapread.read(path)
    assert linktype == 101
    streams = pcapread.streams(segments)
    assert len(streams) == 2, [(s.opener, s.acceptor) for s in streams]
    client = next(s for s in streams if s.opener == client_end)
    assert client.acceptor == listener
    upstream = next(s for s in streams if s is not client)
    assert upstream.acceptor == target and upstream.opener[0] == target[0]
    return client, upstream


def _exchange_half_closed(address, data: bytes, seed: int):
    """Send ``data`` in odd chunks from a thread, half-close, read everything back."""
    sock = connect(address)
    sender = threading.Thread(target=lambda: (send_in_odd_chunks(sock, data, seed), sock.shutdown(socket.SHUT_WR)))
    sender.start()
    got = recv_all(sock)
    sender.join(TIMEOUT)
    return sock, got


def test_conversations_rebuild_what_crossed_both_sides(forwarders, tmp_path):
    """Each connection is two conversations, client <-> listener and proxy <-> target, with the
    real ends; the rebuilt streams are the bytes that crossed, both ways, and the half-closes
    are FINs, for random sizes in random chunkings, on either pump."""
    with Server(echo) as upstream:
        fw = forwarders(upstream.address)
        for seed in range(4):
            data = payload(random.Random(seed).randrange(1, 600_000), seed)
            path = tmp_path / f"{seed}.pcap"
            with fw.capture(str(path)):
                sock, got = _exchange_half_closed(fw.address, data, seed)
                end = sock.getsockname()
                sock.close()
                forwarders.wait_closed(fw)
            assert got == data
            client, upstream_side = _sides(path, end, tuple(fw.address), tuple(upstream.address))
            for stream, opener_sent in ((client, data), (upstream_side, data)):
                first, second = stream.sent_by(stream.opener), stream.sent_by(stream.acceptor)
                assert bytes(first.data) == opener_sent and bytes(second.data) == data
                assert first.fin and second.fin and not first.rst and not second.rst


@pytest.mark.parametrize("who", ["client", "upstream"])
def test_a_reset_is_an_rst_from_who_reset_and_from_the_proxy_on_the_other_side(forwarders, tmp_path, who):
    path = tmp_path / "reset.pcap"
    with forwarders.gated() as (fw, client, server):
        with fw.capture(str(path)):
            client.sendall(b"request")
            assert recv_exactly(server, 7) == b"request"
            server.sendall(b"partial answer")
            assert recv_exactly(client, 14) == b"partial answer"
            end = client.getsockname()
            target = server.getsockname()
            reset(client if who == "client" else server)
            forwarders.wait_closed(fw, accepted=1)
    client_side, upstream_side = _sides(path, end, tuple(fw.address), target)
    # who reset sends the RST on its own conversation; the proxy aborts the other one
    by_peer, by_proxy = (client_side, upstream_side) if who == "client" else (upstream_side, client_side)
    peer_end = by_peer.opener if who == "client" else by_peer.acceptor
    proxy_end = by_proxy.opener if who == "client" else by_proxy.acceptor
    assert by_peer.sent_by(peer_end).rst and by_proxy.sent_by(proxy_end).rst
    assert bytes(client_side.sent_by(end).data) == b"request"
    assert bytes(upstream_side.sent_by(target).data) == b"partial answer"


def test_capture_of_one_connection_joins_it_open_and_shows_it_alone(forwarders, tmp_path):
    path = tmp_path / "one.pcap"
    with Server(echo) as upstream:
        fw = forwarders(upstream.address)
        first, second = connect(fw.address), connect(fw.address)
        for sock in (first, second):   # both open, and moving bytes on their fast path
            sock.sendall(b"before")
            assert recv_exactly(sock, 6) == b"before"
        wanted = fw.connections()[1].id
        with fw.capture(str(path), connection=wanted):
            for sock in (first, second):
                sock.sendall(b"during")
                assert recv_exactly(sock, 6) == b"during"
            end = second.getsockname()
            second.close()
            first.sendall(b"x")
            assert recv_exactly(first, 1) == b"x"
        first.close()
        forwarders.wait_closed(fw)
    client, upstream_side = _sides(path, end, tuple(fw.address), tuple(upstream.address))
    assert bytes(client.sent_by(end).data) == b"during" and client.sent_by(end).fin
    assert bytes(upstream_side.sent_by(upstream_side.acceptor).data) == b"during"


def test_toxics_show_as_the_difference_between_the_sides(forwarder_factory, tmp_path):
    """The client side is what the client saw (after the toxics), the target side what the
    target sent."""
    path = tmp_path / "toxic.pcap"
    with Server(echo) as upstream:
        fw = forwarder_factory(upstream.address)
        fw.add_toxic(lambda chunk, record: bytes(chunk).upper(), name="upper")
        with fw.capture(str(path)):
            sock, got = _exchange_half_closed(fw.address, b"quiet words", 1)
            end = sock.getsockname()
            sock.close()
            forwarder_factory.wait_closed(fw)
    assert got == b"QUIET WORDS"
    client, upstream_side = _sides(path, end, tuple(fw.address), tuple(upstream.address))
    assert bytes(client.sent_by(client.acceptor).data) == b"QUIET WORDS"
    assert bytes(upstream_side.sent_by(upstream_side.acceptor).data) == b"quiet words"


def test_after_stop_connections_go_on_uncaptured_and_one_capture_runs_at_a_time(forwarders, tmp_path):
    path = tmp_path / "stopped.pcap"
    with Server(echo) as upstream:
        fw = forwarders(upstream.address)
        sock = connect(fw.address)
        capture = fw.capture(str(path))
        with pytest.raises(RuntimeError, match="capturing already"):
            fw.capture(str(tmp_path / "second.pcap"))
        sock.sendall(b"in")
        assert recv_exactly(sock, 2) == b"in"
        capture.stop()
        size = os.path.getsize(path)
        data = payload(3_000_001, 5)   # bulk: the fast path (splice, lanes) takes it again
        sender = threading.Thread(target=sock.sendall, args=(data,))
        sender.start()
        assert recv_exactly(sock, len(data)) == data
        sender.join(TIMEOUT)
        sock.close()
        forwarders.wait_closed(fw)
        assert os.path.getsize(path) == size
        capture.stop()   # again: nothing
        with fw.capture(str(tmp_path / "again.pcap")):   # the forwarder may capture again
            pass
    assert capture.connections == 1


def test_conversation_sequence_numbers_follow_random_chunks_across_the_wrap(tmp_path):
    """_pcap alone, against the independent reader: random chunk sizes both ways (some larger
    than one IP packet), initial sequence numbers just below 2**32, both IP families."""
    rng = random.Random(7)
    for opener, acceptor in ((("10.1.2.3", 40000), ("192.0.2.9", 6379)), (("2001:db8::1", 40000), ("::1", 80))):
        path = tmp_path / "wrap.pcap"
        conv = _pcap.Conversation(opener, acceptor, isns=(2**32 - 5, 2**32 - 100_000))
        sent = [bytearray(), bytearray()]
        t = 1_700_000_000.0
        with open(path, "wb") as f:
            f.write(_pcap.file_header())
            f.write(conv.handshake(t))
            for _ in range(120):
                side = rng.randrange(2)
                data = rng.randbytes(rng.choice((1, 2, 3, 1460, 65495, 65496, 70000, 2_000_000)))
                t += rng.random() / 100
                f.write(conv.send(side, data, t))
                sent[side] += data
            f.write(conv.fin(1, t))
            f.write(conv.send(1, b"after FIN: never", t))
            f.write(conv.rst(0, t))
        _linktype, segments = pcapread.read(path)
        assert max(len(s.payload) for s in segments) == _pcap.MAX_SEGMENT
        (stream,) = pcapread.streams(segments)
        assert bytes(stream.sent_by(opener).data) == sent[0]
        assert bytes(stream.sent_by(acceptor).data) == sent[1]
        assert stream.sent_by(acceptor).fin and stream.sent_by(opener).rst


# -- Wireshark ---------------------------------------------------------------------------



def tshark(*args: str) -> str:
    result = subprocess.run([need("tshark"), *args], capture_output=True, text=True, timeout=TIMEOUT * 3)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture
def redis_port():
    with redis_server() as port:
        yield port


@pytest.mark.timeout(60)
def test_tshark_finds_the_redis_commands_and_both_streams_exactly(forwarder_factory, redis_port, tmp_path):
    redis = pytest.importorskip("redis")
    path = tmp_path / "redis.pcap"
    fw = forwarder_factory(("127.0.0.1", redis_port))
    seen = {"upstream": bytearray(), "downstream": bytearray()}
    for stream in seen:   # a tap: what a Python toxic sees is what was read
        fw.add_toxic(lambda chunk, record, into=seen[stream]: into.extend(chunk), stream=stream,
                     name=f"tap_{stream}")
    big = payload(200_003, 3).hex()
    with fw.capture(str(path)):
        client = redis.Redis(host=fw.host, port=fw.port)
        assert client.set("greeting", "hello capture")
        assert client.get("greeting") == b"hello capture"
        client.set("big", big)
        assert client.get("big").decode() == big
        client.close()
        forwarder_factory.wait_closed(fw)
    decode = ["-d", f"tcp.port=={fw.port},resp", "-d", f"tcp.port=={redis_port},resp"]
    checked = ["-o", "tcp.check_checksum:TRUE", "-o", "ip.check_checksum:TRUE"]
    strings = tshark("-r", str(path), *decode, "-Y", "resp", "-T", "fields", "-e", "resp.bulk_string.value")
    values = {bytes.fromhex(v).decode(errors="replace") for line in strings.split() for v in line.split(",") if v}
    assert {"SET", "GET", "greeting", "hello capture"} <= values
    bad = tshark("-r", str(path), *checked, "-Y", "tcp.checksum.status == 0 || ip.checksum.status == 0 "
                 "|| tcp.analysis.flags && !tcp.analysis.window_update")
    assert bad.strip() == ""
    # tshark's own reassembly of each conversation (0: client side, 1: target side) is the
    # bytes that crossed, both ways
    for index in (0, 1):
        follow = tshark("-r", str(path), "-q", "-z", f"follow,tcp,raw,{index}")
        sent, answered = bytearray(), bytearray()
        for line in follow.splitlines():
            if line.startswith(("Node", "Follow", "Filter", "===")) or not line.strip():
                continue
            (answered if line.startswith("\t") else sent).extend(bytes.fromhex(line.strip()))
        assert bytes(sent) == bytes(seen["upstream"]) and bytes(answered) == bytes(seen["downstream"])


# -- the command line, the HTTP API, the pytest plugin --------------------------------------

def _one_exchange(address, data: bytes) -> bytes:
    sock, got = _exchange_half_closed(address, data, 0)
    sock.close()
    return got


def test_command_line_capture_is_complete_when_gproxy_stops(tmp_path):
    path = tmp_path / "cli.pcap"
    with Server(echo) as upstream:
        with Proxy("--capture", str(path), "%s:%d" % tuple(upstream.address)) as proxy:
            assert _one_exchange(proxy.address, b"through the command line") == b"through the command line"
            proxy.wait_for("conn#1")
            code, output = proxy.stop()
    assert code == 0 and "Traceback" not in output
    streams = pcapread.streams(pcapread.read(path)[1])
    assert len(streams) == 2
    assert all(bytes(half.data) == b"through the command line" and half.fin
               for stream in streams for half in stream.halves.values())


@pytest.mark.parametrize("args, message", [
    (["--capture", "/nonexistent-dir/x.pcap", "127.0.0.1:0", "127.0.0.1:1"],
     "--capture: cannot write /nonexistent-dir/x.pcap: No such file or directory"),
    (["--capture", "{tmp}/x.pcap", "--workers", "2", "127.0.0.1:0", "127.0.0.1:1"],
     "--capture: not with --workers"),
    (["--capture", "{tmp}/x.pcap", "--api", "127.0.0.1:0"], "--capture: captures the command line's rule"),
])
def test_bad_capture_options_are_one_line_and_exit_2(tmp_path, args, message):
    args = [arg.format(tmp=tmp_path) for arg in args]
    result = subprocess.run([sys.executable, "-m", "gproxy", *args], capture_output=True, text=True,
                            timeout=TIMEOUT)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and last.startswith(f"gproxy: error: {message}"), result.stderr
    assert not (tmp_path / "x.pcap").exists()


def test_api_starts_reports_and_stops_a_capture_into_a_new_file_only(tmp_path):
    from test_api import ApiProcess, create
    path = tmp_path / "api.pcap"
    with Server(echo) as upstream:
        api = ApiProcess()
        try:
            proxy = create(api, "db", upstream.address)
            listen = proxy["listen"].rsplit(":", 1)
            assert api.call("GET", "/proxies/db/capture") == (404, {"error": "no capture running", "status": 404})
            status, body = api.call("POST", "/proxies/db/capture", {"path": str(path)})
            assert (status, body) == (201, {"path": str(path), "connection": None, "running": True,
                                            "connections": 0})
            assert api.call("POST", "/proxies/db/capture", {"path": str(tmp_path / "2.pcap")})[0] == 409
            assert _one_exchange((listen[0], int(listen[1])), b"via the API") == b"via the API"
            api.wait_for("conn#1")
            status, body = api.call("DELETE", "/proxies/db/capture")
            assert status == 200 and body["running"] is False and body["connections"] == 1
            assert os.stat(path).st_mode & 0o777 == 0o600
            # never over an existing file; a misspelt field changes nothing
            assert api.call("POST", "/proxies/db/capture", {"path": str(path)})[0] == 409
            assert api.call("POST", "/proxies/db/capture", {"file": "x"})[0] == 400
            assert api.call("POST", "/proxies/nope/capture", {"path": str(tmp_path / "n")})[0] == 404
        finally:
            code, log = api.stop()
    assert code == 0 and "Traceback" not in log
    streams = pcapread.streams(pcapread.read(path)[1])
    assert [bytes(s.sent_by(s.opener).data) for s in streams] == [b"via the API"] * 2


def test_an_api_capture_goes_on_in_the_same_file_when_an_update_replaces_the_proxy(tmp_path):
    """As toxics carry over to the forwarder that replaces a proxy, so does its capture: the
    old forwarder's connection ends in the file, the new one's follows."""
    from test_api import ApiProcess, create
    path = tmp_path / "replaced.pcap"
    with Server(echo) as upstream:
        api = ApiProcess()
        try:
            host, port = create(api, "db", upstream.address)["listen"].rsplit(":", 1)
            assert api.call("POST", "/proxies/db/capture", {"path": str(path)})[0] == 201
            before = connect((host, int(port)))
            before.sendall(b"one")
            assert recv_exactly(before, 3) == b"one"
            status, _ = api.call("POST", "/proxies/db", {"upstream": "localhost:%d" % upstream.address[1]})
            assert status == 200
            read_until_closed(before)   # the old forwarder stopped: its connection is cut
            before.close()
            status, body = api.call("GET", "/proxies/db/capture")
            assert status == 200 and body["running"] and body["connections"] == 1, body
            assert _one_exchange((host, int(port)), b"two") == b"two"
            status, body = api.call("DELETE", "/proxies/db/capture")
            assert status == 200 and body["connections"] == 2, body
        finally:
            code, log = api.stop()
    assert code == 0 and "Traceback" not in log, log
    streams = pcapread.streams(pcapread.read(path)[1])
    clients = [s for s in streams if s.acceptor[1] == int(port)]
    assert [bytes(s.sent_by(s.opener).data) for s in clients] == [b"one", b"two"]
    assert clients[0].sent_by(clients[0].acceptor).rst   # the stop's abort, before the file went on


def test_plugin_keeps_the_capture_of_a_failed_test_only(tmp_path):
    from test_testing_plugin import run_pytest
    captures = tmp_path / "captures"
    result = run_pytest(tmp_path / "project", {"test_app.py": '''
        import pytest
        from conftest import greet

        @pytest.fixture(scope="session")
        def proxy(gproxy_session_forwarder, upstream):
            return gproxy_session_forwarder(upstream)

        def test_passes(proxy):
            assert greet(proxy) == b"hi"

        def test_fails(proxy, gproxy_forwarder, upstream):
            own = gproxy_forwarder(upstream)
            assert greet(own) == b"hi"
            assert greet(proxy) == b"bye"
    '''}, f"--gproxy-capture={captures}")
    assert result.returncode == 1 and "1 failed, 1 passed" in result.stdout, result.stdout + result.stderr
    kept = sorted(p.name for p in captures.iterdir())
    assert kept == ["test_app.py_test_fails.0.pcap", "test_app.py_test_fails.1.pcap"], kept
    assert "gproxy captures of failed tests" in result.stdout
    for name in kept:
        streams = pcapread.streams(pcapread.read(captures / name)[1])
        assert {bytes(s.sent_by(s.acceptor).data) for s in streams} == {b"hi"}


class _FullDisk(io.RawIOBase):
    """A file that takes ``room`` bytes, then fails as a full disk does."""

    def __init__(self, room: int):
        self.room = room
        self.flushed = False

    def writable(self):
        return True

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return len(data)


def test_a_write_that_fails_stops_the_capture_and_the_connection_goes_on(forwarders, caplog):
    with Server(echo) as upstream:
        fw = forwarders(upstream.address)
        disk = _FullDisk(room=2000)   # the header and a handshake fit; the bulk does not
        with fw.capture(disk) as capture:
            data = payload(300_001, 9)
            assert _one_exchange(fw.address, data) == data
            forwarders.wait_closed(fw)
            assert not capture.running
        assert fw.capturing is None
    warnings = [r.getMessage() for r in caplog.records if r.name == "gproxy.capture" and r.levelname == "WARNING"]
    assert len(warnings) == 1 and "No space left on device" in warnings[0], warnings


def test_each_side_in_its_own_family_and_a_unix_side_left_out(forwarders, tmp_path):
    """A client on IPv6 and a target on IPv4 make a conversation of each family in one file;
    a listener on a Unix socket has no addresses to show, and only the target side is there."""
    with Server(echo) as upstream:
        fw = forwarders(upstream.address, listen="[::1]:0")
        with fw.capture(str(tmp_path / "mixed.pcap")):
            sock, got = _exchange_half_closed(fw.address, b"six to four", 2)
            end = sock.getsockname()[:2]
            sock.close()
            forwarders.wait_closed(fw)
        assert got == b"six to four"
        client, upstream_side = _sides(tmp_path / "mixed.pcap", end, tuple(fw.address)[:2],
                                       tuple(upstream.address))
        assert client.opener[0] == "::1" and upstream_side.opener[0] == "127.0.0.1"
        assert bytes(client.sent_by(end).data) == bytes(upstream_side.sent_by(upstream_side.opener).data)

        fw = forwarders(upstream.address, listen=f"unix:{tmp_path}/gproxy.sock")
        with fw.capture(str(tmp_path / "unix.pcap")) as capture:
            sock, got = _exchange_half_closed(fw.address, b"over a socket file", 3)
            sock.close()
            forwarders.wait_closed(fw)
        assert got == b"over a socket file" and capture.connections == 1
        (stream,) = pcapread.streams(pcapread.read(tmp_path / "unix.pcap")[1])
        assert stream.acceptor == tuple(upstream.address)
        assert bytes(stream.sent_by(stream.opener).data) == b"over a socket file"


def test_stop_completes_the_capture_of_a_forwarder_stopped_or_never_started(tmp_path):
    import gproxy
    fw = gproxy.Forwarder("127.0.0.1:0", "127.0.0.1:1")
    capture = fw.capture(str(tmp_path / "never.pcap"))
    fw.stop()
    assert not capture.running and fw.capturing is None
    assert pcapread.read(tmp_path / "never.pcap") == (101, [])
    with fw.capture(str(tmp_path / "stopped.pcap")) as capture:   # after stop(): nothing to see
        pass
    assert pcapread.read(tmp_path / "stopped.pcap") == (101, [])
