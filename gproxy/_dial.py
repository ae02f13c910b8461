"""The connect phase: from an accepted client to a connected upstream, or a ``Failure``.

Typical use (``relay.Connection`` does this; ``conn`` is the Connection)::

    read_proxy_header(conn)                  # accept_proxy_from: the client's PROXY header first
    upstream = connect_upstream(conn, spare) # every target, every address; our PROXY header
    start(conn, spare)                       # a plain rule's client: all of it in hub callbacks
    cancel(conn)                             # conn was aborted while connecting
    tls_accept(conn)                         # a TLS rule: the client's handshake, before the connect
    tls_connect(conn)                        # target_tls: the target's handshake, after it

Two paths, one result. ``connect_upstream`` runs in the client's greenlet
(``Connection.run``): it tries the targets in the order the balance gives (one fixed target:
just that one), each name resolved (bounded by ``connect_timeout``) and each of its
addresses connected in turn, each bounded by ``connect_timeout``, and sends the PROXY
header, if the rule sends one, in one write before any payload. ``start`` serves a client
of a plain rule (``Context.dials_on_hub``): one fixed address, nothing to read, check or send
first, so the connect is started from the accept callback and finished from the socket's
writable watcher (or its timer), with no greenlet: a greenlet made, switched to and back per
connection would cost more than the rest of its connect. Either way, success ends in
``Connection._start_pumps`` and failure in a ``Failure`` (its outcome and line, see
_failure.py) for the connection to record.

An abort while connecting (the forwarder stops, the connection is closed by the API) must
not wait for the connect timeout. While a greenlet waits here, ``conn._dialing`` is that
greenlet, and ``cancel`` throws ``Aborted`` into it on the next pass of the loop if it still
waits then; on the callback path ``conn._dialing`` is ``ON_HUB`` and ``cancel`` ends the
connection at once (the teardown closes the connect's watchers, then the socket). A
resolver call cannot be interrupted (gevent resolves in a thread pool): the greenlet stops
waiting and the thread finishes on its own.

TLS handshakes are phases of their own, in the client's greenlet (a TLS rule never takes the
callback path): the client's (``tls_accept``) once access allowed it and before anything is
dialled, the target's (``tls_connect``) once connected and our PROXY header sent. Each is
bounded by ``tls_handshake_timeout``, so a client that stops halfway holds its slot only that
long, and each is counted (``gproxy_tls_handshakes_total``). The connection is open, its
pumps started, only after both.
"""

from __future__ import annotations

import errno
import socket
import time
import traceback
from typing import Optional

import gevent
from gevent.socket import getaddrinfo
from greenlet import getcurrent

from gproxy import _gevent, _proxyproto, _sockets, _tls
from gproxy._access import client_key, in_networks
from gproxy._failure import Aborted, Failure, connect_failure, failure
from gproxy.stats import Outcome
from gproxy.targets import TargetError

__all__ = ["read_proxy_header", "connect_upstream", "start", "cancel", "ON_HUB", "tls_accept", "tls_connect"]

_READ, _WRITE = 1, 2
# why a client's wait in the queue was woken (targets.Queue)
_QUEUE_TURN, _QUEUE_TIMEOUT, _QUEUE_CLIENT = "turn", "timeout", "client"

#: ``conn._dialing`` while ``start``'s connect waits in callbacks, with no greenlet
ON_HUB = object()


class _NoSocket(Failure):
    """No socket could be made (out of fds or memory): this client cannot be served now; the
    next of several targets would not fare better."""


# -- the greenlet path -------------------------------------------------------------------------

def read_proxy_header(conn) -> None:
    """A client from ``accept_proxy_from`` must start with a PROXY header: read exactly that
    (peek, then take only header bytes), within ``proxy_header_timeout``. Its address then
    stands for the client. Raises Failure (DENIED, or RESET) when the client is refused."""
    key = client_key(conn.client_address)
    if key is None or not in_networks(key, conn.context.accept_proxy):
        return  # not a trusted proxy: an ordinary client, whose bytes are payload
    client = conn.client
    timeout = conn.context.rule.proxy_header_timeout
    deadline = time.monotonic() + timeout
    readable = conn._hub.loop.io(client.fileno(), _READ)
    seen, size = b"", None
    try:
        while size is None or len(seen) < size:
            want = (size if size is not None else _proxyproto.V1_MAX) - len(seen)
            try:
                data = client.recv(want, socket.MSG_PEEK)
            except BlockingIOError:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not _wait(conn, readable, remaining):
                    raise Failure(Outcome.DENIED, f"no PROXY header within {timeout:g}s") from None
                continue
            if not data:
                raise Failure(Outcome.DENIED, "closed before sending its PROXY header")
            if size is None:
                size = _proxyproto.header_size(seen + data)
            # what header_size has not placed yet is all header too; never take past it
            take = len(data) if size is None else min(len(data), size - len(seen))
            seen += client.recv(take)
        conn.proxied = info = _proxyproto.parse(seen)
    except _proxyproto.ProxyProtocolError as exc:
        raise Failure(Outcome.DENIED, f"bad PROXY header: {exc}") from None
    except OSError as exc:
        raise failure(exc, "client") from None
    finally:
        readable.close()
    if info.family in (socket.AF_INET, socket.AF_INET6):
        conn.client_address = info.source


def connect_upstream(conn, spare: Optional[_sockets.RawSocket] = None) -> _sockets.RawSocket:
    """The connected upstream socket, its PROXY header sent if the rule sends one; raises
    Failure when no target answered, Aborted when the connection was aborted meanwhile.
    ``spare`` (an unconnected socket made at accept) is used if its family fits, else closed."""
    upstream = None
    context = conn.context
    try:
        sni = conn.sni
        if sni is not None and sni.endpoint is not None:  # route_sni chose it
            upstream = _connect_routed(conn, sni.endpoint, spare)
        elif not context.routed:  # one fixed target: the plain path
            try:
                upstream = _connect_to(conn, context.rule.target, spare)
            except Failure as exc:
                context.counters.connected(context.target_name, False, exc.reason, exc.error)
                raise
            conn.target_counts = context.counters.connected(context.target_name, True)
        else:
            upstream = _connect_targets(conn, spare)
        if context.proxy_version:
            _send_proxy_header(conn, upstream)
        return upstream
    except BaseException:
        if upstream is not None:
            _forget_writable(conn)  # its watcher before its fd
            upstream.close()
            upstream = None
        raise
    finally:
        if spare is not None and spare is not upstream:
            spare.close()  # unused, or failed (closing twice is harmless)


def _connect_routed(conn, endpoint, spare: Optional[_sockets.RawSocket]) -> _sockets.RawSocket:
    """The one target a route (route_sni) chose: counted, and its health kept, like any target;
    no other target stands in for it (the client asked for that name)."""
    context = conn.context
    try:
        sock = _connect_to(conn, endpoint, spare)
    except _NoSocket:
        raise
    except Failure as exc:
        context.targets.failed(endpoint, exc.error)
        context.counters.connected(str(endpoint), False, exc.reason, exc.error)
        raise
    context.targets.succeeded(endpoint)
    conn.target_counts = context.counters.connected(str(endpoint), True)
    conn.target = endpoint
    return sock


def _connect_targets(conn, spare: Optional[_sockets.RawSocket]) -> _sockets.RawSocket:
    """Several targets, or a function: each in the order the balance gives, the next one after
    a failure, so the client notices nothing unless every one fails. With limits, each
    attempt holds a slot of its target (``Targets.claim``); a target at its max_connections is
    skipped, and when every target the client may use is full it waits in the queue
    (``_queued``)."""
    context = conn.context
    targets = context.targets
    failures = []
    given = None  # a target whose slot the queue took for this client
    while True:
        if targets.limited and targets.must_queue():
            order = None  # behind the clients waiting already
        else:
            try:
                order = targets.order(conn.client_address)
            except TargetError as exc:
                raise Failure(Outcome.CONNECT_FAILED, str(exc)) from None
        if order is None:
            given, order = _queued(conn, targets)
            if order is None or given is None and order:
                continue  # (its turn found no target taking clients: ask again)
        if not order:  # every target drained or disabled (gproxy.targets.TargetState)
            raise Failure(Outcome.CONNECT_FAILED, targets.none_open())
        tried = False
        for endpoint in order:
            # with limits, a slot is taken before the connect (and given back if it fails);
            # without, succeeded() counts it, so a limit set later finds the count right
            claimed = targets.limited or endpoint is given
            if endpoint is given:
                given = None  # its slot is this client's already
            elif claimed and not targets.claim(endpoint):
                continue  # full since the order was made
            tried = True
            try:
                sock = _connect_to(conn, endpoint, spare)
            except Failure as exc:
                if claimed:
                    targets.unclaim(endpoint)
                if isinstance(exc, _NoSocket):
                    raise
                targets.failed(endpoint, exc.error)
                context.counters.connected(str(endpoint), False, exc.reason, exc.error)
                failures.append(exc)
                continue
            except BaseException:  # aborted, or a bug: the slot is not lost
                if claimed:
                    targets.unclaim(endpoint)
                raise
            finally:
                spare = None  # used or closed by the first attempt
            targets.succeeded(endpoint, claimed)
            conn.target_counts = context.counters.connected(str(endpoint), True)
            conn.target = endpoint
            return sock
        if tried or not targets.limited:
            break
        # every target of its order filled up before its turn to try: wait for one
    if len(failures) == 1:
        raise failures[0]
    timed_out = all(f.outcome is Outcome.CONNECT_TIMEOUT for f in failures)
    raise Failure(Outcome.CONNECT_TIMEOUT if timed_out else Outcome.CONNECT_FAILED,
                  f"all {len(failures)} targets failed: " + "; ".join(str(f.error) for f in failures))


def _queued(conn, targets):
    """Wait in the rule's queue: ``(target whose slot is taken for it or None, order)``,
    the order being None when its turn came with no target to give it. Failure when the
    queue is full, the wait timed out or the client left; Aborted."""
    if targets.queue_full():
        raise Failure(Outcome.QUEUE_TIMEOUT, f"the queue is full: {len(targets.queue)} clients wait "
                                             f"(max_queue {targets.max_queue})")
    rule = conn.context.rule
    timeout = rule.connect_timeout if rule.queue_timeout is None else rule.queue_timeout
    waiter = targets.queue.join(conn, targets)
    targets.dispatch()  # room somewhere already (a newcomer behind waiters): the oldest goes
    given, order = _wait_turn(conn, waiter, timeout or None)
    if given is None and order:
        return None, None  # (cannot be: dispatch gives an order's first slot; ask again)
    return given, order


def _wait_turn(conn, waiter, timeout: Optional[float]) -> tuple:
    """Wait in ``conn``'s greenlet for ``waiter``'s turn (``targets.Queue``), at most
    ``timeout`` seconds (None: no limit): ``(endpoint whose slot is taken for it or None, the
    order to try)``. Raises Failure (QUEUE_TIMEOUT; EOF or RESET when the client left), or
    Aborted.

    It waits on three things and nothing else: its turn (``Queue.hand`` switches to it from a
    hub callback), a timer, and the client's socket: a client that closes or resets while it
    waits leaves the queue at once (outcome ``eof`` or ``reset``). A client that sends bytes
    while it waits is not watched any more (its bytes wait in the kernel for the target, and
    a readable socket would wake the wait for ever): a close after that is noticed when its
    turn comes, as any client's close is. An abort throws Aborted into the wait as into a
    connect's (``conn._dialing`` is this greenlet). However the wait ends, the waiter leaves
    the queue, and a slot handed to it that it did not take goes to the next waiter
    (``Targets.unclaim``): no slot is lost."""
    hub = conn._hub
    loop = hub.loop
    current = getcurrent()
    waiter.greenlet = current
    timer = loop.timer(timeout) if timeout else None
    readable = loop.io(conn.client.fileno(), _READ)
    taken = False
    conn._dialing = current  # an abort throws Aborted in here (_dial.cancel)
    try:
        if conn.outcome is not None:
            raise Aborted
        if timer is not None:
            loop.update_now()
            timer.start(current.switch, _QUEUE_TIMEOUT)
        readable.start(current.switch, _QUEUE_CLIENT)
        while True:
            if waiter.given is not None:
                taken = True
                return waiter.given
            waiter.waiting = True
            try:
                why = hub.switch()
            finally:
                waiter.waiting = False
            if why is _QUEUE_TURN or waiter.given is not None:
                continue  # (a turn handed in the same pass as the time ran out is taken)
            if why is _QUEUE_TIMEOUT:
                raise Failure(Outcome.QUEUE_TIMEOUT,
                              f"waited {timeout:g}s in the queue: {waiter.targets.full_line()}")
            try:  # _QUEUE_CLIENT: its socket is readable
                data = conn.client.recv(1, socket.MSG_PEEK)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise failure(exc, "client", " while it waited in the queue") from None
            if not data:
                raise Failure(Outcome.EOF, "the client closed while it waited in the queue")
            readable.stop()  # it spoke: its bytes wait for the target (see the docstring)
    finally:
        conn._dialing = None
        readable.close()
        if timer is not None:
            timer.close()
        targets = waiter.targets
        targets.queue.waiters.pop(waiter, None)
        counters = conn.context.counters
        counters.queued += 1
        counters.queue_wait += time.monotonic() - waiter.since
        if not taken and waiter.given is not None and waiter.given[0] is not None:
            targets.unclaim(waiter.given[0])  # its turn came too late: the next waiter's


def _connect_to(conn, target, spare: Optional[_sockets.RawSocket]) -> _sockets.RawSocket:
    """Try each address of one target in turn: the connected socket; Failure when none
    answered; Aborted when the connection was aborted meanwhile."""
    context = conn.context
    timeout = context.rule.connect_timeout
    if target.family is not None:  # an IP literal or a Unix socket needs no resolver
        candidates = [(target.family, target.sockaddr)]
    else:
        candidates = _resolve(conn, target.host, target.port, timeout)
    failed: Optional[Failure] = None
    for family, sockaddr in candidates:
        if conn.outcome is not None:  # aborted while resolving, or between addresses
            raise Aborted
        if spare is not None and spare.family == family:
            sock, spare = spare, None
        else:
            sock = _new_socket(conn, family)
        try:
            code = sock.connect_ex(sockaddr)
            if context.own_upstreams is not None:  # before the listener can accept it
                conn.own_key = context.own_upstreams.note(sock, conn.own_key)
            if code == errno.EINPROGRESS:  # a Unix socket never waits: EAGAIN is a full queue
                writable = conn._hub.loop.io(sock.fileno(), _WRITE)
                try:
                    ready = _wait(conn, writable, timeout)
                except BaseException:
                    writable.close()
                    raise
                code = _connect_result(conn, sock, writable, ready)
        except BaseException:
            sock.close()
            raise
        if code == 0:
            return sock
        sock.close()
        failed = connect_failure(code, _where(target, sockaddr))
    raise failed if failed is not None else Failure(Outcome.CONNECT_FAILED, f"{target}: no address", "resolve")


def _new_socket(conn, family: int) -> _sockets.RawSocket:
    try:
        return _sockets.raw_socket(family)
    except OSError as exc:  # out of fds or memory: this client cannot be served now
        context = conn.context
        if context.on_fd_exhausted is not None and exc.errno in _sockets.FD_EXHAUSTED:
            context.on_fd_exhausted(exc)  # accept no more clients we cannot serve
        raise _NoSocket(Outcome.CONNECT_FAILED,
                        f"cannot open a socket: {_sockets.describe_error(exc)}") from None


def _resolve(conn, host: str, port: int, timeout: Optional[float]) -> list:
    """(family, sockaddr) of each address of ``host``; Failure if it has none or the resolver
    did not answer within ``timeout``."""
    if conn.outcome is not None:
        raise Aborted
    deadline = gevent.Timeout(timeout) if timeout else None
    conn._dialing = getcurrent()
    try:
        if deadline is not None:
            deadline.start()
        infos = getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    except gevent.Timeout as exc:
        if exc is not deadline:
            raise
        raise Failure(Outcome.CONNECT_TIMEOUT, f"cannot resolve {host}: no answer within {timeout:g}s",
                      "resolve") from None
    except OSError as exc:
        raise Failure(Outcome.CONNECT_FAILED, f"cannot resolve {host}: {_sockets.describe_error(exc)}",
                      "resolve") from None
    finally:
        conn._dialing = None
        if deadline is not None:
            deadline.close()
    return [(info[0], info[4]) for info in infos]


def _send_proxy_header(conn, upstream: _sockets.RawSocket) -> None:
    """The PROXY header for this client, in one write; Failure if it could not be sent."""
    version, info = conn.context.proxy_version, conn.proxied
    client = conn.client
    try:
        if info is not None and info.family is not None:  # pass on what the trusted proxy said
            header = _proxyproto.encode(version, info.source, info.destination, info.family)
        elif client.family == socket.AF_UNIX:
            header = _proxyproto.encode(version, conn.peer or b"", client.getsockname(), socket.AF_UNIX)
        else:
            header = _proxyproto.encode(version, conn.peer, client.getsockname())
        sent = upstream.send(header)
        if sent != len(header):  # never on a fresh connection: the header is < one MSS
            writable = conn._hub.loop.io(upstream.fileno(), _WRITE)
            try:
                while sent < len(header):
                    if not _wait(conn, writable, conn.context.rule.connect_timeout):
                        raise Failure(Outcome.CONNECT_TIMEOUT, "could not send the PROXY header")
                    try:
                        sent += upstream.send(header[sent:])
                    except BlockingIOError:
                        pass
            finally:
                writable.close()
    except OSError as exc:
        raise failure(exc, "upstream", " while we sent the PROXY header") from None


def _wait(conn, watcher, timeout: Optional[float]) -> bool:
    """Wait for one watcher, with a deadline (None or 0: none): True if it fired, False on
    timeout; Aborted if the connection is or was aborted meanwhile."""
    if conn.outcome is not None:
        raise Aborted
    conn._dialing = getcurrent()
    try:
        return _gevent.wait_any(conn._hub, (watcher,), timeout or None)
    finally:
        conn._dialing = None


def tls_accept(conn, held: Optional[bytes] = None) -> None:
    """The client's TLS handshake (a terminating rule): ``conn.client`` becomes its TLSSocket.
    ``held``: the client's first bytes, read already (route_sni read its ClientHello to choose
    the target): they begin the handshake, and are no payload. Raises Failure (``tls
    handshake failed``) with the reason, Aborted if aborted meanwhile."""
    stream = conn.context.tls.wrap(conn.client)
    conn.client = stream
    if held:
        stream.incoming.write(held)
        conn.counts[0] -= len(held)  # (read_hello counted them as payload)
    _handshake(conn, stream, "client")


def tls_connect(conn) -> None:
    """The target's TLS handshake (``target_tls``), on the connected ``conn.upstream``, which
    becomes its TLSSocket; the name asked for and checked is ``target_tls_server_name``, else
    the host of the target connected to."""
    context = conn.context
    origin = context.target_tls
    endpoint = conn.target if conn.target is not None else context.rule.target
    stream = origin.wrap(conn.upstream, _tls.server_name(origin.server_name_given, endpoint))
    conn.upstream = stream
    _handshake(conn, stream, "upstream")


def _handshake(conn, stream, side: str) -> None:
    context = conn.context
    loop = conn._hub.loop
    fd = stream.fileno()
    watchers: dict = {}

    def wait(events: int, remaining: float) -> bool:
        if remaining <= 0:
            return False
        watcher = watchers.get(events)
        if watcher is None:
            watcher = watchers[events] = loop.io(fd, events)
        return _wait(conn, watcher, remaining)

    began = time.monotonic()
    try:
        _tls.handshake(stream, wait, context.rule.tls_handshake_timeout, side)
    except Failure as exc:
        stream.failed()
        result = "timeout" if "no TLS handshake within" in exc.error else "failed"
        context.counters.tls.handshake(side, result, time.monotonic() - began)
        raise
    finally:
        for watcher in watchers.values():
            watcher.close()
    context.counters.tls.handshake(side, "ok", time.monotonic() - began)


# -- the callback path -------------------------------------------------------------------------

def start(conn, spare: socket.socket) -> None:
    """On the hub (the accept callback): connect ``spare`` (a socket of the target's family)
    to the rule's one address and start the pumps from the connect watcher's callback."""
    context = conn.context
    conn.upstream = spare
    code = spare.connect_ex(context.direct[1])
    if context.own_upstreams is not None:  # before the listener can accept it
        conn.own_key = context.own_upstreams.note(spare, conn.own_key)
    if code != errno.EINPROGRESS:  # a Unix socket answers at once
        _connect_ended(conn, code)
        return
    loop = conn._hub.loop
    writable = loop.io(spare.fileno(), _WRITE)
    timeout = context.rule.connect_timeout
    timer = loop.timer(timeout) if timeout else None
    conn._watchers = [writable] if timer is None else [writable, timer]
    conn._dialing = ON_HUB
    writable.start(_connect_done, conn, True)
    if timer is not None:
        timer.start(_connect_done, conn, False)


def _connect_done(conn, ready: bool) -> None:
    """Watcher or timer callback, on the hub: start()'s connect has an answer, or its time is up."""
    conn._dialing = None
    watchers, conn._watchers = conn._watchers, []
    writable = watchers[0]
    writable.stop()
    for timer in watchers[1:]:
        timer.close()
    try:
        _connect_ended(conn, _connect_result(conn, conn.upstream, writable, ready))
    except BaseException:  # a bug: logged once, with its traceback, by the teardown
        conn._connect_failed(Failure(Outcome.ERROR, traceback.format_exc()))


def _connect_ended(conn, code: int) -> None:
    """The end of start()'s connect: the pumps, or the failure."""
    context = conn.context
    if code == 0:
        conn.target_counts = context.counters.connected(context.target_name, True)
        conn._start_pumps(conn.upstream)
        conn._read_ahead()
        return
    failed = connect_failure(code, _where(context.rule.target, context.direct[1]))
    context.counters.connected(context.target_name, False, failed.reason, failed.error)
    conn._connect_failed(failed)


def cancel(conn) -> None:
    """``conn`` was aborted while connecting: stop waiting. On the callback path the
    connection ends here; a greenlet that waits is thrown Aborted on the next pass of the loop
    (one that does not wait now finds the outcome before its next wait)."""
    dialing = conn._dialing
    if dialing is ON_HUB:
        conn._dialing = None
        conn._end_unstarted()  # the teardown closes the connect's watchers, then the socket
    elif dialing is not None:
        conn._hub.loop.run_callback(_throw, conn, dialing)


def _throw(conn, dialing) -> None:
    """Hub callback after an abort: end the greenlet's wait, if it still waits here."""
    if conn._dialing is dialing:
        dialing.throw(Aborted())


# -- both ---------------------------------------------------------------------------------------

def _connect_result(conn, sock: _sockets.RawSocket, writable, ready: bool) -> int:
    """A non-blocking connect's errno (0: connected) once its watcher fired (``ready``) or
    its time ran out. A connected socket's writable watcher is kept for its pumps (one
    fewer to make); a failed one's is closed."""
    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if not ready and not code and not _connected(sock):
        code = errno.ETIMEDOUT  # (after a stalled loop the timer may run first: asked)
    if code == 0:
        conn._upstream_writable = writable
    else:
        writable.close()
    return code


def _forget_writable(conn) -> None:
    writable, conn._upstream_writable = conn._upstream_writable, None
    if writable is not None:
        writable.close()


def _connected(sock: _sockets.RawSocket) -> bool:
    """Whether a non-blocking connect has completed, whatever the watchers said: after a
    stall of the loop, the connect timer and the socket's readiness fire in the same pass,
    and the timer's callback may run first."""
    try:
        sock.getpeername()
        return True
    except OSError:  # ENOTCONN: still connecting, or failed
        return False


def _where(target, sockaddr) -> str:
    """A failed connect's address, as its line names it."""
    return _sockets.describe_address(sockaddr) if isinstance(sockaddr, tuple) else str(target)
