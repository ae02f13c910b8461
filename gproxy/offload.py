"""Bulk off the hub: a direction that moves full buffers is spliced by a real thread.

Typical use (``relay.pump`` does this once a direction turns out to be bulk)::

    offload = Offload(hub, splicer, threads=2)       # one per forwarder, made on its hub
    n = offload.run(conn, src_fd, dst_fd, direction, version, writable, wait)
    offload.wake(conn)                              # conn was aborted: let go at once
    offload.holds(conn)                             # a thread splices for conn now
    offload.close()                                 # when the forwarder stops

Why: one event loop shares one CPU between every connection. While a bulk stream
is spliced on the hub, a small message on another connection waits for the
chunk in progress and, when the machine is busy, for the whole time slice the
kernel gives the busy process. Splicing runs in the kernel with the GIL released,
so a thread can do it as well as the hub can, on another core, and the hub
stays a mostly sleeping thread that the kernel wakes at once for a small message.

A job splices until the source stays drained for ``LINGER_MS`` (``-1``; or, if the
whole job moved less than one buffer, that amount: small messages are back, and the
hub copies them), the source's EOF (``0``), or its quantum of bytes is spent or the
forwarder's toxics changed (the buffer size: the pump goes on, and asks again), or, while
another job waits, its destination stops taking bytes (the rest of that chunk is written
on the hub, which waits for the destination with its watcher; the buffer size). ``run``
waits for the job in the calling greenlet; whatever is thrown into that greenlet meanwhile
waits until the thread has let go of the file descriptors, so a socket is never closed under
a thread that splices into it.

Turns: at most ``threads`` jobs run at once, and a job that finds every lane busy waits
for one in a queue, first come first served; a lane that ends a job goes to the head of the
queue, not back to the job's own pump (which, if it has more, queues behind). While a job
waits, no lane lingers on a drained source nor waits on a destination that does not read:
it hands over. So every bulk direction gets the same service, a quantum at a time, in
turn. (Splicing on the hub when every lane was busy made two kinds of service: a stream
held by a lane was resumed by its own pump quantum after quantum, while the others went as
fast as the hub went; on a loaded machine the lanes, at nice +5, went 2-4 times slower, and
their streams starved.) ``run`` returns None, and the pump splices on the hub, only when no
lane can be had at all (no thread or fd to make one, or the forwarder is stopping).

Exceptions the splice raises (a reset, a broken pipe) are handed to the pump,
which applies the closing rules: a thread never prints a traceback.
"""

from __future__ import annotations

import os
import select
from collections import deque
from typing import Any, Deque, List, Optional

from greenlet import getcurrent

from gproxy import _gevent

__all__ = ["Offload", "STOPPED"]

#: what ``run`` returns when the connection was aborted while the thread held it
STOPPED = -2

#: buffers' worth of bytes one job may move before it gives its thread back (the pump then
#: asks again, behind any job that waits): 16, 4 MiB by default, a few ms of bulk.
QUANTUM = 16

#: how much lower than the process a bulk thread's priority is (nice levels; Linux sets
#: it per thread). Measured on 2 cores with an unpaced stream beside 64-byte round trips
#: (benchmarks/README.md): at +0 the round trips' p99 was 1.3-1.8 ms, at +5 to +15
#: 0.3-0.6 ms, with the stream's rate unchanged within noise: the stream's peers block
#: when it waits, so it is paced, not starved. A CPU hog elsewhere on the machine takes
#: more from a bulk thread than from the hub.
BULK_NICE = 5

#: how long a lane waits for more from a drained source before it hands the direction back
#: to the event loop (a hand-over costs a few tens of us; waiting costs no CPU); not at all
#: while another job waits for a lane
LINGER_MS = 2

_PENDING = object()

# what a lane's wait saw
_READY, _QUIET, _WOKEN = range(3)


class _Stopped(Exception):
    """The lane was woken while it waited for a destination: its connection was aborted."""


class _Lane:
    """One thread, its go signal, its way back to the hub, and its wake-up fd."""

    __slots__ = ("go", "done", "wake", "poll", "job", "result", "waiter", "stop")

    def __init__(self, loop):
        self.go = _gevent.real_lock()
        self.go.acquire()  # the thread waits on it; run() releases it to hand over a job
        self.done = loop.async_(ref=False)
        self.wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.poll = _gevent.real_poll()
        self.poll.register(self.wake, select.POLLIN)
        self.job = None
        self.result: Any = _PENDING  # what the job returned or raised; _PENDING while it runs
        self.waiter = None
        self.stop = False  # its greenlet was thrown an exception: let go of the job at once


class _Turn:
    """A job waiting for a lane: its greenlet (None once it stopped waiting) and what it got."""

    __slots__ = ("conn", "greenlet", "lane", "stopped")

    def __init__(self, conn, waiter):
        self.conn = conn
        self.greenlet = waiter
        self.lane: Optional[_Lane] = None
        self.stopped = False  # aborted while it waited


class Offload:
    """Threads that splice bulk directions; one per forwarder, used on its hub only."""

    def __init__(self, hub, splicer, threads: int, quantum: int = QUANTUM):
        self._hub = hub
        self._splicer = splicer
        self._threads = threads
        self._quantum = quantum
        self._lanes: List[_Lane] = []   # every lane made, each with its thread
        self._free: List[_Lane] = []
        self._busy: List[_Lane] = []
        #: jobs waiting for a lane, first come first served; read by the threads too (whether
        #: anyone waits), written on the hub only
        self._queue: Deque[_Turn] = deque()
        #: (conn, writable) of jobs whose greenlet writes the rest of a handed-back chunk on the
        #: hub, waiting on the pump's writable watcher: an abort is thrown into that wait
        self._finishing: List[tuple] = []
        self._closed = False

    def run(self, conn, src_fd: int, dst_fd: int, direction: int, version: int,
            writable, wait) -> Optional[int]:
        """Splice src -> dst in a thread until drained (-1, or the bytes moved if under one
        buffer), EOF (0), the quantum, a toxic change, or a hand-over to a waiting job (the
        buffer size), or an abort (STOPPED); None when no lane can be had (the pump splices
        on the hub). Waits for a lane behind the jobs that came first. ``writable`` and
        ``wait`` are the pump's, for the rest of a chunk handed back mid-way. Errors are
        raised here, in the calling greenlet. A job may also end as usual after an abort (a
        wake-up that ends the lane's linger reads as a drained source; the job may finish
        just before it): the caller checks the connection's outcome whatever comes back."""
        lane = self._take(conn)
        if lane is None or lane is STOPPED:
            return lane
        if conn.context.toxic_version != version:  # changed while it waited: the pump picks its path
            self._release(lane)
            return self._splicer.size
        lane.job = (conn, src_fd, dst_fd, direction, version)
        lane.result = _PENDING
        lane.waiter = getcurrent()
        lane.stop = False
        self._busy.append(lane)
        thrown = None
        lane.go.release()
        try:
            while lane.result is _PENDING:
                try:
                    self._hub.switch()  # until _returned switches back (see _gevent.py)
                except BaseException as exc:  # not before the thread has let go of the fds
                    if thrown is None:
                        thrown = exc
                    lane.stop = True
                    os.eventfd_write(lane.wake, 1)
        finally:
            self._busy.remove(lane)
            lane.job = lane.waiter = None
            try:
                os.eventfd_read(lane.wake)  # a wake-up that came too late for the job
            except BlockingIOError:
                pass
            self._release(lane)
        result: Any  # the job's (mypy would read the wait loop's test as its type)
        result, lane.result = lane.result, _PENDING
        unfinished = self._splicer.Unfinished  # splice.py is not imported here: it needs fcntl
        if thrown is not None:
            if isinstance(result, unfinished):
                self._splicer.drop(result)
            raise thrown
        if isinstance(result, unfinished):  # handed over with bytes in the pipe: ours now
            entry = (conn, writable)
            self._finishing.append(entry)
            try:
                self._splicer.finish(result, dst_fd, writable, wait)
            except _Stopped:
                return STOPPED
            finally:
                self._finishing.remove(entry)
            result = self._splicer.size
        if isinstance(result, BaseException):
            raise result
        return result

    def wake(self, conn) -> None:
        """conn was aborted: a thread splicing for it stops now, even mid-chunk; a job of it
        waiting for a lane, or writing the rest of a chunk a lane handed back, stops waiting."""
        for lane in self._busy:
            if lane.job is not None and lane.job[0] is conn:
                os.eventfd_write(lane.wake, 1)
        for turn in [turn for turn in self._queue if turn.conn is conn]:
            self._queue.remove(turn)
            turn.stopped = True
            self._hub.loop.run_callback(self._resume, turn)
        for entry in self._finishing:
            if entry[0] is conn:
                self._hub.loop.run_callback(self._stop_finishing, entry)

    def _stop_finishing(self, entry) -> None:
        """Hub callback: an aborted job that still writes a chunk's rest stops waiting (one
        that is not waiting now finds the outcome before its next wait)."""
        if any(entry is finishing for finishing in self._finishing):
            _gevent.throw_into_waiter(entry[1], _Stopped())

    def holds(self, conn) -> bool:
        """Whether a thread splices for conn now (or has, and its greenlet has not yet taken
        the result): a socket error may have been reported to that thread, not to the hub."""
        return any(lane.job is not None and lane.job[0] is conn for lane in self._busy)

    def close(self) -> None:
        """End the idle threads; a busy one ends when its job returns. Jobs waiting for a
        lane splice on the hub."""
        self._closed = True
        while self._free:
            self._end(self._free.pop())
        while self._queue:
            self._hub.loop.run_callback(self._resume, self._queue.popleft())

    def forget(self) -> None:
        """In a child after fork(): the threads are gone; only the fds are left to close."""
        self._closed = True
        for lane in self._lanes:  # their watchers belong to a hub that may not have survived
            os.close(lane.wake)
        self._lanes, self._free, self._busy, self._finishing = [], [], [], []
        self._queue.clear()

    # -- the hub's side ------------------------------------------------------------

    def _take(self, conn):
        """A lane for conn's job: a free one if nobody waits, a new one while there may be
        more, else the next one that ends a job, in the queue's order. None: no lane can be
        had (the caller splices on the hub); STOPPED: conn was aborted while it waited."""
        queue = self._queue
        if not queue:
            if self._free:
                return self._free.pop()
            if len(self._lanes) < self._threads and not self._closed:
                lane = self._new_lane()
                if lane is not None:
                    return lane
        if self._closed or not self._lanes:
            return None
        turn = _Turn(conn, getcurrent())
        queue.append(turn)
        if len(queue) == 1:  # lanes that wait (for more, or for a destination) hand over now;
            for lane in self._busy:  # after the append: a woken lane must see the queue filled
                os.eventfd_write(lane.wake, 1)
        try:
            while turn.lane is None and not turn.stopped and turn in queue:
                self._hub.switch()  # until _resume switches back
        except BaseException:
            if turn.lane is not None:  # given one just now: it goes to the next in line
                self._release(turn.lane)
            elif turn in queue:
                queue.remove(turn)
            raise
        finally:
            turn.greenlet = None
        if turn.lane is not None:
            return turn.lane
        return STOPPED if turn.stopped else None

    def _release(self, lane: _Lane) -> None:
        """A lane ended its job: to the first job waiting, else back to the free ones."""
        if self._queue:
            turn = self._queue.popleft()
            turn.lane = lane
            self._hub.loop.run_callback(self._resume, turn)
        elif self._closed:
            self._end(lane)
        else:
            self._free.append(lane)

    @staticmethod
    def _resume(turn: _Turn) -> None:
        """Hub callback: a waiting job got its lane, or stops waiting. Its greenlet is
        switched to only while it still waits in _take (nothing else may be woken so)."""
        if turn.greenlet is not None:
            turn.greenlet.switch()

    def _new_lane(self) -> Optional[_Lane]:
        """A lane and its thread, or None when the system has no fd or thread to spare (the
        caller then waits for a lane, or splices on the hub if there is none)."""
        try:
            lane = _Lane(self._hub.loop)
        except OSError:
            return None
        lane.done.start(self._returned, lane)
        try:
            _gevent.start_real_thread(self._serve, (lane,))
        except RuntimeError:  # can't start new thread
            lane.done.stop()
            lane.done.close()
            os.close(lane.wake)
            self._threads = len(self._lanes)  # do not try again for every chunk
            return None
        self._lanes.append(lane)
        return lane

    def _returned(self, lane: _Lane) -> None:
        """Async watcher callback, on the hub: the lane's job is done."""
        if lane.waiter is not None and lane.result is not _PENDING:
            lane.waiter.switch()

    def _end(self, lane: _Lane) -> None:
        lane.job = None
        lane.go.release()  # a go with no job: the thread returns
        lane.done.stop()
        lane.done.close()
        self._lanes.remove(lane)

    # -- the thread's side ---------------------------------------------------------

    def _serve(self, lane: _Lane) -> None:
        go = lane.go
        try:  # bulk yields to the hub and to small messages when the CPU is contended
            os.setpriority(os.PRIO_PROCESS, 0, min(19, os.getpriority(os.PRIO_PROCESS, 0) + BULK_NICE))
        except (OSError, AttributeError):
            pass
        while True:
            go.acquire()
            job = lane.job
            if job is None:
                os.close(lane.wake)
                return
            try:
                lane.result = self._splice(lane, *job)
            except BaseException as exc:  # the pump applies the closing rules to it
                lane.result = exc
            lane.done.send()

    def _splice(self, lane: _Lane, conn, src_fd: int, dst_fd: int, direction: int, version: int) -> Optional[int]:
        """The job: Splicer.chunk after chunk, waiting in this thread (poll) where the hub's
        pump would wait in the event loop; handing over, while a job waits for a lane, rather
        than waiting for a quiet source or a destination that does not read."""
        splicer = self._splicer
        size = splicer.size
        context = conn.context
        budget = self._quantum * size
        queue = self._queue  # read here, written on the hub: only whether anyone waits
        unfinished = splicer.Unfinished
        moved = 0

        def wait_writable(fd: int) -> None:
            while True:
                if queue:  # the rest of the chunk is written on the hub; the lane goes on
                    raise unfinished
                seen = self._wait(lane, fd, select.POLLOUT, None)
                if seen == _READY:
                    return
                if conn.outcome is not None or lane.stop:
                    raise _Stopped  # chunk() closes its pipe: the bytes in it are nobody's now

        try:
            while True:
                if conn.outcome is not None:
                    return STOPPED
                n = splicer.chunk(conn, src_fd, dst_fd, dst_fd, direction, wait_writable)
                if n is None:
                    return None  # no fd for a pipe: the pump copies
                if n == -1:
                    # Drained. A stream's sender is often just a little slower than this loop:
                    # wait a moment for more rather than hand the direction back for a pause,
                    # unless another job waits for a lane, which then goes first.
                    if not queue and self._wait(lane, src_fd, select.POLLIN, LINGER_MS) == _READY:
                        continue
                    break
                if not n:
                    break
                moved += n
                if moved >= budget or context.toxic_version != version:
                    n = size  # a full turn: the pump asks again, behind whoever waits
                    break
        except _Stopped:
            return STOPPED
        if n == -1 and 0 < moved < size:
            return moved  # less than a buffer in all: small messages again, which the hub copies
        return n

    @staticmethod
    def _wait(lane: _Lane, fd: int, events: int, timeout_ms: Optional[int]) -> int:
        """Block this thread until fd is ready for ``events`` (_READY; an error or EOF counts,
        for splice to report), ``timeout_ms`` passed (_QUIET), or the lane was woken (_WOKEN:
        its connection was aborted, or a job waits for a lane; the wake-up is used up)."""
        poll = lane.poll
        poll.register(fd, events)
        try:
            ready = poll.poll(timeout_ms)
        finally:
            poll.unregister(fd)
        if not ready:
            return _QUIET
        if any(ready_fd == lane.wake for ready_fd, _events in ready):
            try:
                os.eventfd_read(lane.wake)
            except BlockingIOError:
                pass
            return _WOKEN
        return _READY
