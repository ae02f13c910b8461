"""The command line under an operator's accidents: a stuck log reader, stray signals, a low fd limit."""

from __future__ import annotations

import re
import resource
import signal
import subprocess
import sys
import textwrap
import threading

from peers import TIMEOUT, Proxy, Server, connect, echo, recv_exactly

CLIENTS = 1500  # each logs a line: about 150 KB, twice what a pipe holds
#: enough lines to fill the pipe (about 650) and gproxy's queue of cli.LOG_QUEUE_LINES (1024)
MANY_CLIENTS = 2500


def start_unread(*args: str) -> tuple:
    """gproxy whose stderr pipe the test reads one line of (the listening line), then leaves."""
    process = subprocess.Popen([sys.executable, "-m", "gproxy", *args], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    line = process.stderr.readline().decode()
    match = re.search(r"listening on (\S+):(\d+) -> ", line)
    assert match, line
    return process, (match.group(1), int(match.group(2)))


def short_connections(address, count: int) -> None:
    for i in range(count):
        with connect(address, timeout=TIMEOUT) as client:
            client.sendall(b"x")
            assert recv_exactly(client, 1) == b"x", i


def test_a_stderr_nobody_reads_never_stops_forwarding_and_sigterm_still_works():
    with Server(echo) as upstream:
        process, address = start_unread("127.0.0.1:0", f"127.0.0.1:{upstream.address[1]}")
        try:
            short_connections(address, CLIENTS)   # froze after ~600 when stderr filled up
            process.send_signal(signal.SIGTERM)
            # exits though stderr is still unread: the final flush of the log is bounded
            assert process.wait(timeout=10) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(TIMEOUT)
            process.stderr.close()


def test_dropped_log_lines_are_counted_once_stderr_is_read_again():
    with Server(echo) as upstream:
        process, address = start_unread("127.0.0.1:0", f"127.0.0.1:{upstream.address[1]}")
        try:
            short_connections(address, MANY_CLIENTS)
            lines = []
            dropped_seen = threading.Event()

            def read() -> None:
                for raw in process.stderr:
                    lines.append(raw.decode())
                    if "log line(s) dropped" in lines[-1]:
                        dropped_seen.set()

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            assert dropped_seen.wait(TIMEOUT), lines[-3:]
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=TIMEOUT) == 0
            reader.join(TIMEOUT)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(TIMEOUT)
            process.stderr.close()
    dropped = sum(int(m.group(1)) for m in (re.search(r"WARNING (\d+) log line\(s\) dropped", line)
                                             for line in lines) if m)
    logged = sum(" conn#" in line for line in lines)
    assert dropped > 0 and logged + dropped == MANY_CLIENTS, (logged, dropped)
    assert not any("Traceback" in line for line in lines)


def test_stray_signals_are_logged_and_forwarding_goes_on():
    with Server(echo) as upstream, Proxy(f"127.0.0.1:{upstream.address[1]}") as proxy:
        with connect(proxy.address) as client:
            client.sendall(b"ping")
            assert recv_exactly(client, 4) == b"ping"
            proxy.signal(signal.SIGUSR1)   # statistics, the open connection included
            line = proxy.wait_for("statistics: ")
            assert "active 1" in line and "accepted 1" in line and "bytes_upstream 4" in line, line
            proxy.signal(signal.SIGHUP)
            proxy.wait_for("SIGHUP: nothing to reload")
            proxy.signal(signal.SIGUSR2)
            proxy.wait_for("SIGUSR2 ignored")
            proxy.signal(signal.SIGALRM)
            proxy.wait_for("SIGALRM ignored")
            client.sendall(b"pong")         # the same connection still flows
            assert recv_exactly(client, 4) == b"pong"
        code, output = proxy.stop()
    assert code == 0, output
    assert "Traceback" not in output


def low_fd_limit():
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))


def test_a_low_fd_limit_is_a_warning_naming_it_and_leaves_usable_connections():
    with Server(echo) as upstream, Proxy(f"127.0.0.1:{upstream.address[1]}",
                                         preexec_fn=low_fd_limit) as proxy:
        warning = next(line for line in proxy.seen if "WARNING" in line)
        match = re.search(r"fd limit.* 64\b.*max_connections (\d+)", warning)
        assert match, warning
        assert int(match.group(1)) >= 16, warning   # not 1, as it used to be
        clients = [connect(proxy.address) for _ in range(int(match.group(1)))]
        for i, client in enumerate(clients):         # all served at once
            client.sendall(b"%04d" % i)
            assert recv_exactly(client, 4) == b"%04d" % i
        for client in clients:
            client.close()
        code, output = proxy.stop()
    assert code == 0, output


def test_a_forked_worker_still_logs():
    script = textwrap.dedent('''
        import logging, os
        from gproxy.cli import _StderrLog
        handler = _StderrLog()
        log = logging.getLogger("gproxy.fork-test")
        log.addHandler(handler)
        log.warning("parent before fork")
        pid = os.fork()
        if pid == 0:
            log.warning("child line")
            handler.close()
            os._exit(0)
        os.waitpid(pid, 0)
        log.warning("parent after fork")
        handler.close()
    ''')
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    # Each process writes through its own writer thread, so the parent's line queued before the
    # fork may come out after the child's: every line once, and the parent's in order.
    assert sorted(lines) == sorted(["parent before fork", "child line", "parent after fork"]), lines
    assert [line for line in lines if line.startswith("parent")] == ["parent before fork", "parent after fork"]
