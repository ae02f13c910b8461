"""The config file, run the way operators run it: ``gproxy -c FILE`` and ``--check`` in
subprocesses, SIGHUP reloads under traffic, systemd's READY=1 on a socket the test binds."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from doctext import DOCS_DIR, fences
from peers import (
    TIMEOUT,
    Gate,
    Proxy,
    Server,
    connect,
    echo,
    free_port,
    payload,
    recv_all,
    recv_exactly,
)

RULE_LINE = re.compile(r"listening on (\S+) -> \S+ \(rule ([^)]+)\)")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gproxy", *args], capture_output=True, text=True,
                          timeout=TIMEOUT, stdin=subprocess.DEVNULL)


def write(path: Path, text: str) -> str:
    path.write_text(textwrap.dedent(text))
    return str(path)


def addr(text: str):
    """'HOST:PORT' -> (HOST, PORT); 'unix:/p' -> '/p'."""
    if text.startswith("unix:"):
        return text[5:]
    host, _, port = text.rpartition(":")
    return host, int(port)


class ConfigProxy(Proxy):
    """``gproxy -c FILE`` in a subprocess; ``rules`` maps each rule's name to its bound address."""

    def __init__(self, path: str, count: int, env=None, extra=(), **launch):
        super().__init__(argv=["-q", *extra, "-c", path], env=env, **launch)
        self.rules = {}
        if RULE_LINE.search(self.seen[-1]):
            self._record(self.seen[-1])
        while len(self.rules) < count:
            self._record(self.wait_for("listening on "))

    def _record(self, line: str) -> None:
        match = RULE_LINE.search(line)
        assert match, line
        self.rules[match.group(2)] = addr(match.group(1))

    def reload(self) -> str:
        """SIGHUP, and the line that says how it went: "INFO reloaded ...", or "ERROR reload
        failed ..." or "ERROR reload of ... failed" (not a line about an earlier reload's
        old connections)."""
        self.signal(signal.SIGHUP)
        while True:
            line = self.wait_for(" reload")
            if re.search(r" (reloaded |reload failed|reload of )", line):
                return line


def echo_through(address, data: bytes = b"ping") -> bytes:
    with connect(address) as client:
        client.sendall(data)
        client.shutdown(socket.SHUT_WR)
        return recv_all(client)


def tagged(tag: bytes):
    def serve(sock):
        sock.sendall(tag)
        echo(sock)
    return serve


def first_byte(address) -> bytes:
    with connect(address) as client:
        return recv_exactly(client, 1)


# -- rules from a file ---------------------------------------------------------------------


def test_two_rules_from_one_file(tmp_path):
    with Server(tagged(b"A")) as a, Server(tagged(b"B")) as b:
        path = write(tmp_path / "gproxy.toml", f"""
            [defaults]
            connect_timeout = 5
            idle_timeout = 60

            [[rule]]
            name = "alpha"
            listen = "127.0.0.1:0"
            target = "127.0.0.1:{a.address[1]}"

            [[rule]]
            name = "beta"
            listen = "unix:{tmp_path / 'beta.sock'}"
            targets = ["127.0.0.1:{free_port()}", "127.0.0.1:{b.address[1]}"]
            """)
        assert run_cli("--check", "-c", path).returncode == 0
        with ConfigProxy(path, 2) as proxy:
            assert first_byte(proxy.rules["alpha"]) == b"A"
            assert first_byte(proxy.rules["beta"]) == b"B"  # its dead first target goes unnoticed
            code, output = proxy.stop()
    assert code == 0 and "Traceback" not in output
    assert not (tmp_path / "beta.sock").exists()


def test_text_connection_lines_name_their_rule(tmp_path):
    """Several rules log into one stream: each connection line starts with its rule's name
    (HAProxy's tcplog names the frontend), as JSON lines carry it in ``rule``."""
    with Server(echo) as upstream:
        path = write(tmp_path / "gproxy.toml", f"""
            [[rule]]
            name = "alpha"
            listen = "127.0.0.1:0"
            target = "127.0.0.1:{upstream.address[1]}"

            [[rule]]
            name = "beta"
            listen = "127.0.0.1:0"
            target = "127.0.0.1:{free_port()}"
            """)
        with Proxy(argv=["-c", path]) as proxy:
            rules = {}
            for line in [proxy.seen[-1], proxy.wait_for("listening on ")]:
                where, name = RULE_LINE.search(line).groups()
                rules[name] = addr(where)
            assert echo_through(rules["alpha"]) == b"ping"
            assert recv_all(connect(rules["beta"])) == b""  # its target refuses
            alpha = proxy.wait_for("conn#1 ")
            beta = proxy.wait_for("conn#1 ")
            if " beta " in alpha:
                alpha, beta = beta, alpha
            code, _ = proxy.stop()
    assert code == 0
    assert re.search(r" INFO alpha conn#1 127\.0\.0\.1:\d+ -> \S+ eof, ", alpha), alpha
    assert re.search(r" WARNING beta conn#1 127\.0\.0\.1:\d+ -> \S+ connect failed ", beta), beta


def test_several_targets_on_the_command_line(tmp_path):
    with Server(tagged(b"A")) as a, Server(tagged(b"B")) as b:
        with Proxy(argv=["--balance", "round-robin", "-q", "127.0.0.1:0", f"127.0.0.1:{a.address[1]}",
                         f"127.0.0.1:{b.address[1]}"]) as proxy:
            assert [first_byte(proxy.address) for _ in range(4)] == [b"A", b"B", b"A", b"B"]
            code, output = proxy.stop()
    assert code == 0


# -- every bad file through --check ----------------------------------------------------------

GOOD_RULE = """
[[rule]]
name = "web"
listen = "127.0.0.1:18080"
target = "127.0.0.1:8080"
"""


@pytest.mark.parametrize("text, culprit", [
    ("[[rule]\nname = 'x'", "TOML syntax"),
    ("", "no [[rule]]"),
    ("colour = 'blue'\n" + GOOD_RULE, "colour"),
    ("log_format = 'xml'\n" + GOOD_RULE, "log_format"),
    ("[defaults]\nidle_timeout = -1\n" + GOOD_RULE, "[defaults] idle_timeout"),
    ("[defaults]\nlisten = '1'\n" + GOOD_RULE, "[defaults] listen"),
    (GOOD_RULE + "idle_timout = 5\n", "rule 'web': idle_timout"),
    (GOOD_RULE + "connect_timeout = 'soon'\n", "rule 'web': connect_timeout"),
    (GOOD_RULE + "balance = 'random'\n", "rule 'web': balance"),
    (GOOD_RULE + "max_fails = -1\n", "rule 'web': max_fails"),
    (GOOD_RULE + "splice = 'yes'\n", "rule 'web': splice"),
    (GOOD_RULE + "targets = ['127.0.0.1:1']\n", "rule 'web': targets"),
    ("[[rule]]\nname = 'web'\ntarget = '127.0.0.1:1'\n", "rule 'web': listen"),
    ("[[rule]]\nname = 'web'\nlisten = '127.0.0.1:1'\n", "rule 'web': target"),
    ("[[rule]]\nname = 'web'\nlisten = '127.0.0.1:1'\ntarget = '127.0.0.1:1'\n", "rule 'web': target"),
    ("[[rule]]\nname = 'web'\nlisten = '127.0.0.1:1'\ntargets = ['127.0.0.1:2', '127.0.0.1:1']\n",
     "rule 'web': targets"),
    ("[[rule]]\nname = 'web'\nlisten = '127.0.0.1:70000'\ntarget = '127.0.0.1:1'\n", "rule 'web': listen"),
    ("[[rule]]\nname = 'web'\nlisten = 'unix:'\ntarget = '127.0.0.1:1'\n", "rule 'web': listen"),
    ("[[rule]]\nlisten = '127.0.0.1:1'\ntargets = []\n", "rule #1: targets"),
    ("[[rule]]\nlisten = '127.0.0.1:1'\ntargets = '127.0.0.1:2'\n", "rule #1: targets"),
    (GOOD_RULE + GOOD_RULE.replace("18080", "18081"), "rule 'web': name"),
    (GOOD_RULE + GOOD_RULE.replace("web", "api"), "rule 'api': listen"),
    (GOOD_RULE + "allow = ['10.0.0.0/33']\n", "rule 'web': allow"),
    (GOOD_RULE + "proxy_protocol = 'v3'\n", "rule 'web': proxy_protocol"),
])
def test_every_bad_file_is_one_line_naming_file_rule_and_key(tmp_path, text, culprit):
    path = write(tmp_path / "bad.toml", text)
    result = run_cli("--check", "-c", path)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and path in lines[0] and culprit in lines[0], result.stderr
    assert "Traceback" not in result.stderr and not result.stdout


@pytest.mark.parametrize("text, says", [
    # a number key takes a TOML number: a string is refused, not coerced ("1_0" was 10)
    (GOOD_RULE + 'max_fails = "3"\n',
     "rule 'web': max_fails: expected a whole number, got \"3\" (numbers go without quotes)"),
    (GOOD_RULE + 'buffer_size = "1_0"\n', "rule 'web': buffer_size: expected a whole number, got \"1_0\""),
    (GOOD_RULE + 'idle_timeout = "5"\n', "rule 'web': idle_timeout: expected a number of seconds, got \"5\""),
    ("[defaults]\nconnect_timeout = '5'\n" + GOOD_RULE,
     "[defaults] connect_timeout: expected a number of seconds, got \"5\""),
    (GOOD_RULE + "max_fails = true\n", "rule 'web': max_fails: expected a whole number, got true"),
    # an unknown key is named as such (with the close match), before any missing key
    ("[[rule]]\nname = 'web'\nlisten = '127.0.0.1:1'\ntargtes = ['127.0.0.1:2']\n",
     "rule 'web': targtes: unknown key (did you mean 'targets'?)"),
    (GOOD_RULE + "idle_timout = 5\n", "rule 'web': idle_timout: unknown key (did you mean 'idle_timeout'?)"),
    ("[[rule]]\nlisten = '127.0.0.1:1'\ncolour = 'blue'\n", "rule #1: colour: unknown key"),
    ("[defaults]\nidle_timout = 5\n" + GOOD_RULE,
     "[defaults] idle_timout: unknown key (did you mean 'idle_timeout'?)"),
    ("log_fromat = 'json'\n" + GOOD_RULE, "log_fromat: unknown key (did you mean 'log_format'?"),
    # values in TOML's spelling
    (GOOD_RULE + "splice = 1\n", "rule 'web': splice: expected true or false, got 1"),
    (GOOD_RULE + "reuse_port = 'no'\n", "rule 'web': reuse_port: expected true or false, got \"no\""),
    (GOOD_RULE + "proxy_protocol = true\n", "rule 'web': proxy_protocol: expected off, v1 or v2, got true"),
    (GOOD_RULE + "allow = [false]\n", "rule 'web': allow: expected an address or CIDR, got false"),
    (GOOD_RULE + "balance = 'random'\n", "expected one of failover, round-robin, least-connections, "
                                          "got \"random\""),
    (GOOD_RULE + "allow = ['10.0.0.0/33']\n", "not an address or CIDR: \"10.0.0.0/33\""),
    (GOOD_RULE + "name = 'api'\n", None),  # (a TOML error: a key given twice)
    ("[[rule]]\nlisten = true\ntarget = '127.0.0.1:1'\n", "rule #1: listen: expected \"HOST:PORT\", got true"),
    ("[[rule]]\nlisten = '127.0.0.1:1'\ntargets = [1, false]\n",
     "rule #1: targets: expected addresses as strings or tables ({address = \"HOST:PORT\", weight = 3}), "
     "got [1, false]"),
    ("log_format = false\n" + GOOD_RULE, "log_format: expected \"text\" or \"json\", got false"),
    ("[defaults]\nproxy_header_timeout = 0\n" + GOOD_RULE, "expected a number of seconds > 0, got 0"),
], ids=lambda value: None if value is None or "\n" in value else value[:60])
def test_config_file_messages(text, says):
    from gproxy import ConfigError
    from gproxy._configfile import parse
    with pytest.raises(ConfigError) as bad:
        parse(text, "f.toml")
    message = str(bad.value)
    assert message.startswith("f.toml: ") and (says is None or says in message), message
    assert "True" not in message and "False" not in message and "None" not in message, message


def test_check_without_a_file_says_what_it_needs():
    for args in (["--check", "127.0.0.1:1", "127.0.0.1:2"], ["--check"]):
        result = run_cli(*args)
        assert result.returncode == 2, result
        assert result.stderr.strip().splitlines() == [
            "gproxy: error: --check validates a config file: give -c FILE (see gproxy --help)"], result.stderr


def test_check_accepts_a_complete_file_and_says_what_it_holds(tmp_path):
    path = write(tmp_path / "ok.toml", """
        log_format = "text"

        [defaults]
        connect_timeout = 5
        idle_timeout = 600

        [[rule]]
        name = "postgres"
        listen = "127.0.0.1:15432"
        targets = ["db1.internal:5432", "db2.internal:5432"]
        balance = "failover"
        max_fails = 2
        fail_timeout = 30
        allow = ["10.0.0.0/8", "127.0.0.1"]
        deny = ["10.9.0.0/16"]
        proxy_protocol = "v2"
        max_connections_per_client = 100

        [[rule]]
        listen = "unix:/run/gproxy/redis.sock"
        target = "unix:/run/redis/redis.sock"
        """)
    result = run_cli("--check", "-c", path)
    assert result.returncode == 0, result
    assert "2 rule(s)" in result.stdout and "postgres" in result.stdout
    assert "unix:/run/gproxy/redis.sock" in result.stdout


def test_the_documented_example_file_is_valid(tmp_path):
    examples = [b.text for b in fences(DOCS_DIR / "configuration.md")
                if b.info == "toml" and b.text.startswith("# gproxy.toml")]
    assert len(examples) == 1, examples
    result = run_cli("--check", "-c", write(tmp_path / "gproxy.toml", examples[0]))
    assert result.returncode == 0, result
    assert "3 rule(s)" in result.stdout and "(round-robin)" in result.stdout, result.stdout


@pytest.mark.parametrize("args, culprit", [
    (["--check"], "-c FILE"),
    (["-c", "x.toml", "127.0.0.1:1", "127.0.0.1:2"], "not both"),
    (["-c", "x.toml", "--idle-timeout", "5"], "--idle-timeout"),
    (["-c", "/nonexistent/gproxy.toml"], "/nonexistent/gproxy.toml"),
])
def test_bad_config_arguments(args, culprit):
    result = run_cli(*args)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and culprit in lines[0], result.stderr


# -- reload ----------------------------------------------------------------------------------


def test_reload_under_traffic_keeps_listeners_and_connections(tmp_path):
    gate = Gate()
    with Server(gate) as held, Server(tagged(b"N")) as new_target, Server(tagged(b"O")) as old_target:
        path = tmp_path / "gproxy.toml"
        write(path, f"""
            [[rule]]
            name = "changed"
            listen = "127.0.0.1:0"
            target = "127.0.0.1:{old_target.address[1]}"

            [[rule]]
            name = "unchanged"
            listen = "127.0.0.1:0"
            target = "127.0.0.1:{held.address[1]}"

            [[rule]]
            name = "removed"
            listen = "127.0.0.1:0"
            target = "127.0.0.1:{old_target.address[1]}"
            """)
        with ConfigProxy(str(path), 3) as proxy:
            changed, unchanged, removed = (proxy.rules[n] for n in ("changed", "unchanged", "removed"))
            assert first_byte(changed) == b"O"
            # a transfer on the unchanged rule that must survive the reload byte for byte
            client = connect(unchanged)
            server = gate.get()
            data = payload(4_000_037, seed=7)
            half = len(data) // 2
            client.sendall(data[:half])
            assert recv_exactly(server, half) == data[:half]

            # clients hammer the changed rule's listener all through the reload
            refused, served, stop = [], [0], threading.Event()

            def hammer():
                while not stop.is_set():
                    try:
                        with connect(changed, timeout=5) as sock:
                            if recv_exactly(sock, 1) in (b"O", b"N"):
                                served[0] += 1
                    except OSError as exc:
                        refused.append(exc)
            hammering = threading.Thread(target=hammer)
            hammering.start()

            write(path, f"""
                [[rule]]
                name = "changed"
                listen = "127.0.0.1:{changed[1]}"
                target = "127.0.0.1:{new_target.address[1]}"
                idle_timeout = 300

                [[rule]]
                name = "unchanged"
                listen = "127.0.0.1:0"
                target = "127.0.0.1:{held.address[1]}"

                [[rule]]
                name = "added"
                listen = "127.0.0.1:0"
                target = "127.0.0.1:{new_target.address[1]}"
                """)
            try:
                line = proxy.reload()
                assert "1 added, 1 changed, 1 removed, 1 unchanged" in line, proxy.seen
                added_line = next(entry for entry in proxy.seen if "(rule added)" in entry)
                added = addr(RULE_LINE.search(added_line).group(1))
                # the changed rule takes new clients to its new target, on the same socket
                while first_byte(changed) != b"N":
                    pass
            finally:
                stop.set()
                hammering.join(TIMEOUT)
            assert not refused, refused[:3]
            assert served[0] > 0
            assert first_byte(added) == b"N"
            with pytest.raises(ConnectionRefusedError):
                connect(removed)

            # the held transfer finishes byte for byte, both ways
            client.sendall(data[half:])
            client.shutdown(socket.SHUT_WR)
            assert recv_exactly(server, len(data) - half) == data[half:]
            assert server.recv(1) == b""
            server.sendall(data[::-1])
            server.shutdown(socket.SHUT_WR)
            assert recv_all(client) == data[::-1]
            client.close()
            server.close()
            gate.release()
            code, output = proxy.stop()
    assert code == 0 and "Traceback" not in output
    # the changed rule's listener was never closed: it never logged a new listening line
    # for another port, and its old forwarder drained
    assert output.count("(rule changed)") == 2


def test_a_broken_file_on_reload_changes_nothing(tmp_path):
    with Server(tagged(b"A")) as a:
        path = tmp_path / "gproxy.toml"
        write(path, f"""
            [[rule]]
            name = "a"
            listen = "127.0.0.1:0"
            target = "127.0.0.1:{a.address[1]}"
            """)
        with ConfigProxy(str(path), 1) as proxy:
            write(path, f"""
                [[rule]]
                name = "a"
                listen = "127.0.0.1:0"
                target = "127.0.0.1:{a.address[1]}"
                idle_timeout = "soon"

                [[rule]]
                name = "b"
                listen = "127.0.0.1:0"
                target = "127.0.0.1:{a.address[1]}"
                """)
            line = proxy.reload()
            assert "ERROR" in line and "rule 'a': idle_timeout" in line and str(path) in line, line
            assert first_byte(proxy.rules["a"]) == b"A"
            # a port taken by someone else: binding fails, and that changes nothing either
            with socket.socket() as taken:
                taken.bind(("127.0.0.1", 0))
                taken.listen()
                write(path, f"""
                    [[rule]]
                    name = "a"
                    listen = "127.0.0.1:0"
                    target = "127.0.0.1:{a.address[1]}"
                    idle_timeout = 5

                    [[rule]]
                    name = "b"
                    listen = "127.0.0.1:{taken.getsockname()[1]}"
                    target = "127.0.0.1:{a.address[1]}"
                    """)
                line = proxy.reload()
                assert "ERROR" in line and "address already in use" in line, line
            assert first_byte(proxy.rules["a"]) == b"A"
            code, output = proxy.stop()
    assert code == 0 and "Traceback" not in output
    assert "(rule b)" not in output.replace(line, "")


# -- Unix sockets with real peers --------------------------------------------------------------


@pytest.fixture
def redis_unix(tmp_path):
    from test_real_clients import need
    server = need("redis-server")
    path = str(tmp_path / "redis.sock")
    process = subprocess.Popen([server, "--port", "0", "--unixsocket", path, "--unixsocketperm", "700",
                                "--save", "", "--appendonly", "no"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in process.stdout:  # ready by its own word, not by sleeping
            if "ready to accept connections" in line.lower():
                break
        else:
            pytest.fail(f"redis-server exited with {process.wait()}")
        threading.Thread(target=process.stdout.read, daemon=True).start()
        yield path
    finally:
        process.terminate()
        process.wait(TIMEOUT)


def test_redis_on_a_unix_socket_behind_tcp_and_unix_listeners(redis_unix, tmp_path):
    from test_real_clients import need
    cli = need("redis-cli")
    value = payload(500_009, seed=13).hex()
    listen = tmp_path / "front.sock"
    path = write(tmp_path / "gproxy.toml", f"""
        [[rule]]
        name = "tcp"
        listen = "127.0.0.1:0"
        target = "unix:{redis_unix}"

        [[rule]]
        name = "unix"
        listen = "unix:{listen}"
        target = "unix:{redis_unix}"
        """)
    with ConfigProxy(path, 2) as proxy:
        port = str(proxy.rules["tcp"][1])
        stored = subprocess.run([cli, "-p", port, "-x", "SET", "big"], input=value, capture_output=True,
                                text=True, timeout=TIMEOUT)
        assert stored.stdout.strip() == "OK", stored
        fetched = subprocess.run([cli, "-s", str(listen), "--raw", "GET", "big"], capture_output=True,
                                 text=True, timeout=TIMEOUT)
        assert fetched.stdout.rstrip("\n") == value
        code, output = proxy.stop()
    assert code == 0 and "Traceback" not in output


# -- systemd -----------------------------------------------------------------------------------


@pytest.mark.parametrize("abstract", [False, True])
def test_ready_reloading_stopping_on_notify_socket(tmp_path, abstract):
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager, Server(echo) as upstream:
        if abstract:
            name = f"gproxy-notify-{os.getpid()}"
            manager.bind("\0" + name)
            env_value = "@" + name
        else:
            env_value = str(tmp_path / "notify.sock")
            manager.bind(env_value)
        manager.settimeout(TIMEOUT)
        path = write(tmp_path / "gproxy.toml", f"""
            [[rule]]
            name = "a"
            listen = "127.0.0.1:0"
            target = "127.0.0.1:{upstream.address[1]}"
            """)
        with ConfigProxy(path, 1, env={**os.environ, "NOTIFY_SOCKET": env_value}) as proxy:
            assert manager.recv(4096) == b"READY=1"
            assert echo_through(proxy.rules["a"]) == b"ping"  # ready means bound
            proxy.signal(signal.SIGHUP)
            assert manager.recv(4096).startswith(b"RELOADING=1\nMONOTONIC_USEC=")
            assert manager.recv(4096) == b"READY=1"
            code, output = proxy.stop()
            assert manager.recv(4096) == b"STOPPING=1"
    assert code == 0 and "Traceback" not in output


# -- the embedding API, in a subprocess as programs use it ---------------------------------------


def test_load_config_in_a_program(tmp_path):
    with Server(tagged(b"A")) as a, Server(tagged(b"B")) as b:
        path = write(tmp_path / "gproxy.toml", f"""
            [[rule]]
            name = "web"
            listen = "127.0.0.1:0"
            target = "127.0.0.1:{a.address[1]}"
            """)
        program = textwrap.dedent(f"""
            import socket, gproxy
            service = gproxy.load_config({path!r})
            service.start()
            address = service["web"].address
            def tag():
                with socket.create_connection(address, timeout=10) as s:
                    return s.recv(1)
            assert tag() == b"A"
            text = open({path!r}).read()
            open({path!r}, "w").write(text.replace("{a.address[1]}", "{b.address[1]}"))
            assert service.reload() is True
            assert service["web"].address == address   # the same listening socket
            assert tag() == b"B"
            open({path!r}, "w").write("broken = [")
            assert service.reload() is False
            assert tag() == b"B"
            service.stop()
            print("ok")
            """)
        result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                                timeout=TIMEOUT, cwd=str(Path(__file__).resolve().parent.parent))
    assert result.returncode == 0 and result.stdout == "ok\n", result.stderr


def test_reload_removes_only_the_files_own_rules(tmp_path):
    import gproxy
    with Server(tagged(b"A")) as a:
        path = tmp_path / "gproxy.toml"
        rule = """
            [[rule]]
            name = "{name}"
            listen = "127.0.0.1:0"
            target = "127.0.0.1:{port}"
            """
        write(path, rule.format(name="kept", port=a.address[1]) + rule.format(name="gone", port=a.address[1]))
        files = gproxy.load_config(str(path)).start()  # unpatched: a hub in a thread of its own
        try:
            # a proxy made another way (as the HTTP API would) on the same service
            files._call(files.service.create, "extra", "127.0.0.1:0", f"127.0.0.1:{a.address[1]}")
            kept = files["kept"]
            write(path, rule.format(name="kept", port=a.address[1]))
            assert files.reload() is True
            assert sorted(files) == ["extra", "kept"] and files["kept"] is kept
            assert first_byte(files["extra"].address) == b"A"
        finally:
            files.stop()


def test_the_http_api_sees_the_files_rules_and_keeps_its_own_over_a_reload(tmp_path):
    import json
    import urllib.request

    def call(method, url, body=None):
        request = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body else None)
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return json.loads(response.read())

    with Server(tagged(b"A")) as a:
        path = write(tmp_path / "gproxy.toml", f"""
            [[rule]]
            name = "web"
            listen = "unix:{tmp_path / 'web.sock'}"
            targets = ["127.0.0.1:{free_port()}", "127.0.0.1:{a.address[1]}"]
            """)
        with ConfigProxy(path, 1, extra=["--api", "127.0.0.1:0"]) as proxy:
            api = re.search(r"HTTP API .*listening on (\S+)", proxy.wait_for("HTTP API")).group(1)
            web = call("GET", f"http://{api}/proxies")["web"]
            assert web["listen"] == f"unix:{tmp_path / 'web.sock'}"
            assert web["upstream"].endswith(f",127.0.0.1:{a.address[1]}")
            call("POST", f"http://{api}/proxies",
                 {"name": "extra", "listen": "127.0.0.1:0", "upstream": f"127.0.0.1:{a.address[1]}"})
            assert "1 unchanged" in proxy.reload()
            assert sorted(call("GET", f"http://{api}/proxies")) == ["extra", "web"]
            assert first_byte(proxy.rules["web"]) == b"A"
            code, output = proxy.stop()
    assert code == 0 and "Traceback" not in output


def test_a_stopped_file_service_refuses_reload_and_stops_again_quietly(tmp_path, no_errors_logged):
    """After stop() in thread mode the service's hub is gone: reload() must say so (False,
    one ERROR line) instead of raising from a dead loop, and a second stop() is a no-op."""
    import gproxy
    with Server(tagged(b"A")) as a:
        path = write(tmp_path / "gproxy.toml", f"""
            [[rule]]
            name = "web"
            listen = "127.0.0.1:0"
            target = "127.0.0.1:{a.address[1]}"
            """)
        files = gproxy.load_config(str(path)).start()  # unpatched: a hub in a thread of its own
        files.stop()
        assert files.reload() is False
        refused = [r for r in no_errors_logged.records if "stopped" in r.getMessage()]
        assert len(refused) == 1, [r.getMessage() for r in no_errors_logged.records]
        no_errors_logged.records.clear()  # the error was expected
        files.stop()
        assert files.statistics().active == 0


def test_a_call_running_on_the_services_hub_when_it_stops_does_not_wait_for_ever(tmp_path):
    """Thread mode: a call handed to the service's hub from another thread that is still running
    there when stop() ends the hub's thread. Its caller used to wait for ever."""
    import gevent

    import gproxy
    with Server(tagged(b"A")) as a:
        path = write(tmp_path / "gproxy.toml", f"""
            [[rule]]
            name = "web"
            listen = "127.0.0.1:0"
            target = "127.0.0.1:{a.address[1]}"
            """)
        files = gproxy.load_config(str(path)).start()  # unpatched: a hub in a thread of its own
        entered, outcome = threading.Event(), []

        def outlives_the_service():
            entered.set()
            gevent.sleep(3600)  # sleep-ok: a call on the service's hub that never finishes by itself

        def caller():
            try:
                files._call(outlives_the_service)
            except RuntimeError as exc:
                outcome.append(exc)

        waiting = threading.Thread(target=caller, daemon=True)
        waiting.start()
        assert entered.wait(TIMEOUT)
        files.stop()
        waiting.join(TIMEOUT)
        assert not waiting.is_alive(), "the caller still waits for a hub that has ended"
        assert len(outcome) == 1 and "while the call was running" in str(outcome[0]), outcome
