"""gproxy's HTTP ports (the API, /metrics): a ``gevent.pywsgi`` server with one set of rules.

Typical use::

    server = _http.server(("127.0.0.1", 0), app, log, client_timeout=60)
    server.start()                     # on this thread's hub; OSError if it cannot bind

The rules, the same for every port so that none is easier to abuse than another:

- A client that sends nothing for ``client_timeout`` seconds (between requests or inside
  one), or does not take the answer for as long, is disconnected: stalled clients cannot
  pile up (toxiproxy's server lets idle keep-alive connections go after 60 s too).
- Malformed HTTP is the client's fault, not ours: a 400 and one DEBUG line. pywsgi would
  log an ERROR quoting the request line, so any client could write what it likes into the
  error log of a port it can reach.
- A client that goes away or stops reading mid-answer is one DEBUG line, not a traceback.
- Each request is a DEBUG line; a bug in the application keeps pywsgi's treatment (its
  traceback, a 500).
"""

from __future__ import annotations

import logging
import socket
from typing import Callable, Tuple, Union

from gevent.pywsgi import LoggingLogAdapter, WSGIServer

from gproxy import _gevent
from gproxy._sockets import describe_address, describe_error

__all__ = ["CLIENT_TIMEOUT", "server"]

#: seconds an HTTP client may stay silent (or not read) before it is disconnected
CLIENT_TIMEOUT = 60.0

_BAD_REQUEST = (b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Type: text/plain\r\n"
                b"Content-Length: 12\r\n\r\nbad request\n")

#: how much of a malformed request's description a DEBUG line quotes
_QUOTE = 100


def server(address: Union[Tuple[str, int], socket.socket], application: Callable, logger: logging.Logger, *,
           client_timeout: float = CLIENT_TIMEOUT) -> WSGIServer:
    """A WSGIServer for ``application`` on ``address`` (not started), logging to ``logger``;
    ``address`` may be a listening gevent socket to serve on (socket activation)."""
    return WSGIServer(address, application,
                      log=LoggingLogAdapter(logger, logging.DEBUG),
                      error_log=LoggingLogAdapter(logger, logging.ERROR),
                      handler_class=_handler(logger, client_timeout))


def _handler(logger: logging.Logger, timeout: float):
    class Handler(_gevent.WSGIHandler):
        def __init__(self, sock, address, server, rfile=None):
            # gevent's timeout: per read, and for a write (sendall) the whole answer's deadline
            sock.settimeout(timeout)
            super().__init__(sock, address, server, rfile)

        def client_error(self, ex):
            """Malformed HTTP, or a client that stalled or went away inside a request."""
            client = describe_address(self.client_address)
            # (pywsgi's own bad-input errors are OSErrors too, with no errno: bad requests)
            if isinstance(ex, socket.timeout) or (isinstance(ex, OSError) and isinstance(ex.errno, int)):
                # stalled (timed out) or gone: nobody to answer
                logger.debug("HTTP client %s: %s", client, describe_error(ex))
                return None
            # pywsgi's text quotes the client's bytes: escaped and cut short here
            logger.debug("HTTP client %s: bad request: %s", client, ascii(str(ex)[:_QUOTE]))
            return _BAD_REQUEST

        def format_request(self) -> str:
            """The DEBUG line per request quotes the request line: escaped when it is not
            plain printable ASCII, so that a client cannot write raw bytes into the log."""
            line = super().format_request()
            return line if line.isascii() and line.isprintable() else ascii(line)[1:-1]

        def handle_error(self, t, v, tb):
            """A client that stopped reading the answer for ``timeout``, or went away while it
            was written, is the network's doing; the rest is a bug and keeps pywsgi's way."""
            if isinstance(v, (socket.timeout, ConnectionError)):
                logger.debug("HTTP client %s stopped reading the answer: %s",
                             describe_address(self.client_address), describe_error(v))
                self.close_connection = True
                return
            super().handle_error(t, v, tb)

    return Handler
