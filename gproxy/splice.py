"""Zero-copy chunks: bytes go socket -> pipe -> socket with splice(2), never through Python.

Typical use (``relay.pump`` does this once a read fills the buffer)::

    splicer = Splicer(buffer_size=262144)
    n = splicer.chunk(conn, src_fd, dst_fd, writable, direction, wait)
    splicer.close()                       # when the forwarder stops

The pump's loop, its closing rules and its fairness stay in ``relay.pump``; this
module only moves one chunk and keeps the pipes.

Pipes cost two fds each, so they are not owned by connections: a chunk takes a
pipe from a shared pool and gives it back empty. An idle connection holds no
pipe; a pump holds one only while a chunk is on its way, or while its
destination is not reading. When no pipe can be had (out of fds) the pump
copies that chunk through user space instead.
"""

from __future__ import annotations

import fcntl
import os
from typing import Any, Callable, List, Optional, Tuple

__all__ = ["Splicer", "Unfinished"]

_splice = os.splice  # ImportError/AttributeError here means: no splice on this platform
_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)

#: empty pipes kept for the next chunk; more than this are closed when given back.
_KEEP_IDLE = 32

Pipe = Tuple[int, int]


class Unfinished(Exception):
    """Raised by a chunk's ``wait`` to give the chunk up mid-way without losing it: chunk()
    passes it on holding the pipe, the bytes still in it, and the chunk's size, for
    ``Splicer.finish`` (an offload lane hands the rest of a chunk to the hub this way)."""

    pipe: Optional["Pipe"] = None
    left = 0
    n = 0


_Chunk = Unfinished  # for the annotations in Splicer, whose own ``Unfinished`` is a class attribute


class Splicer:
    """Moves chunks with splice(2) through pooled pipes; one per forwarder (per hub)."""

    #: for offload.py, which must import on platforms without this module's fcntl
    Unfinished = Unfinished

    def __init__(self, buffer_size: int):
        self.size = buffer_size
        self._idle: List[Pipe] = []

    def chunk(self, conn: Any, src_fd: int, dst_fd: int, writable: Any, direction: int,
              wait: Callable[[Any], None]) -> Optional[int]:
        """Splice once from src into a pipe and all of it on to dst: the bytes moved, 0 at EOF,
        -1 if src had nothing, None if no pipe could be had. Waits with ``wait(writable)`` (the
        pump's wait in the event loop, or a lane thread's poll in offload.py) only while dst
        is not taking what was read; an exception from it closes the pipe and passes on."""
        pipe = self.take()
        if pipe is None:
            return None
        pipe_out, pipe_in = pipe
        left = 0
        try:
            n = _splice(src_fd, pipe_in, self.size, flags=_FLAGS)
            if n > 0:
                conn.counts[direction] += n  # counted when read, as in relay.pump
                left = n
                while left:
                    try:
                        left -= _splice(pipe_out, dst_fd, left, flags=_FLAGS)
                    except BlockingIOError:
                        wait(writable)
        except BlockingIOError:
            n = -1
        except Unfinished as unfinished:  # the caller writes the rest: the pipe goes with it
            unfinished.pipe, unfinished.left, unfinished.n = pipe, left, n
            raise
        except BaseException:  # an error or abort mid-chunk: the pipe may hold stale bytes
            _close(pipe)
            raise
        self.give(pipe)  # empty: everything read was written
        return n

    def finish(self, unfinished: _Chunk, dst_fd: int, writable: Any, wait: Callable[[Any], None]) -> int:
        """Write what an Unfinished chunk left in its pipe to dst, waiting with
        ``wait(writable)``; the chunk's size, as chunk() would have returned it."""
        pipe, unfinished.pipe = unfinished.pipe, None
        assert pipe is not None, "finished twice"
        pipe_out = pipe[0]
        left = unfinished.left
        try:
            while left:
                try:
                    left -= _splice(pipe_out, dst_fd, left, flags=_FLAGS)
                except BlockingIOError:
                    wait(writable)
        except BaseException:
            _close(pipe)
            raise
        self.give(pipe)
        return unfinished.n

    @staticmethod
    def drop(unfinished: _Chunk) -> None:
        """Close an Unfinished chunk's pipe, bytes and all (its connection is ending)."""
        pipe, unfinished.pipe = unfinished.pipe, None
        if pipe is not None:
            _close(pipe)

    def take(self) -> Optional[Pipe]:
        """An empty pipe (pooled or new), or None when no fd is left. Safe from any thread."""
        try:
            return self._idle.pop()
        except IndexError:
            pass
        try:
            pipe_out, pipe_in = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            fcntl.fcntl(pipe_in, _F_SETPIPE_SZ, self.size)
        except OSError:
            pass  # over /proc/sys/fs/pipe-max-size: the default pipe still works
        return pipe_out, pipe_in

    def give(self, pipe: Pipe) -> None:
        """Return an empty pipe to the pool. Safe from any thread."""
        if len(self._idle) < _KEEP_IDLE:
            self._idle.append(pipe)
        else:
            _close(pipe)

    def close(self) -> None:
        while self._idle:
            _close(self._idle.pop())


def _close(pipe: Pipe) -> None:
    for fd in pipe:
        os.close(fd)
