"""What a /metrics scrape does to forwarding: round trips on one rule while 1,000 rules are scraped.

    python benchmarks/metrics_pause.py                                   # this checkout
    python benchmarks/metrics_pause.py --gproxy before=/tmp/old --gproxy after=. --reps 3
    python benchmarks/metrics_pause.py --connections 9000               # and that many open

Each gproxy checkout runs ``python -m gproxy -q -c RULES --metrics ...`` with ``--rules``
rules on one hub: the first forwards to a local echo server, the others are idle. With
``--connections N``, the others forward to a server that accepts and holds every connection,
and N clients connect through them (spread evenly) and stay open, silent, through both
phases: a scrape must not walk them (it lists gproxy's fds once, for ``process_open_fds``). A client
sends a 64-byte message through the first rule every millisecond and times each round trip,
first with no scrape (``quiet``), then while a second process fetches ``/metrics`` in a
loop, one scrape after another (``scraped``). Checkouts run in an interleaved order, each
repetition afresh. Prints per checkout and phase the round trips' p50, p99 and max, and the
scrapes' count and median duration, with Python, gevent and CPU details.

A scrape that holds the event loop shows as round trips as slow as the scrape; one that
gives the loop back between slices of rules shows as round trips slowed by a slice at most.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
HOST = "127.0.0.1"
MESSAGE = b"m" * 64

# Fetches /metrics in a loop until stdin closes, then prints each scrape's seconds.
SCRAPER = r"""
import socket, sys, threading, time
host, port = sys.argv[1], int(sys.argv[2])
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
times = []
while not stop.is_set():
    t0 = time.perf_counter()
    with socket.create_connection((host, port)) as s:
        s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        size = 0
        while True:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            size += len(chunk)
    times.append(time.perf_counter() - t0)
print(size, *times)
"""

# A threaded echo server; prints its port.
ECHO = r"""
import socket, threading
srv = socket.create_server(("127.0.0.1", 0))
print(srv.getsockname()[1], flush=True)
def serve(c):
    with c:
        while (data := c.recv(65536)):
            c.sendall(data)
while True:
    c, _ = srv.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


# Accepts and holds every connection, never reading; prints its port.
HOLD = r"""
import socket
srv = socket.create_server(("127.0.0.1", 0), backlog=4096)
print(srv.getsockname()[1], flush=True)
held = []
while True:
    held.append(srv.accept()[0])
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def write_rules(path: str, rules: int, echo_port: int, hold_port: int = 9) -> None:
    """A config file: rule-0 -> the echo server, the rest idle (to the hold server, or to the
    discard port); each on a port of its own."""
    with open(path, "w") as f:
        for i in range(rules):
            target = f"{HOST}:{echo_port}" if i == 0 else f"{HOST}:{hold_port}"
            f.write(f'[[rule]]\nname = "rule-{i}"\nlisten = "{HOST}:0"\ntarget = "{target}"\n')


def start_gproxy(repo: str, rules_path: str, metrics_port: int, rules: int):
    """gproxy serving every rule, and each rule's port by index (from the "listening on" lines)."""
    env = dict(os.environ, PYTHONPATH=repo)
    proc = subprocess.Popen([sys.executable, "-m", "gproxy", "-q", "-c", rules_path,
                             "--metrics", f"{HOST}:{metrics_port}"],
                            cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ports, line, last = {}, "", ""
    while len(ports) < rules:  # every rule bound
        line, last = proc.stderr.readline(), line
        if not line:
            raise SystemExit(f"gproxy in {repo} exited with {proc.wait()}: {last.strip()}")
        found = re.search(r"listening on \S+:(\d+) -> .*\(rule rule-(\d+)\)", line)
        if found:
            ports[int(found.group(2))] = int(found.group(1))
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # drain
    return proc, ports


def ping_pong(port: int, seconds: float, pace: float = 0.001) -> list:
    """Round trips through the rule for ``seconds``, ``pace`` seconds apart (0: back to back):
    their seconds. sweep_pause.py measures with it too."""
    times = []
    with socket.create_connection((HOST, port), timeout=10) as sock:  # a broken run fails, not hangs
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t0 = time.perf_counter()
            sock.sendall(MESSAGE)
            got = 0
            while got < len(MESSAGE):
                chunk = sock.recv(65536)
                if not chunk:
                    raise SystemExit("the rule closed the round-trip connection")
                got += len(chunk)
            times.append(time.perf_counter() - t0)
            if pace:
                time.sleep(pace)  # sleep-ok: pacing, so samples spread evenly over time
    return times


def percentile(values: list, q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def open_connections(proc, ports: dict, count: int) -> list:
    """``count`` connections through the idle rules, spread evenly, once gproxy holds them all
    (both its sockets each: its fd count says so)."""
    idle = [port for index, port in sorted(ports.items()) if index]
    before = len(os.listdir(f"/proc/{proc.pid}/fd"))
    clients = [socket.create_connection((HOST, idle[i % len(idle)])) for i in range(count)]
    deadline = time.monotonic() + 60
    while len(os.listdir(f"/proc/{proc.pid}/fd")) < before + 2 * count:
        if time.monotonic() > deadline:
            raise SystemExit(f"gproxy holds {len(os.listdir(f'/proc/{proc.pid}/fd')) - before} fds "
                             f"of the {2 * count} expected")
        time.sleep(0.1)  # sleep-ok: waiting for gproxy to connect every client
    return clients


def run_once(repo: str, rules: int, seconds: float, echo_port: int, workdir: str,
             connections: int = 0) -> dict:
    hold, hold_port = None, 9
    if connections:  # afresh each time: it holds what it accepted until killed
        hold = subprocess.Popen([sys.executable, "-c", HOLD], stdout=subprocess.PIPE, text=True)
        hold_port = int(hold.stdout.readline())
    rules_path = os.path.join(workdir, "rules.toml")
    write_rules(rules_path, rules, echo_port, hold_port)
    metrics_port = free_port()
    proc, ports = start_gproxy(repo, rules_path, metrics_port, rules)
    first = ports[0]
    clients = []
    try:
        clients = open_connections(proc, ports, connections) if connections else []
        ping_pong(first, 0.5)  # warm up
        quiet = ping_pong(first, seconds)
        scraper = subprocess.Popen([sys.executable, "-c", SCRAPER, HOST, str(metrics_port)],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        time.sleep(0.2)  # sleep-ok: let the scrapes begin
        scraped = ping_pong(first, seconds)
        out, _ = scraper.communicate("")
        fields = out.split()
        size, scrapes = int(fields[0]), [float(x) for x in fields[1:]]
    finally:
        proc.terminate()
        proc.wait()
        for client in clients:
            client.close()
        if hold is not None:
            hold.kill()
            hold.wait()
    return {"quiet": quiet, "scraped": scraped, "scrapes": scrapes, "size": size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gproxy", action="append", metavar="NAME=PATH",
                        help="a checkout to run (repeatable; default: this one as 'this')")
    parser.add_argument("--rules", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=5.0, help="per phase (default 5)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--connections", type=int, default=0,
                        help="connections held open through the idle rules (default 0); gproxy needs "
                             "two fds each, and two per rule (its listener, a spare socket), so its fd "
                             "limit bounds it: 8000 with 1,000 rules under a limit of 20,000")
    args = parser.parse_args()
    checkouts = []
    for spec in args.gproxy or [f"this={REPO}"]:
        name, _, path = spec.partition("=")
        checkouts.append((name, os.path.abspath(path or name)))

    echo = subprocess.Popen([sys.executable, "-c", ECHO], stdout=subprocess.PIPE, text=True)
    echo_port = int(echo.stdout.readline())
    results = {name: {"quiet": [], "scraped": [], "scrapes": [], "size": 0} for name, _ in checkouts}
    try:
        with tempfile.TemporaryDirectory() as workdir:
            for rep in range(args.reps):
                order = checkouts if rep % 2 == 0 else checkouts[::-1]
                for name, path in order:
                    print(f"rep {rep + 1}/{args.reps}: {name}", file=sys.stderr)
                    one = run_once(path, args.rules, args.seconds, echo_port, workdir, args.connections)
                    for key in ("quiet", "scraped", "scrapes"):
                        results[name][key].extend(one[key])
                    results[name]["size"] = one["size"]
    finally:
        echo.kill()

    import gevent
    print(f"# /metrics scrape vs forwarding, {args.rules} rules, {args.connections} connections open; "
          f"{time.strftime('%Y-%m-%d')}")
    print(f"Python {platform.python_version()}, gevent {gevent.__version__}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs; {args.reps} reps x {args.seconds:g} s per phase, "
          "one 64-byte round trip per ms")
    print()
    print("| gproxy | phase | round trips | p50 | p99 | max | scrapes | scrape median | page |")
    print("|---|---|---|---|---|---|---|---|---|")
    ms = lambda s: f"{s * 1e3:.2f} ms"  # noqa: E731
    for name, _ in checkouts:
        r = results[name]
        for phase in ("quiet", "scraped"):
            t = r[phase]
            scrapes = r["scrapes"] if phase == "scraped" else []
            print(f"| {name} | {phase} | {len(t)} | {ms(statistics.median(t))} | {ms(percentile(t, 0.99))} "
                  f"| {ms(max(t))} | {len(scrapes) or ''} | {ms(statistics.median(scrapes)) if scrapes else ''} "
                  f"| {str(r['size'] // 1024) + ' KiB' if scrapes else ''} |")


if __name__ == "__main__":
    main()
