"""The process-wide hook that keeps forwarders from outliving their owner after fork().

Typical use (``gproxy.forwarder`` is the only caller; nothing here knows a forwarder's
insides: it hands over the function that makes one inert)::

    from gproxy import _lifecycle

    _lifecycle.inert_after_fork(forwarder, Forwarder._inert_after_fork)   # called in a child

Stopping hosts still running in their threads at interpreter exit, and destroying a
thread's hub, are :mod:`gproxy._hubthread`'s: they belong to a hub in a thread of its own.
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Any, Callable

__all__ = ["inert_after_fork"]

log = logging.getLogger(__name__)


#: every forwarder started in this process, with what makes it inert in a child after fork();
#: weak, so that a stopped forwarder is not kept alive for this
_started: "weakref.WeakKeyDictionary[Any, Callable[[Any], None]]" = weakref.WeakKeyDictionary()


def inert_after_fork(owner: Any, make_inert: Callable[[Any], None]) -> None:
    """In a child forked after this call, ``make_inert(owner)`` runs (if ``owner`` is alive)."""
    _started[owner] = make_inert


def _after_fork_in_child() -> None:
    """A forked child gets copies of every listening and connected socket. Serving them there
    would steal clients and bytes from the parent, and merely keeping them open would keep
    them alive after the parent closes them (clients connect to a stopped forwarder and hang;
    an aborted connection is never reset). So the child closes its copies, which leaves the
    parent's sockets as they are (no shutdown, no SO_LINGER: those would act on the shared
    socket), and its forwarders are stopped: they belong to the parent."""
    for forwarder, make_inert in list(_started.items()):
        try:
            make_inert(forwarder)
        except Exception:  # a child must get on with its own work
            log.debug("making %r inert after fork", forwarder, exc_info=True)
    _started.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
