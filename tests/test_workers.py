"""``gproxy --workers N``: N processes on one port (SO_REUSEPORT), supervised by the parent."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import sys
import time

import pytest

from gproxy import _supervisor
from peers import TIMEOUT, Gate, Proxy, Server, connect, echo, free_port, payload, read_until_closed, recv_exactly

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT workers: Linux")

STARTED = re.compile(r"(\d+) workers started, pids ([\d ]+)")
CLOSED = re.compile(r"\[(\d+)\] conn#\d+ ")


def round_trip(address, message: bytes = b"ping") -> None:
    with connect(address) as client:
        client.sendall(message)
        assert recv_exactly(client, len(message)) == message


def seen_or_wait(proxy: Proxy, text: str) -> str:
    """The line with ``text``, among those read already or the next ones."""
    return next((line for line in proxy.seen if text in line), None) or proxy.wait_for(text)


def worker_pids(proxy: Proxy):
    match = STARTED.search(seen_or_wait(proxy, "workers started"))
    return [int(p) for p in match.group(2).split()]


def accepting(proxy: Proxy, count: int) -> None:
    """Every worker accepts: the parent says so only then."""
    seen_or_wait(proxy, f" with {count} workers")


def test_several_workers_serve_and_sigterm_exits_0():
    with Server(echo) as upstream, Proxy("--workers", "3", f"127.0.0.1:{upstream.address[1]}") as proxy:
        pids = worker_pids(proxy)
        assert len(set(pids)) == 3 and proxy.process.pid not in pids
        accepting(proxy, 3)  # every worker is accepting
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
        accepting(proxy, 2)
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
    (["--workers", "2", "--takeover", "/nonexistent/gproxy.sock"], "--takeover"),
    (["--workers", "2", "--control-socket", "/nonexistent/gproxy.sock"], "--control-socket"),
    (["--workers", "2", "--metrics", "127.0.0.1:x"], "--metrics"),
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
            accepting(proxy, 2)
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


# -- systemd, signals to the whole group, readiness, logs ------------------------------------------


class FakeSystemd:
    """A NOTIFY_SOCKET that knows each datagram's sender, as systemd does (SCM_CREDENTIALS):
    ``get()`` is ``(pid, message)``."""

    def __init__(self, path: str):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(path)
        self.sock.settimeout(TIMEOUT)

    def get(self):
        data, ancillary, _flags, _address = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        pid = next(struct.unpack("iII", bytes(cdata[:12]))[0] for level, kind, cdata in ancillary
                   if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS)
        return pid, data.decode()

    def pending(self):
        """What else was sent (the senders are gone: nothing more can come)."""
        self.sock.setblocking(False)
        try:
            return [self.sock.recv(4096) for _ in iter(int, 1)]
        except BlockingIOError:
            return []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.sock.close()


def test_systemd_hears_from_the_parent_only_and_ready_means_every_worker_accepts(tmp_path):
    """READY=1 and STOPPING=1 come from the main pid (systemd's NotifyAccess=main ignores the
    rest), once each, and READY=1 only when every worker accepts."""
    with FakeSystemd(str(tmp_path / "notify")) as manager, Server(echo) as upstream:
        env = {**os.environ, "NOTIFY_SOCKET": manager.path}
        with Proxy("--workers", "3", f"127.0.0.1:{upstream.address[1]}", env=env) as proxy:
            parent = proxy.process.pid
            assert manager.get() == (parent, "READY=1")
            for _ in range(30):  # ready: no worker's queue is missing from the port
                round_trip(proxy.address)
            code, output = proxy.stop()
            assert manager.get() == (parent, "STOPPING=1")
        assert manager.pending() == []
    assert code == 0, output


def test_the_listening_line_comes_once_every_worker_accepts():
    """A client that connects as soon as the line is out is never refused."""
    with Server(echo) as upstream:
        proxy = Proxy("--workers", "3", f"127.0.0.1:{upstream.address[1]}")
        with proxy:
            line = seen_or_wait(proxy, " with 3 workers")
            port = int(re.search(r"listening on 127\.0\.0\.1:(\d+) ", line).group(1))
            for _ in range(30):  # new source ports: the kernel spreads them over the workers
                round_trip(("127.0.0.1", port))
            code, output = proxy.stop()
    assert code == 0, output


@pytest.mark.timeout(60)
def test_a_stop_signal_to_the_whole_group_drains():
    """systemd's KillMode=control-group (and ^C in a terminal) signal the parent and every
    worker: each worker then gets the signal twice, the group's and the one its parent sends
    on. It drains once, as when only the parent is signalled; an open connection is not cut.
    (The two signals are sent apart here: at once, the kernel may merge them into one.)"""
    gate = Gate()
    with Server(gate) as upstream, Proxy("-v", "--workers", "2", "--drain-timeout", "30",
                                         f"127.0.0.1:{upstream.address[1]}") as proxy:
        try:
            pids = worker_pids(proxy)
            accepting(proxy, 2)
            held = connect(proxy.address)
            held.sendall(b"request")       # the client spoke last: a drain waits for its answer
            server = gate.get()
            assert recv_exactly(server, 7) == b"request"
            for pid in pids:               # the group's signal reaches the workers...
                os.kill(pid, signal.SIGTERM)
            while not all(any(f"[{pid}] stopping " in line for line in proxy.seen) for pid in pids):
                proxy.wait_for("] stopping ")  # (the workers' lines interleave)
            holder = re.search(r"\[\d+\]", next(line for line in proxy.seen if "draining 1 connection" in line))[0]
            proxy.signal(signal.SIGTERM)   # ... and the parent's, which it sends on to them
            while not any(holder in line and ("already stopping" in line or "second signal" in line)
                          for line in proxy.seen):
                proxy.wait_for(holder)     # (the other worker may have ended: it had nothing to drain)
            data = payload(1 << 20, 7)
            for offset in range(0, len(data), 1 << 16):  # a stream in progress while they drain
                server.sendall(data[offset:offset + (1 << 16)])
            assert recv_exactly(held, len(data)) == data
            server.close()
            assert read_until_closed(held) == b""
            held.close()
            proxy.process.wait(TIMEOUT)    # no other signal: the drain ends by itself
            code, output = proxy.stop()
        finally:
            gate.release()
    assert code == 0, output
    assert "second signal" not in output and "reset" not in output, output


def test_json_lines_carry_the_workers_pid():
    with Server(echo) as upstream, Proxy("--workers", "2", "--log-format", "json",
                                         f"127.0.0.1:{upstream.address[1]}") as proxy:
        started = json.loads(seen_or_wait(proxy, "workers started"))
        pids = [int(p) for p in STARTED.search(started["message"]).group(2).split()]
        assert "pid" not in started  # the parent's own lines: one process, no tag
        accepting(proxy, 2)
        ids = set()
        for _ in range(200):
            round_trip(proxy.address)
            line = json.loads(proxy.wait_for('"bytes_upstream"'))
            assert line["pid"] in pids, line
            ids.add((line["pid"], line["id"]))
            if len({pid for pid, _ in ids}) == 2:
                break
        assert len({pid for pid, _ in ids}) == 2, ids  # both workers' lines, each with its pid
        code, output = proxy.stop()
    assert code == 0, output


def test_connection_ids_are_unique_across_workers_and_their_successors():
    with Server(echo) as upstream, Proxy("--workers", "2", "--log-format", "json",
                                         f"127.0.0.1:{upstream.address[1]}") as proxy:
        pids = [int(p) for p in STARTED.search(json.loads(seen_or_wait(proxy, "workers started"))["message"])
                .group(2).split()]
        started = time.monotonic()
        accepting(proxy, 2)

        def ids_of_both_workers(count):
            seen = {}  # id -> pid
            for _ in range(400):
                round_trip(proxy.address)
                line = json.loads(proxy.wait_for('"bytes_upstream"'))
                assert line["id"] not in seen, (line, seen)  # one connection, one id
                seen[line["id"]] = line["pid"]
                if len(set(seen.values())) == 2 and len(seen) >= count:
                    break
            assert len(set(seen.values())) == 2, seen
            return seen

        first = ids_of_both_workers(6)
        # as in test_a_killed_worker_is_started_again: a death within _QUICK_DEATH of the start
        # is taken for a failed start
        time.sleep(max(0.0, _supervisor._QUICK_DEATH + 0.2 - (time.monotonic() - started)))  # sleep-ok
        os.kill(pids[0], signal.SIGKILL)
        proxy.wait_for("started again")
        proxy.wait_for("listening on")
        later = ids_of_both_workers(6)
        assert not set(first) & set(later), (first, later)  # the successor reuses none of its ids
        code, output = proxy.stop()
    assert code == 0, output


# -- -c FILE: every worker runs the file's rules; SIGHUP to the parent reloads them all ----------


def tagged(tag: bytes):
    def serve(sock):
        sock.sendall(tag)
        echo(sock)
    return serve


def tag_of(address) -> bytes:
    with connect(address) as client:
        return recv_exactly(client, 1)


def rule_file(path, **targets) -> str:
    path.write_text("".join(f'[[rule]]\nname = "{name}"\nlisten = "127.0.0.1:0"\ntarget = "127.0.0.1:{port}"\n'
                            for name, port in targets.items()))
    return str(path)


RULE_LINE = re.compile(r"listening on (\S+):(\d+) -> \S+ \(rule ([^)]+)\) with (\d+) workers")


def workers_with_file(path: str, count: int, env=None, *extra: str):
    """``gproxy --workers COUNT -c PATH``, and each rule's address once every worker accepts."""
    proxy = Proxy(argv=["--workers", str(count), *extra, "-c", path], env=env)
    rules = {}
    try:
        names = re.findall(r'name = "([^"]+)"', open(path).read())
        seen_or_wait(proxy, f"with {count} workers")
        while True:
            for line in proxy.seen:
                match = RULE_LINE.search(line)
                if match:
                    rules[match.group(3)] = (match.group(1), int(match.group(2)))
            if len(rules) == len(names):
                break
            proxy.wait_for(f"with {count} workers")
    except BaseException:
        proxy.kill()
        raise
    return proxy, rules


PARENT_RELOAD = re.compile(r"^\S+ \S+ (INFO|ERROR) (reloaded .* in \d+ worker|reload failed)")


def reloaded(proxy: Proxy) -> str:
    """SIGHUP to the parent, and its line that says how it went."""
    proxy.signal(signal.SIGHUP)
    while True:
        line = proxy.wait_for("reload")
        if PARENT_RELOAD.search(line):  # not a worker's line: those start with its [pid]
            return line


@pytest.mark.timeout(60)
def test_a_config_file_runs_in_every_worker_and_sighup_reloads_them_all(tmp_path):
    with Server(tagged(b"A")) as a, Server(tagged(b"B")) as b, Server(echo) as other:
        path = rule_file(tmp_path / "gproxy.toml", web=a.address[1], other=other.address[1])
        proxy, rules = workers_with_file(path, 2)
        with proxy:
            assert set(rules) == {"web", "other"} and rules["web"] != rules["other"]
            pids = worker_pids(proxy)
            served = set()
            for _ in range(200):
                assert tag_of(rules["web"]) == b"A"
                served.add(int(re.search(r"\[(\d+)\] .*conn#\d+ ", proxy.wait_for("conn#")).group(1)))
                if len(served) == 2:
                    break
            assert served == set(pids)  # both workers run the file's rules
            round_trip(rules["other"])
            held = connect(rules["web"])  # a connection open across the reload
            assert recv_exactly(held, 1) == b"A"
            rule_file(tmp_path / "gproxy.toml", web=b.address[1], other=other.address[1])
            line = reloaded(proxy)
            assert "reloaded " in line and "in 2 worker(s)" in line, line
            for _ in range(30):  # whichever worker takes it: the new target
                assert tag_of(rules["web"]) == b"B"
            held.sendall(b"still here")  # the reload cut nobody
            assert recv_exactly(held, 10) == b"still here"
            held.close()
            code, output = proxy.stop()
    assert code == 0, output
    assert "Traceback" not in output


@pytest.mark.timeout(60)
def test_a_bad_file_changes_nothing_anywhere_and_restarted_workers_run_the_config_in_force(tmp_path):
    """A bad file is one ERROR line, from the parent; every worker keeps what is in force, and a
    worker started again after that runs what is in force too, not the broken file."""
    with Server(tagged(b"A")) as a, Server(tagged(b"B")) as b:
        path = rule_file(tmp_path / "gproxy.toml", web=a.address[1])
        proxy, rules = workers_with_file(path, 2)
        with proxy:
            pids = worker_pids(proxy)
            rule_file(tmp_path / "gproxy.toml", web=b.address[1])
            assert "reloaded " in reloaded(proxy)
            (tmp_path / "gproxy.toml").write_text("broken = [")
            line = reloaded(proxy)
            assert "ERROR reload failed, the running configuration stays: " in line and "gproxy.toml" in line
            os.kill(pids[0], signal.SIGKILL)
            new_pid = int(proxy.wait_for("started again").rsplit("pid ", 1)[1])
            proxy.wait_for(f"[{new_pid}] listening on")
            for _ in range(30):
                assert tag_of(rules["web"]) == b"B"
            code, output = proxy.stop()
    assert code == 0, output
    errors = [line for line in output.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "[" not in errors[0].split(" ERROR ")[0], errors  # the parent's only


def test_reloads_are_announced_to_systemd_by_the_parent(tmp_path):
    with FakeSystemd(str(tmp_path / "notify")) as manager, Server(echo) as upstream:
        path = rule_file(tmp_path / "gproxy.toml", a=upstream.address[1])
        proxy, rules = workers_with_file(path, 2, {**os.environ, "NOTIFY_SOCKET": manager.path})
        with proxy:
            parent = proxy.process.pid
            assert manager.get() == (parent, "READY=1")
            assert "reloaded " in reloaded(proxy)
            pid, message = manager.get()
            assert pid == parent and message.startswith("RELOADING=1\nMONOTONIC_USEC="), message
            assert manager.get() == (parent, "READY=1")
            round_trip(rules["a"])
            code, output = proxy.stop()
            assert manager.get() == (parent, "STOPPING=1")
        assert manager.pending() == []
    assert code == 0, output


def test_a_unix_socket_rule_is_refused_with_workers(tmp_path):
    import subprocess
    path = tmp_path / "gproxy.toml"
    path.write_text(f'[[rule]]\nname = "u"\nlisten = "unix:{tmp_path}/u.sock"\ntarget = "127.0.0.1:9"\n')
    result = subprocess.run([sys.executable, "-m", "gproxy", "--workers", "2", "-c", str(path)],
                            capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "rule 'u'" in lines[0] and "Unix socket" in lines[0], result.stderr


# -- --metrics: one page, served by the parent, summed over the workers ---------------------------


def metrics_url(proxy: Proxy) -> str:
    return seen_or_wait(proxy, "summed over the workers, on ").split()[-1]


def scrape(url: str) -> dict:
    from test_metrics import get, samples
    status, _kind, page = get(url)
    assert status == 200
    return samples(page)


def total(found: dict, name: str, **labels) -> float:
    """The sum of ``name``'s samples that have ``labels`` (whatever their other labels)."""
    wanted = set(labels.items())
    return sum(value for (sample, have), value in found.items() if sample == name and wanted <= have)


def served_by_both(proxy: Proxy, address, pids) -> int:
    """Round trips until both workers have served some; how many there were."""
    served = set()
    count = 0
    while len(served) < 2 and count < 400:
        round_trip(address)
        count += 1
        served.add(int(CLOSED.search(proxy.wait_for("conn#")).group(1)))
    assert served == set(pids)
    return count


@pytest.mark.timeout(90)
def test_one_metrics_page_sums_the_workers_and_counters_survive_a_killed_worker():
    with Server(echo) as upstream, Proxy("--workers", "2", "--metrics", "127.0.0.1:0",
                                         f"127.0.0.1:{upstream.address[1]}") as proxy:
        url = metrics_url(proxy)
        pids = worker_pids(proxy)
        accepting(proxy, 2)
        started = time.monotonic()
        count = served_by_both(proxy, proxy.address, pids)
        found = scrape(url)
        assert total(found, "gproxy_connections_total", outcome="eof") == count
        assert total(found, "gproxy_bytes_total", direction="upstream") == 4 * count
        assert total(found, "gproxy_connection_duration_seconds_count") == count
        # a killed worker is folded in with its last snapshot: no counter goes down
        time.sleep(max(0.0, _supervisor._QUICK_DEATH + 0.2 - (time.monotonic() - started)))  # sleep-ok
        os.kill(pids[0], signal.SIGKILL)
        new_pid = int(proxy.wait_for("started again").rsplit("pid ", 1)[1])
        proxy.wait_for(f"[{new_pid}] listening on")
        found = scrape(url)
        assert total(found, "gproxy_connections_total", outcome="eof") == count
        assert total(found, "gproxy_connections_active") == 0
        more = served_by_both(proxy, proxy.address, [pids[1], new_pid])
        found = scrape(url)
        assert total(found, "gproxy_connections_total", outcome="eof") == count + more
        assert total(found, "gproxy_target_connections_total", outcome="eof") == count + more
        code, output = proxy.stop()
    assert code == 0, output


@pytest.mark.timeout(60)
def test_a_worker_that_does_not_answer_is_counted_with_its_last_snapshot():
    with Server(echo) as upstream, Proxy("--workers", "2", "--metrics", "127.0.0.1:0",
                                         f"127.0.0.1:{upstream.address[1]}") as proxy:
        url = metrics_url(proxy)
        pids = worker_pids(proxy)
        accepting(proxy, 2)
        count = served_by_both(proxy, proxy.address, pids)
        assert total(scrape(url), "gproxy_connections_total", outcome="eof") == count
        os.kill(pids[0], signal.SIGSTOP)
        try:
            began = time.monotonic()
            found = scrape(url)
            waited = time.monotonic() - began
        finally:
            os.kill(pids[0], signal.SIGCONT)
        assert total(found, "gproxy_connections_total", outcome="eof") == count  # nobody left out
        assert waited < TIMEOUT / 2, waited
        # its late answer is not taken for the next scrape's: that one is whole and current
        round_trip(proxy.address)
        proxy.wait_for("conn#")
        assert total(scrape(url), "gproxy_connections_total", outcome="eof") == count + 1
        code, output = proxy.stop()
    assert code == 0, output


def test_promtool_accepts_the_workers_page(tmp_path):
    from test_metrics import get
    from test_real_clients import need
    promtool = need("promtool")
    import subprocess
    with Server(echo) as upstream:
        path = tmp_path / "gproxy.toml"
        path.write_text(f'metrics = "127.0.0.1:0"\n[[rule]]\nname = "a"\nlisten = "127.0.0.1:0"\n'
                        f'target = "127.0.0.1:{upstream.address[1]}"\n[[rule]]\nname = "b"\n'
                        f'listen = "127.0.0.1:0"\ntargets = ["127.0.0.1:{upstream.address[1]}", '
                        f'"127.0.0.1:{free_port()}"]\ncheck = "tcp"\ncheck_interval = 0.05\n')
        proxy, rules = workers_with_file(str(path), 2)
        with proxy:
            for name in ("a", "b"):
                round_trip(rules[name])
                proxy.wait_for("conn#")  # counted once ended, as the line is written
            _status, _kind, page = get(metrics_url(proxy))
            code, output = proxy.stop()
    assert code == 0, output
    assert 'gproxy_connections_total{rule="a",outcome="eof"} 1' in page, page
    assert 'gproxy_connections_total{rule="b",outcome="eof"} 1' in page, page
    result = subprocess.run([promtool, "check", "metrics"], input=page, capture_output=True, text=True,
                            timeout=TIMEOUT)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", ""), result


@pytest.mark.timeout(60)
def test_a_worker_that_stops_by_itself_leaves_its_counts_behind():
    """A worker stopped on its own (SIGTERM to it) sends its final counters as it exits: what it
    counted since the last scrape is kept, and it is started again."""
    with Server(echo) as upstream, Proxy("--workers", "2", "--metrics", "127.0.0.1:0",
                                         f"127.0.0.1:{upstream.address[1]}") as proxy:
        url = metrics_url(proxy)
        pids = worker_pids(proxy)
        accepting(proxy, 2)
        count = served_by_both(proxy, proxy.address, pids)  # never scraped before it stops
        os.kill(pids[0], signal.SIGTERM)
        proxy.wait_for("started again")
        assert total(scrape(url), "gproxy_connections_total", outcome="eof") == count
        code, output = proxy.stop()
    assert code == 0, output


# -- a dead worker's listen queue --------------------------------------------------------------


@pytest.mark.timeout(60)
def test_clients_queued_on_a_dead_worker_are_served_by_the_one_started_in_its_place():
    """The parent keeps a copy of each worker's listening socket: when a worker dies, the
    clients in its accept queue wait there for the worker started in its place, instead of
    the kernel resetting them (plain SO_REUSEPORT: the queue dies with its only owner)."""
    with Server(echo) as upstream, Proxy("--workers", "2", f"127.0.0.1:{upstream.address[1]}") as proxy:
        pids = worker_pids(proxy)
        started = time.monotonic()
        accepting(proxy, 2)
        # (a worker that died within a second of its start would be started again later)
        time.sleep(max(0.0, _supervisor._QUICK_DEATH + 0.2 - (time.monotonic() - started)))  # sleep-ok
        os.kill(pids[0], signal.SIGSTOP)   # it accepts no more: its share of clients queues
        clients = []
        try:
            for _ in range(20):  # the kernel spreads them by address: some reach each worker
                client = connect(proxy.address)
                client.sendall(b"ping")
                clients.append(client)
            os.kill(pids[0], signal.SIGKILL)
            proxy.wait_for("started again")
            for client in clients:
                assert recv_exactly(client, 4) == b"ping"
        finally:
            for client in clients:
                client.close()
        code, output = proxy.stop()
    assert code == 0, output


def test_a_workers_snapshot_gives_the_event_loop_passes_between_slices_of_rules():
    """A scrape must not hold a worker's forwarding up for its whole snapshot (1,000 rules: 20 ms):
    the event loop gets a pass after every SNAPSHOT_SLICE rules, never inside a rule."""
    import json as json_module

    from gproxy import _workerlink
    from gproxy.stats import Counters, Outcome

    class Rule:
        def __init__(self, index):
            self.name = f"rule{index}"
            self.counters = Counters()
            self.counters.ended(Outcome.EOF, 0.5, index, 2 * index)

    rules = [Rule(i) for i in range(2 * _workerlink.SNAPSHOT_SLICE + 1)]
    passes = []
    paced = _workerlink.snapshot(rules, pace=lambda: passes.append(len(passes)))
    assert len(passes) == 2
    assert paced.text == _workerlink.snapshot(rules).text
    decoded = json_module.loads(_workerlink.encode({"metrics": paced, "id": 7})[4:])
    assert decoded["id"] == 7 and len(decoded["metrics"]) == len(rules)
    assert decoded["metrics"][3] == ["rule3", json_module.loads(paced.text)[3][1]]
    assert decoded["metrics"][3][1]["bytes_downstream"] == 6
