"""The gevent behaviours gproxy relies on beyond gevent's documented API, one test each.

Each relied-on behaviour has one home, in ``gproxy/_gevent.py``, whose docstrings say what it
takes from gevent and since when. These tests assert that the installed gevent still behaves
so: before raising the bound in requirements.txt, run this file on the new release; a
behaviour that changed fails its own test here, named after it, rather than a connection in
production. Most run on this test's own hub (this process is not patched); what only shows
after ``patch_all()`` runs in a subprocess.
"""

from __future__ import annotations

import _socket
import gc
import json
import os
import socket
import subprocess
import sys
import threading
import time
import weakref

import gevent
import gevent.event
import gevent.socket
import pytest
from gevent.pywsgi import WSGIServer
from greenlet import getcurrent, greenlet

from gproxy import _gevent
from peers import TIMEOUT

READ, WRITE = 1, 2


class Stop(Exception):
    """What the tests throw into a waiting greenlet."""


@pytest.fixture
def hub():
    return gevent.get_hub()


@pytest.fixture
def pair():
    """A connected socket pair: ``a``'s readable watcher fires once ``b`` sends."""
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


@pytest.fixture
def watchers(hub):
    """Makes watchers and closes them before the sockets (libev must not watch a closed fd)."""
    made = []

    def make(fd, events=READ):
        watcher = hub.loop.io(fd, events)
        made.append(watcher)
        return watcher
    yield make
    for watcher in made:
        watcher.close()


def callbacks_run(hub):
    """Return once every callback scheduled on ``hub`` before this call has run (they run in
    order): a greenlet just spawned then waits where it first blocked."""
    done = gevent.event.Event()
    hub.loop.run_callback(done.set)
    assert done.wait(TIMEOUT)


class Owner:
    """Stands for a connection: its ``outcome`` tells ``waiter`` not to wait."""
    outcome = None

    def method(self):
        pass


# -- waiting on watchers ----------------------------------------------------------------------

def test_hub_switch_returns_what_the_greenlet_is_switched_in_with(hub):
    """_greenlets receives its jobs, offload its lane's answer, every wait its watcher's value
    this way: hub.switch() from a greenlet returns the arguments of the switch into it."""
    got = []

    def job():
        got.append(hub.switch())

    worker = greenlet(job, hub)  # run from hub callbacks, as _greenlets.Workers runs its jobs
    done = gevent.event.Event()
    hub.loop.run_callback(worker.switch)  # it waits in hub.switch() after this
    hub.loop.run_callback(lambda: (worker.switch(len, ("ab",)), done.set()))
    assert done.wait(TIMEOUT)
    assert got == [(len, ("ab",))]


def test_watcher_keeps_its_callback_until_stopped(hub, pair, watchers):
    """A watcher's ``callback`` is what it was started with (its ``__self__`` the greenlet for
    a greenlet's switch, the object for a method) and None once stopped: how a waiter, or a
    parked pump, is found from its watcher."""
    readable = watchers(pair[0].fileno())
    current, owner = getcurrent(), Owner()
    readable.start(current.switch)
    assert readable.active and readable.callback.__self__ is current
    assert _gevent.waiting_greenlet(readable) is current
    readable.stop()
    assert not readable.active and readable.callback is None
    assert _gevent.callback_owner(readable) is None and _gevent.waiting_greenlet(readable) is None
    readable.start(owner.method)
    assert readable.callback.__self__ is owner and _gevent.callback_owner(readable) is owner
    assert _gevent.waiting_greenlet(readable) is None
    readable.close()
    assert not readable.active


def test_waiter_returns_when_its_watcher_fires_and_stops_it(hub, pair, watchers):
    owner = Owner()
    readable = watchers(pair[0].fileno())
    pair[1].send(b"x")
    wait = _gevent.waiter(hub, owner, Stop)
    with gevent.Timeout(TIMEOUT):
        wait(readable)
    assert not readable.active
    owner.outcome = "aborted"
    with pytest.raises(Stop):
        wait(readable)  # an abort that came while the pump was not waiting
    assert not readable.active


def test_wait_any_tells_a_watcher_from_its_timeout(hub, pair, watchers):
    readable, timers = watchers(pair[0].fileno()), []
    assert _gevent.wait_any(hub, [readable], 0.001, timers) is False
    assert not readable.active and timers == []
    pair[1].send(b"x")
    assert _gevent.wait_any(hub, [readable], TIMEOUT, timers) is True
    assert not readable.active and timers == []


def test_wait_any_counts_its_timeout_from_now(hub, pair, watchers):
    """A pass of the loop that took long (a blocking hook, a busy pump) must not shorten a
    toxic's delay: the loop's clock is read again before the timer starts."""
    readable = watchers(pair[0].fileno())
    pair[1].send(b"x")
    result = gevent.event.AsyncResult()

    def stalled_then_wait():
        # woken by an io watcher, as a pump is (gevent reads the clock again for a timer
        # started from a callback, not from a watcher's)
        _gevent.wait_any(hub, [readable])
        _gevent.real_sleep(0.2)  # sleep-ok: a pass of the loop that blocks for a while
        started = time.monotonic()
        fired = _gevent.wait_any(hub, [], 0.1)
        result.set((fired, time.monotonic() - started))
    gevent.spawn(stalled_then_wait)
    fired, waited = result.get(timeout=TIMEOUT)
    assert fired is False and waited >= 0.09


def test_cancel_wait_throws_into_the_greenlet_waiting_on_the_watcher(hub, pair, watchers):
    """What aborts a pump: the exception is thrown, on the hub's next pass, into the greenlet
    whose switch the watcher calls; the wait stops its watcher on the way out."""
    readable = watchers(pair[0].fileno())
    timers = []

    def pump():
        with pytest.raises(Stop):
            _gevent.wait_any(hub, [readable], TIMEOUT, timers)
        return "stopped"
    waiting = gevent.spawn(pump)
    callbacks_run(hub)  # it waits now
    assert _gevent.waiting_greenlet(readable) is waiting and len(timers) == 1
    _gevent.cancel_wait(hub, timers[0], Stop())  # through its timer, as an abort finds a toxic's wait
    assert waiting.get(timeout=TIMEOUT) == "stopped"
    assert not readable.active and timers == []


def test_cancel_wait_spares_a_watcher_that_a_method_took_over(hub, pair, watchers):
    """gevent's cancel_wait would call ``Owner.throw`` (an AttributeError in the hub: issue 15's
    parking race); ours looks again when it runs and finds no greenlet waiting."""
    readable = watchers(pair[0].fileno())
    owner = Owner()
    readable.start(getcurrent().switch)
    _gevent.cancel_wait(hub, readable, Stop())  # scheduled while a greenlet's switch is there
    readable.stop()
    readable.start(owner.method)  # parked meanwhile: the callback is a method now
    callbacks_run(hub)  # the cancel's among them; no_greenlet_died fails the test on a hub error
    assert _gevent.callback_owner(readable) is owner
    assert _gevent.throw_into_waiter(readable, Stop()) is False


# -- serving ----------------------------------------------------------------------------------

class _Recorder(_gevent.InlineServer):
    """Accepts raw, hands (client socket, address, extra) to do_handle on the hub."""

    def __init__(self, listener):
        super().__init__(listener, self._handle)
        self.handled = []
        self.full_asked = gevent.event.Event()
        self.is_full = False
        self.event = gevent.event.Event()

    def full(self):
        self.full_asked.set()
        return self.is_full

    def do_read(self):
        try:
            fd, address = _gevent.accept_raw(self.socket)
        except BlockingIOError:
            return None
        return socket.socket(self.family, socket.SOCK_STREAM, 0, fd), address, "extra"

    def _handle(self, client, address, extra):
        self.handled.append((client, address, extra, getcurrent() is gevent.get_hub()))
        self.event.set()


def _listener():
    sock = gevent.socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    return sock


def test_stream_server_hands_each_do_read_tuple_to_do_handle_on_the_hub():
    """The forwarder's server: whatever do_read returns is passed, unpacked, to do_handle, in
    the listener's callback on the hub (no greenlet per client); nothing closes it after."""
    server = _Recorder(_listener())
    server.start()
    try:
        with gevent.socket.create_connection(server.address) as client:
            assert server.event.wait(TIMEOUT)
            (accepted, address, extra, on_hub), = server.handled
            try:
                assert extra == "extra" and on_hub and address == client.getsockname()
                accepted.sendall(b"still open")
                assert client.recv(64) == b"still open"
            finally:
                accepted.close()
    finally:
        server.close()


def test_stream_server_asks_full_before_accepting_and_resumes(hub):
    """A full forwarder stops accepting (the kernel queues clients) and resumes when a slot frees."""
    server = _Recorder(_listener())
    server.is_full = True
    server.start()
    try:
        with gevent.socket.create_connection(server.address):
            assert server.full_asked.wait(TIMEOUT)
            assert server.handled == [] and server._watcher is None  # stopped accepting
            server.is_full = False
            server.resume_accepting()
            assert server.event.wait(TIMEOUT)
            server.handled[0][0].close()
        server.stop_accepting()
        server.close()
        server.resume_accepting()  # after close: stays closed
        assert not server.started and server._watcher is None
    finally:
        server.close()


@pytest.mark.parametrize("form", ["gevent", "unwrapped"])
def test_accept_raw_gives_an_fd_and_address_with_no_gevent_socket(form):
    """From a gevent socket (a listener made again by enable()) or the C socket inside it (what
    StreamServer.start() keeps as ``server.socket``)."""
    listener = _listener()
    try:
        accepting = listener if form == "gevent" else _gevent.unwrap(listener)
        with pytest.raises(BlockingIOError):
            _gevent.accept_raw(accepting)
        with gevent.socket.create_connection(listener.getsockname()) as client:
            gevent.socket.wait_read(listener.fileno(), TIMEOUT)
            fd, address = _gevent.accept_raw(accepting)
            try:
                assert isinstance(fd, int) and address == client.getsockname()
                assert os.get_blocking(fd)  # as accept(2) gives it: the caller sets what it needs
            finally:
                os.close(fd)
    finally:
        listener.close()


def test_unwrap_gives_the_interpreters_socket_inside_gevents():
    listener = _listener()
    try:
        real = _gevent.unwrap(listener)
        assert isinstance(real, _socket.socket) and not isinstance(real, gevent.socket.socket)
        assert real.fileno() == listener.fileno()
        plain = socket.socket()
        assert _gevent.unwrap(plain) is plain
        plain.close()
    finally:
        listener.close()


# -- the hub's thread pool and its end --------------------------------------------------------

def _in_own_hub(func):
    """Run func() in a new OS thread with a hub of its own; return what it returned."""
    box = []
    thread = threading.Thread(target=lambda: box.append(func()), daemon=True)
    thread.start()
    thread.join(TIMEOUT)
    assert not thread.is_alive(), "the thread did not end"
    return box[0]


def test_hub_keeps_its_threadpool_as__threadpool_made_on_first_use():
    def check():
        hub = gevent.get_hub()
        before = hub._threadpool
        pool = hub.threadpool
        result = (before, pool is hub._threadpool)
        _gevent.destroy_hub(hub)
        return result
    assert _in_own_hub(check) == (None, True)


def test_a_pool_task_counts_as_unfinished_until_it_returns():
    release = _gevent.real_lock()
    release.acquire()

    def check():
        hub = gevent.get_hub()
        pool = hub.threadpool
        result = pool.spawn(release.acquire)
        running = pool.task_queue.unfinished_tasks
        release.release()
        result.get(timeout=TIMEOUT)
        done = pool.task_queue.unfinished_tasks
        _gevent.destroy_hub(hub)
        return running, done
    assert _in_own_hub(check) == (1, 0)


def test_a_greenlet_waiting_on_the_pool_can_be_thrown_out():
    """relay gives up on a stuck resolver call by throwing into the greenlet that waits for it."""
    release = _gevent.real_lock()
    release.acquire()

    def check():
        hub = gevent.get_hub()

        def resolve():
            try:
                hub.threadpool.apply(release.acquire)
            except Stop:
                return "given up"
        waiting = gevent.spawn(resolve)
        callbacks_run(hub)  # it runs until it waits for the pool
        hub.loop.run_callback(waiting.throw, Stop())
        result = waiting.get(timeout=TIMEOUT)
        release.release()  # the call returns in its thread, whenever
        _gevent.destroy_hub(hub)
        return result
    assert _in_own_hub(check) == "given up"


@pytest.mark.timeout(30)
def test_destroy_hub_does_not_wait_for_a_stuck_pool_call():
    release = _gevent.real_lock()
    release.acquire()

    def check():
        hub = gevent.get_hub()
        hub.threadpool.spawn(release.acquire)  # queued or running: unfinished either way
        _gevent.destroy_hub(hub)  # would join the stuck worker for ever
        return "destroyed"
    try:
        assert _in_own_hub(check) == "destroyed"
    finally:
        release.release()


def test_destroy_hub_frees_the_threads_objects():
    """gevent #1601: a destroyed hub pinned its thread's frames in a cycle; none may be left."""
    refs = []

    def check():
        hub = gevent.get_hub()

        class Marker:
            pass
        marker = Marker()
        refs.append(weakref.ref(marker))
        refs.append(weakref.ref(hub))
        callbacks_run(hub)  # the hub has run
        _gevent.destroy_hub(hub)
        return True
    assert _in_own_hub(check)
    gc.collect()
    assert [ref() for ref in refs] == [None, None]


# -- pywsgi ------------------------------------------------------------------------------------

class _Handler(_gevent.WSGIHandler):
    seen = []

    def client_error(self, exc):
        self.seen.append(exc)
        return b"HTTP/1.1 418 Bad\r\nConnection: close\r\nContent-Length: 4\r\n\r\nbad\n"


def _exchange(request: bytes) -> bytes:
    def app(environ, start_response):
        environ["wsgi.input"].read()
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]
    server = WSGIServer(("127.0.0.1", 0), app, handler_class=_Handler, log=None, error_log=None)
    server.start()
    try:
        with gevent.Timeout(TIMEOUT), gevent.socket.create_connection(server.address) as client:
            client.sendall(request)
            reply = b""
            while chunk := client.recv(65536):
                reply += chunk
            return reply
    finally:
        server.stop()


def test_pywsgi_answers_a_malformed_request_with_client_errors_response(capfd):
    _Handler.seen = []
    reply = _exchange(b"NONSENSE\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 418 Bad\r\n") and reply.endswith(b"\r\n\r\nbad\n")
    assert len(_Handler.seen) == 1 and isinstance(_Handler.seen[0], ValueError)
    assert "Traceback" not in capfd.readouterr().err


def test_pywsgi_reports_a_bad_body_to_client_error(capfd):
    """A malformed chunked body is read inside the application: pywsgi reports it to the same
    hook (where its default prints a traceback), then closes with its own 400."""
    _Handler.seen = []
    reply = _exchange(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n")
    assert reply.startswith(b"HTTP/1.1 400 ")
    assert len(_Handler.seen) == 1
    assert "Traceback" not in capfd.readouterr().err


# -- crossing OS threads, and a patched program -----------------------------------------------

def test_async_watcher_and_threadsafe_callback_reach_the_hub_from_another_thread(hub):
    """How offload's lanes report back and another thread's call reaches a forwarder's hub."""
    seen = []
    done = gevent.event.Event()

    def note(kind):
        seen.append((kind, getcurrent() is hub))
        if len(seen) == 2:
            done.set()
    wakeup = hub.loop.async_()
    wakeup.start(note, "async")
    try:
        def other_thread():
            wakeup.send()
            hub.loop.run_callback_threadsafe(note, "callback")
        _gevent.start_real_thread(other_thread, ())
        assert done.wait(TIMEOUT)
        assert sorted(seen) == [("async", True), ("callback", True)]
    finally:
        wakeup.close()


_PATCHED = r"""
import gevent.monkey
gevent.monkey.patch_all()
import _socket, json, select, socket, threading, time
import gevent.lock, gevent.socket
from gproxy import _gevent

lock = _gevent.real_lock()
lock.acquire()
got = []
local = _gevent.real_thread_local()
local.mark = "main"
def other():
    got.append(_gevent.thread_id())
    got.append(getattr(local, "mark", None))
    lock.release()
_gevent.start_real_thread(other, ())
acquired = lock.acquire(timeout=10)  # a real lock: released by another OS thread
print(json.dumps({
    "lock_is_real": acquired and type(lock) is not type(threading.Lock())
        and not isinstance(lock, gevent.lock.Semaphore),
    "thread_ids_differ": bool(got) and got[0] != _gevent.thread_id(),
    "local_per_thread": got[1:] == [None] and gevent.spawn(lambda: local.mark).get() == "main",
    "sleep_is_real": _gevent.real_sleep is not time.sleep,
    "poll_is_real": _gevent.real_poll is not getattr(select, "poll", None),
    "socket_is_real": _gevent.RealSocket is not socket.socket
        and not issubclass(_gevent.RealSocket, gevent.socket.socket),
    "c_socket_untouched": _socket.socket is not socket.socket
        and not issubclass(_socket.socket, gevent.socket.socket),
}))
"""


@pytest.fixture(scope="module")
def patched():
    """What the originals are in a program that called patch_all() first."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", _PATCHED], capture_output=True, text=True,
                            timeout=TIMEOUT, cwd=root)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_real_lock_and_threads_are_the_oss_in_a_patched_program(patched):
    assert patched["lock_is_real"] and patched["thread_ids_differ"]


def test_real_thread_local_is_per_os_thread_in_a_patched_program(patched):
    """relay's read buffers: one per OS thread, shared by the greenlets of its hub."""
    assert patched["local_per_thread"]


def test_real_sleep_poll_and_socket_are_the_originals_in_a_patched_program(patched):
    assert patched["sleep_is_real"] and patched["poll_is_real"] and patched["socket_is_real"]


def test_patch_all_leaves_the_c_socket_type_alone(patched):
    """_sockets.RawSocket is ``_socket.socket``: gevent patches ``socket``, never ``_socket``."""
    assert patched["c_socket_untouched"]
