"""Python calls per connection and per request of gproxy checkouts, counted by cProfile: no clock.

    python benchmarks/call_count.py --gproxy before=/path/to/old --gproxy after=.
    python benchmarks/call_count.py --gproxy after=. -- --allow 127.0.0.1   # the greenlet path

CPU figures on a shared machine move by 10 % from run to run; the number of Python calls a
connection costs does not, and it is what a change to the connection's code changes. Each
checkout runs as ``python -m cProfile -m gproxy -q [ARGS] 127.0.0.1:0 ECHO`` in front of an echo
server in this process; a client makes ``--conns`` connections with one 64-byte round trip
each, then (a second run) as many connections with ``--requests`` round trips each; gproxy is
stopped with SIGTERM and cProfile's total call count read. Per connection: the difference
between ``--conns`` and twice as many connections, divided by ``--conns``, so start-up and
shutdown cancel out; per further request likewise. Only the main thread is counted (the
CLI's hub runs there; bulk lanes, which this does not use, would not be).
"""

from __future__ import annotations

import argparse
import os
import pstats
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading


def _echo_server() -> socket.socket:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(512)

    def echo(sock):
        with sock:
            while True:
                data = sock.recv(65536)
                if not data:
                    return
                sock.sendall(data)

    def serve():
        while True:
            try:
                sock, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=echo, args=(sock,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return server


def calls(checkout: str, target, conns: int, requests: int, extra) -> int:
    """cProfile's total call count of one gproxy run serving ``conns`` connections."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "gproxy.prof")
        proc = subprocess.Popen(
            [sys.executable, "-m", "cProfile", "-o", out, "-m", "gproxy", "-q", *extra, "127.0.0.1:0",
             "%s:%d" % target], cwd=checkout, env=dict(os.environ, PYTHONPATH=checkout),
            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            match = re.search(r"listening on \S+:(\d+)", proc.stderr.readline())
            assert match, "gproxy did not say where it listens"
            for _ in range(conns):
                client = socket.create_connection(("127.0.0.1", int(match.group(1))), timeout=20)
                for _ in range(requests):
                    client.sendall(b"x" * 64)
                    got = 0
                    while got < 64:
                        got += len(client.recv(64))
                client.shutdown(socket.SHUT_WR)
                assert client.recv(1) == b""
                client.close()
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        return pstats.Stats(out).total_calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gproxy", action="append", metavar="NAME=CHECKOUT",
                        help="a gproxy checkout (default: this one, as 'gproxy')")
    parser.add_argument("--conns", type=int, default=500)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("extra", nargs="*", help="gproxy options, after --")
    args = parser.parse_args()
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    checkouts = [spec.split("=", 1) for spec in args.gproxy or [f"gproxy={here}"]]
    server = _echo_server()
    target = server.getsockname()
    n, r = args.conns, args.requests
    print(f"Python calls (cProfile), {n} and {2 * n} connections; gproxy options: {' '.join(args.extra) or '-q'}")
    for name, checkout in checkouts:
        one, two = (calls(checkout, target, k, 1, args.extra) for k in (n, 2 * n))
        many = calls(checkout, target, n, r, args.extra)
        per_conn = (two - one) / n
        per_request = (many - one) / (n * (r - 1))
        print(f"  {name:14} {per_conn:6.1f} per connection (one round trip)   "
              f"{per_request:5.1f} per further round trip")


if __name__ == "__main__":
    main()
