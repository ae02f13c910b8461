"""The ``gproxy`` command: arguments to a Forwarder, logging, signals, exit codes.

Typical use::

    gproxy 127.0.0.1:8080 db.internal:5432
    gproxy --idle-timeout 300 -v 0.0.0.0:6380 6379
    gproxy --balance round-robin 127.0.0.1:8080 app1:80 app2:80
    gproxy -c /etc/gproxy.toml            # many rules; SIGHUP reloads the file
    gproxy --check -c /etc/gproxy.toml    # validate only: exit 0 or 2

Exit status: 0 after a clean stop (SIGTERM/SIGINT), 1 on a runtime failure such
as a port in use, 2 on bad arguments or a bad config file. This is the only module that configures
logging or installs signal handlers.

Signals: SIGTERM and SIGINT drain and stop (a second one aborts what is left);
SIGUSR1 logs the statistics; SIGHUP reloads the config file (-c; without one it reads
the rule's TLS certificate files again, if it has any, else it is logged and ignored);
SIGUSR2 and SIGALRM are logged and otherwise ignored. Under
systemd (``$NOTIFY_SOCKET``), gproxy reports READY=1 once every listener is bound,
RELOADING=1 and READY=1 around a reload, and STOPPING=1.

Log lines never hold up forwarding: they go through a bounded queue to a writer
thread, so a reader of stderr that stops reading (``gproxy ... 2>&1 | less``,
a stuck pipe) costs lines, counted and reported once writing works again, not
connections (HAProxy drops what it cannot write the same way).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import queue
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple, Union, cast

import gevent

from gproxy import __version__, _sockets, _systemd, metrics
from gproxy._jsonlog import JsonFormatter
from gproxy.config import UNIX_FILE_OPTIONS, ConfigError, Endpoint, parse_address, parse_tcp_address
from gproxy.forwarder import Forwarder
from gproxy.stats import Statistics

if TYPE_CHECKING:
    from gproxy._fileservice import FileService  # imported when a config file is given

__all__ = ["main", "build_parser"]

log = logging.getLogger("gproxy")

#: log lines held for a stderr that is not being read, beyond what the pipe itself holds
#: (64 KiB, about 600 lines); past that, lines are dropped and counted. 1024 lines is a few
#: hundred KiB at most.
LOG_QUEUE_LINES = 1024

#: at exit, how long queued log lines may take to reach a stderr that is slow or stuck.
LOG_FLUSH_TIMEOUT = 2.0

#: after the first line of a batch, how long the writer waits for more before writing. Waking
#: the writer costs a futex wake and two handoffs of the GIL; with one line per connection that
#: was a third of the system calls a short connection costs. While the writer lingers nobody
#: waits on the queue, so a line is queued without waking anyone; a burst of connections is
#: written in a few writes a second. A line reaches stderr at most this much later.
LOG_LINGER = 0.01


class _StderrLog(logging.Handler):
    """Formats on the caller's thread, writes to fd 2 on a thread of its own.

    ``emit`` never blocks: a full queue drops the line and counts it; the writer
    reports the count in one line as soon as a write goes through again. The
    writer uses ``os.write`` on the raw fd, not ``sys.stderr``: a daemon thread
    blocked inside a buffered file's write holds its lock, and the interpreter's
    final flush of that file would then abort the process at exit.
    """

    def __init__(self, fd: int = 2, capacity: int = LOG_QUEUE_LINES):
        super().__init__()
        self.fd = fd
        self.lines: "queue.Queue[Optional[str]]" = queue.Queue(capacity)
        self.dropped = 0            # only emit() adds to it
        self._reported = 0          # only the writer thread touches it
        self._broken = False        # stderr is gone (EPIPE, EBADF): stop writing, keep counting
        self._closed = False
        self._capacity = capacity
        self._start_writer()
        if hasattr(os, "register_at_fork"):  # worker processes log too
            os.register_at_fork(after_in_child=self._after_fork)

    def _start_writer(self) -> None:
        self._thread = threading.Thread(target=self._write_lines, name="gproxy log writer", daemon=True)
        self._thread.start()

    def _after_fork(self) -> None:
        """A forked child has no writer thread, and the parent's may have held the queue's
        lock at the fork: a fresh queue and thread (the parent writes what it had queued)."""
        if not self._closed:
            self.lines = queue.Queue(self._capacity)
            self.dropped = self._reported = 0
            self._start_writer()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
        except Exception:
            self.handleError(record)
            return
        try:
            self.lines.put_nowait(line)
        except queue.Full:
            self.dropped += 1

    def close(self, timeout: float = LOG_FLUSH_TIMEOUT) -> None:
        """Write what is queued, for up to ``timeout`` seconds, then stop the writer."""
        if self._closed:
            return
        self._closed = True
        try:
            self.lines.put(None, timeout=timeout)
        except queue.Full:
            pass  # the writer is stuck on a stderr nobody reads: leave what is queued
        else:
            self._thread.join(timeout)
        super().close()

    def _write_lines(self) -> None:
        while True:
            try:
                batch = [self.lines.get_nowait()]  # behind: write at once
            except queue.Empty:
                batch = [self.lines.get()]
                if batch[0] is not None:
                    time.sleep(LOG_LINGER)  # sleep-ok: lets a burst's lines gather (LOG_LINGER)
            while batch[-1] is not None and len(batch) < 256:
                try:
                    batch.append(self.lines.get_nowait())
                except queue.Empty:
                    break
            done = batch[-1] is None
            if done:
                batch.pop()
            self._write("".join(cast(List[str], batch)))  # the None that ends the queue is popped
            dropped = self.dropped - self._reported
            if dropped:
                self._reported += dropped
                stamp = time.strftime("%Y-%m-%d %H:%M:%S")
                self._write(f"{stamp} WARNING {dropped} log line(s) dropped: stderr was not being read\n")
            if done:
                return

    def _write(self, text: str) -> None:
        if self._broken or not text:
            return
        data = memoryview(text.encode("utf-8", "backslashreplace"))
        while data:
            try:
                data = data[os.write(self.fd, data):]
            except InterruptedError:
                continue
            except OSError:
                self._broken = True
                return


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad input as one line and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"gproxy: error: {message} (see gproxy --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="gproxy",
        description="Forward TCP connections from LISTEN to TARGET, byte for byte, "
                    "passing half-closes and resets through.",
        epilog="Addresses are HOST:PORT, [IPV6]:PORT, PORT alone for 127.0.0.1:PORT, or "
               "unix:/PATH (unix:@NAME: Linux's abstract namespace). "
               "gproxy listens on all interfaces only when told (0.0.0.0:PORT, [::]:PORT). "
               "SIGTERM or SIGINT stops accepting and drains; a second one stops at once. "
               "SIGUSR1 logs the statistics; SIGHUP reloads -c FILE; SIGUSR2 and SIGALRM are logged "
               "and ignored.",
    )
    parser.add_argument("listen", metavar="LISTEN", nargs="?",
                        help="address to accept clients on; port 0 picks one")
    parser.add_argument("target", metavar="TARGET", nargs="*",
                        help="address to connect to for each client; with several, a connect that "
                             "fails moves on to the next (see --balance)")
    parser.add_argument("-c", "--config", metavar="FILE", default=None,
                        help="read the rules from this TOML file instead of LISTEN TARGET; SIGHUP "
                             "re-reads it")
    parser.add_argument("--check", action="store_true",
                        help="with -c: validate the file, print what it holds, exit 0 (good) or 2")
    parser.add_argument("--balance", metavar="POLICY", default="failover",
                        help="with several targets: failover (the first that works; default), "
                             "round-robin, or least-connections")
    parser.add_argument("--max-fails", metavar="N", default="1",
                        help="mark a target down after this many connects to it fail in a row "
                             "(default 1; 0 never)")
    parser.add_argument("--fail-timeout", metavar="SECONDS", default="10",
                        help="skip a down target for this long, then try it again (default 10)")
    parser.add_argument("--health-check", metavar="tcp|send-expect|http", default=None,
                        help="check every target actively, like HAProxy's check: tcp (connect), "
                             "send-expect (--check-send, --check-expect) or http (default: off)")
    parser.add_argument("--check-send", metavar="BYTES", default=None,
                        help="send-expect: what to send, with \\r \\n \\t \\0 \\xHH escapes "
                             "(default: nothing, read a banner)")
    parser.add_argument("--check-expect", metavar="REGEX", default=None,
                        help="send-expect: a regular expression the target's answer must match, "
                             "e.g. '^\\+PONG'")
    parser.add_argument("--check-http-path", metavar="PATH", default="/",
                        help="http: the path to request (default /)")
    parser.add_argument("--check-http-method", metavar="METHOD", default="GET",
                        help="http: the request's method (default GET)")
    parser.add_argument("--check-http-status", metavar="CODES", default="200-399",
                        help="http: the status codes that pass, e.g. 200,204 (default 200-399)")
    parser.add_argument("--check-http-host", metavar="HOST", default=None,
                        help="http: the Host header (default: the target's address)")
    parser.add_argument("--check-interval", metavar="SECONDS", default="2",
                        help="from one check of a target to the next (default 2)")
    parser.add_argument("--check-timeout", metavar="SECONDS", default=None,
                        help="the most one check may take (default: --check-interval)")
    parser.add_argument("--rise", metavar="N", default="2",
                        help="passing checks in a row that bring a down target up (default 2)")
    parser.add_argument("--fall", metavar="N", default="3",
                        help="failing checks in a row that take a target down (default 3)")
    parser.add_argument("--api", metavar="HOST:PORT", default=None,
                        help="serve toxiproxy's HTTP API here (e.g. 127.0.0.1:8474); LISTEN TARGET are then "
                             "optional. Whoever can reach it can make this host connect anywhere")
    parser.add_argument("--toxiproxy-config", metavar="FILE", default=None,
                        help="with --api: create the proxies of a toxiproxy-server -config FILE (a JSON "
                             "list of {name, listen, upstream, enabled}) at start, as POST /populate does")
    parser.add_argument("--name", metavar="NAME", default="default",
                        help="with --api: the LISTEN TARGET rule's proxy name (default 'default')")
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
    parser.add_argument("--unix-mode", metavar="MODE", default=None,
                        help="a unix:/PATH LISTEN's socket file gets these permission bits, in octal "
                             "(e.g. 0660), before it accepts anyone (default: 0777 less the umask)")
    parser.add_argument("--unix-user", metavar="USER", default=None,
                        help="and this owner, a name or an id (default: gproxy's user; changing it "
                             "needs root)")
    parser.add_argument("--unix-group", metavar="GROUP", default=None,
                        help="and this group, a name or an id (default: gproxy's group)")
    parser.add_argument("--buffer-size", metavar="BYTES", default="262144",
                        help="most bytes read at once, and held for a peer that is not reading "
                             "(default 262144)")
    parser.add_argument("--drain-timeout", metavar="SECONDS", default="10",
                        help="on SIGTERM/SIGINT, let open connections finish for this long, "
                             "then abort them (default 10)")
    parser.add_argument("--no-splice", dest="splice", action="store_false",
                        help="always copy through user space instead of using splice(2)")
    parser.add_argument("--bulk-threads", metavar="N", default=None,
                        help="threads that splice bulk transfers off the event loop, so small "
                             "messages are not kept waiting (default: one per CPU, at most 8; "
                             "0: none)")
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
    parser.add_argument("--route-sni", metavar="NAME=HOST:PORT", action="append", default=None,
                        help="route a TLS client whose ClientHello names NAME (or matches *.DOMAIN: one "
                             "label) to HOST:PORT, without terminating TLS (repeatable); TARGET serves "
                             "other names, no name, and clients not speaking TLS")
    parser.add_argument("--tls-cert", metavar="FILE", action="append", default=None,
                        help="terminate TLS: clients speak TLS, gproxy presents this certificate (PEM, its "
                             "chain after it, the key too unless --tls-key); repeat for several, chosen by "
                             "the name the client asks for (SNI), the first for any other")
    parser.add_argument("--tls-key", metavar="FILE", action="append", default=None,
                        help="the private key of each --tls-cert, in the same order (default: in the "
                             "certificate's file)")
    parser.add_argument("--tls-ca", metavar="FILE", default=None,
                        help="the CAs whose client certificates --tls-verify-client accepts")
    parser.add_argument("--tls-verify-client", action="store_true", default=False,
                        help="mutual TLS: a client must present a certificate signed by --tls-ca")
    parser.add_argument("--tls-min-version", metavar="1.0|1.1|1.2|1.3", default="1.2",
                        help="the oldest TLS version a client may use (default 1.2)")
    parser.add_argument("--tls-ciphers", metavar="LIST", default=None,
                        help="OpenSSL cipher list for TLS 1.2 and older (default: OpenSSL's)")
    parser.add_argument("--tls-alpn", metavar="PROTOCOLS", default=None,
                        help="ALPN protocols to agree on with clients, comma-separated, preferred first "
                             "(\"h2,http/1.1\"; default none)")
    parser.add_argument("--tls-handshake-timeout", metavar="SECONDS", default="10",
                        help="the most a TLS handshake may take, the client's and the target's (default 10)")
    parser.add_argument("--target-tls", action="store_true", default=False,
                        help="originate TLS: speak TLS to the targets")
    parser.add_argument("--target-tls-ca", metavar="FILE", default=None,
                        help="the CAs to check the targets' certificates with (default: the system's)")
    parser.add_argument("--target-tls-server-name", metavar="NAME", default=None,
                        help="the name to ask the targets for (SNI) and check their certificates against "
                             "(default: the target's host)")
    parser.add_argument("--target-tls-cert", metavar="FILE", default=None,
                        help="a client certificate to present to the targets (PEM; the key too unless "
                             "--target-tls-key)")
    parser.add_argument("--target-tls-key", metavar="FILE", default=None,
                        help="the private key of --target-tls-cert")
    parser.add_argument("--no-target-tls-verify", dest="target_tls_verify", action="store_false",
                        help="do not check the targets' certificates (insecure; logged at start)")
    parser.add_argument("--metrics", metavar="HOST:PORT", default=None,
                        help="serve Prometheus metrics at http://HOST:PORT/metrics (default: off; "
                             "with --api they are at its /metrics too)")
    parser.add_argument("--control-socket", metavar="PATH", default=None,
                        help="listen on this Unix socket (made 0600) for a new gproxy to take the "
                             "listening sockets over (gproxy --takeover PATH): a restart that refuses "
                             "nobody (default: off)")
    parser.add_argument("--takeover", metavar="PATH", default=None,
                        help="start on the listening sockets of the gproxy whose --control-socket is "
                             "PATH, then make it stop accepting and drain its connections")
    parser.add_argument("--capture", metavar="FILE", default=None,
                        help="write what crosses the command line's rule (LISTEN TARGET) to FILE as a "
                             "pcap file, for Wireshark or tcpdump, until gproxy stops (default: off)")
    parser.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="text lines (default), or one JSON object per line for log shippers")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="log debugging detail")
    verbosity.add_argument("-q", "--quiet", action="store_true",
                           help="no line per connection, except warnings and errors")
    parser.add_argument("--workers", metavar="N|auto", default="1",
                        help="run N worker processes on the port (SO_REUSEPORT, Linux); auto: one per CPU")
    parser.add_argument("--worker-port", type=int, default=None, help=argparse.SUPPRESS)  # set for workers
    parser.add_argument("--worker-lifeline", type=int, default=None, help=argparse.SUPPRESS)  # ditto
    parser.add_argument("--worker-channel", type=int, default=None, help=argparse.SUPPRESS)  # ditto
    parser.add_argument("--worker-ids", default=None, help=argparse.SUPPRESS)  # ditto: FIRST:STEP
    parser.add_argument("--version", action="version", version=f"gproxy {__version__}")
    return parser


def build_parser() -> argparse.ArgumentParser:
    """gproxy's command line as argparse defines it: what ``main`` parses, ``--help`` prints and
    ``tools/manpage.py`` turns into the man page (docs/gproxy.1), so none can miss an option."""
    return _parser()


#: rule options whose command-line name is not theirs (``--check`` validates a file)
_FLAGS = {"check": "health_check"}


def _option_name(field: str) -> str:
    field = _FLAGS.get(field, field)
    return field.upper() if field in ("listen", "target") else "--" + field.replace("_", "-")


#: the options that make a rule: with -c they belong in the file
_RULE_OPTIONS = (
    "connect_timeout", "idle_timeout", "half_close_timeout", "backlog", "buffer_size",
    "drain_timeout", "splice", "bulk_threads", "proxy_protocol", "accept_proxy_from", "proxy_header_timeout",
    "allow", "deny", "max_connections_per_client", "balance", "max_fails", "fail_timeout",
    "max_connections", "health_check", "check_send", "check_expect", "check_http_path",
    "check_http_method", "check_http_status", "check_http_host", "check_interval", "check_timeout",
    "rise", "fall", "route_sni", *UNIX_FILE_OPTIONS, "tls_cert", "tls_key", "tls_ca", "tls_verify_client",
    "tls_min_version", "tls_ciphers", "tls_alpn", "tls_handshake_timeout", "target_tls", "target_tls_ca",
    "target_tls_server_name", "target_tls_cert", "target_tls_key", "target_tls_verify")
_KEYS = {flag: key for key, flag in _FLAGS.items()}  # argparse's names -> Forwarder keywords


def _given(argv: Optional[List[str]]) -> set:
    """The options given on this command line (not defaulted): parsed again with no defaults."""
    parser = _parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def _describe_target(target) -> str:
    """``10.0.0.5:6379``, ``10.0.0.5:6379 (weight 3)``, ``10.0.0.6:6379 (backup)``,
    ``10.0.0.7:6379 (max_connections 100)``."""
    notes = ([f"weight {target.weight}"] if target.weight != 1 else []) + (["backup"] if target.backup else []) \
        + ([f"max_connections {target.max_connections}"] if target.max_connections else [])
    return f"{target}" + (f" ({', '.join(notes)})" if notes else "")


def _load_config(args: argparse.Namespace):
    """``-c FILE``: the validated file (ConfigError naming file, rule and key)."""
    from gproxy._configfile import RELOADED_SETTINGS, load
    if args.worker_channel is not None:  # a worker: the file as its parent read it, and its ports
        config = _worker_config(args)
    else:
        config = load(args.config)
    for key, value in config.settings.items():
        if key in RELOADED_SETTINGS:
            continue  # the FileService's own
        if not hasattr(args, key) and (key, value) != ("log_format", "text"):
            # a key the file format knows and this command does not (yet)
            raise ConfigError(f"{args.config}: {key}", "not supported by this gproxy")
        setattr(args, key, value)  # the file's process-wide settings, for whoever reads args
    return config


def _worker_config(args: argparse.Namespace, message: Optional[dict] = None):
    """A worker's rules: the config text its parent validated (never the file as it is on disk
    now, which may have changed or broken since), each rule on the port the parent holds
    for it, with SO_REUSEPORT. ``message``: a reload's; default, the first one on the link."""
    import dataclasses as dc

    from gproxy._configfile import parse
    from gproxy.config import Address
    if message is None:
        message = args.worker_start[0]
    text, ports = message["text"], {name: int(port) for name, port in message["ports"].items()}
    config = parse(text, args.config)
    for name, port in ports.items():
        rule = config.rules[name]
        assert isinstance(rule.listen, Address)  # the parent refuses Unix sockets
        listen = Address(rule.listen.host, port)
        config.options[name]["listen"] = str(listen)
        config.options[name]["reuse_port"] = True
        config.rules[name] = dc.replace(rule, listen=listen, reuse_port=True)
    return config


class _Single:
    """One forwarder (LISTEN TARGET), bound on this thread's hub: the CLI is its own loop."""

    def __init__(self, forwarder: Forwarder):
        self.forwarder = forwarder

    def start(self) -> None:
        self.forwarder.start_here()

    def serve_forever(self) -> None:
        self.forwarder.serve_forever()

    def stop(self) -> None:
        self.forwarder.stop()

    def statistics(self) -> Statistics:
        return self.forwarder.statistics()


class _ApiServer:
    """``--api``: the HTTP API and the proxies it makes (the command line's rule among them)
    on this thread's hub, served and stopped as one."""

    def __init__(self, api: str, name: str, forwarder: Optional[Forwarder], options: dict,
                 files: Any = None, toxiproxy_config: Optional[str] = None):
        from gproxy._api import Api
        from gproxy.service import Service

        self.files = files  # a FileService (-c): the API then sees and changes the file's rules
        self.service = files.service if files is not None else Service(**options)
        self.api = Api(self.service, api)
        self.listener = None  # a socket systemd passed for the API, to serve on
        self.api.mount("GET", "/metrics", metrics.route(self.service.items))
        if forwarder is not None:
            self.service.add(name, forwarder, start=False)
        self.populate: Optional[Tuple[str, list]] = None   # --toxiproxy-config: (file, its proxies)
        if toxiproxy_config is not None:
            self.populate = (toxiproxy_config, self._read(toxiproxy_config, name if forwarder else None))

    def _read(self, path: str, own: Optional[str]) -> list:
        """The file's proxies, checked as populate checks them (ConfigError naming file and entry),
        none named as a rule of the config file or the command line: populate would replace it."""
        from gproxy._api import read_toxiproxy_config
        specs = read_toxiproxy_config(path)

        def where(index: int, name: Any) -> str:
            return f"{path}: proxy {index + 1} ({json.dumps(name)}): " if name is not None \
                else f"{path}: proxy {index + 1}: "
        self.service.check_populate(specs, where)
        for index, spec in enumerate(specs):
            if spec["name"] == own:
                raise ConfigError(f"{where(index, own)}name", "the command line's rule has it (--name)")
            if self.files is not None and spec["name"] in self.files.config.rules:
                raise ConfigError(f"{where(index, spec['name'])}name", f"a rule of {self.files.path} has it")
        return specs

    def start(self) -> None:
        if self.files is not None:
            self.files.start(here=True)
        else:
            self.service.start()
        if self.populate is not None:   # before the API answers: its clients find them there
            path, specs = self.populate
            try:
                self.service.populate(specs)
            except OSError as exc:
                raise OSError(exc.errno, f"{path}: {exc.strerror or exc}") from None
            log.info("created %d proxies from %s (toxiproxy-server's -config)", len(specs), path)
        self.api.start(self.listener)

    def serve_forever(self) -> None:
        if self.files is not None:
            self.files.serve_forever()
        else:
            self.service.serve_forever()

    def stop(self) -> None:
        self.api.stop()
        if self.files is not None:
            self.files.stop()
        else:
            self.service.stop()

    def statistics(self) -> Statistics:
        """Every proxy's statistics, added up."""
        return self.service.statistics()


def main(argv: Optional[List[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    config = None
    if args.worker_channel is not None:  # a worker: its listening sockets, and -c's text, first
        from gproxy._workerlink import read_start
        try:
            args.worker_start = read_start(args.worker_channel)
        except (OSError, ValueError) as exc:
            return _fail(1, f"worker: {exc}")
    if args.worker_ids is not None:  # a worker: its connection ids interleave with its siblings'
        from gproxy.relay import number_ids
        first, step = (int(part) for part in args.worker_ids.split(":"))
        number_ids(first, step)
    if args.config is not None or args.check:
        if args.config is None:
            parser.error("--check validates a config file: give -c FILE")
        if args.listen is not None:
            parser.error("give LISTEN TARGET or -c FILE, not both")
        in_file = sorted(_given(argv) & set(_RULE_OPTIONS))
        if in_file:
            parser.error(f"{_option_name(in_file[0])}: with -c, rule options go in the file "
                         "(a rule, or [defaults])")
        try:
            config = _load_config(args)
        except ConfigError as exc:
            print(f"gproxy: error: {exc}", file=sys.stderr)
            return 2
        if args.check:
            print(f"{args.config}: OK, {len(config.rules)} rule(s)")
            for name, rule in config.rules.items():
                targets = ", ".join(_describe_target(t) for t in rule.target_list) or "a function"
                balance = f" ({rule.balance})" if len(rule.targets) > 1 else ""
                check = f", {rule.check} check every {rule.check_interval:g}s" if rule.check else ""
                routes = "".join(f", sni {route} -> {endpoint}" for route, endpoint in rule.route_sni or ())
                toxics = ", ".join(toxic.name for toxic in config.toxics.get(name, ()))
                said = check + routes + (f", toxics: {toxics}" if toxics else "")
                print(f"  {name}: {rule.listen}{_file_access(rule)} -> {targets}{balance}{said}")
            return 0
    elif not args.target and (args.listen is not None or args.api is None):
        parser.error("the following arguments are required: " + ("TARGET" if args.listen else "LISTEN, TARGET"))
    options = {_KEYS.get(name, name): getattr(args, name) for name in _RULE_OPTIONS if name != "max_connections"}
    if args.max_connections is not None:
        options["max_connections"] = args.max_connections
    args.config_file = config
    workers = _workers_count(args)
    if isinstance(workers, str):
        return _fail(2, workers)
    worker = args.worker_channel is not None
    if worker:
        options["reuse_port"] = True
        args.metrics = None  # the parent serves the one page, summed over the workers

    # Before the Forwarder: building it may warn (a low fd limit, for one).
    handler = _StderrLog()
    # a worker's lines say whose they are: all workers write to the one stderr
    handler.setFormatter(JsonFormatter(pid=worker) if args.log_format == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s " + ("[%(process)d] " if worker else "") + "%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if args.quiet:  # no line per connection; the listening and stopping lines stay
        logging.getLogger("gproxy.relay").setLevel(logging.WARNING)
    try:
        if workers > 1 and args.capture is not None:
            return _fail(2, "--capture: not with --workers (each worker would write the file)")
        if workers > 1:
            return _supervise(args, options, workers, sys.argv[1:] if argv is None else list(argv))
        return _run(args, options)
    finally:
        log.removeHandler(handler)
        handler.close()


def _file_access(rule) -> str:
    """`` (mode 0660, user redis, group redis)`` for a socket file given any of them."""
    given = [text for text, value in ((f"mode {rule.unix_mode or 0:04o}", rule.unix_mode),
                                      (f"user {rule.unix_user}", rule.unix_user),
                                      (f"group {rule.unix_group}", rule.unix_group)) if value is not None]
    return f" ({', '.join(given)})" if given else ""


def _workers_count(args: argparse.Namespace):
    """``--workers``: the count, or the one-line error (a str)."""
    value = args.workers.strip()
    if value == "auto":
        from gproxy._supervisor import auto_count
        count = auto_count()
    elif value.isascii() and value.isdigit() and 1 <= int(value) <= 1024:
        count = int(value)
    else:
        return f"--workers: expected a count from 1 to 1024 or auto, got {args.workers!r}"
    if count > 1:
        if not sys.platform.startswith("linux"):
            return "--workers: several workers need Linux's SO_REUSEPORT; run one gproxy per port elsewhere"
        # The API changes one process's proxies at run time; each worker would serve its own
        # (a toxic would reach the clients of one worker in N): refused rather than half working.
        # A takeover and a control socket hand one process's sockets over.
        for given, why in ((args.api, "--api (the API changes one process's proxies: run one process "
                                      "for toxics and run-time changes)"),
                           (args.control_socket, "--control-socket (a takeover hands one process's sockets "
                                                 "over)"),
                           (args.takeover, "--takeover (a takeover hands one process's sockets over)")):
            if given is not None:
                return f"--workers: not with {why}; use one process"
        if args.listen is not None and args.listen.strip().startswith("unix:"):
            return "--workers: a Unix socket cannot be shared with SO_REUSEPORT; use one process"
    return count


def _supervise(args: argparse.Namespace, options: dict, count: int, argv: List[str]) -> int:
    """``--workers N``: validate here, reserve the ports, run and supervise N workers."""
    from gproxy import _supervisor
    if os.environ.get("LISTEN_PID") == str(os.getpid()):
        return _fail(2, "--workers: not with sockets systemd passed (LISTEN_FDS): each worker binds its own")
    reserved = None
    if args.config is None:
        target = args.target[0] if len(args.target) == 1 else args.target
        try:
            rule = Forwarder(args.listen, target, **options).rule
        except ConfigError as exc:
            return _bad_option(exc)
        try:
            reserved = _supervisor.reserve(rule)
        except OSError as exc:
            return _fail(1, exc.strerror or str(exc))
        if args.metrics is not None:
            try:
                parse_tcp_address(args.metrics, "metrics")
            except ConfigError as exc:
                reserved.close()
                return _bad_option(exc)
    port = single = None
    if reserved is not None:
        from gproxy.config import Address
        port = reserved.getsockname()[1]
        assert isinstance(rule.listen, Address)  # a Unix socket is refused with --workers
        single = dataclasses.replace(rule, listen=Address(rule.listen.host, port), reuse_port=True)

    def announce(rules: dict, ports: dict) -> None:
        if reserved is not None:
            log.info("listening on %s -> %s with %d workers", _sockets.describe_address(reserved.getsockname()),
                     ",".join(args.target), count)
        for name, rule in rules.items():
            listen = _sockets.describe_address((rule.listen.host, ports[name]))
            targets = ",".join(str(t) for t in rule.target_list) or "a function"
            log.info("listening on %s -> %s (rule %s) with %d workers", listen, targets, name, count)

    supervisor = _supervisor.Supervisor(
        lambda _index, lifeline, channel, ids: _supervisor.worker_argv(argv, port, lifeline, channel, ids), count,
        config=args.config, metrics=args.metrics, single=single, announce=announce)
    try:
        supervisor.start_links()
    except ConfigError as exc:
        if reserved is not None:
            reserved.close()
        return _fail(2, str(exc))
    except OSError as exc:
        if reserved is not None:
            reserved.close()
        return _fail(1, exc.strerror or str(exc))
    try:
        return supervisor.run()
    finally:
        if reserved is not None:
            reserved.close()


def _run(args: argparse.Namespace, options: dict) -> int:
    files: Optional[FileService] = None
    forwarder: Union[FileService, _Single, _ApiServer, None]
    try:
        if args.config_file is not None:
            from gproxy._fileservice import FileService
            files = FileService(args.config, args.config_file)
            forwarder = files
        else:
            target = args.target[0] if len(args.target) == 1 else args.target
            listen = args.listen
            if args.worker_port is not None:  # a worker: the port its parent reserved
                listen = (parse_tcp_address(listen, "listen").host, args.worker_port)
            forwarder = _Single(Forwarder(listen, target, **options)) if args.listen is not None else None
        if args.capture is not None:
            _capture(args, forwarder)
        if args.api is not None:
            single = forwarder.forwarder if isinstance(forwarder, _Single) else None
            if single is None:
                for key in UNIX_FILE_OPTIONS:
                    if options.get(key) is not None:
                        raise ConfigError(key, "only with a LISTEN that is a Unix socket file (unix:/PATH)")
            # the API's proxies take the command line's options as defaults, but not a socket
            # file's: they are the LISTEN's own
            defaults = {key: value for key, value in options.items() if key not in UNIX_FILE_OPTIONS}
            try:
                forwarder = _ApiServer(args.api, args.name, single, defaults, files=files,
                                       toxiproxy_config=args.toxiproxy_config)
            except ConfigError as exc:
                if args.toxiproxy_config is not None and str(exc).startswith(args.toxiproxy_config + ": "):
                    return _fail(2, str(exc))   # the JSON file's: named by its path, not as an option
                raise
        elif args.toxiproxy_config is not None:
            raise ConfigError("toxiproxy_config", "needs --api")
        if args.metrics is not None:
            parse_tcp_address(args.metrics, "metrics")
    except ConfigError as exc:
        return _bad_option(exc)
    assert forwarder is not None  # main() takes no LISTEN only with --api
    taking = None
    if args.takeover is not None:
        from gproxy import _handover as handover
        try:
            taking = handover.take(args.takeover)
        except OSError as exc:
            return _fail(1, f"cannot take over from {args.takeover}: {exc.strerror or exc}")
    try:
        passed, taken = _activation(args, files, forwarder, taking)
    except ConfigError as exc:  # LISTEN_FDS and friends, or a socket nobody would serve
        return _fail(2, str(exc))
    if args.worker_channel is not None:
        _take_parents_sockets(args, forwarder, files)
    handed = False  # this process handed its sockets over: it only drains now
    control: Any = None  # the control socket's server (control_socket), once listening

    signals = 0

    worker = args.worker_channel is not None

    def on_signal_to_stop() -> None:
        if worker and signals:
            # the parent forwards a stop, and systemd or a terminal may signal the whole group
            # as well: a worker drains once, and only its parent (a second signal to it) aborts
            log.debug("already stopping: a worker aborts only when its --workers parent says so")
            return
        on_stop()

    def on_stop() -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            _systemd.notify("STOPPING=1")
            if control is not None:
                control.close()  # a process that stops has no sockets left to hand over
        if signals == 2:
            log.warning("second signal: stopping now")
        gevent.spawn(forwarder.stop)

    def on_statistics() -> None:
        stats = dataclasses.asdict(forwarder.statistics())
        log.info("statistics: %s", ", ".join(f"{name} {value}" for name, value in stats.items()))

    def reload() -> None:
        if handed:
            log.info("SIGHUP: not reloading, the listening sockets were handed over to another gproxy")
            return
        _systemd.reloading()
        assert files is not None  # on_reload spawns this only with a config file
        try:
            files.reload()
        except Exception:  # a bug: said once, with its traceback, and the old rules stay
            log.exception("reload of %s failed", args.config)
        finally:
            _systemd.notify("READY=1")

    # the command line's rule: SIGHUP reads its TLS files again (stunnel's and ghostunnel's way)
    cli_rule = forwarder.forwarder if isinstance(forwarder, _Single) else None

    def on_reload() -> None:
        if worker:
            log.info("SIGHUP ignored: a worker reloads when its --workers parent does (send SIGHUP to it)")
        elif files is None and cli_rule is not None and (cli_rule.rule.tls_cert or cli_rule.rule.target_tls):
            log.info("SIGHUP: reading the TLS certificate files again")
            gevent.spawn(cli_rule.reload_certificates)
        elif files is None:
            log.info("SIGHUP: nothing to reload (gproxy takes its rule from the command line)")
        elif not signals:  # stopping: too late to reload
            log.info("SIGHUP: reading %s again", args.config)
            gevent.spawn(reload)

    def ignored(name: str):
        return lambda: log.info("%s ignored (SIGTERM or SIGINT stops gproxy)", name)

    # Kept until the process exits: a late SIGTERM while we wind down must not kill us.
    handlers = {"SIGTERM": on_signal_to_stop, "SIGINT": on_signal_to_stop, "SIGUSR1": on_statistics,
                "SIGHUP": on_reload, "SIGUSR2": ignored("SIGUSR2"), "SIGALRM": ignored("SIGALRM")}
    for name, handle in handlers.items():
        signum = getattr(signal, name, None)  # Windows has only some of them
        if signum is not None:
            gevent.signal_handler(signum, handle)
    metrics_server = None

    def offer() -> list:
        return _offered(args, forwarder, metrics_server, control)

    def handed_over(pid) -> None:
        nonlocal handed
        handed = True
        _systemd.hand_over()  # the new process is the service's main one now (it sent MAINPID=)
        timeout = files.config.settings.get("reload_drain_timeout") if files is not None else None
        log.info("pid %s accepts on the listening sockets now: this process stops accepting, its "
                 "connections drain %s", pid, "until they end" if timeout is None else f"for up to {timeout:g}s")
        control.close()
        if metrics_server is not None:
            gevent.spawn(metrics_server.stop, 1)
        if isinstance(forwarder, _ApiServer):
            gevent.spawn(forwarder.api.stop)
        gevent.spawn(_drain_and_stop, forwarder, timeout)

    try:
        if args.control_socket is not None:
            from gproxy import _handover as handover
            control = handover.ControlServer(args.control_socket, offer, handed_over, listener=(
                passed.lend_socket(taken["control"]) if "control" in taken else None)).listen()
        if args.metrics is not None:
            if isinstance(forwarder, _Single):
                def sources():  # read when scraped
                    return [forwarder.forwarder]
            else:
                sources = forwarder.service.items
            metrics_server = metrics.serve(args.metrics, sources, listener=passed.lend_socket(taken["metrics"])
                                           if "metrics" in taken else None)
            log.info("metrics on http://%s/metrics", _sockets.describe_address(metrics_server.address))
        if files is not None and forwarder is files:
            files.start(here=True)
        else:
            forwarder.start()
    except ConfigError as exc:  # found only once bound, such as a target that is our own address
        if metrics_server is not None:
            metrics_server.stop(timeout=1)
        if files is not None:
            return _fail(2, str(exc))
        return _bad_option(exc)
    except OSError as exc:
        if metrics_server is not None:
            metrics_server.stop(timeout=1)
        return _fail(1, exc.strerror or str(exc))
    except BaseException:
        if metrics_server is not None:
            metrics_server.stop(timeout=1)
        raise
    if taking is not None:
        try:
            old = taking.confirm()
        except OSError as exc:  # serving already: the old one may still accept beside us
            log.warning("took the listening sockets over from %s, but it did not confirm that it stops "
                        "accepting: %s", args.takeover, exc.strerror or exc)
        else:
            log.info("took %d listening socket(s) over from pid %d, which stops accepting and drains",
                     len(taking.sockets), old)
    if control is not None:
        control.start()
    if args.worker_lifeline is not None:
        from gproxy._supervisor import watch_lifeline

        def on_supervisor_gone() -> None:
            if not signals:  # already stopping: the drain goes on
                log.warning("the --workers supervisor has exited: stopping, as on SIGTERM")
                on_stop()

        watch_lifeline(args.worker_lifeline, on_supervisor_gone)
    link = None
    if worker:
        def abort_now() -> None:  # the parent got a second signal
            while signals < 2:
                on_stop()

        link = _serve_link(args, forwarder, files, abort_now)
    try:
        # every listener is bound; after a takeover this process is the service's main one
        # (systemd needs NotifyAccess=all to take that from a process it did not start).
        # A worker has no NOTIFY_SOCKET: its parent speaks for all of them.
        _systemd.notify(f"MAINPID={os.getpid()}\nREADY=1" if taking is not None else "READY=1")
        forwarder.serve_forever()
    finally:
        if metrics_server is not None:
            metrics_server.stop(timeout=1)
        if link is not None:
            link.last_words()
    return 0


def _take_parents_sockets(args: argparse.Namespace, forwarder: Any, files: Any) -> None:
    """A worker serves on the listening sockets its parent made for it (and keeps a copy of,
    so that its queue outlives it); a rule it was given none for binds its own."""
    from gproxy.listeners import Passed
    entries = args.worker_start[1]
    if isinstance(forwarder, _Single):
        for fd, _name, _spec in entries[1:]:
            os.close(fd)
        if entries:
            forwarder.forwarder.inherit_socket(entries[0][0], "parent")
    elif files is not None:
        passed = files.service.passed = Passed()
        passed.add_handed_over(entries, origin="parent")


class _Link:
    """A worker's end of the link to its ``--workers`` parent (:mod:`gproxy._workerlink`)."""

    def __init__(self, sock, sources):
        from gevent.lock import Semaphore
        self.sock = sock
        self.sources = sources
        self.writing = Semaphore()

    def tell(self, message: dict) -> None:
        from gproxy._workerlink import send
        try:
            with self.writing:
                send(self.sock, message)
        except OSError:
            pass  # the parent is gone: the lifeline stops this worker

    def last_words(self) -> None:
        """Stopped: the counters as they end, so that the parent's sums lose nothing of them."""
        from gproxy._workerlink import snapshot
        self.tell({"op": "final", "metrics": snapshot(self.sources())})


def _serve_link(args: argparse.Namespace, forwarder: Any, files: Any, abort_now: Callable[[], None]) -> _Link:
    """In a worker, once it accepts: say so to the parent, then answer it (metrics snapshots,
    reloads, an abort) from a greenlet of its own, off the forwarding path."""
    from gproxy import _workerlink
    if isinstance(forwarder, _Single):
        def sources() -> list:
            return [forwarder.forwarder]
    else:
        sources = forwarder.service.items
    link = _Link(_workerlink.open_link(args.worker_channel), sources)

    def metrics_snapshot(_message: dict) -> dict:
        hub = gevent.get_hub()
        return {"metrics": _workerlink.snapshot(sources(), pace=lambda: metrics._loop_pass(hub))}

    def reload(message: dict) -> dict:
        if files is None:
            return {"reloaded": False}
        try:
            config = _worker_config(args, message)
        except ConfigError as exc:  # the parent validated the very same text: not expected
            log.error("reload failed, the running configuration stays: %s", exc)
            return {"reloaded": False}
        return {"reloaded": files.reload(config)}

    def abort(_message: dict) -> None:
        abort_now()

    def listeners(message: dict) -> None:
        """A reload's new listening sockets, ahead of it."""
        entries = _workerlink.listeners_of(message)
        passed = files.service.passed if files is not None else None
        if passed is None:
            for fd, _name, _spec in entries:
                os.close(fd)
        else:
            passed.add_handed_over(entries, origin="parent")

    link.tell({"op": "ready"})
    gevent.spawn(_workerlink.serve, link.sock, {"metrics": metrics_snapshot, "reload": reload, "abort": abort,
                                                "listeners": listeners}, link.writing)
    return link


def _activation(args: argparse.Namespace, files: Any, forwarder: Any, taking: Any = None):
    """Listening sockets given to this process: systemd's (socket activation, ``$LISTEN_FDS``)
    and those a running gproxy hands over (``--takeover``), each matched to a rule, or to the
    metrics, API or control port (by name, ``metrics``/``api``/``control``, or address), and
    handed to whoever serves there. ``(passed, {name: index})``, or ``(None, {})`` without
    any. A socket systemd passed that nobody takes is a ``ConfigError``: systemd keeps it
    open, so its clients would queue for ever unserved. One handed over that nobody takes
    (its rule is gone) is closed: its port closes when the old process stops accepting."""
    from gproxy.listeners import Passed
    passed = Passed.from_systemd()
    if taking is not None:
        passed = passed or Passed()
        try:
            passed.add_handed_over([(entry["fd"], entry["name"], entry["listen"]) for entry in taking.sockets])
        except ConfigError:
            passed.close()
            raise
    if passed is None:
        return None, {}
    try:
        service = files.service if files is not None else getattr(forwarder, "service", None)
        single = forwarder.forwarder if isinstance(forwarder, _Single) else None
        if files is not None:
            rules = dict(files.config.rules)
        elif service is not None:
            rules = {name: fw.rule for name, fw in service.items()}
        else:
            rules = {args.name: single.rule} if single is not None else {}
        extra: Dict[str, Endpoint] = {key: parse_tcp_address(value, key)
                 for key, value in (("metrics", args.metrics), ("api", args.api))
                 if value is not None}
        if args.control_socket is not None:
            extra["control"] = parse_address("unix:" + args.control_socket, "control_socket")
        taken = passed.match(rules, extra)
        for left in passed.unused(taken):
            if left.origin == "handover":
                log.info("not taking over %s: no rule listens there now; it closes when pid %s stops "
                         "accepting", left, taking.pid)
                passed.discard(left)
        unused = passed.unused(taken)
        if unused:
            raise ConfigError("LISTEN_FDS", f"systemd passed {unused[0]}, which no rule listens on: give a "
                                            "rule that listen address, or the socket a rule's name "
                                            "(FileDescriptorName=)")
    except BaseException:
        passed.close()
        raise
    for key in extra:
        if key in taken:
            passed.reserve(key, taken[key])
    if service is not None:
        service.passed = passed
        if "api" in taken:
            forwarder.listener = passed.lend_socket(taken["api"])
    elif single is not None and args.name in taken:
        passed.give(taken[args.name], single)
    return passed, taken


def _offered(args: argparse.Namespace, forwarder: Any, metrics_server: Any, control: Any) -> list:
    """Every listening socket this process has, for a takeover (:mod:`gproxy._handover`)."""
    from gproxy._handover import Offered
    service = getattr(forwarder, "service", None)
    if service is not None:
        rules = service.items()
    else:
        rules = [(args.name, forwarder.forwarder)] if isinstance(forwarder, _Single) else []
    offered = [Offered("rule", name, str(fw.rule.listen), fd) for name, fw in rules
               for fd in [fw.listening_fileno()] if fd is not None]
    if metrics_server is not None and metrics_server.socket is not None:
        offered.append(Offered("metrics", "metrics", str(parse_address(args.metrics, "metrics")),
                               metrics_server.socket.fileno()))
    api_fd = forwarder.api.listening_fileno() if isinstance(forwarder, _ApiServer) else None
    if api_fd is not None:
        offered.append(Offered("api", "api", str(forwarder.api.listen), api_fd))
    if control is not None and control.socket is not None:
        offered.append(Offered("control", "control", f"unix:{args.control_socket}", control.fileno()))
    return offered


def _drain_and_stop(forwarder: Any, timeout: Optional[float]) -> None:
    """After a handover: every rule's connections drain as a reload's old ones do (until they
    end, or ``timeout``), then the process stops; a SIGTERM meanwhile ends them sooner."""
    service = getattr(forwarder, "service", None)
    if service is not None:
        service.hand_over(timeout)
    elif isinstance(forwarder, _Single):
        forwarder.forwarder.release_listener()
        forwarder.forwarder.retire(timeout)
    forwarder.stop()


def _capture(args: argparse.Namespace, forwarder: Any) -> None:
    """``--capture FILE``: the command line's rule captures from its start (docs/toxics.md#captures)."""
    if not isinstance(forwarder, _Single):
        raise ConfigError("capture", "captures the command line's rule: give LISTEN TARGET "
                          "(for a config file's or the API's rules, see POST /proxies/NAME/capture)")
    try:
        forwarder.forwarder.capture(args.capture)
    except OSError as exc:
        raise ConfigError("capture", f"cannot write {args.capture}: {exc.strerror or exc}") from None


def _bad_option(exc: ConfigError) -> int:
    """Exit 2 with the ConfigError told the command line's way (``--idle-timeout: ...``)."""
    return _fail(2, f"{_option_name(exc.field)}: {str(exc).split(': ', 1)[-1]}")


def _fail(code: int, message: str) -> int:
    """One line on stderr after what the log queue holds, and the exit status."""
    for handler in log.handlers:
        if isinstance(handler, _StderrLog):
            log.removeHandler(handler)
            handler.close()
    print(f"gproxy: error: {message}", file=sys.stderr)
    return code
