#!/usr/bin/env python3
"""TLS termination on 127.0.0.1: gproxy beside stunnel4, HAProxy and nginx, with a plaintext baseline.

    python benchmarks/tls_bench.py [--reps 3] [--seconds 5] [--only gproxy,haproxy] [--json out.json]

Every terminator takes TLS from the client and forwards plaintext to one backend, an nginx
HTTP server (worker_processes 1, sendfile, access log off) serving /small (64 bytes) and
/bulk (64 MiB). The client is wrk (C, OpenSSL), one thread. ``direct`` is wrk over plain
HTTP to the backend: the physical limit, with no TLS at all.

Workloads (each a fresh terminator process, its CPU read from /proc before and after):

- ``hs_rsa``, ``hs_ecdsa``: full handshakes per second, an RSA 2048 or ECDSA P-256
  certificate: ``--hs-clients`` (4) Python processes, each making new TLS connections with
  one HTTP/1.0 request each, no session resumed (wrk resumes TLS 1.3 sessions, which would
  measure resumptions); CPU ms per handshake. ``direct``: new plaintext connections.
- ``bulk``: one connection downloading /bulk over and over (wrk -c 1): throughput and CPU
  ms per GB of the terminator.
- ``small``: 64-byte responses on 50 kept-alive connections (wrk -c 50 --latency):
  requests/s, CPU us per request, p50/p99 under that load.
- ``small_c1``: the same on one connection (a ping-pong): p50/p99 unloaded.
- ``idle``: memory per idle TLS connection: ``--idle-conns`` (1000) clients complete the
  handshake and hold the connection (the terminator's backend connection is open too);
  VmRSS of the terminator's processes after less before, per connection.

Repetitions are interleaved (every terminator runs a workload before the next workload; the
order rotates per repetition); ratios to direct are taken within a repetition; the report
gives medians and min-max ranges. Progress goes to stderr, the Markdown report to stdout.
Only 127.0.0.1 is ever a traffic target.
"""

import argparse
import os
import re
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench  # noqa: E402  (the process, /proc and environment helpers)
from bench import HOST, REPO, BenchError, log, run_cmd, spawn, stop_proc, tree_cpu_seconds, tree_memory_kib  # noqa: E402

TERMINATORS = ["gproxy", "haproxy", "nginx", "stunnel"]
ALL = ["direct"] + TERMINATORS
WORKLOADS = ["hs_rsa", "hs_ecdsa", "bulk", "small", "small_c1", "idle"]
BULK_MIB = 64


# -- certificates, backend -----------------------------------------------------------------

def make_certs(workdir):
    """RSA 2048 and ECDSA P-256 self-signed certificates for 127.0.0.1: {kind: (cert, key, combined)}."""
    certs = {}
    for kind, newkey in (("rsa", ["-newkey", "rsa:2048"]),
                         ("ecdsa", ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"])):
        cert, key = os.path.join(workdir, kind + ".crt"), os.path.join(workdir, kind + ".key")
        rc, out, err = run_cmd(["openssl", "req", "-x509", *newkey, "-nodes", "-days", "2", "-subj",
                                "/CN=bench.local", "-addext", "subjectAltName=DNS:bench.local,IP:127.0.0.1",
                                "-keyout", key, "-out", cert], timeout=60)
        if rc:
            raise BenchError("openssl req failed: " + err)
        combined = os.path.join(workdir, kind + ".pem")
        with open(combined, "w") as f:
            f.write(open(cert).read() + open(key).read())
        certs[kind] = (cert, key, combined)
    return certs


def nginx_conf(workdir, body):
    return ("daemon off; worker_processes 1; error_log %s/nginx-%s.err warn; pid %s/nginx-%s.pid;\n"
            "worker_rlimit_nofile 65536;\n"
            % (workdir, os.getpid(), workdir, time.monotonic_ns()) + body)


class Backend:
    """The plaintext HTTP server every terminator forwards to."""

    def __init__(self, workdir):
        self.port = bench.free_port()
        root = os.path.join(workdir, "www")
        os.makedirs(root, exist_ok=True)
        with open(os.path.join(root, "small"), "wb") as f:
            f.write(b"x" * 64)
        with open(os.path.join(root, "bulk"), "wb") as f:
            f.write(os.urandom(1 << 20) * BULK_MIB)
        conf = os.path.join(workdir, "backend.conf")
        with open(conf, "w") as f:
            f.write(nginx_conf(workdir, (
                "events { worker_connections 20000; }\n"
                "http { access_log off; sendfile on; tcp_nopush on; keepalive_requests 1000000;\n"
                "  keepalive_timeout 600s; default_type application/octet-stream;\n"
                "  server { listen %s:%d backlog=4096; root %s; } }\n") % (HOST, self.port, root)))
        self.proc = spawn(["nginx", "-e", "stderr", "-c", conf], stderr=subprocess.DEVNULL)
        bench.wait_listening(self.port, self.proc, 15, "backend nginx")

    def close(self):
        stop_proc(self.proc)


# -- terminators -------------------------------------------------------------------------

class Terminator:
    """One terminator (or direct), started fresh per measurement with one certificate."""

    def __init__(self, name, args, workdir, cert):
        self.name, self.args, self.workdir, self.cert = name, args, workdir, cert
        self.proc = None
        self.port = None

    def start(self, backend_port):
        if self.name == "direct":
            self.port = backend_port
            return
        cert, key, combined = self.cert
        log_path = os.path.join(self.workdir, "%s.%d.log" % (self.name, time.monotonic_ns()))
        self.log_path = log_path
        logf = open(log_path, "wb")
        target = "%s:%d" % (HOST, backend_port)
        if self.name == "gproxy":
            repo = self.args.gproxy_repo
            env = dict(os.environ)
            env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
            cmd = shlex.split(self.args.gproxy_cmd) + shlex.split(self.args.gproxy_args) + [
                "--tls-cert", cert, "--tls-key", key, "%s:0" % HOST, target]
            self.proc = spawn(cmd, stdout=logf, stderr=logf, cwd=repo, env=env)
            self.port = self._banner()
            return
        self.port = bench.free_port()
        if self.name == "haproxy":
            conf = os.path.join(self.workdir, "haproxy-tls.cfg")
            maxconn = max(4000, self.args.idle_conns * 2 + 500)
            with open(conf, "w") as f:
                f.write("global\n  nbthread 1\n  maxconn %d\n  tune.ssl.default-dh-param 2048\n"
                        "defaults\n  mode tcp\n  timeout connect 10s\n  timeout client 1h\n"
                        "  timeout server 1h\n  maxconn %d\n"
                        "frontend tls\n  bind %s:%d ssl crt %s\n  default_backend plain\n"
                        "backend plain\n  server b %s\n" % (maxconn, maxconn, HOST, self.port, combined, target))
            cmd = ["haproxy", "-db", "-f", conf]
        elif self.name == "nginx":
            conf = os.path.join(self.workdir, "nginx-tls.conf")
            with open(conf, "w") as f:
                f.write(nginx_conf(self.workdir, (
                    "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n"
                    "events { worker_connections 20000; }\n"
                    "stream { server { listen %s:%d ssl backlog=4096; ssl_certificate %s;\n"
                    "  ssl_certificate_key %s; proxy_pass %s; proxy_timeout 1h; } }\n")
                    % (HOST, self.port, cert, key, target)))
            cmd = ["nginx", "-e", "stderr", "-c", conf]
        elif self.name == "stunnel":
            conf = os.path.join(self.workdir, "stunnel.conf")
            with open(conf, "w") as f:
                f.write("foreground = yes\npid =\ndebug = 3\n[tls]\naccept = %s:%d\nconnect = %s\n"
                        "cert = %s\nkey = %s\n" % (HOST, self.port, target, cert, key))
            cmd = ["stunnel4", conf]
        else:
            raise BenchError("unknown terminator " + self.name)
        self.proc = spawn(cmd, stdout=logf, stderr=logf)
        bench.wait_listening(self.port, self.proc, 15, self.name)

    def _banner(self):
        rx = re.compile(r"listening on (\S+):(\d+) -> ")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            m = rx.search(open(self.log_path, errors="replace").read())
            if m:
                port = int(m.group(2))
                bench.wait_listening(port, self.proc, 15, "gproxy")
                return port
            if self.proc.poll() is not None:
                raise BenchError("gproxy exited at start: " + bench.tail(self.log_path))
            time.sleep(0.02)
        raise BenchError("gproxy printed no listening line: " + bench.tail(self.log_path))

    def url(self, path):
        scheme = "http" if self.name == "direct" else "https"
        return "%s://%s:%d/%s" % (scheme, HOST, self.port, path)

    def cpu(self):
        return tree_cpu_seconds(self.proc.pid) if self.proc else 0.0

    def rss_kib(self):
        return tree_memory_kib(self.proc.pid)["rss_kib"] if self.proc else 0

    def stop(self):
        if self.proc is not None:
            if self.proc.poll() is not None:
                raise BenchError("%s died: %s" % (self.name, bench.tail(self.log_path)))
            stop_proc(self.proc, signal.SIGTERM, timeout=5)


# -- wrk ---------------------------------------------------------------------------------------

_UNITS = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}
_TIME = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def wrk(url, seconds, conns, extra=()):
    """Run wrk; {requests, seconds, bytes, rps, errors, p50, p99 (s, with --latency)}."""
    cmd = ["wrk", "-t1", "-c%d" % conns, "-d%ds" % seconds, *extra, url]
    rc, out, err = run_cmd(cmd, timeout=seconds + 60)
    if rc:
        raise BenchError("wrk failed (%d): %s" % (rc, bench.oneline(out + err)))
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+), ([\d.]+)(\w+) read", out)
    if not m:
        raise BenchError("wrk: no summary: " + bench.oneline(out))
    result = {"requests": int(m.group(1)), "seconds": float(m.group(2)) * _TIME[m.group(3)],
              "bytes": float(m.group(4)) * _UNITS[m.group(5)]}
    result["rps"] = result["requests"] / result["seconds"]
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result["errors"] = (sum(map(int, errors.groups())) if errors else 0) + (int(non2xx.group(1)) if non2xx else 0)
    for pct in ("50", "99"):
        lm = re.search(r"^\s+%s%%\s+([\d.]+)(us|ms|s|m)\s*$" % pct, out, re.M)
        if lm:
            result["p" + pct] = float(lm.group(1)) * _TIME[lm.group(2)]
    return result


# -- the handshake client ------------------------------------------------------------------------

#: one process of the handshake load: new connections, one HTTP/1.0 request each, no session
#: resumed (Python's ssl offers none unless told to: wrk resumes TLS 1.3 sessions, so it cannot
#: measure full handshakes)
HS_CLIENT = r"""
import socket, ssl, sys, time
port, seconds, tls = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3] == "1"
context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
context.check_hostname = False
context.verify_mode = ssl.CERT_NONE
deadline, count, errors = time.monotonic() + seconds, 0, 0
start = time.monotonic()
while time.monotonic() < deadline:
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        if tls:
            sock = context.wrap_socket(sock)
        sock.sendall(b"GET /small HTTP/1.0\r\n\r\n")
        got = b""
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                break
            got += chunk
        sock.close()
        if got.startswith(b"HTTP/1.1 200") and got.endswith(b"x" * 64):
            count += 1
        else:
            errors += 1
    except (OSError, ssl.SSLError):
        errors += 1
print(count, errors, time.monotonic() - start)
"""


def handshakes(term, args):
    """``--hs-clients`` processes of HS_CLIENT at once: {requests, rps, errors, seconds}."""
    procs = [spawn([sys.executable, "-c", HS_CLIENT, str(term.port), str(args.seconds),
                    "0" if term.name == "direct" else "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(args.hs_clients)]
    total = errors = 0
    seconds = 0.0
    for proc in procs:
        out, err = proc.communicate(timeout=args.seconds + 60)
        if proc.returncode:
            raise BenchError("handshake client: " + bench.oneline(err.decode(errors="replace")))
        count, failed, took = out.split()
        total, errors, seconds = total + int(count), errors + int(failed), max(seconds, float(took))
        stop_proc(proc)
    return {"requests": total, "errors": errors, "seconds": seconds, "rps": total / seconds, "bytes": 0}


# -- the idle helper -----------------------------------------------------------------------------

IDLE_HELPER = r"""
import socket, ssl, sys, time
port, count = int(sys.argv[1]), int(sys.argv[2])
context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
context.check_hostname = False
context.verify_mode = ssl.CERT_NONE
held = []
for _ in range(count):
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    held.append(context.wrap_socket(sock))  # the handshake is complete on return
print("ready", flush=True)
sys.stdin.readline()
for tls in held:
    if tls.fileno() < 0:
        sys.exit("a connection was closed")
"""


def measure_idle(term, args):
    before = term.rss_kib()
    helper = spawn([sys.executable, "-c", IDLE_HELPER, str(term.port), str(args.idle_conns)],
                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = helper.stdout.readline()
        if line.strip() != b"ready":
            text = (line + helper.stderr.read()).decode(errors="replace")
            raise BenchError("idle helper: " + bench.oneline(text))
        time.sleep(args.idle_settle)
        after = term.rss_kib()
        helper.stdin.write(b"\n")
        helper.stdin.flush()
        if helper.wait(60):
            raise BenchError("idle helper: " + helper.stderr.read().decode(errors="replace"))
    finally:
        stop_proc(helper)
    return {"kib_per_conn": (after - before) / args.idle_conns}


# -- one measurement ------------------------------------------------------------------------------

def run_one(workload, name, args, workdir, certs, backend):
    cert = certs["rsa" if workload == "hs_rsa" else "ecdsa"]
    term = Terminator(name, args, workdir, cert)
    term.start(backend.port)
    try:
        if workload == "idle":
            if name == "direct":
                return None
            return measure_idle(term, args)
        # a short warm-up: caches, the first connections' allocations
        wrk(term.url("small"), 1, 4)
        cpu0 = term.cpu()
        if workload.startswith("hs_"):
            out = handshakes(term, args)
        elif workload == "bulk":
            out = wrk(term.url("bulk"), args.seconds, 1)
        elif workload == "small":
            out = wrk(term.url("small"), args.seconds, 50, ["--latency"])
        else:
            out = wrk(term.url("small"), args.seconds, 1, ["--latency"])
        cpu = term.cpu() - cpu0
        out["cpu_s"] = cpu
        out["cpu_per_request_us"] = cpu / max(1, out["requests"]) * 1e6
        out["cpu_ms_per_gb"] = cpu * 1e3 / (out["bytes"] / 1e9) if out["bytes"] else None
        out["gbit_s"] = out["bytes"] * 8 / out["seconds"] / 1e9
        return out
    finally:
        term.stop()


# -- report ---------------------------------------------------------------------------------------

def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def cell(values, fmt, scale=1.0):
    values = [v * scale for v in values if v is not None]
    if not values:
        return "n/a"
    m = statistics.median(values)
    if len(values) == 1 or min(values) == max(values):
        return fmt % m
    return (fmt + " (" + fmt + "-" + fmt + ")") % (m, min(values), max(values))


def report(results, names, args, env):
    def get(workload, name, key):
        return [r.get(key) if r else None for r in results.get((workload, name), [])]

    def ratio(workload, name, key):
        out = []
        for mine, base in zip(results.get((workload, name), []), results.get((workload, "direct"), [])):
            if mine and base and base.get(key):
                out.append(mine[key] / base[key])
        return out

    lines = ["## TLS termination, %s" % env["date"], ""]
    lines.append("Machine: %s, %s cores, kernel %s; Python %s, gevent %s; %s; %s; %s; %s; %s; wrk %s. "
                 "gproxy commit %s. %d repetitions of %d s each, interleaved; medians (min-max)."
                 % (env["cpu"], env["cores"], env["kernel"], env["python"], env["gevent"], env["openssl"],
                    env["haproxy"], env["nginx"], env["stunnel"], env["gproxy_cmd"], env["wrk"],
                    env["gproxy_commit"], args.reps, args.seconds))
    lines.append("")
    header = "| | " + " | ".join(names) + " |"
    lines += [header, "|---" * (len(names) + 1) + "|"]

    def row(label, values_of):
        lines.append("| %s | %s |" % (label, " | ".join(values_of(n) for n in names)))

    for workload, title in (("hs_rsa", "RSA 2048"), ("hs_ecdsa", "ECDSA P-256")):
        row("handshakes/s, %s (direct: plain connects/s)" % title,
            lambda n, w=workload: cell(get(w, n, "rps"), "%.0f"))
        row("CPU ms per handshake, %s" % title,
            lambda n, w=workload: "n/a" if n == "direct" else cell(get(w, n, "cpu_per_request_us"), "%.2f", 1e-3))
    row("bulk, 1 connection, Gbit/s", lambda n: cell(get("bulk", n, "gbit_s"), "%.2f"))
    row("bulk, ratio to direct", lambda n: cell(ratio("bulk", n, "gbit_s"), "%.2f"))
    row("CPU ms per GB of bulk", lambda n: cell(get("bulk", n, "cpu_ms_per_gb"), "%.0f"))
    row("64-byte requests/s, 50 connections", lambda n: cell(get("small", n, "rps"), "%.0f"))
    row("requests/s, ratio to direct", lambda n: cell(ratio("small", n, "rps"), "%.2f"))
    row("CPU us per request", lambda n: cell(get("small", n, "cpu_per_request_us"), "%.1f"))
    row("p50 / p99 ms, 50 connections", lambda n: "%s / %s" % (cell(get("small", n, "p50"), "%.2f", 1e3),
                                                               cell(get("small", n, "p99"), "%.2f", 1e3)))
    row("p50 / p99 ms, 1 connection", lambda n: "%s / %s" % (cell(get("small_c1", n, "p50"), "%.3f", 1e3),
                                                              cell(get("small_c1", n, "p99"), "%.3f", 1e3)))
    row("KiB per idle TLS connection (%d open)" % args.idle_conns,
        lambda n: cell(get("idle", n, "kib_per_conn"), "%.1f"))
    errors = {key: sum(r.get("errors", 0) for r in rs if r) for key, rs in results.items()}
    bad = {key: count for key, count in errors.items() if count}
    if bad:
        lines += ["", "wrk errors (socket errors and non-2xx): " +
                  ", ".join("%s/%s %d" % (w, n, c) for (w, n), c in sorted(bad.items()))]
    failed = [key for key, rs in results.items() if any(r is False for r in rs)]
    if failed:
        lines += ["", "failed measurements: " + ", ".join("%s/%s" % k for k in sorted(failed))]
    return "\n".join(lines)


def environment(args):
    env = bench.environment(argparse.Namespace(forwarders=["gproxy"], gproxy_cmd=args.gproxy_cmd,
                                               gproxy_args=args.gproxy_args))
    env["openssl"] = bench.first_line(["openssl", "version"], r"OpenSSL")
    env["nginx"] = bench.first_line(["nginx", "-v"], r"nginx")
    env["stunnel"] = bench.first_line(["stunnel4", "-version"], r"stunnel \d")
    env["wrk"] = bench.first_line(["wrk", "--version"], r"wrk").split()[1]
    return env


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--only", default=",".join(ALL), help="direct,gproxy,haproxy,nginx,stunnel")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--idle-conns", type=int, default=1000)
    ap.add_argument("--hs-clients", type=int, default=4, help="handshake client processes at once")
    ap.add_argument("--idle-settle", type=float, default=1.0)
    ap.add_argument("--gproxy-cmd", default="%s -m gproxy" % sys.executable)
    ap.add_argument("--gproxy-args", default="-q")
    ap.add_argument("--gproxy-repo", default=REPO, help="the checkout gproxy runs from (default: this one)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    args.names = [n for n in args.only.split(",") if n]
    args.workloads = [w for w in args.workloads.split(",") if w]
    for n in args.names:
        if n not in ALL:
            ap.error("unknown terminator %s" % n)
    for w in args.workloads:
        if w not in WORKLOADS:
            ap.error("unknown workload %s" % w)
    return args


def main(argv=None):
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, bench._on_signal)
    import atexit
    atexit.register(bench.cleanup_all)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    env = environment(args)
    results = {}
    with tempfile.TemporaryDirectory(prefix="tls-bench-") as workdir:
        os.chmod(workdir, 0o755)  # nginx's workers (user nobody, when run as root) read www/
        certs = make_certs(workdir)
        backend = Backend(workdir)
        try:
            for rep in range(args.reps):
                order = args.names[rep % len(args.names):] + args.names[:rep % len(args.names)]
                for workload in args.workloads:
                    for name in order:
                        log("rep %d/%d %s %s" % (rep + 1, args.reps, workload, name))
                        try:
                            out = run_one(workload, name, args, workdir, certs, backend)
                        except BenchError as exc:
                            log("  failed: %s" % exc)
                            out = False
                        results.setdefault((workload, name), []).append(out)
                        if out:
                            log("  " + ", ".join("%s=%.4g" % (k, v) for k, v in sorted(out.items())
                                                 if isinstance(v, float)))
        finally:
            backend.close()
    text = report(results, args.names, args, env)
    print(text)
    if args.json:
        import json
        with open(args.json, "w") as f:
            json.dump({"env": env, "results": {"%s/%s" % k: v for k, v in results.items()}}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
