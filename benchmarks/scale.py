#!/usr/bin/env python3
"""Many concurrent relayed connections: gproxy --workers beside HAProxy, at 10k, 50k, 100k.

Every process here is capped at 20,000 file descriptors (a hard limit on these machines), so
no single process holds more than ~9,900 relayed connections. Everything is split:

- the forwarder: ``gproxy --workers W`` (W = ceil(N / PER_PROC)), or W HAProxy processes
  (``nbthread 2`` each) bound to the same port (HAProxy sets SO_REUSEPORT itself);
- the load: ceil(N / PER_PROC) client processes, each from its own source address
  127.0.0.2, 127.0.0.3, ... so no (source, destination) pair runs out of ports;
- the backend: ceil(N / PER_BACKEND) echo processes (selectors), each on its own port; the
  forwarder balances round-robin over them, so no upstream (source, destination) pair runs
  out of ephemeral ports either.

With N connections open and idle, it measures: RSS per connection (summed VmRSS of every
forwarder process, less the same sum before any client came), CPU the forwarder spends in 10 s
when nothing moves (utime+stime), the latency of one request on a fresh connection (connect,
64 bytes there and back, close; p50/p99 of --requests, one at a time), the rate of a burst of
new connections (connect, 1 byte there and back, close; --burst of them, 64 at a time) and the
time a SIGTERM takes to end every forwarder process (gproxy with --drain-timeout 0, so that
is the cost of aborting N connections, not a wait; HAProxy's SIGTERM is its hard stop).

``--spread`` measures how SO_REUSEPORT spreads long-lived clients over gproxy's workers
(docs/operations.md): K connections opened at once, counted per worker from /proc, T tries.

Typical use::

    python benchmarks/scale.py --sizes 10000                 # about 2 minutes
    python benchmarks/scale.py --sizes 10000,50000,100000 --reps 1
    python benchmarks/scale.py --spread 8,1000 --workers-list 2,4 --tries 20

Run from the repository root or anywhere (gproxy is run from this checkout). A benchmark, not
a test: it prints a Markdown table of medians over --reps to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import errno
import http.client
import json
import math
import os
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST = "127.0.0.1"
#: connections per forwarder process and per client process (under ~9,900: 20,000 fds)
PER_PROC = 9000
#: connections per backend process (round-robin from every worker: about N / backends each)
PER_BACKEND = 8000
IP_BIND_ADDRESS_NO_PORT = 24


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Roles run as child processes of this script

def role_backend(port):
    """An echo server on HOST:port; answers 'count' on stdin with its open connection count."""
    sel = selectors.DefaultSelector()
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((HOST, port))
    lsock.listen(4096)
    lsock.setblocking(False)
    sel.register(lsock, selectors.EVENT_READ, "listen")
    sel.register(sys.stdin, selectors.EVENT_READ, "stdin")
    open_count = 0
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            what = key.data
            if what == "listen":
                for _ in range(256):
                    try:
                        conn, _addr = lsock.accept()
                    except BlockingIOError:
                        break
                    conn.setblocking(False)
                    sel.register(conn, selectors.EVENT_READ, "conn")
                    open_count += 1
            elif what == "stdin":
                line = sys.stdin.readline()
                if not line or line.strip() == "quit":
                    return
                print(open_count, flush=True)
            else:
                conn = key.fileobj
                try:
                    data = conn.recv(65536)
                except OSError:
                    data = b""
                if data:
                    try:
                        conn.send(data)  # small echoes: the buffer always has room
                    except OSError:
                        pass
                else:
                    sel.unregister(conn)
                    conn.close()
                    open_count -= 1


def role_client(source, port, count, window):
    """Open ``count`` connections to HOST:port from ``source``, at most ``window`` handshakes at
    a time; print 'ready OPENED FAILED SECONDS'; hold them until 'close' on stdin."""
    sel = selectors.DefaultSelector()
    held, failed, started, pending = [], 0, 0, 0
    t0 = time.perf_counter()
    while started < count or pending:
        while started < count and pending < window:
            s = socket.socket()
            s.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            s.bind((source, 0))
            s.setblocking(False)
            err = s.connect_ex((HOST, port))
            started += 1
            if err in (0, errno.EINPROGRESS):
                sel.register(s, selectors.EVENT_WRITE)
                pending += 1
            else:
                failed += 1
                s.close()
        for key, _ in sel.select(timeout=30):
            s = key.fileobj
            sel.unregister(s)
            pending -= 1
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                held.append(s)
            else:
                failed += 1
                s.close()
    print(f"ready {len(held)} {failed} {time.perf_counter() - t0:.3f}", flush=True)
    for line in sys.stdin:
        if line.strip() == "close":
            break
    for s in held:
        s.close()
    print("closed", flush=True)


def role_burst(port, total, concurrency):
    """``total`` cycles of connect, 1 byte there and back, close, ``concurrency`` at a time;
    print 'done OK FAILED SECONDS'."""
    sel = selectors.DefaultSelector()
    ok = failed = started = active = 0
    t0 = time.perf_counter()

    def start():
        nonlocal started, active, failed
        s = socket.socket()
        s.setblocking(False)
        started += 1
        err = s.connect_ex((HOST, port))
        if err in (0, errno.EINPROGRESS):
            sel.register(s, selectors.EVENT_WRITE, "connect")
            active += 1
        else:
            failed += 1
            s.close()

    while started < total or active:
        while started < total and active < concurrency:
            start()
        for key, _ in sel.select(timeout=30):
            s = key.fileobj
            if key.data == "connect":
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    try:
                        s.send(b"x")
                        sel.modify(s, selectors.EVENT_READ, "reply")
                        continue
                    except OSError:
                        pass
                failed += 1
            else:
                try:
                    data = s.recv(16)
                except OSError:
                    data = b""
                if data:
                    ok += 1
                else:
                    failed += 1
            sel.unregister(s)
            s.close()
            active -= 1
    print(f"done {ok} {failed} {time.perf_counter() - t0:.3f}", flush=True)


# ---------------------------------------------------------------------------------------------
# /proc

def children(pid):
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


def cpu_ticks(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except OSError:
        return 0


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def socket_fds(pid):
    n = 0
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                    n += 1
            except OSError:
                pass
    except OSError:
        pass
    return n


def listeners_on(port):
    """How many sockets listen on HOST:port (every process's, from /proc/net/tcp)."""
    want = f"0100007F:{port:04X}"
    n = 0
    with open("/proc/net/tcp") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 3 and parts[1] == want and parts[3] == "0A":
                n += 1
    return n


def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def mem_available_mib():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    return 0


# ---------------------------------------------------------------------------------------------
# Processes

class Child:
    """A role of this script in a child process, spoken to by lines on stdin/stdout."""

    def __init__(self, *role_args):
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--role", *map(str, role_args)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)

    def line(self):
        text = self.proc.stdout.readline()
        if not text:
            raise RuntimeError(f"role {self.proc.args[3:]} ended: exit {self.proc.wait()}")
        return text.split()

    def say(self, text):
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def end(self):
        if self.proc.poll() is None:
            try:
                self.say("quit")
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Forwarder:
    """gproxy --workers W, or W HAProxy processes on one port; pids() is every process."""

    def __init__(self, kind, procs, port, backend_ports, workdir, args):
        self.kind, self.port, self.procs_wanted = kind, port, procs
        self.popen = []
        logf = open(os.path.join(workdir, f"{kind}.log"), "a")
        self.metrics_port = None
        if kind == "gproxy":
            metrics = []
            if getattr(args, "metrics", False):
                self.metrics_port = free_port()
                metrics = ["--metrics", f"{HOST}:{self.metrics_port}"]
            cmd = [*(args.gproxy_cmd.split() or [sys.executable, "-m", "gproxy"]), "-q", "--workers", str(procs),
                   "--drain-timeout", "0",
                   "--balance", "round-robin", *metrics, *args.gproxy_args.split(),
                   f"{HOST}:{port}", *(f"{HOST}:{p}" for p in backend_ports)]
            env = dict(os.environ, PYTHONPATH=ROOT)
            self.popen.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=logf, stderr=logf,
                                               stdin=subprocess.DEVNULL))
        else:
            cfg = os.path.join(workdir, "haproxy.cfg")
            servers = "\n".join(f"    server s{i} {HOST}:{p}" for i, p in enumerate(backend_ports))
            with open(cfg, "w") as f:
                f.write(f"""\
global
    maxconn {PER_PROC + 400}
    maxpipes 16
    nbthread {args.haproxy_threads}
defaults
    mode tcp
    timeout connect 10s
    timeout client 1h
    timeout server 1h
    maxconn {PER_PROC + 400}
frontend fwd
    bind {HOST}:{port}
    default_backend up
backend up
    balance roundrobin
{servers}
""")
            for _ in range(procs):
                self.popen.append(subprocess.Popen(["haproxy", "-db", "-f", cfg], stdout=logf, stderr=logf,
                                                   stdin=subprocess.DEVNULL))
        deadline = time.monotonic() + 60
        while listeners_on(port) < procs:
            if any(p.poll() is not None for p in self.popen) or time.monotonic() > deadline:
                raise RuntimeError(f"{kind} did not start: see {workdir}/{kind}.log")
            time.sleep(0.1)

    def pids(self):
        out = [p.pid for p in self.popen if p.poll() is None]
        if self.kind == "gproxy":
            out += [c for p in list(out) for c in children(p)]
        return out

    def workers(self):
        return [c for p in self.popen for c in children(p.pid)] if self.kind == "gproxy" \
            else [p.pid for p in self.popen]

    def rss(self):
        return sum(rss_kib(p) for p in self.pids())

    def cpu_over(self, seconds):
        pids = self.pids()
        before = sum(cpu_ticks(p) for p in pids)
        time.sleep(seconds)  # the measurement window: nothing moves meanwhile
        return (sum(cpu_ticks(p) for p in pids) - before) / os.sysconf("SC_CLK_TCK")

    def stop(self):
        """SIGTERM every top process; seconds until all have exited."""
        t0 = time.perf_counter()
        for p in self.popen:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.popen:
            try:
                p.wait(120)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                return None
        return time.perf_counter() - t0

    def kill(self):
        for p in self.popen:
            if p.poll() is None:
                p.kill()
                p.wait()


def scrape(port):
    """One GET /metrics: (seconds, the page's summed gproxy_connections_active)."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    conn.request("GET", "/metrics")
    body = conn.getresponse().read().decode()
    conn.close()
    secs = time.perf_counter() - t0
    active = sum(float(line.rsplit(None, 1)[1]) for line in body.splitlines()
                 if line.startswith("gproxy_connections_active"))
    return secs, active


def one_request(port, payload=b"x" * 64):
    t0 = time.perf_counter()
    with socket.create_connection((HOST, port), timeout=10) as s:
        s.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = s.recv(4096)
            if not chunk:
                raise RuntimeError("the forwarder closed before the echo")
            got += chunk
    return time.perf_counter() - t0


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


# ---------------------------------------------------------------------------------------------
# One measurement

def measure(kind, n, args, workdir):
    procs = max(1, math.ceil(n / PER_PROC))
    nbackends = max(1, math.ceil(n / PER_BACKEND))
    nclients = procs
    backend_ports = [free_port() for _ in range(nbackends)]
    backends = [Child("backend", p) for p in backend_ports]
    for b in backends:
        b.line()
    port = free_port()
    fwd = clients = None
    row = {"kind": kind, "n": n, "procs": procs, "backends": nbackends, "clients": nclients}
    try:
        fwd = Forwarder(kind, procs, port, backend_ports, workdir, args)
        for _ in range(200):  # warm up: lazy imports, first buffers, in every worker
            one_request(port)
        time.sleep(1.5)  # sleep-ok: the warm-up's connections end and park
        row["rss0_kib"] = fwd.rss()
        row["idle_cpu0_s"] = fwd.cpu_over(args.idle_seconds)
        t0 = time.perf_counter()
        per_client = [n // nclients + (1 if i < n % nclients else 0) for i in range(nclients)]
        clients = [Child("client", f"127.0.0.{2 + i}", port, c, args.window) for i, c in enumerate(per_client)]
        opened = failed = 0
        for c in clients:
            _, o, f, _secs = c.line()
            opened, failed = opened + int(o), failed + int(f)
        deadline = time.monotonic() + 120
        while True:
            counts = []
            for b in backends:
                b.say("count")
                counts.append(int(b.line()[0]))
            if sum(counts) >= opened or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        row["open_s"] = time.perf_counter() - t0
        row["opened"], row["failed"], row["relayed"] = opened, failed, sum(counts)
        row["per_backend"] = counts
        log(f"{kind} n={n}: {opened} open ({failed} failed), {sum(counts)} at the backends, "
            f"in {row['open_s']:.1f} s")
        time.sleep(args.settle)  # sleep-ok: let the pumps park before RSS is read
        row["rss_kib"] = fwd.rss()
        row["kib_per_conn"] = (row["rss_kib"] - row["rss0_kib"]) / max(1, row["relayed"])
        row["per_worker"] = [(socket_fds(p) - 2) // 2 for p in fwd.workers()]
        row["idle_cpu_s"] = fwd.cpu_over(args.idle_seconds)
        if fwd.metrics_port:
            scrapes = [scrape(fwd.metrics_port) for _ in range(5)]
            row["scrape_ms"] = statistics.median(t for t, _ in scrapes) * 1000
            row["scrape_active"] = scrapes[-1][1]
        lat = [one_request(port) for _ in range(args.requests)]
        row["lat_p50_us"], row["lat_p99_us"] = percentile(lat, 0.5) * 1e6, percentile(lat, 0.99) * 1e6
        burst = Child("burst", port, args.burst, 64)
        _, ok, bfailed, secs = burst.line()
        burst.end()
        row["burst_ok"], row["burst_failed"] = int(ok), int(bfailed)
        row["cps"] = int(ok) / float(secs)
        row["stop_s"] = fwd.stop()
        log(f"{kind} n={n}: {row['kib_per_conn']:.2f} KiB/conn, idle CPU {row['idle_cpu_s']:.2f} s "
            f"(empty {row['idle_cpu0_s']:.2f}), p50 {row['lat_p50_us']:.0f} us p99 {row['lat_p99_us']:.0f} us, "
            f"{row['cps']:.0f} conn/s, stop {row['stop_s']:.2f} s, per worker {row['per_worker']}, "
            f"per backend {row['per_backend']}"
            + (f", /metrics {row['scrape_ms']:.1f} ms showing {row['scrape_active']:.0f} active"
               if fwd.metrics_port else ""))
    finally:
        if fwd is not None:
            fwd.kill()
        for c in clients or []:
            try:
                c.say("close")
            except OSError:
                pass
            c.end()
        for b in backends:
            b.end()
    return row


def spread(k, workers, tries, workdir):
    """K connections opened at once through gproxy --workers W, counted per worker, T times."""
    backend_port = free_port()
    backend = Child("backend", backend_port)
    backend.line()
    port = free_port()
    plain = argparse.Namespace(gproxy_args="", gproxy_cmd="", metrics=False)
    fwd = Forwarder("gproxy", workers, port, [backend_port], workdir, plain)
    results = []
    try:
        for _ in range(50):  # warm up: the sockets a worker keeps once it has served (a spare upstream)
            one_request(port)
        time.sleep(0.5)  # sleep-ok: the warm-up's connections end
        pids = fwd.workers()
        base = {p: socket_fds(p) for p in pids}
        for _ in range(tries):
            socks = [socket.create_connection((HOST, port)) for _ in range(k)]
            deadline = time.monotonic() + 30
            while True:
                counts = [max(0, socket_fds(p) - base[p]) // 2 for p in pids]
                if sum(counts) >= k or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            results.append(sorted(counts, reverse=True))
            for s in socks:
                s.close()
            settled = time.monotonic() + 5
            while any(socket_fds(p) > base[p] for p in pids) and time.monotonic() < settled:
                time.sleep(0.05)
    finally:
        fwd.kill()
        backend.end()
    return results


# ---------------------------------------------------------------------------------------------

def fmt(x, digits=0):
    return "-" if x is None else f"{x:,.{digits}f}"


def table(rows, sizes, kinds):
    med = {}
    for kind in kinds:
        for n in sizes:
            rs = [r for r in rows if r["kind"] == kind and r["n"] == n]
            if rs:
                med[kind, n] = {key: statistics.median(r[key] for r in rs if r.get(key) is not None)
                                for key in ("kib_per_conn", "idle_cpu_s", "idle_cpu0_s", "lat_p50_us",
                                            "lat_p99_us", "cps", "stop_s", "relayed", "open_s", "scrape_ms")
                                if any(r.get(key) is not None for r in rs)}
                med[kind, n]["procs"] = rs[0]["procs"]
                med[kind, n]["reps"] = len(rs)
    out = ["| N | forwarder | processes | relayed | RSS KiB/conn | idle CPU ms/s [empty] | "
           "fresh request p50 / p99 us | new conn/s | SIGTERM s | opened in s | /metrics ms |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for n in sizes:
        for kind in kinds:
            m = med.get((kind, n))
            if not m:
                continue
            rs = [r for r in rows if r["kind"] == kind and r["n"] == n]

            def cell(key, digits, scale=1.0, rs=rs):
                """The median, and the range when there are several repetitions."""
                xs = [r[key] * scale for r in rs if r.get(key) is not None]
                if not xs:
                    return "-"
                text = fmt(statistics.median(xs), digits)
                return text if len(xs) < 2 else f"{text} ({fmt(min(xs), digits)}-{fmt(max(xs), digits)})"
            per_s = 1000 / ARGS.idle_seconds
            out.append(f"| {n:,} | {kind} | {m['procs']} | {m['relayed']:,.0f} | {cell('kib_per_conn', 2)} | "
                       f"{cell('idle_cpu_s', 1, per_s)} [{cell('idle_cpu0_s', 1, per_s)}] | "
                       f"{cell('lat_p50_us', 0)} / {cell('lat_p99_us', 0)} | {cell('cps', 0)} | "
                       f"{cell('stop_s', 2)} | {cell('open_s', 1)} | {cell('scrape_ms', 1)} |")
    if "gproxy" in kinds and "haproxy" in kinds:
        out += ["", "| N | RSS/conn | idle CPU | p50 | p99 | new conn/s | SIGTERM |  (gproxy / HAProxy)",
                "|---|---|---|---|---|---|---|"]
        for n in sizes:
            g, h = med.get(("gproxy", n)), med.get(("haproxy", n))
            if g and h:
                def ratio(key, g=g, h=h):
                    return f"{g[key] / h[key]:.2f}" if h[key] else "-"
                out.append(f"| {n:,} | {ratio('kib_per_conn')} | {ratio('idle_cpu_s')} | {ratio('lat_p50_us')} | "
                           f"{ratio('lat_p99_us')} | {ratio('cps')} | {ratio('stop_s')} |")
    return "\n".join(out)


def main(argv=None):
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--role", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--sizes", default="10000", help="connection counts N, comma-separated (default 10000)")
    ap.add_argument("--only", default="gproxy,haproxy", help="forwarders: gproxy,haproxy (default both)")
    ap.add_argument("--reps", type=int, default=1, help="repetitions, interleaved (default 1)")
    ap.add_argument("--idle-seconds", type=float, default=10.0, help="idle CPU window (default 10)")
    ap.add_argument("--settle", type=float, default=3.0, help="seconds idle before RSS is read (default 3)")
    ap.add_argument("--requests", type=int, default=200, help="fresh-connection requests timed (default 200)")
    ap.add_argument("--burst", type=int, default=5000, help="new connections in the burst (default 5000)")
    ap.add_argument("--window", type=int, default=128, help="handshakes in flight per client process")
    ap.add_argument("--haproxy-threads", type=int, default=2, help="HAProxy nbthread per process (default 2)")
    ap.add_argument("--no-metrics", dest="metrics", action="store_false",
                    help="gproxy without --metrics (it needs a gproxy whose --workers takes it)")
    ap.add_argument("--gproxy-cmd", default="",
                    help="how to run gproxy (default: this Python, -m gproxy; workers are run so anyway)")
    ap.add_argument("--gproxy-args", default="", help="more gproxy options")
    ap.add_argument("--spread", default=None, help="instead: K,K,... clients for the worker spread")
    ap.add_argument("--workers-list", default="2,4", help="with --spread: worker counts (default 2,4)")
    ap.add_argument("--tries", type=int, default=20, help="with --spread: tries (default 20)")
    ap.add_argument("--json", default=None, help="write every row here")
    args = ARGS = ap.parse_args(argv)
    if args.role:
        role, rest = args.role[0], args.role[1:]
        if role == "backend":
            return role_backend(int(rest[0]))
        if role == "client":
            return role_client(rest[0], int(rest[1]), int(rest[2]), int(rest[3]))
        if role == "burst":
            return role_burst(int(rest[0]), int(rest[1]), int(rest[2]))
        raise SystemExit(f"unknown role {role}")
    workdir = tempfile.mkdtemp(prefix="gproxy-scale-")
    if args.spread:
        print("| workers | clients | tries | per worker, most to fewest: (count) times |\n|---|---|---|---|")
        for k in map(int, args.spread.split(",")):
            for w in map(int, args.workers_list.split(",")):
                res = spread(k, w, args.tries, workdir)
                tally = {}
                for r in res:
                    tally[tuple(r)] = tally.get(tuple(r), 0) + 1
                if len(tally) <= 8:
                    shown = ", ".join(f"{'/'.join(map(str, r))} x{c}" for r, c in
                                      sorted(tally.items(), key=lambda kv: -kv[1]))
                else:  # every try its own: the busiest and the idlest worker's counts
                    busiest, idlest = [r[0] for r in res], [r[-1] for r in res]
                    shown = (f"busiest median {statistics.median(busiest):g} (most {max(busiest)}), "
                             f"idlest median {statistics.median(idlest):g} (fewest {min(idlest)})")
                worst = max(r[0] for r in res) / (k / w)
                print(f"| {w} | {k} | {len(res)} | {shown} (busiest at most {worst:.2f}x the even share) |",
                      flush=True)
        return 0
    sizes = [int(s) for s in args.sizes.split(",")]
    kinds = args.only.split(",")
    rows = []
    for n in sizes:
        need = n * 40 // 1024 + 2048  # MiB, generous: ~4 sockets and two Python objects per connection
        if mem_available_mib() < need:
            log(f"n={n}: only {mem_available_mib()} MiB available, want {need}: skipped")
            continue
        for rep in range(args.reps):
            for kind in (kinds if rep % 2 == 0 else kinds[::-1]):
                log(f"{kind} n={n} rep {rep + 1}/{args.reps}")
                rows.append(measure(kind, n, args, workdir))
                if args.json:
                    with open(args.json, "w") as f:
                        json.dump(rows, f, indent=1)
    print(table(rows, sizes, kinds))
    return 0


ARGS = None

if __name__ == "__main__":
    sys.exit(main())
