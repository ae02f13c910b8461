"""The ``http_response`` toxic: answer matching HTTP/1.x requests in place of the server.

Registered with the built-in toxics when ``gproxy.toxics`` is imported, with ``http_delay``,
which holds matching requests a while instead (the same parser, no answer)::

    fw.add_toxic("http_response", stream="upstream", path="/api/", status=503, body="down for a test")
    fw.add_toxic("http_delay", stream="upstream", path="/api/", delay=2000)   # ms

``path`` is a prefix of the request target (``/api/`` matches ``/api/users?id=1``; an
absolute-form target, as a proxy gets, is matched by its path; empty: every request).
A matching request never reaches the server; the client gets ``status`` with ``body`` (a
``Content-Length`` and ``Content-Type: text/plain; charset=utf-8``), in order with the
server's other responses, and the connection stays usable (how, and the rules every protocol
toxic keeps: ``_protocol``).

HTTP/1.x as read here (RFC 9112):

- Requests: a request line ``METHOD TARGET HTTP/1.x``, header fields, then a body framed by
  ``Transfer-Encoding: chunked`` (with trailers) or ``Content-Length``, or none. Empty lines
  between requests are allowed. A header section longer than 64 KiB, a version other than 1.0
  or 1.1 (an HTTP/2 preface), ``Transfer-Encoding`` not ending in chunked, or conflicting
  lengths: the toxic stops acting on that connection and the server answers as it does.
- Responses: interim ones (1xx) are not counted; no body after HEAD, 204 or 304; a body
  framed by chunked or Content-Length, or read until the connection closes.
- After a request that may switch protocols (``CONNECT``, or ``Upgrade``) passes, the toxic
  stops acting on that connection; so after a ``101`` or a ``2xx`` to ``CONNECT``.
- The answer says ``Connection: close`` when the request asked for that (HTTP/1.0 without
  ``keep-alive``, or ``Connection: close``); the toxic never closes the connection itself.
- ``Expect: 100-continue`` gets no ``100 Continue`` from the toxic: a matching request is
  answered once its body came, which clients send after their own wait (curl: 1 s).
"""

from __future__ import annotations

import http
import re
from typing import Deque, Dict, List, Optional, Tuple
from urllib.parse import urlsplit

from gproxy._chain import _builtin
from gproxy._protocol import END, KEY, OFF, Hold, Off, Replies, Requests

__all__ = ["HttpRequests", "HttpResponses", "HEADERS_MAX"]

#: the longest header section (request line or status line, fields, trailers) followed
HEADERS_MAX = 64 * 1024
_LINE_MAX = 8 * 1024   # a chunk-size line
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
#: the bytes a request may start with: a method's, or an empty line's
_STARTS = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz\r\n")

# what a message's reader is doing
_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _TO_CLOSE = range(7)


class _Message:
    """What the framing of a request or a response needs: its start line and fields, read
    until the empty line. ``line`` collects one line at a time; ``lines`` the section."""

    def __init__(self) -> None:
        self.state = _HEAD
        self.line = bytearray()
        self.lines: List[bytes] = []
        self.size = 0      # bytes of the header section read (bounded)
        self.left = 0      # body or chunk bytes still to come

    def read_line(self, data: bytes, pos: int, limit: int) -> Tuple[int, Optional[bytes]]:
        """(new position, a whole line without its CRLF, or None when it needs more)."""
        end = data.find(b"\n", pos, pos + limit + 2 - len(self.line))
        if end < 0:
            self.line += data[pos:]
            if len(self.line) > limit:
                raise Off("a line too long")
            return len(data), None
        if self.line:
            self.line += data[pos:end]
            line = bytes(self.line)
            self.line.clear()
        else:
            line = data[pos:end]
        return end + 1, line[:-1] if line.endswith(b"\r") else line

    def head_line(self, data: bytes, pos: int) -> Tuple[int, Optional[bool]]:
        """Read the header section: (position, True once its empty line was read)."""
        pos, line = self.read_line(data, pos, HEADERS_MAX)
        if line is None:
            return pos, None
        self.size += len(line) + 2
        if self.size > HEADERS_MAX:
            raise Off("a header section too long")
        if line:
            self.lines.append(line)
            return pos, False
        return pos, True

    def fields(self) -> Tuple[bytes, Dict[bytes, bytes]]:
        """The start line and the fields (lower-case names; repeated ones joined by commas)."""
        start = self.lines[0]
        fields: Dict[bytes, bytes] = {}
        for line in self.lines[1:]:
            if line[:1] in (b" ", b"\t"):
                continue   # obsolete line folding: the value goes on (not needed for framing)
            name, colon, value = line.partition(b":")
            if not colon or not _TOKEN.fullmatch(name):
                raise Off("not a header field")
            name = name.lower()
            value = value.strip()
            fields[name] = fields[name] + b", " + value if name in fields else value
        self.lines = []
        self.size = 0
        return start, fields

    def framing(self, fields: Dict[bytes, bytes]) -> Optional[int]:
        """The body's framing from the fields: the state to read it in (None: no body)."""
        coding = fields.get(b"transfer-encoding")
        if coding is not None:
            if coding.split(b",")[-1].strip().lower() != b"chunked":
                raise Off("a transfer coding that is not chunked")
            return _CHUNK_SIZE
        length = fields.get(b"content-length")
        if length is not None:
            values = {value.strip() for value in length.split(b",")}
            if len(values) != 1 or not next(iter(values)).isdigit():
                raise Off("a bad Content-Length")
            self.left = int(next(iter(values)))
            return _LENGTH if self.left else None
        return None

    def body(self, data: bytes, pos: int) -> Tuple[int, bool]:
        """Read the body: (position, True once it ended)."""
        size = len(data)
        while pos < size:
            state = self.state
            if state in (_LENGTH, _CHUNK_DATA, _TO_CLOSE):
                if state == _TO_CLOSE:
                    return size, False
                n = min(self.left, size - pos)
                pos += n
                self.left -= n
                if self.left:
                    return pos, False
                if state == _LENGTH:
                    return pos, True
                self.state = _CHUNK_END
                continue
            pos, line = self.read_line(data, pos, _LINE_MAX if state != _TRAILERS else HEADERS_MAX)
            if line is None:
                return pos, False
            if state == _CHUNK_END:
                if line:
                    raise Off("a chunk longer than its size")
                self.state = _CHUNK_SIZE
            elif state == _CHUNK_SIZE:
                text = line.split(b";", 1)[0].strip()
                if not _HEX.fullmatch(text):
                    raise Off("not a chunk size")
                self.left = int(text, 16)
                self.state = _CHUNK_DATA if self.left else _TRAILERS
            else:   # _TRAILERS
                self.size += len(line) + 2
                if self.size > HEADERS_MAX:
                    raise Off("trailers too long")
                if not line:
                    self.size = 0
                    return pos, True
        return pos, False


class Request:
    """What a matching decision and an answer need to know of a request."""

    __slots__ = ("method", "target", "version", "close")

    def __init__(self, method: bytes, target: bytes, version: bytes, close: bool):
        self.method, self.target, self.version, self.close = method, target, version, close

    def path(self) -> bytes:
        if self.target.startswith(b"/") or self.target == b"*":
            return self.target
        parts = urlsplit(self.target)   # absolute-form (to a proxy), or authority-form (CONNECT)
        if not parts.netloc:
            return self.target
        return (parts.path or b"/") + (b"?" + parts.query if parts.query else b"")


class HttpRequests:
    """Parses a client's requests, any cut: ``feed(data, position)`` -> (where it stopped,
    events), stopping after the first byte that makes events."""

    def __init__(self) -> None:
        self.message = _Message()

    def feed(self, data: bytes, pos: int) -> Tuple[int, tuple]:
        message = self.message
        try:
            if message.state == _HEAD:
                while True:
                    if not message.lines and not message.line and pos < len(data) \
                            and data[pos] not in _STARTS:
                        raise Off("not a request")   # TLS, HTTP/2...: at once, not after 64 KiB
                    pos, done = message.head_line(data, pos)
                    if done is None:
                        return pos, ()
                    if not message.lines:   # an empty line between requests: filler
                        return pos, ((END,),)
                    if done:
                        return self._head(pos)
                    if len(message.lines) == 1:
                        _request_line(message.lines[0])
            pos, ended = message.body(data, pos)
            if ended:
                self.message = _Message()
                return pos, ((END,),)
            return pos, ()
        except Off:
            return pos, ((OFF,),)

    def _head(self, pos: int) -> Tuple[int, tuple]:
        message = self.message
        start, fields = message.fields()
        method, target, version = _request_line(start)
        connection = {token.strip().lower() for token in fields.get(b"connection", b"").split(b",")}
        close = b"close" in connection or (version == b"HTTP/1.0" and b"keep-alive" not in connection)
        switches = method == b"CONNECT" or (b"upgrade" in connection and b"upgrade" in fields)
        key = (KEY, Request(method, target, version, close), method, switches)
        state = message.framing(fields)
        if state is None:
            self.message = _Message()
            return pos, (key, (END,))
        message.state = state
        return pos, (key,)


def _request_line(line: bytes) -> List[bytes]:
    """METHOD TARGET VERSION, or Off."""
    parts = line.split(b" ")
    if len(parts) != 3 or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0") or not _TOKEN.fullmatch(parts[0]):
        raise Off("not an HTTP/1.x request line")
    return parts


class HttpResponses:
    """Counts the server's final responses, any cut: ``feed(data)`` -> responses that ended in
    it. ``infos`` holds the method of each request passed on and not answered yet."""

    def __init__(self, infos: Deque) -> None:
        self.infos = infos
        self.message = _Message()

    def between(self) -> bool:
        message = self.message
        return message.state == _HEAD and not message.lines and not message.line

    def feed(self, data: bytes) -> int:
        count, pos, size = 0, 0, len(data)
        while pos < size:
            message = self.message
            if message.state == _HEAD:
                pos, done = message.head_line(data, pos)
                if done and message.lines:   # (an empty line before a status line is skipped)
                    count += self._head()
                continue
            pos, ended = message.body(data, pos)
            if ended:
                count += self._ended()
        return count

    def _head(self) -> int:
        message = self.message
        start, fields = message.fields()
        parts = start.split(b" ", 2)
        if len(parts) < 2 or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0") or not (
                len(parts[1]) == 3 and parts[1].isdigit()):
            raise Off("not an HTTP/1.x status line")
        status = int(parts[1])
        method = self.infos[0] if self.infos else b"GET"
        if status == 101 or (method == b"CONNECT" and 200 <= status < 300):
            raise Off("the connection switches protocols")
        if status < 200:
            return 0   # interim: the final response is still to come
        if method == b"HEAD" or status in (204, 304):
            return self._ended()
        state = message.framing(fields)
        if state is None:
            if b"content-length" in fields or b"transfer-encoding" in fields:
                return self._ended()   # Content-Length: 0
            message.state = _TO_CLOSE  # read until the server closes: nothing after it
            return 0
        message.state = state
        return 0

    def _ended(self) -> int:
        if self.infos:
            self.infos.popleft()
        self.message = _Message()
        return 1


class _HttpReplies(Replies):
    type = "http_response"
    counter_class = HttpResponses


@_builtin
class _HttpResponse(Requests):
    type = "http_response"
    attributes = {"status": 503, "body": "", "path": ""}
    parser_class = HttpRequests
    reverse = _HttpReplies

    @classmethod
    def check(cls, attributes):
        status = attributes["status"]
        if not 200 <= status <= 599:
            return "status", f"must be a final status, from 200 to 599, not {status}"
        if status in (204, 304) and attributes["body"]:
            return "body", f"must be empty: a {status} response has no body"
        return _check_path(attributes["path"])

    def setup(self, attributes, now):
        self.status = attributes["status"]
        self.body = attributes["body"].encode("utf-8", "surrogateescape")
        self.path = attributes["path"].encode("utf-8", "surrogateescape")
        try:
            self.reason = http.HTTPStatus(self.status).phrase.encode()
        except ValueError:
            self.reason = b"Injected"

    def answer(self, request: Request) -> Optional[bytes]:
        if self.path and not request.path().startswith(self.path):
            return None
        head = [b"HTTP/1.1 %d %s" % (self.status, self.reason)]
        if self.status not in (204, 304):
            head.append(b"Content-Type: text/plain; charset=utf-8")
            head.append(b"Content-Length: %d" % len(self.body))
        if request.close:
            head.append(b"Connection: close")
        elif request.version == b"HTTP/1.0":
            head.append(b"Connection: keep-alive")
        body = b"" if request.method == b"HEAD" else self.body
        return b"\r\n".join(head) + b"\r\n\r\n" + body


@_builtin
class _HttpDelay(Requests):
    """Matching requests reach the server ``delay`` ms after their header section came, and
    so their responses, headers first, and every request and response behind them, come that
    much later."""

    type = "http_delay"
    attributes = {"delay": 0, "path": ""}   # ms
    parser_class = HttpRequests

    @classmethod
    def check(cls, attributes):
        return _check_path(attributes["path"])

    def setup(self, attributes, now):
        self.path = attributes["path"].encode("utf-8", "surrogateescape")
        self.hold = Hold(attributes["delay"] / 1000.0)

    def answer(self, request: Request) -> Optional[Hold]:
        if self.path and not request.path().startswith(self.path):
            return None
        return self.hold


def _check_path(path: str) -> Optional[Tuple[str, str]]:
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in path):
        return "path", "must have no spaces or control characters: it is matched to a request target"
    return None
