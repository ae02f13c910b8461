"""Captures: what crosses a forwarder, written as a pcap file while it runs (``_pcap.py``'s format).

Typical use (``Forwarder.capture`` makes one; the relay and the chain call the taps)::

    with fw.capture("run.pcap"):                 # every connection, open ones from now on
        ...
    cap = fw.capture("one.pcap", connection=7)   # only connection 7 (it may be open already)
    cap.stop()

Where it hooks in
-----------------
A captured connection runs both directions through its toxic chain (``_chain.Link``), even
with no toxic: the chain is the one path where Python sees every byte (the fast path's
splice(2) and the bulk lanes move bytes in the kernel). A ``Tap`` on the connection's two
links hears what the chain reads from a source, what it writes to a destination, a source's
EOF and the EOF passed on (our half-close); the teardown tells it how the connection ended.
With no capture nothing of this exists: ``Context.capture`` is None, read once per connection
(when its pumps start), and the pumps are untouched.

What the file shows
-------------------
Each connection is two TCP conversations, as a capture on the proxy's host would show:

- client <-> listener (the client's real address, not one a PROXY header gave, and the
  listening socket's local address): what the client sent, as read, and what it was sent,
  as written;
- proxy <-> target (the upstream socket's local address and the target's): what was written
  to the target, and what it answered, as read.

With toxics the two differ exactly by what the toxics did (a ``redis_error`` answer is on
the client side only; a ``latency`` shows in the timestamps). A side on a Unix socket has no
IP addresses to show and is left out. A capture started while a connection is open joins it
at its next chunk, with a handshake made up then: its earlier bytes are not in the file. A
connection's end is written as it happened: a peer's EOF is its FIN, ours follows when the
EOF was passed on (or at the close), a reset is an RST from the peer that reset (a ``client
reset``/``upstream reset`` outcome) or from the proxy (an abort).

Writing
-------
Records are built and written on the forwarder's hub as the bytes move, into a buffered file
(``BUFFER`` bytes): memory stays bounded by that buffer, and the hub makes one write(2) per
buffer's worth, to the page cache. Nothing is dropped: on a disk slower than the traffic the
forwarder slows with it (a capture is a debugging tool, and a capture with holes would mislead).
A write that fails (disk full) ends the capture with one log line; the connections go on.
"""

from __future__ import annotations

import io
import logging
import os
import time
from typing import IO, TYPE_CHECKING, Any, Callable, List, Optional, Set, Tuple, Union

from gproxy import _pcap
from gproxy._chain import Link
from gproxy.stats import Outcome

if TYPE_CHECKING:
    from gproxy.relay import Connection

__all__ = ["Capture", "Tap", "BUFFER"]

log = logging.getLogger("gproxy.capture")

#: bytes buffered before a write(2): each flush blocks the hub for one write of this size
BUFFER = 256 * 1024

# outcomes whose teardown aborts both sockets (relay._teardown): an RST, not a FIN
_RESETS = (Outcome.RESET, Outcome.SHUTDOWN, Outcome.ERROR, Outcome.DENIED)


class Capture:
    """One pcap file being written from one forwarder's connections (or one of them).

    ``file`` is a path (created or truncated; with ``exclusive`` created, mode 0600, or
    ``FileExistsError``) or a writable binary file object (written to and flushed, never
    closed). ``connection`` is a connection id to capture alone, or
    None for every connection. A context manager: ``stop()`` on exit."""

    def __init__(self, file: Union[str, "os.PathLike[str]", IO[bytes]], connection: Optional[int] = None,
                 on_stop: Optional[Callable[["Capture"], None]] = None, exclusive: bool = False) -> None:
        if hasattr(file, "write"):
            self.path: Optional[str] = getattr(file, "name", None)
            self._file: Any = file
            self._owned = False
        else:
            self.path = os.fspath(file)
            if exclusive:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                self._file = io.open(fd, "wb", buffering=BUFFER)
            else:
                self._file = io.open(self.path, "wb", buffering=BUFFER)
            self._owned = True
        self.connection = connection
        #: connections captured so far
        self.connections = 0
        #: False once stopped (or once a write failed)
        self.running = True
        self._taps: Set[Tap] = set()
        self._on_stop = on_stop
        self.write(_pcap.file_header())

    def __enter__(self) -> "Capture":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<Capture {self.path or self._file!r} {'running' if self.running else 'stopped'}>"

    def stop(self) -> None:
        """Stop capturing and flush (and close, if it opened it) the file; the connections
        go back to their fast path. Idempotent."""
        if self._on_stop is not None:
            on_stop, self._on_stop = self._on_stop, None
            on_stop(self)   # the forwarder detaches it, on its hub, and calls close()
        else:
            self.close()

    # -- on the forwarder's hub ------------------------------------------------------------

    def wants(self, conn: "Connection") -> bool:
        if not self.running or (self.connection is not None and self.connection != conn.id):
            return False
        links = conn.links   # tapped already: a capture joined it, then another forwarder's
        return links is None or all(link is None or link.tap is None for link in links)

    def rebind(self, on_stop: Callable[["Capture"], None]) -> None:
        """Another forwarder owns it now (``Forwarder.take_capture``): ``stop()`` goes there."""
        if self._on_stop is not None:
            self._on_stop = on_stop

    def attach(self, conn: "Connection") -> bool:
        """Capture ``conn`` (connected, its pumps started) from its next chunk: True, or False
        when neither side has IP addresses to show. The caller makes its pumps pick their
        path again if they may be on the fast path."""
        tap = Tap.of(self, conn)
        if tap is None:
            return False
        links = conn.links
        context = conn.context
        if links is None:
            links = conn.links = [None, None]
            context.linked = True  # its pumps may be in their CHAIN: parking passes walk
        for direction in (0, 1):
            link = links[direction]
            if link is None:
                link = links[direction] = Link(conn, direction, context.toxics, context.rule.buffer_size)
            link.tap = tap
        self._taps.add(tap)
        self.connections += 1
        return True

    def detach(self, tap: "Tap") -> None:
        self._taps.discard(tap)

    def detach_all(self) -> int:
        """Forget every tap: their links stop calling them, and let the fast path take over
        at their next sync (``Link.plain``). How many there were."""
        taps, self._taps = self._taps, set()
        for tap in taps:
            tap.capture = None
        return len(taps)

    def write(self, data: bytes) -> None:
        if not data or not self.running:
            return
        try:
            self._file.write(data)
        except (OSError, ValueError) as exc:   # ValueError: a file object closed under us
            log.warning("capture %s: writing failed, capture stopped: %s", self.path or self._file, exc)
            self.running = False
            self.detach_all()

    def close(self) -> bool:
        """Flush, and close a file it opened; True the first time."""
        if self._file is None:
            return False
        file, self._file = self._file, None
        self.running = False
        try:
            if self._owned:
                file.close()
            else:
                file.flush()
        except OSError as exc:
            log.warning("capture %s: writing failed: %s", self.path or file, exc)
        return True


def _ip(address: Any) -> Optional[Tuple[str, int]]:
    """(host, port) of an IP socket address; None for a Unix one."""
    if isinstance(address, tuple) and len(address) >= 2 and isinstance(address[0], str):
        return address[0], address[1]
    return None


class Tap:
    """What the two links of one captured connection report, as records in the capture.

    ``convs[0]`` is client (side 0) <-> listener (side 1), ``convs[1]`` proxy (side 0) <->
    target (side 1); either is None for a Unix side. Direction ``d`` (relay.UPSTREAM = 0,
    DOWNSTREAM = 1) reads its source on ``convs[d]``, as side ``d``, and writes its
    destination on ``convs[1 - d]``, as side ``d``."""

    __slots__ = ("capture", "convs", "_last")

    def __init__(self, capture: Capture,
                 convs: Tuple[Optional[_pcap.Conversation], Optional[_pcap.Conversation]]) -> None:
        self.capture: Optional[Capture] = capture   # None once it stopped listening
        self.convs = convs
        #: per direction, the chunk read last and its segments' payload sums: written on as
        #: the same object (a chain that changed nothing), it is not summed again
        self._last: List[Optional[Tuple[Any, List[int]]]] = [None, None]

    @classmethod
    def of(cls, capture: Capture, conn: "Connection") -> Optional["Tap"]:
        t = time.time()
        client = upstream = None
        peer = _ip(conn.peer)
        if peer is not None:
            try:
                listener = _ip(conn.client.getsockname())
            except OSError:
                listener = None
            if listener is not None:
                client = _pcap.Conversation(peer, listener)
        ends = conn.upstream_ends()
        if ends is not None:
            target, local = _ip(ends[0]), _ip(ends[1])
            if target is not None and local is not None:
                upstream = _pcap.Conversation(local, target)
        if client is None and upstream is None:
            return None
        tap = cls(capture, (client, upstream))
        for conv in tap.convs:
            if conv is not None:
                capture.write(conv.handshake(t))
        return tap

    def read(self, direction: int, data) -> None:
        conv = self.convs[direction]
        if conv is not None and self.capture is not None:
            sums: List[int] = []
            self.capture.write(conv.send(direction, data, time.time(), sums))
            self._last[direction] = (data, sums)

    def wrote(self, direction: int, data) -> None:
        conv = self.convs[1 - direction]
        if conv is not None and self.capture is not None:
            last = self._last[direction]
            sums = last[1] if last is not None and last[0] is data else None
            self.capture.write(conv.send(direction, data, time.time(), sums))

    def eof(self, direction: int) -> None:
        """The source of ``direction`` sent its FIN."""
        conv = self.convs[direction]
        if conv is not None and self.capture is not None:
            self.capture.write(conv.fin(direction, time.time()))

    def passed_eof(self, direction: int) -> None:
        """The EOF of ``direction`` was passed on: our FIN to its destination."""
        conv = self.convs[1 - direction]
        if conv is not None and self.capture is not None:
            self.capture.write(conv.fin(direction, time.time()))

    def ended(self, outcome: Optional[Outcome], error: Optional[str]) -> None:
        """The connection's teardown: the RSTs of an abort, or our FINs of a close."""
        capture = self.capture
        if capture is None:
            return
        t = time.time()
        for side_name, peer, conv in (("client", 0, self.convs[0]), ("upstream", 1, self.convs[1])):
            if conv is None:
                continue
            proxy = 1 - peer
            if outcome in _RESETS:
                by_peer = outcome is Outcome.RESET and (error or "").startswith(side_name + " reset")
                capture.write(conv.rst(peer if by_peer else proxy, t))
            else:
                capture.write(conv.fin(proxy, t))
        capture.detach(self)
        self.capture = None
