"""Prometheus text exposition of the forwarders' counters, and a GET /metrics server for it.

Typical use::

    text = metrics.render([fw1, fw2])                  # anything with .name and .counters
    server = metrics.serve("127.0.0.1:9108", lambda: [fw1, fw2])   # on this thread's hub
    ...
    server.stop()

    # or mount the WSGI app on another gevent.pywsgi server (the HTTP API does):
    app = metrics.app(lambda: service.forwarders())

Counting lives in ``stats.Counters`` (fed by relay once per connection); this module
only reads it. A scrape costs one pass over the rules, never over the connections.
Written by hand rather than with ``prometheus_client``: see ``benchmarks/metrics_cost.py``
for the measurement behind that choice.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable, List

from gevent.pywsgi import WSGIServer

from gproxy import _http
from gproxy.config import AddressLike, parse_address
from gproxy.stats import DURATION_BUCKETS, Outcome

__all__ = ["CONTENT_TYPE", "app", "render", "route", "serve"]

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
              "Bytes relayed by connections that ended, upstream (client to target) and downstream."),
    "failures": ("gproxy_connect_failures_total", "counter",
                 "Connect attempts to a target that failed (refused, unreachable, timed out)."),
    "up": ("gproxy_target_up", "gauge",
           "1 unless the target is down: its last connect failed (one target), or passive health "
           "marked it down (several)."),
    "duration": ("gproxy_connection_duration_seconds", "histogram",
                 "Connection lifetimes, from accept to teardown."),
}


def _escape(value: str) -> str:
    """A label value as the text format wants it: backslash, double quote and newline escaped."""
    if "\\" in value or '"' in value or "\n" in value:
        value = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return value


def _number(value) -> str:
    if isinstance(value, float):
        return repr(value)
    return str(int(value))


def render(sources: Iterable) -> str:
    """The text exposition for ``sources``: forwarders (anything with ``.name`` and
    ``.counters``) or ``(name, forwarder)`` pairs such as ``Service.items()`` gives. Every
    family's HELP and TYPE once, then one sample per rule (and outcome, direction, target)."""
    sections: dict = {key: [] for key in _HEADERS}
    for source in list(sources):
        if isinstance(source, tuple):
            name, source = source
        else:
            name = source.name
        counters = source.counters
        rule = 'rule="' + _escape(str(name)) + '"'
        out = sections["connections"]
        for outcome, count in list(counters.outcomes.items()):
            out.append(f'gproxy_connections_total{{{rule},outcome="{_OUTCOME_LABELS[outcome]}"}} {count}')
        sections["active"].append(f"gproxy_connections_active{{{rule}}} {counters.active}")
        sections["bytes"].append(f'gproxy_bytes_total{{{rule},direction="upstream"}} {counters.bytes_upstream}')
        sections["bytes"].append(f'gproxy_bytes_total{{{rule},direction="downstream"}} {counters.bytes_downstream}')
        failures = dict(list(counters.target_failures.items()))
        health = counters.health() if counters.health is not None else dict(list(counters.target_up.items()))
        for target, up in health.items():
            label = f'{rule},target="{_escape(target)}"'
            sections["failures"].append(f"gproxy_connect_failures_total{{{label}}} {failures.get(target, 0)}")
            sections["up"].append(f"gproxy_target_up{{{label}}} {1 if up else 0}")
        out = sections["duration"]
        buckets, total = list(counters.durations), 0
        for le, count in zip(_LE_LABELS, buckets):
            total += count
            out.append(f'gproxy_connection_duration_seconds_bucket{{{rule},le="{le}"}} {total}')
        out.append(f"gproxy_connection_duration_seconds_sum{{{rule}}} {_number(counters.duration_sum)}")
        out.append(f"gproxy_connection_duration_seconds_count{{{rule}}} {total}")
    lines: List[str] = []
    for key, (name, kind, text) in _HEADERS.items():
        lines.append(f"# HELP {name} {text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(sections[key])
    lines.append("")
    return "\n".join(lines)


def app(sources: Callable[[], Iterable]) -> Callable:
    """A WSGI application answering ``GET /metrics`` (and HEAD) with ``render(sources())``."""

    def application(environ, start_response):
        if environ.get("PATH_INFO") != "/metrics":
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found: try /metrics\n"]
        method = environ.get("REQUEST_METHOD")
        if method not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Content-Type", "text/plain"), ("Allow", "GET, HEAD")])
            return [b"GET only\n"]
        body = render(sources()).encode("utf-8")
        start_response("200 OK", [("Content-Type", CONTENT_TYPE), ("Content-Length", str(len(body)))])
        return [] if method == "HEAD" else [body]

    return application


def route(sources: Callable[[], Iterable]) -> Callable:
    """The same page as an ``api.Api.mount`` handler: ``environ -> (status, headers, body)``."""

    def handle(environ):
        body = render(sources()).encode("utf-8")
        return 200, [("Content-Type", CONTENT_TYPE), ("Content-Length", str(len(body)))], body

    return handle


def serve(address: AddressLike, sources: Callable[[], Iterable], *,
          client_timeout: float = _http.CLIENT_TIMEOUT) -> WSGIServer:
    """Bind ``address`` and serve ``app(sources)`` from greenlets on this thread's hub (they
    run while the hub does, e.g. in ``Forwarder.serve_forever()``). Returns the started
    server (``.address`` is the bound one; ``.stop()`` ends it). Bind errors raise ``OSError``.
    A client silent for ``client_timeout`` seconds (default 60) is disconnected; malformed
    requests get a 400 (the HTTP API's rules: ``gproxy._http``)."""
    where = parse_address(address, "metrics")
    server = _http.server((where.host, where.port), app(sources), log, client_timeout=client_timeout)
    try:
        server.start()
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen on {where} for metrics: {exc.strerror or exc}") from None
    return server
