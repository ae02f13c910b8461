"""Memory per idle rule: the RSS of ``gproxy -c`` with N rules, less its RSS with one, over N - 1.

    python benchmarks/rule_cost.py                                        # this checkout
    python benchmarks/rule_cost.py --gproxy before=/tmp/old --gproxy after=. --rules 1000 --reps 3

Each run starts ``python -m gproxy -q -c RULES`` (rules on ``127.0.0.1:0``, targets that are
never dialled, since no client comes), waits until every rule listens and 2.5 s more (past
the first periodic sweeps, after which each forwarder keeps an idle worker greenlet), reads
``VmRSS`` from /proc, and stops it. Checkouts run interleaved; prints the median per checkout.
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
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def rss_kib(repo: str, rules: int, workdir: str) -> int:
    path = os.path.join(workdir, f"rules-{rules}.toml")
    with open(path, "w") as f:
        for i in range(rules):
            f.write(f'[[rule]]\nname = "rule-{i}"\nlisten = "127.0.0.1:0"\ntarget = "127.0.0.1:9"\n')
    proc = subprocess.Popen([sys.executable, "-m", "gproxy", "-q", "-c", path], cwd=repo,
                            env=dict(os.environ, PYTHONPATH=repo), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        listening = 0
        while listening < rules:
            line = proc.stderr.readline()
            if not line:
                raise SystemExit(f"gproxy in {repo} exited with {proc.wait()}")
            listening += bool(re.search(r"listening on \S+ -> ", line))
        # sleep-ok: past the forwarders' first periodic sweeps (every second), after which
        # each keeps an idle worker greenlet: the steady state, not the first half second
        time.sleep(2.5)
        with open(f"/proc/{proc.pid}/status") as status:
            return int(re.search(r"VmRSS:\s+(\d+) kB", status.read()).group(1))
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gproxy", action="append", metavar="NAME=PATH",
                        help="a checkout to run (repeatable; default: this one as 'this')")
    parser.add_argument("--rules", type=int, default=1000)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    checkouts = [(spec.partition("=")[0], os.path.abspath(spec.partition("=")[2] or spec))
                 for spec in args.gproxy or [f"this={REPO}"]]
    one = {name: [] for name, _ in checkouts}
    many = {name: [] for name, _ in checkouts}
    with tempfile.TemporaryDirectory() as workdir:
        for rep in range(args.reps):
            for name, path in (checkouts if rep % 2 == 0 else checkouts[::-1]):
                print(f"rep {rep + 1}/{args.reps}: {name}", file=sys.stderr)
                one[name].append(rss_kib(path, 1, workdir))
                many[name].append(rss_kib(path, args.rules, workdir))
    print(f"# RSS per idle rule, gproxy -c with {args.rules} rules; {time.strftime('%Y-%m-%d')}")
    print(f"Python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs; "
          f"medians of {args.reps} runs")
    print()
    print(f"| gproxy | RSS, 1 rule | RSS, {args.rules} rules | per idle rule |")
    print("|---|---:|---:|---:|")
    for name, _ in checkouts:
        a, b = statistics.median(one[name]), statistics.median(many[name])
        print(f"| {name} | {a / 1024:.1f} MiB | {b / 1024:.1f} MiB | {(b - a) / (args.rules - 1):.1f} KiB |")


if __name__ == "__main__":
    main()
