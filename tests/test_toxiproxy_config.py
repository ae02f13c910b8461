"""toxiproxy-server's own ``-config FILE`` (a JSON array of proxies) accepted by ``gproxy --api
HOST:PORT --toxiproxy-config FILE`` (issue 20, item 10): the proxies are there at start, as if
POSTed to ``/populate``, before the API answers anyone; a bad file is one line naming the file
and the entry, exit 2. Run as users run it, driven the way toxiproxy's clients drive it (urllib
and JSON, toxiproxy-python's calls)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from peers import TIMEOUT, Server, connect, echo, free_port, read_until_closed, recv_exactly
from test_api import ApiProcess, address_of

pytestmark = pytest.mark.timeout(60)


def write_json(tmp_path, entries, name: str = "toxiproxy.json") -> str:
    path = tmp_path / name
    path.write_text(entries if isinstance(entries, str) else json.dumps(entries, indent=2))
    return str(path)


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gproxy", *argv], capture_output=True, text=True,
                          timeout=TIMEOUT, stdin=subprocess.DEVNULL)


def test_the_files_proxies_are_there_at_start_and_the_api_drives_them(tmp_path):
    with Server(echo) as target:
        ports = free_port(), free_port()
        path = write_json(tmp_path, [   # toxiproxy's README example, with our ports
            {"name": "web_dev_frontend_1", "listen": f"127.0.0.1:{ports[0]}",
             "upstream": "127.0.0.1:%d" % target.address[1], "enabled": True},
            {"name": "web_dev_mysql_1", "listen": f"127.0.0.1:{ports[1]}",
             "upstream": "127.0.0.1:%d" % target.address[1], "enabled": False},
        ])
        with ApiProcess("--toxiproxy-config", path) as server:
            assert any(f"2 proxies from {path}" in line for line in server.seen), server.seen
            status, proxies = server.call("GET", "/proxies")
            assert status == 200
            assert {name: (p["listen"], p["enabled"], p["toxics"]) for name, p in proxies.items()} == {
                "web_dev_frontend_1": (f"127.0.0.1:{ports[0]}", True, []),
                "web_dev_mysql_1": (f"127.0.0.1:{ports[1]}", False, []),
            }
            with connect(("127.0.0.1", ports[0])) as client:
                client.sendall(b"ping")
                assert recv_exactly(client, 4) == b"ping"
            with pytest.raises(ConnectionRefusedError):   # disabled: nothing listens
                socket.create_connection(("127.0.0.1", ports[1]), timeout=TIMEOUT).close()
            # toxiproxy-python's calls: a toxic on a populated proxy, and the proxy enabled
            status, toxic = server.call("POST", "/proxies/web_dev_frontend_1/toxics",
                                        {"type": "limit_data", "attributes": {"bytes": 2}})
            assert status == 200 and toxic["name"] == "limit_data_downstream"
            with connect(("127.0.0.1", ports[0])) as client:
                client.sendall(b"ping")
                assert read_until_closed(client) == b"pi"
            assert server.call("POST", "/proxies/web_dev_mysql_1", {"enabled": True})[0] == 200
            with connect(("127.0.0.1", ports[1])) as client:
                client.sendall(b"pong")
                assert recv_exactly(client, 4) == b"pong"
            # populating the same file's list again changes nothing: the proxies are the same
            with open(path) as f:
                status, answer = server.call("POST", "/populate", json.load(f))
            assert status == 201 and [p["name"] for p in answer["proxies"]] == \
                ["web_dev_frontend_1", "web_dev_mysql_1"]
            toxics = server.call("GET", "/proxies/web_dev_frontend_1/toxics")[1]
            assert [toxic["name"] for toxic in toxics] == ["limit_data_downstream"]


def test_port_0_and_no_listen_are_reported_with_the_real_port_and_toxics_are_ignored(tmp_path):
    path = write_json(tmp_path, [
        {"name": "a", "upstream": "127.0.0.1:1"},
        {"name": "b", "listen": "127.0.0.1:0", "upstream": "127.0.0.1:1",
         "toxics": [{"type": "latency", "attributes": {"latency": 100}}]},
    ])
    with ApiProcess("--toxiproxy-config", path) as server:
        warning = next(line for line in server.seen if "toxics" in line and "WARNING" in line)
        assert warning.endswith(f'{path}: proxy 2 ("b"): toxics: ignored, as toxiproxy-server ignores them; '
                                "give toxics through the API, or in a config file's [[rule.toxic]]")
        proxies = server.call("GET", "/proxies")[1]
        for name in ("a", "b"):
            host, port = address_of(proxies[name]["listen"])
            assert host == "127.0.0.1" and port != 0 and proxies[name]["toxics"] == []


def test_with_a_command_line_rule_and_its_options(tmp_path):
    with Server(echo) as target:
        path = write_json(tmp_path, [{"name": "pg", "listen": "127.0.0.1:0",
                                      "upstream": "127.0.0.1:%d" % target.address[1]}])
        with ApiProcess("--idle-timeout", "30", "--toxiproxy-config", path, "127.0.0.1:0",
                        "127.0.0.1:%d" % target.address[1]) as server:
            assert sorted(server.call("GET", "/proxies")[1]) == ["default", "pg"]


@pytest.mark.parametrize("content, says", [
    ("[{", "not JSON: Expecting property name enclosed in double quotes: line 1 column 3 (char 2)"),
    ({"name": "a"}, "expected an array of proxies, got an object"),
    (["a"], "expected an object for proxy 1, got a string"),
    ([{"name": "a", "upstream": "127.0.0.1:1"}, {"name": "b"}], "missing required field: upstream at proxy 2"),
    ([{"upstream": "127.0.0.1:1"}], "missing required field: name at proxy 1"),
    ([{"name": "a", "upstream": "127.0.0.1:1", "enabled": "yes"}],
     "enabled: expected a boolean, got a string at proxy 1"),
    ([{"name": "a", "upstream": "127.0.0.1:1", "listen": "127.0.0.1:99999"}],
     'proxy 1 ("a"): listen: port must be from 0 to 65535, got 99999'),
    ([{"name": "a", "upstream": "127.0.0.1:1"}, {"name": "a", "upstream": "127.0.0.1:2"}],
     "proxy 2 (\"a\"): name: 'a' appears twice"),
    ([{"name": "a/b", "upstream": "127.0.0.1:1"}], "proxy 1 (\"a/b\"): name: may not contain '/'"),
])
def test_a_bad_file_is_one_line_naming_the_file_and_the_entry_exit_2(tmp_path, content, says):
    path = write_json(tmp_path, content)
    result = run("--api", "127.0.0.1:0", "--toxiproxy-config", path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"gproxy: error: {path}: {says}"), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr


def test_a_missing_file_a_name_clash_and_no_api_are_exit_2(tmp_path):
    missing = str(tmp_path / "nope.json")
    result = run("--api", "127.0.0.1:0", "--toxiproxy-config", missing)
    assert (result.returncode, result.stderr) == (2, f"gproxy: error: {missing}: cannot read it: "
                                                      "no such file or directory\n")
    path = write_json(tmp_path, [{"name": "default", "upstream": "127.0.0.1:1"}])
    result = run("--api", "127.0.0.1:0", "--toxiproxy-config", path, "127.0.0.1:0", "127.0.0.1:2")
    assert (result.returncode, result.stderr) == (2, f'gproxy: error: {path}: proxy 1 ("default"): name: '
                                                      "the command line's rule has it (--name)\n")
    result = run("--toxiproxy-config", path, "127.0.0.1:0", "127.0.0.1:2")
    assert (result.returncode, result.stderr) == (2, "gproxy: error: --toxiproxy-config: needs --api\n")


def test_a_port_in_use_is_exit_1_naming_the_file_and_the_proxy(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        path = write_json(tmp_path, [{"name": "busy", "listen": f"127.0.0.1:{port}", "upstream": "127.0.0.1:1"}])
        result = run("--api", "127.0.0.1:0", "--toxiproxy-config", path)
    assert result.returncode == 1
    assert result.stderr.endswith(f'gproxy: error: {path}: proxy "busy": cannot listen on 127.0.0.1:{port}: '
                                  "address already in use\n"), result.stderr


def test_toxiproxy_pythons_client_finds_and_drives_the_files_proxies(tmp_path):
    from toxiproxy import Toxiproxy

    with Server(echo) as target:
        port = free_port()
        path = write_json(tmp_path, [{"name": "redis", "listen": f"127.0.0.1:{port}",
                                      "upstream": "127.0.0.1:%d" % target.address[1], "enabled": False}])
        with ApiProcess("--toxiproxy-config", path) as server:
            client = Toxiproxy()
            client.update_api_consumer(*server.api)
            assert set(client.proxies()) == {"redis"}
            proxy = client.get_proxy("redis")
            assert proxy.enabled is False and proxy.listen == f"127.0.0.1:{port}"
            proxy.enable()
            proxy.add_toxic(type="limit_data", attributes={"bytes": 3})
            with connect(("127.0.0.1", port)) as sock:
                sock.sendall(b"hello")
                assert read_until_closed(sock) == b"hel"
            assert client.reset() is True and proxy.toxics() == {}


def test_beside_a_toml_config_its_rules_and_the_files_proxies_are_the_apis(tmp_path):
    toml = tmp_path / "gproxy.toml"
    toml.write_text('[[rule]]\nname = "db"\nlisten = "127.0.0.1:0"\ntarget = "127.0.0.1:1"\n'
                    '[[rule.toxic]]\ntype = "latency"\nlatency = 5\n')
    clash = write_json(tmp_path, [{"name": "db", "upstream": "127.0.0.1:2"}], "clash.json")
    result = run("--api", "127.0.0.1:0", "-c", str(toml), "--toxiproxy-config", clash)
    assert (result.returncode, result.stderr) == (2, f'gproxy: error: {clash}: proxy 1 ("db"): name: '
                                                      f"a rule of {toml} has it\n")
    path = write_json(tmp_path, [{"name": "cache", "upstream": "127.0.0.1:2"}])
    with ApiProcess("-c", str(toml), "--toxiproxy-config", path) as server:
        proxies = server.call("GET", "/proxies")[1]
        assert sorted(proxies) == ["cache", "db"]
        assert [t["name"] for t in proxies["db"]["toxics"]] == ["latency_downstream"]
