"""CPU per new connection: gproxy (one or more checkouts) beside HAProxy, in one run.

    python benchmarks/conn_cost.py                       # this checkout vs haproxy
    python benchmarks/conn_cost.py --gproxy before=/tmp/old-checkout --reps 7

Each repetition starts every forwarder afresh in front of one local ``redis-server``,
in an interleaved order, and drives ``redis-benchmark -k 0 -t get`` through it: one TCP
connection per request (connect, one GET, close). The forwarder's CPU (utime + stime from
/proc/PID/stat) over the run, divided by the number of requests, is its CPU per
connection. Prints the median per forwarder and the ratio to HAProxy's. Wall-clock time is
noisy on a shared machine; CPU time per operation much less so.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
HOST = "127.0.0.1"
TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((HOST, port), 0.5).close()
            return
        except OSError:
            time.sleep(0.02)
    raise SystemExit(f"nothing listens on {port}")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


class Forwarder:
    def __init__(self, name: str, kind: str, repo: str = ""):
        self.name, self.kind, self.repo = name, kind, repo
        self.proc = None

    def start(self, target: int, workdir: str) -> int:
        if self.kind == "haproxy":
            port = free_port()
            cfg = os.path.join(workdir, "haproxy.cfg")
            with open(cfg, "w") as f:
                f.write(HAPROXY.format(host=HOST, port=port, target=target))
            self.proc = subprocess.Popen(["haproxy", "-db", "-f", cfg],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_port(port)
            return port
        env = dict(os.environ, PYTHONPATH=self.repo)
        self.proc = subprocess.Popen([sys.executable, "-m", "gproxy", "-q", f"{HOST}:0", f"{HOST}:{target}"],
                                     cwd=self.repo, env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        line = self.proc.stderr.readline()
        m = re.search(r"listening on \S+:(\d+) -> ", line)
        if not m:
            raise SystemExit(f"{self.name}: no banner: {line!r}")
        return int(m.group(1))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


HAPROXY = """\
global
    maxconn 2000
    nbthread 1
defaults
    mode tcp
    option splice-auto
    timeout connect 10s
    timeout client 1h
    timeout server 1h
frontend fwd
    bind {host}:{port}
    default_backend up
backend up
    server s1 {host}:{target}
"""


def one(fwd: Forwarder, target: int, n: int, clients: int, workdir: str) -> float:
    port = fwd.start(target, workdir)
    try:
        # a warm-up: imports, the first greenlets, the kernel's port ranges
        subprocess.run(["redis-benchmark", "-h", HOST, "-p", str(port), "-c", str(clients), "-n", "500",
                        "-k", "0", "-t", "get", "-q"], check=True, stdout=subprocess.DEVNULL)
        cpu0 = cpu_seconds(fwd.proc.pid)
        subprocess.run(["redis-benchmark", "-h", HOST, "-p", str(port), "-c", str(clients), "-n", str(n),
                        "-k", "0", "-t", "get", "-q"], check=True, stdout=subprocess.DEVNULL)
        return (cpu_seconds(fwd.proc.pid) - cpu0) * 1e6 / n
    finally:
        fwd.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gproxy", action="append", default=[], metavar="NAME=CHECKOUT",
                    help="a gproxy checkout to measure (default: this one, as 'gproxy')")
    ap.add_argument("--no-haproxy", action="store_true")
    ap.add_argument("-n", type=int, default=15000, help="connections per repetition")
    ap.add_argument("-c", type=int, default=50, help="parallel clients")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    forwarders = [Forwarder(*spec.split("=", 1)[:1], "gproxy", os.path.abspath(spec.split("=", 1)[1]))
                  for spec in args.gproxy] or [Forwarder("gproxy", "gproxy", REPO)]
    if not args.no_haproxy and shutil.which("haproxy"):
        forwarders.append(Forwarder("haproxy", "haproxy"))
    workdir = tempfile.mkdtemp(prefix="conn_cost.")
    target = free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(target), "--bind", HOST, "--save", "",
                              "--appendonly", "no"], stdout=subprocess.DEVNULL, cwd=workdir)
    results = {f.name: [] for f in forwarders}
    try:
        wait_port(target)
        for rep in range(args.reps):
            order = forwarders[rep % len(forwarders):] + forwarders[:rep % len(forwarders)]
            for fwd in order:
                results[fwd.name].append(one(fwd, target, args.n, args.c, workdir))
            print("rep %d: %s" % (rep + 1, "  ".join(f"{k} {v[-1]:.0f}" for k, v in results.items())),
                  flush=True)
    finally:
        redis.terminate()
        redis.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    haproxy = statistics.median(results["haproxy"]) if "haproxy" in results else None
    print(f"CPU us per connection, median of {args.reps} (redis-benchmark -k 0 -c {args.c} -n {args.n}; "
          f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs):")
    for name, values in results.items():
        med = statistics.median(values)
        ratio = f"  {med / haproxy:.2f}x haproxy" if haproxy and name != "haproxy" else ""
        print(f"  {name:12s} {med:7.1f}  (min {min(values):.1f}, max {max(values):.1f}){ratio}")


if __name__ == "__main__":
    main()
