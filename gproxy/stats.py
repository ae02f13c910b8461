"""Counters, how connections end, and the per-connection record handed to hooks.

Typical use::

    fw.statistics()     # Statistics(active=2, accepted=10, connect_failed=1, ...)
    Forwarder(..., on_close=lambda rec: print(rec.outcome, rec.bytes_upstream))
"""

from __future__ import annotations

import enum
from bisect import bisect_left
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple, Union

__all__ = ["Outcome", "ConnectionRecord", "Statistics", "Counters", "DURATION_BUCKETS", "SocketAddress"]

#: an end of a connection: ``(host, port)`` for IPv4 and IPv6, the path (or, abstract, the
#: name after a NUL: bytes) for a Unix socket; ``""`` for a Unix client socket with no name
SocketAddress = Union[Tuple[str, int], str, bytes]


class Outcome(enum.Enum):
    """How a connection ended."""

    EOF = "eof"                          #: both sides closed cleanly
    RESET = "reset"                      #: a side reset or failed; both were aborted
    IDLE_TIMEOUT = "idle timeout"        #: no byte either way for idle_timeout
    CONNECT_FAILED = "connect failed"    #: upstream refused, unreachable or unresolvable
    CONNECT_TIMEOUT = "connect timeout"  #: upstream did not answer within connect_timeout
    SHUTDOWN = "shutdown"                #: the forwarder stopped before the connection ended
    CLOSED = "closed"                    #: closed on purpose: a toxic, close_connection(), disable()
    ERROR = "error"                      #: a bug in gproxy; logged with its traceback
    DENIED = "denied"                    #: refused by allow/deny, a per-client limit or a bad PROXY header

    def __str__(self) -> str:
        return self.value

    # Enum hashes a member by its name, in Python, at every dict lookup (Counters.outcomes,
    # once per connection); its members are singletons, compared by identity: hash them so.
    __hash__ = object.__hash__


@dataclass(frozen=True)
class ConnectionRecord:
    """One connection as hooks see it: on open ``outcome`` and ``duration`` are None.

    Both ends as socket addresses: ``client_address`` (the client as the forwarder sees it)
    and, once the upstream is connected, ``upstream_local_address``, the forwarder's own end
    of the upstream connection: the client address the target sees (PostgreSQL's
    ``pg_stat_activity.client_port``, Redis's ``CLIENT LIST`` ``addr``), and
    ``upstream_address``, the target's end. ``client`` and ``upstream`` are the same in words
    (``upstream`` names the target as configured)."""

    id: int                          #: 1 for a forwarder's first connection, then counting up
    client: str                      #: the client's address in words: ``"127.0.0.1:50412"``
    upstream: str                    #: the target connected to (or being tried), as configured
    started: float                   #: time.time() when accepted
    bytes_upstream: int = 0          #: read from the client to forward upstream
    bytes_downstream: int = 0        #: read from upstream to forward to the client
    duration: Optional[float] = None  #: seconds from accept to teardown
    outcome: Optional[Outcome] = None
    error: Optional[str] = None      #: the network error, in words, when there was one
    #: the client's address (a trusted PROXY header's source, when it sent one)
    client_address: Optional[SocketAddress] = None
    #: the target's address as connected: None until the upstream is connected
    upstream_address: Optional[SocketAddress] = None
    #: the forwarder's end of the upstream connection, which the target sees as its client:
    #: None until connected (and in an ``on_close`` record of a connection that never was)
    upstream_local_address: Optional[SocketAddress] = None


@dataclass(frozen=True)
class Statistics:
    """A snapshot of a forwarder's counters; bytes include open connections so far."""

    active: int
    accepted: int
    connect_failed: int
    bytes_upstream: int
    bytes_downstream: int


#: upper bounds (seconds) of the connection duration histogram's buckets; +Inf is implied
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)


class Counters:
    """Totals of connections that ended; the forwarder adds the open ones on demand.

    Fed by relay once per connection (at accept, at the end of each connect, at teardown),
    never per chunk; read by ``statistics()`` and ``metrics.render`` without walking the
    open connections."""

    __slots__ = ("accepted", "connect_failed", "bytes_upstream", "bytes_downstream", "active",
                 "outcomes", "durations", "duration_sum", "target_failures", "target_up", "health")

    def __init__(self) -> None:
        self.accepted = 0
        self.connect_failed = 0
        self.bytes_upstream = 0
        self.bytes_downstream = 0
        #: connections accepted and not yet torn down
        self.active = 0
        #: ended connections by outcome
        self.outcomes = dict.fromkeys(Outcome, 0)
        #: ended connections per duration bucket (DURATION_BUCKETS, then +Inf); not cumulative
        self.durations = [0] * (len(DURATION_BUCKETS) + 1)
        self.duration_sum = 0.0
        #: failed connects per target (its name as configured), each target tried counting once
        self.target_failures: Dict[str, int] = {}
        #: per target: whether its last connect worked
        self.target_up: Dict[str, bool] = {}
        #: for several targets: a function giving {target: up} from their passive health, which
        #: metrics shows instead of ``target_up``; None for one fixed target
        self.health: Optional[Callable[[], Dict[str, bool]]] = None

    def ended(self, outcome: "Outcome", duration: float, bytes_upstream: int, bytes_downstream: int) -> None:
        """One connection's teardown."""
        self.active -= 1
        self.bytes_upstream += bytes_upstream
        self.bytes_downstream += bytes_downstream
        self.outcomes[outcome] += 1
        self.durations[bisect_left(DURATION_BUCKETS, duration)] += 1
        self.duration_sum += duration

    def connected(self, target: str, ok: bool) -> None:
        """The end of one connect to ``target``: it worked, or it failed (refused, timed out...)."""
        self.target_up[target] = ok
        if not ok:
            self.target_failures[target] = self.target_failures.get(target, 0) + 1
