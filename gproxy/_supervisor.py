"""Every core: a parent that runs N gproxy worker processes on one port and supervises them.

Typical use (the CLI does this for ``gproxy --workers 4 LISTEN TARGET``)::

    port = reserve(rule)                        # binds LISTEN (port 0: picks one), never listens
    code = Supervisor(worker_command, 4).run()  # returns the exit status

Each worker is ``python -m gproxy`` with the same options, the real port, and
``SO_REUSEPORT`` on its own listening socket, so each has its own hub and accept
queue and the kernel spreads new clients over them (Linux). The parent never
accepts: it keeps a bound, non-listening socket on the port so the port stays
reserved while a worker restarts (the kernel gives connections only to
listening sockets). Workers inherit stderr: one log stream.

The parent waits on signals and child exits only (a self-pipe, no polling):

- SIGTERM or SIGINT: sent on to every worker, which drains as one gproxy does;
  the parent exits 0 once all have exited 0 (1 otherwise). A second signal is
  sent on too: the workers then abort what is left.
- A worker that dies otherwise is logged and started again; one that dies
  within a second of starting is restarted after a delay that doubles up to
  30 s. If a worker exits with gproxy's own failure status (1 or 2) within a
  second of its first start (the address taken by another program, for one),
  everything stops with exit status 1.
- SIGHUP and SIGUSR1 are passed to the workers (each logs its own statistics).

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
from typing import Callable, Dict, List, Optional

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


class Supervisor:
    """Runs ``command(index, lifeline)`` as N worker processes until a signal stops them all;
    ``lifeline`` is the fd each worker watches for its supervisor's death (``watch_lifeline``)."""

    def __init__(self, command: Callable[[int, int], List[str]], count: int):
        self.command = command
        self.count = count
        self.procs: Dict[int, subprocess.Popen] = {}
        self.started: Dict[int, float] = {}
        self.delay: Dict[int, float] = {}
        self.due: Dict[int, float] = {}      # index -> when a dead worker starts again
        self.stopping = 0                    # signals received
        self.failed = False
        self.lifeline: Optional[int] = None  # the read end each worker inherits

    def run(self) -> int:
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
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
            log.info("%d workers started, pids %s", self.count,
                     " ".join(str(p.pid) for p in self.procs.values()))
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
        finally:
            signal.set_wakeup_fd(old_fd)
            for s, handler in old.items():
                signal.signal(s, handler)
            os.close(wake_r)
            os.close(wake_w)
            os.close(self.lifeline)
            os.close(lifeline_w)
        return 1 if self.failed else 0

    def _start(self, index: int) -> None:
        lifeline = self.lifeline
        assert lifeline is not None  # run() made it before starting any worker
        proc = subprocess.Popen(self.command(index, lifeline), stdin=subprocess.DEVNULL, pass_fds=(lifeline,))
        self.procs[index] = proc
        self.started[index] = time.monotonic()

    def _on_signal(self, signum: int) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.stopping += 1
            if self.stopping == 1:
                log.info("stopping %d worker(s)", len(self.procs))
            self.due.clear()
            self._send(signal.SIGTERM)
        elif signum in (getattr(signal, "SIGHUP", None), getattr(signal, "SIGUSR1", None)):
            self._send(signum)
        # SIGCHLD only wakes the loop; SIGUSR2 and SIGALRM are ignored, as in one gproxy

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
            if self.stopping:
                # killed by the signal before it could install its handler: it held nothing
                if code not in (0, -signal.SIGTERM, -signal.SIGINT):
                    self.failed = True
                    log.warning("worker %d (pid %d) exited with status %s", index, proc.pid, code)
                continue
            lived = time.monotonic() - self.started[index]
            if index not in self.delay and lived < _QUICK_DEATH and code in (1, 2):
                # it failed at its first start by itself (gproxy's exit statuses: the port is
                # taken, say): do not loop on it. One killed by a signal is started again.
                log.error("worker %d (pid %d) failed at start with status %s; stopping", index, proc.pid, code)
                self.failed = True
                self.stopping = 1
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


def worker_argv(argv: List[str], port: int, lifeline: int) -> List[str]:
    """A worker's command line: the parent's arguments without ``--workers``, plus the port
    the parent reserved and the lifeline's fd (hidden options of the command line)."""
    out: List[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--workers":
            skip = True
        elif not arg.startswith("--workers="):
            out.append(arg)
    return [sys.executable, "-m", "gproxy", "--worker-port", str(port), "--worker-lifeline", str(lifeline), *out]
