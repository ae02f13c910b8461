"""The ``redis_error`` toxic: answer matching Redis commands with an error, in place of the server.

Registered with the built-in toxics when ``gproxy.toxics`` is imported, with ``redis_delay``,
which holds matching commands a while instead (the same parser, no answer)::

    fw.add_toxic("redis_error", stream="upstream", command="GET", error="LOADING Redis is loading")
    fw.add_toxic("redis_delay", stream="upstream", command="GET", delay=200)   # ms

``command`` is a command name (any case; empty: every command), or a name and its first
argument (``CONFIG SET``, ``CLIENT SETNAME``); ``error`` is the error reply's text, after the
``-`` (``OOM command not allowed when used memory > 'maxmemory'.``). A matching command never
reaches the server; the client gets ``-ERROR\\r\\n`` in its place, in order (how, and the
limits: ``_protocol``).

RESP, as read here (https://redis.io/docs/latest/develop/reference/protocol-spec/):

- Requests: arrays of bulk strings (``*2\\r\\n$3\\r\\nGET\\r\\n$1\\r\\nk\\r\\n``) or inline
  commands (a line, split at spaces). An empty line or an array of zero elements is filler that
  gets no reply, as Redis treats it. Anything else (a line longer than 64 KiB, an element that is
  no bulk string, a bad length) is not followed: the toxic stops acting on that connection and
  the server answers it as it does.
- Replies: RESP2 and RESP3 values. Push messages (``>``: invalidations, pub/sub in RESP3) and
  attributes (``|``) are not replies to a command and are not counted.
- After a command that changes what the replies are (``SUBSCRIBE``, ``PSUBSCRIBE``,
  ``SSUBSCRIBE``, ``MONITOR``, ``SYNC``, ``PSYNC``, ``CLIENT REPLY``) passes, the toxic stops
  acting on that connection (it passes everything).
- In a ``MULTI`` block a matching command gets the error instead of ``+QUEUED`` and is not
  queued; ``EXEC`` then runs the others (Redis itself would abort the transaction).
"""

from __future__ import annotations

from typing import Deque, List, Optional, Tuple

from gproxy._chain import _builtin
from gproxy._protocol import END, KEY, OFF, Hold, Off, Replies, Requests

__all__ = ["RespRequests", "RespReplies", "INLINE_MAX"]

#: the longest inline command or length line (Redis's PROTO_INLINE_MAX_SIZE)
INLINE_MAX = 64 * 1024
#: the longest command name or first argument kept to match (longer ones match only "")
_NAME_MAX = 1024

#: commands after which a connection no longer gets one reply per command
_MODE_CHANGES = {b"SUBSCRIBE", b"PSUBSCRIBE", b"SSUBSCRIBE", b"MONITOR", b"SYNC", b"PSYNC"}

# request parser states
_START, _INLINE, _COUNT, _LENGTH, _BULK = range(5)


class RespRequests:
    """Parses a client's commands, any cut: ``feed(data, position)`` -> (where it stopped,
    events): it stops after the first byte that makes events (a tuple of them, in order), else
    at the end of ``data`` (bytes, searched in place)."""

    def __init__(self) -> None:
        self.state = _START
        self.line = bytearray()   # a line being read, without its end
        self.args = 0             # elements of the array still to read
        self.index = 0            # the element being read
        self.skip = 0             # bytes of the current bulk string still to read (with its CRLF)
        self.words: List[Optional[bytes]] = []   # the name and first argument, as read
        self.keep: Optional[bytearray] = None     # the bulk being kept for words

    def feed(self, data: bytes, pos: int) -> Tuple[int, tuple]:
        size = len(data)
        while pos < size:
            state = self.state
            if state == _START:
                first = data[pos]
                if first == 0x2A:   # '*'
                    self.state = _COUNT
                    pos += 1
                elif 0x20 <= first < 0x7F or first in (0x09, 0x0A, 0x0D):
                    self.state = _INLINE
                else:   # TLS or any binary: at once, rather than hold it waiting for a line
                    return pos, ((OFF,),)
                continue
            if state == _BULK:
                n = min(self.skip, size - pos)
                if self.keep is not None:
                    self.keep += data[pos:pos + n]
                pos += n
                self.skip -= n
                if self.skip:
                    continue
                events = self._element_done()
                if events:
                    return pos, events
                continue
            # a line: up to its "\n"
            end = data.find(b"\n", pos, pos + INLINE_MAX + 2 - len(self.line))
            if end < 0:
                self.line += data[pos:]
                if len(self.line) > INLINE_MAX:
                    return size, ((OFF,),)
                return size, ()
            self.line += data[pos:end]
            pos = end + 1
            line = bytes(self.line)
            self.line.clear()
            if len(line) > INLINE_MAX:
                return pos, ((OFF,),)
            events = self._line(line)
            if events:
                return pos, events
        return pos, ()

    def _line(self, line: bytes) -> tuple:
        state = self.state
        if state == _INLINE:
            self.state = _START
            words = line.rstrip(b"\r").split()
            if not words:
                return (END,),   # filler: Redis ignores an empty line
            name = words[0].strip(b"\"'").upper()
            sub = words[1].strip(b"\"'").upper() if len(words) > 1 else None
            return self._key(name, sub), (END,)   # an inline command is all in its line
        if not line.endswith(b"\r"):
            return ((OFF,),)
        number = _number(line[:-1] if state == _COUNT else line[1:-1] if line[:1] == b"$" else None)
        if state == _COUNT:
            if number is None:
                return ((OFF,),)
            if number <= 0:
                self.state = _START
                return (END,),   # filler: an empty array gets no reply
            self.args, self.index, self.words = number, 0, []
            self.state = _LENGTH
            return ()
        if number is None or number < 0:   # _LENGTH: each element is a bulk string
            return ((OFF,),)
        self.skip = number + 2
        self.keep = bytearray() if self.index < 2 and number <= _NAME_MAX else None
        self.state = _BULK
        return ()

    def _element_done(self) -> tuple:
        if self.index < 2:
            self.words.append(bytes(self.keep[:-2]).upper() if self.keep is not None else None)
        self.keep = None
        self.index += 1
        event = None
        if self.index == min(self.args, 2):
            name = self.words[0] if self.words[0] is not None else b""
            event = self._key(name, self.words[1] if len(self.words) > 1 else None)
        if self.index == self.args:
            self.state = _START
            return ((END,),) if event is None else (event, (END,))
        self.state = _LENGTH
        return () if event is None else (event,)

    def _key(self, name: bytes, sub: Optional[bytes]) -> tuple:
        last = name in _MODE_CHANGES or (name == b"CLIENT" and sub == b"REPLY")
        return (KEY, (name, sub), None, last)


def _number(text: Optional[bytes]) -> Optional[int]:
    if text is None or not 0 < len(text) <= 20:
        return None
    try:
        return int(text)
    except ValueError:
        return None


class RespReplies:
    """Counts the server's replies, any cut: ``feed(data)`` -> replies that ended in it."""

    def __init__(self, infos: Deque) -> None:
        self.line = bytearray()
        self.skip = 0           # bytes of a blob still to come (with its CRLF)
        self.stack: List[list] = []   # open aggregates: [elements left, kind]
        self.kind = b""         # the type of the top-level value being read

    def between(self) -> bool:
        return not self.stack and not self.skip and not self.line

    def feed(self, data: bytes) -> int:
        count, pos, size = 0, 0, len(data)
        while pos < size:
            if self.skip:
                n = min(self.skip, size - pos)
                pos += n
                self.skip -= n
                if not self.skip:
                    count += self._value()
                continue
            end = data.find(b"\n", pos, pos + INLINE_MAX + 2 - len(self.line))
            if end < 0:
                self.line += data[pos:]
                if len(self.line) > INLINE_MAX:
                    raise Off("a reply line too long")
                return count
            self.line += data[pos:end]
            pos = end + 1
            line = bytes(self.line)
            self.line.clear()
            count += self._line(line)
        return count

    def _line(self, line: bytes) -> int:
        if len(line) < 2 or not line.endswith(b"\r"):
            raise Off(f"not a RESP line: {line[:20]!r}")
        kind, text = line[:1], line[1:-1]
        if not self.stack:
            self.kind = kind
        if kind in b"+-:_#,(":
            return self._value()
        number = _number(text)
        if number is None:
            raise Off(f"not a RESP length: {line[:20]!r}")   # ($? streamed strings included)
        if kind in b"$!=":
            if number < 0:
                return self._value()   # a null
            self.skip = number + 2
            return 0
        if kind in b"*~>%|":
            if number < 0:
                return self._value()   # a null array
            if kind in b"%|":
                number *= 2
            if number == 0:
                return self._value(kind)
            self.stack.append([number, kind])
            return 0
        raise Off(f"not a RESP type: {line[:20]!r}")

    def _value(self, kind: bytes = b"") -> int:
        """A value ended (an aggregate of ``kind`` if it was empty): 1 if it was a reply."""
        stack = self.stack
        while stack:
            if kind == b"|":   # an attribute is no element of what holds it
                return 0
            top = stack[-1]
            top[0] -= 1
            if top[0]:
                return 0
            kind = top[1]
            stack.pop()
        # a top-level value: a reply, unless a push message or an attribute
        return 0 if self.kind in (b">", b"|") else 1


class _RedisReplies(Replies):
    type = "redis_error"
    counter_class = RespReplies


@_builtin
class _RedisError(Requests):
    type = "redis_error"
    attributes = {"command": "", "error": "ERR injected by gproxy"}
    parser_class = RespRequests
    reverse = _RedisReplies

    @classmethod
    def check(cls, attributes):
        error = attributes["error"]
        if "\r" in error or "\n" in error:
            return "error", "must be one line (no CR or LF): it is sent as -ERROR\\r\\n"
        return _check_command(attributes["command"])

    def setup(self, attributes, now):
        self.words = _words(attributes["command"])
        self.reply = b"-" + attributes["error"].encode("utf-8", "surrogateescape") + b"\r\n"

    def answer(self, key):
        return self.reply if _matches(self.words, key) else None


@_builtin
class _RedisDelay(Requests):
    """Matching commands reach the server ``delay`` ms after they came, and so their replies,
    and every command and reply behind them, come that much later."""

    type = "redis_delay"
    attributes = {"command": "", "delay": 0}   # ms
    parser_class = RespRequests

    @classmethod
    def check(cls, attributes):
        return _check_command(attributes["command"])

    def setup(self, attributes, now):
        self.words = _words(attributes["command"])
        self.hold = Hold(attributes["delay"] / 1000.0)

    def answer(self, key):
        return self.hold if _matches(self.words, key) else None


def _check_command(command: str) -> Optional[Tuple[str, str]]:
    if len(command.split()) > 2:
        return "command", "a command name, or a name and its first argument"
    return None


def _words(command: str) -> Tuple[bytes, ...]:
    return tuple(word.encode("utf-8", "surrogateescape") for word in command.upper().split())


def _matches(words: Tuple[bytes, ...], key) -> bool:
    """Whether a command (the parser's key: its name and first argument, upper case) is one
    that ``command`` names (its words; none: every command)."""
    return not words or (key[0] == words[0] and (len(words) == 1 or key[1] == words[1]))
