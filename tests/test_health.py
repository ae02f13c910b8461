"""Active health checks (tcp, send-expect, http) on real sockets: down and up again with no client,
combined with passive health, never in the way of forwarding; and their keys in the file and CLI.

Tests wait for the one log line each change makes (a queue-collecting handler), never for time."""

from __future__ import annotations

import logging
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import gproxy
from doctext import ROOT
from gproxy import metrics
from gproxy._configfile import parse
from gproxy.config import Rule
from gproxy.targets import Targets
from peers import TIMEOUT, Proxy, Server, connect, echo, free_port, recv_all, recv_exactly
from test_real_clients import need

# Checks 20 times a second, so changes come within a test's patience; a check that should pass
# has 2 s, so a loaded machine (where one slow answer could decide a first check) cannot fail it.
FAST = dict(check_interval=0.05, check_timeout=2)


class Changes(logging.Handler):
    """Every health change (target down, target up) logged by gproxy.targets, in a queue."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.queue: "queue.Queue[logging.LogRecord]" = queue.Queue()
        self.later: "list[logging.LogRecord]" = []  # other targets' changes, taken in turn
        self.logger = logging.getLogger("gproxy.targets")

    def emit(self, record):
        self.queue.put(record)

    def next(self, event: str, target, timeout: float = TIMEOUT) -> logging.LogRecord:
        """The next change of ``target`` (``"target_down"`` or ``"target_up"``); any other change
        of that target before it fails the test."""
        target = target if isinstance(target, str) else "%s:%d" % tuple(target)
        deadline = time.monotonic() + timeout
        while True:
            record = next((r for r in self.later if r.fields["target"] == target), None)
            if record is not None:
                self.later.remove(record)
            else:
                try:
                    record = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    raise AssertionError(f"no {event} of {target} within {timeout}s") from None
                if record.fields["target"] != target:
                    self.later.append(record)
                    continue
            assert record.fields["event"] == event, (event, record.getMessage())
            return record

    def none(self) -> None:
        """No change logged but those taken."""
        left = self.later + list(self.queue.queue)
        assert not left, [r.getMessage() for r in left]

    def __enter__(self):
        self.logger.addHandler(self)
        self.logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)
        self.logger.setLevel(logging.NOTSET)


def up_in_metrics(fw, target) -> int:
    """gproxy_target_up of ``target`` as a scrape shows it."""
    name = target if isinstance(target, str) else "%s:%d" % tuple(target)
    text = metrics.render([fw])
    match = re.search(r'gproxy_target_up\{rule="[^"]*",target="%s"\} (\d)' % re.escape(name), text)
    assert match, text
    return int(match.group(1))


def tagged(tag: bytes):
    def serve(sock):
        sock.sendall(tag)
        echo(sock)
    return serve


def reached(address) -> bytes:
    with connect(address) as client:
        tag = recv_exactly(client, 1)
        client.sendall(b"ping")
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client) == b"ping"
    return tag


class Silent:
    """An upstream that accepts and never says a word until released: a hung backend."""

    def __init__(self):
        self.released = threading.Event()
        self.connections = 0

    def __call__(self, sock):
        self.connections += 1
        self.released.wait(TIMEOUT)


class Http:
    """A tiny HTTP server: answers every request with ``status`` and remembers the requests."""

    def __init__(self, status: int):
        self.status = status
        self.requests: "queue.Queue[bytes]" = queue.Queue()

    def __call__(self, sock):
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                return
            head += chunk
        self.requests.put(head)
        sock.sendall(b"HTTP/1.1 %d Whatever\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok" % self.status)


# -- the state: one verdict from passive health and the check --------------------------------

def targets(**options) -> Targets:
    return Targets(Rule.build("127.0.0.1:0", ["127.0.0.1:1", "127.0.0.1:2"], **options), label="r")


def test_the_first_check_decides_then_fall_and_rise_count_in_a_row():
    t = targets(check="tcp", rise=2, fall=3)
    a = t.static[0]
    assert t.is_up(a)
    t.checked(a, False, "refused")            # the first result decides at once
    assert not t.is_up(a)
    t.checked(a, True, "ok")
    assert not t.is_up(a)                      # one pass of two
    t.checked(a, False, "refused")             # breaks the run
    t.checked(a, True, "ok")
    assert not t.is_up(a)
    t.checked(a, True, "ok")
    assert t.is_up(a)
    for _ in range(2):
        t.checked(a, False, "refused")
        assert t.is_up(a)                      # two failures of three
    t.checked(a, True, "ok")                   # breaks the run
    for _ in range(2):
        t.checked(a, False, "refused")
    assert t.is_up(a)
    t.checked(a, False, "refused")
    assert not t.is_up(a)


def test_down_when_either_says_so():
    t = targets(check="tcp", rise=2, max_fails=1)
    a, b = t.static
    t.checked(a, True, "ok")
    t.failed(a, "refused")                     # passive: down, though the check passed
    assert not t.is_up(a) and t.order(None)[0] == b
    t.checked(a, True, "ok")
    assert not t.is_up(a)                      # `rise` passes count from the passive mark
    t.checked(a, True, "ok")
    assert t.is_up(a) and t.order(None)[0] == a
    t.checked(a, False, "refused")
    for _ in range(2):
        t.checked(a, False, "refused")
    assert not t.is_up(a)
    t.succeeded(a)                             # a client got through (a last resort)...
    assert not t.is_up(a)                      # ...but the check still says down
    t.released(a)


# -- the checks, on real sockets --------------------------------------------------------------

def test_a_quiet_rules_target_comes_back_up_with_no_client(forwarder_factory):
    port = free_port()
    target = f"127.0.0.1:{port}"
    with Changes() as changes:
        fw = forwarder_factory(target, check="tcp", **FAST)
        down = changes.next("target_down", target)
        assert down.levelno == logging.WARNING
        assert "tcp check failed once: connection refused" in down.getMessage(), down.getMessage()
        assert down.fields["rule"] == fw.name and down.fields["reason"].endswith("connection refused")
        assert up_in_metrics(fw, target) == 0
        with Server(echo, address=("127.0.0.1", port)):
            up = changes.next("target_up", target)
            assert up.levelno == logging.INFO
            assert "tcp check passed 2 times in a row: connected" in up.getMessage(), up.getMessage()
            assert up_in_metrics(fw, target) == 1
            changes.none()  # one line per change, not per check
    assert fw.statistics().accepted == 0  # no client traffic at all


def test_send_expect_fails_by_timeout_on_a_backend_that_never_answers(forwarder_factory):
    silent = Silent()
    with Server(silent) as hung, Server(echo) as live, Changes() as changes:
        fw = forwarder_factory([hung.address, live.address], check="send-expect",
                               check_send="PING\r\n", check_expect=r"^PING\r\n",
                               check_interval=0.05, check_timeout=1, fall=2)
        down = changes.next("target_down", hung.address)
        assert "send-expect check failed" in down.getMessage()
        assert down.fields["reason"].endswith(": timed out after 1s waiting for an answer"), down.fields
        with connect(fw.address) as client:   # failover: the first target is down, the second takes it
            client.sendall(b"hello")
            client.shutdown(socket.SHUT_WR)
            assert recv_all(client) == b"hello"
        forwarder_factory.wait_closed(fw, accepted=1)  # the record comes after the client's EOF
        changes.none()
        silent.released.set()
    assert forwarder_factory.records[-1].upstream == "%s:%d" % live.address


def test_send_expect_says_what_the_target_answered_instead(forwarder_factory):
    def wrong(sock):
        sock.recv(100)
        sock.sendall(b"-ERR not ready\r\n")
        sock.recv(100)  # keeps the connection open: only the deadline ends the wait

    with Server(wrong) as target, Changes() as changes:
        forwarder_factory(target.address, check="send-expect", check_send=b"PING\r\n",
                          check_expect=r"^\+PONG", check_interval=0.05, check_timeout=0.1)
        down = changes.next("target_down", target.address)
    assert down.fields["reason"].endswith(
        r": answered '-ERR not ready\r\n', which does not match ^\+PONG (waited 0.1s)"), down.fields


def test_http_check_503_is_down_then_200_is_up(forwarder_factory):
    http = Http(503)
    with Server(http) as target, Changes() as changes:
        forwarder_factory(target.address, check="http", check_http_path="/health?deep=1", **FAST)
        down = changes.next("target_down", target.address)
        assert down.fields["reason"].endswith(": HTTP status 503, expected 200-399"), down.fields
        http.status = 200
        up = changes.next("target_up", target.address)
        assert up.fields["reason"] == "its http check passed 2 times in a row: HTTP status 200"
    request = http.requests.get(timeout=TIMEOUT).decode("ascii")
    lines = request.split("\r\n")
    assert lines[0] == "GET /health?deep=1 HTTP/1.1", request
    assert "Host: 127.0.0.1:%d" % target.address[1] in lines and "Connection: close" in lines, request


def test_http_check_method_host_and_status_list(forwarder_factory):
    http = Http(204)
    with Server(http) as target, Changes() as changes:
        forwarder_factory(target.address, check="http", check_http_method="HEAD", check_http_host="app.example",
                          check_http_status="200,205-299", **FAST)
        down = changes.next("target_down", target.address)
    assert down.fields["reason"] == "its http check failed once: HTTP status 204, expected 200,205-299"
    lines = http.requests.get(timeout=TIMEOUT).decode("ascii").split("\r\n")
    assert lines[0] == "HEAD / HTTP/1.1" and "Host: app.example" in lines


def test_a_check_sends_the_rules_proxy_header_first(forwarder_factory):
    seen: "queue.Queue[bytes]" = queue.Queue()

    def serve(sock):
        seen.put(sock.recv(100))

    with Server(serve) as target:
        forwarder_factory(target.address, check="tcp", proxy_protocol="v1", **FAST)
        assert seen.get(timeout=TIMEOUT) == b"PROXY UNKNOWN\r\n"


def test_a_check_never_holds_up_clients_and_stop_ends_a_hung_check(forwarder_factory):
    silent = Silent()
    with Server(silent) as hung, Server(echo) as live:
        # the hung target's check waits 30 s; the client of the live one must not wait with it
        fw = forwarder_factory([live.address, hung.address], check="send-expect", check_expect="x",
                               check_timeout=30, check_interval=0.01)
        deadline = time.monotonic() + TIMEOUT
        while silent.connections == 0:  # the hung check is under way
            assert time.monotonic() < deadline
            time.sleep(0.01)  # sleep-ok: polls a peer thread's counter
        for _ in range(20):
            with connect(fw.address, timeout=5) as client:
                client.sendall(b"x" * 1000)
                client.shutdown(socket.SHUT_WR)
                assert recv_all(client) == b"x" * 1000
        forwarder_factory.wait_closed(fw, accepted=20)
        started = time.monotonic()
        fw.stop()
        assert time.monotonic() - started < 5  # the check was killed, not waited for
        silent.released.set()


def test_failover_fails_back_once_the_primary_passes_its_checks_and_open_connections_stay(forwarder_factory):
    port = free_port()
    primary = f"127.0.0.1:{port}"
    with Server(tagged(b"B")) as backup, Changes() as changes:
        # fail_timeout 60: without the check, the primary would be skipped for a minute
        fw = forwarder_factory([primary, backup.address], check="tcp", fail_timeout=60, **FAST)
        changes.next("target_down", primary)
        assert reached(fw.address) == b"B"
        held = connect(fw.address)  # stays open on the backup through the failback
        assert recv_exactly(held, 1) == b"B"
        with Server(tagged(b"A"), address=("127.0.0.1", port)):
            changes.next("target_up", primary)
            assert [reached(fw.address) for _ in range(3)] == [b"A"] * 3
            held.sendall(b"still here")
            held.shutdown(socket.SHUT_WR)
            assert recv_all(held) == b"still here"
            held.close()
            forwarder_factory.wait_closed(fw, accepted=5)


@pytest.mark.timeout(60)
def test_redis_under_sigstop_is_found_by_ping_and_clients_move_and_come_back(forwarder_factory):
    server = need("redis-server")
    need("redis-cli")
    redises = []
    try:
        for name in ("primary", "replica"):
            port = free_port()
            process = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                        "--appendonly", "no", "--protected-mode", "no"],
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            redises.append((process, port))
            for line in process.stdout:
                if "Ready to accept connections" in line:
                    break
            else:
                pytest.fail(f"redis-server exited with {process.wait()}")
            threading.Thread(target=process.stdout.read, daemon=True).start()
            subprocess.run(["redis-cli", "-p", str(port), "SET", "who", name], check=True,
                           capture_output=True, timeout=TIMEOUT)
        (primary, primary_port), (_, replica_port) = redises
        primary_address = f"127.0.0.1:{primary_port}"
        with Changes() as changes:
            fw = forwarder_factory([primary_address, f"127.0.0.1:{replica_port}"], check="send-expect",
                                   check_send="PING\\r\\n", check_expect=r"^\+PONG",
                                   check_interval=0.1, check_timeout=1, fall=2)

            def who() -> bytes:
                with connect(fw.address) as client:
                    client.sendall(b"GET who\r\n")
                    answer = b""
                    while not answer.endswith(b"\r\n") or answer.count(b"\r\n") < 2:
                        answer += client.recv(100)
                    return answer.split(b"\r\n")[1]

            assert who() == b"primary"
            primary.send_signal(signal.SIGSTOP)
            try:
                down = changes.next("target_down", primary_address)
                assert "timed out after 1s waiting for an answer" in down.getMessage()
                assert who() == b"replica"
            finally:
                primary.send_signal(signal.SIGCONT)
            up = changes.next("target_up", primary_address)
            assert "+PONG" in up.getMessage()
            assert who() == b"primary"
    finally:
        for process, _ in redises:
            process.send_signal(signal.SIGCONT)
            process.terminate()
            process.wait(TIMEOUT)


# -- the keys ---------------------------------------------------------------------------------

def test_check_keys_in_a_config_file_and_defaults_for_several_kinds():
    config = parse("""
[defaults]
check_http_path = "/health"
check_interval = 0.5
[[rule]]
name = "web"
listen = "127.0.0.1:0"
target = "127.0.0.1:8080"
check = "http"
[[rule]]
name = "redis"
listen = "127.0.0.1:0"
target = "127.0.0.1:6379"
check = "send-expect"
check_send = 'PING\\r\\n'
check_expect = "^\\\\+PONG"
rise = 1
fall = 1
""", "g.toml")
    web, redis = config.rules["web"], config.rules["redis"]
    assert (web.check, web.check_http_path, web.check_interval) == ("http", "/health", 0.5)
    assert (redis.check, redis.check_send, redis.check_expect) == ("send-expect", b"PING\r\n", r"^\+PONG")
    assert (redis.rise, redis.fall, redis.check_http_path) == (1, 1, "/")
    assert redis.check_timeout is None and web.check_timeout is None


@pytest.mark.parametrize("keys, culprit, words", [
    ('check = "ping"', "check", "expected tcp, send-expect, http or off"),
    ('check = "tcp"\ncheck_send = "x"', "check_send", "is for check = \"send-expect\", not \"tcp\""),
    ('check = "send-expect"', "check_expect", "required by check = \"send-expect\""),
    ('check = "send-expect"\ncheck_expect = "("', "check_expect", "not a regular expression"),
    ('check_send = "\\\\q"', "check_send", "unknown escape"),
    ('check = "http"\ncheck_http_status = "200-99"', "check_http_status", "low to high"),
    ('check = "http"\ncheck_http_path = "health"', "check_http_path", "must start with /"),
    ('check = "http"\ncheck_http_method = "GET /x"', "check_http_method", "an HTTP method"),
    ('check_interval = 0', "check_interval", "> 0"),
    ('check_timeout = -1', "check_timeout", ">= 0"),
    ('rise = 0', "rise", "at least 1"),
    ('fall = 0', "fall", "at least 1"),
])
def test_bad_check_keys_name_file_rule_and_key(keys, culprit, words):
    with pytest.raises(gproxy.ConfigError) as caught:
        parse(f'[[rule]]\nname = "r"\nlisten = "127.0.0.1:0"\ntarget = "127.0.0.1:1"\n{keys}\n', "g.toml")
    message = str(caught.value)
    assert message.startswith(f"g.toml: rule 'r': {culprit}: "), message
    assert words in message, message


def test_a_target_function_cannot_be_checked():
    with pytest.raises(gproxy.ConfigError, match="^check: needs fixed targets"):
        gproxy.Forwarder("127.0.0.1:0", lambda client: "127.0.0.1:1", check="tcp")


def test_the_command_line_checks_and_names_its_own_options():
    with Proxy("--health-check", "tcp", "--check-interval", "0.05", f"127.0.0.1:{free_port()}") as proxy:
        line = proxy.wait_for("is down after")
        assert "its tcp check failed once: connection refused" in line, line
        code, _ = proxy.stop()
    assert code == 0
    for argv, words in ((["--health-check", "ping"], "--health-check: expected tcp, send-expect, http or off"),
                        (["--health-check", "tcp", "--check-send", "x"], "--check-send: is for check"),
                        (["--rise", "0"], "--rise: must be at least 1")):
        result = subprocess.run([sys.executable, "-m", "gproxy", *argv, "127.0.0.1:0", "127.0.0.1:1"],
                                capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
        assert result.returncode == 2 and words in result.stderr, (argv, result.stderr)
    result = subprocess.run([sys.executable, "-m", "gproxy", "--health-check", "tcp", "-c", "x.toml"],
                            capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
    assert result.returncode == 2 and "--health-check: with -c, rule options go in the file" in result.stderr


FORK_WHILE_CHECKING = '''
import os, socket, time
import gproxy

listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(8)
fw = gproxy.Forwarder("127.0.0.1:0", listener.getsockname(), check="send-expect", check_send="x",
                      check_expect="never", check_interval=0.01, check_timeout=30).start()
check, _ = listener.accept()  # a check under way: it waits 30 s for an answer
check.settimeout(5)
assert check.recv(1) == b"x"

pid = os.fork()
if pid == 0:  # a child that lives on, as a worker process of the host program would
    import gevent
    gevent.sleep(4) if PATCHED else time.sleep(4)  # sleep-ok: the child lives on, as a worker would
    os._exit(0)

fw.stop(timeout=0)  # the parent stops its checks: the check's connection closes...
started = time.monotonic()
try:
    assert check.recv(100) == b""
except ConnectionResetError:
    pass
assert time.monotonic() - started < 3, "the child kept the check's connection open"  # ...everywhere
os.kill(pid, 9)
os.waitpid(pid, 0)
print("OK")
'''


@pytest.mark.parametrize("patched", [False, True], ids=["unpatched", "patched"])
def test_a_forked_child_neither_checks_nor_keeps_a_check_open(patched):
    prelude = "from gevent import monkey; monkey.patch_all()\nPATCHED = True\n" if patched else "PATCHED = False\n"
    result = subprocess.run([sys.executable, "-c", prelude + FORK_WHILE_CHECKING], capture_output=True,
                            text=True, timeout=TIMEOUT * 3, cwd=ROOT, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "OK\n", result.stdout + result.stderr


def test_a_reloaded_rule_keeps_what_its_checks_found(tmp_path):
    dead = f"127.0.0.1:{free_port()}"
    with Server(echo) as live, Changes() as changes:
        path = tmp_path / "gproxy.toml"

        def write(idle_timeout):
            path.write_text(f'[[rule]]\nname = "r"\nlisten = "127.0.0.1:0"\n'
                            f'targets = ["{dead}", "127.0.0.1:{live.address[1]}"]\n'
                            f'check = "tcp"\ncheck_interval = 0.05\ncheck_timeout = 2\n'
                            f'idle_timeout = {idle_timeout}\n')

        write(60)
        service = gproxy.load_config(str(path)).start()
        try:
            changes.next("target_down", dead)
            old = service["r"]
            write(61)  # a changed rule: a new forwarder takes over its listener
            assert service.reload()
            assert service["r"] is not old
            # at once, before any check of the new forwarder: still down, and no line says it again
            assert up_in_metrics(service["r"], dead) == 0
            changes.none()
        finally:
            service.stop()


def test_check_a_file_names_each_rules_check(tmp_path):
    path = tmp_path / "g.toml"
    path.write_text('[[rule]]\nname = "r"\nlisten = "127.0.0.1:0"\ntargets = ["127.0.0.1:1", "127.0.0.1:2"]\n'
                    'check = "http"\ncheck_interval = 0.5\n')
    result = subprocess.run([sys.executable, "-m", "gproxy", "--check", "-c", str(path)], capture_output=True,
                            text=True, timeout=TIMEOUT, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "  r: 127.0.0.1:0 -> 127.0.0.1:1, 127.0.0.1:2 (failover), http check every 0.5s" in result.stdout
