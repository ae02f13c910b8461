"""Bare greenlets reused from job to job: handlers and pumps run in them.

Typical use (on the hub, as a watcher callback does)::

    workers = Workers(hub)
    workers.run(conn.run)          # in a worker, now; returns when it first waits
    workers.close()                # idle workers end; busy ones end after their job

A new greenlet costs about 12 us on CPython 3.11, most of it mapping and unmapping a
fresh frame stack (an mmap and a munmap per greenlet; strace showed three of each per
proxied connection); handing a job to an idle one costs about 1 us. At most ``keep``
idle workers are kept, so a burst does not pin memory for ever.

(Worker greenlets, in one hub; the ``--workers`` processes are ``_supervisor``'s.)
"""

from __future__ import annotations

from typing import Callable, List

from greenlet import getcurrent, greenlet

__all__ = ["Workers"]


class Workers:
    def __init__(self, hub, keep: int = 64):
        self.hub = hub
        self.keep = keep
        self.idle: List[greenlet] = []

    def run(self, func: Callable, *args) -> None:
        """Run ``func(*args)`` in a worker. Must be called on the hub (a callback); the call
        returns when the job first waits or ends."""
        worker = self.idle.pop() if self.idle else greenlet(self._work, self.hub)
        worker.switch(func, args)

    def spawn(self, func: Callable, *args) -> None:
        """Like run, from any greenlet of this hub: the job starts on the next loop pass."""
        self.hub.loop.run_callback(self.run, func, *args)

    def close(self) -> None:
        """End the idle workers (each switch back to the hub returns them a None job)."""
        self.keep = 0
        while self.idle:
            self.hub.loop.run_callback(self.idle.pop().switch, None, None)

    def _work(self, func, args) -> None:
        hub, idle = self.hub, self.idle
        while func is not None:
            func(*args)  # jobs handle their own errors; one that escapes ends this worker
            func = args = None
            if len(idle) >= self.keep:
                return
            idle.append(getcurrent())
            func, args = hub.switch()  # the next job (gevent behaviour used directly: see _gevent.py)
