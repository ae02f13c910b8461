"""What gproxy takes from gevent beyond its documented API, in one place.

Typical use::

    from gproxy import _gevent

    lock = _gevent.real_lock()                      # an OS lock, even after patch_all()
    wait = _gevent.waiter(hub, conn, Aborted)      # once per pump: wait(watcher) per chunk
    fired = _gevent.wait_any(hub, [readable], 5.0) # True: a watcher fired; False: time ran out
    _gevent.cancel_wait(hub, watcher, Aborted())   # later, on the hub: into its waiter, if any
    fd, address = _gevent.accept_raw(listener)     # no gevent socket made for the client
    class Server(_gevent.InlineServer): ...        # the handler runs on the hub, no greenlet
    _gevent.destroy_hub(hub)                       # a thread that served ends its hub cleanly

gproxy is built on gevent's event loop more than on its sockets: the pumps wait on libev
watchers of their own, the server hands raw sockets to its handler on the hub, a hub in a
thread of its own is torn down by hand. That takes a few things gevent does not document
(or documents as subject to change). Each is here, behind a name that says what gproxy needs,
with a docstring naming the gevent behaviour it relies on and since when; and each behaviour
has a test of its own in ``tests/test_gevent_contract.py``, so that a gevent release that
changes one fails that named test rather than a connection in production. Raising the
version bound in ``requirements.txt`` starts with running that test on the new release.

Nothing else in gproxy reaches into gevent's internals; the documented API (``loop.io``,
``loop.timer``, ``loop.run_callback``, ``gevent.spawn``...) is used where it is needed.

Used directly, on purpose (each covered by the contract test all the same):

- ``hub.switch()`` returning what the greenlet is next switched in with: ``_greenlets.Workers``
  receives its jobs that way and ``offload.Offload.run`` sleeps that way until its lane's
  async watcher switches it back. Both are a job hand-over on the path of every connection,
  where a helper would be one more Python call for a single switch. ``_hubthread._Call.result``
  waits so too, in a patched program, for a call handed to another thread's hub (an async
  watcher that thread sends to switches it back).
- ``greenlet.throw`` into a greenlet that waits for gevent's thread pool (the resolver):
  ``_dial.cancel`` gives up on a stuck resolver call that way; gevent's pool wait lets go,
  and the call finishes in its thread on its own. Plain greenlet API; only
  that gevent's wait tolerates it is gevent's, and the contract test checks it.

Why a module of its own, named so: ``_gevent`` reads as "gproxy's private view of gevent"
wherever it is called (``_gevent.cancel_wait(...)``), which says to the reader of a call site
that gevent's internals are involved and where their contract is written down.
"""

from __future__ import annotations

from typing import Iterable, List, Optional

from gevent import GreenletExit, monkey
from gevent.server import StreamServer
from greenlet import getcurrent, greenlet

__all__ = [
    "real_lock", "thread_id", "real_sleep", "start_real_thread", "real_thread_local", "real_poll",
    "RealSocket",
    "waiter", "wait_any", "waiting_greenlet", "callback_owner", "throw_into_waiter", "cancel_wait",
    "accept_raw", "unwrap", "InlineServer", "destroy_hub",
    "WSGIHandler",  # noqa: F822 (made on first use by the module's __getattr__, below)
]

# -- the real thing, patched or not ------------------------------------------------------------
#
# gevent.monkey.get_original is documented API (since gevent 1.0); these are named here so that
# there is one copy of each. After patch_all() the patched names give gevent's cooperative
# versions, which belong to the hub of one thread; these do not.

#: ``real_lock()``: a lock of the OS, for crossing between OS threads (a hub in a thread of its
#: own and its callers; offload's lanes). The patched one would block a greenlet, not a thread.
real_lock = monkey.get_original("_thread", "allocate_lock")
#: ``thread_id()``: the OS thread's id; patched, ``threading.get_ident`` gives a greenlet's.
thread_id = monkey.get_original("_thread", "get_ident")
#: ``real_sleep(seconds)``: sleeps the OS thread (a caller outside the hub's thread).
real_sleep = monkey.get_original("time", "sleep")
#: ``start_real_thread(func, args)``: an OS thread, whatever patching did to ``threading``.
start_real_thread = monkey.get_original("_thread", "start_new_thread")
#: ``real_thread_local()``: storage per OS thread; patched, ``threading.local`` is per greenlet.
real_thread_local = monkey.get_original("_thread", "_local")
#: ``real_poll()``: ``select.poll`` of the OS, for waiting in a thread that has no hub.
real_poll = monkey.get_original("select", "poll")
#: the standard library's ``socket.socket`` (blocking calls block the thread): for the odd
#: probe or datagram made outside the event loop.
RealSocket = monkey.get_original("socket", "socket")


# -- waiting on watchers -------------------------------------------------------------------------
#
# gproxy's greenlets wait on libev watchers directly, not through ``Hub.wait`` (which makes a
# Waiter per wait) or gevent's sockets: the watcher's callback is the waiting greenlet's own
# ``switch``. Two gevent behaviours make that work, and make the waiter findable:
#
# - ``hub.switch()`` from a greenlet returns what that greenlet is next switched in with
#   (``SwitchOutGreenletWithLoop.switch``, since gevent 1.0), so a watcher's callback
#   ``greenlet.switch(value)`` hands ``value`` to the wait;
# - a started watcher keeps its callback as given, readable as ``watcher.callback`` (a bound
#   method: its ``__self__`` is the greenlet, or the object whose method it is), and ``stop()``
#   sets it to None (since 1.0; libuv's watchers too, since they came in 1.3). A watcher whose
#   callback is a greenlet's ``switch`` is therefore started exactly while that greenlet waits
#   on it: every wait here stops its watchers before it returns or raises.
#
# ``Hub.cancel_wait`` (since 1.0; documented for waits made with ``Hub.wait``) throws into
# ``watcher.callback.__self__`` whatever that is when its callback runs: a watcher restarted
# meanwhile with an object's method gets ``object.throw`` called, an AttributeError printed by the
# hub. ``cancel_wait`` below looks again when it runs and throws only into a greenlet.


def waiter(hub, owner, aborted):
    """``wait(watcher)`` for the calling greenlet (a pump): start the watcher with this greenlet's
    switch, switch to the hub until the watcher fires, stop it. Raises ``aborted`` instead of
    waiting once ``owner.outcome`` is set (an abort that came while the caller was not waiting
    could not be thrown into it); an exception thrown into the wait stops the watcher and
    passes on. Everything is bound here, once per pump: the wait itself is the pump's
    per-chunk cost, with no call inside it but the watcher's and the switch."""
    switch, hub_switch = getcurrent().switch, hub.switch

    def wait(watcher) -> None:
        if owner.outcome is not None:
            raise aborted
        watcher.start(switch)
        try:
            hub_switch()
        finally:
            watcher.stop()
    return wait


def wait_any(hub, watchers: Iterable, timeout: Optional[float] = None,
             timers: Optional[List] = None) -> bool:
    """Wait in the calling greenlet until one of ``watchers`` fires (True) or ``timeout``
    seconds pass (False; None: no limit; 0: the next pass of the loop), counted from now, not
    from the start of the loop's pass (a long pass would cut it short; gevent reads the clock
    again for a timer started from a loop callback, not from a watcher's). Every watcher is
    stopped again before this returns or raises. The timer is appended to ``timers`` (if
    given) while the wait lasts, so that whoever keeps that list can ``cancel_wait`` through
    it: a wait for a time alone has no other watcher to be found by."""
    switch = getcurrent().switch
    timer = None
    if timeout is not None:
        hub.loop.update_now()
        timer = hub.loop.timer(timeout)
    started = []
    try:
        for watcher in watchers:
            watcher.start(switch, True)
            started.append(watcher)
        if timer is not None:
            if timers is not None:
                timers.append(timer)
            timer.start(switch, False)
        return hub.switch()
    finally:
        for watcher in started:
            watcher.stop()
        if timer is not None:
            timer.close()
            if timers is not None:
                try:
                    timers.remove(timer)
                except ValueError:
                    pass


def callback_owner(watcher):
    """The object whose bound method an active watcher calls (a greenlet waiting on it, or the
    object that parked it), else None."""
    if not watcher.active:
        return None
    return getattr(watcher.callback, "__self__", None)


def waiting_greenlet(watcher) -> Optional[greenlet]:
    """The greenlet waiting on this watcher now (its callback is that greenlet's switch), or None."""
    owner = callback_owner(watcher)
    return owner if isinstance(owner, greenlet) and not owner.dead else None


def throw_into_waiter(watcher, exc: BaseException) -> bool:
    """On the hub (a callback): throw ``exc`` into the greenlet waiting on ``watcher`` now, if
    one is; True if one was. Whatever else the watcher calls (a parked pump's method) is left
    alone. The greenlet runs until it waits again, then the hub goes on here."""
    waiting = waiting_greenlet(watcher)
    if waiting is None:
        return False
    waiting.throw(exc)
    return True


def cancel_wait(hub, watcher, exc: BaseException) -> None:
    """From any greenlet of ``hub``'s thread: on the hub's next pass, throw ``exc`` into the
    greenlet waiting on ``watcher`` then, if one is (``throw_into_waiter``); a watcher not
    started now is skipped at once. ``Hub.cancel_wait`` without its blind spot (see above)."""
    if watcher.callback is not None:
        hub.loop.run_callback(throw_into_waiter, watcher, exc)


# -- serving ------------------------------------------------------------------------------------


def accept_raw(listener):
    """Accept one client without making a gevent socket of it: ``(fd, address)``, the fd
    blocking as accept(2) returns it; BlockingIOError when no client is queued. ``listener`` is
    a gevent socket, or the interpreter's C socket that ``StreamServer.start()`` keeps as
    ``server.socket`` in its place (it unwraps it, since gevent 1.5). Relies on CPython's
    ``_accept`` method of its C socket (``socket.accept`` is built on it) and on gevent's socket
    passing ``_accept`` to the C socket it wraps (as gevent's own StreamServer accepts, since
    1.1 on Python 3). A Python call around the accept syscall, once per client."""
    return listener._accept()


def unwrap(sock):
    """The interpreter's C socket inside a gevent socket (``sock`` itself if it is none): closing
    it closes the fd without gevent's wrapper cancelling waits on a hub, which in a child after
    fork() may not be running. Relies on gevent's ``_sock`` attribute (since 1.0)."""
    return getattr(sock, "_sock", sock)


class InlineServer(StreamServer):
    """A StreamServer whose handler runs on the hub, in the listening socket's watcher callback:
    no greenlet per client, no socket closed after the handler (what ``do_read`` returns belongs
    to the handler from then on).

    Subclasses return any tuple from ``do_read`` and override ``do_handle(*that_tuple)``, which
    by default calls ``self.handle(*that_tuple)``. This relies on ``BaseServer._do_read``, the
    listener's callback, calling ``self.do_handle(*self.do_read())`` for each client, asking
    ``full()`` before each and stopping at a falsy ``do_read()`` (gevent 1.0 to today; the
    ``spawn`` argument's calling convention, which gproxy used before, changed in 1.1rc4)."""

    def do_handle(self, *args) -> None:
        self.handle(*args)

    def do_close(self, *args) -> None:
        """StreamServer's would close the client's socket; the handler owns it (gevent calls
        this only from the ``do_handle`` replaced above, so this is a guard)."""

    def resume_accepting(self) -> None:
        """Accept again after ``stop_accepting()``, unless the server was stopped meanwhile
        (gevent's own ``_start_accepting_if_started``, in public terms)."""
        if self.started:
            self.start_accepting()


# -- the hub's end -------------------------------------------------------------------------------


def destroy_hub(hub) -> None:
    """Destroy this thread's hub and its loop without leaking them.

    ``Hub.destroy`` left the hub greenlet parked mid-throw of a LoopExit whose traceback pins
    this thread's frames in a cycle the GC cannot see (gevent #1601; the fix in #1604, gevent
    20.5.1, still needs the hub switched to once more, and 26.9 still leaks without it).
    Throwing GreenletExit into it lets it finish, and everything it held is freed.

    A resolver call stuck in the hub's thread pool (relay gave up waiting for it) would make
    ``destroy()`` wait for that thread for ever (``ThreadPool.kill`` joins its workers). Such a
    pool and its loop are left to the garbage collector instead: the worker reports to the loop
    when its call returns, so the loop must outlive it; idle workers are told to exit. This
    relies on the hub keeping its pool, made on first use, as ``_threadpool`` (None until then:
    the ``threadpool`` property would make one); on the pool's ``task_queue`` counting a running
    task in ``unfinished_tasks``; and on a None task ending one idle worker (all since 1.0).
    """
    pool = getattr(hub, "_threadpool", None)
    stuck = pool is not None and pool.task_queue.unfinished_tasks > 0
    if stuck and pool is not None:  # (mypy cannot see that stuck implies a pool)
        hub._threadpool = None
        for _ in range(pool.size):
            pool.task_queue.put(None)
    hub.destroy(destroy_loop=not stuck)
    try:
        hub.throw(GreenletExit)
    except BaseException:  # it ends one way or another; nothing is left to run
        pass


# -- pywsgi ---------------------------------------------------------------------------------------


def __getattr__(name: str):
    """``WSGIHandler`` is made on first use: gevent.pywsgi takes ~20 ms to import, which a
    program that embeds a Forwarder and serves no HTTP should not pay."""
    if name != "WSGIHandler":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from gevent.pywsgi import WSGIHandler as PywsgiHandler

    class WSGIHandler(PywsgiHandler):
        """gevent.pywsgi's handler with bad client input (malformed HTTP, a stalled or vanished
        client) reported to ``client_error`` instead of pywsgi's ERROR lines and tracebacks.

        Relies on pywsgi calling ``_handle_client_error(exc)`` for such input (since gevent
        1.1b6, documented there as experimental) and, from ``handle_one_request``, sending the
        ``(status, raw response)`` it returns before closing, or just closing on None."""

        def client_error(self, exc: BaseException) -> Optional[bytes]:
            """The whole raw HTTP response to send before closing, or None to just close."""
            return None

        def _handle_client_error(self, ex):
            response = self.client_error(ex)
            if response is None:
                return None
            return response.split(b" ", 2)[1].decode("ascii"), response

    WSGIHandler.__qualname__ = "WSGIHandler"
    globals()["WSGIHandler"] = WSGIHandler
    return WSGIHandler
