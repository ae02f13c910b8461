"""Where a host's hub runs, and how any OS thread reaches it: one home for both.

A host is what serves on a gevent hub: a ``Forwarder``, a ``FileService``. It runs on the
calling thread's hub, or, in a program gevent has not patched, on a hub in a daemon thread
of its own, so that plain blocking code can go on beside it. Either way its objects belong
to that hub, and every other OS thread reaches them through ``call``.

Typical use (``gproxy.forwarder`` and ``gproxy._fileservice`` are the callers)::

    from gproxy._hubthread import HubEnded, HubHost

    host = HubHost()
    host.start(bind, name=lambda: "gproxy web", at_exit=lambda: owner.stop(timeout=0))
    host.call(change, *args)   # on that hub, from any OS thread: its result or its exception
    ...
    host.end()                 # the owner, on its hub, once it has stopped
    host.stop(owner_stop, 5)   # from anywhere: owner_stop(5) on the hub, then its thread joined

``start`` runs ``bind`` here when gevent patched ``socket`` (or ``here=True``), else in a
new thread (``thread=True``: a thread in any program, a real OS thread even where gevent
patched ``threading``); either way ``bind``'s exception is raised to the caller. A call
from another thread runs in a greenlet of the host's hub while the caller waits: on a real
lock, or, where gevent patched ``threading`` (the program's threads are greenlets of the
caller's hub, which a blocked OS thread would stall), on its own hub, woken by an async
watcher the host's thread sends to. A call never waits for a hub that will not run it: one
that had not begun when the owner ended the host raises :class:`HubEnded` (``began`` false:
it never ran), and so does one still running when the host's thread ended (``began`` true).

A hub in a thread of its own brings three duties, all kept here:

- at interpreter exit, hosts still running in their threads are stopped (``at_exit``)
  before finalisation: a hub running in a daemon thread then crashed the process (SIGSEGV:
  greenlet's bootstrap decref'ing a tuple mid-finalisation, issue 11);
- when the thread ends, its hub is destroyed without leaking it (``_gevent.destroy_hub``);
- in a child after ``fork()`` those threads are gone: their hosts are ended there.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Callable, List, Optional, Set, Union

import gevent
from gevent import getcurrent, monkey
from gevent.event import Event

from gproxy import _gevent

__all__ = ["HubEnded", "HubHost"]

log = logging.getLogger(__name__)

#: once the owner ended a thread host, how long its thread lets calls still running on its
#: hub finish (a second stop() racing the first one) before it ends and they are lost
_CALLS_GRACE = 1.0


class HubEnded(RuntimeError):
    """The host's hub ended before the call finished. ``began`` False: the call never ran
    (the owner had stopped), so the caller may run it elsewhere or report the host stopped;
    True: it was running on the hub when the host's thread ended, and what it did is unknown."""

    def __init__(self, began: bool):
        super().__init__("the hub ended while the call was running on it" if began
                         else "the hub ended before the call could run on it")
        self.began = began


_QUEUED, _RUNNING, _DONE = "queued", "running", "done"


class _Call:
    """One call handed to the host's hub; ``result()`` waits for it."""

    __slots__ = ("func", "args", "state", "ok", "value", "_done", "_guard", "_wake")

    def __init__(self, func: Callable, args: tuple):
        self.func, self.args = func, args
        self.state = _QUEUED
        self.ok: bool = False
        self.value: Any = None
        self._done = _gevent.real_lock()
        self._done.acquire()
        #: held while ``_wake`` is sent to or closed, so it is never sent to once closed
        self._guard = _gevent.real_lock()
        #: the async watcher of a caller waiting on its own hub, else None
        self._wake: Any = None  # a gevent async watcher while a caller waits

    def settle(self, ok: bool, value: Any) -> None:
        """Under the host's lock, once: the answer, and the waiting caller woken."""
        with self._guard:
            self.state, self.ok, self.value = _DONE, ok, value
            self._done.release()
            if self._wake is not None:
                self._wake.send()  # libev's async send: the one watcher call safe from any thread

    def result(self) -> Any:
        hub = _cooperative_hub()
        if hub is None:
            self._done.acquire()  # interruptible: Ctrl-C in the waiting thread still works
        else:
            # Patched: the other greenlets of this thread go on while the call runs (a drain
            # waits for clients that may be greenlets here).
            with self._guard:
                if self.state is not _DONE:
                    self._wake = hub.loop.async_()  # referenced: the loop waits for it
                    self._wake.start(getcurrent().switch)
            try:
                while not self._done.acquire(False):
                    hub.switch()
            finally:
                with self._guard:
                    if self._wake is not None:
                        self._wake.close()
                        self._wake = None
        if self.ok:
            return self.value
        raise self.value


def _cooperative_hub() -> Any:
    """The calling thread's hub when a caller should wait for a call on it rather than block
    its OS thread: gevent patched ``threading`` (the program's threads are greenlets, stalled
    by a blocked OS thread) and the caller is not that hub itself. Else None."""
    if not monkey.is_module_patched("threading"):
        return None
    hub = gevent.get_hub()
    return None if getcurrent() is hub else hub


class _OSThread:
    """A daemon OS thread that gevent's patching cannot make a greenlet of (patched,
    ``threading.Thread`` starts greenlets): what a host's hub runs in when a patched program
    asks for a thread. It has the members of ``threading.Thread`` hosts use."""

    def __init__(self, target: Callable[[], None], name: str):
        self.name = name
        self._target = target
        self._started = self._finished = False
        self._ended = _gevent.real_lock()  # released when the thread ends
        self._ended.acquire()

    def start(self) -> None:
        self._started = True
        _gevent.start_real_thread(self._run, ())

    def _run(self) -> None:
        try:
            self._target()
        finally:
            self._finished = True
            self._ended.release()

    def is_alive(self) -> bool:
        return self._started and not self._finished

    def join(self, timeout: Optional[float] = None) -> None:
        if not self._started:
            raise RuntimeError("cannot join a thread before it is started")
        if self._ended.acquire(True, -1 if timeout is None else timeout):
            self._ended.release()


class HubHost:
    """Where one host serves: the hub, its OS thread, and the thread when it is its own.

    ``hub`` (``None`` until started): the hub the host's objects belong to. ``thread_id``
    (``None`` until started): the OS thread that runs it. ``thread`` (``None`` unless the
    host runs in a thread of its own): that ``threading.Thread`` (patched, an ``_OSThread``),
    named ``name()``."""

    def __init__(self) -> None:
        self.hub: Any = None  # gevent's Hub (gevent has no type information)
        self.thread_id: Optional[int] = None
        self.thread: Optional[Union[threading.Thread, _OSThread]] = None
        self._lock = _gevent.real_lock()  # guards _ended and every call's state
        self._pending: Set[_Call] = set()
        self._ended = False
        self._finished: Optional[Event] = None      # thread mode: end() lets the thread end
        self._running = 0                           # thread mode: calls running on the hub
        self._calls_done: Optional[Event] = None    # thread mode: set while none runs
        self._at_exit: Optional[Callable[[], None]] = None

    # -- where -------------------------------------------------------------------------

    def here(self) -> bool:
        """Whether the calling OS thread is the hub's, or the host has no hub yet."""
        return self.hub is None or _gevent.thread_id() == self.thread_id

    def start(self, start: Callable[[], None], *, here: bool = False, thread: Optional[bool] = None,
              name: Callable[[], str], at_exit: Callable[[], None]) -> None:
        """``start()`` on this thread's hub when gevent patched ``socket`` or ``here`` is true,
        else on the hub of a new daemon thread (``start_in_thread``). ``thread`` decides
        instead when not None: True, a thread of its own; False, this thread's hub."""
        if thread is not None:
            here = not thread
        elif monkey.is_module_patched("socket"):
            here = True
        if here:
            self.start_here(start)
        else:
            self.start_in_thread(start, name=name, at_exit=at_exit)

    def start_here(self, start: Callable[[], None]) -> None:
        """Serve on the calling thread's hub: ``start()`` now. If it raises, the host is ended
        until started again (a service retries a forwarder that could not listen)."""
        self.hub, self.thread_id = gevent.get_hub(), _gevent.thread_id()
        self._ended = False
        try:
            start()
        except BaseException:
            self._ended = True
            raise

    def start_in_thread(self, start: Callable[[], None], *, name: Callable[[], str],
                        at_exit: Callable[[], None]) -> None:
        """Serve on the hub of a new daemon thread: ``start()`` runs there, and this returns
        once it has (its exception is raised here, after the thread has ended and its hub
        is destroyed). The thread is named ``name()``, asked again once ``start()`` has
        returned (a forwarder knows its real port then). It serves until the owner calls
        ``end()``; ``at_exit()`` stops the owner if the program exits first."""
        started = _gevent.real_lock()
        started.acquire()
        failure: List[BaseException] = []

        def main() -> None:
            hub = gevent.get_hub()
            self.hub, self.thread_id = hub, _gevent.thread_id()
            self._finished, self._calls_done = Event(), Event()
            self._calls_done.set()
            try:
                start()
                thread.name = name()
                _in_threads.add(self)
            except BaseException as exc:  # handed to the starting thread
                failure.append(exc)
                with self._lock:
                    self._ended = True
                _gevent.destroy_hub(hub)
                self._abandon_calls()
                return
            finally:
                started.release()
            # run_callback_threadsafe's own watcher does not keep a loop alive: this one does,
            # so a call handed over while nothing else is active still runs
            keepalive = hub.loop.async_()
            keepalive.start(_nothing)
            try:
                self._finished.wait()
                with gevent.Timeout(_CALLS_GRACE, False):
                    self._calls_done.wait()
            finally:
                _in_threads.discard(self)
                with self._lock:
                    self._ended = True  # no call is handed to this hub from now on
                keepalive.close()
                _gevent.destroy_hub(hub)
                self._abandon_calls()

        _stop_at_exit.register()
        self._at_exit = at_exit
        thread: Union[threading.Thread, _OSThread]
        if monkey.is_module_patched("threading"):
            thread = _OSThread(main, name())
        else:
            thread = threading.Thread(target=main, name=name(), daemon=True)
        self.thread = thread
        thread.start()
        started.acquire()
        if failure:
            thread.join()
            raise failure[0]

    # -- calls ---------------------------------------------------------------------------

    def call(self, func: Callable, *args: Any) -> Any:
        """``func(*args)`` on the host's hub, from any OS thread; its result, or its exception
        raised here. On the hub's own thread (or before start) it is a plain call. From
        another, it runs in a greenlet there, and this thread waits until it has finished;
        :class:`HubEnded` if the hub ends first."""
        if self.here():
            return func(*args)
        return self.submit(func, *args).result()

    def submit(self, func: Callable, *args: Any) -> _Call:
        """Hand ``func(*args)`` to the host's hub from another OS thread without waiting:
        ``.result()`` waits. :class:`HubEnded` at once if the hub has ended."""
        call = _Call(func, args)
        with self._lock:  # held while handing over: the thread cannot destroy the loop meanwhile
            if self._ended or (self.thread is not None and not self.thread.is_alive()):
                raise HubEnded(began=False)
            self._pending.add(call)
            self.hub.loop.run_callback_threadsafe(gevent.spawn, self._run, call)
        return call

    def _run(self, call: _Call) -> None:
        """On the hub, in a greenlet of its own."""
        with self._lock:
            if call.state is not _QUEUED:  # ended before it could begin
                return
            call.state = _RUNNING
        self._running += 1
        if self._calls_done is not None:
            self._calls_done.clear()
        try:
            ok, value = True, call.func(*call.args)
        except BaseException as exc:  # handed to the calling thread
            ok, value = False, exc
        finally:
            self._running -= 1
            if self._running == 0 and self._calls_done is not None:
                self._calls_done.set()
        with self._lock:
            if call.state is _RUNNING:  # else the thread ended meanwhile and said so
                self._pending.discard(call)
                call.settle(ok, value)

    # -- ending --------------------------------------------------------------------------

    def end(self) -> None:
        """The owner, on its hub, once it has stopped: calls that have not begun never will
        (their callers get ``HubEnded(began=False)``), nor will any handed over later. A
        host in a thread of its own lets running calls finish (for a second at most), then
        its thread ends and its hub is destroyed. Calling it again does nothing."""
        with self._lock:
            if self._ended:
                return
            self._ended = True
            for call in [c for c in self._pending if c.state is _QUEUED]:
                self._pending.discard(call)
                call.settle(False, HubEnded(began=False))
        if self._finished is not None:
            self._finished.set()

    def stop(self, stop: Callable, *args: Any) -> bool:
        """``stop(*args)`` (the owner's stop, which ends with ``end()``) on the host's hub from
        any OS thread; then, from a thread other than the host's own, wait until that thread
        has ended. False if the hub had ended without running it."""
        try:
            self.call(stop, *args)
            ran = True
        except HubEnded as exc:
            ran = exc.began
        self.join()
        return ran

    def join(self) -> bool:
        """Wait until the host's own thread has ended: True. False at once when it has none
        (it serves on a thread the program runs), or when called from that very thread."""
        thread = self.thread
        if thread is None or _gevent.thread_id() == self.thread_id:
            return False
        while thread.is_alive():
            thread.join(0.5)  # a bounded join keeps Ctrl-C working in the host program
        return True

    def _abandon_calls(self) -> None:
        """The thread has ended: whoever still waits is told, instead of waiting for ever."""
        with self._lock:
            self._ended = True
            for call in list(self._pending):
                call.settle(False, HubEnded(began=call.state is _RUNNING))
            self._pending.clear()

    def _forget_after_fork(self) -> None:
        """In a forked child: the thread did not survive, nor did any caller but this one."""
        self._lock = _gevent.real_lock()  # another thread may have held it at the fork
        self._ended = True
        self._pending.clear()


def _nothing() -> None:
    pass


#: hosts running in a thread of their own, stopped before the interpreter exits
_in_threads: "set[HubHost]" = set()


class _StopAtExit:
    """Stops the hosts still running in their threads when the program exits without
    stopping them: at once (``at_exit``, e.g. ``stop(timeout=0)``: no one is left to
    drain connections for). ``threading._register_atexit`` runs before threads are joined
    or frozen; plain ``atexit`` (later, still before finalisation) is the fallback."""

    def __init__(self) -> None:
        self._registered = False

    def register(self) -> None:
        if self._registered:
            return
        try:
            threading._register_atexit(self)  # type: ignore[attr-defined]
        except (AttributeError, RuntimeError):  # not CPython 3.9+, or exiting already
            import atexit
            atexit.register(self)
        self._registered = True

    def __call__(self) -> None:
        for host in list(_in_threads):
            try:
                if host._at_exit is not None:
                    host._at_exit()
            except Exception:  # exiting: one host's trouble must not keep the others running
                log.exception("stopping %s at exit", host.thread.name if host.thread else host)


_stop_at_exit = _StopAtExit()


def _after_fork_in_child() -> None:
    for host in list(_in_threads):
        host._forget_after_fork()
    _in_threads.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

