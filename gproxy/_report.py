"""Reporting a failure of the host's own code that runs inside gproxy (a hook, a Python toxic).

Typical use (where the host's code was called)::

    try:
        hook(record)
    except BaseException:
        report(log, f"conn#{conn.id}: on_close hook {hook!r} failed", sys.exc_info())

Such a failure is a bug in the host's program, and the host may have configured no logging at
all: the report then goes to stderr, as Python prints an uncaught exception, instead of
vanishing into gproxy's ``NullHandler``.
"""

from __future__ import annotations

import logging
from typing import Optional

__all__ = ["report"]


def report(logger: logging.Logger, message: str, exc_info=None) -> None:
    """Log an ERROR (with its traceback, given ``exc_info``). When the host configured no
    handler for it (gproxy's loggers have only a NullHandler, which hides the record from
    logging's ``lastResort``), print it on stderr as Python prints an uncaught exception: a bug
    in the host's code must not vanish without a word. A host that set gproxy's level above
    ERROR chose silence."""
    if not logger.isEnabledFor(logging.ERROR):
        return
    if _has_handler(logger) or logging.lastResort is None:
        logger.error("%s", message, exc_info=exc_info)
    else:
        logging.lastResort.handle(logger.makeRecord(logger.name, logging.ERROR, __file__, 0, "%s",
                                                    (message,), exc_info))


def _has_handler(logger: logging.Logger) -> bool:
    """Whether a record of this logger reaches a handler other than a NullHandler."""
    current: Optional[logging.Logger] = logger
    while current is not None:
        if any(not isinstance(h, logging.NullHandler) for h in current.handlers):
            return True
        if not current.propagate:
            return False
        current = current.parent
    return False
