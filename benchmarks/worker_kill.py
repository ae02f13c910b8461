"""What a worker's death costs the clients of ``gproxy --workers N``: SIGKILL one worker at a
time under a stream of new connections, and count the clients that failed.

    python benchmarks/worker_kill.py                  # 2 workers, 10 kills, 16 client threads
    python benchmarks/worker_kill.py --kills 20 --clients 32 --gproxy-args "--backlog 4096"

Each client thread connects, sends 4 bytes, reads them back and closes, in a loop, through
gproxy to an echo server in this process. Every few hundred milliseconds one worker is killed
(SIGKILL), and the next kill waits until the supervisor has started it again and it listens.
Failures are counted by kind: reset (ECONNRESET, or EOF before the echo: the connection was in a
dead worker's accept queue or open in it), refused, timeout, other. "in flight" are the
connections the killed worker had open, as its last log lines can not tell: the report gives
the resets per kill, which a listen queue adds to.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def echo_server() -> socket.socket:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)

    def serve(sock: socket.socket) -> None:
        with sock:
            try:
                while True:
                    data = sock.recv(65536)
                    if not data:
                        return
                    sock.sendall(data)
            except OSError:
                return

    def accept() -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(sock,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return listener


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--pause", type=float, default=0.5, help="seconds of load between kills")
    parser.add_argument("--gproxy-args", default="-q", help="more gproxy options (default -q)")
    parser.add_argument("--stall", type=float, default=0.0,
                        help="SIGSTOP the worker this many seconds before killing it (a worker that hangs, "
                             "then dies): its accept queue fills meanwhile (default 0)")
    parser.add_argument("--repo", default=str(ROOT), help="run gproxy from this checkout (default: this one)")
    args = parser.parse_args()

    upstream = echo_server()
    command = [sys.executable, "-m", "gproxy", "--workers", str(args.workers), *args.gproxy_args.split(),
               "127.0.0.1:0", f"127.0.0.1:{upstream.getsockname()[1]}"]
    proxy = subprocess.Popen(command, cwd=args.repo, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": args.repo})
    lines: "list[str]" = []
    seen = threading.Condition()

    def read() -> None:
        for line in proxy.stderr:
            with seen:
                lines.append(line)
                seen.notify_all()

    threading.Thread(target=read, daemon=True).start()

    def wait_for(pattern: str, start: int = 0, timeout: float = 60) -> "tuple[int, re.Match]":
        deadline = time.monotonic() + timeout
        with seen:
            while True:
                for i in range(start, len(lines)):
                    match = re.search(pattern, lines[i])
                    if match:
                        return i, match
                start = len(lines)
                if not seen.wait(max(0.0, deadline - time.monotonic())):
                    raise SystemExit(f"gproxy said no {pattern!r}: {''.join(lines)}")

    _, match = wait_for(r"(\d+) workers started, pids ([\d ]+)")
    pids = [int(p) for p in match.group(2).split()]
    _, match = wait_for(r"listening on 127\.0\.0\.1:(\d+) -> .* with \d+ workers")
    address = ("127.0.0.1", int(match.group(1)))

    results: Counter = Counter()
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                with socket.create_connection(address, timeout=5) as sock:
                    sock.sendall(b"ping")
                    got = b""
                    while len(got) < 4:
                        data = sock.recv(4 - len(got))
                        if not data:
                            raise ConnectionResetError("EOF before the echo")
                        got += data
                results["ok"] += 1
            except ConnectionResetError:
                results["reset"] += 1
            except ConnectionRefusedError:
                results["refused"] += 1
            except socket.timeout:
                results["timeout"] += 1
            except OSError:
                results["other"] += 1

    threads = [threading.Thread(target=client, daemon=True) for _ in range(args.clients)]
    for thread in threads:
        thread.start()
    time.sleep(args.pause)
    per_kill = []
    try:
        for index in range(args.kills):
            victim = pids[index % len(pids)]
            before = dict(results)
            mark = len(lines)
            if args.stall:
                os.kill(victim, signal.SIGSTOP)
                time.sleep(args.stall)
            os.kill(victim, signal.SIGKILL)
            i, match = wait_for(r"worker (\d+) started again, pid (\d+)", mark)
            new = int(match.group(2))
            wait_for(rf"\[{new}\] listening on", i)
            pids[pids.index(victim)] = new
            time.sleep(args.pause)
            per_kill.append({k: results[k] - before.get(k, 0)
                             for k in ("ok", "reset", "refused", "timeout", "other")})
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
        proxy.send_signal(signal.SIGTERM)
        proxy.wait(30)
        upstream.close()

    failed = {k: v for k, v in results.items() if k != "ok"}
    print(f"gproxy --workers {args.workers} {args.gproxy_args} ({args.repo}): {args.kills} kills, "
          f"{args.clients} client threads, stalled {args.stall}s before each")
    print(f"  connections ok {results['ok']}, failed {sum(failed.values())} {dict(failed)}")
    resets = [k["reset"] + k["other"] for k in per_kill]
    print(f"  resets per kill: min {min(resets)}, median {sorted(resets)[len(resets) // 2]}, max {max(resets)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
