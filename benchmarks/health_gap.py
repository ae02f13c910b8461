"""How long clients go unserved when a Redis primary hangs (SIGSTOP), and whether they come back.

    python benchmarks/health_gap.py [--reps 2] [--stop 10] [--only gproxy-check,haproxy]

Two redis-servers on 127.0.0.1 (a primary and a stand-in replica, told apart by the value of
the key ``who``) behind each forwarder in turn, the primary first (gproxy ``failover``;
HAProxy's replica is a ``backup``). A client opens a new connection every 50 ms and sends
``GET who``, each request bounded by 250 ms. After 3 s the primary gets SIGSTOP for ``--stop``
seconds, then SIGCONT, and the run goes on for 8 s more. Reported per forwarder (medians of the
repetitions, which are interleaved):

- gap: the longest time after the SIGSTOP without one answered request;
- errors: requests that failed or timed out from the SIGSTOP on;
- failback: from the SIGCONT to the first request the primary answered (``never`` if none did).

The forwarders:

| name | what runs |
|---|---|
| ``gproxy-passive`` | gproxy without a check: passive health only (what issue 18 measured) |
| ``gproxy-check`` | gproxy ``check = "send-expect"`` PING/+PONG with HAProxy's defaults (2 s, rise 2, fall 3) |
| ``haproxy`` | HAProxy ``option redis-check``, ``check`` with its defaults (``inter 2s rise 2 fall 3``) |
| ``gproxy-fast`` | gproxy's check every 1 s with a 0.5 s timeout |
| ``haproxy-fast`` | HAProxy ``inter 1s``, ``timeout check 500ms`` |

Needs redis-server and haproxy (``bash benchmarks/setup.sh``).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WARMUP, AFTER, EVERY, REQUEST_TIMEOUT = 3.0, 8.0, 0.05, 0.25

FORWARDERS = ("gproxy-passive", "gproxy-check", "haproxy", "gproxy-fast", "haproxy-fast")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, deadline: float = 10.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def redis(name: str, logs: str) -> tuple:
    port = free_port()
    process = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no", "--protected-mode", "no"],
                               stdout=open(os.path.join(logs, f"redis-{name}.log"), "w"), stderr=subprocess.STDOUT)
    wait_for_port(port)
    subprocess.run(["redis-cli", "-p", str(port), "SET", "who", name], check=True, capture_output=True)
    return process, port


def start_forwarder(kind: str, primary: int, replica: int, logs: str) -> tuple:
    port = free_port()
    if kind.startswith("gproxy"):
        check = {"gproxy-passive": "",
                 "gproxy-check": 'check = "send-expect"\ncheck_send = "PING\\r\\n"\ncheck_expect = "^\\\\+PONG"\n',
                 "gproxy-fast": 'check = "send-expect"\ncheck_send = "PING\\r\\n"\ncheck_expect = "^\\\\+PONG"\n'
                                'check_interval = 1\ncheck_timeout = 0.5\n'}[kind]
        config = os.path.join(logs, f"{kind}.toml")
        with open(config, "w") as f:
            f.write(f'[[rule]]\nname = "redis"\nlisten = "127.0.0.1:{port}"\n'
                    f'targets = ["127.0.0.1:{primary}", "127.0.0.1:{replica}"]\nconnect_timeout = 1\n{check}')
        argv = [sys.executable, "-m", "gproxy", "-q", "-c", config]
    else:
        timing = " inter 1s" if kind == "haproxy-fast" else ""
        extra = "    timeout check 500ms\n" if kind == "haproxy-fast" else ""
        config = os.path.join(logs, f"{kind}.cfg")
        with open(config, "w") as f:
            f.write(f"global\n    maxconn 4096\ndefaults\n    mode tcp\n    timeout connect 1s\n"
                    f"    timeout client 30s\n    timeout server 30s\n{extra}"
                    f"listen redis\n    bind 127.0.0.1:{port}\n    option redis-check\n"
                    f"    server primary 127.0.0.1:{primary} check{timing}\n"
                    f"    server replica 127.0.0.1:{replica} check{timing} backup\n")
        argv = ["haproxy", "-db", "-f", config]
    env = dict(os.environ, PYTHONPATH=ROOT)
    process = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                               stdout=open(os.path.join(logs, f"{kind}.log"), "a"), stderr=subprocess.STDOUT)
    wait_for_port(port)
    return process, port


def request(port: int) -> str:
    """'primary', 'replica', or '' for a failure or a timeout."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=REQUEST_TIMEOUT) as sock:
            sock.settimeout(REQUEST_TIMEOUT)
            deadline = time.monotonic() + REQUEST_TIMEOUT
            sock.sendall(b"GET who\r\n")
            answer = b""
            while answer.count(b"\r\n") < 2:
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                chunk = sock.recv(100)
                if not chunk:
                    return ""
                answer += chunk
            return answer.split(b"\r\n")[1].decode()
    except OSError:
        return ""


def run(kind: str, stop: float, logs: str) -> dict:
    (primary, primary_port), (replica, replica_port) = redis("primary", logs), redis("replica", logs)
    forwarder, port = start_forwarder(kind, primary_port, replica_port, logs)
    results = []
    done = threading.Event()

    def client():
        while not done.is_set():
            started = time.monotonic()
            results.append((started, request(port)))
            time.sleep(max(0.0, started + EVERY - time.monotonic()))

    try:
        time.sleep(1.0)  # the forwarder's first checks
        thread = threading.Thread(target=client, daemon=True)
        thread.start()
        time.sleep(WARMUP)
        stopped_at = time.monotonic()
        primary.send_signal(signal.SIGSTOP)
        time.sleep(stop)
        continued_at = time.monotonic()
        primary.send_signal(signal.SIGCONT)
        time.sleep(AFTER)
        done.set()
        thread.join(5)
    finally:
        primary.send_signal(signal.SIGCONT)
        for process in (forwarder, primary, replica):
            process.terminate()
            process.wait(10)
    after = [(t, who) for t, who in results if t >= stopped_at]
    answered = [stopped_at] + [t + 0.0 for t, who in after if who] + [after[-1][0]]
    gap = max(b - a for a, b in zip(answered, answered[1:]))
    back = [t for t, who in after if t >= continued_at and who == "primary"]
    return {"gap": gap, "errors": sum(1 for _, who in after if not who),
            "failback": (back[0] - continued_at) if back else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--stop", type=float, default=10.0, help="seconds the primary stays stopped")
    parser.add_argument("--only", default=",".join(FORWARDERS))
    args = parser.parse_args()
    kinds = [k for k in args.only.split(",") if k]
    wanted = ("haproxy",) if any(k.startswith("haproxy") for k in kinds) else ()
    for tool in ("redis-server", "redis-cli") + wanted:
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed (bash benchmarks/setup.sh)")
    measured = {kind: [] for kind in kinds}
    with tempfile.TemporaryDirectory(prefix="gproxy-gap-") as logs:
        for rep in range(args.reps):
            for kind in kinds:  # interleaved: a slow minute of the machine hits every forwarder
                print(f"rep {rep + 1}/{args.reps}: {kind}", file=sys.stderr)
                measured[kind].append(run(kind, args.stop, logs))
    haproxy = subprocess.run(["haproxy", "-v"], capture_output=True, text=True).stdout.split("\n")[0] \
        if shutil.which("haproxy") else "no haproxy"
    redis_version = re.search(r"v=(\S+)", subprocess.run(["redis-server", "--version"], capture_output=True,
                                                         text=True).stdout)
    redis = redis_version.group(1) if redis_version else "?"
    print(f"Python {platform.python_version()}, {haproxy}, redis {redis}, "
          f"{os.cpu_count()} CPUs; primary stopped {args.stop:g} s; {args.reps} repetitions, medians\n")
    print("| forwarder | gap (s) | errors | failback after SIGCONT (s) |")
    print("|---|---|---|---|")
    for kind, runs in measured.items():
        backs = [r["failback"] for r in runs if r["failback"] is not None]
        failback = f"{statistics.median(backs):.1f}" if len(backs) == len(runs) else \
            ("never" if not backs else f"{statistics.median(backs):.1f} ({len(runs) - len(backs)} never)")
        print(f"| {kind} | {statistics.median(r['gap'] for r in runs):.1f} | "
              f"{statistics.median(r['errors'] for r in runs):.0f} | {failback} |")


if __name__ == "__main__":
    main()
