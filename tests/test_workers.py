"""``gproxy --workers N``: N processes on one port (SO_REUSEPORT), supervised by the parent."""

from __future__ import annotations

import os
import re
import signal
import sys
import time

import pytest

from gproxy import workers
from peers import TIMEOUT, Proxy, Server, connect, echo, recv_exactly

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT workers: Linux")

STARTED = re.compile(r"(\d+) workers started, pids ([\d ]+)")
CLOSED = re.compile(r"\[(\d+)\] conn#\d+ ")


def round_trip(address, message: bytes = b"ping") -> None:
    with connect(address) as client:
        client.sendall(message)
        assert recv_exactly(client, len(message)) == message


def worker_pids(proxy: Proxy):
    match = STARTED.search(proxy.wait_for("workers started"))
    return [int(p) for p in match.group(2).split()]


def test_several_workers_serve_and_sigterm_exits_0():
    with Server(echo) as upstream, Proxy("--workers", "3", f"127.0.0.1:{upstream.address[1]}") as proxy:
        pids = worker_pids(proxy)
        assert len(set(pids)) == 3 and proxy.process.pid not in pids
        proxy.count_lines("listening on", 3)  # every worker is accepting
        served = set()
        for _ in range(200):  # new source ports: the kernel spreads them over the workers
            round_trip(proxy.address)
            served.add(int(CLOSED.search(proxy.wait_for("conn#")).group(1)))
            if len(served) >= 2:
                break
        assert len(served) >= 2 and served <= set(pids), (served, pids)
        code, output = proxy.stop()
    assert code == 0, output
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"


def test_a_killed_worker_is_started_again():
    with Server(echo) as upstream, Proxy("--workers", "2", f"127.0.0.1:{upstream.address[1]}") as proxy:
        pids = worker_pids(proxy)
        started = time.monotonic()
        proxy.count_lines("listening on", 2)
        # The supervisor takes a death within _QUICK_DEATH of the start for a failed start (and
        # stops everything): on a loaded machine the workers can be up sooner than that. Kill
        # one that has lived longer, as the test means to.
        time.sleep(max(0.0, workers._QUICK_DEATH + 0.2 - (time.monotonic() - started)))  # sleep-ok
        os.kill(pids[0], signal.SIGKILL)
        line = proxy.wait_for("started again")
        new_pid = int(line.rsplit("pid ", 1)[1])
        assert new_pid not in pids
        assert "exited with status -9" in "\n".join(proxy.seen)
        proxy.wait_for("listening on")  # the new worker accepts
        for _ in range(20):
            round_trip(proxy.address)
        code, output = proxy.stop()
    assert code == 0, output


@pytest.mark.parametrize("args, culprit", [
    (["--workers", "0"], "--workers"),
    (["--workers", "many"], "--workers"),
    (["--workers", "2", "--api", "127.0.0.1:0"], "--api"),
    (["--workers", "2", "--metrics", "127.0.0.1:0"], "--metrics"),
])
def test_workers_refuse_bad_counts_and_combinations(args, culprit):
    import subprocess
    result = subprocess.run([sys.executable, "-m", "gproxy", *args, "127.0.0.1:0", "127.0.0.1:9"],
                            capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and culprit in lines[0] and "Traceback" not in result.stderr, result.stderr


def test_a_taken_port_stops_the_workers_with_exit_1():
    import socket
    import subprocess
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "gproxy", "--workers", "2", f"127.0.0.1:{port}",
                                 "127.0.0.1:9"], capture_output=True, text=True, timeout=TIMEOUT,
                                stdin=subprocess.DEVNULL)
    assert result.returncode == 1, result
    assert "address already in use" in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_a_worker_killed_right_after_it_starts_is_started_again():
    """Only a worker's own failure at its first start (exit status 1 or 2) stops everything;
    one killed by a signal, however young, is started again."""
    with Server(echo) as upstream, Proxy("--workers", "2", f"127.0.0.1:{upstream.address[1]}") as proxy:
        pids = worker_pids(proxy)
        os.kill(pids[1], signal.SIGKILL)
        line = proxy.wait_for("started again")
        new_pid = int(line.rsplit("pid ", 1)[1])
        assert new_pid not in pids
        proxy.wait_for(f"[{new_pid}] listening on")
        round_trip(proxy.address)
        code, output = proxy.stop()
    assert code == 0, output
