"""The zero-copy pump: bytes go socket -> pipe -> socket with splice(2), never through Python.

Typical use (the forwarder picks it when the platform has ``os.splice``)::

    splicer = SplicePump(buffer_size=262144)
    splicer.pump(conn, src, dst, readable, writable, direction)   # same contract as relay.copy_pump
    splicer.close()                                                # when the forwarder stops

The pump keeps the shape and rules of ``relay.copy_pump``: wait on the source,
move one chunk, wait on the destination while it is full, hand the loop back
after ``FAIR_SHARE`` bytes, return at clean EOF, let socket errors propagate.
It splices only while reads fill the buffer (bulk); small messages are copied.

Pipes cost two fds each, so they are not owned by connections: a pump takes a
pipe from a shared pool when its source has data, and gives it back empty
before it waits for more. An idle connection holds no pipe; a pump holds one
only while a chunk is on its way, or while its destination is not reading.
When no pipe can be had (out of fds) that chunk is copied through user space.
"""

from __future__ import annotations

import fcntl
import os
from typing import List, Optional, Tuple

from gproxy.relay import FAIR_SHARE, send_rest

__all__ = ["SplicePump"]

_splice = os.splice  # ImportError/AttributeError here means: no splice on this platform
_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)

#: empty pipes kept for the next chunk; more than this are closed when given back.
_KEEP_IDLE = 32

Pipe = Tuple[int, int]


class SplicePump:
    """A pump that splices through pooled pipes; one instance per forwarder (per hub)."""

    def __init__(self, buffer_size: int):
        self.chunk = buffer_size
        self._idle: List[Pipe] = []

    def pump(self, conn, src, dst, readable, writable, direction: int) -> None:
        """The pump: ``Context.pump`` is this bound method (a plain call, unlike ``__call__``,
        adds no C stack frame, and every idle connection's greenlets save their C stack).

        Like HAProxy's splice-auto it copies until a read fills the whole buffer: a small
        message costs two syscalls copied and four spliced (in and out of the pipe), while
        a bulk stream saves two copies of every byte. It copies again after a small read."""
        src_fd, dst_fd = src.fileno(), dst.fileno()
        wait, splice_chunk = conn.waiter(), self._splice_chunk
        # the copy path is copy_chunk inlined: it is the whole cost of a small message
        recv_into, send, counts = src.recv_into, dst.send, conn.counts
        scratch, view = conn.context.scratch, conn.context.scratch_view
        copy_size = len(scratch)
        budget = FAIR_SHARE
        spliced = False
        while True:
            if spliced:
                n = splice_chunk(conn, src_fd, dst_fd, writable, direction, wait)
                if n is None:  # no fd for a pipe: copy
                    spliced = False
                    continue
                if 0 < n < copy_size:
                    spliced = False
            else:
                try:
                    n = recv_into(scratch)
                except BlockingIOError:
                    n = -1
                if n > 0:
                    counts[direction] += n
                    try:
                        sent = send(view[:n])
                    except BlockingIOError:
                        sent = 0
                    if sent != n:
                        send_rest(wait, dst, scratch, sent, n, writable)
                    spliced = n == copy_size
            if n > 0:
                budget -= n
                if budget > 0 and n >= copy_size:
                    continue  # a full read: more is likely waiting
            elif n == 0:
                return
            # Drained (a short read needs no EAGAIN to confirm it), or the fair share is spent.
            wait(readable)
            budget = FAIR_SHARE

    def _splice_chunk(self, conn, src_fd: int, dst_fd: int, writable, direction: int,
                      wait) -> Optional[int]:
        """Splice once from src into a pipe and all of it on to dst: the bytes moved, 0 at EOF,
        -1 if src had nothing, None if no pipe could be had."""
        pipe = self._take()
        if pipe is None:
            return None
        pipe_out, pipe_in = pipe
        try:
            n = _splice(src_fd, pipe_in, self.chunk, flags=_FLAGS)
            if n > 0:
                conn.counts[direction] += n  # counted when read, as in copy_chunk
                left = n
                while left:
                    try:
                        left -= _splice(pipe_out, dst_fd, left, flags=_FLAGS)
                    except BlockingIOError:
                        wait(writable)
        except BlockingIOError:
            n = -1
        except BaseException:  # an error or abort mid-chunk: the pipe may hold stale bytes
            _close(pipe)
            raise
        self._give(pipe)  # empty: everything read was written
        return n

    def _take(self) -> Optional[Pipe]:
        if self._idle:
            return self._idle.pop()
        try:
            pipe_out, pipe_in = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            fcntl.fcntl(pipe_in, _F_SETPIPE_SZ, self.chunk)
        except OSError:
            pass  # over /proc/sys/fs/pipe-max-size: the default pipe still works
        return pipe_out, pipe_in

    def _give(self, pipe: Pipe) -> None:
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
