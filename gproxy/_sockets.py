"""Small socket helpers: raw non-blocking sockets, tuning, half-close, abort, errno names.

Typical use::

    sock = raw_socket(family, fileno=fd)   # the real socket class, non-blocking
    tune(sock)                              # TCP_NODELAY + keepalive
    half_close(sock)                        # our FIN, the read half stays open
    abort(sock)                             # RST instead of FIN, then close

gproxy moves bytes on the interpreter's own socket objects, not gevent's
wrappers: the pumps wait for readiness on their own watchers (see relay.py),
so they need nothing from gevent's socket but its event loop. The original
class is taken from gevent.monkey so this works after ``patch_all()`` too.
"""

from __future__ import annotations

import _socket
import errno
import os
import socket
import struct
from typing import Any

__all__ = [
    "RawSocket", "raw_socket", "tune", "half_close", "abort", "describe_error", "describe_address",
    "endpoint", "FD_EXHAUSTED", "PEER_GONE",
]

#: the interpreter's C socket type itself. gevent patches ``socket``, never ``_socket``; and
#: ``socket.socket``'s Python layers (``__init__``, ``close`` -> ``_real_close``, the
#: ``family`` property building an enum) cost a few microseconds per connection for nothing.
RawSocket = _socket.socket

#: a stream socket created non-blocking: one syscall instead of socket() then ioctl()
_STREAM_NONBLOCK = socket.SOCK_STREAM | getattr(socket, "SOCK_NONBLOCK", 0)

#: accept() failures that mean "no fds or memory left now": pause, do not die.
FD_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

#: errors that mean the peer went away: a network event, not a bug.
PEER_GONE = frozenset({
    errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED, errno.ETIMEDOUT,
    errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.ENOTCONN,
    errno.ECONNREFUSED, errno.EHOSTDOWN, errno.ENETRESET,
})

_AF_UNIX = getattr(socket, "AF_UNIX", None)

_LINGER_ZERO = struct.pack("ii", 1, 0)

#: seconds of silence before the first keepalive probe, between probes, and probes
#: before the kernel declares the peer dead: about 2.5 minutes in all.
_KEEPALIVE = (60, 10, 9)


def raw_socket(family: int, fileno: int | None = None) -> RawSocket:
    """A non-blocking stream socket of the interpreter's own C class (``fileno``: wrap that fd)."""
    if fileno is None:
        sock = RawSocket(family, _STREAM_NONBLOCK)
        if _STREAM_NONBLOCK == socket.SOCK_STREAM:  # no SOCK_NONBLOCK on this platform
            sock.setblocking(False)
        return sock
    sock = RawSocket(family, socket.SOCK_STREAM, 0, fileno)
    sock.setblocking(False)  # accept() gives a blocking fd whatever the listener is
    return sock


def tune(sock: RawSocket) -> None:
    """No Nagle delay (a forwarder must not add latency) and keepalive to find dead peers.
    A Unix socket has neither, and needs neither."""
    if sock.family == _AF_UNIX:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        idle, interval, count = _KEEPALIVE
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
    except OSError:
        pass  # a peer that reset before we got here; the pump will find out


def half_close(sock: RawSocket) -> None:
    """Send our FIN; reading goes on. A peer already gone is not an error here."""
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def abort(sock: RawSocket) -> None:
    """Close with RST (SO_LINGER 0), so the peer learns the connection failed."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
    except OSError:
        pass
    sock.close()


def describe_error(exc: BaseException) -> str:
    """'connection reset by peer' rather than '[Errno 104] Connection reset by peer'."""
    if isinstance(exc, socket.gaierror) and exc.strerror:
        return exc.strerror.lower()  # its errno is a resolver code, not an errno
    if isinstance(exc, OSError) and exc.errno is not None:
        return os.strerror(exc.errno).lower()
    if isinstance(exc, socket.timeout):
        return "timed out"
    return str(exc) or type(exc).__name__


def endpoint(address: Any) -> Any:
    """A socket address as records give it: ``(host, port)`` for IP (an IPv6 address's flow
    info and scope id dropped), the path or abstract name (str or bytes) for a Unix socket."""
    if isinstance(address, tuple) and len(address) > 2:
        return address[:2]
    return address


def describe_address(address: Any) -> str:
    """'127.0.0.1:80' or '[::1]:80' from a socket address tuple; 'unix:/path', 'unix:@name'
    or 'unix' (a client socket with no name) from a Unix socket's."""
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    if isinstance(address, bytes):
        address = address.decode(errors="replace")
    if isinstance(address, str):
        if not address:
            return "unix"
        return "unix:@" + address[1:] if address.startswith("\0") else "unix:" + address
    return str(address)
