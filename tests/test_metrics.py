"""/metrics read by Prometheus's own parser after known traffic: exact bytes and connections."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gproxy import metrics
from peers import TIMEOUT, Proxy, Server, connect, echo, free_port, recv_exactly, unanswered_listener
from test_access import refused


def samples(text: str) -> dict:
    """{(sample name, frozenset of labels): value}, through prometheus_client's parser."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(found: dict, name: str, **labels) -> float:
    return found[(name, frozenset(labels.items()))]


def echo_through(address, size: int) -> None:
    with connect(address) as client:
        client.sendall(b"x" * size)
        assert recv_exactly(client, size) == b"x" * size
        client.shutdown(socket.SHUT_WR)
        assert client.recv(1) == b""


def test_render_after_known_traffic(forwarder_factory):
    with Server(echo) as upstream:
        good = forwarder_factory(upstream.address)
        for size in (1, 1000, 300_001):
            echo_through(good.address, size)
        dead = forwarder_factory(("127.0.0.1", free_port()))
        with connect(dead.address) as client:
            assert client.recv(1) == b""
        picky = forwarder_factory(upstream.address, deny=["127.0.0.3"])
        assert refused("127.0.0.3", picky.address)
        for fw, n in ((good, 3), (dead, 1), (picky, 1)):
            forwarder_factory.wait_closed(fw, accepted=n)
        found = samples(metrics.render([good, dead, picky]))

    rule = good.name
    assert rule == f"127.0.0.1:{good.address[1]}"
    assert value(found, "gproxy_connections_total", rule=rule, outcome="eof") == 3
    assert value(found, "gproxy_connections_total", rule=rule, outcome="reset") == 0
    assert value(found, "gproxy_bytes_total", rule=rule, direction="upstream") == 301_002
    assert value(found, "gproxy_bytes_total", rule=rule, direction="downstream") == 301_002
    assert value(found, "gproxy_connections_active", rule=rule) == 0
    target = f"127.0.0.1:{upstream.address[1]}"
    assert value(found, "gproxy_target_up", rule=rule, target=target) == 1
    assert value(found, "gproxy_connect_failures_total", rule=rule, target=target) == 0
    assert value(found, "gproxy_connection_duration_seconds_count", rule=rule) == 3
    assert value(found, "gproxy_connection_duration_seconds_bucket", rule=rule, le="+Inf") == 3
    assert value(found, "gproxy_connection_duration_seconds_sum", rule=rule) > 0
    buckets = sorted((float(dict(k[1])["le"]), v) for k, v in found.items()
                     if k[0] == "gproxy_connection_duration_seconds_bucket" and dict(k[1])["rule"] == rule)
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)   # cumulative

    assert value(found, "gproxy_connections_total", rule=dead.name, outcome="connect_failed") == 1
    dead_target = str(dead.rule.target)
    assert value(found, "gproxy_target_up", rule=dead.name, target=dead_target) == 0
    assert value(found, "gproxy_connect_failures_total", rule=dead.name, target=dead_target) == 1

    assert value(found, "gproxy_connections_total", rule=picky.name, outcome="denied") == 1
    assert value(found, "gproxy_connections_total", rule=picky.name, outcome="eof") == 0


def test_label_values_are_escaped():
    class Fake:
        def __init__(self):
            from gproxy.stats import Counters
            self.counters = Counters()
            self.counters.connected('db "primary"\\1\n', False)

    text = metrics.render([('we"ird\\name\n', Fake())])
    found = samples(text)
    assert value(found, "gproxy_target_up", rule='we"ird\\name\n', target='db "primary"\\1\n') == 0


def test_help_and_type_once_per_family():
    class Fake:
        def __init__(self, name):
            from gproxy.stats import Counters
            self.name, self.counters = name, Counters()

    text = metrics.render([Fake("a"), Fake("b")])
    for family in ("gproxy_connections_total", "gproxy_bytes_total", "gproxy_connection_duration_seconds"):
        assert text.count(f"# TYPE {family} ") == 1
    assert "# TYPE gproxy_connection_duration_seconds histogram" in text


def get(url: str):
    with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
        return response.status, response.headers.get("Content-Type"), response.read().decode()


def test_cli_serves_metrics_and_json_logs():
    with Server(echo) as upstream:
        proxy = Proxy("--metrics", "127.0.0.1:0", "--log-format", "json", f"127.0.0.1:{upstream.address[1]}")
        try:
            metrics_line = json.loads(proxy.seen[0])
            url = metrics_line["message"].split()[-1]
            assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
            for size in (10, 20_000):
                echo_through(proxy.address, size)
            proxy.count_lines('"outcome": "eof"', 2)
            status, content_type, text = get(url)
            assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
            found = samples(text)
            rule = f"127.0.0.1:{proxy.address[1]}"
            assert value(found, "gproxy_connections_total", rule=rule, outcome="eof") == 2
            assert value(found, "gproxy_bytes_total", rule=rule, direction="upstream") == 20_010
            assert value(found, "gproxy_bytes_total", rule=rule, direction="downstream") == 20_010
            with pytest.raises(urllib.error.HTTPError) as missing:
                get(url.replace("/metrics", "/nothing"))
            assert missing.value.code == 404
        finally:
            code, output = proxy.stop()
    assert code == 0
    lines = [json.loads(line) for line in output.splitlines()]   # every line is one JSON object
    for line in lines:
        assert {"time", "level", "message"} <= set(line), line
    closed = [line for line in lines if line.get("outcome") == "eof"]
    assert len(closed) == 2
    for line, size in zip(closed, (10, 20_000)):
        assert line["rule"] == rule and line["target"] == f"127.0.0.1:{upstream.address[1]}"
        assert line["bytes_upstream"] == size and line["bytes_downstream"] == size
        assert line["client"].startswith("127.0.0.1:") and isinstance(line["id"], int)
        assert line["duration"] >= 0 and line["level"] == "INFO"


def test_cli_metrics_port_in_use_is_one_line_exit_1():
    import subprocess
    import sys
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "gproxy", "--metrics", f"127.0.0.1:{port}",
                                 "127.0.0.1:0", "127.0.0.1:9"], capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("gproxy: error: ")
    assert "Traceback" not in result.stderr


def test_cli_metrics_on_a_unix_socket_is_one_line_exit_2():
    """/metrics is served on TCP only: a Unix socket address is bad input (it was a traceback)."""
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-m", "gproxy", "--metrics", "unix:@gproxy-test-metrics",
                             "127.0.0.1:0", "127.0.0.1:9"], capture_output=True, text=True, timeout=TIMEOUT,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 2, result
    said = "gproxy: error: --metrics: expected HOST:PORT, got a Unix socket: 'unix:@gproxy-test-metrics'"
    assert result.stderr.strip().splitlines() == [said], result.stderr


def test_several_targets_are_counted_one_by_one(forwarder_factory):
    with Server(echo) as upstream:
        dead = ("127.0.0.1", free_port())
        fw = forwarder_factory([dead, upstream.address])   # failover: the dead one first
        echo_through(fw.address, 100)
        forwarder_factory.wait_closed(fw, accepted=1)
        found = samples(metrics.render([fw]))
    dead_name, live_name = f"127.0.0.1:{dead[1]}", f"127.0.0.1:{upstream.address[1]}"
    assert value(found, "gproxy_connect_failures_total", rule=fw.name, target=dead_name) == 1
    assert value(found, "gproxy_connect_failures_total", rule=fw.name, target=live_name) == 0
    assert value(found, "gproxy_target_up", rule=fw.name, target=dead_name) == 0   # max_fails 1
    assert value(found, "gproxy_target_up", rule=fw.name, target=live_name) == 1
    assert value(found, "gproxy_connections_total", rule=fw.name, outcome="eof") == 1


def test_config_file_metrics_json_logs_and_rule_keys(tmp_path):
    from test_configfile import RULE_LINE, addr, write

    with Server(echo) as upstream:
        path = write(tmp_path / "gproxy.toml", f"""
            log_format = "json"
            metrics = "127.0.0.1:0"

            [[rule]]
            name = "open"
            listen = "127.0.0.1:0"
            target = "127.0.0.1:{upstream.address[1]}"

            [[rule]]
            name = "picky"
            listen = "127.0.0.1:0"
            target = "127.0.0.1:{upstream.address[1]}"
            deny = ["127.0.0.3"]
            allow = ["127.0.0.0/8"]
            max_connections_per_client = 10
            """)
        with Proxy(argv=["-c", path]) as proxy:
            rules = dict(reversed(RULE_LINE.search(line).groups()) for line in
                         [proxy.seen[-1], proxy.wait_for("listening on ")])
            rules = {name: addr(where) for name, where in rules.items()}
            url = next(json.loads(line)["message"].split()[-1] for line in proxy.seen if "metrics on" in line)
            echo_through(rules["open"], 7)
            echo_through(rules["picky"], 9)
            assert refused("127.0.0.3", rules["picky"])
            proxy.count_lines('"logger": "gproxy.relay"', 3)   # each logged after it was counted
            found = samples(get(url)[2])
            assert value(found, "gproxy_connections_total", rule="open", outcome="eof") == 1
            assert value(found, "gproxy_connections_total", rule="picky", outcome="eof") == 1
            assert value(found, "gproxy_connections_total", rule="picky", outcome="denied") == 1
            assert value(found, "gproxy_bytes_total", rule="open", direction="upstream") == 7
            assert value(found, "gproxy_bytes_total", rule="picky", direction="downstream") == 9
            code, output = proxy.stop()
    assert code == 0
    assert all(isinstance(json.loads(line), dict) for line in output.splitlines())


def test_a_rule_changed_by_reload_keeps_counting_on(tmp_path):
    """SIGHUP with a changed rule gives it a new forwarder; /metrics must not read that as a
    counter reset: the totals carry on, including the old forwarder's draining connection,
    and the target gauge shows the new target only."""
    from peers import Gate
    from test_configfile import RULE_LINE, addr, write

    gate = Gate()
    with Server(gate) as old_target, Server(echo) as new_target:
        path = tmp_path / "gproxy.toml"

        def rule(target, extra=""):
            return f"""
                log_format = "json"
                metrics = "127.0.0.1:0"

                [[rule]]
                name = "r"
                listen = "127.0.0.1:{listen_port}"
                target = "127.0.0.1:{target.address[1]}"
                {extra}
                """
        listen_port = 0
        write(path, rule(old_target))
        with Proxy(argv=["-c", str(path)]) as proxy:
            where = addr(RULE_LINE.search(proxy.seen[-1]).group(1))
            listen_port = where[1]
            url = next(json.loads(line)["message"].split()[-1] for line in proxy.seen if "metrics on" in line)
            relayed = '"logger": "gproxy.relay"'
            for size in (3, 5):  # two ended connections through the old forwarder
                with connect(where) as client:
                    server = gate.get()
                    client.sendall(b"x" * size)
                    assert recv_exactly(server, size) == b"x" * size
                    client.shutdown(socket.SHUT_WR)
                    assert server.recv(1) == b""
                    server.close()
                    assert client.recv(1) == b""
            held = connect(where)  # one open across the reload, drained by the old forwarder
            held_server = gate.get()
            proxy.count_lines(relayed, 2)
            before = samples(get(url)[2])
            assert value(before, "gproxy_connections_total", rule="r", outcome="eof") == 2
            assert value(before, "gproxy_bytes_total", rule="r", direction="upstream") == 8

            write(path, rule(new_target, "idle_timeout = 300"))
            proxy.signal(signal.SIGHUP)
            assert "1 changed" in proxy.wait_for("reloaded "), proxy.seen
            echo_through(where, 7)  # the new forwarder
            held.sendall(b"y" * 11)
            assert recv_exactly(held_server, 11) == b"y" * 11
            held.shutdown(socket.SHUT_WR)
            assert held_server.recv(1) == b""
            held_server.close()
            assert held.recv(1) == b""
            held.close()
            proxy.count_lines(relayed, 2)  # two more: the new one, the drained one
            after = samples(get(url)[2])
            gate.release()
            code, _ = proxy.stop()
    assert code == 0
    assert value(after, "gproxy_connections_total", rule="r", outcome="eof") == 4
    assert value(after, "gproxy_bytes_total", rule="r", direction="upstream") == 8 + 7 + 11
    assert value(after, "gproxy_bytes_total", rule="r", direction="downstream") == 7
    assert value(after, "gproxy_connection_duration_seconds_count", rule="r") == 4
    assert value(after, "gproxy_connections_active", rule="r") == 0
    targets = {dict(labels)["target"] for name, labels in after if name == "gproxy_target_up"}
    assert targets == {f"127.0.0.1:{new_target.address[1]}"}


class _Marked:
    """A rule for the page that notes, when the page reads it, how many round trips the
    ping-pong had made by then."""

    def __init__(self, name: str, trips: list, marks: list):
        from gproxy.stats import Counters
        self.name, self._counters, self._trips, self._marks = name, Counters(), trips, marks

    @property
    def counters(self):
        self._marks.append(self._trips[0])
        return self._counters


@pytest.mark.timeout(60)
@pytest.mark.parametrize("server", ["metrics", "api"])
def test_a_scrape_lets_the_loop_run_while_it_renders(server, monkeypatch):
    """A ping-pong on the same hub goes on while one scrape of 1,000 rules is made: between
    the page reading its first rule and its last, the loop made passes (a round trip over a
    socketpair takes two; 1,000 rules are 62 slices). Before, the page was made in one go:
    no round trip at all. (The process's own figures, CPU time first, change between two
    pages: they are held still, so that the two pages compared can be the same.)"""
    monkeypatch.setattr(metrics, "_process_text", lambda: "# TYPE process_open_fds gauge\nprocess_open_fds 7\n")
    import gevent
    import gevent.socket

    from gproxy.stats import Counters

    class Rule:
        def __init__(self, name):
            self.name, self.counters = name, Counters()

    trips, marks = [0], []
    rules = [_Marked("first", trips, marks)] + [Rule(f"rule-{i}") for i in range(1000)] \
        + [_Marked("last", trips, marks)]
    ping, pong = gevent.socket.socketpair()

    def echo():
        while data := pong.recv(1):
            pong.sendall(data)

    def pinger():
        while True:
            ping.sendall(b"x")
            assert ping.recv(1) == b"x"
            trips[0] += 1

    if server == "metrics":
        http = metrics.serve("127.0.0.1:0", lambda: rules)
        stop, address = (lambda: http.stop(timeout=1)), http.address
    else:
        from gproxy._api import Api
        from gproxy.service import Service
        api = Api(Service(), "127.0.0.1:0")
        api.mount("GET", "/metrics", metrics.route(lambda: rules))
        api.start()
        stop, address = api.stop, api.address
    greenlets = [gevent.spawn(echo), gevent.spawn(pinger)]
    try:
        with gevent.Timeout(TIMEOUT), gevent.socket.create_connection(address) as client:
            client.sendall(b"GET /metrics HTTP/1.0\r\nUser-Agent: t\r\n\r\n")
            reply = b""
            while chunk := client.recv(1 << 20):
                reply += chunk
    finally:
        gevent.killall(greenlets)
        ping.close()
        pong.close()
        stop()
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert body.decode() == metrics.render(rules)  # the same page, made in slices
    assert len(marks) == 4  # each marked rule read once per page
    assert marks[1] - marks[0] >= 5, marks  # the loop ran while the page was made (some 30 times)


# -- per target, the build and the process (issue 18 part 4) ---------------------------------------

_IMPORTED = time.time()  # this process started before this


def target_series(found: dict, name: str, rule: str, target: str) -> dict:
    """{the one other label's value: sample} of a per-target family for one target."""
    series = {}
    for (sample, labels), number in found.items():
        labels = dict(labels)
        if sample == name and labels.pop("rule") == rule and labels.pop("target") == target:
            series[next(iter(labels.values()), None)] = number
    return series


def test_per_target_connections_bytes_failures_weight_and_state(forwarder_factory):
    with Server(echo) as upstream, unanswered_listener() as silent:
        live, dead = f"127.0.0.1:{upstream.address[1]}", f"127.0.0.1:{free_port()}"
        several = forwarder_factory([dead, live])  # failover: the dead one first, once
        for size in (1, 1000, 300_001):
            echo_through(several.address, size)
        held = connect(several.address)
        held.sendall(b"h")
        assert recv_exactly(held, 1) == b"h"
        plain = forwarder_factory(upstream.address)  # one target: the connect on the hub
        echo_through(plain.address, 5)
        hung = forwarder_factory(silent, connect_timeout=0.2)
        with connect(hung.address) as client:
            assert client.recv(1) == b""
        forwarder_factory.wait_closed(plain, accepted=1)
        forwarder_factory.wait_closed(hung, accepted=1)
        several.set_target(live, weight=4)
        several.set_target(dead, state="drain")
        found = samples(metrics.render([several, plain, hung]))
        held.shutdown(socket.SHUT_WR)
        assert held.recv(1) == b""
        held.close()
        forwarder_factory.wait_closed(several, accepted=4)
        after = samples(metrics.render([several]))

    rule = several.name
    connections = target_series(found, "gproxy_target_connections_total", rule, live)
    assert connections == {"eof": 3, "reset": 0, "idle_timeout": 0, "shutdown": 0, "closed": 0, "error": 0}
    assert target_series(found, "gproxy_target_connections_total", rule, dead) == dict.fromkeys(connections, 0)
    assert target_series(found, "gproxy_target_active_connections", rule, live) == {None: 1}
    # the held connection's byte each way is counted while it is open (bytes count as they move)
    assert target_series(found, "gproxy_target_bytes_total", rule, live) == {"upstream": 301_003,
                                                                             "downstream": 301_003}
    assert target_series(found, "gproxy_target_connect_failures_total", rule, dead) == {
        "refused": 1, "timeout": 0, "unreachable": 0, "resolve": 0, "other": 0}
    assert sum(target_series(found, "gproxy_target_connect_failures_total", rule, live).values()) == 0
    assert target_series(found, "gproxy_target_weight", rule, live) == {None: 4}
    assert target_series(found, "gproxy_target_state", rule, dead) == {"enabled": 0, "drain": 1, "disabled": 0}
    assert target_series(found, "gproxy_target_state", rule, live) == {"enabled": 1, "drain": 0, "disabled": 0}
    assert not any(name == "gproxy_target_check_duration_seconds" for name, _ in found)  # no check
    assert target_series(after, "gproxy_target_connections_total", rule, live)["eof"] == 4
    assert target_series(after, "gproxy_target_active_connections", rule, live) == {None: 0}
    assert target_series(after, "gproxy_target_bytes_total", rule, live) == {"upstream": 301_003,
                                                                             "downstream": 301_003}

    assert target_series(found, "gproxy_target_connections_total", plain.name, live)["eof"] == 1
    assert target_series(found, "gproxy_target_bytes_total", plain.name, live)["upstream"] == 5
    silent_name = "127.0.0.1:%d" % silent[1]
    assert target_series(found, "gproxy_target_connect_failures_total", hung.name, silent_name)["timeout"] == 1
    assert target_series(found, "gproxy_target_active_connections", hung.name, silent_name) == {None: 0}


def test_the_last_checks_duration_per_target(forwarder_factory):
    with Server(echo) as upstream:
        fw = forwarder_factory(upstream.address, check="tcp", check_interval=0.05, check_timeout=2)
        target = "127.0.0.1:%d" % upstream.address[1]
        deadline = time.monotonic() + TIMEOUT
        while not fw.targets()[0].check:
            assert time.monotonic() < deadline, "never checked"
            time.sleep(0.01)  # sleep-ok: polling the first check
        found = samples(metrics.render([fw]))
    duration = target_series(found, "gproxy_target_check_duration_seconds", fw.name, target)[None]
    assert 0 < duration < 2


def test_build_info_and_the_process_read_from_proc():
    import os
    import platform
    import resource

    import gevent

    import gproxy
    before = sum(os.times()[:2])
    text = metrics.render([])
    after = sum(os.times()[:2])
    found = samples(text)
    assert value(found, "gproxy_build_info", version=gproxy.__version__, python=platform.python_version(),
                 gevent=gevent.__version__) == 1
    assert before - 0.01 <= value(found, "process_cpu_seconds_total") <= after + 0.01
    assert _IMPORTED - 7 * 86400 < value(found, "process_start_time_seconds") < _IMPORTED
    assert 1 << 20 < value(found, "process_resident_memory_bytes") <= value(found, "process_virtual_memory_bytes")
    assert value(found, "process_max_fds") == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert abs(value(found, "process_open_fds") - len(os.listdir("/proc/self/fd"))) <= 5
    without = metrics.render([], process=False)
    assert "gproxy_build_info{" in without and "process_" not in without


def test_promtool_accepts_the_page(tmp_path):
    """The page of a gproxy with every kind of target (several, weighted, a backup, a Unix socket,
    IPv6, checked, drained over the API, a name that needs escaping) passes ``promtool check
    metrics``, Prometheus's own linter."""
    from test_api import ApiProcess
    from test_real_clients import need
    from test_target_control import call
    promtool = need("promtool")
    with Server(echo) as upstream:
        live = f"127.0.0.1:{upstream.address[1]}"
        path = tmp_path / "gproxy.toml"
        path.write_text(
            f'[[rule]]\nname = "weird \\"name\\" \\\\ here"\nlisten = "127.0.0.1:0"\ntarget = "{live}"\n'
            f'[[rule]]\nname = "r"\nlisten = "127.0.0.1:0"\nbalance = "round-robin"\n'
            f'targets = ["{live}", {{address = "[::1]:{free_port()}", weight = 3}}, '
            f'{{address = "unix:/run/gproxy-test/x.sock", backup = true}}]\n'
            f'check = "tcp"\ncheck_interval = 0.05\ncheck_timeout = 2\n')
        api = ApiProcess("-c", str(path))
        try:
            status, proxies = call(api, "GET", "/proxies")
            assert status == 200 and set(proxies) == {'weird "name" \\ here', "r"}, proxies
            for proxy in proxies.values():
                host, _, port = proxy["listen"].rpartition(":")
                echo_through((host, int(port)), 100)
            assert call(api, "POST", f"/proxies/r/targets/{live}", {"state": "drain"})[0] == 200
            api.wait_for("is down after its tcp check failed")  # a check has ended
            _, _, page = get(api.url + "/metrics")
        finally:
            code, log = api.stop()
        assert code == 0, log
    assert 'gproxy_target_state{rule="r",target="%s",state="drain"} 1' % live in page
    assert "gproxy_target_check_duration_seconds{" in page and "process_open_fds " in page
    result = subprocess.run([promtool, "check", "metrics"], input=page, capture_output=True, text=True,
                            timeout=TIMEOUT)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", ""), result


@pytest.mark.parametrize("path", ["plain", "routed"])
def test_bytes_show_while_the_connection_is_open_and_stay_when_it_ends(forwarder_factory, path):
    """A long-lived connection's bytes are on the page as they move, not all at its end, and
    the totals never go back when it ends (its bytes move from the open ones to the totals)."""
    with Server(echo) as upstream:
        target = f"127.0.0.1:{upstream.address[1]}"
        fw = forwarder_factory(upstream.address if path == "plain" else [target, f"127.0.0.1:{free_port()}"])
        rule = fw.name
        echo_through(fw.address, 10)  # one ended connection
        forwarder_factory.wait_closed(fw, accepted=1)
        pages = []
        with connect(fw.address) as client:
            for size in (1000, 300_000):
                client.sendall(b"y" * size)
                assert recv_exactly(client, size) == b"y" * size
                pages.append(samples(metrics.render([fw])))
            client.shutdown(socket.SHUT_WR)
            assert client.recv(1) == b""
        forwarder_factory.wait_closed(fw, accepted=2)
        pages.append(samples(metrics.render([fw])))

    for found, total in zip(pages, (10 + 1000, 10 + 301_000, 10 + 301_000)):
        for direction in ("upstream", "downstream"):
            assert value(found, "gproxy_bytes_total", rule=rule, direction=direction) == total
            assert value(found, "gproxy_target_bytes_total", rule=rule, target=target,
                         direction=direction) == total
    assert value(pages[1], "gproxy_connections_active", rule=rule) == 1
    assert value(pages[2], "gproxy_connections_active", rule=rule) == 0


def test_bytes_of_a_reloads_draining_connection_count_as_they_move():
    """A rule replaced under its name (count_on) shows the old forwarder's open connections'
    bytes too, once: they count into the same totals."""
    from gproxy import Forwarder
    with Server(echo) as upstream:
        old = Forwarder("127.0.0.1:0", upstream.address, name="r").start()
        new = Forwarder("127.0.0.1:0", upstream.address, name="r", idle_timeout=300)
        try:
            held = connect(old.address)
            held.sendall(b"z" * 5)
            assert recv_exactly(held, 5) == b"z" * 5
            new.count_on(old)
            new.start()
            echo_through(new.address, 7)  # (counted whether its teardown has run or not)
            found = samples(metrics.render([("r", new)]))
            held.sendall(b"z" * 3)
            assert recv_exactly(held, 3) == b"z" * 3
            later = samples(metrics.render([("r", new)]))
            held.close()
        finally:
            new.stop()
            old.stop()
    assert value(found, "gproxy_bytes_total", rule="r", direction="upstream") == 5 + 7
    assert value(later, "gproxy_bytes_total", rule="r", direction="upstream") == 5 + 7 + 3
    assert value(later, "gproxy_bytes_total", rule="r", direction="downstream") == 5 + 7 + 3
