"""systemd's protocols with no dependency: ``Type=notify`` and socket activation.

``Type=notify`` is one datagram to ``$NOTIFY_SOCKET``; socket activation passes listening
sockets from fd 3 on (``$LISTEN_FDS``).

Typical use (the command line does this)::

    passed = listen_fds()             # [(3, "web"), (4, None)] under socket activation, else []
    notify("READY=1")                 # every listener is bound
    notify("RELOADING=1")             # a reload begins ... then READY=1 again
    notify("STOPPING=1")
    notify(f"MAINPID={os.getpid()}\nREADY=1")  # took over a running gproxy: the service is ours now
    hand_over()                       # handed over: this process speaks for the service no more

Outside systemd (no ``$NOTIFY_SOCKET``) every notify does nothing. A leading ``@`` in the
variable means Linux's abstract namespace (sd_notify(3)). ``listen_fds`` follows
sd_listen_fds(3) and sd_listen_fds_with_names(3): the fds are ours only if ``$LISTEN_PID`` is
our pid (a variable inherited from a parent is not), they get close-on-exec, and the three
variables are unset whatever they held, so that no child process inherits them.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import List, MutableMapping, Optional, Tuple

from gproxy import _gevent

__all__ = ["notify", "reloading", "hand_over", "listen_fds", "LISTEN_FDS_START", "ActivationError"]

#: the first fd systemd passes (sd_listen_fds(3)'s SD_LISTEN_FDS_START)
LISTEN_FDS_START = 3

_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class ActivationError(ValueError):
    """The socket activation variables are malformed: ``LISTEN_FDS`` not a count, or
    ``LISTEN_FDNAMES`` naming more or fewer fds than it has."""

log = logging.getLogger(__name__)


def notify(state: str) -> bool:
    """Send ``state`` (``KEY=VALUE`` lines) to the service manager; True if it was sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or not hasattr(socket, "AF_UNIX"):
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with _gevent.RealSocket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.settimeout(1.0)  # a datagram to a local socket never waits unless its queue is full
            sock.connect(address)
            sock.sendall(state.encode())
        return True
    except OSError as exc:
        log.warning("cannot notify the service manager at %s: %s", os.environ.get("NOTIFY_SOCKET"),
                    os.strerror(exc.errno).lower() if exc.errno else exc)
        return False


def hand_over() -> None:
    """This process has handed its sockets to another gproxy, which now speaks for the service
    (``MAINPID=``): send nothing more. A ``STOPPING=1`` from a process that only drains would
    make systemd (``NotifyAccess=all``) stop the whole service, the new process with it."""
    os.environ.pop("NOTIFY_SOCKET", None)


def reloading() -> bool:
    """``RELOADING=1`` with the clock reading systemd 253's ``Type=notify-reload`` wants too."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000 if hasattr(time, "clock_gettime_ns") else 0
    return notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")


def listen_fds(environ: Optional[MutableMapping[str, str]] = None) -> List[Tuple[int, Optional[str]]]:
    """The listening sockets the service manager passed: ``[(fd, name), ...]`` from fd 3 on
    (``name`` from ``$LISTEN_FDNAMES``, None without it), or ``[]``. Unsets the variables in
    ``environ`` (default ``os.environ``) in every case; ``ActivationError`` if they are
    malformed for this process."""
    environ = os.environ if environ is None else environ
    pid, count, names = (environ.pop(key, None) for key in _VARIABLES)
    if pid is None or count is None:
        return []
    if not (pid.isascii() and pid.isdigit()) or int(pid) != os.getpid():
        return []  # meant for another process: a parent's, inherited
    if not (count.isascii() and count.isdigit()):
        raise ActivationError(f"LISTEN_FDS: expected a count of fds, got {count!r}")
    fds = list(range(LISTEN_FDS_START, LISTEN_FDS_START + int(count)))
    labels: List[Optional[str]] = [None] * len(fds)
    if names is not None:
        labels = list(names.split(":")) if fds else []
        if len(labels) != len(fds):
            raise ActivationError(f"LISTEN_FDNAMES: {len(labels)} name(s) for {len(fds)} fd(s): {names!r}")
    for fd in fds:
        try:
            os.set_inheritable(fd, False)  # ours alone: a child must not hold a listener open
        except OSError as exc:
            raise ActivationError(f"LISTEN_FDS: fd {fd} is not open ({_describe(exc)})") from None
    return list(zip(fds, labels))


def _describe(exc: OSError) -> str:
    return os.strerror(exc.errno).lower() if exc.errno else str(exc)
