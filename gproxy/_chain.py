"""The toxic chain: the stages toxics run as, and ``Link``, the pump of a direction with toxics.

Private: ``gproxy.toxics`` is the public face (toxic records, the per-forwarder collection,
``Delay``/``CLOSE``/``RESET``, all re-exported from here); ``relay`` runs a ``Link`` per
direction that meets toxics::

    link = Link(conn, direction, toxics, bound)   # toxics: the forwarder's toxics.Toxics
    link.sync(version)                            # follow the collection (at a chunk boundary)
    done = link.pump(src, dst, readable, writable, fair_share)

How a direction runs its toxics
-------------------------------
A direction with toxics leaves the fast path (``relay.pump``) for ``Link.pump``,
one greenlet that both reads and writes. Each toxic is a *stage* with its own
queue of ``[arrival, item]``; an item is a chunk or a marker (EOF, close, reset).
A stage decides when its head leaves (``due``) and what leaves (``take``); what
leaves stage *i* at time *t* enters stage *i+1* at *t*, and what leaves the last
stage is written. Each stage computes its times from arrivals, never by sleeping,
so a 100 ms latency delays a bulk stream by 100 ms instead of capping it at one
chunk per 100 ms, and each stage keeps its output in order. The greenlet waits for
whichever comes first: the source readable (if the link holds less than
``LINK_BYTES``: a full link stops reading, so TCP flow control pushes back
on the sender), the destination writable (if a write was short), or the next due
time.

Changes are made on the hub by the control side, which only edits the
collection, bumps ``Context.toxic_version`` and kicks each connection's pumps
(``relay.toxics_changed``): it never waits for the data side. A pump re-reads
the chain at its next chunk boundary (``Link.sync``): a new toxic becomes the
last stage; an updated one keeps its queue and state (``limit_data``'s count);
a removed one hands what it holds, in order, to the stage after it, behind what
that stage holds (bytes further down the chain are older; when several stages go
at once, as on a reset, the later one's bytes go first). A toxic that ends the
connection (``timeout``, ``reset_peer``, ``limit_data``) either fires or, removed or
rolled inactive before it does, gives back what it caught. So a change never
loses, duplicates or reorders a byte that was read.

The stage protocol: a new toxic is one class
--------------------------------------------
A built-in toxic is a subclass of ``_Stage`` decorated ``@_builtin``, in this file or in a
module of its own that ``gproxy.toxics`` imports (``_trigger.py``); nothing else names it
(``toxics.TYPES``, validation and the API follow from it)::

    @_builtin
    class _Lag(_Stage):                   # each chunk and the EOF leave ``lag`` ms late
        type = "lag"                      # the type's name, as the API spells it
        attributes = {"lag": 0}           # each attribute and its default; the default's type is
                                          # the attribute's: int (>= 0), str or bool

        @classmethod
        def check(cls, attributes):       # optional: (attribute, message) if they do not fit
            return None

        def setup(self, attributes, now):
            self.lag = attributes["lag"] / 1000.0

        def schedule(self):               # release() is the default: pop the head
            if not self.queue:
                return None
            return max(self.queue[0][0] + self.lag, self.last)

What a stage may implement (each has a default that passes everything on, in order):

- ``setup(attributes, now)``: apply the toxic's settings. It runs when the stage is made and
  again on every update, after ``active`` was rolled from the toxicity; state an update keeps
  (``limit_data``'s count) is made only when absent.
- ``accept(item, t)``: an item arrives at ``t`` while the toxic acts on this connection. The
  default ``push``es it onto ``queue``; a stage may queue something else instead (a Python
  toxic's result) or nothing (a toxic that fired and dies with the connection).
- ``schedule()``: when the head leaves, once ``queue`` or state changed: a time, ``_INF``
  (held until something changes) or None (nothing to do). Never earlier than ``self.last``.
- ``release(t)``: what leaves at ``t``: ``pop()`` the head, split it (leave the rest at
  the head and lower ``size``), or a ``_Marker("close"|"reset", reason)``; None when nothing
  leaves after all.
- ``drain()``: the stage is removed; everything it holds, in order (reset per-chunk state).
- ``lingers()``: its toxic removed, whether it must stay a while (a protocol toxic finishing
  a request it answered); it is drained at a later sync, after it calls ``link.restructure()``.

A stage that places each item at its own time and may end the connection at a planned time
(a Python toxic's ``Delay(..., action=RESET)``, ``trigger``) derives from ``_Timed``, which
keeps the order and the give-back rules for it.

A toxic may be two stages, one on each direction of a connection: a stage class with a
``reverse`` class gets an entry in the other chain too (first there, as its own is last), and
the two stages share state through ``link.sessions`` (one dict for a connection's two links).
One wakes the other's pump with ``link.wake()``: a hub callback, so neither ever runs the
other's pump nor waits for it. The protocol toxics are built so (``_protocol.py``).

The rules every stage keeps (``tests/test_toxic_chain.py`` checks them as a property):

- Order: what leaves a stage leaves in the order it arrived, at nondecreasing times.
- Everything held is in ``queue`` (and its bytes in ``size``): ``drain()`` gives it back on
  removal, an inactive stage passes it on (``accept``/``schedule``/``release`` are then not
  called), and the link's bound counts it. Nothing is hidden elsewhere.
- Markers keep their place: an EOF is passed on like data, a close or reset from a stage
  before is passed on or replaced by this stage's own end of the connection.
- A stage that ends the connection either fires (a close or reset marker leaves; what it held
  may then be dropped, it dies with the connection) or holds what it caught in ``queue``,
  so that a removal or an update that rolls it inactive gives it back. It never drops bytes
  and lets the connection live.
- Times come from the caller (``now``, ``t``) and randomness from ``self.link.random``, never
  from sleeping or the global clock, so a fake clock and a seeded random drive it in tests.
"""

from __future__ import annotations

import logging
import math
import numbers
import random
import reprlib
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Deque, Dict, List, Optional, Tuple, Type

from greenlet import GreenletExit, getcurrent

from gproxy._failure import Aborted, Failure
from gproxy._report import report
from gproxy.stats import Outcome

if TYPE_CHECKING:
    from gproxy._capture import Tap
    from gproxy.toxics import Toxic, Toxics, _Entry

__all__ = ["Link", "Delay", "Action", "CLOSE", "RESET", "PYTHON", "LINK_BYTES", "BUILTIN"]

log = logging.getLogger("gproxy.toxics")   # the logger name users configure stays the same

#: the type a toxic written in Python reports
PYTHON = "python"

#: the most a direction with toxics holds (or its buffer_size, if larger): like a TCP
#: window, it lets a 100 ms latency delay a bulk stream without capping it at a few
#: chunks per 100 ms, and a full link stops reading, so the sender is pushed back.
LINK_BYTES = 4 * 1024 * 1024
#: a wait with nothing due still wakes this often (an abort never depends on it)
_MAX_WAIT = 60.0
#: the most one read takes (a read allocates what it asks for)
_READ_MAX = 65536


# -- what a Python toxic returns --------------------------------------------------------

@dataclass(frozen=True)
class Delay:
    """What a Python toxic returns to hold a chunk back ``seconds`` (``data`` replaces it),
    or, with an ``action`` (``CLOSE`` or ``RESET``), to pass the chunk (or ``data``) on and
    end the connection ``seconds`` later: what comes meanwhile passes, what comes after dies
    with the connection. ``seconds`` is a finite number >= 0, ``data`` bytes-like or None,
    ``action`` CLOSE, RESET or None, else the constructor raises (inside the toxic, so the
    report names it)."""

    seconds: float
    data: Optional[bytes] = None
    action: Optional["Action"] = None

    def __post_init__(self) -> None:
        seconds = self.seconds
        if isinstance(seconds, bool) or not isinstance(seconds, numbers.Real):
            raise TypeError(f"Delay: seconds must be a number, not {seconds!r}")
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"Delay: seconds must be finite and >= 0, not {seconds!r}")
        object.__setattr__(self, "seconds", float(seconds))
        data = self.data
        if data is not None:
            if not isinstance(data, _BYTES_LIKE):
                raise TypeError(f"Delay: data must be bytes, bytearray, memoryview or None, "
                                f"not {type(data).__name__}")
            object.__setattr__(self, "data", _copy(data))
        if self.action is not None and not isinstance(self.action, Action):
            raise TypeError(f"Delay: action must be CLOSE, RESET or None, not {_describe(self.action)}")


class Action:
    """``CLOSE`` or ``RESET``: what a Python toxic returns to end the connection."""

    def __init__(self, kind: str):
        if kind not in ("close", "reset"):
            raise ValueError(f"Action: 'close' or 'reset', not {kind!r}")
        self.kind = kind

    def __repr__(self) -> str:
        return self.kind.upper()


CLOSE = Action("close")
RESET = Action("reset")

#: what a Python toxic may return as data (a str or an int is a bug, not data)
_BYTES_LIKE = (bytes, bytearray, memoryview)


def _copy(data) -> bytes:
    """``data`` as bytes, copied unless it is bytes already: a bytearray the toxic keeps may
    change after it returned, and a memoryview's len() counts items, not bytes."""
    return data if isinstance(data, bytes) else bytes(data)


def _describe(value) -> str:
    return f"{reprlib.repr(value)} ({type(value).__name__})"


# -- what flows through a chain ------------------------------------------------------------

class _Marker:
    """Not data: the source's EOF, or a toxic's order to close or reset the connection."""

    __slots__ = ("kind", "reason")

    def __init__(self, kind: str, reason: str = ""):
        self.kind = kind
        self.reason = reason


_EOF = _Marker("eof")
_INF = float("inf")


def _size(item) -> int:
    return 0 if item.__class__ is _Marker else len(item)


#: the built-in toxics' stages by type name, in toxiproxy's order (``toxics.TYPES`` follows)
BUILTIN: Dict[str, Type["_Stage"]] = {}


def _builtin(stage: Type["_Stage"]) -> Type["_Stage"]:
    """Class decorator: ``stage`` is a built-in toxic, known by its ``type``."""
    BUILTIN[stage.type] = stage
    return stage


class _Stage:
    """One toxic on one direction of one connection. Subclasses say when the head leaves
    (``schedule``) and what leaves (``release``); an unlucky toxicity roll makes it a no-op.
    The protocol is in the module's docstring."""

    #: toxiproxy's type name (the API's ``type``)
    type = ""
    #: each attribute and its default (toxiproxy's: Go's zero values); the default's type is
    #: the attribute's: int (a whole number >= 0), str or bool
    attributes: Dict[str, Any] = {}
    #: the one stream this type may be added to, or None for either
    stream: Optional[str] = None
    #: the stage that runs on the other direction of each connection for the same toxic
    #: (a protocol toxic's reply half), or None
    reverse: Optional[Type["_Stage"]] = None

    @classmethod
    def check(cls, attributes: Dict[str, Any]) -> Optional[Tuple[str, str]]:
        """(attribute, what is wrong) if values of the right types still do not make this toxic."""
        return None

    def __init__(self, entry: _Entry, link: "Link", now: float):
        self.entry = entry
        self.link = link
        self.queue: Deque[list] = deque()   # [arrival, item]
        self.size = 0                       # data bytes held
        self.last = 0.0                     # when the previous output left: output stays in order
        self.next: Optional[float] = None   # the head's due time, once computed
        self.toxic = entry.toxic
        self.draw: Optional[float] = None   # a scheduled toxic's one draw for this connection
        self.active = False
        self.configured = False
        self.configure(entry.toxic, now)

    def configure(self, toxic: Toxic, now: float) -> None:
        """(Re)apply the toxic's settings: on creation and on every update (toxiproxy reruns
        the toxic on update, rolling its toxicity again and restarting its timers). A
        scheduled toxic (``gproxy._schedule``) draws once per connection and acts while the
        draw is below its toxicity; a change of its toxicity alone that leaves it acting, or
        not, on this connection leaves the stage as it is (its timers run on)."""
        if toxic.schedule is None:
            active = toxic.toxicity >= 1.0 or self.link.random.random() < toxic.toxicity
        else:
            if self.draw is None:
                self.draw = self.link.random.random()
            active = self.draw < toxic.toxicity
            if (self.configured and active == self.active and toxic.attributes == self.toxic.attributes
                    and toxic.schedule == self.toxic.schedule):
                self.toxic = toxic
                return
        self.configured = True
        self.toxic = toxic
        self.active = active
        self.next = None
        self.setup(toxic.attributes, now)

    def setup(self, attributes: Dict[str, int], now: float) -> None:
        pass

    # -- the queue --------------------------------------------------------------------

    def admit(self, item, t: float) -> None:
        if self.active:
            self.accept(item, t)
        else:
            self.push(item, t)

    def accept(self, item, t: float) -> None:
        self.push(item, t)

    def push(self, item, t: float) -> None:
        self.queue.append([t, item])
        self.size += _size(item)

    def pop(self):
        t, item = self.queue.popleft()
        self.size -= _size(item)
        return item

    def drop_all(self) -> None:
        self.queue.clear()
        self.size = 0
        self.next = None

    def drain(self) -> list:
        """Everything held, in order: the stage is being removed."""
        items = [item for _t, item in self.queue]
        self.drop_all()
        return items

    def lingers(self) -> bool:
        """Whether the stage, its toxic removed, must stay a while (a protocol toxic finishing
        a request it answered): it is drained once this says False at a later ``sync``."""
        return False

    # -- timing -------------------------------------------------------------------------

    def due(self) -> Optional[float]:
        """When the next output leaves (``inf``: held until something changes), or None."""
        if self.next is None:
            if not self.active:
                if not self.queue:
                    return None
                self.next = max(self.queue[0][0], self.last)
            else:
                self.next = self.schedule()
        return self.next

    def take(self):
        """The next output, at ``due()``; None if it was dropped."""
        t = self.next
        assert t is not None, "take() before due()"
        self.next = None
        self.last = t
        if not self.active:
            return self.pop()
        return self.release(t)

    def schedule(self) -> Optional[float]:
        return max(self.queue[0][0], self.last) if self.queue else None

    def release(self, t: float):
        return self.pop()


@_builtin
class _Latency(_Stage):
    type = "latency"
    attributes = {"latency": 0, "jitter": 0}   # ms, ms

    def setup(self, attributes, now):
        self.latency = attributes["latency"] / 1000.0
        self.jitter = attributes["jitter"] / 1000.0

    def schedule(self):
        if not self.queue:
            return None
        arrival, item = self.queue[0]
        if item.__class__ is _Marker and item is not _EOF:
            return max(arrival, self.last)
        delay = self.latency
        if self.jitter:
            delay += self.link.random.uniform(-self.jitter, self.jitter)
        return max(arrival + delay, self.last)


@_builtin
class _Bandwidth(_Stage):
    """A serial link of ``rate`` KB/s: a piece leaves when it has been sent, pieces of at
    most 100 ms' worth (as toxiproxy splits them)."""

    type = "bandwidth"
    attributes = {"rate": 0}   # KB/s (1000 bytes); 0: no limit

    def setup(self, attributes, now):
        self.rate = attributes["rate"] * 1000.0   # bytes per second
        self.piece = attributes["rate"] * 100      # bytes per 100 ms

    def schedule(self):
        if not self.queue:
            return None
        arrival, item = self.queue[0]
        start = max(arrival, self.last)
        if item.__class__ is _Marker or not self.rate:
            return start
        return start + min(len(item), self.piece) / self.rate

    def release(self, t):
        head = self.queue[0]
        item = head[1]
        if item.__class__ is _Marker or not self.rate or len(item) <= self.piece:
            return self.pop()
        head[1] = item[self.piece:]
        self.size -= self.piece
        return item[:self.piece]


@_builtin
class _SlowClose(_Stage):
    type = "slow_close"
    attributes = {"delay": 0}   # ms

    def setup(self, attributes, now):
        self.delay = attributes["delay"] / 1000.0

    def schedule(self):
        if not self.queue:
            return None
        arrival, item = self.queue[0]
        if item is _EOF:
            return max(arrival + self.delay, self.last)
        return max(arrival, self.last)


@_builtin
class _Timeout(_Stage):
    """Holds everything; with ``timeout`` > 0 closes the connection that long after it
    started acting on it (added, or updated), dropping what it held."""

    type = "timeout"
    attributes = {"timeout": 0}   # ms; 0: never closes

    def setup(self, attributes, now):
        timeout = attributes["timeout"]
        self.deadline = now + timeout / 1000.0 if timeout else _INF
        self.closed = False

    def accept(self, item, t):
        if not self.closed:
            self.push(item, t)

    def schedule(self):
        return None if self.closed else self.deadline

    def release(self, t):
        self.drop_all()
        self.closed = True
        return _Marker("close", f"timeout toxic {self.toxic.name}")


@_builtin
class _ResetPeer(_Stage):
    """The first item to arrive starts the clock; ``timeout`` ms later the connection is
    reset, and what the stage caught meanwhile dies with it. Until then it holds what it
    caught: removed, or rolled inactive by an update, before it fires, it gives all of it
    back (a change never loses a byte), and the connection goes on. (toxiproxy's fires
    even then: its removal waits for the reset, and gproxy's changes never wait.) Once
    caught, bytes count against the link's bound, so a long timeout stops the reading
    instead of swallowing a stream."""

    type = "reset_peer"
    attributes = {"timeout": 0}   # ms

    def setup(self, attributes, now):
        self.timeout = attributes["timeout"] / 1000.0
        if not hasattr(self, "fired"):
            self.fired = False
        # an update restarts the clock of what was caught (toxiproxy reruns an updated toxic);
        # rolled inactive, what was caught passes on, and the next arrival starts it again
        self.deadline: Optional[float] = now + self.timeout if self.queue and self.active else None

    def accept(self, item, t):
        if self.fired:
            return   # the reset is on its way: nothing passes it
        if self.deadline is None:
            self.deadline = t + self.timeout
        self.push(item, t)

    def schedule(self):
        return None if self.fired else self.deadline

    def release(self, t):
        self.drop_all()
        self.fired = True
        return _Marker("reset", f"reset_peer toxic {self.toxic.name}")


@_builtin
class _Slicer(_Stage):
    """Cuts each chunk into slices of about ``average_size`` bytes, ``delay`` us apart."""

    type = "slicer"
    attributes = {"average_size": 0, "size_variation": 0, "delay": 0}   # bytes, bytes, us

    @classmethod
    def check(cls, attributes):
        if attributes["average_size"] < 1:
            return "average_size", "must be at least 1"
        if attributes["size_variation"] >= attributes["average_size"]:
            return "size_variation", f"must be smaller than average_size ({attributes['average_size']})"
        return None

    def setup(self, attributes, now):
        self.average = attributes["average_size"]
        self.variation = attributes["size_variation"]
        self.delay = attributes["delay"] / 1e6
        self.cuts: Optional[List[int]] = None   # slice lengths left of the head chunk

    def schedule(self):
        if not self.queue:
            return None
        return max(self.queue[0][0], self.last)

    def release(self, t):
        head = self.queue[0]
        item = head[1]
        if item.__class__ is _Marker:
            return self.pop()
        if self.cuts is None:
            self.cuts = _slices(len(item), self.average, self.variation, self.link.random)
        n = self.cuts.pop()
        self.last = t + self.delay   # the next slice (or chunk) waits delay after this one
        if not self.cuts:
            self.cuts = None
            return self.pop()
        head[1] = item[n:]
        self.size -= n
        return item[:n]

    def drain(self):
        self.cuts = None
        return super().drain()


def _slices(total: int, average: int, variation: int, rng=random) -> List[int]:
    """Slice lengths adding up to ``total``, in reverse order (popped from the end): halve
    until a piece is within ``variation`` of ``average``, moving each cut by up to
    ``variation``, so pieces vary evenly along the chunk (toxiproxy's method)."""
    lengths: List[int] = []
    pending = [(0, total)]
    while pending:
        start, end = pending.pop()
        if end - start - average <= variation:
            lengths.append(end - start)
            continue
        middle = start + (end - start) // 2
        if variation:
            middle += rng.randrange(-variation, variation)
        pending.append((middle, end))
        pending.append((start, middle))
    lengths.reverse()
    return lengths


@_builtin
class _LimitData(_Stage):
    """Passes ``bytes`` bytes from when it started acting, then closes the connection."""

    type = "limit_data"
    attributes = {"bytes": 0}

    def setup(self, attributes, now):
        self.limit = attributes["bytes"]
        if not hasattr(self, "passed"):
            self.passed = 0         # kept across updates, as toxiproxy keeps its state
            self.closing = False    # the limit was reached: the close goes next
            self.done = False       # the close went: nothing more passes

    def accept(self, item, t):
        if not (self.closing or self.done):
            self.push(item, t)

    def schedule(self):
        if self.done:
            return None
        if self.closing:
            return self.last
        return max(self.queue[0][0], self.last) if self.queue else None

    def release(self, t):
        if self.closing:
            self.closing, self.done = False, True
            return _Marker("close", f"limit_data toxic {self.toxic.name}: {self.limit} bytes passed")
        item = self.pop()
        if item.__class__ is _Marker:
            return item
        room = self.limit - self.passed
        if len(item) >= room:
            self.closing = True
            self.drop_all()
            item = item[:max(room, 0)]
        self.passed += len(item)
        return item if item else None


class _Timed(_Stage):
    """A stage that gives each item the time it may leave as it queues it (the ``arrival`` of
    ``[arrival, item]``, never earlier than the item in front: output stays in order), and
    that may plan the connection's end for a time (``plan_end``): what is in front of the
    plan leaves first, what comes after leaves meanwhile if it is due before the end, and
    the rest dies with the connection. Removed or rolled inactive before the end, it gives
    all of it back."""

    end: Optional[Tuple[float, str, str]] = None   # (when, "close" or "reset", reason)
    before_end = 0      # queue entries in front of the planned end: they leave first
    ended = False       # the end left: nothing passes any more

    def due_time(self, t: float) -> float:
        """When an item arriving at ``t`` may leave: not before the one in front of it."""
        return max(t, self.queue[-1][0]) if self.queue else t

    def push(self, item, t: float) -> None:
        super().push(item, t)
        if self.end is not None:
            self.next = None   # it may be due before the planned end

    def plan_end(self, when: float, kind: str, reason: str) -> None:
        if self.end is None:   # the first plan stands: it is in front of any later one
            self.end = (when, kind, reason)
            self.before_end = len(self.queue)
            self.next = None

    def _ending(self) -> bool:
        end = self.end
        return end is not None and not self.before_end and (not self.queue or self.queue[0][0] >= end[0])

    def schedule(self):
        if self._ending():
            assert self.end is not None  # (_ending says so)
            return max(self.end[0], self.last)
        return max(self.queue[0][0], self.last) if self.queue else None

    def release(self, t):
        if self._ending():
            return self.fire()
        if self.before_end:
            self.before_end -= 1
        return self.pop()

    def fire(self):
        """The planned end is due: what is held dies with the connection."""
        assert self.end is not None  # fire() follows _ending()
        kind, reason = self.end[1], self.end[2]
        self.drop_all()
        self.end, self.ended = None, True
        return _Marker(kind, reason)

    def drop_all(self) -> None:
        super().drop_all()
        self.before_end = 0


class _Python(_Timed):
    """A user's callable: called once per chunk as the chunk arrives, and, if it has an
    ``eof(record)`` method, once at the EOF. A class is made into one instance per
    connection (at the first chunk), so it may keep state per connection. What it raises,
    or a return it may not give, is a bug in the host's program: reported (on stderr if no
    logging is configured), and the connection ends with outcome ERROR."""

    type = PYTHON

    def setup(self, attributes, now):
        if not hasattr(self, "function"):
            self.function = None   # made at its first use: an update keeps the same one
        if not self.active:
            self.end = None        # rolled inactive: a planned end is called off

    def accept(self, item, t):
        if self.ended:
            return   # the end is on its way: nothing passes it
        if item.__class__ is _Marker and item is not _EOF:
            self.push(item, self.due_time(t))
            return
        function = self.function
        if function is None:
            function = self._make()
            if function is None:
                return
        eof = item is _EOF
        if eof:
            handler = getattr(function, "eof", None)
            if handler is None:
                self.push(item, self.due_time(t))
                return
            result = self._call(handler, " at the EOF")
        else:
            result = self._call(function, "", item)
        if result is not _FAILED:
            self._apply(result, item, t)

    def _make(self):
        function = self.toxic.function
        if isinstance(function, type):   # a class: this connection's own instance
            function = self._call(function, " making its instance for this connection", args=())
            if function is _FAILED:
                return None
        self.function = function
        return function

    def _call(self, function, where: str, *chunk, args=None):
        try:
            if args is None:
                return function(*chunk, self.link.conn.record())
            return function(*args)
        except GreenletExit:
            raise   # the forwarder stops: not the toxic's failure
        except BaseException as exc:
            what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            self.link.fail(f"Python toxic {self.toxic.name!r} raised {what}{where}", sys.exc_info())
            return _FAILED

    def _apply(self, result, item, t: float) -> None:
        """Queue what ``result`` says for ``item`` (a chunk, or the EOF: then returned bytes go
        in front of it, and an action replaces it)."""
        eof = item is _EOF
        chunk = None if eof else item
        if result is None:
            self.push(item, self.due_time(t))
        elif isinstance(result, _BYTES_LIKE):
            if result:
                self.push(_copy(result), self.due_time(t))
            if eof:
                self.push(item, self.due_time(t))
        elif isinstance(result, Delay):
            data = chunk if result.data is None else result.data
            if result.action is None:
                at = t + result.seconds   # queued behind what is held, so output stays in order
                if data:
                    self.push(data, self.due_time(at))
                if eof:
                    self.push(item, self.due_time(at))
            else:
                if data:
                    self.push(data, self.due_time(t))
                self.plan_end(self.due_time(t + result.seconds), result.action.kind,
                              f"Python toxic {self.toxic.name}")
        elif isinstance(result, Action):
            self.push(_Marker(result.kind, f"Python toxic {self.toxic.name}"), self.due_time(t))
        else:
            self.link.fail(f"Python toxic {self.toxic.name!r} returned {_describe(result)}"
                           f"{' at the EOF' if eof else ''}; it may return None, bytes, bytearray, "
                           f"memoryview, Delay, CLOSE or RESET")


_FAILED = object()   # a Python toxic raised: reported already


# -- one direction of one connection -----------------------------------------------------------

class Link:
    """The toxic chain of one direction of one connection, and the pump that runs it."""

    def __init__(self, conn, direction: int, toxics: Toxics, bound: int, rng=random):
        self.conn = conn
        #: where toxicity rolls, jitter and slice sizes come from (a seeded ``random.Random``
        #: makes a test repeatable)
        self.random = rng
        self.direction = direction
        self.toxics = toxics
        self.bound = max(bound, LINK_BYTES)  # bytes held at most: a full link stops reading
        self.stages: List[_Stage] = []
        self.out: Deque = deque()           # released by the last stage, to write in order
        self.out_size = 0
        self.version = -1
        self.waiting = None                 # the pump's greenlet while it waits
        self.eof = False                    # the source's EOF was read
        #: a capture's tap on this connection (_capture.Tap), or None; it keeps the direction
        #: on this path, where every byte read and written passes through Python
        self.tap: Optional[Tap] = None
        # what the two stages of one toxic on this connection share (a protocol toxic's halves,
        # one on each direction), by toxic entry: one dict for both of the connection's links
        links = getattr(conn, "links", None)
        sibling = links[1 - direction] if links else None
        self.sessions: Dict[object, object] = sibling.sessions if sibling is not None else {}

    # -- following the collection ------------------------------------------------------

    def sync(self, version: int, now: Optional[float] = None) -> None:
        """Bring the stages in line with the collection's chain for this direction. ``now``
        (``time.monotonic()`` if None) is when the change takes effect."""
        self.version = version
        if now is None:
            now = time.monotonic()
        chain = self.toxics.chains[self.direction]
        stages: List[_Stage] = []
        # What removed stages held, oldest first. Bytes further down the chain are older (a
        # stage holds what the stages before it let through earlier), so a removed stage's
        # queue goes in front of what the removed stages before it held, and behind what the
        # next kept stage (or the output) holds.
        carry: list = []
        for stage in self.stages:
            if stage.entry.removed:
                if not stage.lingers():
                    carry[:0] = stage.drain()
                    continue
            elif stage.toxic is not stage.entry.toxic:
                stage.configure(stage.entry.toxic, now)   # first: what it is handed arrives after the change
            for item in carry:
                stage.admit(item, now)
            carry = []
            stages.append(stage)
        for item in carry:
            self.out.append(item)
            self.out_size += _size(item)
        present = {id(stage.entry) for stage in stages}
        first: List[_Stage] = []   # new halves of toxics on the other stream: they go first
        for entry in chain:
            if id(entry) not in present:
                kind = _Python if entry.toxic.type == PYTHON else BUILTIN[entry.toxic.type]
                if entry.main is not None:
                    reverse = kind.reverse
                    assert reverse is not None  # an entry with a main half is of a kind with a reverse
                    first.append(reverse(entry, self, now))
                else:
                    stages.append(kind(entry, self, now))
        self.stages = first + stages

    def restructure(self) -> None:
        """A stage's place in the chain changed (a lingering one is done): sync at the pump's
        next chunk boundary, as after a change to the toxics."""
        self.version = -1

    def wake(self) -> None:
        """Something outside this link (the other direction's half of a protocol toxic) gave
        a stage something to do: make the pump run the chain soon, whatever it waits for."""
        conn = self.conn
        conn._hub.loop.run_callback(conn.kick, self.direction)

    def fail(self, message: str, exc_info=None) -> None:
        """A toxic written in Python failed: report it and end the connection (outcome ERROR),
        naming the toxic in both."""
        conn = self.conn
        report(log, f"conn#{conn.id}: {message}", exc_info)
        conn.abort(Outcome.ERROR, message)

    def plain(self) -> bool:
        """Nothing to do: no toxic acts on this connection (none, or toxicity said no),
        nothing is held and no capture listens, so the fast path may take over."""
        tap = self.tap
        if tap is not None:
            if tap.capture is not None:
                return False
            self.tap = None   # its capture stopped
        return not self.out and not any(stage.active or stage.queue for stage in self.stages)

    def busy(self) -> bool:
        """Holding bytes or waiting for a time: must not be parked."""
        return bool(self.out) or any(stage.queue or stage.due() is not None for stage in self.stages)

    def held(self) -> int:
        return self.out_size + sum(stage.size for stage in self.stages)

    def admit(self, item, now: float) -> None:
        if self.stages:
            self.stages[0].admit(item, now)
        else:
            self.out.append(item)
            self.out_size += _size(item)

    def advance(self, now: float) -> Optional[float]:
        """Move everything due by ``now`` along the chain; return the next due time."""
        stages = self.stages
        last = len(stages) - 1
        soonest = None
        for i, stage in enumerate(stages):
            while True:
                t = stage.due()
                if t is None or t > now:
                    break
                item = stage.take()
                if item is None:
                    continue
                if i < last:
                    stages[i + 1].admit(item, t)
                else:
                    self.out.append(item)
                    self.out_size += _size(item)
            if t is not None and t != _INF and (soonest is None or t < soonest):
                soonest = t
        return soonest

    # -- the pump ----------------------------------------------------------------------------

    def pump(self, src, dst, readable, writable, fair_share: int) -> bool:
        """Run the chain: True at the source's EOF (written out), False when the fast path
        may take over or the chain changed. A toxic that closes or resets the connection
        raises its Failure; a connection ended elsewhere raises Aborted. All state lives in
        this object, so the pump may be thrown out of a wait and rerun."""
        conn = self.conn
        context = conn.context
        counts, direction = conn.counts, self.direction
        budget = fair_share
        while True:
            if conn.outcome is not None:
                raise Aborted
            if self.version != context.toxic_version:
                return False   # the caller syncs and chooses the path again
            now = time.monotonic()
            soonest = self.advance(now)
            blocked = False
            out = self.out
            while out:
                item = out[0]
                if item.__class__ is _Marker:
                    out.popleft()
                    if item is _EOF:
                        if self.tap is not None:
                            self.tap.passed_eof(direction)
                        return True
                    raise Failure(Outcome.RESET if item.kind == "reset" else Outcome.CLOSED, item.reason)
                try:
                    sent = dst.send(item)
                except BlockingIOError:
                    sent = 0
                budget -= sent
                self.out_size -= sent
                if sent and self.tap is not None:
                    self.tap.wrote(direction, item if sent == len(item) else memoryview(item)[:sent])
                if sent < len(item):
                    out[0] = item[sent:]
                    blocked = True
                    break
                out.popleft()
            room = self.bound - self.held()
            reading = room > 0 and not self.eof
            if reading and budget > 0:
                try:
                    data = src.recv(min(room, _READ_MAX))
                except BlockingIOError:
                    data = None
                if data is not None:
                    if self.tap is not None:
                        if data:
                            self.tap.read(direction, data)
                        else:
                            self.tap.eof(direction)
                    if data:
                        counts[direction] += len(data)
                        budget -= len(data)
                        self.admit(data, now)
                    else:
                        self.eof = True
                        self.admit(_EOF, now)
                    continue
            if budget <= 0:
                delay = 0.0   # a fair share moved: let the loop poll everyone else first
            elif soonest is not None:
                delay = max(0.0, soonest - time.monotonic())
            else:
                delay = _MAX_WAIT
            self._wait(readable if reading else None, writable if blocked else None, delay)
            budget = fair_share

    def _wait(self, readable, writable, delay: float) -> None:
        """Wait for whichever comes first (``Connection.wait_any``: an abort wakes it too)."""
        watchers = [w for w in (readable, writable) if w is not None]
        self.waiting = getcurrent()  # what a toxic change throws _Switch into (relay's kick)
        try:
            self.conn.wait_any(watchers, min(delay, _MAX_WAIT))
        finally:
            self.waiting = None
