"""Counters, how connections end, and the per-connection record handed to hooks.

Typical use::

    fw.statistics()     # Statistics(active=2, accepted=10, connect_failed=1, ...)
    Forwarder(..., on_close=lambda rec: print(rec.outcome, rec.bytes_upstream))
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional

__all__ = ["Outcome", "ConnectionRecord", "Statistics", "Counters"]


class Outcome(enum.Enum):
    """How a connection ended."""

    EOF = "eof"                          #: both sides closed cleanly
    RESET = "reset"                      #: a side reset or failed; both were aborted
    IDLE_TIMEOUT = "idle timeout"        #: no byte either way for idle_timeout
    CONNECT_FAILED = "connect failed"    #: upstream refused, unreachable or unresolvable
    CONNECT_TIMEOUT = "connect timeout"  #: upstream did not answer within connect_timeout
    SHUTDOWN = "shutdown"                #: the forwarder stopped before the connection ended
    ERROR = "error"                      #: a bug in gproxy; logged with its traceback

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class ConnectionRecord:
    """One connection as hooks see it: on open ``outcome`` and ``duration`` are None."""

    id: int
    client: str
    upstream: str
    started: float                   #: time.time() when accepted
    bytes_upstream: int = 0          #: read from the client to forward upstream
    bytes_downstream: int = 0        #: read from upstream to forward to the client
    duration: Optional[float] = None  #: seconds from accept to teardown
    outcome: Optional[Outcome] = None
    error: Optional[str] = None      #: the network error, in words, when there was one


@dataclass(frozen=True)
class Statistics:
    """A snapshot of a forwarder's counters; bytes include open connections so far."""

    active: int
    accepted: int
    connect_failed: int
    bytes_upstream: int
    bytes_downstream: int


class Counters:
    """Totals of connections that ended; the forwarder adds the open ones on demand."""

    __slots__ = ("accepted", "connect_failed", "bytes_upstream", "bytes_downstream")

    def __init__(self) -> None:
        self.accepted = 0
        self.connect_failed = 0
        self.bytes_upstream = 0
        self.bytes_downstream = 0
