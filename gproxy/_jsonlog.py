"""JSON log lines for log shippers: one object per line, connection fields as keys.

Typical use (the CLI does this for ``--log-format json``)::

    handler.setFormatter(JsonFormatter())
    # {"time": "2026-11-27T21:02:14.877Z", "level": "INFO", "logger": "gproxy.relay",
    #  "message": "conn#1 ...", "rule": "127.0.0.1:8080", "id": 1, "client": "127.0.0.1:50412",
    #  "target": "127.0.0.1:5432", "outcome": "eof", "duration": 3.574,
    #  "bytes_upstream": 1532, "bytes_downstream": 88211}

The connection fields come from the ``connection`` mapping relay passes as ``extra`` on its
log call (built only when a formatter reads it), never from parsing the message. Other
events (a target down or up, a reload, a drain) pass theirs the same way as ``fields``::

    log.warning("%s: target %s is down ...", ..., extra={"fields": {"event": "target_down",
                "rule": "postgres", "target": "db1:5432", ...}})
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping

__all__ = ["JsonFormatter"]


class JsonFormatter(logging.Formatter):
    """``time`` (UTC, ISO 8601, milliseconds), ``level``, ``logger``, ``message``, then the
    record's ``connection`` or ``fields`` mapping if it has one, and ``traceback`` when there
    is one. ``pid``: each line says the process's pid too (a ``--workers`` worker's lines do:
    they all go to one stream, and a connection is named by its worker's pid and its id)."""

    def __init__(self, *, pid: bool = False):
        super().__init__()
        self.pid = pid

    def format(self, record: logging.LogRecord) -> str:
        seconds = int(record.created)
        line: dict = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.pid:
            line["pid"] = record.process
        for name in ("connection", "fields"):
            fields = getattr(record, name, None)
            if isinstance(fields, Mapping):
                for key, value in fields.items():
                    if value is not None:
                        line[key] = value
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["traceback"] = record.exc_text
        # ensure_ascii: any byte a peer managed to put in a message stays on its one line
        return json.dumps(line, ensure_ascii=True, default=str)
