"""One periodic watch per hub: every forwarder's sweep in turn, a slice per loop pass.

Typical use (``Forwarder`` does this when it starts, on its hub)::

    handle = _sweeps.every(hub, 1.0, forwarder._sweep)   # first call in a second, then each
    handle.close()                                        # when the forwarder stops

Why: a forwarder sweeps its connections periodically (idle timeouts, the parking pass;
``relay.sweep``). With a timer each, a thousand rules started together (``gproxy -c FILE``)
have a thousand timers that expire in the same loop pass, once a second, and that pass holds
the loop for every one of them: 5-7.5 ms in which no byte moves on any rule. Here one timer
per hub serves every forwarder on it: the sweeps that are due run in due order (first come
first served among equals), at most ``SLICE`` per loop pass; when more are due, the timer is
armed for the next pass, so the loop polls for I/O between slices. A forwarder's own sweep
is still one call (its connections are walked by ``relay.sweep`` as before).

Each forwarder keeps its own interval. A sweep that comes due while the loop did not run
(a stall) runs once, late, and is next due an interval after it ran: missed sweeps are not
made up for. Everything here runs on the hub's thread.
"""

from __future__ import annotations

import heapq
import itertools
import time
import weakref
from typing import Callable, List, Optional, Tuple

__all__ = ["every", "SLICE"]

#: sweeps run in one loop pass at most; then the loop polls for I/O before the next slice.
#: An idle forwarder's sweep costs a few us, so a slice holds the loop for well under 1 ms.
SLICE = 32

#: hub -> its Sweeps, while it has a forwarder to sweep
_by_hub: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class Handle:
    """One forwarder's place in its hub's sweeps; ``close()`` removes it."""

    __slots__ = ("_sweeps", "interval", "callback", "due", "closed")

    def __init__(self, sweeps: "Sweeps", interval: float, callback: Callable[[], None], due: float):
        self._sweeps = sweeps
        self.interval = interval
        self.callback = callback
        self.due = due
        self.closed = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._sweeps._closed(self)


class Sweeps:
    """The due sweeps of one hub's forwarders, in a heap, and the one timer that runs them."""

    def __init__(self, hub):
        self._hub = hub
        self._loop = hub.loop
        self._heap: List[Tuple[float, int, Handle]] = []
        self._order = itertools.count()  # ties run in the order they were scheduled
        self._live = 0
        self._timer = None
        self._timer_due: Optional[float] = None

    def add(self, interval: float, callback: Callable[[], None]) -> Handle:
        handle = Handle(self, interval, callback, time.monotonic() + interval)
        self._push(handle)
        self._live += 1
        self._arm()
        return handle

    def _push(self, handle: Handle) -> None:
        heapq.heappush(self._heap, (handle.due, next(self._order), handle))

    def _closed(self, handle: Handle) -> None:
        """A handle closed: it leaves the heap when it comes up. The last one takes the
        timer with it, so a hub with no forwarder has no timer of ours."""
        self._live -= 1
        if not self._live:
            self._stop_timer()
            self._heap.clear()
            if _by_hub.get(self._hub) is self:
                del _by_hub[self._hub]

    def _arm(self) -> None:
        """Arm the timer for the earliest due sweep, unless it is armed for then already."""
        heap = self._heap
        while heap and heap[0][2].closed:
            heapq.heappop(heap)
        if not heap:
            self._stop_timer()
            return
        due = heap[0][0]
        if self._timer is not None and self._timer_due is not None and self._timer_due <= due:
            return  # it fires in time; _run arms it again for what is due after
        self._stop_timer()
        self._timer = self._loop.timer(max(0.0, due - time.monotonic()))
        self._timer_due = due
        self._timer.start(self._run)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.close()
            self._timer = None
            self._timer_due = None

    def _run(self) -> None:
        """Timer callback, on the hub: the sweeps due now, a slice of them; the timer is
        then armed again, for the next pass if more are due."""
        self._stop_timer()
        heap = self._heap
        now = time.monotonic()
        ran = 0
        try:
            while heap and ran < SLICE:
                due, _order, handle = heap[0]
                if handle.closed:
                    heapq.heappop(heap)
                    continue
                if due > now:
                    break
                heapq.heappop(heap)
                handle.due = due + handle.interval
                if handle.due <= now:  # late by an interval or more: not made up for
                    handle.due = now + handle.interval
                self._push(handle)
                ran += 1
                handle.callback()  # may close handles, this one included
        finally:  # a sweep that raised (a bug; the hub reports it) does not stop the others
            if self._live:
                self._arm()


def every(hub, interval: float, callback: Callable[[], None]) -> Handle:
    """Call ``callback()`` on ``hub`` every ``interval`` seconds, first in ``interval``,
    sharing one timer and one turn-taking with every other forwarder on that hub. Call on
    the hub's thread."""
    sweeps = _by_hub.get(hub)
    if sweeps is None:
        sweeps = _by_hub[hub] = Sweeps(hub)
    return sweeps.add(interval, callback)
