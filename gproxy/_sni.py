"""SNI routing: a target chosen by the server name of a TLS ClientHello, read without terminating.

Typical use (``relay.Connection.run`` does this for a rule with ``route_sni``)::

    held = read_hello(conn)          # the client's first bytes; conn.sni says what they held
    upstream = _dial.connect_upstream(conn, spare)   # conn.sni.endpoint, or the rule's target
    replay(conn, upstream, held)     # the same bytes, untouched, ahead of the relay

    routes = Routes(rule.route_sni)  # {"db.example": ..., "*.cache.example": ...}
    routes.match("A.Cache.Example.")  # ("*.cache.example", Address("10.0.0.6", 6379))
    parser = HelloParser()
    parser.feed(some_bytes)           # None until it knows; then a Hello

How it works. The client's bytes are *read* (not peeked: a peek leaves the socket readable,
so waiting for the rest of a ClientHello split over TCP segments would spin), at most
``MAX_READ`` of them, and handed to ``HelloParser`` as they come; as soon as it has an
answer the reading stops, the target is connected, and every byte read is sent to it
first, in one write, before the pumps start (and splice, for bulk, as on any rule). The
target thus sees exactly what the client sent.

The parser (``HelloParser``) reads the TLS record layer incrementally: handshake records
may split the ClientHello anywhere, and TCP segments may split records anywhere; it keeps
the records' payload and parses the ClientHello once the handshake header's length is in.
Each byte is looked at once, so a client writing one byte at a time costs linear work.

What the client sent decides, as nginx's ``ssl_preread`` and HAProxy's ``req.ssl_sni``
users expect:

- a ClientHello with a server name that a route matches: that route's target;
- a ClientHello with a name no route matches, or with no name, or bytes that are not TLS
  at all (the first byte is not a handshake record: SSH, HTTP, an SSLv2 hello), or a
  malformed ClientHello: the rule's ``target`` (as nginx's ``map ... default`` and
  HAProxy's ``default_backend``), so one port can carry TLS and something else;
- no complete ClientHello within ``proxy_header_timeout`` (the timeout of every "the
  client owes us its first bytes before we dial" phase), the client's EOF in the middle of
  one, or a ClientHello longer than ``MAX_HELLO`` bytes: the client is closed, outcome
  ``denied`` (as nginx closes at ``preread_timeout`` and on a full preread buffer), one
  rate-limited line per client address. Its slot is free again at once.

Matching: names compare case-insensitively, with one trailing dot ignored; a route
``*.cache.example`` matches exactly one more label (``a.cache.example``, not
``a.b.cache.example`` nor ``cache.example``, unlike nginx's ``*.`` which matches any depth);
an exact route beats a wildcard. Names are compared in their ASCII (IDNA) form, which is
what clients send.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Tuple

from gproxy._failure import Failure, failure
from gproxy.config import Endpoint
from gproxy.stats import Outcome

__all__ = ["HelloParser", "Hello", "HelloError", "Routes", "Choice", "read_hello", "replay",
           "MAX_HELLO", "MAX_READ", "describe"]

#: the longest ClientHello (its handshake message, header included) gproxy waits for: the
#: default size of nginx's preread buffer and of HAProxy's; a real one is well under 2 KiB
#: (post-quantum key shares included), a few KiB with many session tickets
MAX_HELLO = 16384
#: the most bytes read from a client before deciding: MAX_HELLO in records of any size
#: (tiny records cost 5 bytes of header each), so a client cannot make gproxy hold more
MAX_READ = 2 * MAX_HELLO

_HANDSHAKE = 22         # TLS record content type
_CLIENT_HELLO = 1       # handshake message type
_SERVER_NAME = 0        # extension type (RFC 6066)
_HOST_NAME = 0          # server name type
_MAX_RECORD = 16384     # a TLS plaintext record's most payload (2^14)

_READ, _WRITE = 1, 2


class HelloError(Exception):
    """The client's first bytes cannot be routed by name, and why (for the log)."""


@dataclass(frozen=True)
class Hello:
    """What the client's first bytes were, once the parser knows.

    - ``tls``: a ClientHello (False: not TLS, or a malformed hello; ``why`` says which);
    - ``name``: its server name as sent (str, ASCII; bytes that are not are escaped), or None.
    """

    tls: bool
    name: Optional[str] = None
    why: Optional[str] = None


class HelloParser:
    """Feed it a client's bytes as they come; it answers once it knows (a ``Hello``), or
    raises ``HelloError`` for a ClientHello it will not wait for (too long)."""

    __slots__ = ("_wire", "_at", "_hello", "_need", "_seen")

    def __init__(self) -> None:
        self._wire = bytearray()   # record bytes not parsed yet (a partial record)
        self._hello = bytearray()  # the handshake bytes the records carried so far
        self._need: Optional[int] = None  # the handshake message's whole length, once known
        self._seen = 0             # wire bytes fed so far

    def feed(self, data: bytes) -> Optional[Hello]:
        """Add bytes; a Hello when the answer is known, else None (send more)."""
        if self._seen == 0 and data:
            first = data[0]
            if first != _HANDSHAKE:
                why = "an SSLv2 ClientHello" if first & 0x80 else "not TLS"
                return Hello(False, None, why)
        self._seen += len(data)
        wire = self._wire
        wire += data
        at = 0
        while len(wire) > at:  # (each header byte is judged as soon as it is in)
            if wire[at] != _HANDSHAKE:
                return Hello(False, None, f"a record of type {wire[at]} inside the ClientHello")
            if len(wire) - at >= 2 and wire[at + 1] != 3:
                return Hello(False, None, "not TLS (record version)")
            if len(wire) - at < 5:
                break
            length = int.from_bytes(wire[at + 3:at + 5], "big")
            if length == 0 or length > _MAX_RECORD:
                return Hello(False, None, f"a TLS record of {length} bytes")
            if len(wire) - at - 5 < length:
                break
            self._hello += wire[at + 5:at + 5 + length]
            at += 5 + length
            answer = self._handshake()
            if answer is not None:
                return answer
        if self._need is None and len(wire) - at > 5 and len(self._hello) < 4:
            # the handshake header may be in a record not complete yet: a length past the
            # bound is refused now, not after reading up to a record of it
            head = self._hello + wire[at + 5:at + 5 + 4 - len(self._hello)]
            if len(head) == 4 and head[0] == _CLIENT_HELLO and 4 + int.from_bytes(head[1:4], "big") > MAX_HELLO:
                raise HelloError(f"a ClientHello of {4 + int.from_bytes(head[1:4], 'big')} bytes "
                                 f"(gproxy reads at most {MAX_HELLO})")
        del wire[:at]
        if self._seen >= MAX_READ:
            raise HelloError(f"no ClientHello in the first {MAX_READ} bytes")
        return None

    def _handshake(self) -> Optional[Hello]:
        hello = self._hello
        if self._need is None:
            if len(hello) < 4:
                return None
            if hello[0] != _CLIENT_HELLO:
                return Hello(False, None, f"a TLS handshake of type {hello[0]}, not a ClientHello")
            self._need = 4 + int.from_bytes(hello[1:4], "big")
            if self._need > MAX_HELLO:
                raise HelloError(f"a ClientHello of {self._need} bytes (gproxy reads at most {MAX_HELLO})")
        if len(hello) < self._need:
            return None
        try:
            name = server_name(bytes(hello[4:self._need]))
        except ValueError as exc:
            return Hello(False, None, f"a malformed ClientHello: {exc}")
        return Hello(True, name)


def server_name(body: bytes) -> Optional[str]:
    """The host name in a ClientHello's body (RFC 8446 4.1.2, RFC 6066 3), or None;
    ValueError for a body that does not parse."""
    view = memoryview(body)
    at = 2 + 32  # legacy_version, random
    at = _skip(view, at, 1, 32, "session id")
    at = _skip(view, at, 2, 65534, "cipher suites")
    at = _skip(view, at, 1, 255, "compression methods")
    if at == len(view):
        return None  # no extensions at all (TLS 1.0 clients may send none)
    end = at + 2 + _number(view, at, 2, "extensions")
    if end != len(view):
        raise ValueError("the extensions do not fill the ClientHello")
    at += 2
    name: Optional[str] = None
    seen = set()
    while at < end:
        kind = _number(view, at, 2, "extension type")
        length = _number(view, at + 2, 2, "extension length")
        start, at = at + 4, at + 4 + length
        if at > end:
            raise ValueError("an extension runs past the end")
        if kind in seen:
            raise ValueError(f"extension {kind} twice")
        seen.add(kind)
        if kind == _SERVER_NAME:
            name = _host_name(view[start:at])
    return name


def _host_name(ext: memoryview) -> Optional[str]:
    """The host_name entry of a server_name extension."""
    total = _number(ext, 0, 2, "server name list")
    if total + 2 != len(ext) or total == 0:
        raise ValueError("a server name list of the wrong length")
    at = 2
    name = None
    while at < len(ext):
        kind = ext[at]
        length = _number(ext, at + 1, 2, "server name")
        value = ext[at + 3:at + 3 + length]
        if len(value) != length or length == 0:
            raise ValueError("a server name of the wrong length")
        at += 3 + length
        if kind == _HOST_NAME and name is None:
            name = bytes(value).decode("ascii", "backslashreplace")
    return name


def _number(view: memoryview, at: int, size: int, what: str) -> int:
    if at + size > len(view):
        raise ValueError(f"cut short in the {what}")
    return int.from_bytes(view[at:at + size], "big")


def _skip(view: memoryview, at: int, size: int, most: int, what: str) -> int:
    """Past a vector whose length takes ``size`` bytes."""
    length = _number(view, at, size, what)
    if length > most or at + size + length > len(view):
        raise ValueError(f"bad {what} length {length}")
    return at + size + length


# -- routes ----------------------------------------------------------------------------------

def normal_name(name: str) -> str:
    """A name as routes compare it: lower case, one trailing dot dropped."""
    name = name.lower()
    return name[:-1] if name.endswith(".") else name


class Routes:
    """A rule's ``route_sni``: exact names, and ``*.`` wildcards of one label."""

    __slots__ = ("exact", "wild")

    def __init__(self, routes: Iterable[Tuple[str, Endpoint]]) -> None:
        self.exact: Dict[str, Tuple[str, Endpoint]] = {}
        self.wild: Dict[str, Tuple[str, Endpoint]] = {}
        for pattern, endpoint in routes:  # validated and normalised by config.parse_route_sni
            if pattern.startswith("*."):
                self.wild[pattern[2:]] = (pattern, endpoint)
            else:
                self.exact[pattern] = (pattern, endpoint)

    def match(self, name: str) -> Optional[Tuple[str, Endpoint]]:
        """(the route, its target) for a server name, or None."""
        name = normal_name(name)
        found = self.exact.get(name)
        if found is not None:
            return found
        label, dot, parent = name.partition(".")
        if label and dot:
            return self.wild.get(parent)
        return None


@dataclass(frozen=True)
class Choice:
    """What a connection's first bytes chose, for its log line and record.

    - ``name``: the server name the ClientHello carried, or None;
    - ``route``: the ``route_sni`` key that matched, or None (the rule's target serves it);
    - ``endpoint``: that route's target, or None;
    - ``why``: why the rule's target serves it, in words, when no route did.
    """

    name: Optional[str]
    route: Optional[str] = None
    endpoint: Optional[Endpoint] = None
    why: Optional[str] = None


def describe(choice: Choice) -> str:
    """``sni db.example (route db.example)``, ``sni x.example (no route)``, ``not TLS``..."""
    if choice.name is not None:
        shown = choice.name if choice.name.isprintable() else repr(choice.name)
        return f"sni {shown} ({'route ' + choice.route if choice.route else 'no route'})"
    return choice.why or "no sni"


def choose(routes: Routes, hello: Hello) -> Choice:
    if not hello.tls:
        return Choice(None, why=hello.why)
    if hello.name is None:
        return Choice(None, why="no sni")
    found = routes.match(hello.name) if hello.name.isascii() and "\\" not in hello.name else None
    if found is None:
        return Choice(hello.name)
    return Choice(hello.name, found[0], found[1])


# -- on a connection -----------------------------------------------------------------------

def read_hello(conn) -> bytes:
    """Read the client's first bytes until ``HelloParser`` knows; set ``conn.sni`` (a
    Choice) and return every byte read, for ``replay``. Raises Failure (DENIED) when the
    client is closed instead (no ClientHello in time, EOF inside one, too long), Aborted
    when the connection is aborted meanwhile."""
    from gproxy._dial import _wait  # the connect phase's one wait (aborts reach it)

    context = conn.context
    client = conn.client
    timeout = context.rule.proxy_header_timeout
    deadline = time.monotonic() + timeout
    parser = HelloParser()
    held = bytearray()
    readable = conn._hub.loop.io(client.fileno(), _READ)
    try:
        while True:
            try:
                data = client.recv(MAX_READ - len(held))
            except BlockingIOError:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not _wait(conn, readable, remaining):
                    what = "ClientHello" if held else "byte"
                    raise Failure(Outcome.DENIED, f"no complete {what} within {timeout:g}s "
                                                  f"({len(held)} B read)") from None
                continue
            if not data:
                raise Failure(Outcome.DENIED, f"closed inside its ClientHello ({len(held)} B read)"
                              if held else "closed before sending anything")
            held += data
            hello = parser.feed(data)
            if hello is not None:
                break
    except HelloError as exc:
        raise Failure(Outcome.DENIED, str(exc)) from None
    except OSError as exc:
        raise failure(exc, "client") from None
    finally:
        readable.close()
    conn.counts[0] += len(held)  # counted when read, as the pumps count
    conn.sni = choose(context.sni_routes, hello)
    return bytes(held)


def replay(conn, upstream, held: bytes) -> None:
    """Send the bytes ``read_hello`` read to the connected upstream, ahead of everything the
    pumps will move. A fresh connection's send buffer takes them at once; if it does not,
    wait for it (bounded by ``connect_timeout``)."""
    from gproxy._dial import _wait

    if not held:
        return
    view = memoryview(held)
    writable = None
    try:
        while view:
            try:
                view = view[upstream.send(view):]
                continue
            except BlockingIOError:
                pass
            if writable is None:
                writable = conn._hub.loop.io(upstream.fileno(), _WRITE)
            if not _wait(conn, writable, conn.context.rule.connect_timeout):
                raise Failure(Outcome.CONNECT_TIMEOUT, "the target did not take the ClientHello",
                              "timeout")
    except OSError as exc:
        raise failure(exc, "upstream", " while we sent the ClientHello") from None
    finally:
        if writable is not None:
            writable.close()
    conn.spoke = 0
