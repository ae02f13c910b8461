"""Whom a restart, a reload or a dead worker refuses or cuts: gproxy beside HAProxy and nginx.

    python benchmarks/ops_loops.py [--rounds 10] [--every 1] [--loops restart,reload,workers]
                                   [--only gproxy,haproxy,nginx] [--keep-logs] [--root CHECKOUT]

Each forwarder carries two services, both on 127.0.0.1: ``redis`` (to redis-server) and
``http`` (to an nginx serving a 612-byte static file), and runs in turn under the same load:

- redis-benchmark: 32 clients on long-lived connections, GET with ``-n 1000000000`` (until
  stopped; ``-l`` would open new connections every 100,000 requests). It exits at the first
  connection that fails (``Error: ...``), so the table says whether it lived;
- wrk: 1 thread, 16 keep-alive connections (the backend closes each after 1,000 requests, so
  new connections come all the time), ``--timeout 10s``; its socket errors (connect, read,
  write, timeout) and non-2xx responses;
- a client of this script's own (``--client``), which counts every failure by kind: 8 held
  connections with a PING every 20 ms, 4 quiet ones with a PING every 3 s (a pooled database
  connection: quiet longer than the second after which a stop closes a connection at rest),
  and 2 loops opening a new connection for each PING (100 per second), each answer awaited for
  at most 10 s. ``refused``: a connect refused (or failed otherwise); ``cut``: a connection
  reset or closed before its answer; ``slow``: no answer within 10 s; and the longest wait for
  an answer on a held connection (a stall while the forwarder changes).

After 2 s of load the loop runs ``--rounds`` times, ``--every`` seconds apart once each round's
operation has finished; 2 s after the last, the load stops and the counts are read.

The loops and what each forwarder does in them:

- restart: gproxy's handover (``gproxy --takeover CTRL -c FILE`` beside the running one, which
  has ``control_socket``), with the same file and with a changed one; gproxy's naive restart
  (SIGTERM, wait for the exit, start); HAProxy 2.6 ``haproxy -x STATS_SOCKET -sf OLDPID`` (TCP
  mode, ``expose-fd listeners``); nginx 1.22 ``stream``: a binary upgrade (USR2, then QUIT to the
  old master);
- reload, with a changed file each time: gproxy SIGHUP, to one process and to the parent of
  ``--workers 2 -c FILE``; HAProxy ``-x -sf``; ``nginx -s reload``;
- workers: gproxy ``--workers 2 -c FILE`` and nginx ``worker_processes 2``, SIGKILL to one
  worker, and the next round once it has been started again (a gproxy whose ``--workers`` takes
  no file runs one supervisor per service, and one worker of each is killed); HAProxy n/a: its
  threads (``nbthread``) cannot be killed one by one.

A ``cut`` on a new connection that is a reset rather than an EOF is a client that was queued on
the dead worker's listening socket (the kernel resets those when no process holds it any more)
rather than one in flight.

The reload loop cycles four files: the redis service's targets change (redis-server 1, 2,
both), the http service's targets and balance change, connect/idle timeouts change, and a
third rule is added and removed. During gproxy's handover its ``/metrics`` and API
(``--api``) ports are fetched every 100 ms (``scrape failed``; the API serves ``/metrics`` too,
and each page's ``process_start_time_seconds`` says which process answered, so the table says
how many processes each port was seen served by), and every gproxy log is searched for
``Address already in use``, tracebacks and ERROR lines.

Needs redis-server, redis-benchmark, haproxy, nginx with the stream module (Debian:
libnginx-mod-stream) and wrk (``bash benchmarks/setup.sh``). Nothing is left running: every
process starts in its own session and its group is killed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NGINX_STREAM = "/usr/lib/nginx/modules/ngx_stream_module.so"
NGINX = shutil.which("nginx") or "nginx"  # a binary upgrade execs argv[0]: it must be a path
WARMUP, SETTLE = 2.0, 2.0
ANSWER_TIMEOUT = 10.0
REDIS_CLIENTS, WRK_CONNECTIONS = 32, 16
HELD, HELD_EVERY, QUIET, QUIET_EVERY, NEW, NEW_EVERY = 8, 0.02, 4, 3.0, 2, 0.02


# -- the counting client (run as a subprocess: python ops_loops.py --client PORT) ------------------

def client_main(port: int) -> None:
    """Count PING round trips on held, quiet and new connections until SIGTERM; print JSON."""
    stop = threading.Event()
    kinds = ("ok", "refused", "cut", "slow")
    counts = {group: dict.fromkeys(kinds, 0) for group in ("held", "quiet", "new")}
    longest = dict.fromkeys(counts, 0.0)  # group -> the longest wait for an answer that came, s
    lock = threading.Lock()
    errors: Dict[str, int] = {}

    def count(group: str, kind: str, exc: Optional[BaseException] = None) -> None:
        with lock:
            counts[group][kind] += 1
            if exc is not None:
                key = f"{group} {kind}: {type(exc).__name__} {getattr(exc, 'strerror', '') or exc}"
                errors[key] = errors.get(key, 0) + 1

    def connect():
        sock = socket.create_connection(("127.0.0.1", port), timeout=ANSWER_TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def ping(sock) -> None:
        sock.sendall(b"PING\r\n")
        answer = b""
        while not answer.endswith(b"\r\n"):
            chunk = sock.recv(64)
            if not chunk:
                raise EOFError("closed before the answer")
            answer += chunk
        if answer != b"+PONG\r\n":
            raise EOFError(f"answer {answer[:40]!r}")

    def one(group: str, sock, fresh: bool):
        """One PING on ``sock`` (None: connect first); the socket to go on with, or None."""
        try:
            if sock is None:
                sock = connect()
        except OSError as exc:
            count(group, "refused", exc)
            return None
        began = time.monotonic()
        try:
            ping(sock)
        except socket.timeout as exc:
            count(group, "slow", exc)
        except (OSError, EOFError) as exc:
            count(group, "cut", exc)
        else:
            count(group, "ok")
            with lock:
                longest[group] = max(longest[group], time.monotonic() - began)
            return sock
        sock.close()
        return None

    def loop(group: str, every: float, keep: bool) -> None:
        sock = None
        while not stop.is_set():
            began = time.monotonic()
            sock = one(group, sock, not keep)
            if not keep and sock is not None:
                sock.close()
                sock = None
            stop.wait(max(0.0, began + every - time.monotonic()))
        if sock is not None:
            sock.close()

    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threads = [threading.Thread(target=loop, args=(g, e, k), daemon=True)
               for g, n, e, k in (("held", HELD, HELD_EVERY, True), ("quiet", QUIET, QUIET_EVERY, True),
                                  ("new", NEW, NEW_EVERY, False)) for _ in range(n)]
    for thread in threads:
        thread.start()
    while not stop.wait(0.5):
        pass
    for thread in threads:
        thread.join(ANSWER_TIMEOUT + 1)
    print(json.dumps({"counts": counts, "errors": errors, "longest": longest}), flush=True)


# -- processes ---------------------------------------------------------------------------------

def free_ports(count: int) -> List[int]:
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def wait_for(predicate, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.02)
    raise RuntimeError(f"timed out waiting for {what}")


def listening(port: int) -> bool:
    """Whether a socket listens on 127.0.0.1:port, read from /proc (no probe connection)."""
    hexport = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                for line in f.readlines()[1:]:
                    fields = line.split()
                    if fields[1].endswith(hexport) and fields[3] == "0A":
                        return True
        except OSError:
            pass
    return False


def read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def children(pid: int) -> List[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return sorted(found)


class Processes:
    """Every process a measurement starts, each in a session of its own; ``kill_all`` kills
    their groups (an nginx master's or gproxy's children are in them)."""

    def __init__(self, logs: str):
        self.logs = logs
        self.started: List[subprocess.Popen] = []
        self.groups: List[int] = []  # daemons' process groups (they leave our session)

    def start(self, argv: List[str], log_name: str, **kwargs) -> subprocess.Popen:
        env = dict(os.environ, PYTHONPATH=ROOT)
        log = open(os.path.join(self.logs, log_name), "a")
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                stdout=kwargs.pop("stdout", log), stderr=log, start_new_session=True, **kwargs)
        proc.log_path = os.path.join(self.logs, log_name)  # type: ignore[attr-defined]
        self.started.append(proc)
        return proc

    def kill_all(self) -> None:
        for group in self.groups:
            try:
                os.killpg(group, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for proc in self.started:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for proc in self.started:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        self.started = []


# -- the backends (shared by every measurement) --------------------------------------------------

class Backends:
    def __init__(self, procs: Processes, logs: str):
        self.redis = free_ports(2)
        for index, port in enumerate(self.redis):
            procs.start(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                         "no", "--protected-mode", "no", "--maxclients", "10000"], f"redis-{index + 1}.log")
        self.http = free_ports(2)
        root = os.path.join(logs, "www")
        os.makedirs(root, exist_ok=True)
        with open(os.path.join(root, "index.html"), "w") as f:
            f.write("<!DOCTYPE html>\n<title>ops_loops</title>\n" + "x" * 560 + "\n")
        conf = os.path.join(logs, "backend-nginx.conf")
        with open(conf, "w") as f:
            f.write(f"worker_processes 1;\npid {logs}/backend-nginx.pid;\nerror_log {logs}/backend-nginx.err;\n"
                    "events { worker_connections 4096; }\n"
                    "http {\n  access_log off;\n  keepalive_requests 1000;\n"
                    + "".join(f"  server {{ listen 127.0.0.1:{port}; root {root}; }}\n" for port in self.http)
                    + "}\n")
        procs.start(["nginx", "-p", logs, "-c", conf, "-g", "daemon off;"], "backend-nginx.log")
        for port in self.redis + self.http:
            wait_for(lambda port=port: listening(port), 10, f"a backend on {port}")
        for port in self.redis:
            subprocess.run(["redis-cli", "-p", str(port), "SET", "key:__rand_int__", "x"], capture_output=True)


def variant(index: int, backends: Backends) -> dict:
    """The reload loop's files cycle through these (index 0 is where every loop starts)."""
    r1, r2 = backends.redis
    h1, h2 = backends.http
    return [
        {"redis": [r1], "http": [h1], "balance": "failover", "connect": 5, "idle": 0, "extra": False},
        {"redis": [r2], "http": [h1, h2], "balance": "round-robin", "connect": 5, "idle": 0, "extra": False},
        {"redis": [r2], "http": [h2], "balance": "failover", "connect": 3, "idle": 0, "extra": True},
        {"redis": [r1, r2], "http": [h2, h1], "balance": "round-robin", "connect": 3, "idle": 600, "extra": False},
    ][index % 4]


# -- the forwarders ---------------------------------------------------------------------------

class Skip(Exception):
    """This forwarder cannot run this loop (said in the report)."""


class Forwarder:
    """One forwarder under test: ``start()``, then ``operate(round)`` per round, then ``ports``."""

    name = "?"

    def __init__(self, procs: Processes, backends: Backends, logs: str, loop: str):
        self.procs, self.backends, self.logs, self.loop = procs, backends, logs, loop
        self.redis_port, self.http_port, self.extra_port = free_ports(3)
        self.notes: List[str] = []
        self.scrape_failed: Optional[int] = None

    def finish(self) -> None:
        """After the load stopped: anything to read before everything is killed."""

    def services(self, v: dict) -> List[tuple]:
        """(name, listen port, target ports, balance) of each service in variant ``v``."""
        services = [("redis", self.redis_port, v["redis"], "failover"),
                    ("http", self.http_port, v["http"], v["balance"])]
        if v["extra"]:
            services.append(("extra", self.extra_port, v["redis"], "failover"))
        return services


class Gproxy(Forwarder):
    def __init__(self, *args, mode: str):
        super().__init__(*args)
        self.mode = mode  # handover, handover-changed, naive, reload, workers
        self.name = {"handover": "gproxy handover (--takeover)",
                     "handover-changed": "gproxy handover (--takeover), the file changed each time",
                     "naive": "gproxy naive stop/start (SIGTERM, wait, start)",
                     "reload": "gproxy SIGHUP", "workers": "gproxy --workers 2, SIGKILL a worker",
                     "reload-workers": "gproxy --workers 2 -c FILE, SIGHUP to the parent"}[mode]
        self.metrics_port, self.api_port = free_ports(2)
        self.config = os.path.join(logs_of(self), f"gproxy-{mode}.toml")
        self.control = os.path.join(logs_of(self), f"gproxy-{mode}.sock")
        self.current: Optional[subprocess.Popen] = None
        self.count = 0
        self._scraping = threading.Event()
        self._scraper: Optional[threading.Thread] = None
        self.parents: List[subprocess.Popen] = []
        self.served_by: Dict[int, set] = {}  # port -> the processes (start times) that answered

    def write(self, index: int) -> None:
        v = variant(index, self.backends)
        head = ""
        if self.mode.startswith("handover"):
            head = f'control_socket = "{self.control}"\n'
        if not self.mode.startswith(("reload", "workers")):
            head += f'metrics = "127.0.0.1:{self.metrics_port}"\n'
        text = head
        for name, port, targets, balance in self.services(v):
            text += (f'\n[[rule]]\nname = "{name}"\nlisten = "127.0.0.1:{port}"\n'
                     f'targets = [{", ".join(f"{chr(34)}127.0.0.1:{t}{chr(34)}" for t in targets)}]\n'
                     f'balance = "{balance}"\nconnect_timeout = {v["connect"]}\nidle_timeout = {v["idle"]}\n'
                     f'drain_timeout = 2\n')
        with open(self.config, "w") as f:
            f.write(text)

    def _spawn(self, takeover: bool) -> subprocess.Popen:
        self.count += 1
        argv = [sys.executable, "-m", "gproxy", "-q", "-c", self.config]
        if self.mode != "reload":
            argv += ["--api", f"127.0.0.1:{self.api_port}"]
        if takeover:
            argv += ["--takeover", self.control]
        return self.procs.start(argv, f"gproxy-{self.mode}-{self.count}.log")

    def start(self) -> None:
        if self.mode in ("workers", "reload-workers"):
            self._start_workers()
            return
        self.write(0)
        self.current = self._spawn(False)
        wait_for(lambda: listening(self.redis_port) and listening(self.http_port), 30, "gproxy to listen")
        if self.mode != "reload":
            wait_for(lambda: listening(self.api_port) and listening(self.metrics_port), 30, "gproxy's API")
            self.scrape_failed = 0
            self._scraper = threading.Thread(target=self._scrape, daemon=True)
            self._scraper.start()

    def _start_workers(self) -> None:
        self.write(0)
        self.count += 1
        parent = self.procs.start([sys.executable, "-m", "gproxy", "-q", "--workers", "2", "-c", self.config],
                                  f"gproxy-{self.mode}-1.log")
        try:
            parent.wait(3)  # a --workers that refuses -c does so at once
        except subprocess.TimeoutExpired:
            self.parents.append(parent)
            self.notes.append("one supervisor, -c FILE")
        else:
            os.remove(parent.log_path)  # its one line of refusal is not the loop's
            if self.mode == "reload-workers":
                raise Skip("--workers takes no -c FILE (yet)")
            self._start_workers_without_file()
        for parent in self.parents:
            wait_for(lambda parent=parent: len(children(parent.pid)) == 2, 30, "gproxy's workers")
        wait_for(lambda: listening(self.redis_port) and listening(self.http_port), 30, "the workers to listen")
        time.sleep(1.0)  # the workers' imports: each listens once it is ready

    def _start_workers_without_file(self) -> None:
        """A --workers that takes LISTEN TARGET only: one supervisor per service."""
        self.notes.append("--workers without -c: one supervisor per service, a worker of each killed")
        v = variant(0, self.backends)
        for service, port, targets, _ in self.services(v):
            target = targets[0]
            self.count += 1
            self.parents.append(self.procs.start(
                [sys.executable, "-m", "gproxy", "-q", "--workers", "2", "--drain-timeout", "2",
                 f"127.0.0.1:{port}", f"127.0.0.1:{target}"], f"gproxy-{self.mode}-{service}.log"))

    def _scrape(self) -> None:
        """Both ports serve /metrics (the API's too): a page's process_start_time_seconds tells
        which process answered, so each port is seen to move to every new process."""
        for port in (self.metrics_port, self.api_port):
            self.served_by[port] = set()
        while not self._scraping.is_set():
            for port in (self.metrics_port, self.api_port):
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
                        text = page.read().decode()
                        if page.status != 200:
                            raise OSError(f"status {page.status}")
                except Exception:
                    self.scrape_failed += 1
                    continue
                started = re.search(r"^process_start_time_seconds (\S+)$", text, re.MULTILINE)
                if started:
                    self.served_by[port].add(started.group(1))
            self._scraping.wait(0.1)

    def operate(self, index: int) -> None:
        assert self.current is not None or self.parents
        if self.mode.startswith("handover"):
            if self.mode == "handover-changed":
                self.write(index + 1)
            old = self.current
            new = self._spawn(True)
            wait_for(lambda: "listening socket(s) over from pid" in read(new.log_path) or new.poll() is not None,
                     60, "the new gproxy to take over")
            if new.poll() is not None:
                self.notes.append(f"round {index}: the new gproxy exited {new.returncode}: "
                                  f"{read(new.log_path).strip().splitlines()[-1:]}")
                return
            self.current = new
            del old  # it drains until its connections end (redis-benchmark's: never), then exits
        elif self.mode == "naive":
            self.current.send_signal(signal.SIGTERM)
            self.current.wait(60)
            self.current = self._spawn(False)
            wait_for(lambda: "metrics on http" in read(self.current.log_path) and listening(self.redis_port)
                     and listening(self.http_port) or self.current.poll() is not None, 60, "gproxy to start")
            if self.current.poll() is not None:
                self.notes.append(f"round {index}: gproxy exited {self.current.returncode}")
        elif self.mode.startswith("reload"):
            process = self.current if self.mode == "reload" else self.parents[0]
            done = re.compile(r"reloaded .*worker\(s\)" if self.mode == "reload-workers" else "reloaded ")
            before = len(done.findall(read(process.log_path)))
            self.write(index + 1)
            process.send_signal(signal.SIGHUP)
            wait_for(lambda: len(done.findall(read(process.log_path))) > before
                     or "reload failed" in read(process.log_path), 30, "the reload")
        elif self.mode == "workers":
            victims = []
            for parent in self.parents:
                workers = children(parent.pid)
                victims.append(workers[index % len(workers)])
                os.kill(victims[-1], signal.SIGKILL)
            for parent, victim in zip(self.parents, victims):
                wait_for(lambda parent=parent, victim=victim: len(children(parent.pid)) == 2
                         and victim not in children(parent.pid), 30, "the worker to be started again")
            time.sleep(0.8)  # the new worker's imports: it listens only once they are done

    def finish(self) -> None:
        self._scraping.set()
        if self._scraper is not None:
            self._scraper.join(10)
        logs = [read(os.path.join(self.logs, name)) for name in os.listdir(self.logs)
                if re.fullmatch(rf"gproxy-{self.mode}-(\d+|redis|http)\.log", name)]
        if self.served_by:
            self.notes.append("/metrics answered by %d processes on the metrics port, %d on the API port, of %d"
                              % (len(self.served_by[self.metrics_port]), len(self.served_by[self.api_port]),
                                 self.count))
        in_use = sum(text.count("Address already in use") for text in logs)
        if in_use:
            self.notes.append(f"'Address already in use' {in_use} time(s) in the logs")
        tracebacks = sum(text.count("Traceback") for text in logs)
        if tracebacks:
            self.notes.append(f"{tracebacks} traceback(s) in the logs")
        errors = sorted({line.split(" ", 2)[-1] for text in logs for line in text.splitlines()
                         if " ERROR " in line or line.startswith("gproxy: error")})
        for line in errors[:3]:
            self.notes.append(f"logged: {line[:160]}")


def logs_of(forwarder: Forwarder) -> str:
    return forwarder.logs


class Haproxy(Forwarder):
    name = "HAProxy -x -sf (expose-fd listeners)"

    def __init__(self, *args):
        super().__init__(*args)
        self.config = os.path.join(self.logs, f"haproxy-{self.loop}.cfg")
        self.stats = os.path.join(self.logs, f"haproxy-{self.loop}.sock")
        self.current: Optional[subprocess.Popen] = None
        self.count = 0

    def write(self, index: int) -> None:
        v = variant(index, self.backends)
        text = (f"global\n    maxconn 4000\n"
                f"    stats socket {self.stats} mode 600 level admin expose-fd listeners\n"
                f"defaults\n    mode tcp\n    timeout connect {v['connect']}s\n    timeout client 1h\n"
                f"    timeout server 1h\n")
        for name, port, targets, balance in self.services(v):
            text += f"listen {name}\n    bind 127.0.0.1:{port}\n"
            text += "    balance roundrobin\n" if balance == "round-robin" else "    balance first\n"
            if v["idle"]:
                text += f"    timeout client {v['idle']}s\n    timeout server {v['idle']}s\n"
            text += "".join(f"    server s{i} 127.0.0.1:{t}\n" for i, t in enumerate(targets))
        with open(self.config, "w") as f:
            f.write(text)

    def _spawn(self, old: Optional[subprocess.Popen]) -> subprocess.Popen:
        self.count += 1
        argv = ["haproxy", "-db", "-f", self.config]
        if old is not None:
            argv += ["-x", self.stats, "-sf", str(old.pid)]
        return self.procs.start(argv, f"haproxy-{self.loop}-{self.count}.log")

    def start(self) -> None:
        self.write(0)
        self.current = self._spawn(None)
        wait_for(lambda: listening(self.redis_port) and listening(self.http_port) and os.path.exists(self.stats),
                 30, "haproxy to listen")

    def operate(self, index: int) -> None:
        if self.loop == "reload":
            self.write(index + 1)
        old, before = self.current, read(self.current.log_path)
        self.current = self._spawn(old)
        # the old process logs its proxies stopping once the new one has its sockets and signalled it
        wait_for(lambda: read(old.log_path).count("stopped") > before.count("stopped")
                 or self.current.poll() is not None, 30, "the old haproxy to stop its proxies")
        if self.current.poll() is not None:
            self.notes.append(f"round {index}: haproxy exited {self.current.returncode}")


class Nginx(Forwarder):
    def __init__(self, *args):
        super().__init__(*args)
        self.name = {"restart": "nginx binary upgrade (USR2, QUIT)", "reload": "nginx -s reload",
                     "workers": "nginx worker_processes 2, SIGKILL a worker"}[self.loop]
        self.config = os.path.join(self.logs, f"nginx-{self.loop}.conf")
        self.pid_file = os.path.join(self.logs, f"nginx-{self.loop}.pid")
        self.master: Optional[subprocess.Popen] = None
        self.upgraded = self.ignored = 0

    def write(self, index: int) -> None:
        v = variant(index, self.backends)
        workers = 2 if self.loop == "workers" else 1
        text = (f"load_module {NGINX_STREAM};\nworker_processes {workers};\npid {self.pid_file};\n"
                f"error_log {self.logs}/nginx-{self.loop}.err notice;\nevents {{ worker_connections 10000; }}\n"
                "stream {\n")
        for name, port, targets, balance in self.services(v):
            # round robin is nginx's default; failover is a primary with the rest as backup
            servers = "".join(f"    server 127.0.0.1:{t}{' backup' if i and balance == 'failover' else ''};\n"
                              for i, t in enumerate(targets))
            text += (f"  upstream {name} {{\n{servers}  }}\n"
                     f"  server {{ listen 127.0.0.1:{port}; proxy_pass {name}; "
                     f"proxy_connect_timeout {v['connect']}s; proxy_timeout {v['idle'] or 3600}s; }}\n")
        text += "}\n"
        with open(self.config, "w") as f:
            f.write(text)

    def pid(self) -> int:
        return int(read(self.pid_file).strip() or 0)

    def start(self) -> None:
        self.write(0)
        # A binary upgrade needs a daemon: a master whose parent is the one that started it
        # ignores USR2 (nginx takes that parent for an old master still running)
        daemon = [] if self.loop == "restart" else ["-g", "daemon off;"]
        self.master = self.procs.start([NGINX, "-p", self.logs, "-c", self.config, *daemon],
                                       f"nginx-{self.loop}.log")
        if daemon == []:
            self.master.wait(30)
            wait_for(self.pid, 30, "nginx's pid file")
            self.procs.groups.append(os.getpgid(self.pid()))
        wait_for(lambda: listening(self.redis_port) and listening(self.http_port) and self.pid(), 30,
                 "nginx to listen")
        wait_for(lambda: len(children(self.pid())) == (2 if self.loop == "workers" else 1), 30, "nginx's workers")

    def operate(self, index: int) -> None:
        if self.loop == "reload":
            self.write(index + 1)
            err = os.path.join(self.logs, f"nginx-{self.loop}.err")
            before = read(err).count("start worker process")
            subprocess.run(["nginx", "-p", self.logs, "-c", self.config, "-g", "daemon off;", "-s", "reload"],
                           check=True, capture_output=True)
            wait_for(lambda: read(err).count("start worker process") > before, 30, "nginx's new workers")
        elif self.loop == "restart":
            old = self.pid()
            os.kill(old, signal.SIGUSR2)
            try:
                wait_for(lambda: self.pid() not in (0, old) and len(children(self.pid())) >= 1, 3,
                         "the new nginx master")
            except RuntimeError:
                # a new master ignores USR2 while its parent, the old master, still runs (its
                # workers drain the long-lived connections): no second upgrade until then
                self.ignored += 1
                return
            os.kill(old, signal.SIGQUIT)
            self.upgraded += 1
        elif self.loop == "workers":
            master = self.pid()
            workers = children(master)
            victim = workers[index % len(workers)]
            os.kill(victim, signal.SIGKILL)
            wait_for(lambda: len(children(master)) == 2 and victim not in children(master), 30,
                     "nginx's new worker")

    def finish(self) -> None:
        if self.loop == "restart":
            self.notes.insert(0, f"{self.upgraded} upgrade(s) done, USR2 ignored {self.ignored} time(s): a new "
                                 "master ignores it while the old one (its parent) drains")


# -- the load ------------------------------------------------------------------------------------

class Load:
    def __init__(self, procs: Processes, forwarder: Forwarder, logs: str, tag: str, churn: int = 0):
        self.procs = procs
        bench = ["redis-benchmark", "-p", str(forwarder.redis_port), "-n", "1000000000", "-t", "get", "-q"]
        self.benches = [("", procs.start([*bench, "-c", str(REDIS_CLIENTS)], f"redis-benchmark-{tag}.log"))]
        if churn:
            self.benches.append(("-k 0: ", procs.start([*bench, "-c", str(churn), "-k", "0"],
                                                       f"redis-benchmark-churn-{tag}.log")))
        self.wrk = procs.start(["wrk", "-t1", f"-c{WRK_CONNECTIONS}", "-d3600s", "--timeout", "10s",
                                f"http://127.0.0.1:{forwarder.http_port}/index.html"], f"wrk-{tag}.log")
        self.client = procs.start([sys.executable, os.path.abspath(__file__), "--client",
                                   str(forwarder.redis_port)], f"client-{tag}.log", stdout=subprocess.PIPE)

    def stop(self) -> dict:
        result: dict = {}
        said = []
        for label, bench in self.benches:
            code = bench.poll()
            said.append(label + ("lived" if code is None else f"died ({code})"))
            text = read(bench.log_path).replace("\r", "\n")
            errors = [line.strip() for line in text.splitlines()
                      if re.search(r"error|could not|closed|reset", line, re.IGNORECASE)]
            if errors:
                said[-1] += ": " + errors[0][:80]
            if code is None:
                bench.send_signal(signal.SIGTERM)
        result["bench"] = "; ".join(said)
        self.wrk.send_signal(signal.SIGINT)
        self.client.send_signal(signal.SIGTERM)
        try:
            self.wrk.wait(20)
        except subprocess.TimeoutExpired:
            pass
        out, _ = self.client.communicate(timeout=30)
        result["client"] = json.loads(out)
        wrk = read(self.wrk.log_path)
        requests = re.search(r"(\d+) requests in", wrk)
        result["wrk_requests"] = int(requests.group(1)) if requests else None
        socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", wrk)
        result["wrk_errors"] = tuple(int(g) for g in socket_errors.groups()) if socket_errors else (0, 0, 0, 0)
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", wrk)
        result["wrk_non2xx"] = int(non2xx.group(1)) if non2xx else 0
        return result


# -- one measurement ---------------------------------------------------------------------------

def measure(forwarder: Forwarder, rounds: int, every: float, logs: str, tag: str, churn: int = 0) -> dict:
    forwarder.start()
    load = Load(forwarder.procs, forwarder, logs, tag, churn)
    time.sleep(WARMUP)
    began = time.monotonic()
    for index in range(rounds):
        forwarder.operate(index)
        time.sleep(every)
    took = time.monotonic() - began
    time.sleep(SETTLE)
    result = load.stop()
    forwarder.finish()
    result.update(name=forwarder.name, rounds=rounds, took=took, notes=forwarder.notes,
                  scrape_failed=forwarder.scrape_failed)
    return result


def row(loop: str, r: dict) -> str:
    c = r["client"]["counts"]
    refused = sum(c[g]["refused"] for g in c)
    cut = sum(c[g]["cut"] for g in c)
    slow = sum(c[g]["slow"] for g in c)
    ok = sum(c[g]["ok"] for g in c)
    wc, wr, ww, wt = r["wrk_errors"]
    scrape = "" if r["scrape_failed"] is None else str(r["scrape_failed"])
    notes = "; ".join(r["notes"])
    longest = r["client"]["longest"]["held"] * 1000
    return (f"| {loop} | {r['name']} | {r['rounds']} in {r['took']:.0f} s | {refused} | {cut} (held "
            f"{c['held']['cut']}, quiet {c['quiet']['cut']}, new {c['new']['cut']}) | {slow} | {ok}, "
            f"{longest:.0f} ms | "
            f"{r['bench']} | {r['wrk_requests']}: {wc}/{wr}/{ww}/{wt}, {r['wrk_non2xx']} | {scrape} | {notes} |")


def versions() -> str:
    def first_line(argv: List[str]) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True)
            return (done.stdout or done.stderr).strip().splitlines()[0]
        except (OSError, IndexError):
            return "?"
    try:
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = "?"
    cpu = "?"
    for line in read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    import gevent
    return (f"- machine: {cpu}, {os.cpu_count()} CPUs, Linux {platform.release()}; load average "
            f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}\n"
            f"- gproxy commit {commit}, Python {platform.python_version()}, gevent {gevent.__version__}\n"
            f"- {first_line(['haproxy', '-v'])}\n- {first_line(['nginx', '-v'])}\n"
            f"- {first_line(['redis-server', '--version'])}\n- {first_line(['wrk', '-v'])}")


LOOPS = ("restart", "reload", "workers")


def forwarders_for(loop: str, only: List[str], args) -> List[tuple]:
    out = []
    if "gproxy" in only:
        if loop == "restart":
            out.append((Gproxy, {"mode": "handover"}, args.rounds))
            out.append((Gproxy, {"mode": "handover-changed"}, args.rounds))
            if args.naive_rounds:
                out.append((Gproxy, {"mode": "naive"}, args.naive_rounds))
        else:
            out.append((Gproxy, {"mode": loop}, args.rounds))
            if loop == "reload":
                out.append((Gproxy, {"mode": "reload-workers"}, args.rounds))
    if "haproxy" in only and loop != "workers":
        out.append((Haproxy, {}, args.rounds))
    if "nginx" in only:
        out.append((Nginx, {}, args.rounds))
    return out


def main() -> None:
    global ROOT
    if len(sys.argv) == 3 and sys.argv[1] == "--client":
        client_main(int(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--naive-rounds", type=int, default=3, help="rounds of gproxy's naive stop/start")
    parser.add_argument("--every", type=float, default=1.0, help="seconds between rounds")
    parser.add_argument("--loops", default=",".join(LOOPS))
    parser.add_argument("--churn", type=int, default=0,
                        help="N: also a redis-benchmark with N clients opening a connection per request (-k 0); "
                             "load only: it drops a client whose connect is refused without a word")
    parser.add_argument("--only", default="gproxy,haproxy,nginx")
    parser.add_argument("--keep-logs", action="store_true")
    parser.add_argument("--root", default=None, help="the gproxy checkout to run (default: this one)")
    args = parser.parse_args()
    ROOT = os.path.abspath(args.root or ROOT)  # every process starts there (Processes.start)
    for tool in ("redis-server", "redis-cli", "redis-benchmark", "haproxy", "nginx", "wrk"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed (bash benchmarks/setup.sh)")
    if not os.path.exists(NGINX_STREAM):
        sys.exit(f"nginx's stream module is not installed ({NGINX_STREAM}; Debian: libnginx-mod-stream)")
    only = args.only.split(",")
    logs = tempfile.mkdtemp(prefix="gproxy-ops-")
    os.chmod(logs, 0o755)  # nginx's workers run as nobody and serve a file from here
    shared = Processes(logs)
    results = []
    skipped: List[str] = []
    began = time.monotonic()
    try:
        backends = Backends(shared, logs)
        for loop in args.loops.split(","):
            for cls, kwargs, rounds in forwarders_for(loop, only, args):
                procs = Processes(logs)
                forwarder = cls(procs, backends, logs, loop, **kwargs)
                tag = f"{loop}-{len(results)}"
                print(f"{loop}: {forwarder.name}, {rounds} rounds", file=sys.stderr, flush=True)
                try:
                    results.append((loop, measure(forwarder, rounds, args.every, logs, tag, args.churn)))
                except Skip as exc:
                    print(f"  skipped: {exc}", file=sys.stderr)
                    skipped.append(f"{loop}, {forwarder.name}: skipped, {exc}")
                except Exception as exc:
                    print(f"  failed: {exc!r}", file=sys.stderr)
                    skipped.append(f"{loop}, {forwarder.name}: failed, {exc!r}")
                finally:
                    procs.kill_all()
                    time.sleep(0.5)
    finally:
        shared.kill_all()
        if args.keep_logs:
            print(f"logs kept in {logs}", file=sys.stderr)
        else:
            shutil.rmtree(logs, ignore_errors=True)
    print(versions())
    print(f"- {args.rounds} rounds per loop ({args.naive_rounds} for the naive restart), {args.every:g} s apart; "
          f"run took {time.monotonic() - began:.0f} s\n")
    print("| loop | forwarder | rounds | refused | cut | slow | PINGs ok, longest wait (held) | "
          "redis-benchmark (32 clients) | wrk requests: errors connect/read/write/timeout, non-2xx | "
          "scrapes failed | notes |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for loop, result in results:
        print(row(loop, result))
    print()
    for line in skipped:
        print(f"- {line}")
    for loop, result in results:
        errors = result["client"]["errors"]
        if errors:
            print(f"- {loop}, {result['name']}: " + "; ".join(f"{k} x{v}" for k, v in sorted(errors.items())))


if __name__ == "__main__":
    main()
