"""systemd socket activation (issue 17 part 2), with a fake systemd: the test binds the sockets,
and a launcher puts them at fd 3, 4, ... and sets LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES
for the process it becomes (exec keeps the pid), as systemd does for a .socket unit's service."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import urllib.request

import pytest

from gproxy import _systemd
from peers import TIMEOUT, Proxy, Server, echo, recv_all
from test_configfile import ConfigProxy, echo_through, first_byte, tagged

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="systemd is Linux's")

#: python -c LAUNCHER FDS NAMES ARGS...: FDS (comma-separated) become 3, 4, ... and the process
#: execs python ARGS with LISTEN_* set for itself; NAMES "" sets no LISTEN_FDNAMES
LAUNCHER = textwrap.dedent("""
    import fcntl, os, sys
    fds = [int(fd) for fd in sys.argv[1].split(",") if fd]
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]  # out of the way of 3, 4, ...
    for fd in fds:
        os.close(fd)
    for index, fd in enumerate(high):
        os.dup2(fd, 3 + index)  # inheritable, as systemd leaves them
        os.close(fd)
    os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(fds)))
    if sys.argv[2]:
        os.environ["LISTEN_FDNAMES"] = sys.argv[2]
    os.execv(sys.executable, [sys.executable, *sys.argv[3:]])
    """)


def launch(sockets, names=None):
    """The Proxy keywords that start gproxy the way systemd would, with these sockets."""
    fds = [sock.fileno() for sock in sockets]
    return {"python_args": ["-c", LAUNCHER, ",".join(map(str, fds)), ":".join(names) if names else ""],
            "pass_fds": fds}


def tcp_listener(port: int = 0) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    return sock


def unix_listener(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(path)
    sock.listen(128)
    return sock


def write(path, text: str) -> str:
    path.write_text(textwrap.dedent(text))
    return str(path)


def run_launched(sockets, names, *args) -> subprocess.CompletedProcess:
    options = launch(sockets, names)
    return subprocess.run([sys.executable, *options["python_args"], "-m", "gproxy", *args],
                          pass_fds=options["pass_fds"], capture_output=True, text=True, timeout=TIMEOUT,
                          stdin=subprocess.DEVNULL)


# -- serving on passed sockets -------------------------------------------------------------------


def test_rules_serve_on_the_sockets_systemd_passed_even_to_clients_that_came_first(tmp_path):
    web_socket = tcp_listener()
    unix_path = str(tmp_path / "redis.sock")
    redis_socket = unix_listener(unix_path)
    with web_socket, redis_socket, Server(echo) as upstream:
        web = web_socket.getsockname()
        path = write(tmp_path / "gproxy.toml", f"""
            [[rule]]
            name = "web"
            listen = "127.0.0.1:{web[1]}"
            target = "127.0.0.1:{upstream.address[1]}"

            [[rule]]
            name = "redis"
            listen = "unix:{unix_path}"
            target = "127.0.0.1:{upstream.address[1]}"
            """)
        # Clients that come before gproxy runs wait in the queue systemd's socket has: the
        # whole point of socket activation (a restart refuses nobody).
        early = socket.create_connection(web, timeout=TIMEOUT)
        early.sendall(b"came first")
        early.shutdown(socket.SHUT_WR)
        # the first by name, the second by its address (systemd names it after its unit)
        with ConfigProxy(path, 2, **launch([web_socket, redis_socket], ["web", "gproxy.socket"])) as proxy:
            assert recv_all(early) == b"came first"
            early.close()
            assert proxy.rules == {"web": web, "redis": unix_path}
            assert all(line.endswith(", on a socket from systemd") for line in proxy.seen
                       if "listening on" in line), proxy.seen
            assert echo_through(web) == b"ping"
            with socket.socket(socket.AF_UNIX) as client:
                client.settimeout(TIMEOUT)
                client.connect(unix_path)
                client.sendall(b"unix")
                client.shutdown(socket.SHUT_WR)
                assert recv_all(client) == b"unix"
            code, output = proxy.stop()
        assert code == 0 and "Traceback" not in output
        assert os.path.exists(unix_path)  # systemd's socket file: not ours to remove
        # and the socket is still systemd's, listening: the next start finds its clients queued
        with socket.create_connection(web, timeout=TIMEOUT):
            pass


def test_a_reload_keeps_the_passed_socket_and_a_rule_removed_then_added_takes_it_again(tmp_path):
    listener = tcp_listener()
    with listener, Server(tagged(b"A")) as a, Server(tagged(b"B")) as b, Server(tagged(b"C")) as c:
        port = listener.getsockname()[1]
        rule = """
            [[rule]]
            name = "web"
            listen = "127.0.0.1:{port}"
            target = "127.0.0.1:{target}"
            """
        other = f"""
            [[rule]]
            name = "other"
            listen = "127.0.0.1:0"
            target = "127.0.0.1:{c.address[1]}"
            """
        path = tmp_path / "gproxy.toml"
        write(path, rule.format(port=port, target=a.address[1]) + other)
        with ConfigProxy(str(path), 2, **launch([listener])) as proxy:
            assert first_byte(("127.0.0.1", port)) == b"A"
            write(path, rule.format(port=port, target=b.address[1]) + other)
            assert "1 changed" in proxy.reload()
            assert first_byte(("127.0.0.1", port)) == b"B"

            write(path, other)  # the rule goes: systemd's socket stays, and nobody serves it
            assert "1 removed" in proxy.reload()  # said just before it:
            assert any(f"WARNING systemd passed fd 3 (127.0.0.1:{port}), which no rule listens on now" in line
                       for line in proxy.seen), proxy.seen

            write(path, rule.format(port=port, target=a.address[1]) + other)
            line = proxy.reload()  # binding the port again would fail: systemd holds it
            assert "1 added" in line, proxy.seen
            assert proxy.seen[-2].endswith(f"listening on 127.0.0.1:{port} -> 127.0.0.1:{a.address[1]} "
                                           "(rule web), on a socket from systemd"), proxy.seen
            assert first_byte(("127.0.0.1", port)) == b"A"
            code, output = proxy.stop()
        assert code == 0 and "Traceback" not in output and "ERROR" not in output


def test_a_single_rule_and_the_metrics_and_api_ports_on_passed_sockets():
    rule_socket, metrics_socket, api_socket = tcp_listener(), tcp_listener(), tcp_listener()
    with rule_socket, metrics_socket, api_socket, Server(echo) as upstream:
        listen = "127.0.0.1:%d" % rule_socket.getsockname()[1]
        metrics = "127.0.0.1:%d" % metrics_socket.getsockname()[1]
        api = "127.0.0.1:%d" % api_socket.getsockname()[1]
        # the metrics socket by its name, the rule's and the API's by their addresses
        sockets = launch([rule_socket, metrics_socket, api_socket], ["gproxy.socket", "metrics", "gproxy.socket"])
        with Proxy("--metrics", metrics, "--api", api, "%s:%d" % upstream.address, listen=listen,
                   **sockets) as proxy:
            assert proxy.seen[-1].endswith(", on a socket from systemd")
            assert echo_through(proxy.address) == b"ping"
            with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=TIMEOUT) as page:
                assert b'gproxy_connections_total{rule="default",outcome="eof"} 1' in page.read()
            with urllib.request.urlopen(f"http://{api}/proxies", timeout=TIMEOUT) as page:
                assert json.load(page)["default"]["listen"] == listen
            code, output = proxy.stop()
        assert code == 0 and "Traceback" not in output


# -- what is refused ---------------------------------------------------------------------------


def test_a_passed_socket_no_rule_takes_is_one_line_and_exit_2(tmp_path):
    used, extra = tcp_listener(), tcp_listener()
    forgotten = extra.getsockname()[1]
    with used, extra:
        path = write(tmp_path / "gproxy.toml", f"""
            [[rule]]
            name = "web"
            listen = "127.0.0.1:{used.getsockname()[1]}"
            target = "127.0.0.1:9"
            """)
        result = run_launched([used, extra], ["web", "forgotten"], "-c", path)
    assert result.returncode == 2, result
    assert result.stderr.strip().splitlines() == [
        f"gproxy: error: LISTEN_FDS: systemd passed fd 4 named 'forgotten' (127.0.0.1:{forgotten}), "
        "which no rule listens on: give a rule that listen address, or the socket a rule's name "
        "(FileDescriptorName=)"]


@pytest.mark.parametrize("kind", ["datagram", "not listening"])
def test_a_socket_that_is_not_listening_for_streams_is_one_line_and_exit_2(kind):
    if kind == "datagram":
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    else:
        sock = socket.socket()
    with sock:
        sock.bind(("127.0.0.1", 0))
        result = run_launched([sock], None, "127.0.0.1:%d" % sock.getsockname()[1], "127.0.0.1:9")
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gproxy: error: LISTEN_FDS: systemd passed fd 3 (127.0.0.1:")
    assert ("a datagram socket" if kind == "datagram" else "not a listening stream socket") in lines[0]


def test_fdnames_that_do_not_count_the_fds_are_one_line_and_exit_2():
    sock = tcp_listener()
    with sock:
        result = run_launched([sock], ["a", "b"], "127.0.0.1:%d" % sock.getsockname()[1], "127.0.0.1:9")
    assert result.returncode == 2, result
    assert result.stderr.strip().splitlines() == ["gproxy: error: LISTEN_FDNAMES: 2 name(s) for 1 fd(s): 'a:b'"]


def test_variables_for_another_process_are_ignored():
    """LISTEN_PID names the process the fds are for: a child that inherited the variables
    (here: LISTEN_PID is not gproxy's) binds its own sockets and leaves fd 3 alone."""
    decoy = tcp_listener()
    with decoy, Server(echo) as upstream:
        env = dict(os.environ, LISTEN_PID="1", LISTEN_FDS="1")
        with Proxy("%s:%d" % upstream.address, env=env, pass_fds=(decoy.fileno(),)) as proxy:
            assert "systemd" not in proxy.seen[-1]
            assert proxy.address[1] != decoy.getsockname()[1]
            assert echo_through(proxy.address) == b"ping"


# -- sd_listen_fds(3) semantics ---------------------------------------------------------------


CHILD_REPORT = textwrap.dedent("""
    import os, subprocess, sys
    from gproxy import _systemd
    print(_systemd.listen_fds())
    print(sorted(key for key in os.environ if key.startswith("LISTEN_")))
    # a child started the way a hook or a helper would be, keeping every inheritable fd
    child = subprocess.run([sys.executable, "-c", "import os, sys\\n"
                            "print(sorted(k for k in os.environ if k.startswith('LISTEN_')))\\n"
                            "try:\\n    os.fstat(3); print('fd 3 open')\\n"
                            "except OSError:\\n    print('fd 3 closed')"],
                           close_fds=False, capture_output=True, text=True)
    print(child.stdout, end="")
    """)


def test_listen_fds_takes_fds_from_3_unsets_the_variables_and_keeps_the_fds_from_children():
    first, second = tcp_listener(), tcp_listener()
    with first, second:
        options = launch([first, second], ["web", "api"])
        result = subprocess.run([sys.executable, *options["python_args"], "-c", CHILD_REPORT],
                                pass_fds=options["pass_fds"], capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["[(3, 'web'), (4, 'api')]", "[]", "[]", "fd 3 closed"]


@pytest.mark.parametrize("environ, expected", [
    ({}, []),
    ({"LISTEN_PID": "1", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b"}, []),  # another process's
    ({"LISTEN_PID": "{pid}", "LISTEN_FDS": "0"}, []),
    ({"LISTEN_PID": "{pid}", "LISTEN_FDS": "two"}, "LISTEN_FDS: expected a count of fds, got 'two'"),
    ({"LISTEN_PID": "{pid}", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "a:b"}, "LISTEN_FDNAMES: 2 name(s) for 1 fd(s)"),
])
def test_listen_fds_reads_and_always_unsets_the_variables(environ, expected):
    environ = {key: value.format(pid=os.getpid()) for key, value in environ.items()}
    environ["OTHER"] = "kept"
    if isinstance(expected, str):
        with pytest.raises(_systemd.ActivationError, match=re.escape(expected)):
            _systemd.listen_fds(environ)
    else:
        assert _systemd.listen_fds(environ) == expected
    assert environ == {"OTHER": "kept"}
