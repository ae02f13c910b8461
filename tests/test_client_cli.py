"""``gproxy-cli`` (``python -m gproxy.client``), toxiproxy-cli's verbs, flags and output, run in
a subprocess the way scripts run it, against ``gproxy --api`` in another. The expected lines
are toxiproxy-cli's output in a pipe (cmd/cli/cli.go: no colours, no hints, tab-separated)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from peers import TIMEOUT, Server, echo, free_port
from test_api import exchange, serving

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def server():
    yield from serving()


@pytest.fixture(scope="module")
def upstream():
    with Server(echo) as server:
        yield server


class Cli:
    def __init__(self, server):
        self.server = server

    def __call__(self, *args: str, env=None, host: bool = True):
        """(exit status, stdout, stderr) of ``gproxy-cli [--host URL] args...``."""
        argv = [sys.executable, "-m", "gproxy.client", *(("--host", self.server.url) if host else ()), *args]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
                                stdin=subprocess.DEVNULL)
        return result.returncode, result.stdout, result.stderr

    def ok(self, *args: str) -> str:
        code, out, err = self(*args)
        assert (code, err) == (0, ""), (args, code, err)
        return out


@pytest.fixture
def cli(server):
    cli = Cli(server)
    yield cli
    assert server.process.poll() is None, server.seen
    status, proxies = server.call("GET", "/proxies")
    for name in proxies:
        assert server.call("DELETE", f"/proxies/{name}")[0] == 204


def listen_of(server, name: str):
    host, _, port = server.call("GET", f"/proxies/{name}")[1]["listen"].rpartition(":")
    return host, int(port)


def test_a_toxiproxy_cli_session(cli, server, upstream):
    target = "%s:%d" % upstream.address
    port = free_port()
    assert cli.ok("list") == ""
    assert cli.ok("create", "-l", f"127.0.0.1:{port}", "-u", target, "redis") == "Created new proxy redis\n"
    assert exchange(("127.0.0.1", port)) == b"ping"
    assert cli.ok("list") == f"redis\t127.0.0.1:{port}\t{target}\tenabled\t0\n"
    assert cli.ok("toxic", "add", "-t", "latency", "-a", "latency=100", "-a", "jitter=10", "--tox", "0.5", "-u",
                  "redis") == "Added upstream latency toxic 'latency_upstream' on proxy 'redis'\n"
    assert cli.ok("toxic", "add", "--type", "bandwidth", "--toxicName", "slow", "--attribute", "rate=1000000",
                  "-d", "redis") == "Added downstream bandwidth toxic 'slow' on proxy 'redis'\n"
    assert cli.ok("inspect", "redis") == (
        "latency_upstream\ttype=latency\tstream=upstream\ttoxicity=0.50\tattributes=[\tjitter=10\tlatency=100\t]\n"
        "slow\ttype=bandwidth\tstream=downstream\ttoxicity=1.00\tattributes=[\trate=1e+06\t]\n")
    assert cli.ok("list") == f"redis\t127.0.0.1:{port}\t{target}\tenabled\t2\n"
    assert cli.ok("toxic", "update", "-n", "latency_upstream", "-a", "jitter=5", "redis") == \
        "Updated toxic 'latency_upstream' on proxy 'redis'\n"
    toxic = server.call("GET", "/proxies/redis/toxics/latency_upstream")[1]
    assert toxic["attributes"] == {"latency": 100, "jitter": 5}
    assert toxic["toxicity"] == 0.5  # kept: toxiproxy-cli would set it back to 1 (see docs/api.md)
    assert cli.ok("toxic", "update", "-n", "latency_upstream", "--tox", "1", "redis") == \
        "Updated toxic 'latency_upstream' on proxy 'redis'\n"
    assert cli.ok("toxic", "remove", "-n", "slow", "redis") == "Removed toxic 'slow' on proxy 'redis'\n"
    assert cli.ok("toggle", "redis") == "Proxy redis is now disabled\n"
    assert server.call("GET", "/proxies/redis")[1]["enabled"] is False
    assert cli.ok("toggle", "redis") == "Proxy redis is now enabled\n"
    assert exchange(("127.0.0.1", port)) == b"ping"
    assert cli.ok("delete", "redis") == "Deleted proxy redis\n"
    assert server.call("GET", "/proxies") == (200, {})


def test_aliases_and_gos_single_dash_long_flags(cli, server, upstream):
    target = "%s:%d" % upstream.address
    assert cli.ok("c", "-listen", "127.0.0.1:0", "-upstream", target, "p") == "Created new proxy p\n"
    assert cli.ok("t", "a", "-type", "latency", "-toxicName", "l", "-tox", "0.25", "-attribute", "latency=7",
                  "p") == "Added downstream latency toxic 'l' on proxy 'p'\n"
    assert cli.ok("ins", "p") == \
        "l\ttype=latency\tstream=downstream\ttoxicity=0.25\tattributes=[\tjitter=0\tlatency=7\t]\n"
    assert cli.ok("t", "u", "-n", "l", "-a", "latency=8", "p") == "Updated toxic 'l' on proxy 'p'\n"
    assert cli.ok("t", "d", "-n", "l", "p") == "Removed toxic 'l' on proxy 'p'\n"
    assert cli.ok("tog", "p") == "Proxy p is now disabled\n"
    assert cli.ok("ls").endswith("\tdisabled\t0\n")
    assert cli.ok("d", "p") == "Deleted proxy p\n"


def test_the_host_comes_from_toxiproxy_url(cli, server):
    code, out, err = cli("list", host=False, env={"TOXIPROXY_URL": server.url})
    assert (code, out, err) == (0, "", "")
    code, out, err = cli("list", host=False, env={"TOXIPROXY_URL": f"http://127.0.0.1:{free_port()}"})
    assert code == 1 and out == "" and err.startswith("Failed to retrieve proxies: GET http://127.0.0.1:")
    assert err.endswith(": connection refused\n") and err.count("\n") == 1


def test_gproxy_attributes_true_and_false_are_booleans(cli, server, upstream):
    cli.ok("create", "-l", "127.0.0.1:0", "-u", "%s:%d" % upstream.address, "p")
    assert cli.ok("toxic", "add", "-t", "trigger", "-a", "match=QUIT", "-a", "action=close", "-a", "once=false",
                  "p") == "Added downstream trigger toxic 'trigger_downstream' on proxy 'p'\n"
    attributes = server.call("GET", "/proxies/p/toxics/trigger_downstream")[1]["attributes"]
    assert (attributes["match"], attributes["action"], attributes["once"]) == ("QUIT", "close", False)


def test_reset_and_connections_are_gproxy_clis_own(cli, server, upstream):
    cli.ok("create", "-l", "127.0.0.1:0", "-u", "%s:%d" % upstream.address, "p")
    cli.ok("toxic", "add", "-t", "latency", "p")
    cli.ok("toggle", "p")
    assert cli.ok("reset") == "Reset every proxy\n"
    assert server.call("GET", "/proxies/p")[1]["enabled"] is True
    assert server.call("GET", "/proxies/p/toxics") == (200, [])
    assert cli.ok("connections", "p") == "mark=1\n"
    assert cli.ok("connections", "--reset", "p") == "Reset 0 connection(s) of proxy p\n"
    assert exchange(listen_of(server, "p")) == b"ping"


@pytest.mark.parametrize("args, message", [
    (("create", "-u", "127.0.0.1:1", "p"), "gproxy-cli create: --listen (-l) is required"),
    (("create", "-l", "127.0.0.1:0", "p"), "gproxy-cli create: --upstream (-u) is required"),
    (("create", "-l", "127.0.0.1:0", "-u", "127.0.0.1:1"), "gproxy-cli create: the proxy's name is required"),
    (("inspect",), "gproxy-cli inspect: the proxy's name is required as the first argument"),
    (("toxic", "add", "-n", "x", "p"), "gproxy-cli toxic add: --type (-t) is required"),
    (("toxic", "add", "-t", "latency", "-u", "-d", "p"), "only one should be specified"),
    (("toxic", "add", "-t", "latency", "--tox", "1.5", "p"), "--toxicity should be a float between 0 and 1"),
    (("toxic", "add", "-t", "latency", "--tox", "lots", "p"), "--toxicity should be a float between 0 and 1"),
    (("toxic", "add", "-t", "latency", "-a", "latency", "p"), "--attribute 'latency': expected KEY=VALUE"),
    (("toxic", "update", "-a", "latency=1", "p"), "gproxy-cli toxic update: --toxicName (-n) is required"),
    (("toxic", "remove", "p"), "gproxy-cli toxic remove: --toxicName (-n) is required"),
    (("toxic", "add", "-t", "latency", "--bogus", "p"), "unrecognized arguments: --bogus"),
    (("explode",), "invalid choice: 'explode'"),
    (("connections", "--reset", "--close", "p"), "--reset or --close, not both"),
])
def test_bad_usage_is_one_line_and_exit_2_without_calling_the_server(cli, server, args, message):
    code, out, err = cli(*args)
    assert code == 2 and out == "", (code, out, err)
    assert message in err and err.count("\n") == 1 and err.startswith("gproxy-cli"), err
    assert server.call("GET", "/proxies") == (200, {})


@pytest.mark.parametrize("args, line", [
    (("inspect", "nope"), "Failed to retrieve proxy nope: HTTP 404: proxy not found"),
    (("toggle", "nope"), "Failed to retrieve proxy nope: HTTP 404: proxy not found"),
    (("delete", "nope"), "Failed to delete proxy: HTTP 404: proxy not found"),
    (("toxic", "add", "-t", "latency", "nope"), "Failed to add toxic: HTTP 404: proxy not found"),
    (("toxic", "add", "-t", "latencyy", "p"), "Failed to add toxic: HTTP 400: invalid toxic type"),
    (("toxic", "update", "-n", "nope", "-a", "latency=1", "p"),
     "Failed to update toxic: HTTP 404: toxic not found"),
    (("toxic", "remove", "-n", "nope", "p"), "Failed to remove toxic: HTTP 404: toxic not found"),
    (("create", "-l", "127.0.0.1:0", "-u", "127.0.0.1:1", "p"),
     "Failed to create proxy: HTTP 409: proxy already exists"),
    (("create", "-l", "nowhere", "-u", "127.0.0.1:1", "q"), "Failed to create proxy: HTTP 400: listen: "),
])
def test_a_server_error_is_one_line_and_exit_1(cli, server, upstream, args, line):
    cli.ok("create", "-l", "127.0.0.1:0", "-u", "%s:%d" % upstream.address, "p")
    code, out, err = cli(*args)
    assert code == 1 and out == "", (code, out, err)
    assert err.startswith(line) and err.count("\n") == 1, err


def test_help_and_version_exit_0(cli):
    code, out, err = cli(host=False)
    assert code == 0 and "toxic" in out and "--host" in out and err == ""
    code, out, err = cli("--help", host=False)
    assert code == 0 and "usage: gproxy-cli" in out
    code, out, err = cli("toxic", host=False)
    assert code == 0 and "add" in out and "remove" in out
    code, out, err = cli("--version", host=False)
    assert (code, err) == (0, "") and out.startswith("gproxy-cli version ")


def test_the_console_script_is_declared():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'gproxy-cli = "gproxy.client:main"' in text


def test_on_a_terminal_it_prints_toxiproxy_clis_table_colours_and_hints(server, upstream):
    import pty
    cli = Cli(server)
    cli.ok("create", "-l", "127.0.0.1:0", "-u", "%s:%d" % upstream.address, "redis")
    cli.ok("toxic", "add", "-t", "latency", "-a", "latency=5", "redis")
    try:
        def on_a_terminal(*args: str) -> str:
            parent, child = pty.openpty()
            with os.fdopen(parent, "rb", buffering=0) as terminal:
                process = subprocess.Popen([sys.executable, "-m", "gproxy.client", "--host", server.url, *args],
                                           stdout=child, stderr=subprocess.PIPE, cwd=ROOT,
                                           env={**os.environ, "PYTHONPATH": str(ROOT)})
                os.close(child)
                output = b""
                try:
                    while chunk := terminal.read(4096):
                        output += chunk
                except OSError:  # EIO: the child's end closed
                    pass
                assert process.wait(TIMEOUT) == 0, process.stderr.read()
                process.stderr.close()
            return output.decode()
        table = on_a_terminal("list")
        assert "\x1b[32mName" in table and "=" * 86 in table and "redis" in table
        assert "Hint: inspect toxics with `gproxy-cli inspect <proxyName>`" in table
        shown = on_a_terminal("inspect", "redis")
        assert "Upstream toxics:" in shown and "Proxy has no Upstream toxics enabled." in shown
        assert "Downstream toxics:" in shown and "latency_downstream:" in shown and "latency=5" in shown
    finally:
        server.call("DELETE", "/proxies/redis")
