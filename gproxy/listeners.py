"""Listening sockets: bind one for a rule, adopt another forwarder's, own a Unix socket file.

A Unix socket file gets the rule's ``unix_mode``, ``unix_user`` and ``unix_group`` between
bind() and listen(): a connect() to a socket that does not listen yet is refused, so no
client ever connects through permissions other than the rule's. (A umask around bind()
would set the mode at creation, but the umask is the whole process's, threads included,
and it cannot set an owner.) The directory holding the file should be writable by gproxy
only, as for any socket: chmod(2) follows a symlink someone swapped in meanwhile.

Typical use (by ``gproxy.forwarder``)::

    from gproxy import listeners

    sock = listeners.listen(rule)               # OSError names the address on failure
    owned = listeners.socket_file(rule)         # (path, dev, inode) of a Unix socket file, or None
    ...
    listeners.remove_socket_file(owned)         # at stop: ours only, not a successor's
    sock = listeners.adopt(os.dup(fd), rule)    # a reload's takeover: the same kernel socket
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from typing import Optional, Tuple

import gevent.socket

from gproxy import _sockets
from gproxy.config import Rule, UnixAddress, owner_id

__all__ = ["listen", "socket_file", "remove_socket_file", "adopt", "set_file_access"]


def listen(rule: Rule, bound: Optional[Tuple[str, int]] = None):
    """A bound, listening gevent socket (on ``bound``, the address it had, when listening
    again); OSError names the address on failure."""
    listen = rule.listen
    if isinstance(listen, UnixAddress):
        return _listen_unix(rule)
    family = listen.family
    if bound is not None:
        family, sockaddr = (socket.AF_INET6 if ":" in bound[0] else socket.AF_INET), bound
    elif family is None:
        try:
            infos = socket.getaddrinfo(listen.host, listen.port, 0, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen on {listen}: {_sockets.describe_error(exc)}") from None
        family, sockaddr = infos[0][0], infos[0][4]
    else:
        sockaddr = (listen.host, listen.port)
    sock = gevent.socket.socket(family, socket.SOCK_STREAM)
    _sockets.tune(sock)  # accepted sockets inherit TCP_NODELAY and keepalive from it
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if rule.reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(sockaddr)
        sock.listen(rule.backlog)
    except OSError as exc:
        sock.close()
        where = listen if bound is None else _sockets.describe_address(bound)  # not the rule's port 0
        raise OSError(exc.errno, f"cannot listen on {where}: {_sockets.describe_error(exc)}") from None
    sock.setblocking(False)
    return sock


def _listen_unix(rule: Rule):
    """Like listen, for a Unix socket. A socket file left by a process that died is replaced;
    one that a live process listens on is an error, as a TCP port in use would be."""
    listen = rule.listen
    path = listen.sockaddr

    def failure(code: int, why: str) -> OSError:
        return OSError(code, f"cannot listen on {listen}: {why}")

    if not listen.abstract:
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise failure(exc.errno, _sockets.describe_error(exc)) from None
        else:
            if not stat.S_ISSOCK(mode):
                raise failure(errno.EEXIST, "the path exists and is not a socket")
            probe = _sockets.raw_socket(socket.AF_UNIX)
            try:
                code = probe.connect_ex(path)
            finally:
                probe.close()
            if code != errno.ECONNREFUSED:  # 0 or EAGAIN: someone accepts there
                raise failure(errno.EADDRINUSE, "another process listens on it")
            try:
                os.unlink(path)  # stale: nobody listens
            except FileNotFoundError:
                pass
    sock = gevent.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise failure(exc.errno, _sockets.describe_error(exc)) from None
    try:
        set_file_access(rule)  # before listen(): until then every connect() is refused
        sock.listen(rule.backlog)
    except OSError as exc:
        sock.close()
        if not listen.abstract:
            try:
                os.unlink(path)  # ours, just made: no file is left behind by a failed start
            except OSError:
                pass
        raise failure(exc.errno, exc.strerror if isinstance(exc, _AccessError)
                      else _sockets.describe_error(exc)) from None
    sock.setblocking(False)
    return sock


class _AccessError(OSError):
    """chown or chmod of a socket file failed: its strerror names the key and the value."""


def set_file_access(rule: Rule) -> None:
    """Give the rule's Unix socket file its ``unix_user``/``unix_group``, then its ``unix_mode``
    (in that order: chown(2) may clear mode bits). Nothing to do when none is set.
    ``OSError`` (an ``_AccessError``) naming the key on failure."""
    user, group, mode = rule.unix_user, rule.unix_group, rule.unix_mode
    if user is None and group is None and mode is None:
        return
    path = rule.listen.path
    if user is not None or group is not None:
        try:
            uid = -1 if user is None else owner_id(user, "user")
            gid = -1 if group is None else owner_id(group, "group")
        except LookupError as exc:  # the name went away since the rule was checked
            raise _AccessError(errno.EINVAL, str(exc)) from None
        try:
            os.chown(path, uid, gid, follow_symlinks=False)
        except OSError as exc:
            keys = " and ".join(f"{key} {value}" for key, value in (("unix_user", user), ("unix_group", group))
                                if value is not None)
            raise _AccessError(exc.errno, f"cannot give the socket file to {keys}: "
                                          f"{_sockets.describe_error(exc)}") from None
    if mode is not None:
        try:
            os.chmod(path, mode)
        except OSError as exc:
            raise _AccessError(exc.errno, f"cannot set unix_mode {mode:04o} on the socket file: "
                                          f"{_sockets.describe_error(exc)}") from None


def socket_file(rule: Rule):
    """(path, device, inode) of the socket file just bound, so that stop removes ours only."""
    listen = rule.listen
    if not isinstance(listen, UnixAddress) or listen.abstract:
        return None
    try:
        info = os.stat(listen.path)
    except OSError:
        return None
    return listen.path, info.st_dev, info.st_ino


def remove_socket_file(socket_file) -> None:
    """Remove our socket file, unless another process has bound its own there since."""
    if socket_file is None:
        return
    path, device, inode = socket_file
    try:
        info = os.stat(path)
        if (info.st_dev, info.st_ino) == (device, inode):
            os.unlink(path)
    except OSError:
        pass


def adopt(fd: int, rule: Rule):
    """A listening socket from a duplicate of another forwarder's: the same socket in the
    kernel, so its queue of clients carries over; the backlog takes the new rule's value, and
    a Unix socket file the rule's mode and owner (clients already connected keep their
    connections: permissions are checked at connect())."""
    try:
        sock = gevent.socket.socket(fileno=fd)
    except BaseException:
        os.close(fd)
        raise
    try:
        sock.listen(rule.backlog)
        sock.setblocking(False)
        if isinstance(rule.listen, UnixAddress) and not rule.listen.abstract:
            set_file_access(rule)
    except _AccessError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {rule.listen}: {exc.strerror}") from None
    except BaseException:
        sock.close()
        raise
    return sock
