"""The ``trigger`` toxic: wait for a point in the stream, then reset, close, drop or delay.

Registered with the built-in toxics (``toxics.TYPES``) when ``gproxy.toxics`` is imported::

    fw.add_toxic("trigger", stream="upstream", match=r"SELECT pg_sleep", action="reset", delay=200)
    fw.add_toxic("trigger", after_bytes=1_000_000, action="drop")

Where it acts
-------------
The *trigger point* is a position in the byte stream of its direction, counted from when the
toxic started acting on the connection:

- ``match`` (a regular expression, given as a string and searched as bytes, encoded in UTF-8):
  the point is the end of a match. The search sees the current chunk and up to ``WINDOW``
  bytes before it, so a match of at most ``WINDOW + 1`` bytes is found however the stream is
  cut into chunks (a longer one only if it lies within one chunk and the ``WINDOW`` bytes
  before it). Anchors (``^``, ``\\A``) mean the start of that window, not of the stream.
- ``after_bytes`` (when ``match`` is empty): the point is after that many bytes (0: before the
  first byte).

What it does there (``action``), ``delay`` ms after the point passed (0: at once):

- ``reset`` / ``close``: the bytes before the point pass; so do those that arrive before the
  delay is up; then the connection is reset (RST both ways) or closed (FIN both ways), and
  what is left dies with it.
- ``drop``: as ``close``, but the connection stays open: from then on every byte of this
  direction is read and thrown away, and its EOF is held (a black hole, until the toxic is
  removed: then bytes pass again and a held EOF goes on).
- ``delay``: the stream pauses at the point for ``delay`` ms; what follows keeps its order.

``once`` (default true): it acts at the first point only, per connection; false: at every
match (matches do not overlap), or every ``after_bytes`` bytes. An update keeps what the
toxic has seen and whether it acted (as ``limit_data`` keeps its count); an update that rolls
it inactive calls a planned action off, and, active again, it starts afresh.
"""

from __future__ import annotations

import re
from typing import List, Optional

from gproxy._chain import _EOF, _builtin, _Marker, _Timed

__all__ = ["WINDOW", "ACTIONS"]

#: bytes before the current chunk that the regex still sees (a match this long, plus one
#: byte, is found across chunk boundaries): a search costs up to this much per chunk
WINDOW = 4096
ACTIONS = ("reset", "close", "drop", "delay")


def _compile(match: str) -> "re.Pattern[bytes]":
    return re.compile(match.encode("utf-8", "surrogatepass"))


@_builtin
class _Trigger(_Timed):
    type = "trigger"
    attributes = {"match": "", "after_bytes": 0, "action": "reset", "delay": 0, "once": True}

    @classmethod
    def check(cls, attributes):
        if attributes["action"] not in ACTIONS:
            return "action", f"must be one of {', '.join(ACTIONS)}, not {attributes['action']!r}"
        if attributes["match"]:
            if attributes["after_bytes"]:
                return "after_bytes", "give match or after_bytes, not both"
            try:
                _compile(attributes["match"])
            except (re.error, UnicodeError) as exc:
                return "match", f"is not a regular expression: {exc}"
        elif not attributes["once"] and not attributes["after_bytes"]:
            return "after_bytes", "must be at least 1 when once is false and there is no match"
        return None

    def configure(self, toxic, now):
        self.was_active = getattr(self, "active", False)
        super().configure(toxic, now)

    def setup(self, attributes, now):
        match = attributes["match"]
        self.pattern = _compile(match) if match else None
        self.after = attributes["after_bytes"]
        self.action = attributes["action"]
        self.delay = attributes["delay"] / 1000.0
        self.once = attributes["once"]
        self.next = None
        if not self.active:
            self.end = None          # called off; what is held passes at its time
            self.dropping = False
            return
        if not self.was_active:      # (again) acting on this connection: from scratch
            self.seen = 0            # bytes of this direction seen since
            self.window = b""        # the last WINDOW bytes seen (for match)
            self.resume = 0          # where the next match may start (matches do not overlap)
            self.fired: Optional[int] = None   # where it acted last
            self.hold = 0.0          # nothing after a delay's point leaves before this
            self.dropping = False
            self.end = None
            self.ended = False
        # the next after_bytes point, from the settings as they are now
        if self.pattern is not None or (self.once and self.fired is not None):
            self.point: Optional[int] = None
        else:
            self.point = self.after if self.fired is None else self.fired + self.after

    def due_time(self, t):
        return max(super().due_time(t), self.hold)

    # -- the stream ---------------------------------------------------------------------

    def accept(self, item, t):
        if self.ended:
            return   # the end is on its way: nothing passes it
        if self.dropping:
            if item.__class__ is not _Marker:
                return                   # thrown away
            if item is not _EOF:         # a close or reset from a stage before: it goes on,
                self.drop_all()          # and a held EOF means nothing any more
            self.push(item, t)
            return
        if item.__class__ is _Marker or (self.once and self.fired is not None):
            self.push(item, self.due_time(t))
            return
        start = 0
        offset = self.seen
        for point in self._points(item):
            if point > start:
                self.push(item[start:point], self.due_time(t))
                start = point
            self._act(t, offset + point)
            if self.end is not None:
                break   # an end is planned: the rest only waits for it
        if start < len(item):
            self.push(item[start:] if start else item, self.due_time(t))

    def _points(self, chunk) -> List[int]:
        """Where in ``chunk`` the trigger points are (offsets, in order), updating what was seen."""
        start = self.seen
        self.seen = end = start + len(chunk)
        points: List[int] = []
        if self.pattern is None:
            while self.point is not None and self.point <= end:
                points.append(max(self.point - start, 0))
                self.point = None if self.once else self.point + self.after
            return points
        window = self.window
        buffer = window + chunk if window else bytes(chunk)
        base = start - len(window)   # the stream offset of buffer[0]
        position = max(0, self.resume - base)
        while position <= len(buffer):
            found = self.pattern.search(buffer, position)
            if found is None:
                break
            stop = found.end()
            # a match may end before the chunk (a lookahead needed its bytes): it acts at its start
            points.append(max(stop - len(window), 0))
            self.resume = base + (stop if stop > found.start() else stop + 1)
            position = self.resume - base
            if self.once:
                break
        self.window = buffer[-WINDOW:]
        return points

    def _act(self, t: float, offset: int) -> None:
        self.fired = offset
        what = (f"matched {self.pattern.pattern.decode('utf-8', 'backslashreplace')!r}"
                if self.pattern is not None else f"after {offset} bytes")
        at = self.due_time(t) + self.delay
        if self.action == "delay":
            self.hold = at
        else:
            self.plan_end(at, self.action, f"trigger toxic {self.toxic.name} {what}")

    # -- timing -------------------------------------------------------------------------

    def schedule(self):
        if self.dropping:   # data never stays; a held EOF waits for the toxic to go
            if self.queue and self.queue[0][1] is not _EOF:
                return max(self.queue[0][0], self.last)
            return None
        return super().schedule()

    def fire(self):
        assert self.end is not None  # fire() follows _ending()
        if self.end[1] != "drop":
            return super().fire()
        self.end = None
        self.dropping = True
        kept = [entry for entry in self.queue if entry[1].__class__ is _Marker]
        self.drop_all()
        for when, item in kept:
            self.push(item, when)
        return None
