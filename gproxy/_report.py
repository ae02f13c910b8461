"""What gproxy says about a connection, and about the host's code that failed inside one.

Typical use::

    _report.closed(conn)                    # the teardown's books: totals, log line, on_close
    _report.call_hook(conn, hook, None, "on_open")
    record = _report.record(conn)           # what hooks, statistics() and Python toxics see
    report(log, f"conn#{conn.id}: on_close hook {hook!r} failed", sys.exc_info())

A connection's report is its counters (moved into the totals, its rule's and its target's,
and out of ``active`` under the context's lock, so ``statistics()`` counts every byte once),
its one log line (HAProxy's tcplog is the model: id, client, upstream, outcome, duration,
bytes each way; the logger is ``gproxy.relay``, a name hosts configure) and its hooks.
Everything here runs once the connection's sockets are closed, or before its connect, in a
greenlet: a hook may block.

A failure of the host's own code that runs inside gproxy (a hook, a Python toxic) is a bug in
the host's program, and the host may have configured no logging at all: ``report`` then
writes to stderr, as Python prints an uncaught exception, instead of vanishing into gproxy's
``NullHandler``.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping
from typing import Optional

from greenlet import getcurrent

from gproxy import _sockets, _tls
from gproxy._access import client_key, describe_key
from gproxy._sni import describe as describe_sni
from gproxy.stats import ConnectionRecord, Outcome

__all__ = ["report", "record", "closed", "call_hook"]


def report(logger: logging.Logger, message: str, exc_info=None) -> None:
    """Log an ERROR (with its traceback, given ``exc_info``). When the host configured no
    handler for it (gproxy's loggers have only a NullHandler, which hides the record from
    logging's ``lastResort``), print it on stderr as Python prints an uncaught exception: a bug
    in the host's code must not vanish without a word. A host that set gproxy's level above
    ERROR chose silence."""
    if not logger.isEnabledFor(logging.ERROR):
        return
    if _has_handler(logger) or logging.lastResort is None:
        logger.error("%s", message, exc_info=exc_info)
    else:
        logging.lastResort.handle(logger.makeRecord(logger.name, logging.ERROR, __file__, 0, "%s",
                                                    (message,), exc_info))


def _has_handler(logger: logging.Logger) -> bool:
    """Whether a record of this logger reaches a handler other than a NullHandler."""
    current: Optional[logging.Logger] = logger
    while current is not None:
        if any(not isinstance(h, logging.NullHandler) for h in current.handlers):
            return True
        if not current.propagate:
            return False
        current = current.parent
    return False


# -- a connection's report ----------------------------------------------------------------------

#: the connection lines' logger: its name is public (hosts configure it), so it stays relay's
_conn_log = logging.getLogger("gproxy.relay")


def record(conn) -> ConnectionRecord:
    """What a connection is, or was, for hooks, statistics and its log line."""
    done = conn.outcome is not None and not conn.context.active.get(conn.id)
    ends = conn.upstream_ends()
    return ConnectionRecord(
        id=conn.id, client=_sockets.describe_address(conn.client_address),
        client_address=_sockets.endpoint(conn.client_address),
        upstream_address=None if ends is None else ends[0],
        upstream_local_address=None if ends is None else ends[1],
        upstream=str(conn.target) if conn.target is not None else conn.context.target_name
        if conn.sni is None or conn.sni.endpoint is None else str(conn.sni.endpoint),
        started=conn.started,
        bytes_upstream=conn.counts[0], bytes_downstream=conn.counts[1],
        duration=time.monotonic() - conn._t0 if done else None,
        outcome=conn.outcome if done else None,
        error=conn.error if done else None,
        state="closed" if done else conn.phase(),
        sni=None if conn.sni is None else conn.sni.name,
        route=None if conn.sni is None else conn.sni.route,
    )


def closed(conn) -> None:
    """The books of a connection whose sockets are closed: its bytes and outcome into the
    totals (and out of ``active``) at once, its log line, its ``on_close`` hook, and its slot
    given back to the server whatever happens in between."""
    context = conn.context
    counters = context.counters
    outcome = conn.outcome
    with context.lock:  # counted and removed at once: statistics() never goes backwards
        counters.ended(outcome, time.monotonic() - conn._t0, conn.counts[0], conn.counts[1])
        if conn.target_counts is not None:  # connected: its target's totals too
            conn.target_counts.ended(outcome, conn.counts[0], conn.counts[1])
        context.active.pop(conn.id, None)
    failed = outcome is Outcome.CONNECT_FAILED or outcome is Outcome.CONNECT_TIMEOUT
    if failed:
        counters.connect_failed += 1
    tls = _tls_fields(conn) if counters.tls is not None else None
    try:
        if context.on_close is not None or failed or outcome is Outcome.ERROR or outcome is Outcome.QUEUE_TIMEOUT \
                or _conn_log.isEnabledFor(logging.INFO):
            line = record(conn)
            _log_line(conn, line, tls)
            call_hook(conn, context.on_close, line, "on_close")
    finally:  # the slot is given back whatever happened above
        if context.on_closed is not None:
            context.on_closed()


def call_hook(conn, hook, line: Optional[ConnectionRecord], name: str) -> None:
    """Call a user's hook with the connection's record. Whatever it raises (``SystemExit``
    and ``gevent.Timeout`` included: it runs in a greenlet of ours, so nothing outside waits
    for that exception) is reported and the connection goes on: a hook cannot break the
    forwarder."""
    if hook is None:
        return
    in_hook, current = conn.context.in_hook, getcurrent()
    in_hook[current] = conn
    try:
        hook(line if line is not None else record(conn))
    except BaseException:
        report(_conn_log, f"conn#{conn.id}: {name} hook {getattr(hook, '__qualname__', hook)!r} failed",
               sys.exc_info())
    finally:
        in_hook.pop(current, None)


def _tls_fields(conn) -> dict:
    """A TLS connection's fields for its JSON line (the version, cipher, SNI name and ALPN
    protocol of each TLS side: ``tls_*`` the client's, ``target_tls_*`` the target's); and a
    clean end whose peer ended TLS without close_notify says so in its error."""
    fields: dict = {}
    for prefix, side, sock in (("tls", "client", conn.client), ("target_tls", "upstream", conn.upstream)):
        if sock.__class__ is _tls.TLSSocket:
            for key, value in sock.info().items():
                fields[f"{prefix}_{key}"] = value
            if sock.truncated and conn.outcome is Outcome.EOF and conn.error is None:
                conn.error = f"{side} ended TLS without close_notify"
    return fields


def _log_line(conn, line: ConnectionRecord, tls: Optional[dict] = None) -> None:
    """The one line of a closed connection: ERROR for a bug (with its traceback), WARNING
    for a failed connect or a queue timeout, a rate-limited line for a refused client, else INFO."""
    context = conn.context
    outcome = line.outcome
    # the fields a JSON log line carries, so no formatter has to parse the text
    extra = {"connection": _LogFields(context.name, line, conn.sni, tls)}
    if outcome is Outcome.ERROR:
        _conn_log.error("%sconn#%d %s -> %s failed after %.3fs, up %d B, down %d B:\n%s",
                        context.log_prefix, line.id, line.client, line.upstream, line.duration,
                        line.bytes_upstream, line.bytes_downstream, line.error, extra=extra)
        return
    if outcome in (Outcome.CONNECT_FAILED, Outcome.CONNECT_TIMEOUT, Outcome.QUEUE_TIMEOUT):
        routed = "" if conn.sni is None else f" ({describe_sni(conn.sni)})"
        _conn_log.warning("%sconn#%d %s -> %s%s %s after %.3fs: %s", context.log_prefix, line.id,
                          line.client, line.upstream, routed, outcome, line.duration, line.error, extra=extra)
        return
    if outcome is Outcome.DENIED:  # one line per client address per minute at most
        key = client_key(conn.client_address)
        context.denied_log.note(describe_key(key) if key is not None else line.client,
                                "%sconn#%d %s denied: %s", context.log_prefix, line.id,
                                line.client, line.error, extra=extra)
        return
    if _conn_log.isEnabledFor(logging.INFO):
        why = f" ({line.error})" if line.error else ""
        routed = "" if conn.sni is None else ", " + describe_sni(conn.sni)
        _conn_log.info("%sconn#%d %s -> %s %s%s, %.3fs, up %d B, down %d B%s", context.log_prefix,
                       line.id, line.client, line.upstream, outcome, why, line.duration,
                       line.bytes_upstream, line.bytes_downstream, routed, extra=extra)


class _LogFields(Mapping):
    """A connection line's fields (rule, id, client, target, outcome, duration, bytes each
    way, error; on a rule with route_sni, sni and route, "default" when none matched), for a
    formatter that reads them (gproxy._jsonlog): a read-only mapping made when first read, so
    a text line does not pay for building it."""

    __slots__ = ("_rule", "_record", "_fields", "_choice", "_tls")

    def __init__(self, rule: str, line: ConnectionRecord, choice=None, tls: Optional[dict] = None) -> None:
        self._rule, self._record, self._choice, self._tls = rule, line, choice, tls
        self._fields: Optional[dict] = None

    def _get(self) -> dict:
        if self._fields is None:
            line = self._record
            assert line.outcome is not None and line.duration is not None  # a closed connection's
            self._fields = {
                "rule": self._rule, "id": line.id, "client": line.client, "target": line.upstream,
                "outcome": line.outcome.name.lower(), "duration": round(line.duration, 6),
                "bytes_upstream": line.bytes_upstream, "bytes_downstream": line.bytes_downstream,
                "error": line.error}
            if self._choice is not None:  # a rule with route_sni
                self._fields["sni"] = line.sni
                self._fields["route"] = line.route or "default"
            if self._tls:
                self._fields.update(self._tls)
        return self._fields

    def __getitem__(self, key: str):
        return self._get()[key]

    def __iter__(self):
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())

    def items(self):
        return self._get().items()

    def __repr__(self) -> str:
        return repr(self._get())
