"""One connection's life: connect upstream, two pumps, the closing rules, the result.

Typical use (the forwarder does this for every accepted client)::

    if context.dials_on_hub(spare_upstream_sock):
        Connection(context, client_sock, client_address).start(spare_upstream_sock)
    else:  # in a worker greenlet
        Connection(context, client_sock, client_address).run(spare_upstream_sock)

Theory of operation
-------------------
A connection lives in three rooms, read in this order:

1. The connect phase (``_dial.py``): ``run()``, the handler, reads a trusted client's PROXY
   header, calls ``on_open``, checks access, reads the ClientHello on a rule that routes by
   its server name (``_sni.py``: those bytes go to the target first), then connects to the
   target (every address the name has, in turn, each attempt bounded by ``connect_timeout``)
   and sends our PROXY header. A client of a plain rule (``Context.dials_on_hub``: one fixed IP or Unix address;
   no hook, access rule or PROXY header before the connect) takes ``start()`` instead, which
   does the same in callbacks on the hub: a greenlet to wait for one connect would cost more
   than the rest of the connect. A connect that fails raises a ``Failure`` (``_failure.py``:
   its outcome and line), which the connection records.
2. The pumps (here): two directions, ``UPSTREAM`` (client -> upstream) and ``DOWNSTREAM``
   (upstream -> client), each with its state (below).
3. The report (``_report.py``): once both directions ended, the teardown closes the
   watchers, then the sockets, and hands the connection to its books: the totals, one log
   line, the ``on_close`` hook.

A pump (``pump()``) is a blocking-style loop: read what the source has, write all of it to
the destination, repeat. Small reads are copied; once reads fill the buffer, chunks move in
the kernel with splice(2) (``splice.Splicer``), or in a thread of their own (a bulk lane,
``offload.py``). It blocks only by waiting on its own two libev watchers (readable source,
writable destination), so a destination that stops reading stalls its pump, the kernel
buffers fill, and TCP flow control stalls the sender: memory stays bounded by one chunk per
direction.

Closing rules (the "half-close dance"):

- A clean EOF from the source ends that direction: it shuts down the destination's write
  half (our FIN); the other direction keeps flowing until it ends too. When both saw EOF
  the outcome is ``EOF`` and both sockets close normally.
- A reset or any socket error in either direction aborts the connection (``abort``): the
  other direction is ended or woken according to its state (below); both sockets close with
  RST (``SO_LINGER 0``), so each peer learns the connection failed. A partial write is
  never retried.
- The idle sweep and the forwarder's shutdown abort the same way, with their own outcome.

Who closes: the connection owns both sockets (the server's ``do_close`` does nothing) and
the last direction to end tears everything down: watchers first, then sockets, because
closing an fd under an active watcher is what breaks libev. That is also why a waiting
pump is woken by an exception and not by closing its socket under it.

Direction states
----------------
Each direction is in one state at a time (``Connection._states[direction]``), and moves only
as ``MOVES`` allows (as h11 keeps its state machine in one table; the test suite checks every
move of every connection against it, tests/statecheck.py)::

    NEW      -> PARKED | ENDED
    PARKED   -> RUNNING | ENDED
    RUNNING  -> PARKED | CHAIN | LANE | ENDED
    CHAIN    -> RUNNING
    LANE     -> RUNNING

- ``NEW``: connecting; no pump yet. Both directions leave it together (``_start_pumps``),
  or end from it when the connect fails or is aborted (``_end_unstarted``).
- ``PARKED``: no greenlet; the source's readable watcher calls ``_unpark``. A message that
  one read takes whole and one send delivers whole (most request/response traffic) moves
  right there, in the callback, and the direction stays parked. Anything more (a full read,
  which means bulk; a destination that does not take it all; an error; toxics on this
  direction) moves it to RUNNING (``_resume``); its source's EOF ends it there.
- ``RUNNING``: a worker greenlet (see ``_greenlets.py``) runs ``_run_pump``, on the fast path
  (``pump``), waiting only for its destination; it parks again (``_leave``) once its source
  is drained, returning its greenlet to the pool. An idle connection thus costs two
  sockets, four watchers and this object, whether it ever spoke or not.
- ``CHAIN``: the direction runs through its toxic chain (``_chain.Link.pump``), which waits
  for its source, its destination or a due time in the pump's greenlet.
- ``LANE``: a bulk lane's thread splices for the direction (``offload.Offload.run``); its
  greenlet waits for the thread to hand the direction back.
- ``ENDED``: done. ``_end_direction`` is the one way in, whatever ended it (EOF, an error, an
  abort, a failed connect), and the teardown runs when the second direction gets there.

What acts on a direction dispatches on its state, never on which callback a watcher holds:

=========  =============================  ===========================  =====================
state      ``abort``                      ``kick`` (toxics changed)    parking pass
=========  =============================  ===========================  =====================
NEW        ``_dial.cancel``               (pumps start kicked)         -
PARKED     stop its watcher, end it       start it (``_resume``)       -
RUNNING    throw ``Aborted`` into its     seen at its next chunk       -
           wait for its destination
CHAIN      throw ``Aborted`` into the     throw ``_Switch`` into the   throw ``_Park`` if
           chain's wait                   chain's wait                 quiet since the last
LANE       wake the lane                  seen by the lane             -
ENDED      -                              -                            -
=========  =============================  ===========================  =====================

A throw is made on the next pass of the loop (``_interrupt``), into the pump only if it is
in that state and waits then: a pump that moved on meanwhile (parked, ended) is not thrown
at, and one that was not waiting finds the outcome before its next wait. A pump that comes
back from a wait, a chain or a lane after an abort ends its direction instead of parking
(``_leave``): a lane, a chain or a parking pass never ends a connection by forgetting it.

A pump never runs for long without the event loop: gevent's reads and writes return at once
while data keeps flowing, so after ``FAIR_SHARE`` bytes or ``FAIR_READS`` reads in one turn
(whichever comes first: a tiny ``buffer_size`` must not stretch a turn to thousands of
reads), a pump parks even with data waiting; its watcher runs it again on the next pass
through the loop, after every other connection with I/O ready had its turn.

Toxics: a direction of a forwarder that has toxics runs through ``_chain.Link.pump`` instead of
``pump`` (see _chain.py). ``pump`` compares ``Context.toxic_version`` once per chunk and
returns ``_SWITCHED`` when it changed, at a chunk boundary with no byte held; ``_run_pump``
then picks the path again (``_link``). A change also kicks every open connection
(``toxics_changed`` -> ``Connection.kick``), so a toxic acts on an idle connection too (a
``timeout`` closes it in time). A pump in the chain is thrown ``_Park`` by the forwarder's
parking pass after a quiet while, and parks unless its chain holds bytes or waits for a time.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import socket
import time
import traceback
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple, Union

import gevent

from gproxy import _dial, _gevent, _report, _sni, _sockets, _tls
from gproxy._access import Access, DeniedLog, client_key, compile_networks
from gproxy._chain import Link
from gproxy._failure import Aborted, Failure, failure, tcp_closed
from gproxy._greenlets import Workers
from gproxy.config import Address, Rule, UnixAddress
from gproxy.offload import STOPPED
from gproxy.stats import ConnectionRecord, Counters, Outcome, TLSCounters
from gproxy.targets import Targets
from gproxy.toxics import Toxics

if TYPE_CHECKING:
    from gproxy._capture import Capture
    from gproxy._proxyproto import ProxyHeader
    from gproxy._selfloop import OwnUpstreams
    from gproxy.offload import Offload

__all__ = ["Connection", "Context", "UPSTREAM", "DOWNSTREAM", "FAIR_SHARE", "FAIR_READS", "pump",
           "send_rest", "sweep", "toxics_changed", "DirectionState", "MOVES"]

log = logging.getLogger(__name__)

UPSTREAM = 0    #: client -> upstream; index into Connection.counts
DOWNSTREAM = 1  #: upstream -> client

#: bytes a pump may move without waiting before it hands control to the event loop.
FAIR_SHARE = 256 * 1024
#: reads a pump may make without waiting, whatever their size (so --buffer-size 1 cannot
#: make a turn 262,144 reads long). A turn ends at whichever bound comes first.
FAIR_READS = 64

_READ, _WRITE = 1, 2

# What pump() returns: the source is drained or the turn spent (park; the next turn copies,
# or splices), the source's clean EOF, or a change of the toxics (pick the path again).
_DRAINED, _DRAINED_SPLICING, _ENDED, _SWITCHED = range(4)


class DirectionState(enum.IntEnum):
    """Where one direction of a connection is (the theory above)."""

    NEW = 0
    PARKED = 1
    RUNNING = 2
    CHAIN = 3
    LANE = 4
    ENDED = 5


NEW, PARKED, RUNNING, CHAIN, LANE, ENDED = DirectionState

#: Every move a direction may make, written once; each is made in one place, named here.
MOVES = {
    NEW: (PARKED,            # _start_pumps: connected, both directions at once
          ENDED),            # _end_unstarted: the connect failed or was aborted
    PARKED: (RUNNING,        # _resume: its source has more than a callback moves, or a kick
             ENDED),         # _unpark at its source's EOF; abort
    RUNNING: (PARKED,        # _leave: source drained, turn spent, or a parking pass
              CHAIN,         # _run_pump: into Link.pump
              LANE,          # pump: into offload.run
              ENDED),        # _run_pump's end: EOF, error, abort
    CHAIN: (RUNNING,),       # _run_pump: Link.pump returned or was thrown out of its wait
    LANE: (RUNNING,),        # pump: offload.run returned or raised
    ENDED: (),
}


class _Park(Exception):
    """Thrown into a pump that waits for a quiet source in its chain, to release its greenlet."""


class _Switch(Exception):
    """Thrown into a pump waiting in its chain when the toxics changed: it picks its path again."""


#: (first, step) of the connection ids of every forwarder made from now on: (1, 1) but in a
#: ``--workers`` worker, whose ids interleave with its siblings' (number_ids)
_ids = (1, 1)


def number_ids(first: int, step: int) -> None:
    """Number the connections of forwarders made from now on first, first + step, ...: the
    CLI's ``--workers`` parent gives each worker its own (``_supervisor.worker_ids``) so that
    a connection id names one connection across all of them. Process-wide; the CLI's alone."""
    global _ids
    _ids = (first, step)


class Context:
    """What every connection of one forwarder shares: the rule, scratch memory, hooks, counters."""

    def __init__(self, rule: Rule, counters: Counters,
                 on_open: Optional[Callable[[ConnectionRecord], None]] = None,
                 on_close: Optional[Callable[[ConnectionRecord], None]] = None,
                 splicer=None):
        self.rule = rule
        self.counters = counters
        self.on_open = on_open
        self.on_close = on_close
        #: open connections by id, for statistics, the idle sweep and shutdown
        self.active: Dict[int, Connection] = {}
        #: held while a connection moves from ``active`` to the totals, and while statistics()
        #: reads both (perhaps from another thread), so a snapshot counts every byte once
        self.lock = _gevent.real_lock()
        #: seconds the event loop did not run, found by the sweep: idle time leaves them out
        self.stalled = 0.0
        #: greenlets running a hook now -> their connection (stop() from a hook must not wait
        #: for the connection whose hook called it)
        self.in_hook: Dict[object, "Connection"] = {}
        #: the read buffer (and a view of it) every connection copies through: its thread's
        #: (see _scratch), taken when the first connection starts its pumps; None until then,
        #: so a rule at rest holds no buffer
        self.scratch: Optional[bytearray] = None
        self.scratch_view: Optional[memoryview] = None
        #: moves bulk chunks with splice(2) (splice.Splicer), or None: always copy
        self.splicer = splicer
        #: threads that splice bulk off the hub (offload.Offload), or None; set on the hub
        self.offload: Optional[Offload] = None
        #: the rule's targets: their order per client, health and state (targets.py)
        self.targets = Targets(rule)
        #: whether clients connect through ``targets`` (several targets, a function, an active
        #: check, a target's max_connections, or a target drained, disabled or limited at run
        #: time: ``route_by_targets``); False for
        #: one fixed target, whose clients need none of it
        self.routed = len(rule.targets) != 1 or bool(getattr(rule, "check", None)) \
            or any(entry.max_connections for entry in rule.target_list)
        self.target_name = str(rule.target) if not self.routed else \
            ",".join(map(str, rule.targets)) or getattr(rule.target, "__name__", "function")
        #: the rule's name in logs and metrics; the forwarder sets it to the bound address
        self.name = str(rule.listen)
        #: what a text connection line starts with: a named rule's name (several rules share
        #: one log, as HAProxy's frontends do), nothing for an unnamed one (one CLI rule)
        self.log_prefix = f"{rule.name} " if getattr(rule, "name", None) else ""
        #: allow/deny and per-client limits, or None: the rule restricts nobody (no check at all)
        self.access = Access.from_rule(rule)
        #: networks whose clients must send a PROXY header first, or None
        self.accept_proxy = compile_networks(rule.accept_proxy_from) or None
        #: route_sni's names (_sni.Routes), or None: the rule routes by no name
        self.sni_routes = _sni.Routes(rule.route_sni) if rule.route_sni else None
        if rule.route_sni:  # shown in metrics and targets() from the start, as fixed targets are
            for _name, endpoint in rule.route_sni:
                self.targets.note(endpoint)
        #: PROXY protocol version to send upstream; 0: none
        self.proxy_version = {"off": 0, "v1": 1, "v2": 2}[rule.proxy_protocol]
        # what gproxy_target_up shows: one fixed target is up until a connect to it fails
        # (counters.target_up); several, or a checked one, take their health from Targets
        # (Targets.tracks_health says which; a rule routed at run time keeps what it showed)
        if not self.routed:
            counters.target_up.setdefault(self.target_name, True)
        targets = self.targets
        counters.health = lambda: targets.views(self.counters)
        counters.watch(self)  # its open connections' bytes count there as they move
        counters.queue = targets.queue
        #: the rate-limited "denied" line, for rules that can refuse a client
        self.denied_log = DeniedLog(log) \
            if self.access is not None or self.accept_proxy or self.sni_routes is not None else None
        #: local addresses of our upstream sockets (_selfloop.OwnUpstreams), when a target could
        #: lead back to the listener; None, and no cost, otherwise
        self.own_upstreams: Optional[OwnUpstreams] = None
        #: called when a connection finds no fd for its upstream socket
        self.on_fd_exhausted: Optional[Callable[[OSError], None]] = None
        #: called after each connection's teardown
        self.on_closed: Optional[Callable[[], None]] = None
        #: the greenlets pumps run in; set on the hub that serves
        self.workers: Optional[Workers] = None
        #: the forwarder's toxics (toxics.Toxics), and a number bumped at every change to
        #: them: a pump compares it once per chunk to know when to leave the fast path
        self.toxics = Toxics()
        self.toxic_version = 0
        #: (family, sockaddr) of the one fixed target when nothing needs a greenlet before the
        #: connect (no PROXY header either way, no access rules, no resolver, no on_open
        #: hook), else None; see dials_on_hub
        target = rule.target if not self.routed and isinstance(rule.target, (Address, UnixAddress)) else None
        self.direct = (target.family, target.sockaddr) \
            if target is not None and target.family is not None and not self.proxy_version \
            and self.accept_proxy is None and self.access is None and on_open is None \
            and self.sni_routes is None else None
        #: ids count from 1 by 1 (a --workers worker: from its own first, by the worker count,
        #: see number_ids); last_id is the last one given (Forwarder.mark reads it)
        self.id_step = _ids[1]
        self.last_id = _ids[0] - _ids[1]
        #: the capture running (_capture.Capture), or None: read once per connection, when its
        #: pumps start, so a forwarder that captures nothing pays nothing more
        self.capture: Optional[Capture] = None
        #: whether a connection of this forwarder ever had a toxic chain or a capture (Link):
        #: only then may a pump be in its CHAIN, and the parking pass has something to release
        #: (see sweep_due). Never reset: a chain can outlive its toxics for a while.
        self.linked = False
        #: TLS with clients (tls_cert: _tls.Terminator) and with targets (target_tls:
        #: _tls.Originator), or None. A TLS side moves plaintext through the copy path only
        #: (the forwarder gives such a rule no splicer), and its handshakes need a greenlet.
        self.tls = _tls.Terminator(rule) if getattr(rule, "tls_cert", None) else None
        self.target_tls = _tls.Originator(rule) if getattr(rule, "target_tls", False) else None
        if self.tls is not None or self.target_tls is not None:
            self.direct = None
            sides = (("client",) if self.tls is not None else ()) + (("upstream",) if self.target_tls else ())
            counters.tls = TLSCounters(_tls.HANDSHAKE_BUCKETS, sides)

    def route_by_targets(self) -> None:
        """From the next client on, connect through ``targets`` (a fixed target was drained or
        disabled at run time, which only ``Targets.order`` knows); on the hub, or before start."""
        self.routed = True
        self.direct = None

    def dials_on_hub(self, spare: socket.socket) -> bool:
        """Whether a client connects in callbacks on the hub (``Connection.start``) rather
        than in a greenlet (``Connection.run``): the one rule for the fast path. Yes when the
        rule has one fixed address to connect to and nothing to do first (``direct``), no
        forwarding loop to watch for (a client must then be checked against our own upstream
        sockets before anything, which the greenlet path does), and ``spare``, the socket
        made at accept for the upstream, is of the target's family."""
        direct = self.direct
        return direct is not None and self.own_upstreams is None and spare.family == direct[0]

    def close(self) -> None:
        """Release what is kept between connections: idle workers, splice's pipes."""
        if self.workers is not None:
            self.workers.close()
        if self.offload is not None:
            self.offload.close()
        if self.splicer is not None:
            self.splicer.close()

#: per OS thread: read buffers by size, shared by every forwarder whose hub runs there
_thread_buffers = _gevent.real_thread_local()  # per OS thread, patched or not


def _scratch(size: int) -> tuple:
    """The calling thread's read buffer of ``size`` bytes, and a view of it.

    Why one buffer may serve every connection of every forwarder on a hub: a user reads
    into it and empties it with no switch in between. ``pump`` and ``_unpark`` read, then
    send on a non-blocking socket (which never waits), then either are done with it or copy
    what the destination did not take out of it (``send_rest``: ``scratch[sent:n]`` is a
    copy) before their first wait; ``_unpark`` hands that rest to a worker it switches to at
    once, and the worker copies before it waits. Only one greenlet of a thread runs at a
    time, so no other user can see the buffer filled. Sharing across forwarders adds no
    interleaving that sharing across one forwarder's connections did not have; what must
    not share is two threads (each has a hub of its own), hence per thread. Bulk that
    moves with splice (and offload's threads) never touches it. A rule at rest costs no
    buffer; a thousand rules with the default size cost one (256 KiB) per thread."""
    buffers = getattr(_thread_buffers, "by_size", None)
    if buffers is None:
        buffers = _thread_buffers.by_size = {}
    pair = buffers.get(size)
    if pair is None:
        scratch = bytearray(size)
        pair = buffers[size] = (scratch, memoryview(scratch))
    return pair


def pump(conn: "Connection", src: socket.socket, dst: socket.socket,
         readable, writable, direction: int, spliced: bool = False) -> int:
    """Move bytes from src to dst for one turn: until src is drained or the turn is spent


    (``_DRAINED``, or ``_DRAINED_SPLICING`` when the next turn should splice), src's clean
    EOF (``_ENDED``), or a change of the forwarder's toxics (``_SWITCHED``, at a chunk
    boundary: one comparison per chunk); socket errors propagate. It waits only for dst,
    or for a bulk lane (state LANE while it does).

    Small reads are copied through the thread's scratch buffer (``_scratch``): two syscalls per message.
    With a splicer (``Context.splicer``), a read that fills the buffer means bulk, and the
    next chunks go socket -> pipe -> socket in the kernel until a small read, like HAProxy's
    ``option splice-auto``. The loop body is the whole cost of a small message, so the copy
    is written out here rather than called."""
    wait = _gevent.waiter(conn._hub, conn, Aborted)  # bound once per turn: the per-chunk wait
    context, counts = conn.context, conn.counts
    recv_into, send = src.recv_into, dst.send
    scratch, view = context.scratch, context.scratch_view
    size = len(scratch)
    splicer, offload = context.splicer, context.offload
    src_fd, dst_fd = src.fileno(), dst.fileno()
    # A turn goes on only after full reads, so its bytes are reads * size: one count bounds both.
    budget = max(1, min(FAIR_SHARE // size, FAIR_READS))
    version = context.toxic_version
    while True:
        if context.toxic_version != version:
            return _SWITCHED  # at this chunk boundary the caller picks the path again
        if spliced:
            n = None
            if offload is not None:  # bulk goes to a thread, in turn (offload.py)
                states = conn._states
                states[direction] = LANE
                try:
                    n = offload.run(conn, src_fd, dst_fd, direction, version, writable, wait)
                finally:
                    states[direction] = RUNNING
                if n == STOPPED:
                    raise Aborted
            if n is None:
                n = splicer.chunk(conn, src_fd, dst_fd, writable, direction, wait)
            if n is None:  # no fd for a pipe: copy
                spliced = False
                continue
            if 0 < n < size:
                spliced = False
        else:
            try:
                n = recv_into(scratch)
            except BlockingIOError:
                n = -1
            if n > 0:
                # counted when read, so a peer that has the bytes always finds them in statistics()
                counts[direction] += n
                try:
                    sent = send(view[:n])
                except BlockingIOError:
                    sent = 0
                if sent != n:
                    send_rest(wait, dst, scratch, sent, n, writable)
                spliced = splicer is not None and n == size
        if n >= size:  # a full read: more is likely waiting
            budget -= 1
            if budget:
                continue
        elif n == 0:
            return _ENDED
        # Drained (a short read needs no EAGAIN to confirm it), or the turn is spent: park;
        # the source's watcher runs the pump again when it has data (at once if it has).
        return _DRAINED_SPLICING if spliced else _DRAINED


def send_rest(wait: Callable, dst: socket.socket, scratch: bytearray, sent: int, n: int, writable) -> None:
    """The destination took only ``sent`` of ``n`` bytes: keep the rest (at most buffer_size,
    copied out of the shared scratch buffer) and wait until it takes them."""
    pending = memoryview(scratch[sent:n])
    while pending:
        wait(writable)
        try:
            pending = pending[dst.send(pending):]
        except BlockingIOError:
            pass


class Connection:
    """One client, its upstream, two directions; ``run()`` or ``start()`` begins its life,
    the last direction to end finishes it."""

    __slots__ = (
        "context", "id", "client", "client_address", "upstream", "counts",
        "started", "_t0", "outcome", "error", "_hub", "_watchers", "_ends", "_eof_count",
        "_states", "seen", "seen_total", "seen_at", "peer", "proxied", "access_key", "target", "links",
        "own_key", "_dialing", "spoke", "_upstream_writable", "_upstream_ends", "target_counts", "sni",
    )

    def __init__(self, context: Context, client: socket.socket, client_address) -> None:
        self.context = context
        context.last_id += context.id_step
        self.id = context.last_id
        self.client = client
        self.client_address = client_address
        #: the socket's real peer; client_address is the one a trusted PROXY header gave, if any
        self.peer = client_address
        #: the PROXY header a trusted client sent (accept_proxy_from), or None
        self.proxied: Optional[ProxyHeader] = None
        #: what access counted this connection under (max_connections_per_client), or None
        self.access_key: Optional[bytes] = None
        self.upstream: Optional[_sockets.RawSocket] = None
        self.target = None            # the endpoint connected to, when the rule has several
        #: the counters of the target it connected to (stats.TargetCounters), once connected
        self.target_counts = None
        self.own_key = None           # our upstream's local address, noted in own_upstreams
        self.counts = [0, 0]
        self.started = time.time()
        self._t0 = time.monotonic()
        self.outcome: Optional[Outcome] = None
        self.error: Optional[str] = None
        self._hub = gevent.get_hub()
        #: per direction, its DirectionState (see MOVES)
        self._states = [NEW, NEW]
        #: what the teardown closes: the pumps' four watchers, or start()'s connect watchers
        self._watchers: List = []
        self._ends: List[tuple] = []  # per direction: (src, dst, readable, writable)
        self._eof_count = 0           # sources that sent their clean EOF
        #: while connecting: the greenlet waiting in the connect phase, or _dial.ON_HUB while
        #: start()'s connect waits in callbacks; what an abort stops (_dial.cancel)
        self._dialing = None
        self.spoke: Optional[int] = None  # the direction that read bytes last (see idle_at_stop)
        # for the sweep: bytes per direction at its last pass (parking), and the
        # byte total it saw last with when that changed (idle timeout)
        self.seen = [0, 0]
        self.seen_total = 0
        self.seen_at = self._t0 - context.stalled  # on the sweep's clock, which skips stalls
        #: per direction, the _chain.Link of a direction that met toxics, else None
        self.links: Optional[List[Optional[Link]]] = None
        #: the watcher that waited for the upstream's connect, kept for its pumps
        self._upstream_writable = None
        #: (peer, local) addresses of the connected upstream socket, asked for only when a
        #: record is made (upstream_ends), or None
        self._upstream_ends: Optional[tuple] = None
        #: what the ClientHello chose (_sni.Choice), on a rule with route_sni; else None
        self.sni: Optional[_sni.Choice] = None

    # -- the life, top to bottom ------------------------------------------------

    def run(self, spare: socket.socket) -> None:
        """The handler, in a worker greenlet: the connect phase (``spare`` is an unconnected
        socket to use if its family fits), then the pumps."""
        context = self.context
        context.active[self.id] = self
        context.counters.accepted += 1
        context.counters.active += 1
        try:
            if context.accept_proxy is not None:
                _dial.read_proxy_header(self)
            _report.call_hook(self, context.on_open, None, "on_open")
            if self.outcome is not None:  # the hook stopped the forwarder
                raise Aborted
            if context.access is not None:
                why, self.access_key = context.access.admit(client_key(self.client_address))
                if why is not None:  # refused before anything is dialled
                    raise Failure(Outcome.DENIED, why)
            held = _sni.read_hello(self) if context.sni_routes is not None else None
            if context.tls is not None:
                _dial.tls_accept(self, held)  # the bytes read to route by begin its handshake
                held = None
            self.upstream, spare = _dial.connect_upstream(self, spare), None
            if context.target_tls is not None:
                _dial.tls_connect(self)
            if held:  # the bytes read to route by, ahead of everything else
                _sni.replay(self, self.upstream, held)
            if self.outcome is None:  # (not aborted while the connect was counted)
                self._start_pumps(self.upstream)
        except Failure as exc:
            self._finish(exc.outcome, exc.error)
        except Aborted:
            pass
        except gevent.GreenletExit:
            self._finish(Outcome.SHUTDOWN)
        except BaseException:  # a bug: logged once, with its traceback, by the report
            self._finish(Outcome.ERROR, traceback.format_exc())
        finally:
            if spare is not None:
                spare.close()  # refused before connecting
            if self._states[UPSTREAM] is NEW:
                self._end_unstarted()

    def start(self, spare: socket.socket) -> None:
        """Begin the life of a client for which ``Context.dials_on_hub(spare)`` is true, on
        the hub (the accept callback), with no greenlet: ``_dial.start`` connects ``spare``
        and starts the pumps from the connect watcher's callback."""
        context = self.context
        context.active[self.id] = self
        counters = context.counters
        counters.accepted += 1
        counters.active += 1
        try:
            _dial.start(self, spare)
        except BaseException:  # a bug: logged once, with its traceback, by the report
            self._connect_failed(Failure(Outcome.ERROR, traceback.format_exc()))

    def _connect_failed(self, failed: Failure) -> None:
        """start()'s connect failed, in a callback on the hub: record why and end."""
        self._finish(failed.outcome, failed.error)
        self._end_unstarted(in_callback=True)

    def _start_pumps(self, upstream: _sockets.RawSocket) -> None:
        """Connected: both directions start parked (NEW -> PARKED). A greenlet is taken when
        a source has data, so a connection that never speaks never costs one."""
        context = self.context
        if context.scratch is None:  # the first connection of this forwarder to get here
            context.scratch, context.scratch_view = _scratch(context.rule.buffer_size)
        client = self.client  # tuned already: accepted sockets inherit the listener's options
        _sockets.tune(upstream)
        loop = self._hub.loop
        client_readable = loop.io(client.fileno(), _READ)
        client_writable = loop.io(client.fileno(), _WRITE)
        upstream_readable = loop.io(upstream.fileno(), _READ)
        upstream_writable, self._upstream_writable = self._upstream_writable, None  # the connect's
        if upstream_writable is None:
            upstream_writable = loop.io(upstream.fileno(), _WRITE)
        self._watchers = [client_readable, client_writable, upstream_readable, upstream_writable]
        self._ends = [(client, upstream, client_readable, upstream_writable),    # UPSTREAM
                      (upstream, client, upstream_readable, client_writable)]    # DOWNSTREAM
        states = self._states
        states[UPSTREAM] = PARKED
        states[DOWNSTREAM] = PARKED
        client_readable.start(self._unpark, UPSTREAM)
        upstream_readable.start(self._unpark, DOWNSTREAM)
        capture = context.capture
        if capture is not None and capture.wants(self):
            capture.attach(self)  # both directions then run through their links (_capture.py)
        if context.counters.tls is not None:
            ends: Tuple[Any, Any] = (client, upstream)  # (TLSSockets, typed as sockets)
            for direction, src in enumerate(ends):
                if src.__class__ is _tls.TLSSocket and src.buffered():
                    # the peer's first bytes came with the end of its handshake: OpenSSL
                    # holds them, the socket's watcher will not say so
                    loop.run_callback(self._unpark_buffered, direction)
        chains = context.toxics.chains
        for direction in (UPSTREAM, DOWNSTREAM):
            if chains[direction]:  # a toxic may act before any byte comes (timeout)
                loop.run_callback(self.kick, direction)

    def _read_ahead(self) -> None:
        """On the hub, right after ``_start_pumps`` from the connect's callback: a client
        usually speaks while its connect is under way (requests come first in most
        protocols), so read what it sent now, as HAProxy's speculative reads do, rather than
        take one more pass of the loop (epoll_ctl, epoll_wait) to be told it is there. A
        client that has not spoken costs one recv that finds nothing. Only on the plain path:
        a direction with toxics or a capture keeps to its watcher."""
        links = self.links
        if (links is None or links[UPSTREAM] is None) and not self.context.toxics.chains[UPSTREAM]:
            self._unpark(UPSTREAM)

    def _unpark(self, direction: int, spliced: bool = False) -> None:
        """Watcher callback, on the hub: the parked direction's source has data.

        A message that one read takes whole and one send delivers whole moves right here,
        and the direction stays PARKED: no greenlet switch, no watcher stopped and started.
        Anything else (a full read: bulk; a destination not taking it all; an error; toxics
        on this direction) runs the pump in a worker (``_resume``), handing over what was
        read; the source's EOF ends the direction here."""
        src, dst, readable, _writable = self._ends[direction]
        context = self.context
        carry: Union[None, Tuple[int, int], BaseException] = None
        links = self.links
        if not spliced and not context.toxics.chains[direction] and (links is None or links[direction] is None):
            scratch = context.scratch
            try:
                n = src.recv_into(scratch)
                if n > 0:
                    self.counts[direction] += n  # counted when read, as in pump
                    self.spoke = direction
                    try:
                        sent = dst.send(context.scratch_view[:n])
                    except BlockingIOError:
                        sent = 0
                    if sent != n:
                        carry = (sent, n)
                    elif n < len(scratch):
                        if src.__class__ is _tls.TLSSocket and src.buffered():  # its end came too
                            self._hub.loop.run_callback(self._unpark_buffered, direction)
                        return  # done; still parked
                    spliced = n == len(scratch) and context.splicer is not None  # bulk
                elif self.outcome is None and self._states[1 - direction] is not LANE:
                    # EOF, the usual end: this direction is done right here. Only the last
                    # one's teardown (its log line and on_close hook may block) takes a worker.
                    # (With a lane on the other direction the EOF may be a reset the lane took,
                    # which aborts: a worker reads it again, and judges, see _source_ended.)
                    readable.stop()
                    self._source_ended(direction)
                    self._end_direction(direction, in_callback=True)
                    return
            except BlockingIOError:
                return  # nothing after all; still parked
            except BaseException as exc:  # handled by the pump's rules, in a worker
                carry = exc
        self._resume(direction, spliced, carry)

    def _resume(self, direction: int, spliced: bool = False, carry=None) -> None:
        """On the hub: PARKED -> RUNNING, the pump in a worker (now, until it first waits)."""
        self._ends[direction][2].stop()
        self._states[direction] = RUNNING
        self.context.workers.run(self._run_pump, direction, spliced, carry)

    def _run_pump(self, direction: int, spliced: bool = False, carry=None) -> None:
        """A worker's job: run one direction's pump (RUNNING) until it parks again, or to
        its end: the closing rules, then ``_end_direction``. ``carry`` is what ``_unpark``
        left: an exception to handle here, or (sent, n) when the destination took only
        ``sent`` of the ``n`` bytes it read into the scratch buffer."""
        src, dst, readable, writable = self._ends[direction]
        states = self._states
        try:
            if carry is not None:
                if isinstance(carry, BaseException):
                    raise carry
                send_rest(_gevent.waiter(self._hub, self, Aborted), dst, self.context.scratch,
                          carry[0], carry[1], writable)
            while self.outcome is None:
                try:
                    link = self._link(direction)
                    if link is None:
                        version = self.context.toxic_version
                        result = pump(self, src, dst, readable, writable, direction, spliced)
                        if result is _SWITCHED:
                            continue
                        if result is not _ENDED:
                            if self.context.toxic_version != version:
                                continue  # changed while it waited to write (a kick found it busy)
                            self.spoke = direction
                            self._leave(direction, result is _DRAINED_SPLICING)
                            return
                    else:
                        states[direction] = CHAIN
                        try:
                            if not link.pump(src, dst, readable, writable, FAIR_SHARE):
                                continue  # the toxics changed, or the fast path may take over
                        finally:
                            states[direction] = RUNNING
                except _Switch:
                    continue
                except _Park:
                    if self.links is not None and self.links[direction] is not None \
                            and self.links[direction].busy():
                        continue  # it holds bytes or waits for a time: it must not park
                    raise
                self._source_ended(direction)
                break
        except _Park:
            # Quiet for a while: end this greenlet and let the watcher start a new one when
            # the source has data. The pump held no bytes: it was waiting for the source.
            self._leave(direction)
            return
        except Aborted:
            pass
        except Failure as exc:  # the chain closed or reset the connection
            self.abort(exc.outcome, exc.error)
        except OSError as exc:
            failed = failure(exc, self._side_of(direction, exc))
            self.abort(failed.outcome, failed.error)
        except gevent.GreenletExit:
            self.abort(Outcome.SHUTDOWN)
        except BaseException:  # a bug, or a stray gevent.Timeout: this connection ends, not the hub
            self.abort(Outcome.ERROR, traceback.format_exc())
        self._end_direction(direction)

    def _leave(self, direction: int, spliced: bool = False) -> None:
        """The pump gives its greenlet back holding no bytes: RUNNING -> PARKED (its source's
        watcher runs it again), or, if the connection was aborted meanwhile, its direction
        ends here. An abort that came while a bulk lane or a chain held the direction, or
        while the pump was not waiting, woke nobody for sure (a lane may even finish its job
        normally), so a pump must not just park: its direction would never end, nor the
        connection."""
        if self.outcome is None:
            self._states[direction] = PARKED
            src, _dst, readable, _writable = self._ends[direction]
            readable.start(self._unpark, direction, spliced)
            if src.__class__ is _tls.TLSSocket and src.buffered():
                # plaintext waits inside the TLS session, where the socket's watcher cannot see
                # it (a turn spent on full reads): the next pass of the loop reads it
                self._hub.loop.run_callback(self._unpark_buffered, direction)
        else:
            self._end_direction(direction)

    def _unpark_buffered(self, direction: int) -> None:
        """Hub callback: a parked TLS direction had plaintext buffered; read it, unless the
        socket's watcher ran it meanwhile (it is not parked then) or the connection ended."""
        if self._states[direction] is PARKED and self.outcome is None:
            self._unpark(direction)

    def _link(self, direction: int) -> Optional[Link]:
        """The toxic chain this direction must run through now, or None for the fast path."""
        context = self.context
        links = self.links
        chain = context.toxics.chains[direction]
        if not chain and (links is None or links[direction] is None):
            return None
        if links is None:
            links = self.links = [None, None]
            context.linked = True
        link = links[direction]
        if link is None:
            link = links[direction] = Link(self, direction, context.toxics, context.rule.buffer_size)
        link.sync(context.toxic_version)
        if link.plain():
            if not chain:
                links[direction] = None  # no toxic left: forget it
            return None
        return link

    def wait_any(self, watchers, timeout: float) -> bool:
        """For a pump in the toxic chain (_chain.Link._wait): wait until one of ``watchers``
        fires (True) or ``timeout`` seconds pass (False). An abort wakes it by throwing
        Aborted into the chain's wait (``Link.waiting``, see _interrupt); one that came
        before is raised here."""
        if self.outcome is not None:
            raise Aborted
        return _gevent.wait_any(self._hub, watchers, timeout)

    def _source_ended(self, direction: int) -> None:
        """A direction's source sent its clean EOF. While the other direction goes on, pass
        the half-close along; if that one ended already (with its own EOF), teardown's
        close() sends our FIN, and a shutdown() first would only cost a syscall.

        Not after an abort: a FIN ahead of the RST reads as a clean end. And not when the
        end was a reset that a bulk lane took: a socket reports its error once, so while a
        lane writes to this source's socket (the other direction is LANE), the lane may take
        the reset and leave this read only the end of the stream; the kernel still shows the
        connection reset (CLOSE)."""
        if self.outcome is not None:
            return
        src, dst = self._ends[direction][:2]
        other = self._states[1 - direction]
        if other is LANE and tcp_closed(src):
            side = "client" if src is self.client else "upstream"
            failed = failure(ConnectionResetError(errno.ECONNRESET, os.strerror(errno.ECONNRESET)), side)
            self.abort(failed.outcome, failed.error)
            return
        self._eof_count += 1
        if other is not ENDED:
            _sockets.half_close(dst)

    def _side_of(self, direction: int, exc: OSError) -> str:
        """Which side ("client" or "upstream") a pump's socket error came from, judged after
        the fact so the pump pays nothing for it: the side whose TCP connection the kernel
        shows ended (a reset or a timeout leaves it CLOSE). When that does not tell (a Unix
        socket, or both ended), by the errno: EPIPE is met writing, to the destination; the
        others mostly reading, from the source."""
        src, dst = self._ends[direction][:2]
        ended = [sock for sock in (src, dst) if tcp_closed(sock)]
        sock = ended[0] if len(ended) == 1 else dst if exc.errno == errno.EPIPE else src
        return "client" if sock is self.client else "upstream"

    # -- the way out ------------------------------------------------------------

    def _end_direction(self, direction: int, in_callback: bool = False) -> None:
        """The one way a direction ends (-> ENDED), whatever ended it: its source's EOF, an
        error, an abort that found it parked, a pump that found the connection aborted, a
        connect that failed. The second direction to end tears the connection down.
        ``in_callback``: called in a callback on the hub, where the teardown (its log line
        and on_close hook may block) must not run: a worker runs it."""
        states = self._states
        if states[direction] is ENDED:  # never, by the table; a guard against a double teardown
            return
        states[direction] = ENDED
        if states[1 - direction] is not ENDED:
            return
        if self._eof_count == 2:
            self._finish(Outcome.EOF)
        if in_callback:
            self.context.workers.run(self._teardown)
        else:
            self._teardown()

    def _end_unstarted(self, in_callback: bool = False) -> None:
        """The connect phase ended with no pumps (failed, refused, aborted): NEW -> ENDED,
        both directions, which tears the connection down."""
        self._end_direction(UPSTREAM, in_callback)
        self._end_direction(DOWNSTREAM, in_callback)

    def _teardown(self) -> None:
        """Both directions ended: close the watchers, then the sockets, give back what the
        connection held, and hand it to the report (_report.closed)."""
        for watcher in self._watchers:
            watcher.close()
        self._watchers = []
        if self._upstream_writable is not None:  # connected, never pumped
            self._upstream_writable.close()
            self._upstream_writable = None
        context = self.context
        if context.on_close is not None:
            self.upstream_ends()  # the hook's record shows them: ask while the socket is open
        reset = self.outcome in (Outcome.RESET, Outcome.SHUTDOWN, Outcome.ERROR, Outcome.DENIED)
        for sock in (self.upstream, self.client):
            if sock is not None:
                if reset:
                    _sockets.abort(sock)
                else:
                    sock.close()
        if self.access_key is not None:
            context.access.release(self.access_key)
        if self.target is not None:
            context.targets.released(self.target)
        links, self.links = self.links, None
        if links is not None:
            link = links[UPSTREAM] or links[DOWNSTREAM]
            if link is not None and link.tap is not None:  # a capture writes how it ended
                link.tap.ended(self.outcome, self.error)
        if self.own_key is not None:
            context.own_upstreams.forget(self.own_key)
        if self.outcome is None:  # cannot happen; keep the books straight if it does
            self.outcome = Outcome.ERROR
        _report.closed(self)

    def forget_after_fork(self, close_watchers: bool) -> None:
        """In a forked child: close this connection's copies of its sockets, with no teardown
        and no report (the connection is the parent's). ``close_watchers``: the hub they
        belong to goes on in the child, and libev needs them closed before their fds."""
        if close_watchers:
            for watcher in self._watchers:
                watcher.close()
            if self._upstream_writable is not None:
                self._upstream_writable.close()
        ends: Tuple[Any, Any] = (self.client, self.upstream)  # (TLSSockets, typed as sockets)
        for sock in ends:
            if sock.__class__ is _tls.TLSSocket:
                sock.forget(close_watchers)  # no close_notify: the session is the parent's
            elif sock is not None:
                sock.close()

    # -- acting on the directions, by their state ---------------------------------

    def abort(self, outcome: Outcome, error: Optional[str] = None) -> None:
        """End the connection now: record why (the first reason wins) and end or wake each
        direction according to its state (the theory's table)."""
        if self.outcome is not None:
            return
        self._finish(outcome, error)
        states = self._states
        if states[UPSTREAM] is NEW:  # connecting (both directions leave NEW together)
            _dial.cancel(self)
            return
        for direction in (UPSTREAM, DOWNSTREAM):
            state = states[direction]
            if state is PARKED:
                self._ends[direction][2].stop()  # no greenlet to wake: the direction just ends
                self._end_direction(direction)
            elif state is RUNNING or state is CHAIN:
                self._hub.loop.run_callback(self._interrupt, direction, Aborted())
            elif state is LANE:
                self.context.offload.wake(self)  # the thread lets go; the pump then ends

    def connected(self) -> bool:
        """Whether its pumps started and one of them still runs (a capture may join it)."""
        states = self._states
        return states[UPSTREAM] is not NEW and (states[UPSTREAM] is not ENDED or states[DOWNSTREAM] is not ENDED)

    def kick(self, direction: int) -> None:
        """Hub callback after a change to the toxics: make this direction's pump pick its path
        now. A parked one is started; one in its chain's wait is thrown _Switch (the chain's
        state is all in its Link); a running one, or a lane, sees the version at its next chunk."""
        if self.outcome is not None:
            return
        state = self._states[direction]
        if state is PARKED:
            self._resume(direction)
        elif state is CHAIN:
            waiting = self.links[direction].waiting
            if waiting is not None:
                waiting.throw(_Switch())

    def park(self) -> None:
        """The parking pass: release the greenlet of each direction in its chain that moved
        nothing since the last pass (it waits for its source, or for a time, and the _Park
        handler keeps a chain that holds bytes running). A fast-path pump parks by itself."""
        counts, seen, states = self.counts, self.seen, self._states
        for direction in (UPSTREAM, DOWNSTREAM):
            if counts[direction] == seen[direction] and states[direction] is CHAIN:
                self._hub.loop.run_callback(self._interrupt, direction, _Park())
            seen[direction] = counts[direction]

    def _interrupt(self, direction: int, error: BaseException) -> None:
        """Hub callback: throw ``error`` into this direction's pump if it waits now. Whom to
        throw into is decided here, not when the throw was asked for: a pump that parked or
        ended meanwhile is left alone, and one that is not waiting finds the outcome (an
        abort) before its next wait. A pump in its CHAIN may be thrown anything (all its
        state is in its Link); a RUNNING one waits only for its destination, holding bytes,
        so only an abort is thrown into it."""
        state = self._states[direction]
        if state is CHAIN:
            waiting = self.links[direction].waiting
            if waiting is not None:
                waiting.throw(error)
        elif state is RUNNING and error.__class__ is Aborted:
            _gevent.throw_into_waiter(self._ends[direction][3], error)

    def idle_at_stop(self) -> bool:
        """Whether stopping may close this connection now, without waiting for it to end:
        both directions are parked (each waits for its source and holds no bytes), neither
        side has closed, and the upstream spoke last, so the client has its answer and it is
        the client's turn: a pooled connection at rest. A quiet connection whose client spoke
        last may be waiting for a slow answer, and is left to finish."""
        states = self._states
        if self.outcome is not None or states[UPSTREAM] is not PARKED or states[DOWNSTREAM] is not PARKED \
                or self._eof_count or self.spoke != DOWNSTREAM:
            return False
        return self.links is None or not any(link is not None and link.busy() for link in self.links)

    def close_idle(self) -> None:
        """End a connection that is idle at stop with FIN, not RST (outcome ``closed``): the
        peers see a clean close, as from a server closing a keep-alive connection between
        requests."""
        self.abort(Outcome.CLOSED, "idle at stop")

    def _finish(self, outcome: Outcome, error: Optional[str] = None) -> None:
        if self.outcome is None:
            self.outcome = outcome
            self.error = error

    # -- reporting ----------------------------------------------------------------

    def upstream_ends(self):
        """The connected upstream's (peer, local) socket addresses, IP ones as (host, port),
        or None (not connected yet, or closed before anyone asked): two syscalls, made once,
        when a record is first wanted, so a connection nobody looks at never pays them."""
        ends = self._upstream_ends
        if ends is None and self.upstream is not None and self.upstream.fileno() >= 0:  # closed: -1
            try:
                ends = (_sockets.endpoint(self.upstream.getpeername()),
                        _sockets.endpoint(self.upstream.getsockname()))
            except OSError:  # ENOTCONN while connecting; EBADF once closed
                return None
            self._upstream_ends = ends
        return ends

    def phase(self) -> str:
        """Where this open connection is, as a record's ``state`` says it
        (``stats.CONNECTION_STATES``; ``closed`` is the report's to say)."""
        if self.outcome is not None:
            return "closing"
        states = self._states
        if states[UPSTREAM] is NEW:
            return "connecting"
        # a direction ends before the outcome is decided only at its source's clean EOF
        if states[UPSTREAM] is ENDED:
            return "client_eof"
        return "upstream_eof" if states[DOWNSTREAM] is ENDED else "open"

    def record(self) -> ConnectionRecord:
        """What this connection is, or was (see _report.record)."""
        return _report.record(self)


def sweep_due(context: Context, park: bool) -> bool:
    """Whether a pass of the periodic watch has anything to do: a timeout to check, or
    (``park``) a pump that may sit in its toxic chain. Neither, the common case (no
    ``idle_timeout``, no toxic ever), and the connections are not walked at all: a forwarder
    holding 100,000 idle connections then spends nothing on them from one second to the next
    (the walk cost about 0.35 us per connection per second)."""
    rule = context.rule
    return rule.idle_timeout is not None or rule.half_close_timeout is not None or (park and context.linked)


def sweep(context: Context, now: float, park: bool) -> None:
    """One pass of the periodic watch: abort connections quiet for longer than the rule's
    ``idle_timeout`` (or ``half_close_timeout`` once one side has closed), and with ``park``
    release the greenlets of pumps that stayed quiet since the last parking pass. ``now`` is
    ``time.monotonic()`` less ``context.stalled``, the time the loop did not run."""
    rule = context.rule
    idle_timeout, half_close_timeout = rule.idle_timeout, rule.half_close_timeout
    timed = idle_timeout is not None or half_close_timeout is not None
    for conn in list(context.active.values()):
        if conn.outcome is not None or conn._states[UPSTREAM] is NEW:
            continue  # ending, or still connecting (connect_timeout is in charge)
        if timed:
            total = conn.counts[0] + conn.counts[1]
            if total != conn.seen_total:
                conn.seen_total, conn.seen_at = total, now
            else:
                limit = half_close_timeout if conn._eof_count and half_close_timeout is not None \
                    else idle_timeout
                if idle_timeout is not None and limit is not None:
                    limit = min(limit, idle_timeout)
                if limit is not None and now - conn.seen_at >= limit:
                    conn.abort(Outcome.IDLE_TIMEOUT, "half-closed" if conn._eof_count else None)
                    continue
        if park:
            conn.park()


def toxics_changed(context: Context, direction: Optional[int] = None) -> None:
    """After a change to ``context.toxics``: bump the version (busy pumps see it at their next
    chunk) and kick every open connection's pump of ``direction`` (both if None) on the next
    pass of the loop. Never waits for the data side."""
    context.toxic_version += 1
    if not context.active:
        return
    loop = gevent.get_hub().loop
    directions = (UPSTREAM, DOWNSTREAM) if direction is None else (direction,)
    for conn in list(context.active.values()):
        for d in directions:
            loop.run_callback(conn.kick, d)
