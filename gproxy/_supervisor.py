"""Every core: a parent that runs N gproxy worker processes on one port and supervises them.

Typical use (the CLI does this for ``gproxy --workers 4 LISTEN TARGET`` or ``-c FILE``)::

    port = reserve(rule)                        # binds LISTEN (port 0: picks one), never listens
    code = Supervisor(worker_command, 4, single=rule_on_that_port).run()   # the exit status

Each worker is ``python -m gproxy`` with the same options and its own hub. The parent
makes, per worker and rule, a listening socket with ``SO_REUSEPORT`` (the kernel spreads
new clients over them, Linux) and passes it to the worker over its link
(:mod:`gproxy._workerlink`), keeping a copy: when a worker dies and is started again at
once, the clients queued in its socket wait for its successor instead of being reset. The
parent never accepts; it also keeps a bound, non-listening socket per port, so that the
port stays reserved whatever the workers do (the kernel gives connections only to listening
sockets). With ``-c`` the parent reads and validates the file, holds each rule's port, and
sends the text to each worker: a worker started again runs the configuration in force, never
a file changed or broken since. Workers inherit stderr: one log stream.

The parent waits on signals and child exits only (a self-pipe, no polling); its links hub
(a thread of its own) talks to the workers:

- A worker says when it accepts; once every one does, the parent logs ``listening on ...
  with N workers`` and sends systemd READY=1. Workers get no ``NOTIFY_SOCKET``: systemd
  hears READY, RELOADING and STOPPING from the main pid only.
- SIGTERM or SIGINT: STOPPING=1, the parent closes its copies of the listening sockets and
  sends SIGTERM to every worker, which drains as one gproxy does; the parent exits 0 once
  all have exited 0 (1 otherwise). A worker drains once however many stop signals it gets
  (systemd's KillMode=control-group and a terminal's ^C signal the whole group, so each
  gets the group's and its parent's): a second signal to the *parent* makes it tell the
  workers to abort what is left.
- SIGHUP with ``-c``: the parent validates the file once (a bad one: one ERROR line, nothing
  changes anywhere), binds what it adds, then every worker applies it (RELOADING=1, then
  READY=1 once all have). Without ``-c`` it is logged.
- ``--metrics``: the parent serves the one page, the sum of every worker's snapshot
  (:mod:`gproxy._workerlink` says how a late or dead worker is counted).
- A worker that dies otherwise is logged and started again; one that dies
  within a second of starting is restarted after a delay that doubles up to
  30 s (its listening sockets are closed meanwhile, so its share of new clients goes to the
  others). If a worker exits with gproxy's own failure status (1 or 2) within a
  second of its first start (the address taken by another program, for one),
  everything stops with exit status 1.
- SIGUSR1 is passed to the workers (each logs its own statistics).

Workers die with their supervisor. Each holds the read end of a pipe (the lifeline) whose
only write end the parent holds, however it ends (``kill -9`` included): when the parent is
gone the worker reads EOF and stops as on SIGTERM: it closes its listener at once, so no
orphan keeps taking clients on the port with the old settings, lets its open connections
finish (``--drain-timeout``), and exits. HAProxy's workers and PostgreSQL's backends watch
their master the same way. A pipe rather than Linux's ``PR_SET_PDEATHSIG``: it needs no
ctypes and no ``getppid()`` check for a parent that died before the child could ask, it
does not fire when the parent *thread* that forked ends, and the worker drains instead of
dying mid-transfer. (A worker whose event loop is stuck notices nothing; neither would a
SIGTERM handler.)
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from gproxy import _sockets
from gproxy.config import Address, Rule

__all__ = ["Supervisor", "auto_count", "reserve", "watch_lifeline", "worker_argv"]

# The logger keeps the module's old name: logger names are public (docs/operations.md#loggers).
log = logging.getLogger("gproxy.workers")

#: a worker that lived shorter than this is restarted after a growing delay
_QUICK_DEATH = 1.0
_MAX_DELAY = 30.0


def auto_count() -> int:
    """``--workers auto``: one per CPU this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def reserve(rule: Rule) -> socket.socket:
    """Bind the rule's address with SO_REUSEPORT and no listen(): it picks the port for port 0
    and holds it for the workers. OSError names the address."""
    listen = rule.listen
    assert isinstance(listen, Address)  # the command line refuses --workers for a Unix socket
    try:
        infos = socket.getaddrinfo(listen.host, listen.port, 0, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
        family, sockaddr = infos[0][0], infos[0][4]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen on {listen}: {_sockets.describe_error(exc)}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(sockaddr)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {listen}: {_sockets.describe_error(exc)}") from None
    return sock


#: a worker started again numbers its connections from its generation times this: ids stay
#: unique across workers and their successors (a worker would need 10**12 connections to
#: reach its successor's first id), and stay small for the first generation.
GENERATION_IDS = 10 ** 12


def worker_ids(index: int, generation: int, count: int) -> Tuple[int, int]:
    """The (first, step) of worker ``index``'s connection ids in its ``generation``-th life:
    the workers interleave (worker 0 counts 1, 1+N, 1+2N..., worker 1 counts 2, 2+N...), so
    a connection id names one connection across every worker, as it does in one process."""
    return 1 + index + generation * GENERATION_IDS, count


class Supervisor:
    """Runs ``command(index, lifeline, channel, ids)`` as N worker processes until a signal stops
    them all; ``lifeline`` is the fd each worker watches for its supervisor's death
    (``watch_lifeline``), ``channel`` its end of the link to the parent (:mod:`gproxy._workerlink`),
    ``ids`` the (first, step) its connection ids count with (``worker_ids``).

    ``config``: the ``-c`` file, validated and its ports bound here, sent to every worker and
    reloaded on SIGHUP; ``metrics``: the address of the one ``/metrics`` page, served here with
    the sum over workers; ``announce()`` logs what listens, once every worker accepts."""

    def __init__(self, command: Callable[[int, int, int, Tuple[int, int]], List[str]], count: int, *,
                 config: Optional[str] = None, metrics: Optional[str] = None, single: Any = None,
                 announce: Callable[[dict, Dict[str, int]], None] = lambda rules, ports: None):
        self.command = command
        self.count = count
        self.config = config
        self.metrics = metrics
        self.single = single
        self.announce = announce
        self.procs: Dict[int, subprocess.Popen] = {}
        self.started: Dict[int, float] = {}
        self.delay: Dict[int, float] = {}
        self.due: Dict[int, float] = {}      # index -> when a dead worker starts again
        self.generations: Dict[int, int] = {}  # index -> how many times it was started
        self.stopping = 0                    # signals received
        self.failed = False
        self.announced = False               # every worker accepted once: said, and READY=1 sent
        self.lifeline: Optional[int] = None  # the read end each worker inherits
        self.host: Any = None                # the links hub (gproxy._hubthread.HubHost)
        self.links: Any = None               # gproxy._workerlink.Links, on that hub
        self._metrics_server: Any = None
        self._wake_w: Optional[int] = None
        # systemd hears from this process only: a worker's message would be ignored
        # (NotifyAccess=main) and would say READY for one worker only
        self.env = {key: value for key, value in os.environ.items() if key != "NOTIFY_SOCKET"}

    def start_links(self) -> None:
        """Start the links hub: load and bind ``config``, serve ``metrics``. ConfigError (exit
        2) or OSError (exit 1) if that fails; nothing is left running then."""
        from gproxy._hubthread import HubHost
        from gproxy._workerlink import Links

        def start() -> None:
            self.links = Links(self._wake, self.config, self.single)
            try:
                if self.config is not None:
                    self.links.load()
                if self.metrics is not None:
                    from gproxy import metrics
                    self._metrics_server = metrics.serve(self.metrics, self.links.collect)
                    log.info("metrics, summed over the workers, on http://%s/metrics",
                             _sockets.describe_address(self._metrics_server.address))
            except BaseException:
                self.links.close()
                raise

        self.host = HubHost()
        self.host.start_in_thread(start, name=lambda: "gproxy workers' links",
                                  at_exit=lambda: self._stop_links())

    def _stop_links(self) -> None:
        if self.host is None:
            return
        host, self.host = self.host, None

        def stop() -> None:
            if self._metrics_server is not None:
                self._metrics_server.stop(timeout=1)
            self.links.close()
            host.end()

        from gproxy._hubthread import HubEnded
        try:
            host.stop(stop)
        except HubEnded:
            pass

    def _wake(self) -> None:
        """From the links hub: have the supervisor's loop look again (a worker is ready)."""
        if self._wake_w is not None:
            try:
                os.write(self._wake_w, b"w")
            except OSError:
                pass  # full: it will look anyway

    def run(self) -> int:
        if self.host is None:
            self.start_links()
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        self._wake_w = wake_w
        received: List[int] = []

        def on_signal(signum, _frame):
            received.append(signum)

        names = ("SIGTERM", "SIGINT", "SIGCHLD", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGALRM")
        signums = [getattr(signal, n) for n in names if hasattr(signal, n)]
        old = {s: signal.signal(s, on_signal) for s in signums}
        old_fd = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        # Nothing is ever written: the write end closes when this process ends, however it
        # ends, and every worker then reads EOF. Both ends are non-inheritable (os.pipe), so
        # workers get only the read end (pass_fds), never a write end that would keep it open.
        self.lifeline, lifeline_w = os.pipe()
        try:
            for index in range(self.count):
                self._start(index)
            while self.procs or (self.due and not self.stopping):
                timeout = None
                if self.due and not self.stopping:
                    timeout = max(0.0, min(self.due.values()) - time.monotonic())
                try:
                    select.select([wake_r], [], [], timeout)
                except InterruptedError:
                    pass
                try:
                    while os.read(wake_r, 512):
                        pass
                except BlockingIOError:
                    pass
                while received:
                    self._on_signal(received.pop(0))
                self._reap()
                self._restart_due()
                self._announce_once_ready()
        finally:
            signal.set_wakeup_fd(old_fd)
            for s, handler in old.items():
                signal.signal(s, handler)
            self._wake_w = None
            self._stop_links()
            os.close(wake_r)
            os.close(wake_w)
            os.close(self.lifeline)
            os.close(lifeline_w)
        return 1 if self.failed else 0

    def _start(self, index: int) -> None:
        lifeline = self.lifeline
        assert lifeline is not None  # run() made it before starting any worker
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        generation = self.generations.get(index, 0)
        self.generations[index] = generation + 1
        ids = worker_ids(index, generation, self.count)
        with theirs:
            proc = subprocess.Popen(self.command(index, lifeline, theirs.fileno(), ids), stdin=subprocess.DEVNULL,
                                    pass_fds=(lifeline, theirs.fileno()), env=self.env)
        self.procs[index] = proc
        self.started[index] = time.monotonic()
        self.host.call(self.links.attach, index, mine, proc.pid)

    def _announce_once_ready(self) -> None:
        """The first time every worker accepts: the lines that say so, and READY=1. Never
        before: a client that connects on reading them must find every worker listening."""
        if self.announced or self.stopping or len(self.procs) < self.count:
            return
        if not self.host.call(self.links.all_ready, list(self.procs)):
            return
        self.announced = True
        from gproxy import _systemd
        log.info("%d workers started, pids %s", self.count, " ".join(str(p.pid) for p in self.procs.values()))
        self.announce(*self.host.call(lambda: (dict(self.links.rules), self.links.ports())))
        _systemd.notify("READY=1")

    def _on_signal(self, signum: int) -> None:
        from gproxy import _systemd
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.stopping += 1
            self.due.clear()
            if self.stopping == 1:
                _systemd.notify("STOPPING=1")
                log.info("stopping %d worker(s)", len(self.procs))
                # the port closes as the workers close theirs: one gproxy's stop refuses newcomers too
                self.host.call(self.links.release)
                # A worker takes this as the start of its drain, and any SIGTERM after it as
                # nothing: systemd (KillMode=control-group) and a terminal's ^C signal the whole
                # group, so each worker may get the signal from there too.
                self._send(signal.SIGTERM)
            elif self.stopping == 2:
                log.warning("second signal: the workers stop now")
                self.host.call(self.links.tell_all, {"op": "abort"})
        elif signum == getattr(signal, "SIGHUP", None):
            if self.config is None:
                log.info("SIGHUP: nothing to reload (gproxy takes its rule from the command line)")
            elif not self.stopping:
                log.info("SIGHUP: reading %s again", self.config)
                self.host.submit(self._reload)
        elif signum == getattr(signal, "SIGUSR1", None):
            self._send(signum)
        # SIGCHLD only wakes the loop; SIGUSR2 and SIGALRM are ignored, as in one gproxy

    def _reload(self) -> None:
        """On the links hub."""
        try:
            self.links.reload()
        except Exception:  # a bug: said once, with its traceback; what is in force stays
            log.exception("reload of %s failed", self.config)

    def _send(self, signum: int) -> None:
        for proc in self.procs.values():
            try:
                proc.send_signal(signum)
            except ProcessLookupError:
                pass

    def _reap(self) -> None:
        for index, proc in list(self.procs.items()):
            code = proc.poll()
            if code is None:
                continue
            del self.procs[index]
            lived = time.monotonic() - self.started[index]
            # one started again at once takes its listening sockets over, and the clients queued
            # in them; one that keeps dying does not keep its share of newcomers waiting
            self.host.call(self.links.detach, index, not self.stopping and lived >= _QUICK_DEATH)
            if self.stopping:
                # killed by the signal before it could install its handler: it held nothing
                if code not in (0, -signal.SIGTERM, -signal.SIGINT):
                    self.failed = True
                    log.warning("worker %d (pid %d) exited with status %s", index, proc.pid, code)
                continue
            if index not in self.delay and lived < _QUICK_DEATH and code in (1, 2):
                # it failed at its first start by itself (gproxy's exit statuses: the port is
                # taken, say): do not loop on it. One killed by a signal is started again.
                log.error("worker %d (pid %d) failed at start with status %s; stopping", index, proc.pid, code)
                self.failed = True
                self.stopping = 1
                self.host.call(self.links.release)
                self.due.clear()
                self._send(signal.SIGTERM)
                continue
            delay = 0.0 if lived >= _QUICK_DEATH else min(_MAX_DELAY, max(0.5, 2 * self.delay.get(index, 0.25)))
            self.delay[index] = delay
            log.warning("worker %d (pid %d) exited with status %s; starting it again%s", index, proc.pid,
                        code, f" in {delay:.1f}s" if delay else "")
            self.due[index] = time.monotonic() + delay

    def _restart_due(self) -> None:
        if self.stopping:
            return
        now = time.monotonic()
        for index, when in list(self.due.items()):
            if when <= now:
                del self.due[index]
                self._start(index)
                log.info("worker %d started again, pid %d", index, self.procs[index].pid)


def watch_lifeline(fd: int, on_gone: Callable[[], None]):
    """In a worker, on the current hub: call ``on_gone()`` once the supervisor has exited (EOF
    on the lifeline ``fd``). Returns the watcher; ``close()`` it to stop watching."""
    import gevent

    os.set_blocking(fd, False)
    watcher = gevent.get_hub().loop.io(fd, 1)

    def readable() -> None:
        try:
            if os.read(fd, 64):
                return  # nobody writes, but a byte is no death
        except BlockingIOError:
            return
        except OSError:
            pass  # an error reading it means it is gone as surely as EOF does
        watcher.close()
        os.close(fd)
        on_gone()

    watcher.start(readable)
    return watcher


def worker_argv(argv: List[str], port: Optional[int], lifeline: int, channel: int,
                ids: Tuple[int, int] = (1, 1)) -> List[str]:
    """A worker's command line: the parent's arguments without ``--workers`` and ``--metrics``
    (the parent serves the page), plus the port the parent reserved (LISTEN TARGET; with ``-c``
    the ports come over the link), the lifeline's fd, its link's, and how its connection ids
    count (hidden options)."""
    out: List[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--workers", "--metrics"):
            skip = True
        elif not arg.startswith(("--workers=", "--metrics=")):
            out.append(arg)
    port_args = ["--worker-port", str(port)] if port is not None else []
    return [sys.executable, "-m", "gproxy", *port_args, "--worker-lifeline", str(lifeline),
            "--worker-channel", str(channel), "--worker-ids", f"{ids[0]}:{ids[1]}", *out]
