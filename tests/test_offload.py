"""Bulk spliced in threads off the event loop (gproxy/offload.py): the bytes, aborts while a
thread holds a connection, toxics, and the threads' own lifetime."""

from __future__ import annotations

import hashlib
import os
import select
import socket
import struct
import threading
import time

import pytest

import gproxy
from gproxy import Outcome
from gproxy import offload as offload_module
from peers import (
    TIMEOUT,
    Exchange,
    Gate,
    Server,
    bulk_streams,
    connect,
    payload,
    recv_all,
    recv_exactly,
    reset,
    send_in_odd_chunks,
)

pytestmark = pytest.mark.skipif(not hasattr(os, "splice"), reason="splice(2) is Linux's")

#: a buffer that a busy stream's reads fill even on a loaded machine, so the pump splices
#: (and hands the direction to a thread) for sure; with 256 KiB a slow sender may never fill it
SMALL = 16384


def _tasks() -> int:
    """This process's OS threads, as the kernel counts them."""
    return len(os.listdir("/proc/self/task"))


def _lanes(fw) -> int:
    offload = fw._context.offload  # white box: the forwarder's Offload
    return 0 if offload is None else len(offload._lanes)


def _exchange(fw, size: int, stream: int, exchange: Exchange):
    """One client sends ``size + 5`` bytes and receives ``size`` at once; checks both."""
    sock = connect(fw.address)
    sock.sendall(struct.pack("!I", stream))
    data = payload(size + 5, seed=stream)
    sender = threading.Thread(target=send_in_odd_chunks, args=(sock, data, stream))
    sender.start()
    received = recv_all(sock, 1 << 20)
    sender.join(TIMEOUT)
    sock.shutdown(socket.SHUT_WR)
    sock.close()
    assert received == payload(size, seed=10_000 + stream), "downstream bytes differ"
    return hashlib.sha256(data).hexdigest(), len(data)


def _check_upstream(exchange: Exchange, sent: dict) -> None:
    """What the upstream received, stream by stream, is what each client sent."""
    for _ in sent:
        stream, digest, count = exchange.results.get(timeout=TIMEOUT)
        assert (digest, count) == sent[stream], f"stream {stream} upstream"


def test_bulk_both_ways_goes_through_threads_byte_exact(forwarder_factory):
    """Several bulk connections at once, both directions: more than the threads can take, so
    some directions wait for a thread while others are spliced, and a thread may hand the rest of
    a chunk to the event loop when a destination is slow; every byte arrives."""
    size = 12_000_017
    exchange = Exchange(lambda stream: size)
    with Server(exchange) as upstream:
        fw = forwarder_factory(upstream.address, bulk_threads=2, buffer_size=SMALL)
        failures = []

        sent = {}

        def client(stream):
            try:
                sent[stream] = _exchange(fw, size, stream, exchange)
            except BaseException as exc:
                failures.append(exc)

        clients = [threading.Thread(target=client, args=(s,)) for s in range(4)]
        for t in clients:
            t.start()
        for t in clients:
            t.join(TIMEOUT * 3)
        assert not failures, failures
        _check_upstream(exchange, sent)
        stats = forwarder_factory.wait_closed(fw, accepted=4)
        assert 1 <= _lanes(fw) <= 2, "bulk never went to a thread, or more threads than allowed"
    assert stats.bytes_downstream == 4 * size
    assert all(r.outcome is Outcome.EOF for r in forwarder_factory.records)


def test_bulk_threads_zero_splices_on_the_event_loop(forwarder_factory):
    size = 6_000_001
    exchange = Exchange(lambda stream: size)
    with Server(exchange) as upstream:
        fw = forwarder_factory(upstream.address, bulk_threads=0)
        _check_upstream(exchange, {1: _exchange(fw, size, 1, exchange)})
        forwarder_factory.wait_closed(fw, accepted=1)
        assert fw._context.offload is None and fw._context.splicer is not None


def _stalled_bulk(forwarder_factory, upstream_socks, **options):
    """A client pushing bulk to an upstream that never reads: the direction's thread ends up
    waiting for the upstream to take bytes. Returns (fw, client, pusher); the pusher thread
    ends with the error its sendall() met (in ``pusher.error``)."""
    fw = forwarder_factory(upstream_socks.address, bulk_threads=1, buffer_size=SMALL, **options)
    client = connect(fw.address)
    client.settimeout(None)  # the pusher blocks until gproxy cuts the connection
    pushed = threading.Event()

    def push():
        block = b"x" * (1 << 20)
        try:
            while True:
                client.sendall(block)
                pushed.set()
        except OSError as exc:
            pusher.error = exc
            pushed.set()

    pusher = threading.Thread(target=push, daemon=True)
    pusher.error = None
    pusher.start()
    assert pushed.wait(TIMEOUT)
    return fw, client, pusher


class _Holder:
    """Upstream that accepts and never reads, holding each socket until released."""

    def __init__(self):
        self.socks = []
        self.release = threading.Event()

    def __call__(self, sock):
        self.socks.append(sock)
        self.release.wait(TIMEOUT * 3)


def _wait_for_thread_stall(fw):
    """Until the connection's upstream direction is held by a thread (its job is running)."""
    deadline = time.monotonic() + TIMEOUT
    while not fw._context.offload._busy:
        assert time.monotonic() < deadline, "bulk never reached a thread"
        time.sleep(0.01)  # sleep-ok: polling a white-box state with a deadline


def test_abort_reaches_a_thread_waiting_for_a_stalled_destination(forwarder_factory):
    """abort_connection() while the bulk thread waits for an upstream that does not read: the
    thread lets go at once, both sides get RST, and the fds are not closed under it."""
    holder = _Holder()
    with Server(holder) as upstream:
        fw, client, pusher = _stalled_bulk(forwarder_factory, upstream)
        _wait_for_thread_stall(fw)
        (conn_id,) = [c.id for c in fw.connections()]
        started = time.monotonic()
        fw.abort_connection(conn_id)
        stats = forwarder_factory.wait_closed(fw, accepted=1, timeout=5)
        assert time.monotonic() - started < 5
        assert stats.active == 0
        assert forwarder_factory.records[-1].outcome is Outcome.RESET
        pusher.join(TIMEOUT)
        assert isinstance(pusher.error, (ConnectionResetError, BrokenPipeError)), pusher.error
        client.close()
        holder.release.set()
        assert not fw._context.offload._busy


def test_stop_now_with_a_thread_waiting_for_a_stalled_destination():
    """stop(timeout=0) must not hang on a bulk thread blocked in poll(), and must end it."""
    holder = _Holder()
    before = _tasks()
    with Server(holder) as upstream:
        fw = gproxy.Forwarder("127.0.0.1:0", upstream.address, bulk_threads=1, buffer_size=SMALL)
        fw.start()
        client = connect(fw.address)
        pushed = threading.Event()

        def push():
            try:
                while True:
                    client.sendall(b"y" * (1 << 20))
                    pushed.set()
            except OSError:
                pushed.set()

        threading.Thread(target=push, daemon=True).start()
        assert pushed.wait(TIMEOUT)
        _wait_for_thread_stall(fw)
        started = time.monotonic()
        fw.stop(timeout=0)
        assert time.monotonic() - started < 5
        assert fw.statistics().active == 0
        client.close()
        holder.release.set()
    deadline = time.monotonic() + TIMEOUT
    while _tasks() > before + 1:  # the Server's threads end with it; the lane must too
        assert time.monotonic() < deadline, f"threads left: {_tasks()} (before: {before})"
        time.sleep(0.01)  # sleep-ok: waiting for OS threads to exit, with a deadline


def test_threads_do_not_pile_up_across_forwarders():
    """Start, move bulk, stop, many times: the process's thread count comes back."""
    before = _tasks()
    size = 3_000_000
    for round_ in range(6):
        exchange = Exchange(lambda stream: size)
        with Server(exchange) as upstream:
            with gproxy.Forwarder("127.0.0.1:0", upstream.address, bulk_threads=2) as fw:
                _check_upstream(exchange, {round_: _exchange(fw, size, round_, exchange)})
    deadline = time.monotonic() + TIMEOUT
    while _tasks() > before:
        assert time.monotonic() < deadline, f"threads left: {_tasks()} (before: {before})"
        time.sleep(0.01)  # sleep-ok: waiting for OS threads to exit, with a deadline


def test_peer_reset_during_threaded_bulk_is_one_clean_reset(forwarder_factory, capfd):
    """The upstream resets while a thread splices its bulk: the error travels to the pump,
    which aborts both sides with RST; no traceback is printed by the thread."""
    class Blaster:
        def __init__(self):
            self.sent = threading.Event()

        def __call__(self, sock):
            block = b"z" * (1 << 20)
            for _ in range(8):
                sock.sendall(block)
            self.sent.set()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    blaster = Blaster()
    with Server(blaster) as upstream:
        fw = forwarder_factory(upstream.address, bulk_threads=1)
        client = connect(fw.address)
        got = 0
        with pytest.raises(ConnectionResetError):
            while True:
                chunk = client.recv(1 << 16)
                if not chunk:
                    break
                got += len(chunk)
        client.close()
        forwarder_factory.wait_closed(fw, accepted=1)
    assert forwarder_factory.records[-1].outcome is Outcome.RESET
    assert forwarder_factory.records[-1].error.startswith("upstream reset: ")
    assert "Traceback" not in capfd.readouterr().err


def test_toxic_added_during_threaded_bulk_takes_effect(forwarder_factory):
    """A toxic added while a thread splices a direction: the thread gives the direction back
    at its next chunk and the toxic acts (limit_data closes after its byte count)."""
    class Endless:
        def __init__(self):
            self.stop = threading.Event()

        def __call__(self, sock):
            block = b"w" * (1 << 20)
            try:
                while not self.stop.is_set():
                    sock.sendall(block)
            except OSError:
                pass

    endless = Endless()
    with Server(endless) as upstream:
        fw = forwarder_factory(upstream.address, bulk_threads=1, buffer_size=SMALL)
        client = connect(fw.address)
        got = len(client.recv(1 << 16))
        while got < 8 << 20:  # bulk is flowing, through the thread
            got += len(client.recv(1 << 20))
        assert fw._context.offload._lanes, "bulk never reached a thread"
        fw.add_toxic("limit_data", stream="downstream", bytes=1)
        total = got
        while True:
            chunk = client.recv(1 << 20)
            if not chunk:
                break
            total += len(chunk)
        client.close()
        endless.stop.set()
        forwarder_factory.wait_closed(fw, accepted=1)
    # the thread stops at the chunk in progress: at most its quantum more, not the endless stream
    assert total < got + (64 << 20)


def test_bulk_threads_is_validated():
    for bad in (-1, "many", 65, True):
        with pytest.raises(gproxy.ConfigError) as info:
            gproxy.Forwarder("127.0.0.1:0", "127.0.0.1:9", bulk_threads=bad)
        assert info.value.field == "bulk_threads"


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("side", ["client", "upstream"])
def test_a_reset_while_a_thread_lingers_for_more_ends_the_connection(forwarder_factory, monkeypatch, side):
    """A peer resets (RST, SO_LINGER 0) while a bulk thread holds the other direction and
    waits for its source to send more (the lane's linger): the abort wakes the thread, which
    hands the direction back as drained; the pump must end it, not park it. Issue 15 item 3:
    such connections never ended, and their slots and fds leaked until max_connections was
    spent. The linger is stretched and the quantum made unreachable, so every reset lands in
    that wait."""
    monkeypatch.setattr(offload_module, "LINGER_MS", 60_000)
    size = 1_000_003
    rounds = 6
    gate = Gate()
    with Server(gate) as upstream:
        try:
            fw = forwarder_factory(upstream.address, bulk_threads=1, buffer_size=SMALL, max_connections=2)
            fw._context.offload._quantum = 1 << 30  # white box: one job takes the whole stream
            baseline = None
            for i in range(1, rounds + 1):
                client = connect(fw.address)
                server = gate.get()
                # the direction that goes to the thread, and who resets at the end
                source, sink = (server, client) if side == "client" else (client, server)
                data = payload(size, seed=i)
                source.sendall(data)
                assert recv_exactly(sink, size) == data
                _wait_for_thread_stall(fw)  # lingering for more from the source
                reset(sink)
                try:  # the source stays open and silent: only the abort can end the connection
                    forwarder_factory.wait_closed(fw, accepted=i, timeout=10)
                finally:
                    source.close()
                assert forwarder_factory.records[-1].outcome is Outcome.RESET
                assert forwarder_factory.records[-1].error.startswith(f"{side} reset: ")
                if baseline is None:  # the lane's own fds (its eventfd, splice's pipes) are made
                    baseline = _fds()
            stats = fw.statistics()
            assert stats.active == 0 and stats.accepted == rounds
            assert _fds() <= baseline, "fds leaked"
            # with max_connections 2 the proxy still answers: no slot leaked
            client = connect(fw.address)
            server = gate.get()
            client.sendall(b"still here")
            assert recv_exactly(server, 10) == b"still here"
            client.close()
            server.close()
        finally:
            gate.release()


@pytest.mark.parametrize("side", ["client", "upstream"])
def test_a_reset_a_thread_met_first_is_not_passed_on_as_eof(forwarder_factory, monkeypatch, side):
    """The side resets while a thread splices bulk to it and the other direction is parked
    on the same socket. A socket reports its error once: when the thread takes it, the hub's
    read of that socket finds only the end of the stream, which must not pass on as a clean
    EOF (a FIN to the other peer, which then reads a clean end instead of a reset). Forced:
    the hub is held until the thread has met the reset, and the thread until the hub has
    read the socket."""
    met, go_on = threading.Event(), threading.Event()
    splice = offload_module.Offload._splice

    def splice_then_wait_on_error(self, lane, *job):
        try:
            return splice(self, lane, *job)
        except BaseException:
            met.set()
            go_on.wait(TIMEOUT)
            raise
    monkeypatch.setattr(offload_module.Offload, "_splice", splice_then_wait_on_error)
    gate = Gate()
    with Server(gate) as upstream:
        try:
            fw = forwarder_factory(upstream.address, bulk_threads=1, buffer_size=SMALL)
            client = connect(fw.address)
            server = gate.get()
            resetter, pusher = (client, server) if side == "client" else (server, client)
            block = b"b" * 65536
            pusher.settimeout(0.2)
            try:
                while True:  # until the thread waits for the resetter to take bytes
                    pusher.sendall(block)
            except socket.timeout:
                pass
            _wait_for_thread_stall(fw)
            (conn,) = fw._context.active.values()
            held, release = threading.Event(), threading.Event()

            def hold():
                held.set()
                release.wait(TIMEOUT)  # blocks the hub's thread: nothing on the hub runs
            holder = threading.Thread(target=fw._on_hub, args=(hold,))
            holder.start()
            try:
                assert held.wait(TIMEOUT)
                reset(resetter)
                assert met.wait(TIMEOUT), "the thread never met the reset"
            finally:
                release.set()
                holder.join(TIMEOUT)
            try:  # the hub reads the socket the thread took the error from
                deadline = time.monotonic() + TIMEOUT
                while not (conn._eof_count or conn.outcome):  # white box, read across threads
                    assert time.monotonic() < deadline, "the hub never read the reset socket"
                    time.sleep(0.001)  # sleep-ok: polling another thread's state with a deadline
            finally:
                go_on.set()
            pusher.settimeout(TIMEOUT)
            with pytest.raises(ConnectionResetError):
                recv_all(pusher)
            pusher.close()
            forwarder_factory.wait_closed(fw, accepted=1)
            record = forwarder_factory.records[-1]
            assert record.outcome is Outcome.RESET and record.error.startswith(f"{side} reset: "), record
        finally:
            go_on.set()
            gate.release()


@pytest.mark.timeout(60)
def test_bulk_streams_take_turns_in_a_lane_slower_than_the_event_loop(forwarder_factory, monkeypatch):
    """Three bulk streams, one lane, and a lane that works slower than the event loop, as a
    thread at nice +5 does on a loaded machine: the streams must still share the bandwidth.
    When a job that found every lane busy spliced on the event loop instead, the stream in the
    lane was resumed by its own pump quantum after quantum while the others went at the event
    loop's pace: it starved (a flaky test_parallel_bulk_streams_share_the_bandwidth on a busy
    machine). Every bulk job now waits for a lane in turn."""
    splice = offload_module.Offload._splice

    def slow_splice(self, lane, *job):
        time.sleep(0.002)  # sleep-ok: the lane gets less CPU than the event loop
        return splice(self, lane, *job)
    monkeypatch.setattr(offload_module.Offload, "_splice", slow_splice)
    holder = {}

    def forwarder(target):
        fw = holder["fw"] = forwarder_factory(target, bulk_threads=1, buffer_size=SMALL)
        return fw.address
    goal = 32 << 20
    received = bulk_streams(forwarder, 3, goal)
    assert min(received) >= goal // 4, sorted(received)
    forwarder_factory.wait_closed(holder["fw"], accepted=3)


class _Endless:
    """Upstream that sends an endless stream until told to stop (or the socket fails)."""

    def __init__(self):
        self.stop = threading.Event()
        self.socks = []

    def __call__(self, sock):
        self.socks.append(sock)
        block = b"e" * (1 << 20)
        try:
            while not self.stop.is_set():
                sock.sendall(block)
        except OSError:
            pass


@pytest.mark.timeout(60)
def test_a_client_that_does_not_read_does_not_keep_the_lane_from_others(forwarder_factory, monkeypatch):
    """The only lane splices for a client that stopped reading, waiting for it to take bytes,
    when another bulk connection wants a lane: the stalled job hands over (the rest of its
    chunk is written by the event loop when the client reads again) and the other's bytes all
    arrive, while the stalled connection stays open and loses nothing."""
    sizes = {b"stal": 48_000_013, b"goes": 12_000_017}  # the first is more than the buffers hold
    waits_for_destination = threading.Event()
    wait = offload_module.Offload._wait

    def noting_wait(lane, fd, events, timeout_ms):
        if events == select.POLLOUT:
            waits_for_destination.set()
        return wait(lane, fd, events, timeout_ms)
    monkeypatch.setattr(offload_module.Offload, "_wait", staticmethod(noting_wait))

    def upstream_serve(sock):
        kind = recv_exactly(sock, 4)
        sock.sendall(payload(sizes[kind], seed=len(kind) + sizes[kind]))
        sock.shutdown(socket.SHUT_WR)
        recv_all(sock)

    with Server(upstream_serve) as upstream:
        fw = forwarder_factory(upstream.address, bulk_threads=1, buffer_size=SMALL)
        stalled = connect(fw.address, timeout=TIMEOUT * 2)
        stalled.sendall(b"stal")
        assert waits_for_destination.wait(TIMEOUT), "the lane never waited for the stalled client"
        (stalled_id,) = [c.id for c in fw.connections()]
        other = connect(fw.address)
        other.sendall(b"goes")
        assert recv_all(other, 1 << 20) == payload(sizes[b"goes"], seed=4 + sizes[b"goes"])
        other.close()
        assert stalled_id in [c.id for c in fw.connections()], "the stalled connection ended"
        assert recv_all(stalled, 1 << 20) == payload(sizes[b"stal"], seed=4 + sizes[b"stal"])
        stalled.close()
        forwarder_factory.wait_closed(fw, accepted=2)
    assert [r.outcome for r in forwarder_factory.records] == [Outcome.EOF, Outcome.EOF]


@pytest.mark.timeout(60)
def test_an_abort_reaches_a_connection_that_handed_its_lane_over_mid_chunk(forwarder_factory):
    """A client stopped reading while the only lane spliced for it; another bulk connection
    took the lane, and the rest of the stalled chunk waits, on the event loop, for the client to
    read. Aborting the stalled connection then ends it at once (both sides reset), not never.
    The stalled path's buffers are made small and fixed (no autotuning), so the client's
    socket never has room again."""
    go = threading.Event()

    def upstream_serve(sock):
        kind = recv_exactly(sock, 4)
        if kind == b"stal":
            go.wait(TIMEOUT)
        try:
            sock.sendall(b"s" * (8 << 20))
        except OSError:
            pass

    with Server(upstream_serve) as upstream:
        try:
            fw = forwarder_factory(upstream.address, bulk_threads=1, buffer_size=SMALL)
            offload = fw._context.offload  # white box
            stalled = socket.socket()
            stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            stalled.settimeout(TIMEOUT)
            stalled.connect(fw.address)
            stalled.sendall(b"stal")
            deadline = time.monotonic() + TIMEOUT
            while not fw._context.active:
                assert time.monotonic() < deadline, "never accepted"
                time.sleep(0.01)  # sleep-ok: polling a white-box state with a deadline
            (conn,) = fw._context.active.values()
            go.set()
            _wait_for_thread_stall(fw)
            # white box: what the socket holds already is more than that, so it stays unwritable
            conn.client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            other = connect(fw.address)
            other.sendall(b"goes")
            assert len(recv_all(other, 1 << 20)) == 8 << 20
            other.close()
            while not offload._finishing:  # the stalled job handed over; its rest waits on the hub
                assert time.monotonic() < deadline, "the stalled job never handed its lane over"
                time.sleep(0.01)  # sleep-ok: polling a white-box state with a deadline
            assert fw.abort_connection(conn.id)
            # ends while its client still reads nothing (a read would wake the wait by itself)
            forwarder_factory.wait_closed(fw, accepted=2)
            with pytest.raises(ConnectionResetError):
                recv_all(stalled, 1 << 20)
            stalled.close()
        finally:
            go.set()
    outcomes = {r.id: r.outcome for r in forwarder_factory.records}
    assert outcomes[conn.id] is Outcome.RESET
    assert not offload._finishing


def test_a_job_waiting_for_a_lane_ends_when_its_connection_is_aborted(forwarder_factory, monkeypatch):
    """While the only lane is busy, a second bulk connection waits for it; aborting that one
    ends it at once, not when the lane comes free, and the busy one goes on unharmed."""
    hold, held = threading.Event(), threading.Event()
    splice = offload_module.Offload._splice
    first = []

    def splice_holding_the_first(self, lane, conn, *job):
        if not first:
            first.append(conn)
        if conn is first[0] and not hold.is_set():
            held.set()
            hold.wait(TIMEOUT)  # the lane stays busy with the first connection meanwhile
        return splice(self, lane, conn, *job)
    monkeypatch.setattr(offload_module.Offload, "_splice", splice_holding_the_first)
    endless = _Endless()
    with Server(endless) as upstream:
        try:
            fw = forwarder_factory(upstream.address, bulk_threads=1, buffer_size=SMALL)
            busy = connect(fw.address)
            assert held.wait(TIMEOUT)
            waiting = connect(fw.address)
            deadline = time.monotonic() + TIMEOUT
            while not fw._context.offload._queue:  # white box: the second job waits for the lane
                assert time.monotonic() < deadline, "the second connection never waited for a lane"
                time.sleep(0.01)  # sleep-ok: polling a white-box state with a deadline
            (waiting_id,) = [c.id for c in fw.connections() if c.id != first[0].id]
            assert fw.abort_connection(waiting_id)
            with pytest.raises(ConnectionResetError):
                recv_all(waiting)
            waiting.close()
            assert not fw._context.offload._queue
            assert fw.statistics().active == 1
        finally:
            hold.set()
            endless.stop.set()
        busy.close()
        forwarder_factory.wait_closed(fw, accepted=2)
    outcomes = {r.id: r.outcome for r in forwarder_factory.records}
    assert outcomes[waiting_id] is Outcome.RESET
