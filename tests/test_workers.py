"""``gproxy --workers N``: N processes on one port (SO_REUSEPORT), supervised by the parent."""

from __future__ import annotations

import os
import re
import signal
import sys
import time

import pytest

from gproxy import _supervisor
from peers import TIMEOUT, Gate, Proxy, Server, connect, echo, recv_exactly

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
        time.sleep(max(0.0, _supervisor._QUICK_DEATH + 0.2 - (time.monotonic() - started)))  # sleep-ok
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


def _gone(pid: int) -> bool:
    """Exited: no such process, or a zombie nobody has reaped (PID 1 here may not reap)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_exited(pids, timeout: float = TIMEOUT) -> set:
    """Wait for every pid to exit, on pidfds (readable once a process has exited: an event,
    not a poll); return the pids still running at the deadline."""
    import select
    fds = {}
    for pid in pids:
        try:
            fds[os.pidfd_open(pid)] = pid
        except ProcessLookupError:
            pass
    try:
        deadline = time.monotonic() + timeout
        while fds:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for fd in select.select(list(fds), [], [], remaining)[0]:
                os.close(fd)
                del fds[fd]
        return set(fds.values())
    finally:
        for fd in fds:
            os.close(fd)


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs os.pidfd_open (Linux 5.3, Python 3.9)")
@pytest.mark.timeout(60)
def test_workers_stop_when_their_supervisor_is_killed():
    """kill -9 of the parent: each worker stops accepting at once (the port refuses), lets its
    open connections finish, as on SIGTERM, and exits; none is left serving the port."""
    gate = Gate()
    with Server(gate) as upstream, Proxy("--workers", "2", f"127.0.0.1:{upstream.address[1]}") as proxy:
        pids = worker_pids(proxy)
        try:
            proxy.count_lines("listening on", 2)
            held = connect(proxy.address)
            held.sendall(b"request")       # the client spoke last: a drain waits for its answer
            server = gate.get()
            assert recv_exactly(server, 7) == b"request"
            proxy.process.kill()
            proxy.process.wait(TIMEOUT)
            # each worker says why it stops, then closes its listener (the lines interleave)
            while sum("] stopping " in line for line in proxy.seen) < 2:
                proxy.wait_for("] stopping ")
            assert sum("supervisor has exited" in line for line in proxy.seen) == 2, proxy.seen
            with pytest.raises(ConnectionRefusedError):
                connect(proxy.address).close()
            server.sendall(b"response")     # the open connection is drained, not cut
            assert recv_exactly(held, 8) == b"response"
            held.close()
            server.close()
            assert not wait_exited(pids), [p for p in pids if not _gone(p)]
        finally:
            gate.release()
            for pid in pids:  # orphans of a failed run: they are this test's own processes
                if not _gone(pid):
                    os.kill(pid, signal.SIGKILL)
    assert all(_gone(pid) for pid in pids)


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs os.pidfd_open (Linux 5.3, Python 3.9)")
@pytest.mark.timeout(60)
def test_workers_whose_supervisor_died_before_they_were_up_stop_too():
    """The parent killed as soon as it has started its workers, long before they watch it."""
    import socket
    import subprocess
    with Server(echo) as upstream:
        port = None
        process = subprocess.Popen([sys.executable, "-m", "gproxy", "--workers", "2", "127.0.0.1:0",
                                    f"127.0.0.1:{upstream.address[1]}"], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        pids = []
        try:
            for line in process.stderr:
                if port is None and "listening on" in line:
                    port = int(line.split(" -> ")[0].rsplit(":", 1)[1])
                match = STARTED.search(line)
                if match:
                    pids = [int(p) for p in match.group(2).split()]
                    process.kill()
                    break
            process.wait(TIMEOUT)
            assert len(pids) == 2 and port
            assert not wait_exited(pids), [p for p in pids if not _gone(p)]
            output = process.stderr.read()  # every worker has exited: EOF
            assert output.count("supervisor has exited") == 2 and "Traceback" not in output, output
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT).close()
        finally:
            for pid in pids:
                if not _gone(pid):
                    os.kill(pid, signal.SIGKILL)
            process.kill()
            process.wait(TIMEOUT)
            process.stderr.close()
