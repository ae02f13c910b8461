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
    passed = listeners.Passed.from_systemd()    # socket activation: systemd's listening sockets
    passed.match({"web": rule})                 # {"web": 0}: which passed socket each rule takes
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import stat
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import gevent.socket

from gproxy import _sockets, _systemd
from gproxy.config import Address, ConfigError, Endpoint, Rule, UnixAddress, owner_id

__all__ = ["listen", "socket_file", "remove_socket_file", "adopt", "set_file_access", "Passed", "PassedSocket"]

log = logging.getLogger(__name__)


def listen(rule: Rule, bound: Optional[Tuple[str, int]] = None):
    """A bound, listening gevent socket (on ``bound``, the address it had, when listening
    again); OSError names the address on failure."""
    listen = rule.listen
    if isinstance(listen, UnixAddress):
        return _listen_unix(rule, listen)
    family = listen.family
    sockaddr: Tuple[Any, ...]
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


def _listen_unix(rule: Rule, listen: UnixAddress):
    """Like listen, for a Unix socket. A socket file left by a process that died is replaced;
    one that a live process listens on is an error, as a TCP port in use would be."""
    path = listen.sockaddr

    def failure(code: Optional[int], why: Optional[str]) -> OSError:
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
    assert isinstance(rule.listen, UnixAddress), "unix_* options on a TCP rule"  # config refuses them
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


@dataclass(frozen=True)
class PassedSocket:
    """One listening socket passed to this process: its fd, its name (systemd's
    ``FileDescriptorName=``, default the socket unit's name; None without names; a rule's
    name after a handover), the address it is bound to, read from the socket itself, where
    it came from (``"systemd"`` or ``"handover"``), and after a handover the listen address
    its rule asked for as written (``spec``: ``127.0.0.1:0`` kept means the same port)."""

    fd: int
    name: Optional[str]
    address: Endpoint
    origin: str = "systemd"
    spec: Optional[str] = None

    def __str__(self) -> str:
        named = f" named {self.name!r}" if self.name is not None else ""
        return f"fd {self.fd}{named} ({self.address})"


class Passed:
    """The listening sockets systemd passed (socket activation), which rules serve on instead
    of binding: the socket stays bound and listening in systemd's hands too, so a client that
    comes while gproxy (re)starts waits in its queue instead of being refused.

    A socket goes to the rule whose name it has (``LISTEN_FDNAMES``, systemd's
    ``FileDescriptorName=``), else to the rule whose ``listen`` address it is bound to
    (``getsockname``). Each keeps its fd for the process's life: a rule that starts on one
    serves on a duplicate, so a rule removed by a reload and added again finds it still.
    ``ConfigError`` for an fd that is not a listening stream socket."""

    def __init__(self, fds: Sequence[Tuple[int, Optional[str]]] = ()):
        self.sockets: List[PassedSocket] = []
        #: names that are not rules' (the metrics and API ports) holding a socket for good
        self.reserved: Dict[str, int] = {}
        self._closed: set = set()
        for fd, name in fds:
            self.sockets.append(PassedSocket(fd, name, _passed_address(fd, name)))

    def add_handed_over(self, entries: Sequence[Tuple[int, str, str]], origin: str = "handover") -> None:
        """Sockets a running gproxy handed over (:mod:`gproxy._handover`), or a ``--workers``
        parent made for this worker (``origin`` ``"parent"``): ``(fd, name, listen as its rule
        wrote it)``. One matches a rule of the same name that asks for the same listen address,
        or any rule bound to its address. Unlike systemd's, one no rule takes is closed."""
        for fd, name, spec in entries:
            self.sockets.append(PassedSocket(fd, name, _passed_address(fd, name), origin, spec))

    def discard(self, passed: PassedSocket) -> None:
        """Close a socket nobody takes (one handed over whose rule is gone): its port closes
        once the process that handed it over closes its copy too."""
        index = self.sockets.index(passed)
        if index not in self._closed:
            self._closed.add(index)
            os.close(passed.fd)

    @classmethod
    def from_systemd(cls, environ=None) -> Optional["Passed"]:
        """The sockets of ``$LISTEN_FDS`` (unset afterwards), or None when there are none.
        ``ConfigError`` naming the variable or the fd when something is wrong."""
        try:
            fds = _systemd.listen_fds(environ)
        except _systemd.ActivationError as exc:
            field, _, message = str(exc).partition(": ")
            raise ConfigError(field, message) from None
        return cls(fds) if fds else None

    def __len__(self) -> int:
        return len(self.sockets)

    def match(self, rules: Mapping[str, Rule], extra: Mapping[str, Endpoint] = {}) -> Dict[str, int]:
        """Which passed socket each rule takes: ``{name: index}`` for those that take one.
        ``extra`` are other ports (``"metrics"``, ``"api"``) matched the same way after the
        rules, by their name or address; those already reserved keep theirs. ``ConfigError``
        for a socket named after a rule whose address is of another kind (TCP for Unix)."""
        taken: Dict[str, int] = dict(self.reserved)
        used = set(taken.values())
        wanted = {name: rule.listen for name, rule in rules.items()}
        wanted.update({name: address for name, address in extra.items() if name not in taken})
        used |= self._closed
        for index, passed in enumerate(self.sockets):  # by name first: the operator said so
            name = passed.name
            if index in used or name is None or name not in wanted or name in taken:
                continue
            listen = wanted[name]
            if passed.spec is not None and passed.spec != str(listen):
                continue  # handed over, and its rule listens elsewhere now: by address, if at all
            if isinstance(listen, UnixAddress) != isinstance(passed.address, UnixAddress):
                raise ConfigError(name, f"systemd passed {passed}, but it listens on {listen}: "
                                        "a TCP socket for a Unix one or the other way round")
            if not _same_address(listen, passed.address):
                log.warning("%s: serving on the socket systemd passed by that name, %s, not on its listen "
                            "address %s", name, passed.address, listen)
            taken[name] = index
            used.add(index)
        for name, listen in wanted.items():  # then by the address each rule listens on
            if name in taken:
                continue
            for index, passed in enumerate(self.sockets):
                if index not in used and _same_address(listen, passed.address):
                    taken[name] = index
                    used.add(index)
                    break
        return taken

    def reserve(self, name: str, index: int) -> None:
        """Keep socket ``index`` for ``name`` (a port that is not a rule's) from now on."""
        self.reserved[name] = index

    def unused(self, taken: Mapping[str, int]) -> List[PassedSocket]:
        """The passed sockets no rule or port takes in ``taken`` (a ``match()`` result)."""
        used = set(taken.values()) | set(self.reserved.values()) | self._closed
        return [passed for index, passed in enumerate(self.sockets) if index not in used]

    def lend(self, index: int) -> int:
        """A duplicate of socket ``index``'s fd, for the taker to own and close."""
        return os.dup(self.sockets[index].fd)

    def give(self, index: int, forwarder) -> None:
        """Make ``forwarder``'s next start serve on socket ``index`` (a duplicate)."""
        forwarder.inherit_socket(self.lend(index), self.sockets[index].origin)

    def lend_socket(self, index: int):
        """Socket ``index`` as a non-blocking gevent socket of its own (a duplicate), for a
        server that takes a listener rather than an fd (the metrics and API ports)."""
        sock = gevent.socket.socket(fileno=self.lend(index))
        sock.setblocking(False)
        return sock

    def close(self) -> None:
        for index, passed in enumerate(self.sockets):
            if index not in self._closed:
                os.close(passed.fd)
        self.sockets, self._closed = [], set()


def _passed_address(fd: int, name: Optional[str]) -> Endpoint:
    """The address a passed fd listens on, checked as sd_is_socket(3) would: a stream socket
    (TCP or Unix) that listens. Anything else is the unit's mistake, said at once."""
    where = f"fd {fd}" + (f" named {name!r}" if name is not None else "")
    try:
        probe = socket.socket(fileno=os.dup(fd))
    except OSError as exc:
        raise ConfigError("LISTEN_FDS", f"systemd passed {where}, which is not a socket "
                                        f"({_sockets.describe_error(exc)})") from None
    with probe:
        try:
            kind = probe.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
            listening = probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            family, bound = probe.family, probe.getsockname()
        except OSError as exc:
            raise ConfigError("LISTEN_FDS", f"systemd passed {where}, which is not a socket "
                                            f"({_sockets.describe_error(exc)})") from None
    if family not in (socket.AF_INET, socket.AF_INET6, getattr(socket, "AF_UNIX", None)):
        raise ConfigError("LISTEN_FDS", f"systemd passed {where}, a socket of family {family}: "
                                        "gproxy listens on TCP and Unix stream sockets")
    if kind != socket.SOCK_STREAM or not listening:
        what = "a datagram socket" if kind == socket.SOCK_DGRAM else "not a listening stream socket"
        raise ConfigError("LISTEN_FDS", f"systemd passed {where} ({_sockets.describe_address(bound)}), "
                                        f"{what}: use ListenStream= (with Accept=no)")
    if family == getattr(socket, "AF_UNIX", None):
        if isinstance(bound, bytes):
            bound = bound.decode(errors="surrogateescape")
        return UnixAddress("@" + bound[1:] if bound.startswith("\0") else bound)
    return Address(bound[0], bound[1])


def _same_address(listen: Endpoint, bound: Endpoint) -> bool:
    """Whether a rule's ``listen`` is the address a passed socket is bound to: the same path,
    or the same IP and port (a name such as localhost: any address it has). Port 0 never is:
    it asks for a port of its own."""
    if isinstance(listen, UnixAddress) or isinstance(bound, UnixAddress):
        return listen == bound
    if listen.port != bound.port or listen.port == 0:
        return False
    try:
        ip = ipaddress.ip_address(bound.host.split("%")[0])
    except ValueError:
        return False
    try:
        return ipaddress.ip_address(listen.host) == ip
    except ValueError:  # a name: any address it has for listening
        try:
            infos = socket.getaddrinfo(listen.host, listen.port, 0, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
        except OSError:
            return False
        return any(ipaddress.ip_address(str(info[4][0]).split("%")[0]) == ip for info in infos)
