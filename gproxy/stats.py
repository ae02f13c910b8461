"""Counters, how connections end, and the per-connection record handed to hooks.

Typical use::

    fw.statistics()     # Statistics(active=2, accepted=10, connect_failed=1, ...)
    Forwarder(..., on_close=lambda rec: print(rec.outcome, rec.bytes_upstream))
"""

from __future__ import annotations

import enum
import weakref
from bisect import bisect_left
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple, Union

__all__ = ["Outcome", "ConnectionRecord", "Statistics", "Counters", "TargetCounters", "TargetView",
           "DURATION_BUCKETS", "CONNECT_REASONS", "CONNECTION_STATES", "SocketAddress", "TLSCounters"]

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
    #: every target it could use was at its max_connections for queue_timeout (or max_queue
    #: clients waited already)
    QUEUE_TIMEOUT = "queue timeout"
    TLS_HANDSHAKE_FAILED = "tls handshake failed"  #: a TLS handshake (client's or target's) failed or timed out

    def __str__(self) -> str:
        return self.value

    # Enum hashes a member by its name, in Python, at every dict lookup (Counters.outcomes,
    # once per connection); its members are singletons, compared by identity: hash them so.
    __hash__ = object.__hash__


#: a record's ``state``: ``connecting`` (the upstream is not connected yet), ``open`` (both
#: ways flow), ``client_eof`` (the client sent its EOF, passed on to the target, which may
#: still send), ``upstream_eof`` (the target sent its EOF, passed on to the client, which may
#: still send), ``closing`` (it ends: the outcome is decided, the sockets are being closed),
#: ``closed`` (it ended: an ``on_close`` record)
CONNECTION_STATES = ("connecting", "open", "client_eof", "upstream_eof", "closing", "closed")


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
    #: where the connection is (``CONNECTION_STATES``): ``"open"`` while both ways flow
    state: str = "open"
    #: the server name of the client's TLS ClientHello, on a rule with ``route_sni``; None
    #: when it sent none (or no ClientHello, or the rule routes by no name)
    sni: Optional[str] = None
    #: the ``route_sni`` name that chose the target (``"*.cache.example"``), or None: the
    #: rule's ``target`` served it (or the rule routes by no name)
    route: Optional[str] = None


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


#: why a connect to a target failed, as ``gproxy_target_connect_failures_total`` says it:
#: ``refused`` (nobody listens: ECONNREFUSED; a Unix socket file missing, or its queue full),
#: ``timeout`` (no answer within ``connect_timeout``), ``unreachable`` (no route to the host or
#: network), ``resolve`` (the name did not resolve), ``other`` (anything else)
CONNECT_REASONS = ("refused", "timeout", "unreachable", "resolve", "other")


class TargetCounters:
    """One target's totals (its name as configured), shared by every forwarder that counts into
    the same :class:`Counters`: its connections by how they ended, its failed connects by
    reason, and the connections open to it now. Fed once per connect and once per teardown."""

    __slots__ = ("active", "outcomes", "bytes_upstream", "bytes_downstream", "failures", "last_error")

    def __init__(self) -> None:
        #: connections whose connect to this target worked and that have not ended yet
        self.active = 0
        #: such connections once ended, by outcome
        self.outcomes = dict.fromkeys(Outcome, 0)
        #: bytes of those ended connections, each way (moved here when a connection ends;
        #: ``Counters.bytes_now`` adds the open ones)
        self.bytes_upstream = 0
        self.bytes_downstream = 0
        #: failed connects by reason (CONNECT_REASONS)
        self.failures = dict.fromkeys(CONNECT_REASONS, 0)
        #: what the last failed connect said, or None
        self.last_error: Optional[str] = None

    def ended(self, outcome: "Outcome", bytes_upstream: int, bytes_downstream: int) -> None:
        """A connection that :meth:`Counters.connected` gave this object to has ended."""
        self.active -= 1
        self.outcomes[outcome] += 1
        self.bytes_upstream += bytes_upstream
        self.bytes_downstream += bytes_downstream


class TargetView(NamedTuple):
    """A target as metrics and the target routes show it (``Counters.health``)."""

    up: bool                #: not marked down (see gproxy_target_up)
    state: str = "enabled"  #: "enabled", "drain" or "disabled" (gproxy.targets.TargetState)
    weight: int = 1         #: its weight now
    check_duration: Optional[float] = None  #: seconds the last active check took; None: none yet
    max_connections: int = 0  #: its limit now; 0: none


class TLSCounters:
    """A TLS rule's handshakes: how many ended how, per side ("client": terminated, "upstream":
    originated), and how long the ones that worked took (``gproxy._tls.HANDSHAKE_BUCKETS``)."""

    __slots__ = ("results", "durations", "duration_sum", "buckets")

    RESULTS = ("ok", "failed", "timeout")

    def __init__(self, buckets: Tuple[float, ...], sides: Tuple[str, ...] = ()) -> None:
        self.buckets = buckets
        #: (side, result) -> handshakes; result is "ok", "failed" or "timeout" (each shown at 0)
        self.results: Dict[Tuple[str, str], int] = {(side, result): 0 for side in sides for result in self.RESULTS}
        #: per side: handshakes per duration bucket (then +Inf), not cumulative, and their sum
        self.durations: Dict[str, list] = {side: [0] * (len(buckets) + 1) for side in sides}
        self.duration_sum: Dict[str, float] = {side: 0.0 for side in sides}

    def handshake(self, side: str, result: str, duration: float) -> None:
        key = (side, result)
        self.results[key] = self.results.get(key, 0) + 1
        counts = self.durations.get(side)
        if counts is None:
            counts = self.durations[side] = [0] * (len(self.buckets) + 1)
            self.duration_sum[side] = 0.0
        counts[bisect_left(self.buckets, duration)] += 1
        self.duration_sum[side] += duration


class Counters:
    """Totals of connections that ended; the open ones' bytes are added when read.

    Fed by relay once per connection (at accept, at the end of each connect, at teardown),
    never per chunk. Bytes move as they are read into each open connection's own
    ``counts`` (which the pumps keep anyway); ``bytes_now`` adds those of the open
    connections of every context counting here to the totals, under the contexts' locks,
    so what it says only grows, whether a connection is open or has just ended."""

    __slots__ = ("accepted", "connect_failed", "bytes_upstream", "bytes_downstream", "active",
                 "outcomes", "durations", "duration_sum", "target_failures", "target_up", "health", "targets",
                 "contexts", "queue", "queued", "queue_wait", "tls")

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
        #: a function giving {target: TargetView} for the rule's targets (gproxy.targets), which
        #: metrics shows; None: ``target_up``'s targets, each enabled with weight 1
        self.health: Optional[Callable[[], Dict[str, TargetView]]] = None
        #: per target (its name as configured): its own totals
        self.targets: Dict[str, TargetCounters] = {}
        #: weak references to the contexts (relay.Context: ``.lock``, ``.active``) whose
        #: connections count here: a rule's forwarder, and a reload's old ones while they
        #: drain. Replaced, never changed in place, so a reader on another thread may take it.
        self.contexts: Tuple[Any, ...] = ()
        #: the rule's queue of clients waiting for a target with room (gproxy.targets.Queue;
        #: ``len()`` is its length now), or None
        self.queue: Any = None
        #: clients that waited in the queue (once their wait ended, however), and the seconds
        #: they waited in all
        self.queued = 0
        self.queue_wait = 0.0
        #: TLS handshakes, for a rule that terminates or originates TLS (else None)
        self.tls: Optional[TLSCounters] = None

    def watch(self, context: Any) -> None:
        """``context``'s open connections count here too (``bytes_now``), until it is gone."""
        alive = [ref for ref in self.contexts if ref() is not None and ref() is not context]
        self.contexts = tuple(alive) + (weakref.ref(context),)

    def bytes_now(self) -> Tuple[int, int, Dict[TargetCounters, List[int]]]:
        """Bytes so far, each way, the open connections' included: ``(upstream, downstream,
        {target's counters: [upstream, downstream] of its open connections})``; a target's
        total is its counters' bytes plus its entry here, if any. One pass over the open
        connections, holding every watched context's lock (a teardown moves a connection's
        bytes into the totals under it), so a connection's bytes are counted once, open or
        ended. With no connection open, the totals alone, with no lock: a teardown has
        counted its bytes before its connection leaves ``active``."""
        live: Dict[TargetCounters, List[int]] = {}
        contexts = []
        for ref in self.contexts:
            context = ref()
            if context is not None and context.active:
                contexts.append(context)
        if not contexts:  # (the common case at rest: one dereference, one test)
            return self.bytes_upstream, self.bytes_downstream, live
        for context in contexts:  # (only this takes more than one: no order to deadlock on)
            context.lock.acquire()
        try:
            upstream, downstream = self.bytes_upstream, self.bytes_downstream
            for context in contexts:
                for conn in list(context.active.values()):  # (list(): one step, safe from any thread)
                    up, down = conn.counts
                    if up or down:
                        upstream += up
                        downstream += down
                        target = conn.target_counts
                        if target is not None:
                            pair = live.get(target)
                            if pair is None:
                                live[target] = [up, down]
                            else:
                                pair[0] += up
                                pair[1] += down
        finally:
            for context in contexts:
                context.lock.release()
        return upstream, downstream, live

    def ended(self, outcome: "Outcome", duration: float, bytes_upstream: int, bytes_downstream: int) -> None:
        """One connection's teardown."""
        self.active -= 1
        self.bytes_upstream += bytes_upstream
        self.bytes_downstream += bytes_downstream
        self.outcomes[outcome] += 1
        self.durations[bisect_left(DURATION_BUCKETS, duration)] += 1
        self.duration_sum += duration

    def connected(self, target: str, ok: bool, reason: Optional[str] = None,
                  error: Optional[str] = None) -> Optional[TargetCounters]:
        """The end of one connect to ``target``: it worked (the target's counters are returned,
        counting the connection open until their ``ended()``), or it failed, ``reason`` being
        one of CONNECT_REASONS (None: ``other``) and ``error`` its line."""
        self.target_up[target] = ok
        counts = self.targets.get(target)
        if counts is None:
            counts = self.targets[target] = TargetCounters()
        if ok:
            counts.active += 1
            return counts
        self.target_failures[target] = self.target_failures.get(target, 0) + 1
        counts.failures[reason if reason in counts.failures else "other"] += 1
        counts.last_error = error
        return None

    def views(self) -> Dict[str, TargetView]:
        """The rule's targets as metrics shows them (``health``, else ``target_up``)."""
        if self.health is not None:
            return self.health()
        return {target: TargetView(up) for target, up in self.target_up.copy().items()}
