"""The ``pg_error`` toxic: answer matching PostgreSQL queries with an error, in place of the server.

Registered with the built-in toxics when ``gproxy.toxics`` is imported::

    fw.add_toxic("pg_error", stream="upstream", query="UPDATE accounts", code="40001",
                 message="could not serialize access due to concurrent update")

``query`` is a regular expression (Python's ``re``, any case) matched at the start of a query's
SQL text, after its leading white space: a plain ``UPDATE`` is a prefix, ``.*FOR UPDATE`` finds
it anywhere; empty matches every query. ``code`` is the SQLSTATE (five characters: ``40001``
serialization failure, ``57P01`` admin shutdown, ``53300`` too many connections), ``message``
the error's text. A matching query never reaches the server; the client gets an
``ErrorResponse`` (severity ``ERROR``) and a ``ReadyForQuery``, in order, and the session goes
on (how, and the rules every protocol toxic keeps: ``_protocol``).

The frontend/backend protocol 3.0, as read here
(https://www.postgresql.org/docs/current/protocol-flow.html):

- Packets without a type byte (the startup packet, ``SSLRequest``, ``GSSENCRequest``,
  ``CancelRequest``) are told from typed messages by their first byte (a length's high byte,
  0; no message type is 0). They never match. The single-byte answer to ``SSLRequest`` or
  ``GSSENCRequest`` passes; after an ``S`` or ``G`` (TLS or GSSAPI encryption follows) the toxic
  cannot see the queries and stops acting on that connection: use ``sslmode=disable`` (or
  ``prefer`` against a server without TLS) for a connection this toxic is to act on.
- The simple protocol: a ``Query`` (``Q``) is one request; its SQL text is matched. Every
  statement of a multi-statement query gets the one error, as a failing first one would.
- The extended protocol: every message up to and including ``Sync`` is one request (the
  server answers it with one ``ReadyForQuery``; after an error it skips the rest to
  ``Sync``, which the toxic does too). It is decided by its first message: a ``Parse`` by its
  SQL, a ``Bind`` by the SQL its statement was prepared with (the last 256 named statements
  parsed on the connection are remembered), anything else never matches. A later statement in
  the same batch before one ``Sync`` (a pipeline) is not looked at. A matching batch is
  answered once its ``Sync`` came: a client that waits for results after a ``Flush``, before
  its ``Sync`` (psycopg's pipeline mode fetching mid-pipeline), waits until it sends one.
- ``CopyData``, ``CopyDone``, ``CopyFail``, ``Terminate`` and ``PasswordMessage`` (and the
  other authentication replies) outside a batch get no reply of their own. A ``FunctionCall``
  passes. An unknown message type or a bad length: the toxic stops acting on that connection.
- The ``ReadyForQuery`` of an answer reports ``I`` (idle) when the server last reported idle,
  else ``E`` (a failed transaction), as a real error would. The server's transaction is not
  aborted: a client that rolls back after an error (psycopg does, drivers do) is unaffected;
  one that goes on in the transaction finds the server going on too. A toxic added to a
  connection inside a transaction reports ``I`` until the server's next ``ReadyForQuery``.
- Only the first 4 KiB of a query's SQL text are matched.
"""

from __future__ import annotations

import re
from typing import Deque, Dict, Optional, Tuple

from gproxy._chain import _builtin
from gproxy._protocol import END, KEY, OFF, Off, Replies, Requests

__all__ = ["PgRequests", "PgReplies", "SQL_MAX", "STATEMENTS"]

#: the most of a query's SQL text (of a Parse or Bind message's body) kept to match
SQL_MAX = 4096
#: named prepared statements remembered per connection (their SQL, to match a Bind by)
STATEMENTS = 256
#: the longest untyped packet (PostgreSQL's own limit on the startup packet)
_PACKET_MAX = 10000
#: the longest typed message (PostgreSQL's: 1 GiB)
_MESSAGE_MAX = 0x3FFFFFFF

_SSL_REQUEST, _GSSENC_REQUEST, _CANCEL_REQUEST = 80877103, 80877104, 80877102
# what the reply counter is told about each request passed on: how its reply ends
_MESSAGES, _ONE_BYTE = "messages", "byte"   # ... at a ReadyForQuery; a single byte ('N', 'S', 'G')

_BATCH = frozenset(b"PBDECH")   # extended-protocol messages that open (or go on with) a batch
_FILLER = frozenset(b"dcfXp")   # messages with no reply of their own


class PgRequests:
    """Parses a client's messages, any cut: ``feed(data, position)`` -> (where it stopped,
    events): it stops after the first byte that makes events, else at the end of ``data``."""

    def __init__(self) -> None:
        self.head = bytearray()   # the header being read: type and length, or length and code
        self.kind = 0             # the message's type byte (0: an untyped packet)
        self.left = 0             # body bytes still to come
        self.body: Optional[bytearray] = None   # the body kept (to SQL_MAX), to decide on
        self.batch = False        # inside an extended-protocol batch (up to its Sync)
        self.deciding = False     # this message is to make the request's KEY (not made yet)
        self.statements: Dict[bytes, bytes] = {}   # statement name -> its SQL (to SQL_MAX)

    def feed(self, data: bytes, pos: int) -> Tuple[int, tuple]:
        size = len(data)
        while pos < size:
            if self.left:
                n = min(self.left, size - pos)
                body = self.body
                if body is not None and len(body) < SQL_MAX:
                    n = min(n, SQL_MAX - len(body))
                    body += data[pos:pos + n]
                    if len(body) >= SQL_MAX and self.deciding and self.left > n:
                        pos += n   # decided on what is kept, so a long one is never held whole
                        self.left -= n
                        return pos, (self._key(),)
                pos += n
                self.left -= n
                if not self.left:
                    return pos, self._message()
                continue
            head = self.head
            if not head:
                head.append(data[pos])
                pos += 1
                continue
            want = 8 if head[0] == 0 else 5
            n = min(want - len(head), size - pos)
            head += data[pos:pos + n]
            pos += n
            if len(head) < want:
                continue
            events = self._header()
            if events or not self.left:
                return pos, events if events else self._message()
            if self.deciding and self.body is None:   # nothing in it to decide by: at once
                return pos, (self._key(),)
        return pos, ()

    def _header(self) -> tuple:
        head = self.head
        if head[0] == 0:
            length = int.from_bytes(head[:4], "big")
            if not 8 <= length <= _PACKET_MAX:
                return ((OFF,),)
            self.kind, self.left = 0, length - 8
            self.body = None
            return ()
        kind, length = head[0], int.from_bytes(head[1:5], "big")
        if not 4 <= length <= _MESSAGE_MAX:
            return ((OFF,),)
        if self.batch:
            if kind not in _BATCH and kind not in b"Sdcf":
                return ((OFF,),)
        elif kind in _BATCH:
            self.batch = self.deciding = True
        elif kind in b"QSF":
            self.deciding = True
        elif kind not in _FILLER:
            return ((OFF,),)   # not this protocol (TLS, another protocol)
        self.kind, self.left = kind, length - 4
        self.body = bytearray() if kind in b"QPB" else None
        return ()

    def _message(self) -> tuple:
        """A message ended (its body is kept to SQL_MAX): the events it makes."""
        kind, body = self.kind, self.body
        code = int.from_bytes(self.head[4:8], "big") if kind == 0 else 0
        self.head.clear()
        self.body = None
        if kind == 0:
            if code == _CANCEL_REQUEST:
                return ((END,),)
            info = _ONE_BYTE if code in (_SSL_REQUEST, _GSSENC_REQUEST) else _MESSAGES
            return (KEY, None, info, False), (END,)
        if kind == 0x50:   # 'P': remember its SQL by its name, to match Binds
            name, sql = _strings(body, 2)
            if name and sql is not None:
                statements = self.statements
                statements.pop(name, None)
                if len(statements) >= STATEMENTS:
                    del statements[next(iter(statements))]
                statements[name] = sql
            elif sql is not None:
                statements = self.statements
                statements[b""] = sql   # the unnamed statement: replaced by each Parse
        events: tuple = (self._key(kind, body),) if self.deciding else ()
        if self.batch:
            if kind == 0x53:   # 'S': Sync ends the batch
                self.batch = False
                events += ((END,),)
            return events
        return events + ((END,),)

    def _key(self, kind: Optional[int] = None, body: Optional[bytearray] = None) -> tuple:
        """The KEY event of the request this message decides (by its body as kept)."""
        self.deciding = False
        if kind is None:
            kind, body = self.kind, self.body
        sql = None
        if kind == 0x51:   # Query: the SQL
            sql = _strings(body, 1)[0]
        elif kind == 0x50:   # Parse: a name, the SQL
            sql = _strings(body, 2)[1]
        elif kind == 0x42:   # Bind: a portal, a statement's name
            statement = _strings(body, 2)[1]
            sql = None if statement is None else self.statements.get(statement)
        return (KEY, sql, _MESSAGES, False)


def _strings(body: Optional[bytearray], count: int) -> list:
    """The first ``count`` NUL-terminated strings of a body (as kept: the last may be cut at
    SQL_MAX, and is then given as it is; None past its end)."""
    found: list = []
    pos = 0
    data = bytes(body) if body is not None else b""
    for _ in range(count):
        if pos > len(data):
            found.append(None)
            continue
        end = data.find(b"\0", pos)
        if end < 0:
            end = len(data)
        found.append(data[pos:end])
        pos = end + 1
    return found


class PgReplies:
    """Counts the server's replies (a ReadyForQuery ends one; so does the one-byte answer to an
    SSLRequest or GSSENCRequest), any cut: ``feed(data)`` -> replies that ended in it."""

    def __init__(self, infos: Deque) -> None:
        self.infos = infos
        self.head = bytearray()
        self.left = 0              # body bytes still to come
        self.status = b"I"         # the transaction status of the server's last ReadyForQuery

    def between(self) -> bool:
        return not self.head and not self.left

    def feed(self, data: bytes) -> int:
        count, pos, size = 0, 0, len(data)
        infos = self.infos
        while pos < size:
            if self.left:
                n = min(self.left, size - pos)
                if self.head[0] == 0x5A:   # 'Z': its one byte is the status
                    self.status = data[pos:pos + 1]
                pos += n
                self.left -= n
                if not self.left:
                    if self.head[0] == 0x5A:
                        count += self._counted()
                    self.head.clear()
                continue
            if not self.head and infos and infos[0] == _ONE_BYTE:
                if data[pos] != 0x4E:   # 'N': no encryption; 'S', 'G': the queries go out of sight
                    raise Off("the connection is encrypted")
                pos += 1
                count += self._counted()
                continue
            n = min(5 - len(self.head), size - pos)
            self.head += data[pos:pos + n]
            pos += n
            if len(self.head) < 5:
                continue
            length = int.from_bytes(self.head[1:5], "big")
            if not 4 <= length <= _MESSAGE_MAX:
                raise Off(f"not a PostgreSQL message: {bytes(self.head)!r}")
            self.left = length - 4
            if not self.left:
                self.head.clear()
        return count

    def _counted(self) -> int:
        if self.infos:
            self.infos.popleft()
        return 1


class _PgReplies(Replies):
    type = "pg_error"
    counter_class = PgReplies

    def put(self, answer: bytes, t: float) -> None:
        # the status is the one the server would report after the error: known only now, with
        # every reply before it counted
        status = b"I" if self.counter.status == b"I" else b"E"
        super().put(answer[:-1] + status, t)


@_builtin
class _PgError(Requests):
    type = "pg_error"
    attributes = {"query": "", "code": "XX000", "message": "injected by gproxy"}
    parser_class = PgRequests
    reverse = _PgReplies

    @classmethod
    def check(cls, attributes):
        code = attributes["code"]
        if not re.fullmatch(r"[0-9A-Z]{5}", code):
            return "code", "a SQLSTATE: five digits or upper-case letters (40001, 57P01)"
        if "\0" in attributes["message"]:
            return "message", "must have no NUL character"
        try:
            re.compile(attributes["query"])
        except re.error as error:
            return "query", f"not a regular expression: {error}"
        return None

    def setup(self, attributes, now):
        self.pattern = re.compile(attributes["query"], re.IGNORECASE | re.DOTALL)
        self.reply = error_response(attributes["code"], attributes["message"])

    def answer(self, key):
        if key is None:
            return None
        sql = key.decode("utf-8", "replace").lstrip()
        return self.reply if self.pattern.match(sql) else None


def error_response(code: str, message: str, status: bytes = b"I") -> bytes:
    """An ErrorResponse (severity ERROR) and a ReadyForQuery with ``status``."""
    fields = b"".join(kind + text.encode("utf-8", "surrogateescape") + b"\0"
                      for kind, text in ((b"S", "ERROR"), (b"V", "ERROR"), (b"C", code), (b"M", message)))
    body = fields + b"\0"
    return b"E" + (len(body) + 4).to_bytes(4, "big") + body + b"Z\0\0\0\5" + status
