"""Process-wide hooks that keep forwarders from outliving their owner: at exit, and after fork.

Typical use (``gproxy.forwarder`` is the only caller; nothing here knows a forwarder's
insides beyond ``stop()`` and ``_inert_after_fork()``)::

    from gproxy import _lifecycle

    _lifecycle.started.add(forwarder)          # made inert in a child after fork()
    _lifecycle.stop_at_exit.register()         # once a forwarder runs in a thread of its own
    _lifecycle.in_threads.add(forwarder)       # stopped before the interpreter exits
    ...
    _lifecycle.destroy_hub(gevent.get_hub())   # a thread that served ends its hub cleanly
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from typing import TYPE_CHECKING

import gevent

if TYPE_CHECKING:  # for annotations only: the forwarder imports this module, never the reverse
    from gproxy.forwarder import Forwarder

__all__ = ["in_threads", "started", "stop_at_exit", "destroy_hub"]

log = logging.getLogger(__name__)


#: forwarders running in a thread of their own, stopped before the interpreter exits
in_threads: "set[Forwarder]" = set()

#: every forwarder started in this process, made inert in a child after fork()
started: "weakref.WeakSet[Forwarder]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A forked child gets copies of every listening and connected socket. Serving them there
    would steal clients and bytes from the parent, and merely keeping them open would keep
    them alive after the parent closes them (clients connect to a stopped forwarder and hang;
    an aborted connection is never reset). So the child closes its copies, which leaves the
    parent's sockets as they are (no shutdown, no SO_LINGER: those would act on the shared
    socket), and its forwarders are stopped: they belong to the parent."""
    in_threads.clear()
    for forwarder in list(started):
        try:
            forwarder._inert_after_fork()
        except Exception:  # a child must get on with its own work
            log.debug("making %r inert after fork", forwarder, exc_info=True)
    started.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _StopAtExit:
    """Stops the forwarders still running in their threads when the program exits without
    stop(): at once, aborting their connections (there is no one left to drain them for).

    The hub of a daemon thread must not be running when the interpreter finalises: greenlet
    switches there touch objects finalisation frees, and the process died with SIGSEGV
    (issue 11). ``threading._register_atexit`` runs before threads are joined or frozen;
    plain ``atexit`` (later, still before finalisation) is the fallback without it."""

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
        for forwarder in list(in_threads):
            try:
                forwarder.stop(timeout=0)
            except Exception:  # exiting: one forwarder's trouble must not keep the others running
                log.exception("stopping %r at exit", forwarder)


stop_at_exit = _StopAtExit()


def destroy_hub(hub) -> None:
    """Destroy this thread's hub and its loop without leaking them.

    ``Hub.destroy`` leaves the hub greenlet parked mid-throw of a LoopExit whose
    traceback pins this thread's frames in a cycle the GC cannot see (gevent
    #1601; the fix in #1604 needs the hub switched to once more). Throwing
    GreenletExit into it lets it finish, and everything it held is freed.
    """
    # A resolver call stuck in the hub's thread pool (relay gave up waiting for it) would make
    # destroy() wait for that thread for ever (ThreadPool.kill joins its workers). Leave such
    # a pool and its loop to the garbage collector instead: the worker reports to the loop
    # when its call returns, so the loop must outlive it; idle workers are told to exit.
    pool = getattr(hub, "_threadpool", None)
    stuck = pool is not None and pool.task_queue.unfinished_tasks > 0
    if stuck:
        hub._threadpool = None
        for _ in range(pool.size):
            pool.task_queue.put(None)
    hub.destroy(destroy_loop=not stuck)
    try:
        hub.throw(gevent.GreenletExit)
    except BaseException:  # it ends one way or another; nothing is left to run
        pass
