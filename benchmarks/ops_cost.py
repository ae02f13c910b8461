"""What issue 9's options cost per connection: access checks, PROXY headers, counters, JSON lines.

    python benchmarks/ops_cost.py

Times the exact code each option adds to a connection's life (the functions relay calls),
single-threaded, median of several runs, in microseconds per connection. Compare with
gproxy's whole cost per connection in benchmarks/README.md (redis_conn: about 300 us of CPU
per connection on the reference machine). A rule without these options pays only two
``is not None`` tests, the first line below.
"""

from __future__ import annotations

import logging
import os
import platform
import socket
import statistics
import sys
import timeit

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from gproxy import _proxyproto  # noqa: E402
from gproxy._access import Access, client_key  # noqa: E402
from gproxy._jsonlog import JsonFormatter  # noqa: E402
from gproxy.config import Rule  # noqa: E402
from gproxy.stats import Counters, Outcome  # noqa: E402


def per_call(fn, number: int = 20000, repeat: int = 7) -> float:
    return statistics.median(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def main() -> None:
    rows = []

    class Ctx:
        access = None
        accept_proxy = None
    ctx = Ctx()

    def plain_checks():
        if ctx.accept_proxy is not None:
            pass
        if ctx.access is not None:
            pass
    rows.append(("rule without these options: the two checks", per_call(plain_checks, 200000)))

    rule = Rule.build("127.0.0.1:0", "127.0.0.1:1", allow=["10.0.0.0/8", "127.0.0.0/8"], deny=["10.9.0.0/16"])
    access = Access.from_rule(rule)
    peer = ("127.0.0.1", 50412)
    rows.append(("allow (2 networks) + deny (1)", per_call(lambda: access.admit(client_key(peer)))))
    limited = Access.from_rule(Rule.build("127.0.0.1:0", "127.0.0.1:1", max_connections_per_client=10**9))

    def admit_release():
        _, key = limited.admit(client_key(peer))
        limited.release(key)
    rows.append(("max_connections_per_client (admit + release)", per_call(admit_release)))

    a, b = socket.socketpair()
    listener_side = socket.socket()
    listener_side.bind(("127.0.0.1", 0))

    for version in (1, 2):
        rows.append((f"proxy_protocol v{version}: getsockname + encode (then one send)",
                     per_call(lambda version=version:
                              _proxyproto.encode(version, peer, listener_side.getsockname()))))
    for version in (1, 2):
        header = _proxyproto.encode(version, ("192.0.2.7", 50312), ("198.51.100.1", 443))
        rows.append((f"accept_proxy_from, v{version} header: header_size + parse"
                     " (after one peek, before one recv)",
                     per_call(lambda header=header: _proxyproto.parse(header[:_proxyproto.header_size(header)]))))

    def syscalls():
        a.send(b"x" * 50)
        b.recv(50, socket.MSG_PEEK)
        b.recv(50)
    rows.append(("for scale: one send, one peek and one recv of 50 bytes (socketpair)", per_call(syscalls)))

    counters = Counters()

    def count_close():
        counters.connected("127.0.0.1:5432", True)
        counters.active += 1
        counters.ended(Outcome.EOF, 0.0123, 517, 88211)
    rows.append(("counters for metrics (always on): connect + teardown", per_call(count_close)))

    record = logging.LogRecord("gproxy.relay", logging.INFO, __file__, 1,
                               "conn#%d %s -> %s %s%s, %.3fs, up %d B, down %d B",
                               (1, "127.0.0.1:50412", "127.0.0.1:5432", Outcome.EOF, "", 3.574, 1532, 88211), None)
    record.connection = {"rule": "127.0.0.1:8080", "id": 1, "client": "127.0.0.1:50412",
                         "target": "127.0.0.1:5432",
                         "outcome": "eof", "duration": 3.574, "bytes_upstream": 1532, "bytes_downstream": 88211}
    text, json_ = logging.Formatter("%(asctime)s %(levelname)s %(message)s"), JsonFormatter()
    rows.append(("a connection's log line, text formatter", per_call(lambda: text.format(record))))
    rows.append(("a connection's log line, JSON formatter", per_call(lambda: json_.format(record))))

    print(f"# per-connection cost of the operations options; Python {platform.python_version()}, "
          f"{platform.machine()}, {os.cpu_count()} CPUs")
    print()
    print("| what | us per connection |")
    print("|---|---|")
    for name, us in rows:
        print(f"| {name} | {us:.2f} |")


if __name__ == "__main__":
    main()
