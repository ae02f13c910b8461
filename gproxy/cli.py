"""The ``gproxy`` command: arguments to a Forwarder, logging, signals, exit codes.

Typical use::

    gproxy 127.0.0.1:8080 db.internal:5432
    gproxy --idle-timeout 300 -v 0.0.0.0:6380 6379

Exit status: 0 after a clean stop (SIGTERM/SIGINT), 1 on a runtime failure such
as a port in use, 2 on bad arguments. This is the only module that configures
logging or installs signal handlers.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import List, Optional

import gevent

from gproxy import __version__
from gproxy.config import ConfigError
from gproxy.forwarder import Forwarder

__all__ = ["main"]

log = logging.getLogger("gproxy")


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad input as one line and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"gproxy: error: {message} (see gproxy --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="gproxy",
        description="Forward TCP connections from LISTEN to TARGET, byte for byte, "
                    "passing half-closes and resets through.",
        epilog="Addresses are HOST:PORT, [IPV6]:PORT, or PORT alone for 127.0.0.1:PORT. "
               "gproxy listens on all interfaces only when told (0.0.0.0:PORT, [::]:PORT). "
               "SIGTERM or SIGINT stops accepting and drains; a second one stops at once.",
    )
    parser.add_argument("listen", metavar="LISTEN", help="address to accept clients on; port 0 picks one")
    parser.add_argument("target", metavar="TARGET", help="address to connect to for each client")
    parser.add_argument("--connect-timeout", metavar="SECONDS", default="10",
                        help="give up on each upstream connect attempt after this long (default 10; 0 waits "
                             "as long as the kernel does)")
    parser.add_argument("--idle-timeout", metavar="SECONDS", default="0",
                        help="close a connection with no traffic either way for this long "
                             "(default 0: never)")
    parser.add_argument("--half-close-timeout", metavar="SECONDS", default="0",
                        help="like --idle-timeout, once one side has closed its half (HAProxy's "
                             "timeout client-fin; default 0: never)")
    parser.add_argument("--max-connections", metavar="N", default=None,
                        help="at this many open connections, stop accepting until one ends "
                             "(default: half the fd limit, less a reserve)")
    parser.add_argument("--backlog", metavar="N", default="1024",
                        help="listen queue length (default 1024)")
    parser.add_argument("--buffer-size", metavar="BYTES", default="262144",
                        help="most bytes read at once, and held for a peer that is not reading "
                             "(default 262144)")
    parser.add_argument("--drain-timeout", metavar="SECONDS", default="10",
                        help="on SIGTERM/SIGINT, let open connections finish for this long, "
                             "then abort them (default 10)")
    parser.add_argument("--no-splice", dest="splice", action="store_false",
                        help="always copy through user space instead of using splice(2)")
    parser.add_argument("--proxy-protocol", metavar="off|v1|v2", default="off",
                        help="send HAProxy's PROXY header (the real client and listen addresses) to the "
                             "target before any payload (default off)")
    parser.add_argument("--accept-proxy-from", metavar="CIDR", action="append", default=None,
                        help="clients from this network (repeatable) must start with a PROXY v1/v2 "
                             "header, whose address then stands for the client (default: nobody)")
    parser.add_argument("--proxy-header-timeout", metavar="SECONDS", default="5",
                        help="how long such a client has to send its PROXY header (default 5)")
    parser.add_argument("--allow", metavar="CIDR", action="append", default=None,
                        help="let in only clients from these networks or addresses (repeatable; "
                             "default everyone)")
    parser.add_argument("--deny", metavar="CIDR", action="append", default=None,
                        help="refuse clients from these networks or addresses (repeatable; checked "
                             "before --allow)")
    parser.add_argument("--max-connections-per-client", metavar="N", default=None,
                        help="refuse a client address's connections beyond this many open ones "
                             "(default: no limit)")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="log debugging detail")
    verbosity.add_argument("-q", "--quiet", action="store_true",
                           help="no line per connection, except warnings and errors")
    parser.add_argument("--version", action="version", version=f"gproxy {__version__}")
    return parser


def _option_name(field: str) -> str:
    return field.upper() if field in ("listen", "target") else "--" + field.replace("_", "-")


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    options = {name: getattr(args, name) for name in (
        "connect_timeout", "idle_timeout", "half_close_timeout", "backlog", "buffer_size",
        "drain_timeout", "splice", "proxy_protocol", "accept_proxy_from", "proxy_header_timeout",
        "allow", "deny", "max_connections_per_client")}
    if args.max_connections is not None:
        options["max_connections"] = args.max_connections
    try:
        forwarder = Forwarder(args.listen, args.target, **options)
    except ConfigError as exc:
        message = str(exc).split(": ", 1)[-1]
        print(f"gproxy: error: {_option_name(exc.field)}: {message}", file=sys.stderr)
        return 2

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if args.quiet:  # no line per connection; the listening and stopping lines stay
        logging.getLogger("gproxy.relay").setLevel(logging.WARNING)

    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals == 2:
            log.warning("second signal: stopping now")
        gevent.spawn(forwarder.stop)

    # Kept until the process exits: a late SIGTERM while we wind down must not kill us.
    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, on_signal)
    try:
        forwarder.serve_forever()
    except OSError as exc:
        print(f"gproxy: error: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0
