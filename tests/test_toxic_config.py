"""Toxics in the config file (``[[rule.toxic]]``): the same checks, names and defaults as the
HTTP API and ``add_toxic()``, errors naming file, rule and toxic, and reloads that change a
rule's toxics live without touching the rule, its listener or its connections (issue 20, item
10). Run in-process (``gproxy.load_config``) and as operators run it (``gproxy --check``,
``gproxy -c FILE --api``, SIGHUP)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

import gproxy
from gproxy._configfile import parse
from gproxy.toxics import Schedule, make_toxic
from peers import Server, connect, echo, free_port, read_until_closed, recv_exactly
from test_api import ApiProcess
from test_configfile import ConfigProxy, run_cli
from test_reload import lines, write  # noqa: F401  (lines is a fixture)

RULE = """\
[[rule]]
name = "db"
listen = "127.0.0.1:{port}"
target = "127.0.0.1:{target}"
"""


def rule(port: int = 0, target: int = 1) -> str:
    return RULE.format(port=port, target=target)


def api(address, method: str, path: str, body=None):
    """One call to gproxy's HTTP API, as toxiproxy-python makes them (urllib, JSON)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://{address[0]}:{address[1]}{path}", data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            text = answer.read()
            return answer.status, json.loads(text) if text else None
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


# -- reading them ---------------------------------------------------------------------------------

def test_a_files_toxics_are_what_add_toxic_and_the_api_make_of_the_same_fields():
    config = parse(rule() + """
        [[rule.toxic]]
        type = "latency"
        latency = 100
        [[rule.toxic]]
        type = "bandwidth"
        name = "slow"
        stream = "UPSTREAM"
        toxicity = 0.5
        rate = 64
        [[rule.toxic]]
        type = "trigger"
        stream = "upstream"
        match = "pg_sleep"
        delay = 200
        schedule = {on = 2, off = 8, repeat = 3}
    """.replace("\n        ", "\n"), "gproxy.toml")
    assert config.toxics["db"] == [
        make_toxic("latency", attributes={"latency": 100}),
        make_toxic("bandwidth", name="slow", stream="upstream", toxicity=0.5, attributes={"rate": 64}),
        make_toxic("trigger", stream="upstream", attributes={"match": "pg_sleep", "delay": 200},
                   schedule=Schedule(on=2, off=8, repeat=3)),
    ]
    # toxiproxy's default name, TYPE_STREAM, and every default attribute filled in
    assert [t.name for t in config.toxics["db"]] == ["latency_downstream", "slow", "trigger_upstream"]
    assert config.toxics["db"][0].attributes == {"latency": 100, "jitter": 0}
    assert config.rules["db"].name == "db" and "toxic" not in config.options["db"]


def test_a_rule_without_toxics_has_none():
    assert parse(rule(), "f.toml").toxics == {"db": []}


@pytest.mark.parametrize("toxic, culprit", [
    ('type = "latncy"', "toxic #1: type: unknown toxic type \"latncy\" (known: latency, bandwidth"),
    ('latency = 100', "toxic #1: type: missing (one of latency, bandwidth"),
    ('type = 3', "toxic #1: type: expected a toxic type name, got 3"),
    ('type = "latency"\nlatency = -5',
     "toxic latency_downstream: latency: must be a whole number from 0 to 9223372036854775807, not -5"),
    ('type = "latency"\nlatency = "100"',
     "toxic latency_downstream: latency: must be a whole number from 0 to 9223372036854775807, not \"100\""),
    ('type = "latency"\nlatncy = 100', "toxic latency_downstream: latncy: latency has no such attribute"),
    ('type = "latency"\nname = "slow"\nstream = "sideways"',
     "toxic slow: stream: must be \"upstream\" or \"downstream\", not \"sideways\""),
    ('type = "latency"\ntoxicity = 2', "toxic latency_downstream: toxicity: must be a number from 0 to 1, not 2"),
    ('type = "trigger"\nonce = "yes"', "toxic trigger_downstream: once: must be true or false, not \"yes\""),
    ('type = "redis_error"\nstream = "downstream"',
     "toxic #1: stream: must be \"upstream\" for redis_error toxics, not \"downstream\""),
    ('type = "latency"\nschedule = {on = -1}',
     "toxic latency_downstream: schedule: on: expected a number of seconds > 0 (at most a year), got -1"),
    ('type = "latency"\nschedule = {onn = 1}', "toxic latency_downstream: schedule: onn: unknown key"),
    ('type = "latency"\nschedule = 5', "toxic latency_downstream: schedule: expected a Schedule, or a table"),
    ('type = "latency"\nschedule = {off = 5}', "toxic latency_downstream: schedule: off: needs on"),
    ('type = "latency"\nschedule = {on = 1, ramp = 2}',
     "toxic latency_downstream: schedule: ramp: must be at most on (1 s), got 2"),
])
def test_a_bad_toxic_names_file_rule_and_toxic(toxic, culprit):
    with pytest.raises(gproxy.ConfigError) as caught:
        parse(rule() + "[[rule.toxic]]\n" + toxic + "\n", "gproxy.toml")
    assert str(caught.value).startswith("gproxy.toml: rule 'db': " + culprit), str(caught.value)


def test_two_toxics_of_one_name_in_a_rule_are_an_error():
    text = rule() + '[[rule.toxic]]\ntype = "latency"\n[[rule.toxic]]\ntype = "latency"\nlatency = 5\n'
    with pytest.raises(gproxy.ConfigError, match=r"^f.toml: rule 'db': toxic latency_downstream: name: "
                                                  r"'latency_downstream' names an earlier toxic of this rule too"):
        parse(text, "f.toml")


@pytest.mark.parametrize("text, culprit", [
    ("[defaults]\ntoxic = []\n" + rule(), "f.toml: [defaults] toxic: belongs in each [[rule]], not in [defaults]"),
    (rule() + "toxic = 5\n", "f.toml: rule 'db': toxic: expected [[rule.toxic]] tables, got 5"),
])
def test_toxics_belong_in_rule_toxic_tables(text, culprit):
    with pytest.raises(gproxy.ConfigError) as caught:
        parse(text, "f.toml")
    assert str(caught.value) == culprit


def test_check_says_the_toxics_and_a_bad_one_is_one_line_exit_2(tmp_path):
    path = write(tmp_path / "gproxy.toml", rule() + '[[rule.toxic]]\ntype = "latency"\nlatency = 100\n')
    result = run_cli("--check", "-c", path)
    assert result.returncode == 0, result.stderr
    assert "db: 127.0.0.1:0 -> 127.0.0.1:1, toxics: latency_downstream" in result.stdout
    write(tmp_path / "gproxy.toml", rule() + '[[rule.toxic]]\ntype = "latency"\nlatency = -1\n')
    for argv in (["--check", "-c", path], ["-c", path]):
        result = run_cli(*argv)
        assert result.returncode == 2
        assert result.stderr == (f"gproxy: error: {path}: rule 'db': toxic latency_downstream: latency: "
                                 "must be a whole number from 0 to 9223372036854775807, not -1\n")


def test_the_api_refuses_what_the_file_refuses_with_the_same_words():
    """One validator: the API's 400 says what the file's error says, after its own prefix."""
    bad = [{"type": "latency", "attributes": {"latency": -5}},
           {"type": "trigger", "attributes": {"action": "explode"}},
           {"type": "slicer", "attributes": {"average_size": 0}},
           {"type": "latency", "toxicity": 2}]
    with ApiProcess() as server:
        assert server.call("POST", "/proxies", {"name": "db", "upstream": "127.0.0.1:1"})[0] == 201
        for body in bad:
            status, answer = server.call("POST", "/proxies/db/toxics", body)
            assert status == 400
            keys = [("type", body["type"])] + [(k, v) for k, v in body.items() if k == "toxicity"] \
                + list(body.get("attributes", {}).items())
            with pytest.raises(gproxy.ConfigError) as caught:
                parse(rule() + "[[rule.toxic]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys), "f.toml")
            assert answer["error"] == "bad request body: " + str(caught.value)[len("f.toml: rule 'db': "):]


# -- running them ---------------------------------------------------------------------------------

LIMIT = '[[rule.toxic]]\ntype = "limit_data"\nbytes = {bytes}\n'


def test_the_files_toxics_act_from_the_start(tmp_path):
    with Server(echo) as target:
        path = write(tmp_path / "gproxy.toml", rule(target=target.address[1]) + LIMIT.format(bytes=3))
        with gproxy.load_config(path) as files:
            assert [t.name for t in files["db"].toxics()] == ["limit_data_downstream"]
            with connect(files["db"].address) as client:
                client.sendall(b"hello")
                assert read_until_closed(client) == b"hel"
            files["db"].wait_idle(10)


def test_a_reload_that_changes_only_toxics_updates_them_live_on_open_connections(tmp_path, lines):  # noqa: F811
    with Server(echo) as target:
        path = tmp_path / "gproxy.toml"
        port = free_port()
        write(path, rule(port=port, target=target.address[1]) + LIMIT.format(bytes=10 ** 9))
        with gproxy.load_config(str(path)) as files:
            fw = files["db"]
            client = connect(fw.address)
            client.sendall(b"abc")
            assert recv_exactly(client, 3) == b"abc"   # 3 of the limit's bytes are gone
            write(path, rule(port=port, target=target.address[1]) + LIMIT.format(bytes=5))
            assert files.reload()
            assert files["db"] is fw   # not restarted: the same forwarder, listener and connection
            assert lines.wait_for("reloaded").endswith("0 added, 0 changed, 0 removed, 1 unchanged")
            assert lines.wait_for("rule db: toxics") == "rule db: toxics limit_data_downstream updated"
            client.sendall(b"defgh")   # an update keeps limit_data's count: 2 more bytes pass
            assert read_until_closed(client) == b"de"
            client.close()
            fw.wait_idle(10)


def test_a_reload_replaces_the_files_toxics_and_keeps_the_apis(tmp_path, lines):  # noqa: F811
    path = tmp_path / "gproxy.toml"
    latency = '[[rule.toxic]]\ntype = "latency"\nlatency = {ms}\n'
    port = free_port()
    write(path, rule(port=port) + latency.format(ms=100) + '[[rule.toxic]]\ntype = "timeout"\nname = "gone"\n')
    with gproxy.load_config(str(path)) as files:
        fw = files["db"]
        fw.add_toxic("bandwidth", name="api_added", rate=10)
        fw.add_toxic("slicer", name="taken_over", average_size=5)
        write(path, rule(port=port) + latency.format(ms=200)
              + '[[rule.toxic]]\ntype = "slow_close"\nname = "taken_over"\ndelay = 5\n')
        assert files.reload()
        assert files["db"] is fw
        line = lines.wait_for("rule db: toxics")
        assert line == "rule db: toxics gone removed, latency_downstream updated, taken_over replaced"
        assert [(t.name, t.type, t.attributes) for t in fw.toxics()] == [
            ("latency_downstream", "latency", {"latency": 200, "jitter": 0}),
            ("api_added", "bandwidth", {"rate": 10}),
            ("taken_over", "slow_close", {"delay": 5}),
        ]
        # the API removed a file's toxic and changed another: the reload makes them the file's again
        fw.remove_toxic("taken_over")
        fw.update_toxic("latency_downstream", latency=1)
        assert files.reload()
        assert lines.wait_for("taken_over added") == \
            "rule db: toxics latency_downstream updated, taken_over added"
        assert {t.name: t.attributes for t in fw.toxics()} == {
            "latency_downstream": {"latency": 200, "jitter": 0}, "api_added": {"rate": 10},
            "taken_over": {"delay": 5}}
        assert files.reload()   # nothing differs: nothing is touched, no line about toxics
        assert len(lines.having("rule db: toxics")) == 2


def test_a_reload_that_changes_the_rule_carries_every_toxic_and_schedule_over(tmp_path):
    path = tmp_path / "gproxy.toml"
    toxic = '[[rule.toxic]]\ntype = "latency"\nlatency = 7\nschedule = {on = 3600, off = 60}\n'
    write(path, rule(target=1) + toxic)
    with gproxy.load_config(str(path)) as files:
        old = files["db"]
        old.add_toxic("bandwidth", name="api_added", rate=10, toxicity=0.5)
        write(path, rule(port=old.address[1], target=2) + toxic)
        assert files.reload()
        new = files["db"]
        assert new is not old
        assert new.toxics() == old.toxics()
        assert new.toxics()[0].schedule == Schedule(on=3600, off=60)
        assert new.toxics()[0].toxicity == 1.0   # on: the first hour of its cycle


def test_gproxy_c_with_api_shows_the_files_toxics_and_sighup_applies_a_change(tmp_path):
    path = tmp_path / "gproxy.toml"
    port = free_port()
    write(path, rule(port=port) + '[[rule.toxic]]\ntype = "latency"\nlatency = 100\n')
    with ConfigProxy(str(path), 1, extra=["--api", "127.0.0.1:0"]) as proxy:
        line = proxy.wait_for("HTTP API (toxiproxy) listening on ") if not any(
            "HTTP API" in seen for seen in proxy.seen) else next(s for s in proxy.seen if "HTTP API" in s)
        host, api_port = line.rsplit(" ", 1)[1].rsplit(":", 1)
        status, toxics = api((host, int(api_port)), "GET", "/proxies/db/toxics")
        assert status == 200
        assert toxics == [{"name": "latency_downstream", "type": "latency", "stream": "downstream",
                           "toxicity": 1.0, "attributes": {"latency": 100, "jitter": 0}}]
        write(path, rule(port=port) + '[[rule.toxic]]\ntype = "latency"\nlatency = 250\n')
        assert " reloaded " in proxy.reload()
        status, toxic = api((host, int(api_port)), "GET", "/proxies/db/toxics/latency_downstream")
        assert toxic["attributes"] == {"latency": 250, "jitter": 0}
