"""Toxics on real sockets: each one measured, on new and open connections, changed live.

Timing: lower bounds are firm (a toxic must not act early or not at all); upper bounds
are generous (a loaded 2-core machine may be slow, never fast).
"""

from __future__ import annotations

import array
import hashlib
import logging
import random
import socket
import threading
import time

import pytest

import gproxy
from gproxy import ConfigError, Outcome
from gproxy.toxics import CLOSE, RESET, Delay, ToxicExists, ToxicNotFound
from peers import (
    TIMEOUT,
    Server,
    connect,
    echo,
    payload,
    read_until_closed,
    recv_all,
    recv_exactly,
    send_in_odd_chunks,
)

SLACK = 2.0  # the most a loaded machine may add to any timing here


def round_trip(sock: socket.socket, data: bytes = b"ping") -> float:
    start = time.monotonic()
    sock.sendall(data)
    assert recv_exactly(sock, len(data)) == data
    return time.monotonic() - start


@pytest.fixture
def echo_through(forwarder_factory):
    """A forwarder to an echo server; yields (fw, connect) where connect() opens a client."""
    with Server(echo) as upstream:
        fw = forwarder_factory(upstream.address)
        clients = []

        def open_client() -> socket.socket:
            sock = connect(fw.address)
            clients.append(sock)
            return sock
        try:
            yield fw, open_client
        finally:
            for sock in clients:
                sock.close()


# -- the API ---------------------------------------------------------------------------------

def test_toxic_record_defaults_and_listing(forwarder_factory):
    with Server(echo) as upstream:
        fw = forwarder_factory(upstream.address)
        toxic = fw.add_toxic("latency", latency=100)
        assert toxic.as_dict() == {"name": "latency_downstream", "type": "latency", "stream": "downstream",
                                   "toxicity": 1.0, "attributes": {"latency": 100, "jitter": 0}}
        fw.add_toxic("slicer", stream="upstream", average_size=10, toxicity=0.5)
        fw.add_toxic("limit_data", name="cap", stream="DownStream")   # any case, as toxiproxy
        assert [t.name for t in fw.toxics()] == ["slicer_upstream", "latency_downstream", "cap"]
        assert fw.toxics()[2].attributes == {"bytes": 0} and fw.toxics()[2].stream == "downstream"
        updated = fw.update_toxic("latency_downstream", jitter=5, toxicity=0.25)
        assert updated.attributes == {"latency": 100, "jitter": 5} and updated.toxicity == 0.25
        fw.remove_toxic("cap")
        with fw.toxic("bandwidth", rate=10) as bw:
            assert bw.name in [t.name for t in fw.toxics()]
        assert [t.name for t in fw.toxics()] == ["slicer_upstream", "latency_downstream"]
        fw.reset()
        assert fw.toxics() == [] and fw.enabled


@pytest.mark.parametrize("call, culprit", [
    (lambda fw: fw.add_toxic("lag"), "type"),
    (lambda fw: fw.add_toxic("latency", stream="sideways"), "stream"),
    (lambda fw: fw.add_toxic("latency", latency=-1), "latency_downstream: latency"),
    (lambda fw: fw.add_toxic("latency", latency="10"), "latency_downstream: latency"),
    (lambda fw: fw.add_toxic("latency", delay=10), "latency_downstream: delay"),
    (lambda fw: fw.add_toxic("latency", toxicity=1.5), "latency_downstream: toxicity"),
    (lambda fw: fw.add_toxic("slicer", average_size=10, size_variation=10), "size_variation"),
    (lambda fw: fw.add_toxic("slicer"), "average_size"),
    (lambda fw: fw.update_toxic("nope", latency=1), "toxic nope"),
    (lambda fw: fw.remove_toxic("nope"), "toxic nope"),
])
def test_bad_toxics_raise_config_error_naming_the_culprit(forwarder_factory, call, culprit):
    with Server(echo) as upstream:
        fw = forwarder_factory(upstream.address)
        with pytest.raises(ConfigError) as info:
            call(fw)
        assert culprit in str(info.value)
        assert fw.toxics() == []


def test_duplicate_names_and_unknown_names_have_their_own_errors(forwarder_factory):
    with Server(echo) as upstream:
        fw = forwarder_factory(upstream.address)
        fw.add_toxic("latency", latency=1)
        with pytest.raises(ToxicExists):
            fw.add_toxic("latency", latency=2)
        with pytest.raises(ToxicExists):  # names are unique across both streams
            fw.add_toxic("bandwidth", name="latency_downstream", stream="upstream")
        with pytest.raises(ToxicNotFound):
            fw.remove_toxic("latency_upstream")
        with pytest.raises(ConfigError, match="stream"):
            fw.update_toxic("latency_downstream", stream="upstream")
        assert [t.attributes["latency"] for t in fw.toxics()] == [1]


# -- each toxic, measured ------------------------------------------------------------------------

@pytest.mark.parametrize("stream", ["downstream", "upstream"])
def test_latency_on_new_and_open_connections(echo_through, stream):
    fw, open_client = echo_through
    opened_before = open_client()
    assert round_trip(opened_before) < 0.2
    fw.add_toxic("latency", stream=stream, latency=150)
    new = open_client()
    for sock in (opened_before, new):
        for _ in range(3):
            elapsed = round_trip(sock)
            assert 0.15 <= elapsed < 0.15 + SLACK
    fw.update_toxic(f"latency_{stream}", latency=300)
    assert 0.3 <= round_trip(new) < 0.3 + SLACK
    fw.remove_toxic(f"latency_{stream}")
    assert round_trip(new) < 0.3 and round_trip(opened_before) < 0.3


def test_latency_with_jitter_stays_in_range_and_in_order(echo_through):
    fw, open_client = echo_through
    sock = open_client()
    fw.add_toxic("latency", latency=100, jitter=50)
    times = [round_trip(sock, bytes([65 + i]) * 10) for i in range(8)]
    assert all(0.05 <= t < 0.15 + SLACK for t in times), times


def test_latency_pipelines_a_bulk_stream(echo_through):
    """8 MB through 200 ms each way: delayed by the latency, not paced at a chunk per 200 ms
    (that would take 8 MB / 64 KB * 0.2 s = 25 s)."""
    fw, open_client = echo_through
    sock = open_client()
    fw.add_toxic("latency", latency=200)
    fw.add_toxic("latency", stream="upstream", latency=200)
    data = payload(8_000_000, seed=7)
    start = time.monotonic()
    sender = threading.Thread(target=lambda: (sock.sendall(data), sock.shutdown(socket.SHUT_WR)))
    sender.start()
    first = sock.recv(1 << 16)
    first_at = time.monotonic() - start
    rest = recv_all(sock)
    elapsed = time.monotonic() - start
    sender.join(TIMEOUT)
    assert hashlib.sha256(first + rest).digest() == hashlib.sha256(data).digest()
    assert first_at >= 0.4
    assert elapsed < 0.4 + 2 * SLACK, elapsed


def test_bandwidth_limits_the_rate(forwarder_factory):
    with forwarder_factory.gated() as (fw, client, server):
        fw.add_toxic("bandwidth", rate=100)   # 100 KB/s
        data = payload(60_000, seed=1)
        start = time.monotonic()
        server.sendall(data)
        assert recv_exactly(client, len(data)) == data
        elapsed = time.monotonic() - start
        assert 0.6 * 0.9 <= elapsed < 0.6 + SLACK, elapsed
        fw.update_toxic("bandwidth_downstream", rate=0)  # 0: no limit, as in toxiproxy
        start = time.monotonic()
        server.sendall(data)
        assert recv_exactly(client, len(data)) == data
        assert time.monotonic() - start < 0.5


def test_bandwidth_upstream_and_backpressure(forwarder_factory):
    """A slow toxic holds at most a bounded amount: the sender is pushed back."""
    with forwarder_factory.gated() as (fw, client, server):
        fw.add_toxic("bandwidth", stream="upstream", rate=50)
        client.setblocking(False)
        sent = 0
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                sent += client.send(b"x" * 65536)
            except BlockingIOError:
                time.sleep(0.05)  # sleep-ok: a sender that polls a full socket
                try:
                    sent += client.send(b"x" * 65536)
                except BlockingIOError:
                    break
        # kernel buffers plus the link's bound, not unbounded
        assert sent < 64 * 1024 * 1024, sent
        fw.remove_toxic("bandwidth_upstream")
        client.setblocking(True)
        assert len(recv_exactly(server, sent)) == sent


def test_slow_close_delays_the_fin(forwarder_factory):
    with forwarder_factory.gated() as (fw, client, server):
        fw.add_toxic("slow_close", stream="upstream", delay=300)
        client.sendall(b"last words")
        start = time.monotonic()
        client.shutdown(socket.SHUT_WR)
        assert recv_all(server) == b"last words"
        assert 0.3 <= time.monotonic() - start < 0.3 + SLACK


def test_timeout_holds_data_then_closes(forwarder_factory):
    with forwarder_factory.gated() as (fw, client, server):
        start = time.monotonic()
        fw.add_toxic("timeout", timeout=300)
        server.sendall(b"never arrives")
        assert recv_all(client) == b""   # EOF, nothing passed
        assert 0.3 <= time.monotonic() - start < 0.3 + SLACK
        records = fw.connections()
    assert not records


def test_timeout_zero_holds_data_until_removed_and_loses_none(forwarder_factory):
    with forwarder_factory.gated() as (fw, client, server):
        fw.add_toxic("timeout", timeout=0)
        data = payload(300_000, seed=3)
        server.sendall(data)
        client.settimeout(0.5)
        with pytest.raises(socket.timeout):
            client.recv(1)
        client.settimeout(TIMEOUT)
        start = time.monotonic()
        fw.remove_toxic("timeout_downstream")  # never blocks on the data it holds
        assert time.monotonic() - start < 1.0
        assert recv_exactly(client, len(data)) == data
        assert round_trip_through(client, server) < 1


def round_trip_through(client, server) -> float:
    start = time.monotonic()
    client.sendall(b"?")
    assert recv_exactly(server, 1) == b"?"
    server.sendall(b"!")
    assert recv_exactly(client, 1) == b"!"
    return time.monotonic() - start


def test_timeout_acts_on_an_idle_connection_opened_before(forwarder_factory):
    with forwarder_factory.gated() as (fw, client, server):
        assert round_trip_through(client, server) < 1
        start = time.monotonic()
        fw.add_toxic("timeout", stream="upstream", timeout=200)
        assert recv_all(client) == b""
        assert recv_all(server) == b""
        assert 0.2 <= time.monotonic() - start < 0.2 + SLACK


def test_reset_peer_resets_after_the_timeout(forwarder_factory):
    closed = []
    with Server(echo) as upstream:
        fw = forwarder_factory(upstream.address, on_close=closed.append)
        fw.add_toxic("reset_peer", stream="upstream", timeout=250)
        client = connect(fw.address)
        start = time.monotonic()
        client.sendall(b"hello")
        with pytest.raises(ConnectionResetError):
            client.recv(100)
        assert 0.25 <= time.monotonic() - start < 0.25 + SLACK
        client.close()
        forwarder_factory.wait_closed(fw, accepted=1)
    assert closed[0].outcome is Outcome.RESET and "reset_peer" in closed[0].error


def test_slicer_cuts_a_message_into_many_reads(forwarder_factory):
    with forwarder_factory.gated() as (fw, client, server):
        fw.add_toxic("slicer", average_size=10, size_variation=5, delay=10_000)
        data = payload(1000, seed=5)
        server.sendall(data)
        reads, got = 0, b""
        while len(got) < len(data):
            got += client.recv(65536)
            reads += 1
        assert got == data
        assert reads >= 20, reads   # about 100 slices, 10 ms apart; some may be read together
        fw.update_toxic("slicer_downstream", average_size=100, size_variation=0, delay=0)
        data = payload(100_000, seed=6)
        server.sendall(data)
        assert recv_exactly(client, len(data)) == data


def test_limit_data_passes_exactly_that_many_bytes_then_closes(forwarder_factory):
    with forwarder_factory.gated() as (fw, client, server):
        fw.add_toxic("limit_data", bytes=1000)
        data = payload(5000, seed=8)
        server.sendall(data[:600])
        assert recv_exactly(client, 600) == data[:600]
        server.sendall(data[600:])
        assert recv_all(client) == data[600:1000]


@pytest.mark.parametrize("toxicity, slow", [(0.0, False), (1.0, True)])
def test_toxicity_is_the_chance_a_connection_is_affected(echo_through, toxicity, slow):
    fw, open_client = echo_through
    fw.add_toxic("latency", latency=500, toxicity=toxicity)
    for _ in range(3):
        elapsed = round_trip(open_client())
        assert (elapsed >= 0.5) if slow else (elapsed < 0.5), elapsed


def test_a_connection_keeps_its_toxicity_roll(echo_through):
    fw, open_client = echo_through
    fw.add_toxic("latency", latency=400, toxicity=0.5)
    for _ in range(4):
        sock = open_client()
        first = round_trip(sock) >= 0.4
        assert all((round_trip(sock) >= 0.4) == first for _ in range(2))


# -- live changes never lose, duplicate or reorder a byte ----------------------------------------

def test_live_changes_mid_stream_keep_every_byte(forwarders):
    """Toxics added, updated and removed, both ways, while 6 MB flow each way: byte-exact."""
    with Server(echo) as upstream:
        fw = forwarders(upstream.address)
        sock = connect(fw.address)
        data = payload(6_000_000, seed=11)
        received = []
        reader = threading.Thread(target=lambda: received.append(recv_all(sock)))
        reader.start()
        stop = threading.Event()

        def churn():
            i = 0
            while not stop.is_set():
                stream = ("upstream", "downstream")[i % 2]
                fw.add_toxic("latency", name=f"l{i}", stream=stream, latency=5, jitter=3)
                fw.add_toxic("slicer", name=f"s{i}", stream=stream, average_size=4000,
                             size_variation=1000)
                fw.add_toxic("bandwidth", name=f"b{i}", stream=stream, rate=50_000)
                fw.update_toxic(f"l{i}", latency=10)
                fw.add_toxic("timeout", name=f"t{i}", stream=stream, timeout=0)
                fw.remove_toxic(f"s{i}")
                fw.remove_toxic(f"t{i}")
                fw.remove_toxic(f"l{i}")
                fw.add_toxic(lambda chunk, conn: None, name=f"tap{i}", stream=stream)
                fw.remove_toxic(f"b{i}")
                fw.remove_toxic(f"tap{i}")
                i += 1
        churner = threading.Thread(target=churn)
        churner.start()
        send_in_odd_chunks(sock, data, seed=11)
        sock.shutdown(socket.SHUT_WR)
        reader.join(TIMEOUT * 2)
        stop.set()
        churner.join(TIMEOUT)
        sock.close()
        assert fw.toxics() == []
        assert len(received[0]) == len(data)
        assert hashlib.sha256(received[0]).digest() == hashlib.sha256(data).digest()


def test_many_connections_through_changing_toxics_keep_every_byte(forwarder_factory):
    """Ten clients at once, parked and busy ones alike, while toxics come and go."""
    with Server(echo) as upstream:
        fw = forwarder_factory(upstream.address)
        results, sent = {}, {}

        def client(i):
            data = payload(400_000 + i * 7919, seed=100 + i)
            with connect(fw.address) as sock:
                reader = threading.Thread(target=lambda: results.__setitem__(i, recv_all(sock)))
                reader.start()
                for k in range(0, len(data), 50_000):  # in bursts, so pumps park in between
                    sock.sendall(data[k:k + 50_000])
                    time.sleep(0.01)  # sleep-ok: a client that pauses between bursts
                sock.shutdown(socket.SHUT_WR)
                reader.join(TIMEOUT * 2)
            sent[i] = hashlib.sha256(data).digest()

        clients = [threading.Thread(target=client, args=(i,)) for i in range(10)]
        for thread in clients:
            thread.start()
        i = 0
        while any(thread.is_alive() for thread in clients):
            stream = ("upstream", "downstream")[i % 2]
            fw.add_toxic("latency", name="l", stream=stream, latency=3)
            fw.add_toxic("slicer", name="s", stream=stream, average_size=1000, size_variation=500)
            fw.add_toxic("timeout", name="t", stream=stream, timeout=0)
            fw.remove_toxic("l")
            fw.remove_toxic("t")
            fw.remove_toxic("s")
            i += 1
        for thread in clients:
            thread.join(TIMEOUT)
        assert len(results) == len(sent) == 10 and i > 0
        for n in range(10):
            assert hashlib.sha256(results[n]).digest() == sent[n], n


def test_removing_a_latency_mid_stream_keeps_order(forwarder_factory):
    with forwarder_factory.gated() as (fw, client, server):
        fw.add_toxic("latency", latency=400)
        server.sendall(b"first ")
        time.sleep(0.05)  # sleep-ok: "first " is held by the toxic when it is removed
        fw.remove_toxic("latency_downstream")
        server.sendall(b"second")
        assert recv_exactly(client, 12) == b"first second"


def numbered_words(count: int) -> bytes:
    return b"".join(b"%d," % i for i in range(count))


def first_difference(sent: bytes, got: bytes) -> str:
    """Where two streams of numbered words part: the words around it, each side."""
    n = next((i for i, (a, b) in enumerate(zip(sent, got)) if a != b), min(len(sent), len(got)))
    return (f"got {len(got)} of {len(sent)} bytes; first difference at byte {n}: "
            f"sent ...{sent[max(0, n - 24):n + 24]!r}, got ...{got[max(0, n - 24):n + 24]!r}")


def test_a_reset_while_two_latencies_hold_bytes_keeps_every_word_in_order(forwarder_factory):
    """The issue's case: two 300 ms latencies on one direction, reset mid-stream. The first
    half of 1 MB of numbered words has reached the second latency when the second half and the
    EOF are read into the first: the reset empties both at once, the second's bytes first.
    Taps around the first latency tell the test where the bytes are."""
    data = numbered_words(150_000)
    first, second = data[:len(data) // 2], data[len(data) // 2:]
    read, in_second = threading.Event(), threading.Event()

    def counter(total, event):
        count = [0]

        def tap(chunk, record):
            count[0] += len(chunk)
            if count[0] >= total:
                event.set()
        return tap

    with forwarder_factory.gated() as (fw, client, server):
        fw.add_toxic(counter(len(data), read), name="read")
        fw.add_toxic("latency", name="first", latency=300)
        fw.add_toxic(counter(len(first), in_second), name="between")
        fw.add_toxic("latency", name="second", latency=300)
        server.sendall(first)
        assert in_second.wait(TIMEOUT)
        server.sendall(second)
        server.shutdown(socket.SHUT_WR)
        assert read.wait(TIMEOUT)
        fw.reset()
        got = recv_all(client)
        assert got == data, first_difference(data, got)


@pytest.mark.parametrize("how", ["removed", "disarmed"])
def test_reset_peer_gone_before_it_fires_gives_back_what_it_caught(forwarder_factory, how):
    """It caught a request and is removed (or updated to toxicity 0) before its timeout: the
    request goes on, is answered, and so is the next; nothing is lost, the connection lives."""
    caught = threading.Event()
    with forwarder_factory.gated() as (fw, client, server):
        server.settimeout(5)
        fw.add_toxic(lambda chunk, record: caught.set(), name="probe", stream="upstream")
        fw.add_toxic("reset_peer", stream="upstream", timeout=60_000)
        client.sendall(b"GET /1\n")
        assert caught.wait(TIMEOUT)   # the reset_peer after the probe holds it now
        if how == "removed":
            fw.remove_toxic("reset_peer_upstream")
        else:
            fw.update_toxic("reset_peer_upstream", toxicity=0)
        assert recv_exactly(server, 7) == b"GET /1\n"
        server.sendall(b"200 /1\n")
        assert recv_exactly(client, 7) == b"200 /1\n"
        client.sendall(b"GET /2\n")
        assert recv_exactly(server, 7) == b"GET /2\n"
        server.sendall(b"200 /2\n")
        assert recv_exactly(client, 7) == b"200 /2\n"
        assert len(fw.connections()) == 1 and fw.connections()[0].outcome is None


def churn_step(fw, rng: random.Random, made: int) -> None:
    """One random change to fw's toxics: add (any toxic that passes data, or one that ends
    connections but cannot fire within the test), update, remove, or reset them all."""
    present = fw.toxics()
    action = rng.random()
    if action < 0.45 or not present:
        stream = rng.choice(["upstream", "downstream"])
        kind = rng.choice(["latency", "bandwidth", "slicer", "slow_close", "tap", "delay",
                           "reset_peer", "limit_data", "timeout"])
        toxicity = rng.choice([1.0, 1.0, 0.5, 0.0])
        name = f"t{made}"
        if kind == "tap":
            fw.add_toxic(lambda chunk, record: bytearray(chunk), name=name, stream=stream, toxicity=toxicity)
        elif kind == "delay":
            seconds = rng.choice([0, 0.002, 0.01])
            fw.add_toxic(lambda chunk, record: Delay(seconds), name=name, stream=stream, toxicity=toxicity)
        else:
            attributes = {
                "latency": {"latency": rng.randint(0, 50), "jitter": rng.randint(0, 5)},
                "bandwidth": {"rate": rng.choice([0, 5000, 50_000])},
                "slicer": {"average_size": 2000, "size_variation": 1000, "delay": rng.choice([0, 100])},
                "slow_close": {"delay": rng.randint(0, 20)},
                "reset_peer": {"timeout": 600_000},          # never within the test
                "limit_data": {"bytes": 10 ** 12},
                "timeout": {"timeout": rng.choice([0, 600_000])},
            }[kind]
            fw.add_toxic(kind, name=name, stream=stream, toxicity=toxicity, **attributes)
    elif action < 0.7:
        fw.update_toxic(rng.choice(present).name, toxicity=rng.choice([0.0, 0.5, 1.0]))
    elif action < 0.9:
        fw.remove_toxic(rng.choice(present).name)
    else:
        fw.reset()


@pytest.mark.timeout(60)
def test_random_toxic_changes_keep_every_word_both_ways(forwarder_factory):
    """The property through real sockets: numbered words go up to an echo and back down while
    toxics of every kind come and go on both streams, a change after every piece sent, so
    changes meet bytes that toxics hold. Each connection is one seed."""
    with Server(echo) as upstream:
        fw = forwarder_factory(upstream.address)
        for seed in range(8):
            rng = random.Random(seed)
            data = numbered_words(30_000)   # about 170 KB each way
            with connect(fw.address) as sock:
                received = []
                reader = threading.Thread(target=lambda out, s: out.append(recv_all(s)), args=(received, sock))
                reader.start()
                sent = made = 0
                while sent < len(data):
                    n = rng.randint(1, 4000)
                    sock.sendall(data[sent:sent + n])
                    sent += n
                    churn_step(fw, rng, made)
                    made += 1
                    if rng.random() < 0.3:
                        time.sleep(0.002)  # sleep-ok: let the bytes in flight reach the toxics
                fw.reset()   # what toxics still hold goes on
                sock.shutdown(socket.SHUT_WR)
                reader.join(TIMEOUT)
                assert received, f"seed {seed}: the reader did not finish"
                assert received[0] == data, f"seed {seed}: {first_difference(data, received[0])}"


# -- toxics written in Python ------------------------------------------------------------------

def test_python_toxic_taps_changes_and_drops(forwarder_factory):
    seen = []

    def tap(chunk, conn):
        seen.append((conn.id, chunk))

    with forwarder_factory.gated() as (fw, client, server):
        toxic = fw.add_toxic(tap)
        assert toxic.name == "tap_downstream" and toxic.type == "python"
        server.sendall(b"abc")
        assert recv_exactly(client, 3) == b"abc"
        assert seen == [(fw.connections()[0].id, b"abc")]
        fw.add_toxic(lambda chunk, conn: chunk.upper(), name="upper")
        server.sendall(b"def")
        assert recv_exactly(client, 3) == b"DEF"
        fw.update_toxic("upper", toxicity=0.0)  # rolled again: never
        fw.add_toxic(lambda chunk, conn: b"" if chunk == b"drop" else None, name="dropper",
                     stream="upstream")
        client.sendall(b"drop")
        time.sleep(0.1)  # sleep-ok: give a dropped chunk the chance to arrive anyway
        client.sendall(b"keep")
        assert recv_exactly(server, 4) == b"keep"


def test_python_toxic_delays_closes_and_resets(forwarder_factory):
    with forwarder_factory.gated() as (fw, client, server):
        fw.add_toxic(lambda chunk, conn: Delay(0.3, chunk + b"!"), name="slow")
        start = time.monotonic()
        server.sendall(b"hi")
        assert recv_exactly(client, 3) == b"hi!"
        assert 0.3 <= time.monotonic() - start < 0.3 + SLACK
        fw.remove_toxic("slow")
        fw.add_toxic(lambda chunk, conn: CLOSE if chunk == b"bye" else None, name="closer")
        server.sendall(b"ok")
        assert recv_exactly(client, 2) == b"ok"
        server.sendall(b"bye")
        assert recv_all(client) == b""
    with forwarder_factory.gated() as (fw, client, server):
        fw.add_toxic(lambda chunk, conn: RESET, name="resetter", stream="upstream")
        client.sendall(b"x")
        with pytest.raises(ConnectionResetError):
            recv_all(server)


def test_python_toxic_may_return_any_bytes_like(forwarder_factory):
    """bytes, bytearray and memoryview pass as the bytes they hold (a memoryview of 16-bit
    items included); a bytearray the toxic changes after returning it does not change them."""
    kept = bytearray()

    def reuses_its_buffer(chunk, record):
        kept[:] = chunk.upper()
        return kept

    with forwarder_factory.gated() as (fw, client, server):
        fw.add_toxic(reuses_its_buffer)
        fw.add_toxic("latency", latency=100)   # holds the first while the second is made
        server.sendall(b"abc")
        time.sleep(0.02)  # sleep-ok: two chunks, so the toxic runs twice
        server.sendall(b"def")
        assert recv_exactly(client, 6) == b"ABCDEF"
        fw.reset()
        fw.add_toxic(lambda chunk, record: memoryview(array.array("H", [0x4241, 0x4443])))
        server.sendall(b"x")
        assert recv_exactly(client, 4) == array.array("H", [0x4241, 0x4443]).tobytes()


@pytest.mark.parametrize("returned", [3, True, False, 0, "text", [b"x"], 0.5, Delay],
                         ids=["int", "True", "False", "zero", "str", "list", "float", "Delay-class"])
def test_a_python_toxic_returning_anything_else_ends_the_connection_naming_it(
        forwarder_factory, no_errors_logged, returned):
    """An int used to send that many NUL bytes, False or 0 dropped the chunk silently, a str
    ended the connection with an unrelated TypeError: each is now an ERROR naming the toxic
    and what it returned, and nothing of it reaches the peer."""
    closed = []
    with forwarder_factory.gated(on_close=closed.append) as (fw, client, server):
        client.settimeout(5)
        fw.add_toxic(lambda chunk, record: returned, name="sloppy")
        server.sendall(b"abc")
        assert read_until_closed(client) == b""
    assert closed[0].outcome is Outcome.ERROR, closed[0]
    assert "'sloppy' returned" in closed[0].error and repr(returned)[:20] in closed[0].error, closed[0].error
    reports = [r for r in no_errors_logged.records if r.name == "gproxy.toxics"]
    assert len(reports) == 1 and "'sloppy' returned" in reports[0].getMessage(), reports
    no_errors_logged.records.clear()  # expected


@pytest.mark.parametrize("seconds, data", [(-1, None), (float("nan"), None), (float("inf"), None),
                                           ("1", None), (True, None), (None, None), (1, "text"), (1, 7)])
def test_delay_refuses_what_is_not_a_delay(seconds, data):
    with pytest.raises((TypeError, ValueError), match="Delay"):
        Delay(seconds, data)


def test_delay_takes_bytes_like_data_as_bytes():
    assert Delay(0).seconds == 0.0 and Delay(0).data is None
    delay = Delay(1, bytearray(b"abc"))
    assert delay.seconds == 1.0 and delay.data == b"abc" and type(delay.data) is bytes
    assert Delay(0.5, memoryview(b"xy")).data == b"xy"


def test_an_exception_in_a_python_toxic_is_reported_naming_it(forwarder_factory, no_errors_logged):
    """Not a silent RESET: an ERROR with the traceback, naming the toxic; the connection's
    outcome is ERROR and its error says which toxic raised what."""
    def typo(chunk, record):
        return chunk.uper()

    closed = []
    with forwarder_factory.gated(on_close=closed.append) as (fw, client, server):
        client.settimeout(5)
        fw.add_toxic(typo)
        server.sendall(b"abc")
        assert read_until_closed(client) == b""
    assert closed[0].outcome is Outcome.ERROR
    assert closed[0].error.startswith("Python toxic 'typo_downstream' raised AttributeError"), closed[0].error
    reports = [r for r in no_errors_logged.records if r.name == "gproxy.toxics"]
    assert len(reports) == 1 and reports[0].exc_info, reports
    assert "typo_downstream" in reports[0].getMessage()
    assert "chunk.uper()" in logging.Formatter().format(reports[0])
    no_errors_logged.records.clear()  # expected


def test_a_failing_python_toxic_reaches_stderr_when_logging_is_not_configured():
    """The program configured no logging: what a toxic raised, or a return it may not give,
    is printed on stderr as an uncaught exception would be, naming the toxic."""
    import subprocess
    import sys
    import textwrap
    from pathlib import Path
    script = textwrap.dedent("""
        import socket, threading
        import gproxy
        listener = socket.socket(); listener.bind(("127.0.0.1", 0)); listener.listen()
        def serve():
            while True:
                sock, _ = listener.accept()   # the proxy resets it: nothing to read
                sock.close()
        threading.Thread(target=serve, daemon=True).start()
        def typo(chunk, record):
            return chunk.uper()
        def counts(chunk, record):
            return len(chunk)
        with gproxy.Forwarder("127.0.0.1:0", listener.getsockname()) as fw:
            for toxic in (typo, counts):
                fw.reset()
                fw.add_toxic(toxic, stream="upstream")
                with socket.create_connection(fw.address, timeout=10) as sock:
                    sock.sendall(b"hi")
                    try:
                        assert sock.recv(10) == b""
                    except ConnectionResetError:
                        pass
        print("OK")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=TIMEOUT * 3, cwd=Path(__file__).resolve().parent.parent,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "OK"
    assert "Python toxic 'typo_upstream' raised AttributeError" in result.stderr, result.stderr
    assert "Traceback" in result.stderr and ", in typo" in result.stderr, result.stderr
    assert "Python toxic 'counts_upstream' returned 2 (int)" in result.stderr, result.stderr


def test_only_forwarders_with_toxics_leave_the_fast_path(echo_through):
    fw, open_client = echo_through
    sock = open_client()
    assert round_trip(sock) < 1
    conn = fw._context.active[fw.connections()[0].id]
    assert conn.links is None
    fw.add_toxic(lambda chunk, record: None, name="tap")
    assert round_trip(sock) < 1
    assert conn.links[1] is not None
    fw.remove_toxic("tap")
    assert round_trip(sock) < 1
    assert conn.links[1] is None   # back on the fast path, nothing kept


# -- down, and cutting one connection ------------------------------------------------------------

def test_disable_cuts_connections_and_refuses_then_enable_listens_on_the_same_port(echo_through):
    fw, open_client = echo_through
    sock = open_client()
    assert round_trip(sock) < 1
    address = fw.address
    with fw.down():
        assert not fw.enabled
        assert recv_all(sock) == b""
        with pytest.raises(ConnectionRefusedError):
            connect(address, timeout=5)
        assert fw.connections() == []
    assert fw.enabled and fw.address == address
    assert round_trip(open_client()) < 1
    fw.disable()
    fw.disable()   # twice is harmless
    fw.enable()
    fw.enable()
    assert round_trip(open_client()) < 1


def test_toxics_survive_down_and_reset_clears_all(echo_through):
    fw, open_client = echo_through
    fw.add_toxic("latency", latency=400)
    fw.disable()
    fw.enable()
    assert round_trip(open_client()) >= 0.4
    fw.disable()
    fw.reset()
    assert fw.enabled and fw.toxics() == []
    assert round_trip(open_client()) < 0.4


def test_abort_or_close_one_connection_by_id(forwarder_factory):
    records = []
    with Server(echo) as upstream:
        fw = forwarder_factory(upstream.address, on_close=records.append)
        a, b, c = connect(fw.address), connect(fw.address), connect(fw.address)
        for sock in (a, b, c):
            assert round_trip(sock) < 1
        ids = [record.id for record in fw.connections()]
        assert len(ids) == 3 and all(r.outcome is None for r in fw.connections())
        assert fw.abort_connection(ids[0])
        with pytest.raises(ConnectionResetError):
            a.recv(1)
        assert fw.close_connection(ids[1])
        assert recv_all(b) == b""
        assert not fw.abort_connection(ids[0]) and not fw.close_connection(12345)
        assert round_trip(c) < 1
        assert [r.id for r in fw.connections()] == [ids[2]]
        for sock in (a, b, c):
            sock.close()
        forwarder_factory.wait_closed(fw, accepted=3)
    outcomes = {r.id: r.outcome for r in records}
    assert outcomes[ids[0]] is Outcome.RESET and outcomes[ids[1]] is Outcome.CLOSED


def test_disable_before_start_is_an_error():
    fw = gproxy.Forwarder("127.0.0.1:0", "127.0.0.1:9")
    with pytest.raises(RuntimeError):
        fw.disable()
    fw.add_toxic("latency", latency=10)   # toxics may be set up before start
    assert [t.name for t in fw.toxics()] == ["latency_downstream"]


# -- both ways of running, the way users run them ---------------------------------------------------

MODES_SCRIPT = r'''
import socket, threading, time
import gproxy
from gproxy.toxics import Delay

def echo_server():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    def serve(sock):
        with sock:
            while True:
                data = sock.recv(65536)
                if not data:
                    return
                sock.sendall(data)
    def accept():
        while True:
            sock, _ = listener.accept()
            threading.Thread(target=serve, args=(sock,), daemon=True).start()
    threading.Thread(target=accept, daemon=True).start()
    return listener.getsockname()

def rtt(sock, data=b"ping"):
    start = time.monotonic()
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        got += sock.recv(65536)
    assert got == data, got
    return time.monotonic() - start

fw = gproxy.Forwarder("127.0.0.1:0", echo_server()).start()
sock = socket.create_connection(fw.address, timeout=10)
assert rtt(sock) < 1
fw.add_toxic("latency", latency=400)                     # on an open connection
assert rtt(sock) >= 0.4
other = socket.create_connection(fw.address, timeout=10)  # and a new one
assert rtt(other) >= 0.4
fw.update_toxic("latency_downstream", latency=0)
assert rtt(sock) < 0.4
fw.remove_toxic("latency_downstream")
seen = []
fw.add_toxic(lambda chunk, conn: seen.append((conn.id, chunk)), name="tap", stream="upstream")
fw.add_toxic(lambda chunk, conn: Delay(0.2, chunk.upper()), name="shout")
start = time.monotonic()
sock.sendall(b"abc")
got = b""
while len(got) < 3:
    got += sock.recv(10)
assert got == b"ABC" and seen[-1][1] == b"abc" and time.monotonic() - start >= 0.2, (got, seen)
fw.reset()
assert fw.toxics() == []
ids = [c.id for c in fw.connections()]
assert len(ids) == 2
assert fw.close_connection(ids[1])
assert other.recv(1) == b""
start = time.monotonic()  # before: the 200 ms may run out before add_toxic has returned
timeout_toxic = fw.add_toxic("timeout", timeout=200)    # closes the idle open connection
assert sock.recv(1) == b"" and time.monotonic() - start >= 0.2
fw.remove_toxic(timeout_toxic.name)
port = fw.address[1]
with fw.down():
    try:
        socket.create_connection(fw.address, timeout=5)
        raise AssertionError("connected to a disabled forwarder")
    except ConnectionRefusedError:
        pass
assert fw.enabled and fw.address[1] == port
assert rtt(socket.create_connection(fw.address, timeout=10)) < 1
fw.stop()
print("OK")
'''


@pytest.mark.parametrize("prelude", ["", "from gevent import monkey; monkey.patch_all()\n"],
                         ids=["unpatched", "patched"])
def test_the_python_api_in_a_patched_and_an_unpatched_program(prelude):
    import subprocess
    import sys
    from pathlib import Path
    result = subprocess.run([sys.executable, "-c", prelude + MODES_SCRIPT], capture_output=True, text=True,
                            timeout=TIMEOUT * 3, cwd=Path(__file__).resolve().parent.parent,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stdout.strip().endswith("OK"), result.stdout


def test_the_pytest_plugin_resets_shared_forwarders_between_tests(tmp_path):
    import os
    import subprocess
    import sys
    import textwrap
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["gproxy.testing"]\n')
    (tmp_path / "test_user.py").write_text(textwrap.dedent('''
        import socket, threading
        import pytest

        @pytest.fixture(scope="session")
        def upstream():
            listener = socket.socket()
            listener.bind(("127.0.0.1", 0))
            listener.listen(16)
            def serve():
                while True:
                    sock, _ = listener.accept()
                    sock.sendall(b"hi")
                    sock.close()
            threading.Thread(target=serve, daemon=True).start()
            return listener.getsockname()

        @pytest.fixture(scope="session")
        def proxy(gproxy_session_forwarder, upstream):
            return gproxy_session_forwarder(upstream)

        def greet(proxy):
            try:
                with socket.create_connection(proxy.address, timeout=5) as sock:
                    return sock.recv(10)
            except ConnectionRefusedError:
                return None

        def test_1_breaks_it(proxy):
            proxy.add_toxic("limit_data", bytes=0)
            proxy.disable()
            assert greet(proxy) is None

        def test_2_finds_it_clean(proxy):
            assert proxy.enabled and proxy.toxics() == []
            assert greet(proxy) == b"hi"

        def test_3_down_reads_well(proxy):
            with proxy.down():
                assert greet(proxy) is None
            assert greet(proxy) == b"hi"
    '''))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                            capture_output=True, text=True, timeout=TIMEOUT * 3, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed" in result.stdout


def test_toxic_changes_from_a_thread_other_than_the_serving_one():
    """serve_forever() in a thread of the program's own: changes from the main thread still
    run on the forwarder's hub and have taken effect when they return."""
    with Server(echo) as upstream:
        fw = gproxy.Forwarder("127.0.0.1:0", upstream.address,
                              on_close=lambda record: fw.stop(timeout=0))  # the hook runs on the hub
        serving = threading.Thread(target=fw.serve_forever)
        serving.start()
        deadline = time.monotonic() + TIMEOUT
        while fw.bound_address is None and time.monotonic() < deadline:
            time.sleep(0.01)  # sleep-ok: serve_forever() has no readiness signal to wait on
        sock = connect(fw.address)
        assert round_trip(sock) < 1
        fw.add_toxic("latency", latency=200)
        assert round_trip(sock) >= 0.2
        fw.remove_toxic("latency_downstream")
        assert round_trip(sock) < 1 and fw.toxics() == []
        sock.close()
        serving.join(TIMEOUT)
        assert not serving.is_alive()
