"""How a connection fails: ``Failure``, and the one rule that turns a socket error into one.

Typical use (the connect phase, the pumps, the toxic chain)::

    raise Failure(Outcome.DENIED, "bad PROXY header: ...")    # a decision: its outcome and line
    except OSError as exc:
        raise failure(exc, "client")                          # after the connect: RESET or ERROR
    except OSError as exc:
        raise connect_failure(exc, "10.0.0.7:80")             # connecting: CONNECT_FAILED/TIMEOUT

A connection's end is a result, not an exception that escapes (DESIGN.md 6): whatever ends a
connection early raises ``Failure`` to it (or, where nothing can be raised to, as in a hub
callback, hands its outcome and error to ``Connection.abort``), and the connection records
the first reason and ends. ``Aborted`` is the other thing a waiting connection may be thrown:
it was ended elsewhere, its reason is recorded already.

The rule from a socket error to an outcome, written once:

- Connecting to the target: an error that says no answer came in time (``ETIMEDOUT``) is
  ``CONNECT_TIMEOUT``; any other error is ``CONNECT_FAILED``. The line names the address.
- Afterwards (a PROXY header read or sent, the pumps): a peer that went away (a
  ``ConnectionError``, or an errno of ``_sockets.PEER_GONE``) is ``RESET``, and the line
  names the side and how: ``client reset: connection reset by peer``, ``upstream failed:
  connection timed out`` (a reset, a broken pipe or an aborted connection say "reset",
  the other ways a peer is lost say "failed").
- Any other error is a bug: ``ERROR``, with the traceback in the line.
"""

from __future__ import annotations

import errno
import os
import socket
import traceback
from typing import Optional, Union

from gproxy import _sockets
from gproxy.stats import Outcome

__all__ = ["Failure", "Aborted", "failure", "connect_failure", "tcp_closed"]


class Failure(Exception):
    """A connection ends early: its ``outcome`` and the ``error`` its log line shows; a failed
    connect also says why in one word, ``reason`` (one of ``stats.CONNECT_REASONS``; None:
    ``other``), for the per-target metrics."""

    def __init__(self, outcome: Outcome, error: str, reason: Optional[str] = None) -> None:
        super().__init__(outcome, error)
        self.outcome = outcome
        self.error = error
        self.reason = reason


class Aborted(Exception):
    """Thrown into a connection's wait, or raised before one, when the connection was ended
    elsewhere (``Connection.abort``): its outcome is recorded already, there is nothing to
    add. Never leaves the connection."""


#: errors that mean the peer reset (or closed under our write); the other errors of a peer
#: that is gone (a timeout, an unreachable host) say "failed"
_RESETS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED})

#: a failed connect's errno -> its reason (stats.CONNECT_REASONS); any other is "other". A
#: Unix socket whose file is gone (ENOENT) or whose queue is full (EAGAIN) refuses too.
_CONNECT_REASONS = {errno.ECONNREFUSED: "refused", errno.ENOENT: "refused", errno.EAGAIN: "refused",
                    errno.ETIMEDOUT: "timeout", errno.EHOSTUNREACH: "unreachable",
                    errno.ENETUNREACH: "unreachable", errno.EHOSTDOWN: "unreachable",
                    errno.ENETDOWN: "unreachable"}

#: tcpi_state of a TCP socket whose connection ended under it (linux/tcp_states.h TCP_CLOSE)
_TCP_CLOSE = 7


def failure(exc: BaseException, side: str, doing: str = "") -> Failure:
    """The Failure of a socket error met after the connect, on ``side`` ("client" or
    "upstream"); ``doing`` says what we did then (" while we sent the PROXY header")."""
    if isinstance(exc, ConnectionError) or (isinstance(exc, OSError) and exc.errno in _sockets.PEER_GONE):
        how = "reset" if exc.errno in _RESETS else "failed"
        return Failure(Outcome.RESET, f"{side} {how}{doing}: {_sockets.describe_error(exc)}")
    # (Python 3.9's format_exception needs all three)
    return Failure(Outcome.ERROR, "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))


def connect_failure(error: Union[int, BaseException], where: str) -> Failure:
    """The Failure of a connect to ``where`` (an address, or what was being done: "cannot
    open a socket") that failed with ``error``, an errno or an exception."""
    code = error if isinstance(error, int) else getattr(error, "errno", None)
    if isinstance(error, int):
        described = os.strerror(error).lower()
    else:
        described = _sockets.describe_error(error)
    timed_out = code == errno.ETIMEDOUT or isinstance(error, socket.timeout)
    return Failure(Outcome.CONNECT_TIMEOUT if timed_out else Outcome.CONNECT_FAILED, f"{where}: {described}",
                   "timeout" if timed_out else _CONNECT_REASONS.get(code or 0, "other"))


def tcp_closed(sock: socket.socket) -> bool:
    """Whether the kernel shows this TCP socket's connection ended (reset or timed out);
    False when it cannot say (a Unix socket, a system without TCP_INFO)."""
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == _TCP_CLOSE
    except (OSError, AttributeError):
        return False
