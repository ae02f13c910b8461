"""Prometheus text exposition of the forwarders' counters, and a GET /metrics server for it.

Typical use::

    text = metrics.render([fw1, fw2])                  # anything with .name and .counters
    server = metrics.serve("127.0.0.1:9108", lambda: [fw1, fw2])   # on this thread's hub
    ...
    server.stop()

    # or mount the WSGI app on another gevent.pywsgi server (the HTTP API does):
    app = metrics.app(lambda: service.forwarders())

Counting lives in ``stats.Counters`` (fed by relay once per connection); this module
only reads it. A scrape costs one pass over the rules, and one over the open connections'
byte counts (``Counters.bytes_now``: bytes are counted as they move, by the pumps' own
per-connection counters, and summed only here).
Written by hand rather than with ``prometheus_client``: see ``benchmarks/metrics_cost.py``
for the measurement behind that choice.

A page is formatting and nothing else (no lock, no call to another hub), but a thousand
rules make 31,000 lines, 2 MB: about 10 ms of it, and a few more to hand the page to the
socket, which the forwarders on the same hub would wait for. So the servers make it in
slices of rules and write it in pieces, with a pass of the event loop between each
(``_page``, ``_paced``; ``benchmarks/metrics_pause.py`` measures it). A slice never splits
a rule: each rule's samples are one snapshot, and counters only grow from page to page.
"""

from __future__ import annotations

import logging
import os
import platform
from typing import Callable, Generator, Iterable, Iterator, List, Optional

import gevent
from gevent import get_hub
from gevent.pywsgi import WSGIServer

from gproxy import __version__, _http
from gproxy.config import AddressLike, parse_tcp_address
from gproxy.stats import CONNECT_REASONS, DURATION_BUCKETS, Outcome, TargetCounters
from gproxy.targets import TargetState

__all__ = ["CONTENT_TYPE", "app", "render", "serve"]   # route() is for gproxy's own API server

log = logging.getLogger(__name__)

#: the Prometheus text format, version 0.0.4
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: label values for outcomes: snake case, as Prometheus labels usually are
_OUTCOME_LABELS = {outcome: outcome.name.lower() for outcome in Outcome}
_LE_LABELS = [repr(float(bound)) for bound in DURATION_BUCKETS] + ["+Inf"]

_HEADERS = {
    "connections": ("gproxy_connections_total", "counter",
                    "Connections that ended, by rule and how they ended."),
    "active": ("gproxy_connections_active", "gauge", "Connections open now."),
    "bytes": ("gproxy_bytes_total", "counter",
              "Bytes relayed, open connections' included, upstream (client to target) and downstream."),
    "failures": ("gproxy_connect_failures_total", "counter",
                 "Connect attempts to a target that failed (refused, unreachable, timed out)."),
    "up": ("gproxy_target_up", "gauge",
           "1 unless the target is down: its active health check failed, its last connect failed "
           "(one target), or passive health marked it down (several)."),
    "duration": ("gproxy_connection_duration_seconds", "histogram",
                 "Connection lifetimes, from accept to teardown."),
    "target_connections": ("gproxy_target_connections_total", "counter",
                           "Connections to the target (its connect worked) that ended, by how they ended."),
    "target_active": ("gproxy_target_active_connections", "gauge",
                      "Connections open to the target now (its connect worked, not ended yet)."),
    "target_bytes": ("gproxy_target_bytes_total", "counter",
                     "Bytes relayed by the target's connections, open ones' included, upstream "
                     "(client to target) and downstream."),
    "target_failures": ("gproxy_target_connect_failures_total", "counter",
                        "Connect attempts to the target that failed, by reason: refused, timeout, "
                        "unreachable, resolve, other."),
    "target_weight": ("gproxy_target_weight", "gauge",
                      "The target's weight now (as configured, or as set at run time)."),
    "target_state": ("gproxy_target_state", "gauge",
                     "1 for the target's state set at run time: enabled, drain (no new clients) or "
                     "disabled (no new clients, no checks)."),
    "check_duration": ("gproxy_target_check_duration_seconds", "gauge",
                       "How long the target's last active health check took."),
    "target_limit": ("gproxy_target_max_connections", "gauge",
                     "The most connections the target may have open at once (a target with no "
                     "limit has no sample)."),
    "queue": ("gproxy_queue_length", "gauge",
              "Clients waiting now for a target with room (every target they may use is at its "
              "max_connections)."),
    "queued": ("gproxy_queued_total", "counter",
               "Clients that waited in the queue, once their wait ended (their turn, a timeout, "
               "or they left)."),
    "queue_wait": ("gproxy_queue_wait_seconds_total", "counter",
                   "Seconds the clients counted in gproxy_queued_total waited, in all."),
    "tls_handshakes": ("gproxy_tls_handshakes_total", "counter",
                       "TLS handshakes of a TLS rule, by side (client: terminated, upstream: originated) "
                       "and result: ok, failed, timeout."),
    "tls_duration": ("gproxy_tls_handshake_duration_seconds", "histogram",
                     "How long TLS handshakes took, by side, whatever their result."),
}

#: a target's outcomes shown even at 0: those a connection that reached its target can have
#: (the others show once counted, as a PROXY header that could not be sent, connect_timeout)
_TARGET_OUTCOMES = frozenset((Outcome.EOF, Outcome.RESET, Outcome.IDLE_TIMEOUT, Outcome.SHUTDOWN,
                              Outcome.CLOSED, Outcome.ERROR))
_STATES = [str(state) for state in TargetState]
# the ends of the per-target lines, after the labels they share
_OUTCOME_ENDS = {outcome: f',outcome="{label}"}} ' for outcome, label in _OUTCOME_LABELS.items()}
_REASON_ENDS = {reason: f',reason="{reason}"}} ' for reason in CONNECT_REASONS}
_STATE_ENDS = {state: [f',state="{other}"}} {1 if other == state else 0}' for other in _STATES]
               for state in _STATES}
_NO_COUNTS = TargetCounters()  # a target nothing was counted for yet


def _escape(value: str) -> str:
    """A label value as the text format wants it: backslash, double quote and newline escaped."""
    if "\\" in value or '"' in value or "\n" in value:
        value = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return value


def _number(value) -> str:
    if isinstance(value, float):
        return repr(value)
    return str(int(value))


def render(sources: Iterable, *, process: bool = True) -> str:
    """The text exposition for ``sources``: forwarders (anything with ``.name`` and
    ``.counters``) or ``(name, forwarder)`` pairs such as ``Service.items()`` gives. Every
    family's HELP and TYPE once, then one sample per rule (and outcome, direction, target);
    then ``gproxy_build_info`` and, with ``process`` (default True) on Linux, the standard
    ``process_*`` metrics (leave them out where another library exports them already, such
    as ``prometheus_client``'s default registry). All at once; the servers below give the
    event loop passes while they make it."""
    steps = _render(sources, encode=False, process=process)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return "".join(done.value)


def _page(sources: Iterable, process: bool = True) -> List[bytes]:
    """The page as ``render`` makes it, in pieces, with a pass of the event loop between
    slices of rules: the forwarders on this hub keep forwarding while a big page is made.
    Call it from a greenlet (a WSGI handler runs in one)."""
    hub = get_hub()
    steps = _render(sources, encode=True, process=process)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value
        _loop_pass(hub)


def _paced(page: List[bytes]) -> Iterator[bytes]:
    """The page in pieces of about ``PIECE`` bytes, with a pass of the event loop before
    each piece but the first: handing 2 MB to a fast reader's socket takes milliseconds
    too, and the socket does not make the writer wait while the kernel takes it all."""
    hub = get_hub()
    piece: List[bytes] = []
    size = 0
    sent = False
    for part in page + [b""]:
        if part:
            piece.append(part)
            size += len(part)
            if size < PIECE:
                continue
        if not piece:
            continue
        if sent:
            _loop_pass(hub)
        yield b"".join(piece)
        sent = True
        piece, size = [], 0


def _loop_pass(hub) -> None:
    """Let the event loop make one pass: poll for I/O (without blocking) and run whatever
    is ready, then come back. A timer due at once does that; sleep(0) does not: it resumes
    from the loop's callbacks and may come back before the loop has polled at all."""
    with hub.loop.timer(0) as due:
        hub.wait(due)


#: sample lines made between two passes of the event loop: about 0.15 ms (a rule with one
#: target has 51; 31 before the per-target families came). Measured with 1,000 rules of 31
#: lines scraped back to back: round trips' p50 0.7 ms with 1,000, 0.4 ms with 500, 0.3 ms
#: with 250, the scrape taking 9.3, 9.6 and 10.3 ms.
SLICE = 500
#: bytes of the page written between two passes of the event loop
PIECE = 64 * 1024


def _render(sources: Iterable, encode: bool, process: bool = True) -> Generator[None, None, list]:
    """The page's pieces (str, or UTF-8 if ``encode``), yielding after each slice of about
    ``SLICE`` lines: never inside a rule, whose samples are thus one snapshot. Each slice's
    lines are joined as it ends, so that no step at the end handles the whole page."""
    families: dict = {key: [] for key in _HEADERS}  # per family: its slices' text, in order
    sections: dict = {key: [] for key in _HEADERS}  # per family: this slice's lines
    made = 0

    def end_slice() -> None:
        for key, lines in sections.items():
            if lines:
                lines.append("")  # the last line's newline
                text = "\n".join(lines)
                families[key].append(text.encode("utf-8") if encode else text)
                lines.clear()

    failures_out, up_out = sections["failures"], sections["up"]
    connections_out, target_active_out = sections["target_connections"], sections["target_active"]
    target_bytes_out, target_failures_out = sections["target_bytes"], sections["target_failures"]
    weight_out, state_out = sections["target_weight"], sections["target_state"]
    check_out = sections["check_duration"]
    limit_out, queue_out = sections["target_limit"], sections["queue"]
    queued_out, queue_wait_out = sections["queued"], sections["queue_wait"]
    for source in list(sources):
        if isinstance(source, tuple):
            name, source = source
        else:
            name = source.name
        counters = source.counters
        rule = 'rule="' + _escape(str(name)) + '"'
        out = sections["connections"]
        # (outcomes has a key per Outcome from the start: iterating it is safe from any
        # thread, and makes no tuples; the target dicts may grow while read, so are copied)
        for outcome, count in counters.outcomes.items():
            out.append(f'gproxy_connections_total{{{rule},outcome="{_OUTCOME_LABELS[outcome]}"}} {count}')
        sections["active"].append(f"gproxy_connections_active{{{rule}}} {counters.active}")
        upstream, downstream, moved = counters.bytes_now()  # the open connections' bytes too
        sections["bytes"].append(f'gproxy_bytes_total{{{rule},direction="upstream"}} {upstream}')
        sections["bytes"].append(f'gproxy_bytes_total{{{rule},direction="downstream"}} {downstream}')
        failures = counters.target_failures.copy()
        views = counters.views()
        per_target = counters.targets
        limited = False
        for target, view in views.items():
            # (about 20 lines per target: the label is made once, each line's fixed parts are
            # made at import, so a line costs one format of a few pieces)
            label = f'{rule},target="{_escape(target)}"'
            failures_out.append(f"gproxy_connect_failures_total{{{label}}} {failures.get(target, 0)}")
            up_out.append(f"gproxy_target_up{{{label}}} {1 if view.up else 0}")
            counts = per_target.get(target) or _NO_COUNTS
            head = "gproxy_target_connections_total{" + label
            for outcome, count in counts.outcomes.items():
                if count or outcome in _TARGET_OUTCOMES:
                    connections_out.append(f"{head}{_OUTCOME_ENDS[outcome]}{count}")
            target_active_out.append(f"gproxy_target_active_connections{{{label}}} {counts.active}")
            head = "gproxy_target_bytes_total{" + label
            up, down = counts.bytes_upstream, counts.bytes_downstream
            if moved:
                more = moved.get(counts)
                if more is not None:  # its open connections' bytes so far
                    up, down = up + more[0], down + more[1]
            target_bytes_out.append(f'{head},direction="upstream"}} {up}')
            target_bytes_out.append(f'{head},direction="downstream"}} {down}')
            head = "gproxy_target_connect_failures_total{" + label
            for reason, count in counts.failures.items():
                target_failures_out.append(f"{head}{_REASON_ENDS[reason]}{count}")
            weight_out.append(f"gproxy_target_weight{{{label}}} {view.weight}")
            head = "gproxy_target_state{" + label
            for end in _STATE_ENDS[view.state]:
                state_out.append(head + end)
            if view.max_connections:
                limited = True
                limit_out.append(f"gproxy_target_max_connections{{{label}}} {view.max_connections}")
            if view.check_duration is not None:
                check_out.append(
                    f"gproxy_target_check_duration_seconds{{{label}}} {_number(float(view.check_duration))}")
        queue = counters.queue
        if limited or counters.queued:  # (a rule that never limited a target has no queue to show)
            queue_out.append(f"gproxy_queue_length{{{rule}}} {0 if queue is None else len(queue.waiters)}")
            queued_out.append(f"gproxy_queued_total{{{rule}}} {counters.queued}")
            queue_wait_out.append(
                f"gproxy_queue_wait_seconds_total{{{rule}}} {_number(float(counters.queue_wait))}")
        out = sections["duration"]
        total = 0
        for le, count in zip(_LE_LABELS, counters.durations):
            total += count
            out.append(f'gproxy_connection_duration_seconds_bucket{{{rule},le="{le}"}} {total}')
        out.append(f"gproxy_connection_duration_seconds_sum{{{rule}}} {_number(counters.duration_sum)}")
        out.append(f"gproxy_connection_duration_seconds_count{{{rule}}} {total}")
        tls = counters.tls
        if tls is not None:
            made += _tls_lines(rule, tls, sections["tls_handshakes"], sections["tls_duration"])
        # (a rule's open connections count too, their bytes having been summed: at about a
        # tenth of a line each, a rule with 10,000 of them ends its slice)
        made += len(_OUTCOME_LABELS) + 22 * len(views) + len(_LE_LABELS) + 5 + counters.active // 10
        if made >= SLICE:
            made = 0
            end_slice()
            yield
    end_slice()
    page = []
    for key, (name, kind, text) in _HEADERS.items():
        head = f"# HELP {name} {text}\n# TYPE {name} {kind}\n"
        page.append(head.encode("utf-8") if encode else head)
        page.extend(families[key])
    tail = _BUILD_INFO + (_process_text() if process else "")
    page.append(tail.encode("utf-8") if encode else tail)
    return page


def _tls_lines(rule: str, tls, handshakes: list, durations: list) -> int:
    """A TLS rule's handshake samples; how many lines they are."""
    before = len(handshakes) + len(durations)
    for (side, result), count in list(tls.results.items()):
        handshakes.append(f'gproxy_tls_handshakes_total{{{rule},side="{side}",result="{result}"}} {count}')
    bounds = [repr(float(bound)) for bound in tls.buckets] + ["+Inf"]
    for side, counts in list(tls.durations.items()):
        label = f'{rule},side="{side}"'
        total = 0
        for le, count in zip(bounds, list(counts)):
            total += count
            durations.append(f'gproxy_tls_handshake_duration_seconds_bucket{{{label},le="{le}"}} {total}')
        durations.append(f"gproxy_tls_handshake_duration_seconds_sum{{{label}}} "
                         f"{_number(float(tls.duration_sum.get(side, 0.0)))}")
        durations.append(f"gproxy_tls_handshake_duration_seconds_count{{{label}}} {total}")
    return len(handshakes) + len(durations) - before


_BUILD_INFO = (
    "# HELP gproxy_build_info gproxy's version, and the Python and gevent it runs on; always 1.\n"
    "# TYPE gproxy_build_info gauge\n"
    'gproxy_build_info{%s} 1\n' % ",".join(f'{key}="{_escape(value)}"' for key, value in (
        ("version", __version__), ("python", platform.python_version()), ("gevent", gevent.__version__))))


# -- the process: what prometheus_client's process collector exports, read from /proc ---------

_PROCESS_HEADERS = (
    ("process_cpu_seconds_total", "counter", "CPU time this process has used, user and system, in seconds."),
    ("process_virtual_memory_bytes", "gauge", "This process's virtual memory, in bytes."),
    ("process_resident_memory_bytes", "gauge", "This process's memory in RAM (its resident set), in bytes."),
    ("process_start_time_seconds", "gauge", "When this process started, in seconds since the Unix epoch."),
    ("process_open_fds", "gauge", "File descriptors this process has open."),
    ("process_max_fds", "gauge", "File descriptors this process may have open (its soft limit)."),
)

#: (pid, ticks per second, page size, the process's start time): read once per process
_process_constants: Optional[tuple] = None


def _process_text() -> str:
    """The ``process_*`` families, from /proc/self (Linux; elsewhere, or when /proc cannot
    be read, none at all). Costs a read of two small files and a ``stat``: about 0.1 ms."""
    global _process_constants
    try:
        with open("/proc/self/stat", "rb") as f:
            stat = f.read()
        constants = _process_constants
        if constants is None or constants[0] != os.getpid():  # (a fork: its own start time)
            constants = _process_constants = _read_constants(stat)
        _pid, ticks, page_size, started = constants
        fields = stat[stat.rindex(b")") + 2:].split()  # proc(5): the fields after comm, from state
        cpu = (int(fields[11]) + int(fields[12])) / ticks      # utime, stime
        virtual, resident = int(fields[20]), int(fields[21]) * page_size  # vsize, rss (pages)
        # Linux 6.2 and later give the count as the directory's size, at once; listing it
        # costs about 2.5 us per fd in the kernel (40 ms for 16,000), on the hub, so it is only
        # the older kernels' way (and the listing opens one fd itself)
        open_fds = os.stat("/proc/self/fd").st_size or len(os.listdir("/proc/self/fd")) - 1
        with open("/proc/self/limits", "rb") as f:
            max_fds = next((line.split()[3] for line in f if line.startswith(b"Max open files")), None)
    except (OSError, ValueError, IndexError, StopIteration):
        return ""
    values = (_number(cpu), str(virtual), str(resident), _number(started), str(open_fds),
              # "unlimited" is no number; prometheus_client leaves the sample out then too
              max_fds.decode() if max_fds is not None and max_fds.isdigit() else None)
    lines = []
    for (name, kind, text), value in zip(_PROCESS_HEADERS, values):
        if value is not None:
            lines.append(f"# HELP {name} {text}\n# TYPE {name} {kind}\n{name} {value}\n")
    return "".join(lines)


def _read_constants(stat: bytes) -> tuple:
    ticks = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat", "rb") as f:
        boot = next(int(line.split()[1]) for line in f if line.startswith(b"btime "))
    started = boot + int(stat[stat.rindex(b")") + 2:].split()[19]) / ticks  # starttime, in ticks
    return os.getpid(), ticks, os.sysconf("SC_PAGE_SIZE"), started


def app(sources: Callable[[], Iterable]) -> Callable:
    """A WSGI application answering ``GET /metrics`` (and HEAD) with the page of ``sources()``
    made in slices: run it on a gevent server."""

    def application(environ, start_response):
        if environ.get("PATH_INFO") != "/metrics":
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found: try /metrics\n"]
        method = environ.get("REQUEST_METHOD")
        if method not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Content-Type", "text/plain"), ("Allow", "GET, HEAD")])
            return [b"GET only\n"]
        page = _page(sources())
        start_response("200 OK", [("Content-Type", CONTENT_TYPE), ("Content-Length", str(sum(map(len, page))))])
        return [] if method == "HEAD" else _paced(page)

    return application


def route(sources: Callable[[], Iterable]) -> Callable:
    """The same page as an ``api.Api.mount`` handler: ``environ -> (status, headers, body)``,
    the body an iterable of pieces."""

    def handle(environ):
        page = _page(sources())
        return 200, [("Content-Type", CONTENT_TYPE), ("Content-Length", str(sum(map(len, page))))], _paced(page)

    return handle


def serve(address: AddressLike, sources: Callable[[], Iterable], *,
          client_timeout: float = _http.CLIENT_TIMEOUT, listener=None) -> WSGIServer:
    """Bind ``address`` and serve ``app(sources)`` from greenlets on this thread's hub (they
    run while the hub does, e.g. in ``Forwarder.serve_forever()``). Returns the started
    server (``.address`` is the bound one; ``.stop()`` ends it). Bind errors raise ``OSError``.
    A client silent for ``client_timeout`` seconds (default 60) is disconnected; malformed
    requests get a 400 (the HTTP API's rules: ``gproxy._http``). ``listener``: a listening
    gevent socket to serve on instead of binding ``address`` (one systemd passed)."""
    where = parse_tcp_address(address, "metrics")
    server = _http.server((where.host, where.port) if listener is None else listener, app(sources), log,
                          client_timeout=client_timeout)
    try:
        server.start()
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen on {where} for metrics: {exc.strerror or exc}") from None
    return server
