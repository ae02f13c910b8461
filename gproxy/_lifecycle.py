"""The process-wide hook that keeps forwarders from outliving their owner after fork().

Typical use (``gproxy.forwarder`` is the only caller; nothing here knows a forwarder's
insides beyond ``_inert_after_fork()``)::

    from gproxy import _lifecycle

    _lifecycle.started.add(forwarder)          # made inert in a child after fork()

Stopping hosts still running in their threads at interpreter exit, and destroying a
thread's hub, are :mod:`gproxy._hubthread`'s: they belong to a hub in a thread of its own.
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for annotations only: the forwarder imports this module, never the reverse
    from gproxy.forwarder import Forwarder

__all__ = ["started"]

log = logging.getLogger(__name__)


#: every forwarder started in this process, made inert in a child after fork()
started: "weakref.WeakSet[Forwarder]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A forked child gets copies of every listening and connected socket. Serving them there
    would steal clients and bytes from the parent, and merely keeping them open would keep
    them alive after the parent closes them (clients connect to a stopped forwarder and hang;
    an aborted connection is never reset). So the child closes its copies, which leaves the
    parent's sockets as they are (no shutdown, no SO_LINGER: those would act on the shared
    socket), and its forwarders are stopped: they belong to the parent."""
    for forwarder in list(started):
        try:
            forwarder._inert_after_fork()
        except Exception:  # a child must get on with its own work
            log.debug("making %r inert after fork", forwarder, exc_info=True)
    started.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
