#!/usr/bin/env python3
"""The textbook gevent TCP forwarder: the baseline gproxy is compared with.

    python benchmarks/naive_forwarder.py LISTEN TARGET

LISTEN and TARGET are HOST:PORT; port 0 in LISTEN picks a free port. On start
it prints ``listening on HOST:PORT -> TARGET`` on stderr (the bound port),
like gproxy. SIGTERM stops it with exit status 0.

Per client: ``gevent.socket.create_connection(target)``, then two greenlets
(the server's handler greenlet and one spawned greenlet), each doing
``data = src.recv(65536); dst.sendall(data)`` until recv returns b'', then
``dst.shutdown(SHUT_WR)``. Nothing clever: no buffer reuse, no splice, no
timeouts. That is the point.
"""

import argparse
import signal
import socket
import sys

import gevent
from gevent.server import StreamServer
from gevent.socket import create_connection

BUFSIZE = 65536


def parse_addr(text):
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError("expected HOST:PORT, got %r" % text)
    return (host.strip("[]") or "127.0.0.1", int(port))


def pipe(src, dst):
    try:
        while True:
            data = src.recv(BUFSIZE)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def make_handler(target):
    def handle(client, _addr):
        try:
            upstream = create_connection(target)
        except OSError:
            client.close()
            return
        other = gevent.spawn(pipe, upstream, client)
        try:
            pipe(client, upstream)
            other.join()
        finally:
            client.close()
            upstream.close()

    return handle


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("listen", type=parse_addr)
    ap.add_argument("target", type=parse_addr)
    ap.add_argument("-q", "--quiet", action="store_true", help="accepted for CLI compatibility")
    args = ap.parse_args(argv)

    server = StreamServer(args.listen, make_handler(args.target))
    server.start()
    gevent.signal_handler(signal.SIGTERM, server.stop)
    gevent.signal_handler(signal.SIGINT, server.stop)
    host, port = server.address[:2]
    print("listening on %s:%d -> %s:%d" % (host, port, args.target[0], args.target[1]),
          file=sys.stderr, flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
