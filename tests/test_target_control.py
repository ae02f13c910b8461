"""Runtime control of one target (issue 18 part 3): drain, disable, enable and weight, through the
Python API (``Forwarder.targets()``/``set_target()``, in-process) and gproxy's own HTTP routes
(``gproxy --api -c FILE`` in a subprocess, driven with http.client), and the state kept across a
reload. Real sockets; each target says who it is with one byte, so a test sees where clients went."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import time
import urllib.parse

import pytest

import gproxy
from gproxy import ConfigError, TargetNotFound, TargetState
from peers import TIMEOUT, Server, connect, echo, free_port, recv_all, recv_exactly
from test_api import ApiProcess
from test_health import FAST, Changes, reached, tagged

pytestmark = pytest.mark.timeout(60)


def name_of(server: Server) -> str:
    return "%s:%d" % server.address


def held_open(address):
    """A client connected through ``address`` (its target's tag read): a connection left open."""
    client = connect(address)
    return client, recv_exactly(client, 1)


def until(predicate, what: str):
    """Poll ``predicate()`` (state another thread moves) until it gives something true."""
    deadline = time.monotonic() + TIMEOUT
    while not (result := predicate()):
        assert time.monotonic() < deadline, what
        time.sleep(0.01)  # sleep-ok: polling a state another thread moves
    return result


def still_relays(client: socket.socket) -> None:
    """An open connection goes on: bytes both ways, then a clean end."""
    client.sendall(b"after")
    assert recv_exactly(client, 5) == b"after"
    client.shutdown(socket.SHUT_WR)
    assert recv_all(client) == b""
    client.close()


# -- the Python API ------------------------------------------------------------------------------

def test_targets_lists_state_weight_health_connections_and_checks(forwarder_factory):
    dead = f"127.0.0.1:{free_port()}"
    with Server(tagged(b"A")) as a, Server(tagged(b"B")) as b, Changes() as changes:
        fw = forwarder_factory([name_of(a), {"address": name_of(b), "weight": 3},
                                {"address": dead, "backup": True}], balance="round-robin", check="tcp", **FAST)
        changes.next("target_down", dead)
        client, _ = held_open(fw.address)
        before = time.time()
        a_row, b_row, dead_row = until(lambda: (rows := fw.targets()) and all(row.check for row in rows) and rows,
                                       "every target checked")
        assert [a_row.address, b_row.address, dead_row.address] == [name_of(a), name_of(b), dead]
        assert [row.state for row in (a_row, b_row, dead_row)] == [TargetState.ENABLED] * 3
        assert (a_row.weight, b_row.weight, dead_row.weight) == (1, 3, 1)
        assert (a_row.backup, b_row.backup, dead_row.backup) == (False, False, True)
        assert (a_row.up, dead_row.up) == (True, False)
        assert dead_row.reason.startswith("its tcp check failed once: ") and "refused" in dead_row.reason
        assert a_row.reason is None  # never down
        assert a_row.active + b_row.active == 1 and dead_row.active == 0
        assert a_row.check.passed and a_row.check.reason == "connected" and a_row.check.failures == 0
        assert a_row.check.passes >= 1 and a_row.check.checks >= a_row.check.passes
        assert not dead_row.check.passed and dead_row.check.failures >= 1 and dead_row.check.passes == 0
        assert before - 5 < dead_row.check.at <= time.time() and 0 <= dead_row.check.duration < 2
        still_relays(client)


def test_drain_sends_no_new_client_and_lets_open_ones_finish(forwarder_factory):
    with Server(tagged(b"A")) as a, Server(tagged(b"B")) as b:
        fw = forwarder_factory([name_of(a), name_of(b)], balance="round-robin")
        client, tag = held_open(fw.address)
        drained, other = (a, b"B") if tag == b"A" else (b, b"A")
        row = fw.set_target(name_of(drained), state="drain")
        assert row.state is TargetState.DRAIN and row.active == 1 and row.address == name_of(drained)
        assert [reached(fw.address) for _ in range(6)] == [other] * 6
        still_relays(client)  # drained, not cut
        assert fw.set_target(name_of(drained), state=TargetState.ENABLED).state is TargetState.ENABLED
        assert sorted(reached(fw.address) for _ in range(4)) == [b"A", b"A", b"B", b"B"]


def test_a_weight_set_at_run_time_applies_to_the_next_clients(forwarder_factory):
    with Server(tagged(b"A")) as a, Server(tagged(b"B")) as b:
        fw = forwarder_factory([name_of(a), name_of(b)], balance="round-robin")
        assert sorted(reached(fw.address) for _ in range(2)) == [b"A", b"B"]
        assert fw.set_target(("127.0.0.1", a.address[1]), weight=3).weight == 3
        tags = [reached(fw.address) for _ in range(8)]
        assert tags.count(b"A") == 6 and tags.count(b"B") == 2, tags
        assert [row.weight for row in fw.targets()] == [3, 1]


def test_disabled_is_not_checked_keeps_its_connections_and_its_first_check_decides_when_enabled(
        forwarder_factory):
    with Server(tagged(b"A")) as a, Server(tagged(b"B")) as b, Changes() as changes:
        fw = forwarder_factory([name_of(a), name_of(b)], check="tcp", fall=5, **FAST)
        client, tag = held_open(fw.address)
        assert tag == b"A"  # failover: the first
        fw.set_target(name_of(a), state="disabled")

        def checks_of_b(count: int) -> None:  # the clock: b's checks go on every interval
            seen = b.accepted
            until(lambda: b.accepted >= seen + count, "b is not checked any more")

        checks_of_b(3)  # a check of a under way when it was disabled has ended by now
        seen = a.accepted
        checks_of_b(10)
        assert a.accepted == seen  # ten intervals, no check of a
        assert [reached(fw.address) for _ in range(3)] == [b"B"] * 3
        still_relays(client)  # disabled, not cut (HAProxy's maintenance mode)
        a.close()  # maintenance went wrong: a is gone
        fw.set_target(name_of(a), state="enabled")
        assert "set to disabled (was enabled)" in changes.next("target_state", name_of(a)).getMessage()
        assert "set to enabled (was disabled)" in changes.next("target_state", name_of(a)).getMessage()
        down = changes.next("target_down", name_of(a))
        assert "failed once" in down.getMessage()  # not fall=5 in a row: the first check decides
        changes.none()


def test_a_drained_single_target_refuses_new_clients_until_enabled(forwarder_factory):
    records = []
    with Server(echo) as upstream:
        fw = forwarder_factory(upstream.address, on_close=records.append)  # the plain path
        client = connect(fw.address)
        client.sendall(b"x")
        assert recv_exactly(client, 1) == b"x"
        fw.set_target(name_of(upstream), state="drain")
        with connect(fw.address) as refused:
            assert recv_all(refused) == b""
        client.sendall(b"y")
        assert recv_exactly(client, 1) == b"y"  # the open one goes on
        fw.set_target(name_of(upstream), state="enabled")
        with connect(fw.address) as again:
            again.sendall(b"z")
            again.shutdown(socket.SHUT_WR)
            assert recv_all(again) == b"z"
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client) == b""
        client.close()
        forwarder_factory.wait_closed(fw, accepted=3)
    refused_record = next(r for r in records if r.outcome is gproxy.Outcome.CONNECT_FAILED)
    assert refused_record.error == f"no target takes new clients ({name_of(upstream)} drain)"
    assert sorted(str(r.outcome) for r in records) == ["connect failed", "eof", "eof"]


def test_backups_take_over_while_every_other_target_is_drained(forwarder_factory):
    with Server(tagged(b"A")) as a, Server(tagged(b"B")) as b:
        fw = forwarder_factory([name_of(a), {"address": name_of(b), "backup": True}])
        assert reached(fw.address) == b"A"
        fw.set_target(name_of(a), state="disabled")
        assert [reached(fw.address) for _ in range(3)] == [b"B"] * 3
        fw.set_target(name_of(a), state="enabled")
        assert reached(fw.address) == b"A"  # back at once


def test_bad_values_name_the_field_and_change_nothing(forwarder_factory):
    fw = forwarder_factory(["127.0.0.1:1", "[::1]:2", "unix:/run/nothing.sock"])
    for kwargs, field in (({"state": "maint"}, "state"), ({"state": 1}, "state"), ({"weight": 0}, "weight"),
                          ({"weight": 257}, "weight"), ({"weight": True}, "weight"), ({"weight": 2.0}, "weight"),
                          ({"state": "drain", "weight": "3"}, "weight")):
        with pytest.raises(ConfigError) as bad:
            fw.set_target("127.0.0.1:1", **kwargs)
        assert bad.value.field == field, kwargs
    for missing in ("127.0.0.1:3", "[::1]:1", "unix:/run/other.sock", "nonsense", ("127.0.0.1", 2)):
        with pytest.raises(TargetNotFound):
            fw.set_target(missing, state="drain")
    assert [(row.state, row.weight) for row in fw.targets()] == [(TargetState.ENABLED, 1)] * 3
    # each target by any spelling of its address
    assert fw.set_target("[0:0::1]:2", weight=2).address == "[::1]:2"
    assert fw.set_target("unix:/run/nothing.sock", state="drain").address == "unix:/run/nothing.sock"


def test_the_state_survives_a_reload_that_changes_the_rule(tmp_path):
    with Server(tagged(b"A")) as a, Server(tagged(b"B")) as b:
        path = tmp_path / "gproxy.toml"

        def write(connect_timeout):
            path.write_text(f'[[rule]]\nname = "r"\nlisten = "127.0.0.1:0"\n'
                            f'targets = ["{name_of(a)}", {{address = "{name_of(b)}", weight = 2}}]\n'
                            f'balance = "round-robin"\nconnect_timeout = {connect_timeout}\n')

        write(5)
        service = gproxy.load_config(str(path)).start()
        try:
            old = service["r"]
            old.set_target(name_of(a), state="drain")
            old.set_target(name_of(b), weight=5)
            write(6)
            assert service.reload()
            new = service["r"]
            assert new is not old
            assert [(row.state, row.weight) for row in new.targets()] == [(TargetState.DRAIN, 1),
                                                                          (TargetState.ENABLED, 5)]
            assert [reached(new.address) for _ in range(4)] == [b"B"] * 4
        finally:
            service.stop()


# -- gproxy's own HTTP routes, as operators use them ---------------------------------------------

def call(api, method: str, path: str, body=None, raw: bytes = None):
    """(status, decoded JSON) of one request with http.client."""
    connection = http.client.HTTPConnection(*api.api, timeout=TIMEOUT)
    try:
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        connection.request(method, path, body=data, headers={"User-Agent": "gproxy-tests"})
        response = connection.getresponse()
        text = response.read()
        return response.status, json.loads(text) if text else None
    finally:
        connection.close()


@pytest.fixture
def file_api(tmp_path):
    """``gproxy --api 127.0.0.1:0 -c FILE`` with rule "r" (two live targets, round-robin) and
    rule "odd" (targets only named: IPv6 and a Unix socket); yields (api, path, a, b)."""
    with Server(tagged(b"A")) as a, Server(tagged(b"B")) as b:
        path = tmp_path / "gproxy.toml"
        odd_port = free_port()
        path.write_text(rules(a, b, 5, odd_port))
        api = ApiProcess("-c", str(path))
        api.odd_port = odd_port
        try:
            yield api, path, a, b
        finally:
            code, log = api.stop()
        assert code == 0, log
        assert "Traceback" not in log and " ERROR " not in log, log


def rules(a, b, connect_timeout, odd_port) -> str:
    return (f'[[rule]]\nname = "r"\nlisten = "127.0.0.1:0"\ntargets = ["{name_of(a)}", "{name_of(b)}"]\n'
            f'balance = "round-robin"\nconnect_timeout = {connect_timeout}\n'
            f'[[rule]]\nname = "odd"\nlisten = "127.0.0.1:0"\n'
            f'targets = ["[::1]:{odd_port}", "unix:/run/gproxy-test/redis.sock"]\n')


def listen_of(api, name: str):
    status, proxy = call(api, "GET", f"/proxies/{name}")
    assert status == 200, proxy
    host, _, port = proxy["listen"].rpartition(":")
    return host, int(port)


def test_http_lists_a_file_rules_targets_by_its_name(file_api):
    api, _path, a, b = file_api
    status, rows = call(api, "GET", "/proxies/r/targets")
    assert status == 200, rows
    assert [row["address"] for row in rows] == [name_of(a), name_of(b)]
    assert rows[0] == {"address": name_of(a), "state": "enabled", "weight": 1, "backup": False, "up": True,
                       "reason": None, "active": 0, "check": None, "max_connections": 0, "queued": 0}
    assert call(api, "GET", f"/proxies/r/targets/{name_of(b)}") == (200, rows[1])


def test_http_drain_and_weight_then_a_reload_keeps_them(file_api):
    api, path, a, b = file_api
    address = listen_of(api, "r")
    client, tag = held_open(address)
    drained = a if tag == b"A" else b
    other = b"B" if drained is a else b"A"
    status, row = call(api, "POST", f"/proxies/r/targets/{name_of(drained)}", {"state": "drain"})
    assert status == 200, row
    assert (row["address"], row["state"], row["active"]) == (name_of(drained), "drain", 1)
    assert api.wait_for(f"target {name_of(drained)} set to drain (was enabled)")
    assert [reached(address) for _ in range(4)] == [other] * 4
    status, row = call(api, "PATCH", "/proxies/odd/targets/unix:/run/gproxy-test/redis.sock", {"weight": 7})
    assert (status, row["weight"]) == (200, 7), row

    path.write_text(rules(a, b, 6, api.odd_port))  # "r" changes, "odd" does not
    api.signal(signal.SIGHUP)
    assert "1 changed" in api.wait_for("reloaded "), api.seen
    status, rows = call(api, "GET", "/proxies/r/targets")
    assert [row["state"] for row in rows if row["address"] == name_of(drained)] == ["drain"], rows
    assert [reached(listen_of(api, "r")) for _ in range(4)] == [other] * 4
    assert [row["weight"] for row in call(api, "GET", "/proxies/odd/targets")[1]] == [1, 7]
    still_relays(client)  # the old forwarder's connection, drained all along

    status, row = call(api, "POST", f"/proxies/r/targets/{name_of(drained)}", {"state": "enabled"})
    assert (status, row["state"]) == (200, "enabled"), row


def test_http_sets_a_targets_max_connections(file_api):
    api, _path, a, _b = file_api
    status, row = call(api, "POST", f"/proxies/r/targets/{name_of(a)}", {"max_connections": 3})
    assert (status, row["max_connections"], row["queued"]) == (200, 3, 0), row
    assert api.wait_for(f"target {name_of(a)} set to max_connections 3 (was none)")
    assert call(api, "GET", f"/proxies/r/targets/{name_of(a)}")[1]["max_connections"] == 3
    status, row = call(api, "POST", f"/proxies/r/targets/{name_of(a)}", {"max_connections": 0})
    assert (status, row["max_connections"]) == (200, 0), row


def test_http_target_paths_ipv6_and_unix_encoded_or_not(file_api):
    api = file_api[0]
    status, rows = call(api, "GET", "/proxies/odd/targets")
    ipv6, unix = (row["address"] for row in rows)
    assert ipv6.startswith("[::1]:") and unix == "unix:/run/gproxy-test/redis.sock"
    for path, address in ((ipv6, ipv6), (urllib.parse.quote(ipv6, safe=""), ipv6),
                          (unix, unix), (urllib.parse.quote(unix, safe=""), unix),
                          ("unix:%2Frun%2Fgproxy-test/redis.sock", unix)):
        status, row = call(api, "POST", f"/proxies/odd/targets/{path}", {"state": "drain"})
        assert (status, row["address"], row["state"]) == (200, address, "drain"), (path, row)
        status, row = call(api, "POST", f"/proxies/odd/targets/{path}", {"state": "enabled"})
        assert status == 200, (path, row)


@pytest.mark.parametrize("path, body, status, message", [
    ("/proxies/r/targets/{a}", {"state": "maint"}, 400, "state: expected enabled, drain or disabled, got 'maint'"),
    ("/proxies/r/targets/{a}", {"state": 3}, 400, "state: expected enabled, drain or disabled, got 3"),
    ("/proxies/r/targets/{a}", {"weight": 0}, 400, "weight: expected a whole number from 1 to 256, got 0"),
    ("/proxies/r/targets/{a}", {"weight": "2"}, 400, "weight: expected a whole number from 1 to 256, got '2'"),
    ("/proxies/r/targets/{a}", {"state": "drain", "weight": 1.5}, 400,
     "weight: expected a whole number from 1 to 256, got 1.5"),
    ("/proxies/r/targets/{a}", {"State": "drain"}, 400,
     "bad request body: unknown field 'State' (a target takes state, weight and max_connections)"),
    ("/proxies/r/targets/{a}", {}, 400, "bad request body: expected state, weight or max_connections"),
    ("/proxies/r/targets/{a}", [], 400, "bad request body: expected an object, got an array"),
    ("/proxies/r/targets/{a}", {"max_connections": -1}, 400,
     "max_connections: expected a whole number from 0 (no limit) to 1000000, got -1"),
    ("/proxies/r/targets/{a}", {"state": "drain", "max_connections": "5"}, 400,
     "max_connections: expected a whole number from 0 (no limit) to 1000000, got '5'"),
    ("/proxies/nope/targets/{a}", {"state": "drain"}, 404, "proxy not found"),
    ("/proxies/nope/targets", None, 404, "proxy not found"),
    ("/proxies/r/targets/127.0.0.1:1", {"state": "drain"}, 404, "target not found"),
    ("/proxies/r/targets/nonsense", {"state": "drain"}, 404, "target not found"),
])
def test_http_bad_requests_name_the_culprit_and_change_nothing(file_api, path, body, status, message):
    api, _path, a, _b = file_api
    method = "GET" if body is None else "POST"
    assert call(api, method, path.format(a=name_of(a)), body) == (status, {"error": message, "status": status})
    assert [row["state"] for row in call(api, "GET", "/proxies/r/targets")[1]] == ["enabled", "enabled"]
