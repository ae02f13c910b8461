"""What the periodic sweeps of 1,000 idle rules do to forwarding on one rule.

    python benchmarks/sweep_pause.py                                     # this checkout
    python benchmarks/sweep_pause.py --gproxy before=/tmp/old --gproxy after=. --reps 3

Each gproxy checkout runs ``python -m gproxy -q -c RULES`` with ``--rules`` rules on one hub
(metrics_pause.py's rules file: the first forwards to a local echo server, the others are
idle). A client sends a 64-byte message through the first rule every ``--pace`` ms and times
each round trip for ``--seconds``. Every rule sweeps its connections once a second (idle
timeouts, parking); when those sweeps run in one loop pass, the round trip that comes during
that pass waits for all of them: about one round trip a second, so the pause shows in the
tail (p99.9, max, the count of slow round trips), not in the median or the p99. Also prints
the process's CPU time per second while it does this.

The round trips see a pause only when one comes during it, and on a shared machine the
scheduler's own pauses are as long, so the sweeps are also timed inside gproxy: a
``sitecustomize`` put on gproxy's path (it changes nothing else) wraps ``Forwarder._sweep``
and notes, per pass of the event loop (libev's iteration number), how many sweeps ran and how
long from the first one's start to the last one's end. It works on any checkout whose
forwarders sweep through ``Forwarder._sweep``.

Checkouts run interleaved, each repetition afresh; cells are medians over repetitions,
ranges min-max.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from metrics_pause import ECHO, REPO, percentile, ping_pong, write_rules

# Put on gproxy's path as sitecustomize.py: times the sweeps per loop pass (see above).
PROBE = r"""
import atexit, os, time
import gevent
from gproxy import forwarder
_passes = {}
_sweep = forwarder.Forwarder._sweep
def _timed(self):
    n = gevent.get_hub().loop.iteration
    t0 = time.perf_counter()
    _sweep(self)
    t1 = time.perf_counter()
    seen = _passes.get(n)
    _passes[n] = [t0, t1, 1] if seen is None else [seen[0], t1, seen[2] + 1]
forwarder.Forwarder._sweep = _timed
def _dump():
    with open(os.environ["SWEEP_PROBE"], "w") as f:
        for t0, t1, count in _passes.values():
            f.write(f"{t0} {t1 - t0} {count}\n")
atexit.register(_dump)
"""

#: a round trip slower than this is counted as one that met a pause of the loop
SLOW = 0.002


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_gproxy(repo: str, rules_path: str, rules: int, probe_dir: str, probe_out: str):
    """gproxy serving every rule with the probe on its path, and rule-0's port."""
    env = dict(os.environ, PYTHONPATH=f"{probe_dir}{os.pathsep}{repo}", SWEEP_PROBE=probe_out)
    proc = subprocess.Popen([sys.executable, "-m", "gproxy", "-q", "-c", rules_path],
                            cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    listening, first, line = 0, None, ""
    while listening < rules:
        line = proc.stderr.readline()
        if not line:
            raise SystemExit(f"gproxy in {repo} exited with {proc.wait()}")
        found = re.search(r"listening on \S+:(\d+) -> (.*)", line)
        if found:
            listening += 1
            if "rule-0)" in found.group(2):
                first = int(found.group(1))
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # drain
    return proc, first


def run_once(repo: str, rules: int, seconds: float, pace: float, echo_port: int, workdir: str) -> dict:
    rules_path = os.path.join(workdir, "rules.toml")
    write_rules(rules_path, rules, echo_port)
    probe_dir = os.path.join(workdir, "probe")
    os.makedirs(probe_dir, exist_ok=True)
    with open(os.path.join(probe_dir, "sitecustomize.py"), "w") as f:
        f.write(PROBE)
    probe_out = os.path.join(workdir, "passes.txt")
    proc, first = start_gproxy(repo, rules_path, rules, probe_dir, probe_out)
    try:
        ping_pong(first, 1.5, pace)  # warm up, and past the first sweeps
        cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
        times = ping_pong(first, seconds, pace)
        cpu = (cpu_seconds(proc.pid) - cpu0) / (time.monotonic() - t0)
    finally:
        proc.terminate()
        proc.wait()
    with open(probe_out) as f:
        passes = [(float(a), float(b), int(c)) for a, b, c in (line.split() for line in f)]
    return {"times": times, "cpu": cpu, "passes": passes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gproxy", action="append", metavar="NAME=PATH",
                        help="a checkout to run (repeatable; default: this one as 'this')")
    parser.add_argument("--rules", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10.0, help="per repetition (default 10)")
    parser.add_argument("--pace", type=float, default=1.0, help="ms between round trips (default 1)")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    checkouts = []
    for spec in args.gproxy or [f"this={REPO}"]:
        name, _, path = spec.partition("=")
        checkouts.append((name, os.path.abspath(path or name)))

    echo = subprocess.Popen([sys.executable, "-c", ECHO], stdout=subprocess.PIPE, text=True)
    echo_port = int(echo.stdout.readline())
    reps = {name: [] for name, _ in checkouts}
    try:
        with tempfile.TemporaryDirectory() as workdir:
            for rep in range(args.reps):
                order = checkouts if rep % 2 == 0 else checkouts[::-1]
                for name, path in order:
                    print(f"rep {rep + 1}/{args.reps}: {name}", file=sys.stderr)
                    one = run_once(path, args.rules, args.seconds, args.pace / 1e3, echo_port, workdir)
                    reps[name].append(one)
    finally:
        echo.kill()

    import gevent
    print(f"# round trips on one rule beside {args.rules - 1} idle rules; {time.strftime('%Y-%m-%d')}")
    print(f"Python {platform.python_version()}, gevent {gevent.__version__}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs; load average at end {os.getloadavg()[0]:.2f}; {args.reps} reps x "
          f"{args.seconds:g} s, one 64-byte round trip every {args.pace:g} ms")
    print()
    print(f"| gproxy | round trips | p50 | p99 | p99.9 | max | over {SLOW * 1e3:g} ms, per s | CPU ms per s "
          "| sweeps in one pass, max | longest sweep pass | loop passes with a sweep, per s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")

    def cell(values, fmt):
        mid = statistics.median(values)
        return f"{fmt(mid)} ({fmt(min(values))}-{fmt(max(values))})" if len(values) > 1 else fmt(mid)
    ms = lambda s: f"{s * 1e3:.2f}"  # noqa: E731
    for name, _ in checkouts:
        runs = reps[name]
        count = sum(len(r["times"]) for r in runs)
        row = [
            cell([statistics.median(r["times"]) for r in runs], ms),
            cell([percentile(r["times"], 0.99) for r in runs], ms),
            cell([percentile(r["times"], 0.999) for r in runs], ms),
            cell([max(r["times"]) for r in runs], ms),
            cell([sum(t > SLOW for t in r["times"]) / args.seconds for r in runs], lambda v: f"{v:.1f}"),
            cell([r["cpu"] * 1e3 for r in runs], lambda v: f"{v:.1f}"),
            cell([max(p[2] for p in r["passes"]) for r in runs], lambda v: f"{v:.0f}"),
            cell([max(p[1] for p in r["passes"]) for r in runs], ms),
            cell([len(r["passes"]) / (args.seconds + 1.5) for r in runs], lambda v: f"{v:.0f}"),
        ]
        print(f"| {name} | {count} | " + " | ".join(row) + " |")
    print()
    print("times in ms: median over repetitions (min-max); the last three columns from inside gproxy "
          "(the probe), over the whole run: a pass's time runs from its first sweep's start to its last's end")


if __name__ == "__main__":
    main()
