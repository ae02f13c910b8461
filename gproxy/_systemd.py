"""systemd's ``Type=notify`` protocol: one datagram to ``$NOTIFY_SOCKET``, no dependency.

Typical use (the command line does this)::

    notify("READY=1")                 # every listener is bound
    notify("RELOADING=1")             # a reload begins ... then READY=1 again
    notify("STOPPING=1")

Outside systemd (no ``$NOTIFY_SOCKET``) every call does nothing. A leading ``@`` in the
variable means Linux's abstract namespace (sd_notify(3)).
"""

from __future__ import annotations

import logging
import os
import socket
import time

from gproxy import _gevent

__all__ = ["notify", "reloading"]

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


def reloading() -> bool:
    """``RELOADING=1`` with the clock reading systemd 253's ``Type=notify-reload`` wants too."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000 if hasattr(time, "clock_gettime_ns") else 0
    return notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")
