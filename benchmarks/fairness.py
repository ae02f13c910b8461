#!/usr/bin/env python3
"""Fairness peers for bench.py: 64-byte ping-pong latency while a bulk stream shares the forwarder.

    python benchmarks/fairness.py server PORT            # serves on 127.0.0.1:PORT until killed
    python benchmarks/fairness.py client PORT SECONDS    # prints one JSON line of results

The server forks a process per connection, so neither side's endpoints share an
interpreter (no GIL between the bulk stream and the pings): the first byte a
client sends picks its role, ``B`` for an unpaced bulk stream (server -> client,
1 MiB ``sendall`` in a loop) or ``P`` for an echo. The client forks a puller that
sends ``B`` and reads as fast as it can; once bytes flow, the parent times 64-byte
round trips on a second connection for SECONDS, then stops the puller. Latencies
are whole round trips (not halved as sockperf reports them), measured with
``perf_counter_ns`` around ``sendall`` + reading 64 bytes back.
"""

import json
import os
import select
import signal
import socket
import statistics
import sys
import time

HOST = "127.0.0.1"
MESSAGE = 64
BLOCK = 1 << 20


def _nodelay(sock):
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def serve(port):
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children reaped by the kernel
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((HOST, port))
    lsock.listen(128)
    while True:
        conn, _ = lsock.accept()
        if os.fork() == 0:
            lsock.close()
            try:
                _serve_one(conn)
            finally:
                os._exit(0)
        conn.close()


def _serve_one(conn):
    _nodelay(conn)
    role = conn.recv(1)
    try:
        if role == b"B":
            block = os.urandom(BLOCK)
            while True:
                conn.sendall(block)
        elif role == b"P":
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                conn.sendall(data)
    except OSError:
        pass


def _pull(port, ready_w, stop_r, result_w):
    """The bulk puller (a child): read as fast as possible until stop_r is readable."""
    sock = socket.create_connection((HOST, port))
    _nodelay(sock)
    sock.sendall(b"B")
    buf = bytearray(BLOCK)
    recv_into = sock.recv_into
    got = recv_into(buf)
    os.write(ready_w, b"r")
    t0 = time.monotonic()
    total = 0
    while True:
        for _ in range(64):
            n = recv_into(buf)
            if not n:
                break
            total += n
        if not n or select.select([stop_r], [], [], 0)[0]:
            break
    elapsed = time.monotonic() - t0
    os.write(result_w, json.dumps({"bulk_bytes": total + got, "bulk_s": elapsed}).encode())


def client(port, seconds):
    ready_r, ready_w = os.pipe()
    stop_r, stop_w = os.pipe()
    result_r, result_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            _pull(port, ready_w, stop_r, result_w)
        finally:
            os._exit(0)
    try:
        if not select.select([ready_r], [], [], 30)[0]:
            raise SystemExit("bulk stream did not start within 30 s")
        ping = socket.create_connection((HOST, port))
        _nodelay(ping)
        ping.settimeout(30)
        ping.sendall(b"P")
        message = os.urandom(MESSAGE)
        send, recv = ping.sendall, ping.recv
        clock = time.perf_counter_ns
        rtts = []
        warm_until = time.monotonic() + 0.2
        end = warm_until + seconds
        while True:
            t0 = clock()
            send(message)
            got = 0
            while got < MESSAGE:
                data = recv(MESSAGE - got)
                if not data:
                    raise SystemExit("ping connection closed")
                got += len(data)
            t1 = clock()
            now = time.monotonic()
            if now >= end:
                break
            if now >= warm_until:
                rtts.append(t1 - t0)
        ping.close()
    finally:
        os.write(stop_w, b"s")
    if not select.select([result_r], [], [], 30)[0]:
        os.kill(pid, signal.SIGKILL)
        raise SystemExit("bulk puller did not report")
    bulk = json.loads(os.read(result_r, 4096))
    os.waitpid(pid, 0)
    rtts.sort()

    def pct(p):
        return rtts[min(len(rtts) - 1, int(p / 100.0 * len(rtts)))] / 1000.0

    print(json.dumps({
        "round_trips": len(rtts),
        "p50_us": pct(50), "p99_us": pct(99), "p999_us": pct(99.9), "max_us": rtts[-1] / 1000.0,
        "mean_us": statistics.fmean(rtts) / 1000.0,
        "bulk_gbps": bulk["bulk_bytes"] * 8 / bulk["bulk_s"] / 1e9 if bulk["bulk_s"] else None,
    }), flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["server"] and len(sys.argv) == 3:
        serve(int(sys.argv[2]))
    elif sys.argv[1:2] == ["client"] and len(sys.argv) == 4:
        client(int(sys.argv[2]), float(sys.argv[3]))
    else:
        sys.exit(__doc__)
