"""Handover: the listening sockets passed to a new gproxy over a Unix socket (SCM_RIGHTS).

A restart or an upgrade that goes through it refuses no client (HAProxy's ``-x`` with
``expose-fd listeners``, Envoy's hot restart).

Typical use (the command line does both halves)::

    # the running gproxy: control_socket = "/run/gproxy/control.sock" (or --control-socket)
    control = ControlServer(path, offer=lambda: [Offered("rule", "web", "0.0.0.0:80", fd), ...],
                            handed_over=stop_accepting_and_drain)
    control.start()

    # the new one: gproxy --takeover /run/gproxy/control.sock -c FILE
    taking = take("/run/gproxy/control.sock")    # the old one's sockets, fds ours now
    ...                                          # start every rule on them (listeners.Passed)
    old_pid = taking.confirm()                   # the old one stops accepting and drains

The conversation, one JSON line each way, the fds passed with SCM_RIGHTS:

1. new -> old: ``{"takeover": 1, "pid": N}``
2. old -> new: ``{"pid": N, "sockets": [{"kind", "name", "listen"}, ...]}`` (``kind``: rule,
   metrics, api or control), then the fds in that order, at most 200 to a message, each
   message one byte ``F`` long.
3. new -> old, once it accepts on them: ``{"accepting": true}``. If it cannot start, it closes
   the connection instead, and the old one goes on as if nothing had happened.
4. old -> new: ``{"draining": N}``. The old one closes its copies of the sockets (never a Unix
   socket's file: it is the new one's now) and its connections drain as a reload leaves them
   (until they end, or ``reload_drain_timeout``); then it exits.

Until step 3 the old one accepts as before; from then until it closes its copies both accept
on the same kernel sockets: at no point is a client refused. Only the old process's user (or
root) may connect: the socket file is made 0600 and the peer's uid is checked (SO_PEERCRED).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import stat
import struct
from dataclasses import dataclass
from typing import Callable, List, Optional

import gevent
import gevent.socket

from gproxy import _sockets

__all__ = ["ControlServer", "Offered", "Taking", "HandoverError", "take", "bind"]

log = logging.getLogger(__name__)

#: fds per SCM_RIGHTS message (Linux's SCM_MAX_FD is 253)
_BATCH = 200
#: the longest line either side sends or reads (a header for a few thousand rules fits)
_LINE_LIMIT = 4 << 20
#: how long the old one waits for the new one to start accepting, and each step else takes
_START_TIMEOUT = 120.0
_STEP_TIMEOUT = 10.0


class HandoverError(OSError):
    """The other side broke the conversation, or said something that is not in it."""


@dataclass(frozen=True)
class Offered:
    """A listening socket the running gproxy hands over: ``kind`` is ``rule``, ``metrics``,
    ``api`` or ``control``; ``name`` the rule's (or the kind); ``listen`` the address it was
    asked for, as written (``127.0.0.1:0``: the new one's rule takes it if it asks the same)."""

    kind: str
    name: str
    listen: str
    fd: int


def bind(path: str):
    """A listening gevent socket on the Unix path ``path``, made 0600 before it listens. A
    file left by a process that died is replaced; one a live process listens on is an error
    (``--takeover PATH`` is how to replace that process)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(mode):
            raise OSError(errno.EEXIST, f"cannot listen on {path} for takeovers: the path exists and is "
                                        "not a socket")
        probe = _sockets.raw_socket(socket.AF_UNIX)
        try:
            code = probe.connect_ex(path)
        finally:
            probe.close()
        if code != errno.ECONNREFUSED:
            raise OSError(errno.EADDRINUSE, f"cannot listen on {path} for takeovers: a running gproxy "
                                            f"listens there (take its sockets over with --takeover {path})")
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    sock = gevent.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o600)  # before listen(): nobody else ever connects
        sock.listen(8)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {path} for takeovers: "
                                 f"{_sockets.describe_error(exc)}") from None
    return sock


class ControlServer:
    """The running gproxy's side: hand the sockets ``offer()`` lists to whoever takes them
    over, one takeover at a time; once the new process accepts, ``handed_over(pid)``."""

    def __init__(self, path: str, offer: Callable[[], List[Offered]], handed_over: Callable[[int], None],
                 listener=None):
        self.path = path
        self.offer = offer
        self.handed_over = handed_over
        self.socket = listener              # a listening socket to serve on (taken over), or None: bind
        self._acceptor: Optional[gevent.Greenlet] = None
        self._busy = False
        self._done = False

    def listen(self) -> "ControlServer":
        """Bind the path (unless serving on a socket taken over); ``OSError`` naming it."""
        if self.socket is None:
            self.socket = bind(self.path)
        return self

    def start(self) -> "ControlServer":
        """Listen if not yet, and accept on this thread's hub."""
        self.listen()
        self.socket.settimeout(None)  # gevent's accept() waits on the hub only when not non-blocking
        self._acceptor = gevent.spawn(self._accept_loop)
        log.info("listening for takeovers on %s", self.path)
        return self

    def fileno(self) -> int:
        return self.socket.fileno()

    def close(self) -> None:
        """Stop accepting (a takeover in progress finishes). The file stays: after a handover
        it is the new process's, and a stale one is replaced by the next bind."""
        if self._acceptor is not None:
            self._acceptor.kill(block=False)
            self._acceptor = None
        if self.socket is not None:
            self.socket.close()
            self.socket = None

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self.socket.accept()
            except OSError as exc:
                if exc.errno in _sockets.FD_EXHAUSTED:
                    gevent.sleep(0.1)  # the client waits in the queue; the fds come back
                    continue
                return  # closed
            gevent.spawn(self._serve, conn)

    def _serve(self, conn) -> None:
        with conn:
            try:
                self._converse(conn)
            except (OSError, ValueError, gevent.Timeout) as exc:
                log.warning("takeover through %s failed, nothing changed: %s", self.path,
                            "no answer in time" if isinstance(exc, gevent.Timeout) else _describe(exc))

    def _converse(self, conn) -> None:
        uid = _peer_uid(conn)
        if uid not in (0, os.geteuid()):
            _send_line(conn, {"error": "permission denied"})
            raise HandoverError(errno.EPERM, f"refused a takeover by uid {uid}")
        with gevent.Timeout(_STEP_TIMEOUT):
            request = _read_line(conn)
        if request.get("takeover") != 1:
            raise HandoverError(errno.EPROTO, f"not a takeover request: {request!r}")
        pid = request.get("pid")
        if self._busy or self._done:
            _send_line(conn, {"error": "a takeover is under way" if self._busy else "handed over already"})
            raise HandoverError(errno.EBUSY, f"pid {pid} asked while a takeover was under way or done")
        self._busy = True
        try:
            offered = self.offer()
            log.info("pid %s takes over %d listening socket(s) through %s", pid, len(offered), self.path)
            _send_line(conn, {"pid": os.getpid(), "sockets": [
                {"kind": o.kind, "name": o.name, "listen": o.listen} for o in offered]})
            fds = [o.fd for o in offered]
            for start in range(0, len(fds), _BATCH):
                socket.send_fds(conn, [b"F"], fds[start:start + _BATCH])
            with gevent.Timeout(_START_TIMEOUT):
                answer = _read_line(conn, eof_ok=True)
            if answer is None or not answer.get("accepting"):
                raise HandoverError(errno.ECANCELED, f"pid {pid} did not start: {answer or 'it hung up'}")
            _send_line(conn, {"draining": os.getpid()})
            self._done = True
        finally:
            self._busy = False
        self.handed_over(pid)


class Taking:
    """The new gproxy's side of a takeover in progress: the sockets received (``sockets``:
    dicts with ``kind``, ``name``, ``listen``, ``fd``, the fds now ours), then ``confirm()``."""

    def __init__(self, path: str, conn, pid: int, sockets: List[dict]):
        self.path = path
        self.conn = conn
        self.pid = pid
        self.sockets = sockets

    def confirm(self) -> int:
        """Tell the old process this one accepts: it stops accepting and drains. Its pid."""
        with self.conn:
            _send_line(self.conn, {"accepting": True})
            with gevent.Timeout(_STEP_TIMEOUT, HandoverError(errno.ETIMEDOUT, "no answer in time")):
                answer = _read_line(self.conn)
        if "draining" not in answer:
            raise HandoverError(errno.EPROTO, f"unexpected answer: {answer!r}")
        return int(answer["draining"])

    def abandon(self) -> None:
        """This one could not start: the old one goes on unchanged."""
        self.conn.close()


def take(path: str) -> Taking:
    """Ask the gproxy listening for takeovers on ``path`` for its sockets. ``OSError``
    (``HandoverError`` for a broken conversation) naming what went wrong."""
    conn = gevent.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with gevent.Timeout(_STEP_TIMEOUT, HandoverError(errno.ETIMEDOUT, "no answer in time")):
            conn.connect(path)
            _send_line(conn, {"takeover": 1, "pid": os.getpid()})
            header, fds = _receive(conn)
        if "error" in header:
            raise HandoverError(errno.EBUSY, f"it refused: {header['error']}")
        sockets = header.get("sockets")
        if not isinstance(sockets, list) or len(fds) != len(sockets):
            for fd in fds:
                os.close(fd)
            raise HandoverError(errno.EPROTO, f"{len(fds)} fd(s) for {len(sockets or [])} socket(s)")
        for entry, fd in zip(sockets, fds):
            entry["fd"] = fd
            os.set_inheritable(fd, False)
        return Taking(path, conn, int(header.get("pid", 0)), sockets)
    except BaseException:
        conn.close()
        raise


def _receive(conn):
    """The header line and every fd after it: data and fds are read together with recvmsg,
    since a plain read would drop the fds riding on the bytes it takes."""
    buffer, fds, header, count = b"", [], None, None
    while True:
        data, received, flags, _ = socket.recv_fds(conn, 65536, 253)
        fds.extend(received)
        if flags & getattr(socket, "MSG_CTRUNC", 0):
            raise HandoverError(errno.EPROTO, "file descriptors were cut off (too many at once)")
        if not data:
            for fd in fds:
                os.close(fd)
            raise HandoverError(errno.ECONNRESET, "it hung up before handing everything over")
        buffer += data
        if header is None and b"\n" in buffer:
            line, _, buffer = buffer.partition(b"\n")
            header = json.loads(line)
            count = len(header.get("sockets") or [])
            if "error" in header:
                return header, fds
        if header is not None and len(fds) >= count:
            return header, fds
        if len(buffer) > _LINE_LIMIT:
            raise HandoverError(errno.EPROTO, "header too long")


def _send_line(conn, message: dict) -> None:
    conn.sendall(json.dumps(message).encode() + b"\n")


def _read_line(conn, eof_ok: bool = False) -> Optional[dict]:
    """One JSON line, read a byte at a time where fds may follow it (they never do here, but
    reading past the line would be wrong in a conversation)."""
    line = b""
    while not line.endswith(b"\n"):
        byte = conn.recv(1)
        if not byte:
            if eof_ok and not line:
                return None
            raise HandoverError(errno.ECONNRESET, "it hung up")
        line += byte
        if len(line) > _LINE_LIMIT:
            raise HandoverError(errno.EPROTO, "line too long")
    message = json.loads(line)
    if not isinstance(message, dict):
        raise ValueError(f"expected a JSON object, got {line[:100]!r}")
    return message


def _peer_uid(conn) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)
