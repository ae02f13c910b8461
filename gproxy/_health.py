"""Active health checks: one greenlet per target on the forwarder's hub, feeding ``Targets``.

Typical use (the forwarder does this when its rule has ``check``, on the hub that serves it)::

    checks = Checks(rule, targets)      # targets: the rule's targets.Targets
    checks.start()
    ...
    checks.stop()                       # kills the greenlets; a check under way closes its socket

    passed, reason = probe(rule, endpoint)   # one check, as the greenlets run it

Each target's greenlet runs a check every ``check_interval`` seconds (start to start; the
first at a random point of the first interval, so that a thousand rules do not check at once)
and hands the result, with how long it took, to :meth:`gproxy.targets.Targets.checked`, which
keeps the health state that clients, statistics and metrics read: this module decides
nothing, it only looks. A target disabled at run time (``TargetState.DISABLED``) is not
checked until it is enabled again.

A check is ordinary gevent I/O on the hub's loop: it waits only on its own socket, so no
client waits for it, and a whole check (resolving, connecting, sending, reading) is bounded by
``check_timeout`` with a ``gevent.Timeout``. The kinds:

- ``tcp``: the connect works. (A process that is stopped, SIGSTOP, still has its kernel
  complete handshakes: only ``send-expect`` or ``http`` sees it hang.)
- ``send-expect``: connect, send ``check_send`` (if any), then read until ``check_expect``
  matches what arrived; it fails when the target closes first, when 16384 bytes arrived
  without a match, or at the timeout.
- ``http``: one ``HTTP/1.1`` request with ``Connection: close``; the status code must be in
  ``check_http_status``. Only the status line is read.

When the rule sends a PROXY header, so does every check (v1 ``UNKNOWN``, v2 ``LOCAL``: the
connection is gproxy's own), as HAProxy's do; a target that requires one would otherwise
refuse the check.
"""

from __future__ import annotations

import logging
import random
import re
import socket
import time
from typing import Dict, List, Optional, Tuple

import gevent
import gevent.socket
from gevent import getcurrent

from gproxy import _proxyproto, _sockets
from gproxy.config import CHECK_BUFFER, Address, Endpoint, Rule, http_status_ranges

__all__ = ["Checks", "probe"]

# The logger keeps the module's old name: logger names are public (docs/operations.md#loggers).
log = logging.getLogger("gproxy.health")

_STATUS_LINE = re.compile(rb"HTTP/\d(?:\.\d)? ([1-5]\d\d)(?:[ \r\n]|$)")


class _Failed(Exception):
    """A check found the target unhealthy; the message says why."""


class Checks:
    """The checks of one rule's fixed targets, one greenlet each, on the hub of ``start()``."""

    def __init__(self, rule: Rule, targets) -> None:
        self.rule = rule
        self.targets = targets
        self.request = _Request(rule)
        self._greenlets: List[gevent.Greenlet] = []
        #: the socket of each check under way, closed by forget() in a forked child
        self.sockets: Dict[Endpoint, socket.socket] = {}
        self._reported_bug = False

    def start(self) -> None:
        """Start checking every target, on the calling thread's hub."""
        for endpoint in self.rule.targets:
            self._greenlets.append(gevent.spawn(self._run, endpoint))

    def stop(self) -> None:
        """Stop checking. Returns once every check has ended (at once: a check is killed
        where it waits), except on the hub itself, where the kills are only scheduled."""
        greenlets, self._greenlets = self._greenlets, []
        gevent.killall(greenlets, block=getcurrent() is not gevent.get_hub())

    def stop_soon(self) -> None:
        """Schedule the end of every check without waiting (a forked child whose hub goes on)."""
        greenlets, self._greenlets = self._greenlets, []
        for greenlet in greenlets:
            greenlet.kill(block=False)

    def forget(self) -> None:
        """In a forked child whose hub did not survive: close the copies of the check sockets
        (never their watchers, which belong to the parent's hub)."""
        for sock in self.sockets.values():
            try:
                getattr(sock, "_sock", sock).close()
            except (OSError, AttributeError):
                pass
        self.sockets.clear()
        self._greenlets = []

    def _run(self, endpoint: Endpoint) -> None:
        interval = self.rule.check_interval
        gevent.sleep(random.uniform(0, interval))  # spread the first checks over one interval
        while True:
            started = time.monotonic()
            if not self.targets.checking(endpoint):  # disabled: under maintenance, left alone
                gevent.sleep(interval)
                continue
            try:
                passed, reason = probe(self.rule, endpoint, self.request, self.sockets)
            except Exception:  # a bug here must not end the checks, nor spin, nor flood the log
                if not self._reported_bug:
                    self._reported_bug = True
                    log.exception("%s: checking target %s failed (reported once)", self.targets.label, endpoint)
                passed, reason = False, "the check itself failed (see the error logged)"
            self.targets.checked(endpoint, passed, reason, time.monotonic() - started)
            gevent.sleep(max(0.0, started + interval - time.monotonic()))


class _Request:
    """What a rule's check sends, built once: the PROXY header, then the probe's bytes."""

    def __init__(self, rule: Rule) -> None:
        from gproxy import __version__  # not at import: gproxy/__init__ imports this module
        self.agent = f"gproxy-check/{__version__}"
        version = {"off": 0, "v1": 1, "v2": 2}[rule.proxy_protocol]
        self.header = _proxyproto.encode(version, None, None) if version else b""
        self.expect = re.compile(rule.check_expect.encode("utf-8")) if rule.check_expect else None
        self.statuses = http_status_ranges(rule.check_http_status) if rule.check == "http" else ()

    def payload(self, rule: Rule, endpoint: Endpoint) -> bytes:
        if rule.check == "send-expect":
            return self.header + (rule.check_send or b"")
        if rule.check == "http":
            host = rule.check_http_host or _host_header(endpoint)
            return self.header + (
                f"{rule.check_http_method} {rule.check_http_path} HTTP/1.1\r\nHost: {host}\r\n"
                f"User-Agent: {self.agent}\r\nAccept: */*\r\nConnection: close\r\n\r\n"
            ).encode("ascii")
        return self.header


def probe(rule: Rule, endpoint: Endpoint, request: Optional[_Request] = None,
          sockets: Optional[Dict[Endpoint, socket.socket]] = None) -> Tuple[bool, str]:
    """Check ``endpoint`` once as ``rule`` says, within ``check_timeout``: ``(passed, reason)``.
    Runs on a gevent hub (any greenlet); ``sockets`` holds its socket while it runs."""
    request = request or _Request(rule)
    timeout = rule.check_timeout or rule.check_interval
    deadline = gevent.Timeout(timeout)
    step = "connecting"
    answer = bytearray()  # what the target said so far, for the reason of a failure
    sock = None
    deadline.start()
    try:
        sock, step = _connect(endpoint, sockets), "sending"
        data = request.payload(rule, endpoint)
        if data:
            sock.sendall(data)
        step = "waiting for an answer"
        if rule.check == "tcp":
            return True, "connected"
        if rule.check == "send-expect":
            expect = request.expect
            assert expect is not None  # config requires check_expect for send-expect
            _read_until(sock, answer, lambda: expect.search(answer) is not None,
                        f"a match for {rule.check_expect}")
            return True, f"answered {_snippet(answer)}"
        _read_until(sock, answer, lambda: b"\n" in answer, "a status line")
        return _http_status(bytes(answer), request.statuses, rule.check_http_status)
    except gevent.Timeout as exc:
        if exc is not deadline:
            raise
        if answer and rule.check == "send-expect":  # a wrong answer is not "no answer"
            return False, f"answered {_snippet(answer)}, which does not match {rule.check_expect} " \
                          f"(waited {timeout:g}s)"
        return False, f"timed out after {timeout:g}s {step}"
    except _Failed as exc:
        return False, str(exc)
    except OSError as exc:
        why = _sockets.describe_error(exc)
        return False, why if step == "connecting" else f"{step}: {why}"
    finally:
        deadline.close()
        if sock is not None:
            if sockets is not None:
                sockets.pop(endpoint, None)
            sock.close()


def _connect(endpoint: Endpoint, sockets: Optional[Dict[Endpoint, socket.socket]]) -> socket.socket:
    """A connected gevent socket to ``endpoint``: each address a name has, in turn."""
    if endpoint.family is not None:
        candidates = [(endpoint.family, endpoint.sockaddr)]
    else:
        assert isinstance(endpoint, Address)  # a name to resolve: a Unix address has its family
        try:
            infos = gevent.socket.getaddrinfo(endpoint.host, endpoint.port, 0, socket.SOCK_STREAM)
        except OSError as exc:
            raise _Failed(f"cannot resolve {endpoint.host}: {_sockets.describe_error(exc)}") from None
        candidates = [(info[0], info[4]) for info in infos]
    error: Optional[OSError] = None
    for family, sockaddr in candidates:
        sock = gevent.socket.socket(family, socket.SOCK_STREAM)
        if sockets is not None:
            sockets[endpoint] = sock
        try:
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            error = exc
            if sockets is not None:
                sockets.pop(endpoint, None)
            sock.close()
        except BaseException:  # the deadline, or the checks stopped: nothing may stay open
            if sockets is not None:
                sockets.pop(endpoint, None)
            sock.close()
            raise
    raise error if error is not None else _Failed(f"{endpoint} has no address")


def _read_until(sock: socket.socket, answer: bytearray, done, wanted: str) -> None:
    """Read into ``answer`` until ``done()``; _Failed if the target closes or the buffer fills."""
    while not done():
        if len(answer) >= CHECK_BUFFER:
            raise _Failed(f"{CHECK_BUFFER} bytes without {wanted}: {_snippet(answer)}")
        chunk = sock.recv(CHECK_BUFFER - len(answer))
        if not chunk:
            raise _Failed(f"closed the connection without {wanted}" +
                          (f", after {_snippet(answer)}" if answer else " (no answer)"))
        answer += chunk


def _http_status(answer: bytes, statuses, wanted: str) -> Tuple[bool, str]:
    match = _STATUS_LINE.match(answer)
    if match is None:
        return False, f"not an HTTP answer: {_snippet(answer)}"
    code = int(match.group(1))
    if not any(low <= code <= high for low, high in statuses):
        return False, f"HTTP status {code}, expected {wanted}"
    return True, f"HTTP status {code}"


def _host_header(endpoint: Endpoint) -> str:
    if not isinstance(endpoint, Address):
        return "localhost"  # a Unix socket has no host; HTTP/1.1 still wants the header
    host = f"[{endpoint.host}]" if ":" in endpoint.host else endpoint.host
    return host if endpoint.port == 80 else f"{host}:{endpoint.port}"


def _snippet(data, limit: int = 60) -> str:
    """The start of an answer, quoted on one line: '+PONG\\r\\n'."""
    text = repr(bytes(data[:limit]))[1:]
    return text + ("..." if len(data) > limit else "")
