"""``Forwarder``: one listening port forwarded to one target, started and stopped cleanly.

Typical use::

    from gproxy import Forwarder

    with Forwarder("127.0.0.1:0", "db.internal:5432", idle_timeout=300) as fw:
        host, port = fw.address        # the real bound port
        ...                            # connect to (host, port) from any code
        assert fw.wait_idle(5)         # every connection closed (closing is asynchronous)
    # leaving the block stops accepting, drains, and closes everything

Where it runs:

- ``start()`` in a program whose ``socket`` module gevent has patched
  (``gevent.monkey.patch_all()``): on the calling thread's hub, in background
  greenlets that run whenever the host program waits on gevent.
- ``start()`` in a program that patched nothing: in a daemon thread with a hub
  of its own, so plain blocking code in the host can talk through it.
- ``start(thread=True)``: in a thread of its own in either program (an OS thread even
  where gevent patched ``threading``), so code that blocks the program's hub (a
  subprocess waited for with ``os.system``, a C client library) still talks through it;
  ``start(thread=False)``: on the calling thread's hub in either.
- ``serve_forever()`` without ``start()``: on the calling thread's hub, until
  ``stop()`` (from a greenlet, a gevent signal handler, or another thread).

Every public method may be called from any OS thread: what touches the hub's objects is
handed to the hub that serves, and has taken effect when the call returns.

Nothing here touches signals or logging configuration. Where the forwarder's hub runs,
calls into it from other threads, and stopping forwarders still running in their threads at
interpreter exit are :mod:`gproxy._hubthread`'s; in a child after ``fork()`` every forwarder
is made inert (:mod:`gproxy._lifecycle`). Listening sockets are made in :mod:`gproxy.listeners`.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import logging
import math
import os
import socket
import time
import weakref
from dataclasses import replace
from typing import (
    IO,
    TYPE_CHECKING,
    Any,
    Callable,
    ContextManager,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
    cast,
    overload,
)

import gevent
import gevent.socket
from gevent import getcurrent, monkey
from gevent.event import Event

from gproxy import _gevent, _lifecycle, _selfloop, _sockets, _sweeps, listeners
from gproxy._capture import Capture
from gproxy._capture import log as _capture_log
from gproxy._greenlets import Workers
from gproxy._health import Checks
from gproxy._hubthread import HubEnded, HubHost
from gproxy._schedule import Runner
from gproxy.config import AddressLike, Rule, TargetLike, check_hook
from gproxy.offload import Offload
from gproxy.relay import Connection, Context, sweep, sweep_due, toxics_changed
from gproxy.stats import ConnectionRecord, Counters, Outcome, Statistics
from gproxy.targets import TargetState, TargetStatus, parse_limit, parse_state, parse_weight
from gproxy.toxics import (
    AttributeValue,
    PythonToxic,
    Schedule,
    StreamName,
    Toxic,
    ToxicNotFound,
    ToxicSpec,
    ToxicType,
    make_toxic,
)

if TYPE_CHECKING:
    from gproxy.splice import Splicer  # Linux only: imported when a rule splices

__all__ = ["Forwarder", "State"]

log = logging.getLogger(__name__)

Hook = Callable[[ConnectionRecord], None]
#: what ``Forwarder.toxic()`` returns: ``with fw.toxic(...) as toxic:``
ToxicBlock = ContextManager[Toxic]

#: after the drain deadline aborts what is left, how long teardown may take (only a
#: connection stuck in the resolver, which nothing can interrupt, takes longer).
_ABORT_GRACE = 5.0

#: while draining, how often connections at rest are looked for, and how long one must
#: stay at rest (no byte either way, the upstream spoke last) before it is closed.
_DRAIN_CHECK = 0.05
_AT_REST = 1.0

#: a pump quiet for this long (at most twice this) gives up its greenlet until data comes.
_PARK_EVERY = 1.0

#: accept() pauses on fd exhaustion for this long, doubling up to the maximum.
_PAUSE_MIN, _PAUSE_MAX = 0.05, 1.0
#: at most one "out of file descriptors" warning per this many seconds.
_WARN_EVERY = 10.0


class _Server(_gevent.InlineServer):
    """A StreamServer that hands raw sockets to the handler on the hub, which starts the
    connection there or in a reused bare greenlet (a gevent Greenlet and a Pool slot cost
    about 1 KiB per connection and a new greenlet ~12 us), stops accepting at
    ``max_connections`` and survives fd exhaustion."""

    def __init__(self, listener: Any, handle: Callable[..., None], max_connections: int, upstream_family: int):
        super().__init__(listener, handle)
        self.max_connections = max_connections
        self.upstream_family = upstream_family
        self._spare: Optional[_sockets.RawSocket] = None  # the next client's upstream socket
        self.running = 0            # connections accepted and not yet closed
        self.idle = Event()         # set while at most `allowance` run: what a drain waits for
        self.idle.set()
        #: connections a drain does not wait for: the one whose hook called stop()
        self.allowance = 0
        self._full = False
        self._pause = _PAUSE_MIN
        self._resume_timer: Any = None  # a gevent timer
        self._warned_at: Optional[float] = None
        self._suppressed = 0
        self.disabled = False       # Forwarder.disable(): the listener is closed

    def start_accepting(self) -> None:
        if not self.disabled:  # a resume timer or a freed slot must not revive a closed listener
            super().start_accepting()

    def full(self) -> bool:
        self._full = self.running >= self.max_connections
        return self._full

    def do_handle(self, *args: Any) -> None:
        """On the hub, in the listener's watcher callback: the connection owns its sockets
        from here and closes them itself, after its last pump."""
        self.running += 1
        self.idle.clear()
        self.handle(*args)

    def connection_closed(self) -> None:
        self.running -= 1
        if self.running <= self.allowance:
            self.idle.set()
        if self._full:  # the slot just freed lets the next client in
            self._full = False
            self.resume_accepting()

    def do_read(self) -> Optional[Tuple[_sockets.RawSocket, Any, _sockets.RawSocket]]:
        """Accept one client, with its upstream socket already open: a client is accepted
        only when it can be served, so running out of fds leaves clients queued in the
        kernel instead of accepted and dropped."""
        listener = getattr(self, "socket", None)
        if listener is None:  # closed by stop() from the on_open hook of the client just accepted
            return None
        try:
            if self._spare is None:
                self._spare = _sockets.raw_socket(self.upstream_family)
            fd, address = _gevent.accept_raw(listener)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno in _sockets.FD_EXHAUSTED:
                self.pause_accepting(exc)
                return None
            if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                return None  # the client gave up while queued; nothing to do
            raise
        self._pause = _PAUSE_MIN
        upstream, self._spare = self._spare, None
        # self.family: BaseServer's copy of the listener's (whose own property makes an enum
        # at every read); enable() replaces the listener with one on the same address
        return _sockets.raw_socket(self.family, fd), address, upstream

    def pause_accepting(self, exc: OSError) -> None:
        """Stop polling the listener (it stays readable: polling it would spin) and retry later."""
        now = time.monotonic()
        if self._warned_at is None or now - self._warned_at >= _WARN_EVERY:
            more = f" ({self._suppressed} more since the last warning)" if self._suppressed else ""
            log.warning("cannot accept on %s: %s; pausing accepts, retrying after %.2fs up to %.0fs%s",
                        _sockets.describe_address(self.address), _sockets.describe_error(exc),
                        self._pause, _PAUSE_MAX, more)
            self._warned_at, self._suppressed = now, 0
        else:
            self._suppressed += 1
        self.stop_accepting()
        self._cancel_resume()
        self._resume_timer = self.loop.timer(self._pause)
        self._resume_timer.start(self._resume)
        self._pause = min(self._pause * 2, _PAUSE_MAX)

    def _resume(self) -> None:
        self._cancel_resume()
        self.resume_accepting()

    def _cancel_resume(self) -> None:
        if self._resume_timer is not None:
            self._resume_timer.close()
            self._resume_timer = None

    def close(self) -> None:
        self._cancel_resume()
        if self._spare is not None:
            self._spare.close()
            self._spare = None
        super().close()


class State(enum.Enum):
    """Where a forwarder is in its life (``Forwarder.state``). It only moves forward:
    ``NEW`` -> ``RUNNING`` -> ``STOPPING`` -> ``STOPPED``, or ``NEW`` -> ``STOPPED`` (stopped
    before it started, or ``start()`` could not listen). ``str()`` gives the lower-case name."""

    #: built, not started: nothing bound, no hub; ``start()``, ``start_here()`` or
    #: ``serve_forever()`` may start it (``start_here()`` that cannot listen leaves it here)
    NEW = "new"
    #: serving: it listens unless disabled, and its toxics and connections may be changed
    RUNNING = "running"
    #: ``stop()`` is under way: the listener is closed and open connections drain
    STOPPING = "stopping"
    #: everything is closed; it never starts again
    STOPPED = "stopped"

    def __str__(self) -> str:
        return self.value


class Forwarder:
    """Forward every connection to ``listen`` to ``target``.

    ``listen`` and ``target`` are ``"HOST:PORT"``, ``"[IPV6]:PORT"``, ``"PORT"``
    (meaning 127.0.0.1), ``(host, port)``, ``"unix:/PATH"`` or ``"unix:@NAME"`` (Linux's
    abstract namespace). ``target`` may also be a list of addresses, tried for each client
    in the order ``balance`` gives, or a function called with each client's address that
    returns an address or a list. An item of the list may be a :class:`gproxy.Target`
    (``Target(address, weight=3)``, ``Target(address, backup=True)``) or the mapping a config
    file's table makes (``{"address": "10.0.0.5:6379", "weight": 3}``): ``weight`` (default 1,
    at most 256) is its share under round-robin and least-connections, and a ``backup``
    (default ``False``) gets clients only while every other target is down. Every option is
    keyword-only, with the
    same name and default as on the command line; what each means, and what 0 or
    ``None`` means, is in :class:`gproxy.config.Rule`:

    - ``connect_timeout`` (10 s), ``idle_timeout`` (off), ``half_close_timeout`` (off),
      ``drain_timeout`` (10 s): seconds; ``None`` (or 0, except for drain) is off;
    - ``max_connections`` (half the fd limit less a reserve), ``backlog`` (1024),
      ``buffer_size`` (262144 bytes);
    - ``splice`` (``True``): zero-copy where the platform has ``splice(2)``; ``bulk_threads``
      (``None``: one per CPU, at most 8; 0: none) splice bulk in threads off the event loop;
    - ``proxy_protocol`` (``"off"``, ``"v1"``, ``"v2"``): send HAProxy's PROXY header upstream;
      ``accept_proxy_from`` (networks, default nobody) must send one, within
      ``proxy_header_timeout`` (5 s);
    - ``allow``/``deny`` (networks; default everyone/nobody) and ``max_connections_per_client``
      (default no limit): refused clients are closed before anything is dialled.
    - ``name`` (``None``: the listen address): the rule's name in logs and metrics;
    - ``balance`` (``"failover"``: the first target that is up, and back to it once it is up
      again; or ``"round-robin"``, ``"least-connections"``, by weight, over the targets that
      are up), ``max_fails`` (1; 0 never marks a target down), ``fail_timeout`` (10 s):
      several targets. A target's ``max_connections`` (``Target(address, max_connections=100)``
      or the mapping's key; default 0: no limit) caps its open connections; clients beyond
      every target's cap wait in the rule's queue, at most ``queue_timeout`` (``None``: the
      ``connect_timeout``; 0: no limit), at most ``max_queue`` (0: no limit of its own) at once.
    - ``reuse_port`` (``False``): ``SO_REUSEPORT`` on the listener, for several processes on
      one port (``gproxy --workers``).
    - ``check`` (``None``: no active health check; ``"tcp"``, ``"send-expect"``, ``"http"``):
      check each target every ``check_interval`` (2 s) seconds, each check bounded by
      ``check_timeout`` (``None``: the interval); ``rise`` (2) passes in a row bring a target
      up, ``fall`` (3) failures take it down. ``check_send`` (``None``: nothing; bytes, or
      text with ``\\r``-style escapes) and ``check_expect`` (a regular expression, required)
      are ``"send-expect"``'s; ``check_http_method`` (``"GET"``), ``check_http_path``
      (``"/"``), ``check_http_host`` (``None``: the target's address) and
      ``check_http_status`` (``"200-399"``) are ``"http"``'s. The checks run on the
      forwarder's hub while it runs; a target is down while its check or passive health
      says so.
    - ``unix_mode`` (``"0660"`` or ``0o660``), ``unix_user``, ``unix_group`` (names or ids;
      default ``None``: as created, gproxy's own): a ``unix:/PATH`` listener's socket file.
    - ``route_sni`` (``None``: off): ``{"db.example": "10.0.0.5:5432", "*.cache.example":
      "10.0.0.6:6379"}``: each client's TLS ClientHello is read (not terminated) and its server
      name picks the target; ``target`` serves a name that matches none, no name, or a client
      that is not speaking TLS (gproxy/_sni.py).

    Bad values raise :class:`gproxy.ConfigError` (a ``ValueError``) naming the field.

    ``on_open(record)`` and ``on_close(record)``, if given, are called on the
    forwarder's hub when a connection is accepted and when it has ended.

    A collection of forwarders (:class:`gproxy.service.Service`, which config files, the
    HTTP API and the command line drive) manages them through a few members of their own,
    and through nothing else: ``state``, ``bound_address``, ``listening``, ``start_here()``
    (all on one hub), ``inherit_listener()``/``return_listener()`` (a changed rule serves on
    its predecessor's listening socket), ``count_on()``/``show_own_targets()`` (its
    metrics go on from its predecessor's), ``copy_toxics()`` (its toxics and their
    schedules too), ``set_toxics()`` (a config file's toxics), ``retire()`` (a reload's old forwarder: its
    connections run on until they end), ``inherit_socket()`` (serve on a socket systemd or a
    handover passed) and ``listening_fileno()``/``release_listener()`` (hand it to another process).
    """

    def __init__(self, listen: AddressLike, target: TargetLike, *,
                 connect_timeout: Optional[float] = 10.0,
                 idle_timeout: Optional[float] = None,
                 half_close_timeout: Optional[float] = None,
                 max_connections: Optional[int] = None,
                 backlog: int = 1024,
                 buffer_size: int = 262144,
                 drain_timeout: Optional[float] = 10.0,
                 splice: bool = True,
                 bulk_threads: Optional[int] = None,
                 proxy_protocol: str = "off",
                 accept_proxy_from: Optional[Sequence[str]] = None,
                 proxy_header_timeout: float = 5.0,
                 allow: Optional[Sequence[str]] = None,
                 deny: Optional[Sequence[str]] = None,
                 max_connections_per_client: Optional[int] = None,
                 queue_timeout: Optional[float] = None,
                 max_queue: int = 0,
                 name: Optional[str] = None,
                 balance: str = "failover",
                 max_fails: int = 1,
                 fail_timeout: float = 10.0,
                 reuse_port: bool = False,
                 check: Optional[str] = None,
                 check_send: Union[str, bytes, None] = None,
                 check_expect: Optional[str] = None,
                 check_http_path: str = "/",
                 check_http_method: str = "GET",
                 check_http_status: str = "200-399",
                 check_http_host: Optional[str] = None,
                 check_interval: float = 2.0,
                 check_timeout: Optional[float] = None,
                 rise: int = 2,
                 fall: int = 3,
                 unix_mode: Union[str, int, None] = None,
                 unix_user: Union[str, int, None] = None,
                 unix_group: Union[str, int, None] = None,
                 route_sni: Optional[Mapping[str, AddressLike]] = None,
                 tls_cert: Union[str, Sequence[str], None] = None,
                 tls_key: Union[str, Sequence[str], None] = None,
                 tls_ca: Optional[str] = None,
                 tls_verify_client: bool = False,
                 tls_min_version: str = "1.2",
                 tls_ciphers: Optional[str] = None,
                 tls_alpn: Union[str, Sequence[str], None] = None,
                 tls_handshake_timeout: float = 10.0,
                 target_tls: bool = False,
                 target_tls_ca: Optional[str] = None,
                 target_tls_server_name: Optional[str] = None,
                 target_tls_cert: Optional[str] = None,
                 target_tls_key: Optional[str] = None,
                 target_tls_verify: bool = True,
                 on_open: Optional[Hook] = None,
                 on_close: Optional[Hook] = None) -> None:
        # Rule.build is the one place options are validated; the names above are only
        # spelled out so that type checkers, IDEs and help() see them.
        self.rule = Rule.build(
            listen, target, connect_timeout=connect_timeout, idle_timeout=idle_timeout,
            half_close_timeout=half_close_timeout, max_connections=max_connections, backlog=backlog,
            buffer_size=buffer_size, drain_timeout=drain_timeout, splice=splice,
            bulk_threads=bulk_threads,
            proxy_protocol=proxy_protocol, accept_proxy_from=accept_proxy_from,
            proxy_header_timeout=proxy_header_timeout, allow=allow, deny=deny,
            max_connections_per_client=max_connections_per_client,
            queue_timeout=queue_timeout, max_queue=max_queue,
            name=name, balance=balance, max_fails=max_fails, fail_timeout=fail_timeout,
            reuse_port=reuse_port, check=check, check_send=check_send, check_expect=check_expect,
            check_http_path=check_http_path, check_http_method=check_http_method,
            check_http_status=check_http_status, check_http_host=check_http_host,
            check_interval=check_interval, check_timeout=check_timeout, rise=rise, fall=fall,
            unix_mode=unix_mode, unix_user=unix_user, unix_group=unix_group, route_sni=route_sni,
            tls_cert=tls_cert, tls_key=tls_key, tls_ca=tls_ca, tls_verify_client=tls_verify_client,
            tls_min_version=tls_min_version, tls_ciphers=tls_ciphers, tls_alpn=tls_alpn,
            tls_handshake_timeout=tls_handshake_timeout, target_tls=target_tls, target_tls_ca=target_tls_ca,
            target_tls_server_name=target_tls_server_name, target_tls_cert=target_tls_cert,
            target_tls_key=target_tls_key, target_tls_verify=target_tls_verify)
        on_open = check_hook(on_open, "on_open")
        on_close = check_hook(on_close, "on_close")
        self._counters = Counters()
        self._context = Context(self.rule, self._counters, on_open, on_close, _splicer(self.rule))
        self._state = State.NEW
        self._server: Optional[_Server] = None
        self._sweeper: Any = None  # a gevent timer
        self._stopped: Optional[Event] = None     # set on the hub when fully stopped
        self._host = HubHost()                     # the hub that serves, and its thread
        self._address: Union[Tuple[str, int], str, None] = None
        self._inherit_fd: Optional[int] = None     # a listening socket to serve on (takeover)
        self._inherit_from: Optional["Forwarder"] = None
        #: a weakref to the one whose listener it serves on
        self._took_over: Optional["weakref.ReferenceType[Forwarder]"] = None
        self._socket_file = None                   # our Unix socket file, removed on stop
        self._keep_listener = False                # another forwarder took it over: leave it
        self._from_manager: Optional[str] = None   # inherit_socket(): where its listener came from
        self._handed_over = False                  # release_listener(): another process has it
        self._enabled = True
        self._checks: Optional[Checks] = None      # active health checks, while running
        # while STOPPING: when the drain ends (monotonic; inf: never), whether it is a reload's
        # (retire(): nothing at rest is closed), and what wakes it when stop() changes either
        self._drain_deadline = math.inf
        self._drain_timeout_given: Optional[float] = None
        self._retiring = False
        self._drain_changed: Optional[Event] = None
        self._own_targets: Optional[tuple] = None  # count_on(): target gauges to show later

    # -- public surface -------------------------------------------------------------

    @property
    def address(self) -> Tuple[str, int]:
        """The real bound ``(host, port)``, or for a Unix socket what ``connect()`` takes (the
        path, or NUL and the name when abstract); valid once started."""
        if self._address is None:
            raise RuntimeError("the forwarder has not been started")
        # typed for TCP, what `fw.address[1]` and create_connection(fw.address) need; a Unix
        # socket's rule gives its path (the docstring says so; bound_address is typed for both)
        return cast(Tuple[str, int], self._address)

    @property
    def host(self) -> str:
        """The bound address's host (``"127.0.0.1"``, ``"::1"``); ``ValueError`` for a Unix socket."""
        return self._ip_address()[0]

    @property
    def port(self) -> int:
        """The real bound port (a port 0 asked for, the one it got); ``ValueError`` for a Unix socket."""
        return self._ip_address()[1]

    def url(self, scheme: str = "tcp://", path: str = "") -> str:
        """The address as a URL for a client library: ``url("redis://")`` is
        ``"redis://127.0.0.1:40123"``, ``url("postgresql://app:secret@", "/orders")``
        ``"postgresql://app:secret@127.0.0.1:40123/orders"``; ``://`` is added to a scheme
        without it, an IPv6 host is bracketed. ``ValueError`` for a Unix socket."""
        host, port = self._ip_address()
        if "://" not in scheme:
            scheme += "://"
        return f"{scheme}{f'[{host}]' if ':' in host else host}:{port}{path}"

    def _ip_address(self) -> Tuple[str, int]:
        address = self.address
        if not isinstance(address, tuple):
            raise ValueError(f"{_sockets.describe_address(address)} is a Unix socket: it has no host or port")
        return address[0], address[1]

    @property
    def name(self) -> str:
        """The rule's name in logs and metrics: its ``name`` if it has one, else its listen
        address (the real bound one once started)."""
        name = getattr(self.rule, "name", None)
        if name:
            return name
        return _sockets.describe_address(self._address) if self._address else str(self.rule.listen)

    @property
    def counters(self) -> Counters:
        """The live counters (read-only): what ``statistics()`` and ``gproxy.metrics`` read.
        A forwarder that replaced another under the same name in a ``Service`` counts on
        from that one's totals."""
        return self._counters

    def start(self, *, thread: Optional[bool] = None) -> "Forwarder":
        """Bind and serve in the background; return at once. Errors binding raise ``OSError``.
        ``thread``: where it serves. None (the default): on the calling thread's hub if gevent
        patched ``socket``, else in a daemon thread with a hub of its own. True: in a thread
        of its own either way, a real OS thread even where gevent patched ``threading``, so
        that code blocking the program's hub cannot stall it (nor it that code). False: on
        the calling thread's hub either way (it serves while that thread runs gevent)."""
        self._claim_start()
        self._host.start(self._start_on_hub, thread=thread, name=lambda: f"gproxy {self.name}",
                         at_exit=lambda: self.stop(timeout=0))
        return self

    def serve_forever(self) -> None:
        """Serve until ``stop()``. Without a prior ``start()``, serves on this thread's hub."""
        if self._state is State.NEW:
            self._claim_start()
            self._host.start_here(self._start_on_hub)
        if not self._host.join() and self._stopped is not None:
            self._stopped.wait()

    def stop(self, timeout: Optional[float] = None) -> None:
        """Stop accepting, let open connections finish for up to ``timeout`` seconds
        (default: ``drain_timeout``), abort the rest, and return when all is closed.
        Calling it again while draining aborts what is left at once; after that it does nothing.
        While ``retire()`` drains, the first ``stop()`` makes it a stop: from then on its
        connections have ``timeout`` seconds (at most what ``retire`` gave them) and those at
        rest are closed."""
        if timeout is None:
            timeout = self.rule.drain_timeout
        if self._state in (State.NEW, State.STOPPED):
            self._state = State.STOPPED
        elif not self._host.stop(self._stop_if_running, timeout, False):  # its hub ended first: a bug
            self._state = State.STOPPED
        self._stop_capture()

    def retire(self, timeout: Optional[float] = None) -> None:
        """Stop accepting, as a reload's old forwarder: open connections run on untouched
        until they end by themselves, or until ``timeout`` seconds have passed (default
        ``None``: no limit; a reload's ``reload_drain_timeout``), when the rest are aborted.
        Unlike ``stop()``, a connection at rest is not closed: a pooled database connection
        is quiet most of its life (nginx's old workers and HAProxy's old processes, under
        ``hard-stop-after``, keep theirs the same way). Returns when all is closed; a
        ``stop()`` meanwhile turns it into a stop. A listener handed over to a successor
        (``inherit_listener``) stays open: it is the successor's now."""
        if self._state in (State.NEW, State.STOPPED):
            self._state = State.STOPPED
        elif not self._host.stop(self._stop_if_running, timeout, True):
            self._state = State.STOPPED
        self._stop_capture()

    def take_over(self, old: "Forwarder") -> "Forwarder":
        """Start on ``old``'s listening socket instead of binding one: a reload's changed rule.
        The socket is never closed or bound again, so no client is refused in between; clients
        queued in the kernel go to whichever forwarder accepts first. Then call ``old.stop()``:
        it stops accepting and drains its own connections, with its own options."""
        self.inherit_listener(old)
        return self.start()

    # -- being managed: what a Service (or FileService, or testing) uses -----------------------

    @property
    def state(self) -> State:
        """Where it is in its life: ``State.NEW`` until started, ``RUNNING`` while it serves
        (disabled or not), ``STOPPING`` while ``stop()`` drains, then ``STOPPED`` for good."""
        return self._state

    @property
    def bound_address(self) -> Union[Tuple[str, int], str, None]:
        """What ``address`` gives, or ``None`` until started (never raises). A stopped forwarder
        keeps the address it had."""
        return self._address

    @property
    def listening(self) -> bool:
        """Whether it accepts clients now: ``RUNNING`` and not disabled (``disable()``).
        False while ``NEW`` (even though ``enabled`` is True then), ``STOPPING`` or ``STOPPED``."""
        return self._state is State.RUNNING and self._enabled and self._server is not None

    def start_here(self) -> "Forwarder":
        """Bind and serve on the calling thread's hub, whether or not gevent patched anything:
        how forwarders sharing one hub start (a ``Service``'s; ``start()`` would give each one
        of an unpatched program a thread and a hub of its own). They serve while that thread
        runs gevent; calls from other threads are handed to that hub. ``OSError`` if it cannot
        listen: then it stays ``NEW``, and may be started again once the address is free."""
        self._claim_start()
        try:
            self._host.start_here(self._start_on_hub)
        except OSError:
            if self._state is State.STOPPED:  # it undid what it began; nothing is left open
                self._state = State.NEW
            raise
        return self

    def listens_on(self, listen: object) -> bool:
        """Whether ``listen`` (an Address) is what this forwarder was asked to listen on, or
        the address it really has (port 0 asked for, the port it got)."""
        if listen == self.rule.listen:
            return True
        bound = self._address
        return isinstance(bound, tuple) and getattr(listen, "sockaddr", None) == tuple(bound[:2])

    def inherit_listener(self, old: "Forwarder") -> None:
        """Make the next start (``start()`` or ``start_here()``) serve on ``old``'s listening
        socket (a duplicate of its fd) instead of binding one; ``take_over`` is this and
        ``start()``. ``old`` must be running (``RuntimeError``) on this forwarder's listen
        address (``ValueError``). Calling it again replaces what the last call took."""
        if old._state is not State.RUNNING or old._server is None:
            raise RuntimeError(f"only a running forwarder can be taken over; this one is {old._state}")
        if not old.listens_on(self.rule.listen):
            raise ValueError(f"{self.rule.listen} is not {old.rule.listen}: take over the same address")
        if self._inherit_fd is not None:
            os.close(self._inherit_fd)
        self._inherit_fd = os.dup(old._server.socket.fileno())
        self._inherit_from = old
        self._from_manager = old._from_manager

    def inherit_socket(self, fd: int, origin: str = "systemd") -> None:
        """Make the next start serve on the listening socket ``fd`` (which this forwarder now
        owns and closes) instead of binding one: a socket systemd passed (socket activation)
        or another gproxy handed over (``origin`` ``"handover"``), see
        :class:`gproxy.listeners.Passed`. Its Unix socket file, if any, is not this
        forwarder's to remove. Calling it again replaces what the last call gave."""
        if self._inherit_fd is not None:
            os.close(self._inherit_fd)
        self._inherit_fd, self._inherit_from = fd, None
        self._from_manager = origin

    def listening_fileno(self) -> Optional[int]:
        """The fd of the listening socket while it listens (``listening``), else None: what a
        handover passes to a new process (:mod:`gproxy._handover`)."""
        if not self.listening:
            return None
        return self._server.socket.fileno()

    def release_listener(self) -> None:
        """The listening socket is another process's now (a handover): ``stop()`` and
        ``retire()`` close this forwarder's own fd only, and leave a Unix socket file alone."""
        self._keep_listener = True
        self._handed_over = True

    def return_listener(self, old: "Forwarder") -> None:
        """Undo ``inherit_listener(old)`` once this one has started on ``old``'s listening
        socket and the change is rolled back: ``old`` owns that socket (and its Unix socket
        file) again, and this one's ``stop()`` leaves them alone. Call it before stopping
        this one. Before a start it only forgets ``old``'s socket. ``ValueError`` if this one
        did not inherit ``old``'s listener."""
        if self._inherit_fd is not None and self._inherit_from is old:  # nothing handed over yet
            os.close(self._inherit_fd)
            self._inherit_fd = self._inherit_from = None
            return
        if self._took_over is None or self._took_over() is not old:
            raise ValueError(f"{self!r} does not serve on the listening socket of {old!r}")
        self._keep_listener, old._keep_listener = True, False

    def count_on(self, old: "Forwarder") -> None:
        """Before start: count into ``old``'s counters, so that a rule replaced under the same
        name (a reload's changed rule, an API update) keeps its totals, the old forwarder's
        draining connections included, and Prometheus sees no counter reset. The target
        gauges stay ``old``'s until ``show_own_targets()``, once this one has replaced it.
        The health and runtime state (``set_target``) of the targets both have are carried
        over too: a target down stays down, a drained one stays drained."""
        mine = self._counters
        self._own_targets = (mine.target_up, mine.health)
        self._counters = self._context.counters = old._counters
        old._counters.watch(self._context)
        # the new forwarder's first check, or first client, must not find out again (and log
        # again) what the old one knew; a target drained at run time stays drained
        if self._context.targets.inherit(old._context.targets) and not self._context.routed:
            self._context.route_by_targets()

    def show_own_targets(self) -> None:
        """After ``count_on(old)``, once this one has replaced ``old``: the shared counters'
        target gauges become this rule's (targets it no longer has drop out; one it kept keeps
        its state). Without ``count_on`` it does nothing."""
        own = self._own_targets
        if own is None:
            return
        target_up, health = own
        counters = self._counters
        counters.target_up = {name: counters.target_up.get(name, up) for name, up in target_up.items()}
        counters.health = health
        self._own_targets = None

    # -- its targets, at run time -------------------------------------------------------

    def targets(self) -> List[TargetStatus]:
        """Each target (the fixed ones in the order given, then any a target function named so
        far) with its state, weight, health, open connections and last check: a snapshot."""
        return self._on_hub(lambda: self._context.targets.statuses(self._counters))

    def set_target(self, address: Union[AddressLike, str], *, state: Union[TargetState, str, None] = None,
                   weight: Optional[int] = None, max_connections: Optional[int] = None) -> TargetStatus:
        """Change one target at run time; returns it as ``targets()`` shows it afterwards.

        ``address`` names the target as configured (``"10.0.0.5:6379"``, ``"[::1]:6379"``,
        ``"unix:/run/redis.sock"``, or a ``(host, port)``); :class:`gproxy.targets.TargetNotFound`
        (a ``KeyError``) if the rule has no such target. ``state`` (default ``None``: unchanged)
        is ``"enabled"``, ``"drain"`` (no new clients; open connections go on until they end)
        or ``"disabled"`` (the same, and no active checks: maintenance), or a
        :class:`gproxy.TargetState`. ``weight`` (default ``None``: unchanged) is 1 to 256, the
        target's share from the next client on. ``max_connections`` (default ``None``:
        unchanged) is 0 (no limit) to 1,000,000: the most connections open to it at once,
        clients beyond it waiting in the rule's queue; lowering it closes no connection.
        Bad values raise :class:`gproxy.ConfigError`
        naming ``state``, ``weight`` or ``max_connections``, and change nothing; with none, nothing changes
        (a lookup). One INFO line says each change. A drained or disabled target gets
        no client at all, not even when every other target is down; with every target so, new
        clients are refused (outcome ``connect_failed``). The state carries over to the rule's
        next forwarder when a reload or an update replaces it (``count_on``)."""
        new_state = None if state is None else parse_state(state)
        new_weight = None if weight is None else parse_weight(weight)
        new_limit = None if max_connections is None else parse_limit(max_connections)
        return self._on_hub(self._set_target, address, new_state, new_weight, new_limit)

    def _set_target(self, address: Any, state: Optional[TargetState], weight: Optional[int],
                    limit: Optional[int] = None) -> TargetStatus:
        context = self._context
        targets = context.targets
        endpoint = targets.find(address)
        if limit and not context.routed:  # its open connections hold slots from now on
            targets.adopt(endpoint, list(context.active.values()))
        targets.set(endpoint, state, weight, limit)
        if (state is not None and state is not TargetState.ENABLED or limit) and not context.routed:
            context.route_by_targets()  # the plain path would not ask
        return targets.status(endpoint, self._counters)

    # -- fault injection ---------------------------------------------------------------

    @overload
    def add_toxic(self, type: ToxicSpec, *, name: Optional[str] = None, stream: Optional[StreamName] = None,
                  toxicity: Optional[float] = None, schedule: Optional[Schedule] = None) -> Toxic: ...

    @overload
    def add_toxic(self, type: PythonToxic, *, name: Optional[str] = None, stream: StreamName = "downstream",
                  toxicity: float = 1.0, schedule: Optional[Schedule] = None) -> Toxic: ...

    @overload
    def add_toxic(self, type: ToxicType, *, name: Optional[str] = None, stream: StreamName = "downstream",
                  toxicity: float = 1.0, schedule: Optional[Schedule] = None,
                  **attributes: AttributeValue) -> Toxic: ...

    def add_toxic(self, type: Union[str, PythonToxic, ToxicSpec], *, name: Optional[str] = None,
                  stream: Optional[str] = None, toxicity: Optional[float] = None,
                  schedule: Optional[Schedule] = None, **attributes: Any) -> Toxic:
        """Add a toxic (toxiproxy's types and attributes, see :mod:`gproxy.toxics`; a helper's
        ``ToxicSpec``, such as ``toxics.latency(100)``; or a callable ``toxic(chunk, record)``);
        it acts on open connections too, from their next chunk. ``name`` defaults to
        ``TYPE_STREAM``; ``stream`` is ``"upstream"`` (client to target) or ``"downstream"``
        (the default); ``toxicity`` is the chance (0 to 1, default 1) that it acts on a given
        connection; ``schedule`` (a ``gproxy.toxics.Schedule``) turns it on and off over time,
        from when the forwarder runs. Bad values, or a name in use, raise ``ConfigError``."""
        toxic = make_toxic(type, name=name, stream=stream, toxicity=toxicity, attributes=attributes,
                           schedule=schedule)
        return self._on_hub(self._change_toxics, self._add_toxic, toxic, None)

    def update_toxic(self, name: str, **changes: Any) -> Toxic:
        """Change a toxic's ``toxicity`` or attributes (the others keep their values)."""
        return self._on_hub(self._change_toxics, self._context.toxics.update, name, changes)

    def remove_toxic(self, name: str) -> None:
        """Remove a toxic; what it held goes on, in order. Unknown names raise ``ConfigError``."""
        self._on_hub(self._change_toxics, self._context.toxics.remove, name)

    def toxics(self) -> List[Toxic]:
        """The toxics, upstream ones first, each stream in the order added."""
        return self._on_hub(self._context.toxics.list)

    @overload
    def toxic(self, type: ToxicSpec, *, name: Optional[str] = None, stream: Optional[StreamName] = None,
              toxicity: Optional[float] = None, schedule: Optional[Schedule] = None) -> ToxicBlock: ...

    @overload
    def toxic(self, type: PythonToxic, *, name: Optional[str] = None, stream: StreamName = "downstream",
              toxicity: float = 1.0, schedule: Optional[Schedule] = None) -> ToxicBlock: ...

    @overload
    def toxic(self, type: ToxicType, *, name: Optional[str] = None, stream: StreamName = "downstream",
              toxicity: float = 1.0, schedule: Optional[Schedule] = None,
              **attributes: AttributeValue) -> ToxicBlock: ...

    def toxic(self, type: Union[str, PythonToxic, ToxicSpec], **options: Any) -> ToxicBlock:
        """``with fw.toxic("latency", latency=100):`` (or ``fw.toxic(toxics.latency(100))``):
        the toxic acts inside the block only. Takes what ``add_toxic`` takes."""
        return self._toxic_block(type, options)

    @contextlib.contextmanager
    def _toxic_block(self, type: Any, options: Any) -> Iterator[Toxic]:
        toxic = self.add_toxic(type, **options)
        try:
            yield toxic
        finally:
            try:
                self.remove_toxic(toxic.name)
            except ToxicNotFound:
                pass  # removed inside the block

    # -- captures ---------------------------------------------------------------------------

    def capture(self, file: Union[str, "os.PathLike[str]", IO[bytes]], *,
                connection: Optional[int] = None, exclusive: bool = False) -> Capture:
        """Write what crosses this forwarder to ``file`` (a path, or a writable binary file
        object) as a pcap file that Wireshark and tcpdump read: each connection as two TCP
        conversations, client <-> listener and proxy <-> target, with real addresses, ports
        and timestamps (docs/toxics.md#captures). ``with fw.capture("run.pcap"):`` captures
        inside the block; else ``stop()`` the ``Capture`` returned (``stop()`` or ``retire()``
        of the forwarder stops it too, once its connections have ended). Connections accepted
        from now on are captured from their start; open ones join at their next chunk.
        ``connection``: only the connection with this id (an open one, or ``mark()``'s next
        one). One capture at a time: ``RuntimeError`` if one runs. While it runs, captured
        connections move every byte through Python (no splice). ``exclusive``: create the
        file (mode 0600), ``FileExistsError`` rather than overwrite one."""
        if self._context.capture is not None:
            raise RuntimeError(f"{self!r} is capturing already: stop that capture first")
        capture = Capture(file, connection, on_stop=lambda capture: self._on_hub(self._end_capture, capture),
                          exclusive=exclusive)
        try:
            self._on_hub(self._begin_capture, capture)
        except BaseException:
            capture.close()
            raise
        return capture

    def take_capture(self, old: "Forwarder") -> None:
        """Go on with ``old``'s capture, if it has one and this forwarder none, into the same
        file: a changed rule's new forwarder (a reload, an API update), as its toxics carry
        over. ``old``'s open connections finish in it, this one's are captured as they come;
        stopping ``old`` no longer ends it, stopping this one does. Call before ``old`` stops."""
        old._on_hub(self._take_capture, old)

    def _take_capture(self, old: "Forwarder") -> None:
        capture = old._context.capture
        if capture is None or self._context.capture is not None:
            return
        old._context.capture = None
        self._context.capture = capture
        capture.rebind(lambda capture: self._on_hub(self._end_capture, capture))

    def _stop_capture(self) -> None:
        """Stopped or retired: every connection ended, their ends are in the file; complete it."""
        capture = self._context.capture
        if capture is not None:
            capture.stop()

    @property
    def capturing(self) -> Optional[Capture]:
        """The capture running (``capture()``), or None."""
        return self._context.capture

    def _begin_capture(self, capture: Capture) -> None:
        context = self._context
        if context.capture is not None:
            raise RuntimeError(f"{self!r} is capturing already: stop that capture first")
        context.capture = capture
        _capture_log.info("capturing %s%s to %s", self.name,
                          "" if capture.connection is None else f" conn#{capture.connection}",
                          capture.path or "a file object")
        joined = [conn for conn in list(context.active.values())
                  if conn.outcome is None and conn.connected() and capture.wants(conn) and capture.attach(conn)]
        if joined:
            self._toxics_changed()   # their pumps leave the fast path at their next chunk

    def _end_capture(self, capture: Capture) -> None:
        context = self._context
        if context.capture is capture:
            context.capture = None
        attached = capture.detach_all()
        if capture.close():
            _capture_log.info("capture of %s to %s ended: %d connection(s)", self.name,
                              capture.path or "a file object", capture.connections)
        if attached:
            self._toxics_changed()   # back to the fast path

    @property
    def enabled(self) -> bool:
        """False after ``disable()``: nothing listens and no connection is open."""
        return self._enabled

    def disable(self) -> None:
        """Close the listener (clients are refused) and close every open connection, as a
        service that went down; toxics and the address are kept. Returns once done."""
        self._on_hub(self._disable)

    def enable(self) -> None:
        """Listen again, on the same address and port (even if the port was 0)."""
        self._on_hub(self._enable)

    @contextlib.contextmanager
    def down(self) -> Iterator["Forwarder"]:
        """``with fw.down():`` disabled inside the block, enabled again after it."""
        self.disable()
        try:
            yield self
        finally:
            self.enable()

    def reset(self) -> None:
        """Every toxic removed and the forwarder enabled (toxiproxy's ``POST /reset``)."""
        def reset() -> None:
            self._context.toxics.clear()
            self._toxics_changed()
            if self._state is State.RUNNING:
                self._enable()
        self._on_hub(reset)

    def reload_certificates(self) -> List[str]:
        """Read the rule's TLS certificate, key and CA files again (``tls_*``, ``target_tls_*``):
        new handshakes use them, connections open now keep their sessions. A file that is bad
        now leaves the old ones in use: the problems are returned (and logged at WARNING), an
        empty list when everything was reloaded, or there is no TLS to reload."""
        problems = []
        for side in (self._context.tls, self._context.target_tls):
            if side is not None:
                problem = side.reload()
                if problem is not None:
                    problems.append(problem)
                    log.warning("rule %s: keeping the TLS files loaded before: %s", self.name, problem)
        return problems

    def connections(self, since: Optional[int] = None) -> List[ConnectionRecord]:
        """The open connections (``outcome`` is None), oldest first; with ``since`` (a
        ``mark()``), only those accepted after that mark was taken."""
        first = 0 if since is None else since
        return self._on_hub(lambda: [conn.record() for conn in list(self._context.active.values())
                                     if conn.id >= first])

    def mark(self) -> int:
        """A point in this forwarder's life to ask about later: the id its next connection
        will get. ``connections(since=mark)`` lists only connections accepted after it, and
        a record's ``id >= mark`` says the same of any record (an ``on_close`` one too)."""
        context = self._context
        return context.last_id + context.id_step

    def abort_connection(self, id: int) -> bool:
        """Reset (RST) the open connection with this id; False if there is none."""
        return self._on_hub(self._cut, id, Outcome.RESET, "aborted by abort_connection()")

    def close_connection(self, id: int) -> bool:
        """Close (FIN) the open connection with this id; False if there is none."""
        return self._on_hub(self._cut, id, Outcome.CLOSED, "closed by close_connection()")

    def wait_idle(self, timeout: Optional[float] = None) -> bool:
        """Wait until no connection is open and every ``on_close`` hook has returned: True,
        or False once ``timeout`` seconds (None: no limit) passed first. Closing is
        asynchronous, so right after a client closes, ``statistics()`` may still count it:
        this is what a test waits on. Safe from any thread, and from a hook."""
        deadline = None if timeout is None else time.monotonic() + timeout
        # on the forwarder's own hub (a hook, a patched program) waiting must yield to it, and
        # where gevent patched time, to the caller's hub (the clients may be its greenlets)
        sleep = gevent.sleep if self._host.thread_id == _thread_id() or monkey.is_module_patched("time") \
            else _sleep
        delay = 0.001
        while self._context.active or (self._server is not None and self._server.running):
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                delay = min(delay, remaining)
            sleep(delay)
            delay = min(delay * 2, 0.02)
        return True

    def statistics(self) -> Statistics:
        """A snapshot: open connections, accepted, failed connects, bytes each way so far."""
        counters, context = self._counters, self._context
        with context.lock:  # teardown moves a connection's bytes to the totals under it
            active = list(context.active.values())
            upstream, downstream = counters.bytes_upstream, counters.bytes_downstream
            accepted, connect_failed = counters.accepted, counters.connect_failed
        return Statistics(
            active=len(active),
            accepted=accepted,
            connect_failed=connect_failed,
            bytes_upstream=upstream + sum(c.counts[0] for c in active),
            bytes_downstream=downstream + sum(c.counts[1] for c in active),
        )

    def __enter__(self) -> "Forwarder":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = _sockets.describe_address(self._address) if self._address else str(self.rule.listen)
        return f"<Forwarder {where} -> {self._context.target_name} {self._state}>"

    # -- changes, made on the hub ---------------------------------------------------------

    def _on_hub(self, func: Callable, *args: Any) -> Any:
        """Run ``func(*args)`` on the hub that serves and return its result (or raise its
        exception). From another thread the call runs in a greenlet of the forwarder's hub,
        and this thread waits until it has finished."""
        if self._state is not State.RUNNING or self._host.here():
            return func(*args)
        try:
            return self._host.call(func, *args)
        except HubEnded as exc:
            if exc.began:
                raise
            return func(*args)  # stopped before it could run there: nothing runs there any more

    def _stop_if_running(self, timeout: Optional[float], retiring: bool) -> None:
        if self._state is not State.STOPPED:  # stopped by someone else since stop() was called
            self._stop_on_hub(timeout, retiring)

    def _add_toxic(self, toxic: Toxic, origin: Optional[float]) -> Toxic:
        """Add ``toxic``; a scheduled one gets its runner, which runs while the forwarder does
        (``origin``: when its schedule began, for a reload's copy; None: now)."""
        toxics = self._context.toxics
        added = toxics.add(toxic)
        if toxic.schedule is not None:
            entry = toxics.entry(toxic.name)

            def apply(factor: float) -> None:
                self._change_toxics(toxics.set_factor, entry, factor)

            def finish() -> None:
                if not entry.removed:
                    self._change_toxics(toxics.remove, entry.toxic.name)

            entry.runner = Runner(toxic.name, toxic.schedule, apply, finish, lambda: f"{self.name}: ", origin)
            if self._state is State.RUNNING:
                entry.runner.start()
        return added

    def copy_toxics(self, old: "Forwarder") -> None:
        """Give this forwarder (started, on ``old``'s hub) the toxics ``old`` has: same names,
        streams, attributes, toxicities and schedules, each schedule going on where it is."""
        def copy() -> None:
            for entry in old._context.toxics.entries():
                toxic = entry.toxic
                origin = None
                if entry.peak is not None:
                    toxic = replace(toxic, toxicity=entry.peak)
                    origin = entry.runner.origin if entry.runner is not None else None
                self._add_toxic(toxic, origin)
            self._toxics_changed()
        self._on_hub(copy)

    def set_toxics(self, wanted: List[Toxic], owned: Iterable[str] = ()) -> Dict[str, str]:
        """Make the toxics named in ``wanted`` be exactly those (a config file's, at start and
        on reload), remove those named in ``owned`` (the file's previous ones) that ``wanted``
        lacks, and leave every other toxic alone (the HTTP API's). A toxic already as wanted
        is not touched (its connections' state and its schedule go on); one whose toxicity
        or attributes differ is updated in place, as an API update; one of another type,
        stream or schedule is replaced. Returns ``{name: "added" | "updated" | "replaced" |
        "removed"}`` for each toxic it changed, and makes all the changes in one step."""
        return self._on_hub(self._set_toxics, list(wanted), set(owned))

    def _set_toxics(self, wanted: List[Toxic], owned: set) -> Dict[str, str]:
        toxics = self._context.toxics
        done: Dict[str, str] = {}
        names = {toxic.name for toxic in wanted}
        for name in sorted(owned - names):
            try:
                toxics.remove(name)
            except ToxicNotFound:
                continue   # removed meanwhile (the API, a reset): nothing to do
            done[name] = "removed"
        for toxic in wanted:
            try:
                entry = toxics.entry(toxic.name)
            except ToxicNotFound:
                self._add_toxic(toxic, None)
                done[toxic.name] = "added"
                continue
            now = entry.toxic
            toxicity = now.toxicity if entry.peak is None else entry.peak
            same_kind = (now.type, now.stream, now.schedule, now.function) == \
                (toxic.type, toxic.stream, toxic.schedule, None)
            if not same_kind:
                toxics.remove(toxic.name)
                self._add_toxic(toxic, None)
                done[toxic.name] = "replaced"
            elif now.attributes != toxic.attributes or toxicity != toxic.toxicity:
                toxics.update(toxic.name, {"toxicity": toxic.toxicity, **toxic.attributes})
                done[toxic.name] = "updated"
        if done:
            self._toxics_changed()
        return done

    def _change_toxics(self, change: Callable, *args: Any) -> Any:
        result = change(*args)
        self._toxics_changed()
        return result

    def _toxics_changed(self) -> None:
        if self._state is not State.RUNNING or not self._context.active:
            self._context.toxic_version += 1
            return
        toxics_changed(self._context)
        self._settle()

    def _settle(self) -> None:
        """Let the callbacks just scheduled (pumps kicked, waits cancelled) run before the
        change returns: they run in order, and this greenlet resumes after them."""
        if getcurrent() is not self._host.hub and gevent.get_hub() is self._host.hub:
            gevent.sleep(0)

    def _disable(self) -> None:
        self._require_running()
        if not self._enabled:
            return
        self._enabled = False
        server = self._server
        server.disabled = True
        server.stop_accepting()
        server._cancel_resume()
        server.socket.close()
        active = list(self._context.active.values())
        log.info("disabled %s: not listening, closing %d connection(s)",
                 _sockets.describe_address(self._address), len(active),
                 extra=self._fields("disabled", connections=len(active)))
        for conn in active:
            conn.abort(Outcome.CLOSED, "the forwarder was disabled")
        if active and getcurrent() is not self._host.hub:
            server.idle.wait(timeout=_ABORT_GRACE)

    def _enable(self) -> None:
        self._require_running()
        if self._enabled:
            return
        server = self._server
        server.socket = listeners.listen(self.rule, self._address if isinstance(self._address, tuple) else None)
        server.disabled = False
        self._enabled = True
        server.start_accepting()
        log.info("enabled %s: listening again", _sockets.describe_address(self._address),
                 extra=self._fields("enabled"))

    def _require_running(self) -> None:
        if self._state is not State.RUNNING:
            raise RuntimeError(f"the forwarder is {self._state}, not running")

    def _cut(self, id: int, outcome: Outcome, why: str) -> bool:
        conn = self._context.active.get(id)
        if conn is None or conn.outcome is not None:
            return False
        conn.abort(outcome, why)
        self._settle()
        return True

    # -- running on a hub -----------------------------------------------------------------

    def _claim_start(self) -> None:
        if self._state is not State.NEW:
            raise RuntimeError(f"a forwarder starts once; this one is {self._state}")
        self._state = State.RUNNING

    def _start_on_hub(self) -> None:
        try:
            if self._inherit_fd is not None:
                fd, self._inherit_fd = self._inherit_fd, None
                listener = listeners.adopt(fd, self.rule)  # closes fd if it fails
                old, self._inherit_from = self._inherit_from, None
                if old is not None:
                    self._took_over = weakref.ref(old)
                    self._socket_file, old._keep_listener = old._socket_file, True
            else:
                listener = listeners.listen(self.rule)
                try:
                    _selfloop.refuse_at_start(self.rule, listener)
                except BaseException:
                    listener.close()
                    raise
                self._socket_file = listeners.socket_file(self.rule)
        except BaseException:
            self._state = State.STOPPED
            if self._inherit_fd is not None:
                os.close(self._inherit_fd)
                self._inherit_fd = None
            raise
        if listener.family == getattr(socket, "AF_UNIX", None):
            self._address = self.rule.listen.sockaddr
        else:
            self._address = listener.getsockname()[:2]
        self._context.name = self.name
        if _selfloop.may_loop(self.rule, self._address):
            self._context.own_upstreams = _selfloop.OwnUpstreams()
        self._context.targets.label = self.name
        self._stopped = Event()
        self._context.workers = Workers(gevent.get_hub())
        threads = _bulk_threads() if self.rule.bulk_threads is None else self.rule.bulk_threads
        if self._context.splicer is not None and threads:
            self._context.offload = Offload(gevent.get_hub(), self._context.splicer, threads)
        self._server = _Server(listener, self._accepted, self.rule.max_connections,
                               (self.rule.targets[0].family if self.rule.targets else None)
                               or socket.AF_INET)
        self._context.on_fd_exhausted = self._server.pause_accepting
        self._context.on_closed = self._server.connection_closed
        self._server.start()
        if self.rule.check is not None:
            self._checks = Checks(self.rule, self._context.targets)
            self._checks.start()
        for entry in self._context.toxics.entries():   # schedules of toxics added before start
            if entry.runner is not None:
                entry.runner.start()
        _lifecycle.inert_after_fork(self, Forwarder._inert_after_fork)
        timeouts = [t for t in (self.rule.idle_timeout, self.rule.half_close_timeout) if t is not None]
        interval = min([max(t / 8, 0.01) for t in timeouts] + [_PARK_EVERY])
        self._sweeper = _sweeps.every(gevent.get_hub(), interval, self._sweep)  # shared by the hub's rules
        self._sweep_every = interval
        self._swept_at = time.monotonic()
        self._next_park = self._swept_at + _PARK_EVERY
        log.info("listening on %s -> %s%s%s", _sockets.describe_address(self._address), self._context.target_name,
                 f" (rule {self.rule.name})" if self.rule.name else "",
                 {None: "", "systemd": ", on a socket from systemd",
                  "handover": ", on a socket taken over"}.get(self._from_manager, ""),
                 extra=self._fields("listening", target=self._context.target_name,
                                    **({"socket_from": self._from_manager} if self._from_manager else {})))

    def _accepted(self, client: socket.socket, address: Any, upstream: socket.socket) -> None:
        """On the hub (the listener's callback). A client of a plain rule connects from here,
        in callbacks (``Context.dials_on_hub`` says which: one fixed address, nothing to read,
        check or send first); any other client runs ``_handle`` in a worker."""
        context = self._context
        if context.dials_on_hub(upstream):
            Connection(context, client, address).start(upstream)
        else:
            context.workers.run(self._handle, client, address, upstream)

    def _handle(self, client: socket.socket, address: Any, upstream: socket.socket) -> None:
        own = self._context.own_upstreams
        if own is not None and address in own:  # None unless a target can reach our port
            self._refuse_self(client, address, upstream)
            return
        Connection(self._context, client, address).run(upstream)

    def _refuse_self(self, client: socket.socket, address: Any, upstream: socket.socket) -> None:
        """A client that is one of our own upstream sockets: the target leads back here.
        Reset it, which ends the connection that dialled it, and so the loop."""
        log.warning("%s: refused a connection from %s, this forwarder's own upstream socket: "
                    "the target %s leads back to the listening address (a forwarding loop)",
                    self.name, _sockets.describe_address(address), self._context.target_name)
        _sockets.abort(client)
        upstream.close()
        self._server.connection_closed()

    def _sweep(self) -> None:
        """The periodic watch, one for all connections: idle timeouts and parking; called by
        the hub's shared sweeps (_sweeps.py), in turn with the other forwarders on the hub.
        It runs in a worker, not in the timer's callback: an abort may close connections,
        and on_close hooks must be free to use gevent, which the hub itself may not. A
        forwarder with no connection has nothing to walk and takes no worker."""
        now = time.monotonic()
        gap, self._swept_at = now - self._swept_at, now
        context = self._context
        if gap > 2 * self._sweep_every:
            # The loop did not run for a while (a blocking hook, a CPU-bound greenlet): bytes
            # that came meanwhile wait unread in the kernel, and this timer may fire before
            # their watchers do. Time the loop did not run is not idle time.
            context.stalled += gap - self._sweep_every
        park = now >= self._next_park
        if park:
            self._next_park = now + _PARK_EVERY
        if context.active and sweep_due(context, park):
            context.workers.run(sweep, context, now - context.stalled, park)

    def _stop_on_hub(self, timeout: Optional[float], retiring: bool = False) -> None:
        # Called from a hook, stop() cannot wait for the hook's own connection: it is ending
        # (on_close) or is stopped with the forwarder (on_open), and ends once the hook returns.
        own = self._context.in_hook.get(getcurrent())
        if own is not None and own.outcome is None:
            own.abort(Outcome.SHUTDOWN)
        if self._state is State.STOPPING:
            if retiring:
                pass  # retired already, or stopping: that goes on
            elif self._retiring:  # a stop while a reload's drain runs: stop's rules from now
                self._stop_retiring(timeout)
            else:  # a second stop while draining: cut it short
                self._abort_all()
            if own is None:
                self._stopped.wait()
            return
        self._state = State.STOPPING
        self._retiring = retiring
        self._drain_deadline = math.inf if timeout is None else time.monotonic() + timeout
        self._drain_timeout_given = timeout
        self._drain_changed = Event()
        server = self._server
        try:
            self._stop_checks()  # health no longer matters: no new client will come
            server.close()
            if not self._keep_listener:
                listeners.remove_socket_file(self._socket_file)
            server.allowance = 1 if own is not None else 0
            if server.running <= server.allowance:
                server.idle.set()
            others = server.running - server.allowance
            where = self._where()
            for_how_long = "until they end" if timeout is None else f"for up to {timeout:g}s"
            if self._retiring and self._handed_over:
                log.info("rule %s handed over to another process: it accepts there now%s", where,
                         f"; {others} connection(s) here drain {for_how_long}" if others else "",
                         extra=self._fields("handed_over", connections=others, timeout=timeout))
            elif self._retiring and self._keep_listener:
                # The listening socket is the successor's now: the port did not close.
                log.info("rule %s changed: new connections use the new settings%s", where,
                         f"; {others} old connection(s) drain {for_how_long}" if others else "",
                         extra=self._fields("retire", connections=others, timeout=timeout))
            elif others:
                log.info("stopping %s: draining %d connection(s) %s", where, others, for_how_long,
                         extra=self._fields("drain", connections=others, timeout=timeout))
            else:
                log.info("stopping %s", where, extra=self._fields("stop"))
            began = time.monotonic()
            drained = self._drain()
            if drained and self._retiring and others:  # a drain of hours deserves its end said
                log.info("%s: the %d old connection(s) of a %s have ended (after %.1fs)", where, others,
                         "handover" if self._handed_over else "reload", time.monotonic() - began,
                         extra=self._fields("retired", connections=others))
            if not drained:
                left = server.running - server.allowance
                timeout = self._drain_timeout_given
                if self._retiring:
                    log.warning("%s: reload drain deadline (%gs) hit: aborting %d old connection(s)", where,
                                timeout, left, extra=self._fields("drain_deadline", connections=left,
                                                                  timeout=timeout))
                else:
                    log.warning("stopping %s: drain deadline (%gs) hit: aborting %d connection(s)", where,
                                timeout, left, extra=self._fields("drain_deadline", connections=left,
                                                                  timeout=timeout))
                self._abort_all()
                if not server.idle.wait(timeout=_ABORT_GRACE):
                    left = server.running - server.allowance
                    log.warning("stopping %s: %d connection(s) did not end when aborted; leaving them", where,
                                left, extra=self._fields("abort_incomplete", connections=left))
            if self._sweeper is not None:
                self._sweeper.close()
        finally:
            self._context.toxics.stop_schedules()
            self._context.close()
            self._state = State.STOPPED
            self._stopped.set()
            self._host.end()

    def _where(self) -> str:
        """The rule in a line about the whole forwarder: its name and address, or the address."""
        address = _sockets.describe_address(self._address)
        name = getattr(self.rule, "name", None)
        return f"{name} ({address})" if name else address

    def _fields(self, event: str, **more: Any) -> dict:
        """Such a line's fields for a JSON log (gproxy._jsonlog)."""
        return {"fields": {"event": event, "rule": self.name, "listen": _sockets.describe_address(self._address),
                           **more}}

    def _stop_checks(self) -> None:
        checks, self._checks = self._checks, None
        if checks is not None:
            checks.stop()

    def _stop_retiring(self, timeout: Optional[float]) -> None:
        """A stop() while retire() drains: the drain goes on as a stop's, with ``timeout``
        from now unless the reload's deadline comes first."""
        self._retiring = False
        if timeout is not None:
            self._drain_deadline = min(self._drain_deadline, time.monotonic() + timeout)
            self._drain_timeout_given = timeout
        left = self._server.running - self._server.allowance
        log.info("stopping %s: draining %d connection(s) of an earlier reload %s", self._where(), left,
                 "until they end" if timeout is None else f"for up to {timeout:g}s",
                 extra=self._fields("drain", connections=left, timeout=timeout))
        self._drain_changed.set()

    def _drain(self) -> bool:
        """Wait until the connections have ended (True) or ``_drain_deadline`` has passed
        (False). Unless retiring, every ``_DRAIN_CHECK`` seconds close those that stayed at
        rest (Connection.idle_at_stop, no byte moved) for ``_AT_REST`` seconds: a pooled
        connection would otherwise hold a stop to its deadline. The wait tells a client's turn
        from a pause in a server's stream: a download that pauses briefly is not cut short.
        A reload's drain (``retire``) closes nothing: only its own deadline ends it."""
        idle = self._server.idle
        resting: Dict[Connection, Tuple[int, float]] = {}  # connection -> (its byte total, since when) at rest
        while True:
            now = time.monotonic()
            if self._retiring:
                remaining = self._drain_deadline - now
                if remaining <= 0:
                    return idle.is_set()
                # no polling: woken when the last connection ends, or by stop()
                gevent.wait([idle, self._drain_changed], timeout=None if remaining == math.inf else remaining,
                            count=1)
                if idle.is_set():
                    return True
                self._drain_changed.clear()
                continue
            for conn in list(self._context.active.values()):
                if not conn.idle_at_stop():
                    resting.pop(conn, None)
                    continue
                total = conn.counts[0] + conn.counts[1]
                seen = resting.get(conn)
                if seen is None or seen[0] != total:
                    resting[conn] = (total, now)
                elif now - seen[1] >= _AT_REST:
                    del resting[conn]
                    conn.close_idle()
            remaining = self._drain_deadline - time.monotonic()
            if remaining <= 0:
                return idle.is_set()
            if idle.wait(timeout=min(remaining, _DRAIN_CHECK)):
                return True

    def _inert_after_fork(self) -> None:
        """In a forked child: close this forwarder's copies of its sockets; it is stopped."""
        if self._state not in (State.RUNNING, State.STOPPING):
            return
        self._state = State.STOPPED
        context, server = self._context, self._server
        context.on_open = context.on_close = None  # the parent's hooks, for the parent's connections
        # The hub of a thread-mode forwarder did not survive the fork (only the forking thread
        # does), so its watchers are left alone. A hub running on this very thread goes on in
        # the child: its watchers are closed before their fds, which libev requires.
        own_hub = self._host.thread is None and self._host.thread_id == _thread_id()
        checks, self._checks = self._checks, None
        if own_hub:
            if self._sweeper is not None:
                self._sweeper.close()
            server.stop_accepting()
            if checks is not None:
                checks.stop_soon()
        elif checks is not None:
            checks.forget()
        listener = getattr(server, "socket", None)
        try:
            if listener is not None:
                _gevent.unwrap(listener).close()  # not gevent's wrapper: the hub may not run here
        except (OSError, AttributeError):  # closed already: disable()d
            pass
        if server._spare is not None:
            server._spare.close()
            server._spare = None
        for conn in list(context.active.values()):
            conn.forget_after_fork(close_watchers=own_hub)
        context.active.clear()
        if context.offload is not None:
            context.offload.forget()  # its threads stayed in the parent
            context.offload = None
        if context.splicer is not None:
            context.splicer.close()
        if own_hub:
            self._stopped.set()  # serve_forever() returns

    def _abort_all(self) -> None:
        for conn in list(self._context.active.values()):
            conn.abort(Outcome.SHUTDOWN)


_thread_id = _gevent.thread_id  # the OS thread's, even where gevent patched threading
_sleep = _gevent.real_sleep


def _bulk_threads() -> int:
    """Threads that may splice bulk off the hub: one per CPU, at most 8."""
    return max(1, min(os.cpu_count() or 1, 8))


def _splicer(rule: Rule) -> Optional["Splicer"]:
    """A Splicer where the platform has splice(2) and the rule allows it; else None (copy). A
    TLS side's bytes must pass through OpenSSL in user space: no splice for its rule."""
    if not rule.splice or rule.tls_cert is not None or rule.target_tls:
        return None
    try:
        from gproxy.splice import Splicer
    except (ImportError, AttributeError):  # no os.splice: not Linux, or Python < 3.10
        return None
    return Splicer(rule.buffer_size)
