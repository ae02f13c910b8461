"""Protocol-aware toxics: answer some requests of a request/response protocol in place of the server.

A protocol is a module of its own (``_proto_redis.py``, ``_proto_http.py``, ``_proto_pg.py``)
with three parts: an incremental request parser, an incremental reply counter, and a toxic:
a subclass of ``Requests`` (registered with ``@_builtin``) whose ``answer(key)`` says, for each request, pass it on
(None), pass it on later (``Hold(seconds)``) or answer it (the reply's bytes), and whose
``reverse`` is a subclass of ``Replies`` (a toxic that never answers needs none).
``docs/toxics.md`` ("Protocol toxics: how they answer, and how to write one") writes one
from scratch, and ``tests/test_protocol_guide.py`` runs it.

Theory of operation
-------------------
One toxic is two stages on each connection, which share a ``Session``:

- The *request half* (``Requests``) runs on the toxic's stream, ``upstream``: the client's
  requests. It feeds the bytes it holds to the parser, as far as a decision needs, so a
  request cut anywhere, or many pipelined in one chunk, parse the same. Bytes are held only
  until the request they belong to is decided: a request passed on flows as it comes (a large
  body is never buffered), one to answer is held until it is answered.
- The *reply half* (``Replies``) runs on the other direction (``_Stage.reverse``: the same
  toxic has an entry in both chains). It counts the server's replies as they pass, and it is
  where answers join the reply stream. It is first on its stream as the request half is last
  on its own: the toxic added last is next to the server on both, so each reply half counts
  the replies to exactly the requests its own half passed on, and not the answers of another
  protocol toxic (which join the replies further from the server).

Order. The client must get the reply to request N after the replies to every request before
it. So the request half answers a request only when every request it passed on before has had
its reply counted, and the reply stream is between two replies; the answer then goes into the
reply half's queue, behind those replies. Until then it holds that request and everything behind
it: a pipeline waits one round trip at each answered request (the limit chosen here; answering
at once and holding the answer until N replies passed would keep the pipeline flowing, but a
toxic removed in between would leave an answer without its place). Each half wakes the other's
pump (``Link.wake``) when the other may act: an answer to write, replies caught up.

An answered request is answered once it has been read whole, so a request removed or rolled
out before that is given back, whole, and reaches the server (the chain's rule: a toxic gone
before it acted gives back what it caught). A request larger than ``EARLY`` bytes is answered
once that much of it has come (holding it all could fill the link and stop the reading), and
its rest is swallowed as it comes; a toxic removed while it swallows one stays (``lingers``)
until that request has ended, so the server never sees the rest of a request without its start.

Holding. A request to pass on later (``Hold``) is passed on as any other, once its time has
come: ``seconds`` after the chunk that decided it (the one with its head: a command's name, an
HTTP request's header section) arrived. Until then it and everything behind it wait, as they
must for its reply to come before theirs; the bytes before it go on. Removed before its time,
the toxic gives it back at once.

Where it stops. The toxic starts on a connection (added, or rolled active by an update)
assuming the connection is between requests with every reply in, as a client that waits for
its replies is between two of them. From then on it follows the protocol; when it cannot (bytes
it cannot parse, a request that switches protocol, replies it cannot match to requests: more
replies than requests), it stops acting on that connection for good and passes everything on.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Deque, Optional, Union, cast

from gproxy._chain import _EOF, _INF, _Marker, _Stage

__all__ = ["Requests", "Replies", "Session", "Off", "Hold", "EARLY"]

#: the most of a request to answer held before it is answered: the rest is swallowed as it comes
EARLY = 64 * 1024


class Off(Exception):
    """Raised by a reply counter: the stream does not follow the protocol (any more)."""


class Hold:
    """What ``answer(key)`` returns to pass a request on ``seconds`` after it came."""

    __slots__ = ("seconds",)

    def __init__(self, seconds: float):
        self.seconds = seconds


# The events a request parser's feed(data, position) returns with where it stopped (they happen
# there: it stops after the first byte that makes events, else at the end of data):
#   ("key", key, info, last): enough of the request is read to decide on it; it gets one reply;
#       ``info`` goes to the reply counter in order (None: nothing); ``last``: after it, the
#       connection may switch protocol, so the toxic stops acting once it is passed on
#   ("end",): the request ended; one without a "key" is filler that gets no reply
#   ("off",): the stream does not follow the protocol from here
KEY, END, OFF = "key", "end", "off"


class Session:
    """What the two halves of one toxic share on one connection."""

    __slots__ = ("toxic", "active", "draw", "requests", "replies", "passed", "replied", "infos", "off", "waiting")

    def __init__(self) -> None:
        self.toxic = None           # the toxic (record) that ``active`` was rolled for
        self.active = False
        self.draw: Optional[float] = None   # a scheduled toxic's one draw for this connection
        self.requests: Optional[Requests] = None   # the halves, while they act
        self.replies: Optional[Replies] = None
        self.passed = 0             # replies due: requests passed on since the request half began
        self.replied = 0            # replies counted since the reply half began
        self.infos: Deque[Any] = deque()   # per request passed on and not yet replied: its info
        self.off = False            # the protocol is not followed: pass everything
        self.waiting = False        # the request half waits for the replies to catch up

    def roll(self, toxic, rng) -> bool:
        """Whether the toxic acts on this connection: rolled once per toxic record, so the two
        halves, configured at different times, agree."""
        if toxic is not self.toxic:
            self.toxic = toxic
            if toxic.schedule is None:
                self.active = toxic.toxicity >= 1.0 or rng.random() < toxic.toxicity
            else:   # one draw per connection, as every stage of a scheduled toxic (_chain)
                if self.draw is None:
                    self.draw = rng.random()
                self.active = self.draw < toxic.toxicity
        return self.active

    def wake_requests(self) -> None:
        requests = self.requests
        if requests is not None:
            requests.next = None
            requests.link.wake()


def _session(stage: _Stage) -> Session:
    entry = stage.entry
    key = entry.main if entry.main is not None else entry
    session = stage.link.sessions.get(key)
    if session is None:
        session = stage.link.sessions[key] = Session()
    return cast(Session, session)  # link.sessions holds this module's Sessions only


class _Unit:
    """One request: where it starts, and what was decided about it."""

    __slots__ = ("start", "end", "keyed", "answer", "committed", "last")

    def __init__(self, start: int):
        self.start = start
        self.end: Optional[int] = None       # known once read to its end
        self.keyed = False                   # decided: passed on, or answered
        self.answer: Optional[bytes] = None  # the answer, if it is to be answered
        self.committed = False               # answered: its bytes are swallowed
        self.last = False


class Requests(_Stage):
    """The request half: a stage on the toxic's stream. Subclasses set ``parser_class`` (one
    parser per connection: ``feed(data, position)`` reads the bytes ``data`` from
    ``position``, and returns where it stopped and the events there) and ``reverse``, and
    implement ``answer``."""

    stream = "upstream"
    parser_class: Any = None

    def answer(self, key) -> Union[None, bytes, "Hold"]:
        """The answer to the request ``key`` (the parser's), None to pass it on, or
        ``Hold(seconds)`` to pass it on that much later."""
        raise NotImplementedError

    # -- settings and state ---------------------------------------------------------------

    def configure(self, toxic, now):
        was = getattr(self, "active", False)
        self.toxic = toxic
        session = self.session = _session(self)
        active = session.roll(toxic, self.link.random)
        # rolled out while swallowing an answered request: it finishes that request first
        self.rolled_out = was and not active and self.lingers()
        self.active = active or self.rolled_out
        self.next = None
        self.setup(toxic.attributes, now)
        if active and not was:
            self._begin()
        elif not hasattr(self, "unit"):
            self._fresh()   # made inactive: it only keeps the offsets
        if not self.active and session.requests is self:
            session.requests = None

    def _begin(self) -> None:
        """Start acting on this connection: it is taken to be between requests, every reply in."""
        session = self.session
        self._fresh()
        session.requests = self
        session.passed = 0
        session.infos.clear()
        session.off = False
        session.waiting = False

    def _fresh(self) -> None:
        self.parser = self.parser_class()
        self.unfed: Deque[list] = deque([item, 0, t] for t, item in self.queue
                                        if item.__class__ is not _Marker)   # [chunk, parsed up to, arrival]
        #: per held request, oldest first: [its start offset, when it may pass on]
        self.holds: Deque[list] = deque()
        self.offset = 0            # the stream offset of the first byte held
        self.fed = 0               # bytes given to the parser
        self.pass_until: float = 0  # bytes before this offset are passed on (_INF: all)
        self.unit = _Unit(0)       # the request at pass_until
        self.eof = any(item is _EOF for _t, item in self.queue)

    def lingers(self) -> bool:
        unit = getattr(self, "unit", None)
        return unit is not None and unit.committed and unit.end is None

    # -- the queue ---------------------------------------------------------------------------

    def accept(self, item, t):
        if item.__class__ is not _Marker and item.__class__ is not bytes:
            item = bytes(item)   # parsers search bytes in place
        self.push(item, t)
        if item.__class__ is not _Marker:
            self.unfed.append([item, 0, t])
        elif item is _EOF:
            self.eof = True
        self.next = None

    def pop(self):
        item = super().pop()
        if item.__class__ is not _Marker:
            self.offset += len(item)
        return item

    def _take(self, n: float):
        """At most ``n`` bytes off the head chunk."""
        head = self.queue[0]
        item = head[1]
        if len(item) <= n:
            return self.pop()
        cut = int(n)  # finite here: an allowance of _INF took the whole chunk above
        head[1] = item[cut:]
        self.size -= cut
        self.offset += cut
        return item[:cut]

    def drain(self):
        unit = getattr(self, "unit", None)
        if unit is not None and unit.committed and unit.end is not None:
            while self.queue and self.offset < unit.end:   # the rest of an answered request
                if self.queue[0][1].__class__ is _Marker:
                    break
                self._take(unit.end - self.offset)
        session = self.session
        if session.requests is self:
            session.requests = None
            session.waiting = False
        return super().drain()

    # -- deciding --------------------------------------------------------------------------

    def _swallowing(self) -> bool:
        unit = self.unit
        return unit.committed and (unit.end is None or self.offset < unit.end)

    def _plan(self) -> None:
        """Parse what is held as far as a decision needs: until a request to answer has been
        read whole (it waits to be answered), or the bytes run out."""
        session = self.session
        unit = self.unit
        while True:
            if session.off and not (unit.committed and unit.end is None):
                self.pass_until = _INF
                self.unfed.clear()
                return
            if unit.answer is not None and unit.end is not None:
                return
            if not self.unfed:
                if self.eof and unit.end is None and self.fed > unit.start:   # it ended inside a request
                    if unit.committed:
                        unit.end = self.fed
                    else:
                        self._off()
                    continue
                return
            piece = self.unfed[0]
            chunk, start, arrival = piece
            position, events = self.parser.feed(chunk, start)
            if position >= len(chunk):
                self.unfed.popleft()
            else:
                piece[1] = position
            self.fed += position - start
            if unit.keyed and unit.answer is None:
                self.pass_until = self.fed
            for event in events:
                kind = event[0]
                if kind == KEY:
                    unit.keyed = True
                    _kind, key, info, last = event
                    answer = None if session.off else self.answer(key)
                    if isinstance(answer, Hold):   # passed on, once its time has come
                        self.holds.append([unit.start, arrival + answer.seconds])
                        answer = None
                    if answer is None:
                        self.pass_until = self.fed
                        session.passed += 1
                        if info is not None:
                            session.infos.append(info)
                        unit.last = last
                    else:
                        unit.answer = answer
                elif kind == END:
                    unit.end = self.fed
                    if unit.answer is None:
                        self.pass_until = self.fed
                        if unit.last:
                            self._off()
                        unit = self.unit = _Unit(self.fed)
                else:   # OFF: what is not understood passes (the server answers it as it does)
                    if unit.committed:
                        unit.end = self.fed
                    self._off()

    def _off(self) -> None:
        """Stop acting on this connection for good: everything not answered passes."""
        session = self.session
        session.off = True
        session.waiting = False
        if not self._swallowing():
            self.pass_until = _INF
            self.unfed.clear()

    def _may_answer(self) -> bool:
        session = self.session
        replies = session.replies
        if session.off or replies is None or not replies.active or replies.toxic is not self.toxic:
            return False   # the reply half is not there yet (it wakes this one when it is)
        if session.replied > session.passed:   # replies to requests it never saw: out of step
            self._off()
            return False
        if session.replied < session.passed or not replies.counter.between():
            return False
        unit = self.unit
        return unit.end is not None or self.fed - unit.start >= EARLY

    def schedule(self):
        if not self.queue:
            return None
        arrival, item = self.queue[0]
        due = max(arrival, self.last)
        if item.__class__ is _Marker:
            return due
        self._plan()
        if self._swallowing():
            return due
        if self.offset < self.pass_until:
            holds = self.holds
            while holds and holds[0][0] < self.offset:   # on its way: its hold is over
                holds.popleft()
            if holds and holds[0][0] == self.offset:
                return max(due, holds[0][1])
            return due
        if self.unit.answer is not None:
            if self._may_answer():
                return due
            if self.offset < self.pass_until:   # it found the replies out of step: all passes
                return due
            self.session.waiting = True
        return _INF

    def release(self, t):
        if self.queue[0][1].__class__ is _Marker:
            return self.pop()
        unit = self.unit
        if not self._swallowing():
            if self.offset < self.pass_until:
                until = self.pass_until
                for start, _time in self.holds:   # up to the next held request's start
                    if start > self.offset:
                        until = min(until, start)
                        break
                return self._take(until - self.offset)
            unit.committed = True   # answered: from now on its bytes are swallowed
            self.session.waiting = False
            self.session.replies.put(unit.answer, t)
        self._take((unit.end if unit.end is not None else self.fed) - self.offset)
        if unit.end is not None and self.offset >= unit.end:
            self._answered(unit)
        return None

    def _answered(self, unit: _Unit) -> None:
        """An answered request was swallowed to its end."""
        self.unit = _Unit(unit.end)
        self.pass_until = unit.end
        if self.entry.removed:           # it stayed for that request only
            self._off()
            self.link.restructure()
        elif self.rolled_out:
            self.rolled_out = self.active = False
            if self.session.requests is self:
                self.session.requests = None


class Replies(_Stage):
    """The reply half: a stage on the other stream. Subclasses set ``counter_class`` (made
    with the session's ``infos``: ``feed(data)`` returns how many replies ended in ``data``
    and raises ``Off``; ``between()`` says whether it is between two replies)."""

    counter_class: Any = None

    def configure(self, toxic, now):
        was = getattr(self, "active", False)
        self.toxic = toxic
        session = self.session = _session(self)
        self.active = session.roll(toxic, self.link.random)
        self.next = None
        if self.active and not was:
            self.counter = self.counter_class(session.infos)
            session.replied = 0
        if self.active:
            session.replies = self
        elif session.replies is self:
            session.replies = None
        session.wake_requests()   # it may have waited for this half

    def accept(self, item, t):
        session = self.session
        if item.__class__ is not _Marker and not session.off:
            if item.__class__ is not bytes:
                item = bytes(item)   # counters search bytes in place
            try:
                counted = self.counter.feed(item)
            except Off:
                session.off = True
                counted = 0
            session.replied += counted
            if session.waiting or session.off:
                session.wake_requests()
        self.push(item, t)

    def put(self, answer: bytes, t: float) -> None:
        """An answer from the request half: it goes out behind what this half holds."""
        self.push(answer, max(t, self.queue[-1][0]) if self.queue else t)
        self.next = None
        self.link.wake()

    def drain(self):
        session = self.session
        if session.replies is self:
            session.replies = None
        return super().drain()
