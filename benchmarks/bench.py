#!/usr/bin/env python3
"""Benchmark harness for gproxy against other TCP forwarders on 127.0.0.1.

    bash benchmarks/setup.sh && python benchmarks/bench.py [options]

Forwarders: direct (no proxy), gproxy, haproxy, socat, naive (the textbook
gevent forwarder in naive_forwarder.py). Workloads: iperf3 bulk (upload,
download, 4 streams), sockperf ping-pong latency, redis-benchmark GET with
keep-alive and with a new connection per request, and memory per idle
connection. Repetitions are interleaved (each repetition runs every forwarder
on a workload before moving on; the forwarder order rotates per repetition);
each forwarder is started fresh for each measurement and killed after it.
Ratios to direct are computed per repetition; the report gives medians.

The report (Markdown) goes to stdout, progress to stderr. See README.md.
Only 127.0.0.1 is ever a traffic target.
"""

import argparse
import atexit
import csv
import datetime
import errno
import io
import json
import os
import platform
import re
import resource
import selectors
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")

ALL_FORWARDERS = ["direct", "gproxy", "haproxy", "socat", "naive", "uvloop",
                  "gproxy-workers", "haproxy-threads"]
# gproxy --workers N and haproxy nbthread N (N = --parallel): run only where parallel clients
# can spread over them
PARALLEL_FORWARDERS = {"gproxy-workers", "haproxy-threads"}
PARALLEL_WORKLOADS = {"bulk_p4", "redis_ka", "redis_conn"}
# not in the default set; select with --only
EXTRA_FORWARDERS = ["gproxy-nosplice"]  # gproxy --no-splice
BULK_WORKLOADS = ["bulk_up", "bulk_down", "bulk_p4"]
REDIS_WORKLOADS = ["redis_ka", "redis_conn"]
WORKLOAD_GROUPS = {
    "bulk": BULK_WORKLOADS,
    "pingpong": ["pingpong"],
    "fairness": ["fairness"],
    "redis": REDIS_WORKLOADS,
    "idle": ["idle"],
}
ALL_WORKLOADS = BULK_WORKLOADS + ["pingpong", "fairness"] + REDIS_WORKLOADS + ["idle"]

ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")


def log(msg):
    ts = time.strftime("%H:%M:%S")
    print("[%s] %s" % (ts, msg), file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# ----------------------------------------------------------------------------
# Subprocess bookkeeping: every child gets its own session (process group) so
# that it and anything it forks can be killed together; everything still alive
# is killed on exit.

_PROCS = []


def spawn(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
          stdin=subprocess.DEVNULL, **kw):
    p = subprocess.Popen(cmd, stdin=stdin, stdout=stdout, stderr=stderr,
                         start_new_session=True, **kw)
    _PROCS.append(p)
    return p


def pgroup_members(pgid, include_zombies=False):
    """PIDs whose process group is pgid (scans /proc)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        st = read_stat(int(d))
        if st and st["pgrp"] == pgid and (include_zombies or st["state"] not in "ZX"):
            out.append(int(d))
    return out


def killpg(pgid, sig):
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_proc(p, sig=signal.SIGTERM, timeout=5.0):
    """Send sig to p, wait, then SIGKILL its whole process group; verify gone.

    Returns dict(rc=..., killed=bool, leftover=[pids still alive]).
    """
    info = {"rc": p.poll(), "killed": False, "leftover": []}
    info["was_running"] = info["rc"] is None
    if info["rc"] is None:
        try:
            p.send_signal(sig)
        except ProcessLookupError:
            pass
        try:
            info["rc"] = p.wait(timeout)
        except subprocess.TimeoutExpired:
            info["killed"] = True
            killpg(p.pid, signal.SIGKILL)
            try:
                info["rc"] = p.wait(5)
            except subprocess.TimeoutExpired:
                info["rc"] = None
    # Sweep anything left in the group (socat's forked children, ...).
    deadline = time.monotonic() + 5
    left = pgroup_members(p.pid)
    while left and time.monotonic() < deadline:
        killpg(p.pid, signal.SIGKILL)
        time.sleep(0.05)
        left = pgroup_members(p.pid)
    info["leftover"] = left
    if p in _PROCS:
        _PROCS.remove(p)
    return info


def cleanup_all():
    for p in list(_PROCS):
        if p.poll() is None:
            killpg(p.pid, signal.SIGTERM)
    t0 = time.monotonic()
    for p in list(_PROCS):
        try:
            p.wait(max(0.1, 2 - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            pass
        killpg(p.pid, signal.SIGKILL)
        try:
            p.wait(2)
        except subprocess.TimeoutExpired:
            pass
    _PROCS.clear()


def _on_signal(signum, _frame):
    # SIGTERM/SIGHUP: stop like Ctrl-C (report what was measured, kill everything)
    raise KeyboardInterrupt("signal %d" % signum)


def run_cmd(cmd, timeout, cwd=None, env=None):
    """Run cmd to completion (killed after timeout). Returns (rc, stdout, stderr)."""
    p = spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd, env=env)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate(timeout=10)
        _PROCS.remove(p)
        raise BenchError("timed out after %ss: %s" % (timeout, " ".join(cmd))) from None
    _PROCS.remove(p)
    return p.returncode, out.decode(errors="replace"), err.decode(errors="replace")


# ----------------------------------------------------------------------------
# /proc helpers

def read_stat(pid):
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read().decode(errors="replace")
    except OSError:
        return None
    rp = data.rfind(")")
    fields = data[rp + 2:].split()
    # fields[0] is field 3 (state) of proc(5)
    return {
        "state": fields[0],
        "ppid": int(fields[1]),
        "pgrp": int(fields[2]),
        "ticks": sum(int(x) for x in fields[11:15]),  # utime stime cutime cstime
    }


def process_tree(root):
    """root plus all its descendants (by scanning /proc for ppid)."""
    children = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        st = read_stat(int(d))
        if st:
            children.setdefault(st["ppid"], []).append(int(d))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def tree_cpu_seconds(root):
    """utime+stime (+cutime+cstime of reaped children) summed over the tree."""
    total = 0
    for pid in process_tree(root):
        st = read_stat(pid)
        if st:
            total += st["ticks"]
    return total / CLK_TCK


def _status_kib(pid, key):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _pss_kib(pid):
    try:
        with open("/proc/%d/smaps_rollup" % pid) as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_memory_kib(root):
    pids = process_tree(root)
    return {
        "rss_kib": sum(_status_kib(p, "VmRSS") for p in pids),
        "pss_kib": sum(_pss_kib(p) for p in pids),
        "nprocs": len(pids),
    }


def listening_ports(pid=None):
    """Ports of IPv4 LISTEN sockets on 127.0.0.1/0.0.0.0, optionally only those
    owned by pid (matched through socket inodes in /proc/PID/fd)."""
    inodes = None
    if pid is not None:
        inodes = set()
        try:
            for fd in os.listdir("/proc/%d/fd" % pid):
                try:
                    link = os.readlink("/proc/%d/fd/%s" % (pid, fd))
                except OSError:
                    continue
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            return set()
    ports = set()
    try:
        with open("/proc/net/tcp") as f:
            next(f)
            for line in f:
                parts = line.split()
                local, state, inode = parts[1], parts[3], parts[9]
                if state != "0A":
                    continue
                addr, port = local.split(":")
                if addr not in ("0100007F", "00000000"):
                    continue
                if inodes is not None and inode not in inodes:
                    continue
                ports.add(int(port, 16))
    except OSError:
        pass
    return ports


def free_port():
    s = socket.socket()
    s.bind((HOST, 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_listening(port, proc, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchError("%s exited with %s before listening" % (what, proc.returncode))
        if port in listening_ports():
            return
        time.sleep(0.02)
    raise BenchError("%s not listening on port %d after %ss" % (what, port, timeout))


def tail(path, n=5):
    try:
        with open(path, errors="replace") as f:
            lines = f.read().splitlines()
        return " | ".join(lines[-n:])
    except OSError:
        return ""


# ----------------------------------------------------------------------------
# Forwarders

class Forwarder:
    """One forwarder process, started fresh per measurement."""

    def __init__(self, name, args, workdir):
        self.name = name
        self.args = args
        self.workdir = workdir
        self.proc = None
        self.port = None
        self.stop_info = None
        self.logpath = None

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def start(self, target_port):
        if self.name == "direct":
            self.port = target_port
            return self.port
        self.logpath = os.path.join(self.workdir, "%s.%d.log" % (self.name, time.monotonic_ns()))
        logf = open(self.logpath, "wb")
        target = "%s:%d" % (HOST, target_port)
        env = None
        cwd = None
        if self.name.startswith("gproxy") or self.name in ("naive", "uvloop"):
            if self.name.startswith("gproxy"):
                repo, extra = REPO, []
                if self.name == "gproxy-nosplice":
                    extra = ["--no-splice"]
                elif self.name == "gproxy-workers":
                    extra = ["--workers", str(self.args.parallel)]
                elif self.name in self.args.variants:
                    repo, extra = self.args.variants[self.name]
                cmd = shlex.split(self.args.gproxy_cmd) + shlex.split(self.args.gproxy_args) + extra
                env = dict(os.environ)
                env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
                cwd = repo
            elif self.name == "uvloop":
                cmd = [sys.executable, os.path.join(HERE, "uvloop_forwarder.py")]
            else:
                cmd = [sys.executable, os.path.join(HERE, "naive_forwarder.py")]
            cmd = cmd + ["%s:0" % HOST, target]
            self.proc = spawn(cmd, stdout=logf, stderr=logf, cwd=cwd, env=env)
            logf.close()
            self.port = self._wait_banner(timeout=30)
        elif self.name in ("haproxy", "haproxy-threads"):
            self.port = free_port()
            cfg = os.path.join(self.workdir, "haproxy.cfg")
            with open(cfg, "w") as f:
                f.write(haproxy_config(self.port, target_port, self.args,
                                       self.args.parallel if self.name == "haproxy-threads" else 1))
            self.proc = spawn(["haproxy", "-db", "-f", cfg], stdout=logf, stderr=logf)
            logf.close()
            self._wait_port(timeout=15)
        elif self.name == "socat":
            self.port = free_port()
            cmd = ["socat",
                   "TCP-LISTEN:%d,bind=%s,reuseaddr,fork,backlog=1024" % (self.port, HOST),
                   "TCP:%s" % target]
            self.proc = spawn(cmd, stdout=logf, stderr=logf)
            logf.close()
            self._wait_port(timeout=15)
        else:
            raise BenchError("unknown forwarder %s" % self.name)
        return self.port

    def _wait_banner(self, timeout):
        """Parse 'listening on HOST:PORT -> TARGET' from stderr."""
        rx = re.compile(r"listening on (\S+):(\d+) -> ")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with open(self.logpath, errors="replace") as f:
                    m = rx.search(f.read())
            except OSError:
                m = None
            if m:
                port = int(m.group(2))
                # the banner may precede listen() by a hair: wait for the socket
                # (--workers: every worker's own socket)
                want = self.args.parallel if self.name == "gproxy-workers" else 1
                end2 = time.monotonic() + 15
                while self._listeners(port) < want and time.monotonic() < end2:
                    time.sleep(0.01)
                return port
            if self.proc.poll() is not None:
                raise BenchError("%s exited with %s at start: %s"
                                 % (self.name, self.proc.returncode, tail(self.logpath)))
            time.sleep(0.02)
        # Fallback: the process listens but printed no banner.
        ports = listening_ports(self.pid)
        if len(ports) == 1:
            log("WARNING: %s printed no 'listening on' line; using its socket's port" % self.name)
            return ports.pop()
        raise BenchError("%s printed no 'listening on' line in %ss: %s"
                         % (self.name, timeout, tail(self.logpath)))

    def _listeners(self, port):
        return sum(1 for pid in process_tree(self.pid) if port in listening_ports(pid))

    def _wait_port(self, timeout):
        try:
            wait_listening(self.port, self.proc, timeout, self.name)
        except BenchError as e:
            raise BenchError("%s: %s" % (e, tail(self.logpath))) from None

    def cpu(self):
        return tree_cpu_seconds(self.pid) if self.proc else None

    def memory(self):
        return tree_memory_kib(self.pid) if self.proc else None

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self):
        if not self.proc:
            return None
        self.stop_info = stop_proc(self.proc, signal.SIGTERM, timeout=self.args.stop_timeout)
        if self.stop_info["leftover"]:
            log("WARNING: %s left processes behind: %s" % (self.name, self.stop_info["leftover"]))
        if self.stop_info["killed"]:
            log("WARNING: %s did not exit within %s s of SIGTERM; killed"
                % (self.name, self.args.stop_timeout))
        return self.stop_info


def haproxy_config(port, target_port, args, nbthread=1):
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    # haproxy wants ~2 fds per connection plus 2 per splice pipe.
    maxconn = max(2000, max(args.idle_conns or [0]) + 500)
    maxpipes = 500
    if hard != resource.RLIM_INFINITY:
        maxconn = min(maxconn, (hard - 2 * maxpipes - 200) // 2)
    return """\
global
    maxconn {maxconn}
    maxpipes {maxpipes}
    nbthread {nbthread}
defaults
    mode tcp
{splice}
    timeout connect 10s
    timeout client 1h
    timeout server 1h
    maxconn {maxconn}
frontend fwd
    bind {host}:{port}
    default_backend up
backend up
    server s1 {host}:{target}
""".format(maxconn=maxconn, maxpipes=maxpipes, host=HOST, port=port, target=target_port,
           nbthread=nbthread,
           splice={"auto": "    option splice-auto",
                   "always": "    option splice-request\n    option splice-response",
                   "off": "    # no splicing"}[args.haproxy_splice])


# ----------------------------------------------------------------------------
# Upstream servers

class Server:
    def __init__(self, kind, workdir):
        self.kind = kind
        self.workdir = workdir
        self.port = free_port()
        self.logpath = os.path.join(workdir, "%s.%d.log" % (kind, time.monotonic_ns()))
        logf = open(self.logpath, "wb")
        if kind == "iperf3":
            cmd = ["iperf3", "-s", "-1", "-B", HOST, "-p", str(self.port)]
        elif kind == "sockperf":
            cmd = ["sockperf", "sr", "--tcp", "-i", HOST, "-p", str(self.port)]
        elif kind == "fairness":
            cmd = [sys.executable, os.path.join(HERE, "fairness.py"), "server", str(self.port)]
        elif kind == "redis":
            cmd = ["redis-server", "--port", str(self.port), "--bind", HOST,
                   "--save", "", "--appendonly", "no", "--daemonize", "no",
                   "--protected-mode", "no", "--maxclients", "10000",
                   "--dir", workdir, "--logfile", ""]
        else:
            raise BenchError("unknown server %s" % kind)
        self.proc = spawn(cmd, stdout=logf, stderr=logf)
        logf.close()
        try:
            wait_listening(self.port, self.proc, 15, kind)
        except BenchError as e:
            self.stop()
            raise BenchError("%s: %s" % (e, tail(self.logpath))) from None

    def stop(self):
        stop_proc(self.proc, signal.SIGTERM if self.kind != "sockperf" else signal.SIGINT, timeout=5)


# ----------------------------------------------------------------------------
# Workloads. Each takes the forwarder port and returns a dict of metrics;
# the caller wraps them with the forwarder's CPU time.

def wl_iperf3(fwd, args, workdir, extra):
    srv = Server("iperf3", workdir)
    try:
        port = fwd.start(srv.port)
        cpu0 = fwd.cpu()
        cmd = ["iperf3", "-c", HOST, "-p", str(port), "-t", str(args.seconds), "-J",
               "--connect-timeout", "5000"] + extra
        rc, out, err = run_cmd(cmd, timeout=args.seconds + 30)
        cpu1 = fwd.cpu()
        try:
            data = json.loads(out)
        except ValueError:
            raise BenchError("iperf3 rc=%s, no JSON: %s %s" % (rc, out[-300:], err[-300:])) from None
        if data.get("error"):
            raise BenchError("iperf3: %s" % data["error"])
        s = data["end"]["sum_received"]
        res = {"gbps": s["bits_per_second"] / 1e9, "bytes": s["bytes"]}
        if cpu0 is not None:
            res["cpu_s"] = cpu1 - cpu0
            res["cpu_ms_per_gb"] = res["cpu_s"] * 1e3 / (s["bytes"] / 1e9) if s["bytes"] else None
        return res
    finally:
        srv.stop()


def parse_sockperf(text):
    text = ANSI_RE.sub("", text)

    def grab(rx):
        m = re.search(rx, text)
        if not m:
            raise BenchError("sockperf output lacks %r: %s" % (rx, text[-400:]))
        return float(m.group(1))

    res = {
        "p50_us": grab(r"percentile 50\.000 =\s*([\d.]+)"),
        "p99_us": grab(r"percentile 99\.000 =\s*([\d.]+)"),
        "p999_us": grab(r"percentile 99\.900 =\s*([\d.]+)"),
        "avg_us": grab(r"avg-latency=([\d.]+)"),
        "valid_msgs": int(grab(r"\[Valid Duration\].*?ReceivedMessages=(\d+)")),
        "total_msgs": int(grab(r"\[Total Run\].*?ReceivedMessages=(\d+)")),
        "valid_s": grab(r"\[Valid Duration\] RunTime=([\d.]+)"),
    }
    return res


def wl_pingpong(fwd, args, workdir):
    srv = Server("sockperf", workdir)
    try:
        port = fwd.start(srv.port)
        cpu0 = fwd.cpu()
        cmd = ["sockperf", "pp", "--tcp", "-i", HOST, "-p", str(port),
               "-m", "64", "-t", str(args.seconds)]
        rc, out, err = run_cmd(cmd, timeout=args.seconds + 30)
        cpu1 = fwd.cpu()
        if rc != 0:
            raise BenchError("sockperf rc=%s: %s" % (rc, ANSI_RE.sub("", (out + err)[-400:])))
        res = parse_sockperf(out + "\n" + err)
        if cpu0 is not None:
            res["cpu_s"] = cpu1 - cpu0
            res["cpu_us_per_msg"] = res["cpu_s"] * 1e6 / res["total_msgs"] if res["total_msgs"] else None
        return res
    finally:
        srv.stop()


def wl_fairness(fwd, args, workdir):
    """64-byte round trips on one connection while another pulls an unpaced bulk stream from
    the same target through the same forwarder (fairness.py: both ends)."""
    srv = Server("fairness", workdir)
    try:
        port = fwd.start(srv.port)
        cpu0 = fwd.cpu()
        cmd = [sys.executable, os.path.join(HERE, "fairness.py"), "client", str(port),
               str(args.seconds)]
        rc, out, err = run_cmd(cmd, timeout=args.seconds + 60)
        cpu1 = fwd.cpu()
        if rc != 0:
            raise BenchError("fairness client rc=%s: %s %s" % (rc, out[-300:], err[-300:]))
        try:
            res = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise BenchError("fairness client printed no JSON: %s %s" % (out[-300:], err[-300:])) from None
        if cpu0 is not None:
            res["cpu_s"] = cpu1 - cpu0
        return res
    finally:
        srv.stop()


def wl_redis(fwd, args, workdir, keepalive):
    srv = Server("redis", workdir)
    try:
        port = fwd.start(srv.port)
        n = args.redis_n if keepalive else args.redis_conn_n
        cmd = ["redis-benchmark", "-h", HOST, "-p", str(port), "-c", "50", "-n", str(n),
               "-t", "get", "-q", "--csv"]
        if not keepalive:
            cmd += ["-k", "0"]
        cpu0 = fwd.cpu()
        t0 = time.monotonic()
        rc, out, err = run_cmd(cmd, timeout=args.redis_timeout)
        wall = time.monotonic() - t0
        cpu1 = fwd.cpu()
        rps = None
        for row in csv.reader(io.StringIO(out)):
            if row and row[0] == "GET" and len(row) > 1:
                rps = float(row[1])
        if rc != 0 or rps is None:
            raise BenchError("redis-benchmark rc=%s: %s %s" % (rc, out[-300:], err[-300:]))
        res = {"rps": rps, "n": n, "wall_s": wall}
        if cpu0 is not None:
            res["cpu_s"] = cpu1 - cpu0
            res["cpu_us_per_req"] = res["cpu_s"] * 1e6 / n
        return res
    finally:
        srv.stop()


class IdleHelper:
    """Talks to `bench.py --idle-helper` (clients + holding upstream server)."""

    def __init__(self):
        self.proc = spawn([sys.executable, os.path.abspath(__file__), "--idle-helper"],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.proc.stdout, selectors.EVENT_READ)
        self.buf = b""
        line = self.readline(20)
        if not line.startswith("port "):
            raise BenchError("idle helper said %r" % line)
        self.port = int(line.split()[1])

    def readline(self, timeout):
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError("idle helper timed out")
            if self.sel.select(left):
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    raise BenchError("idle helper exited (rc=%s)" % self.proc.poll())
                self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode().strip()

    def cmd(self, text, timeout):
        self.proc.stdin.write((text + "\n").encode())
        self.proc.stdin.flush()
        reply = self.readline(timeout)
        if not reply.startswith("ok"):
            raise BenchError("idle helper: %s" % reply)
        return dict(kv.split("=", 1) for kv in reply.split()[1:])

    def stop(self):
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        self.sel.close()
        stop_proc(self.proc, signal.SIGTERM, timeout=5)


def wl_idle(fwd, args, workdir, k, spoken=False):
    """K idle connections end to end; with spoken, each first exchanged one small message
    (client -> upstream -> client), and they idle --spoken-idle seconds before the reading."""
    helper = IdleHelper()
    try:
        port = fwd.start(helper.port)
        # warm up (first connections may import/allocate lazily), then settle
        warm_timeout = min(60, args.idle_timeout)
        helper.cmd("connect %d 10 %d" % (port, warm_timeout), timeout=warm_timeout + 10)
        helper.cmd("drop", timeout=30)
        time.sleep(0.5)
        mem0 = fwd.memory()
        cpu0 = fwd.cpu()
        t0 = time.monotonic()
        info = helper.cmd("connect %d %d %d" % (port, k, args.idle_timeout),
                          timeout=args.idle_timeout + 10)
        setup_s = time.monotonic() - t0
        if spoken:
            helper.cmd("talk %d" % args.idle_timeout, timeout=args.idle_timeout + 10)
            time.sleep(args.spoken_idle)
        time.sleep(args.idle_settle)
        check = helper.cmd("check", timeout=60)
        if int(check["dead"]):
            raise BenchError("%s of %d idle connections were closed" % (check["dead"], k))
        mem1 = fwd.memory()
        cpu1 = fwd.cpu()
        if not fwd.alive():
            raise BenchError("forwarder died")
        res = {
            "k": k,
            "rss_before_kib": mem0["rss_kib"], "rss_after_kib": mem1["rss_kib"],
            "pss_before_kib": mem0["pss_kib"], "pss_after_kib": mem1["pss_kib"],
            "nprocs": mem1["nprocs"],
            "kib_per_conn": (mem1["rss_kib"] - mem0["rss_kib"]) / k,
            "pss_kib_per_conn": (mem1["pss_kib"] - mem0["pss_kib"]) / k,
            "setup_s": setup_s,
            "accepted": int(info["accepted"]),
            "cpu_s": cpu1 - cpu0,
            "cpu_us_per_conn": (cpu1 - cpu0) * 1e6 / k,
        }
        helper.cmd("drop", timeout=60)
        return res
    finally:
        helper.stop()


# ----------------------------------------------------------------------------
# The idle-connection helper process (bench.py --idle-helper).
# stdin commands, one per line; each answered by one line on stdout:
#   connect PORT K SECS -> open K clients to 127.0.0.1:PORT, at most WINDOW not yet
#                      seen by the upstream; wait until the upstream listener
#                      has accepted K more connections, for at most SECS.
#                      "ok accepted=K secs=T" or "error ..."
#   check           -> poll all sockets; "ok dead=N" (N readable = closed/reset)
#   drop            -> close all clients and upstream connections. "ok"
# It first prints "port P" (its upstream listener).

def idle_helper_main():
    raise_nofile()
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((HOST, 0))
    lsock.listen(4096)
    lsock.setblocking(False)
    print("port %d" % lsock.getsockname()[1], flush=True)
    clients, uppers = [], []
    window = 200

    def reply(text):
        print(text, flush=True)

    for line in sys.stdin:
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "connect":
            port, k = int(parts[1]), int(parts[2])
            deadline_s = float(parts[3]) if len(parts) > 3 else 600
            addr = (HOST, port)
            sel = selectors.DefaultSelector()
            sel.register(lsock, selectors.EVENT_READ, "L")
            base = len(uppers)
            started = 0
            pending = 0
            error = None
            t0 = time.monotonic()
            while len(uppers) - base < k or pending:
                while started < k and started - (len(uppers) - base) < window:
                    s = socket.socket()
                    s.setblocking(False)
                    err = s.connect_ex(addr)
                    started += 1
                    if err in (0, errno.EINPROGRESS):
                        sel.register(s, selectors.EVENT_WRITE, "C")
                        pending += 1
                    else:
                        s.close()
                        error = "connect: %s" % os.strerror(err)
                        break
                if error:
                    break
                if time.monotonic() - t0 > deadline_s:
                    error = "timeout: %d of %d accepted upstream, %d connecting" % (
                        len(uppers) - base, k, pending)
                    break
                for key, _ev in sel.select(0.5):
                    if key.data == "L":
                        while True:
                            try:
                                c, _ = lsock.accept()
                            except (BlockingIOError, InterruptedError):
                                break
                            uppers.append(c)
                    else:
                        s = key.fileobj
                        sel.unregister(s)
                        pending -= 1
                        err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        if err:
                            s.close()
                            error = "connect: %s" % os.strerror(err)
                        else:
                            clients.append(s)
                if error:
                    break
            sel.close()
            if error:
                reply("error %s" % error)
            else:
                reply("ok accepted=%d secs=%.3f" % (len(uppers) - base, time.monotonic() - t0))
        elif parts[0] == "talk":
            # every client sends one message, its upstream end answers, the client reads it
            deadline = time.monotonic() + (float(parts[1]) if len(parts) > 1 else 600)
            message = b"m" * 32
            sel = selectors.DefaultSelector()
            for c in clients:
                c.sendall(message)
                sel.register(c, selectors.EVENT_READ, "C")
            for u in uppers:
                sel.register(u, selectors.EVENT_READ, "U")
            waiting, error = len(clients), None
            got = {}
            while waiting and not error:
                if time.monotonic() > deadline:
                    error = "timeout: %d of %d replies missing" % (waiting, len(clients))
                    break
                for key, _ev in sel.select(0.5):
                    sock = key.fileobj
                    try:
                        data = sock.recv(64)
                    except (BlockingIOError, InterruptedError):
                        continue
                    if not data:
                        error = "a connection closed during the exchange"
                        break
                    n = got[sock] = got.get(sock, 0) + len(data)
                    if n >= len(message):
                        sel.unregister(sock)
                        if key.data == "U":
                            sock.sendall(message)
                        else:
                            waiting -= 1
            sel.close()
            reply("error %s" % error if error else "ok talked=%d" % len(clients))
        elif parts[0] == "check":
            sel = selectors.DefaultSelector()
            for s in clients + uppers:
                sel.register(s, selectors.EVENT_READ)
            dead = len(sel.select(0))
            sel.close()
            reply("ok dead=%d clients=%d uppers=%d" % (dead, len(clients), len(uppers)))
        elif parts[0] == "drop":
            for s in clients + uppers:
                s.close()
            clients, uppers = [], []
            reply("ok")
        else:
            reply("error unknown command %r" % parts[0])
    return 0


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


# ----------------------------------------------------------------------------
# Driver

WL_INFO = {
    "bulk_up": ("iperf3 bulk, 1 stream client->server, Gbit/s (sum_received)", "gbps", True,
                "cpu_ms_per_gb", "CPU ms/GB"),
    "bulk_down": ("iperf3 bulk, 1 stream server->client (-R), Gbit/s", "gbps", True,
                  "cpu_ms_per_gb", "CPU ms/GB"),
    "bulk_p4": ("iperf3 bulk, 4 parallel streams client->server (-P 4), Gbit/s", "gbps", True,
                "cpu_ms_per_gb", "CPU ms/GB"),
    "pingpong": ("sockperf ping-pong, 64-byte messages, TCP; latency in us as sockperf "
                 "reports it (half the round trip)", "p50_us", False,
                 "cpu_us_per_msg", "CPU us/round trip"),
    "redis_ka": ("redis-benchmark GET, 50 clients, keep-alive, requests/s", "rps", True,
                 "cpu_us_per_req", "CPU us/req"),
    "redis_conn": ("redis-benchmark GET, 50 clients, new connection per request (-k 0), "
                   "connections/s", "rps", True, "cpu_us_per_req", "CPU us/conn"),
}


def run_one(wl, fname, args, workdir):
    fwd = Forwarder(fname, args, workdir)
    rec = {"workload": wl, "forwarder": fname}
    t0 = time.monotonic()
    try:
        if wl == "bulk_up":
            m = wl_iperf3(fwd, args, workdir, [])
        elif wl == "bulk_down":
            m = wl_iperf3(fwd, args, workdir, ["-R"])
        elif wl == "bulk_p4":
            m = wl_iperf3(fwd, args, workdir, ["-P", "4"])
        elif wl == "pingpong":
            m = wl_pingpong(fwd, args, workdir)
        elif wl == "fairness":
            m = wl_fairness(fwd, args, workdir)
        elif wl == "redis_ka":
            m = wl_redis(fwd, args, workdir, keepalive=True)
        elif wl == "redis_conn":
            m = wl_redis(fwd, args, workdir, keepalive=False)
        elif wl.startswith("idle_"):
            m = wl_idle(fwd, args, workdir, int(wl.split("_")[1]))
        elif wl.startswith("spoken_"):
            m = wl_idle(fwd, args, workdir, int(wl.split("_")[1]), spoken=True)
        else:
            raise BenchError("unknown workload %s" % wl)
        if fwd.proc is not None and not fwd.alive():
            raise BenchError("forwarder exited during the run (rc=%s): %s"
                             % (fwd.proc.returncode, tail(fwd.logpath)))
        rec.update(ok=True, **m)
    except (BenchError, OSError, KeyError, ValueError) as e:
        rec.update(ok=False, error=oneline(str(e)))
    finally:
        st = fwd.stop()
        if st is not None:
            rec["exit_rc"] = st["rc"]
            rec["exit_on_sigterm"] = st["was_running"]
            rec["exit_killed"] = st["killed"]
            rec["leftover"] = st["leftover"]
            if not rec.get("ok") and fwd.logpath:
                rec["log_tail"] = tail(fwd.logpath)
    rec["wall_s"] = round(time.monotonic() - t0, 3)
    return rec


def oneline(text, limit=400):
    text = " ".join(ANSI_RE.sub("", text).split())
    return text if len(text) <= limit else text[:limit] + "..."


def fmt(x, digits=None):
    if x is None:
        return "n/a"
    if digits is None:
        ax = abs(x)
        digits = 0 if ax >= 1000 else 1 if ax >= 100 else 2 if ax >= 1 else 3
    return "{:,.{d}f}".format(x, d=digits)


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(results, workloads, forwarders, reps):
    """-> {wl: {fwd: {...medians...}}}; ratios per repetition vs direct."""
    summary = {}
    for wl in workloads:
        summary[wl] = {}
        direct = {r["rep"]: r for r in results
                  if r["workload"] == wl and r["forwarder"] == "direct" and r["ok"]}
        for f in forwarders:
            rs = [r for r in results if r["workload"] == wl and r["forwarder"] == f]
            ok = [r for r in rs if r["ok"]]
            s = {"runs": len(rs), "ok": len(ok),
                 "errors": sorted(set(r["error"] for r in rs if not r["ok"]))}
            keys = set()
            for r in ok:
                keys.update(k for k, v in r.items() if isinstance(v, (int, float))
                            and not isinstance(v, bool) and k not in ("rep",))
            for k in sorted(keys):
                vals = [r.get(k) for r in ok]
                s[k] = median(vals)
                s[k + "_min"] = min(v for v in vals if v is not None) if any(
                    v is not None for v in vals) else None
                s[k + "_max"] = max(v for v in vals if v is not None) if any(
                    v is not None for v in vals) else None
                ratios = [r[k] / direct[r["rep"]][k] for r in ok
                          if r["rep"] in direct and r.get(k) is not None
                          and direct[r["rep"]].get(k)]
                if ratios:
                    s[k + "_ratio"] = median(ratios)
            summary[wl][f] = s
    return summary


def report_tables(summary, workloads, forwarders, args):
    out = []
    for wl in workloads:
        rows = summary[wl]
        if wl.startswith(("idle_", "spoken_")):
            k = wl.split("_")[1]
            if wl.startswith("idle_"):
                out.append("### Memory per idle connection, K=%s, never spoke" % k)
                out.append("")
                out.append("RSS of the forwarder (process tree) with K idle connections "
                           "established end to end, minus its RSS before; PSS likewise "
                           "(the fair number for socat's fork-per-connection).")
            else:
                out.append("### Memory per idle connection, K=%s, after one exchange" % k)
                out.append("")
                out.append("As above, but every connection first carried one 32-byte "
                           "message each way (all K at once), then all idled %g s "
                           "before the reading." % args.spoken_idle)
            out.append("")
            out.append("| forwarder | KiB/conn (RSS) | range | KiB/conn (PSS) | processes "
                       "| setup s | CPU us/conn (setup) | ok |")
            out.append("|---|---:|---:|---:|---:|---:|---:|---:|")
            for f in forwarders:
                if f == "direct":
                    out.append("| direct | n/a | | n/a | | | | |")
                    continue
                s = rows.get(f)
                if not s or not s["runs"]:
                    out.append("| %s | not run | | | | | | |" % f)
                    continue
                if not s["ok"]:
                    out.append("| %s | failed | | | | | | 0/%d |" % (f, s["runs"]))
                    continue
                out.append("| %s | %s | %s–%s | %s | %s | %s | %s | %d/%d |" % (
                    f, fmt(s["kib_per_conn"]), fmt(s["kib_per_conn_min"]),
                    fmt(s["kib_per_conn_max"]), fmt(s["pss_kib_per_conn"]),
                    fmt(s["nprocs"], 0), fmt(s["setup_s"]), fmt(s["cpu_us_per_conn"]),
                    s["ok"], s["runs"]))
            out.append("")
            continue
        if wl == "fairness":
            out.extend(fairness_table(rows, forwarders))
            continue
        title, key, higher, cpukey, cpuname = WL_INFO[wl]
        out.append("### %s: %s" % (wl, title))
        out.append("")
        if wl == "pingpong":
            out.append("| forwarder | p50 us | p50 range | p99 us | added p50 us "
                       "| p50 ratio to direct | p99 ratio to direct | %s | ok |" % cpuname)
            out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        else:
            out.append("| forwarder | median %s | range | median ratio to direct | %s | ok |"
                       % (key, cpuname))
            out.append("|---|---:|---:|---:|---:|---:|")
        direct = rows.get("direct") or {}
        for f in forwarders:
            s = rows.get(f)
            if not s or not s["ok"]:
                ncol = 9 if wl == "pingpong" else 6
                runs = s["runs"] if s else 0
                out.append("| %s | %s |%s %s |" % (f, "failed" if runs else "not run",
                                                   " |" * (ncol - 3),
                                                   "0/%d" % runs if runs else ""))
                continue
            cpu = "n/a" if f == "direct" else fmt(s.get(cpukey))
            if wl == "pingpong":
                added = (s["p50_us"] - direct["p50_us"]) if direct.get("p50_us") is not None else None
                out.append("| %s | %s | %s–%s | %s | %s | %s | %s | %s | %d/%d |" % (
                    f, fmt(s["p50_us"]), fmt(s["p50_us_min"]), fmt(s["p50_us_max"]),
                    fmt(s["p99_us"]), fmt(added), fmt(s.get("p50_us_ratio"), 2),
                    fmt(s.get("p99_us_ratio"), 2), cpu, s["ok"], s["runs"]))
            else:
                out.append("| %s | %s | %s–%s | %s | %s | %d/%d |" % (
                    f, fmt(s[key]), fmt(s[key + "_min"]), fmt(s[key + "_max"]),
                    fmt(s.get(key + "_ratio"), 3), cpu, s["ok"], s["runs"]))
        out.append("")
    return "\n".join(out)


def fairness_table(rows, forwarders):
    out = ["### fairness: 64-byte round trips while another connection pulls an unpaced bulk "
           "stream through the same forwarder", "",
           "Whole round trips in us (not halved), timed by the client (fairness.py, Python: "
           "its own overhead is in direct too); bulk = Gbit/s the other connection pulled "
           "meanwhile.", "",
           "| forwarder | p50 us | p99 us | p99 range | p99.9 us | p99 ratio to direct "
           "| round trips | bulk Gbit/s | bulk ratio to direct | ok |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for f in forwarders:
        s = rows.get(f)
        if not s or not s["ok"]:
            runs = s["runs"] if s else 0
            out.append("| %s | %s | | | | | | | | %s |" % (
                f, "failed" if runs else "not run", "0/%d" % runs if runs else ""))
            continue
        out.append("| %s | %s | %s | %s–%s | %s | %s | %s | %s | %s | %d/%d |" % (
            f, fmt(s["p50_us"]), fmt(s["p99_us"]), fmt(s["p99_us_min"]), fmt(s["p99_us_max"]),
            fmt(s["p999_us"]), fmt(s.get("p99_us_ratio"), 2), fmt(s["round_trips"], 0),
            fmt(s["bulk_gbps"]), fmt(s.get("bulk_gbps_ratio"), 3), s["ok"], s["runs"]))
    out.append("")
    return out


def first_line(cmd, pattern=None):
    try:
        rc, out, err = run_cmd(cmd, timeout=20)
    except (BenchError, OSError) as e:
        return "unavailable (%s)" % e
    text = ANSI_RE.sub("", out + "\n" + err)
    for line in text.splitlines():
        line = line.strip()
        if line and (pattern is None or re.search(pattern, line)):
            return line
    return "unknown"


def environment(args):
    env = {}
    env["date"] = datetime.datetime.now(datetime.timezone.utc).astimezone().isoformat(timespec="seconds")
    env["python"] = "%s (%s)" % (platform.python_version(), sys.executable)
    try:
        import gevent
        env["gevent"] = gevent.__version__
    except ImportError:
        env["gevent"] = "not importable"
    env["kernel"] = platform.release()
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    env["cpu"] = cpu
    env["cores"] = os.cpu_count()
    env["loadavg_start"] = open("/proc/loadavg").read().split()[:3]
    env["haproxy"] = first_line(["haproxy", "-v"], r"version")
    env["socat"] = first_line(["socat", "-V"], r"socat version")
    env["iperf3"] = first_line(["iperf3", "--version"], r"iperf")
    env["sockperf"] = first_line(["sockperf", "--version"], r"version")
    env["redis"] = first_line(["redis-server", "--version"], r"v=")
    genv = dict(os.environ)
    genv["PYTHONPATH"] = REPO + (os.pathsep + genv["PYTHONPATH"] if genv.get("PYTHONPATH") else "")
    if any(f.startswith("gproxy") for f in args.forwarders):
        env["gproxy_cmd"] = "%s %s LISTEN TARGET" % (args.gproxy_cmd, args.gproxy_args)
        try:
            rc, out, err = run_cmd([sys.executable, "-c",
                                    "import gproxy; print(getattr(gproxy, '__version__', '?'))"],
                                   timeout=20, cwd=REPO, env=genv)
            env["gproxy_version"] = out.strip() if rc == 0 else "import failed"
        except (BenchError, OSError):
            env["gproxy_version"] = "unknown"
        try:
            rc, out, _ = run_cmd(["git", "--no-optional-locks", "-C", REPO, "rev-parse",
                                  "--short", "HEAD"], timeout=20)
            env["gproxy_commit"] = out.strip() if rc == 0 else "none"
        except (BenchError, OSError):
            env["gproxy_commit"] = "unknown"
    env["nofile"] = list(resource.getrlimit(resource.RLIMIT_NOFILE))
    return env


def parse_args(argv):
    ap = argparse.ArgumentParser(
        description="Benchmark gproxy against direct, haproxy, socat and a naive gevent "
                    "forwarder on 127.0.0.1.")
    ap.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    ap.add_argument("--seconds", type=int, default=3,
                    help="duration of each iperf3 / sockperf run (default 3)")
    ap.add_argument("--only", default=",".join(ALL_FORWARDERS),
                    help="comma list of forwarders (default %(default)s)")
    ap.add_argument("--workloads", default="bulk,pingpong,fairness,redis,idle",
                    help="comma list of workloads or groups: bulk (bulk_up,bulk_down,bulk_p4), "
                         "pingpong, fairness, redis (redis_ka,redis_conn), idle "
                         "(default %(default)s)")
    ap.add_argument("--redis-n", type=int, default=100000,
                    help="requests for the keep-alive redis run (default %(default)s)")
    ap.add_argument("--redis-conn-n", type=int, default=15000,
                    help="requests (= connections) for the -k 0 redis run (default %(default)s)")
    ap.add_argument("--redis-timeout", type=int, default=180,
                    help="timeout of one redis-benchmark run, s (default %(default)s)")
    ap.add_argument("--idle-conns", default="1000,8000",
                    help="comma list of idle connection counts K (default %(default)s)")
    ap.add_argument("--idle-timeout", type=int, default=300,
                    help="timeout to establish K idle connections, s (default %(default)s)")
    ap.add_argument("--spoken-idle", type=float, default=10.0,
                    help="spoken_K: idle time after the exchange before reading RSS, s "
                         "(default %(default)s)")
    ap.add_argument("--idle-settle", type=float, default=1.0,
                    help="wait after establishing idle connections before reading RSS, s")
    ap.add_argument("--pause", type=float, default=0.3,
                    help="pause between measurements, s (default %(default)s)")
    ap.add_argument("--gproxy-cmd", default="%s -m gproxy" % shlex.quote(sys.executable),
                    help="command that runs gproxy (run with cwd and PYTHONPATH = repo root; "
                         "default: %(default)s)")
    ap.add_argument("--gproxy-args", default="-q",
                    help="extra gproxy options before LISTEN TARGET (default %(default)s)")
    ap.add_argument("--parallel", type=int, default=2,
                    help="N for gproxy-workers (--workers N) and haproxy-threads (nbthread N); "
                         "default %(default)s")
    ap.add_argument("--haproxy-splice", choices=("auto", "always", "off"), default="auto",
                    help="haproxy: option splice-auto (default), splice-request + "
                         "splice-response, or no splicing")
    ap.add_argument("--stop-timeout", type=float, default=15,
                    help="wait this long for a forwarder to exit after SIGTERM before "
                         "SIGKILL (default %(default)s)")
    ap.add_argument("--no-rotate", action="store_true",
                    help="same forwarder order every repetition")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=[@REPO ]ARGS",
                    help="an extra forwarder gproxy-NAME: gproxy with ARGS added, run from the "
                         "checkout REPO if given (A/B of options or of commits in one run; "
                         "select it with --only); repeatable")
    ap.add_argument("--json", metavar="PATH", help="save raw results and summary as JSON")
    ap.add_argument("--keep-logs", action="store_true",
                    help="keep the work directory with every process's log")
    ap.add_argument("--idle-helper", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.variants = {}
    for v in args.variant:
        name, sep, rest = v.partition("=")
        if not sep or not name:
            ap.error("--variant wants NAME=ARGS, got %r" % v)
        words = shlex.split(rest)
        repo = REPO
        if words and words[0].startswith("@"):
            repo = os.path.abspath(words.pop(0)[1:])
        args.variants["gproxy-" + name] = (repo, words)
    args.forwarders = [f.strip() for f in args.only.split(",") if f.strip()]
    for f in args.forwarders:
        if f not in ALL_FORWARDERS + EXTRA_FORWARDERS + list(args.variants):
            ap.error("unknown forwarder %r (choose from %s)"
                     % (f, ", ".join(ALL_FORWARDERS + EXTRA_FORWARDERS)))
    wls = []
    for w in args.workloads.split(","):
        w = w.strip()
        if not w:
            continue
        if w in WORKLOAD_GROUPS:
            wls.extend(WORKLOAD_GROUPS[w])
        elif w in ALL_WORKLOADS:
            wls.append(w)
        else:
            ap.error("unknown workload %r" % w)
    args.idle_conns = [int(x) for x in args.idle_conns.split(",") if x.strip()]
    args.workload_list = []
    for w in ALL_WORKLOADS:
        if w in wls:
            if w == "idle":
                args.workload_list.extend("idle_%d" % k for k in args.idle_conns)
                args.workload_list.extend("spoken_%d" % k for k in args.idle_conns)
            else:
                args.workload_list.append(w)
    if args.reps < 1 or args.seconds < 1:
        ap.error("--reps and --seconds must be >= 1")
    return args


def check_tools(args):
    need = set()
    wl = args.workload_list
    if any(w.startswith("bulk") for w in wl):
        need.add("iperf3")
    if "pingpong" in wl:
        need.add("sockperf")
    if any(w.startswith("redis") for w in wl):
        need.update(["redis-server", "redis-benchmark"])
    for f in ("haproxy", "socat"):
        if f in args.forwarders or f + "-threads" in args.forwarders:
            need.add(f)
    missing = sorted(t for t in need if shutil.which(t) is None)
    if missing:
        sys.exit("missing tools: %s (run: bash benchmarks/setup.sh)" % ", ".join(missing))


def main(argv=None):
    args = parse_args(argv)
    if args.idle_helper:
        return idle_helper_main()
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    atexit.register(cleanup_all)
    soft, hard = raise_nofile()
    need = 2 * max(args.idle_conns or [0]) + 200
    if any(w.startswith("idle") for w in args.workload_list) and soft < need:
        sys.exit("fd limit %d too low for %d idle connections (needs ~%d)"
                 % (soft, max(args.idle_conns), need))
    check_tools(args)
    workdir = tempfile.mkdtemp(prefix="gproxy-bench-")
    t_start = time.monotonic()
    env = environment(args)
    log("work dir %s; forwarders %s; workloads %s; %d reps"
        % (workdir, ",".join(args.forwarders), ",".join(args.workload_list), args.reps))
    results = []
    interrupted = False
    try:
        for rep in range(args.reps):
            for wl in args.workload_list:
                order = list(args.forwarders)
                if not args.no_rotate:
                    r = rep % len(order)
                    order = order[r:] + order[:r]
                for f in order:
                    if wl.startswith(("idle_", "spoken_")) and f == "direct":
                        continue
                    if f in PARALLEL_FORWARDERS and wl not in PARALLEL_WORKLOADS:
                        continue
                    rec = run_one(wl, f, args, workdir)
                    rec["rep"] = rep
                    results.append(rec)
                    if rec["ok"]:
                        brief = ", ".join("%s=%s" % (k, fmt(rec[k])) for k in
                                          ("gbps", "p50_us", "p99_us", "rps", "kib_per_conn",
                                           "cpu_ms_per_gb", "cpu_us_per_msg",
                                           "cpu_us_per_req", "cpu_us_per_conn")
                                          if rec.get(k) is not None)
                    else:
                        brief = "FAILED: %s" % rec["error"]
                    log("rep %d/%d %-10s %-8s %s (%.1fs)" % (rep + 1, args.reps, wl, f, brief,
                                                          rec["wall_s"]))
                    if args.pause:
                        time.sleep(args.pause)
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted; reporting what was measured")
    finally:
        cleanup_all()
        if not args.keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)

    done_wls = [w for w in args.workload_list if any(r["workload"] == w for r in results)]
    summary = summarize(results, done_wls, args.forwarders, args.reps)
    env["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    env["duration_s"] = round(time.monotonic() - t_start, 1)

    print("## gproxy benchmark, %s" % env["date"])
    print()
    print("- machine: %s, %s cores, Linux %s; load average at start %s, at end %s"
          % (env["cpu"], env["cores"], env["kernel"], " ".join(env["loadavg_start"]),
             " ".join(env["loadavg_end"])))
    print("- Python %s, gevent %s" % (env["python"], env["gevent"]))
    if any(f.startswith("gproxy") for f in args.forwarders):
        print("- gproxy %s (commit %s): `%s`" % (env.get("gproxy_version"),
                                                 env.get("gproxy_commit"), env.get("gproxy_cmd")))
    print("- %s (nbthread 1, splice: %s); %s" % (env["haproxy"], args.haproxy_splice, env["socat"]))
    if PARALLEL_FORWARDERS & set(args.forwarders):
        print("- gproxy-workers = gproxy --workers %d, haproxy-threads = haproxy nbthread %d; run on %s only"
              % (args.parallel, args.parallel, ", ".join(sorted(PARALLEL_WORKLOADS))))
    print("- %s; %s; %s" % (env["iperf3"], env["sockperf"], env["redis"]))
    print("- %d repetitions, interleaved%s; %s s per iperf3/sockperf run; redis -n %d "
          "(keep-alive), %d (-k 0); idle K = %s; all traffic on 127.0.0.1; run took %.0f s"
          % (args.reps, "" if args.no_rotate else ", forwarder order rotated per repetition",
             args.seconds, args.redis_n, args.redis_conn_n,
             ",".join(map(str, args.idle_conns)), env["duration_s"]))
    print("- cells: median over repetitions (range = min–max); ratio = median of the "
          "per-repetition ratios forwarder/direct; CPU = forwarder process tree "
          "utime+stime during the run")
    print()
    print(report_tables(summary, done_wls, args.forwarders, args))
    failures = [r for r in results if not r["ok"]]
    if failures:
        print("Failures:")
        print()
        for r in failures:
            print("- rep %d %s %s: %s" % (r["rep"] + 1, r["workload"], r["forwarder"], r["error"]))
        print()
    bad_exit = [r for r in results if r.get("exit_on_sigterm") and r.get("exit_rc") != 0
                and (r["forwarder"].startswith("gproxy") or r["forwarder"] == "naive")]
    if bad_exit:
        print("Note: exit status after SIGTERM was not 0 for: %s" % ", ".join(
            "%s/%s rep %d rc=%s" % (r["forwarder"], r["workload"], r["rep"] + 1, r["exit_rc"])
            for r in bad_exit))
        print()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env,
                       "args": {k: v for k, v in vars(args).items()},
                       "results": results, "summary": summary}, f, indent=1, sort_keys=True)
        log("raw results saved to %s" % args.json)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
