"""Weights, backups and an even spread over the targets that are up, on real sockets: exact counts
for the deterministic policies; targets written as tables in the config file and in Python."""

from __future__ import annotations

import collections

import pytest

import gproxy
from gproxy._configfile import parse
from gproxy.config import Target
from peers import Server, connect, free_port, recv_exactly
from test_health import FAST, Changes
from test_targets import reached, tagged


def spread(address, clients: int, factory=None, fw=None) -> collections.Counter:
    """Which target each of ``clients`` clients in turn reached. With ``factory`` and ``fw``,
    each client's connection has ended in the forwarder before the next comes (closing is
    asynchronous; least-connections counts what is still open)."""
    counts = collections.Counter()
    for number in range(1, clients + 1):
        counts[reached(address)] += 1
        if factory is not None:
            factory.wait_closed(fw, accepted=number)
    return counts


@pytest.mark.timeout(60)
@pytest.mark.parametrize("balance", ["round-robin", "least-connections"])
def test_a_down_targets_share_spreads_evenly_over_the_others(forwarder_factory, balance):
    # the repro: 300 connections over three targets, one refusing (passive health only)
    with Server(tagged(b"A")) as a, Server(tagged(b"C")) as c:
        fw = forwarder_factory([a.address, f"127.0.0.1:{free_port()}", c.address], balance=balance,
                               fail_timeout=60)
        counts = spread(fw.address, 300, forwarder_factory, fw)
    assert counts == {b"A": 150, b"C": 150}, counts  # not 100/200


@pytest.mark.timeout(60)
def test_a_checked_down_target_never_gets_a_client_and_the_rest_split_exactly(forwarder_factory):
    dead = f"127.0.0.1:{free_port()}"
    with Server(tagged(b"A")) as a, Server(tagged(b"B")) as b, Server(tagged(b"C")) as c, \
            Changes() as changes:
        fw = forwarder_factory([a.address, dead, b.address, c.address], balance="round-robin",
                               check="tcp", **FAST)
        changes.next("target_down", dead)
        assert spread(fw.address, 300) == {b"A": 100, b"B": 100, b"C": 100}
    assert fw.statistics().connect_failed == 0


def test_round_robin_weights_interleave_exactly(forwarder_factory):
    with Server(tagged(b"A")) as a, Server(tagged(b"B")) as b:
        fw = forwarder_factory([{"address": a.address, "weight": 3}, Target(b.address)],
                               balance="round-robin")
        tags = [reached(fw.address) for _ in range(400)]
    assert tags[:8] == [b"A", b"A", b"B", b"A"] * 2  # smooth: not A A A B
    assert collections.Counter(tags) == {b"A": 300, b"B": 100}


def test_least_connections_counts_open_connections_per_weight(forwarder_factory):
    with Server(tagged(b"A")) as a, Server(tagged(b"B")) as b:
        fw = forwarder_factory([gproxy.Target(gproxy.config.parse_address(a.address, "a"), weight=3),
                                {"address": "%s:%d" % b.address}], balance="least-connections")
        held, tags = [], []
        try:
            for _ in range(8):  # one at a time: its tag says it is open on its target now
                held.append(connect(fw.address))
                tags.append(recv_exactly(held[-1], 1))
        finally:
            for client in held:
                client.close()
        forwarder_factory.wait_closed(fw, accepted=8)
    # A's load is connections / 3: it takes three for each of B's; ties go round-robin
    assert tags == [b"A", b"B", b"A", b"A", b"A", b"B", b"A", b"A"], tags


def test_backups_take_clients_only_when_every_other_target_is_down(forwarder_factory):
    with Server(tagged(b"A")) as a, Server(tagged(b"B")) as b, Server(tagged(b"K")) as backup, \
            Changes() as changes:
        first, second = "%s:%d" % a.address, "%s:%d" % b.address
        fw = forwarder_factory([first, {"address": "%s:%d" % backup.address, "backup": True}, second],
                               balance="round-robin", check="tcp", **FAST)
        assert spread(fw.address, 6) == {b"A": 3, b"B": 3}  # the backup gets none
        a.close()
        b.close()
        changes.next("target_down", first)
        changes.next("target_down", second)
        assert spread(fw.address, 3) == {b"K": 3}
        with Server(tagged(b"B"), address=b.address):
            changes.next("target_up", second)
            assert spread(fw.address, 3) == {b"B": 3}  # back from the backup at once
        changes.next("target_down", second)
        changes.none()


def test_a_backup_is_this_clients_fallback_when_the_others_fail_to_connect(forwarder_factory):
    with Server(tagged(b"K")) as backup:
        fw = forwarder_factory([f"127.0.0.1:{free_port()}", {"address": "%s:%d" % backup.address, "backup": True}])
        assert reached(fw.address) == b"K"
        forwarder_factory.wait_closed(fw, accepted=1)
    assert fw.statistics().connect_failed == 0


def test_failover_ignores_weight_and_keeps_the_order(forwarder_factory):
    with Server(tagged(b"A")) as a, Server(tagged(b"B")) as b:
        fw = forwarder_factory([a.address, {"address": "%s:%d" % b.address, "weight": 100}])
        assert spread(fw.address, 4) == {b"A": 4}


def test_a_target_functions_answer_may_carry_weights(forwarder_factory):
    with Server(tagged(b"A")) as a, Server(tagged(b"B")) as b:
        answer = [{"address": "%s:%d" % a.address, "weight": 2}, "%s:%d" % b.address]
        fw = forwarder_factory(lambda client: answer, balance="round-robin")
        assert [reached(fw.address) for _ in range(6)] == [b"A", b"B", b"A"] * 2


def test_targets_as_tables_in_a_config_file():
    config = parse("""
[[rule]]
name = "redis"
listen = "127.0.0.1:0"
targets = [{address = "10.0.0.5:6379", weight = 3}, {address = "10.0.0.6:6379", backup = true}, "10.0.0.7:6379"]
balance = "round-robin"
[[rule]]
name = "plain"
listen = "127.0.0.1:0"
targets = [{address = "10.0.0.5:5432"}, "10.0.0.6:5432"]
""", "g.toml")
    redis = config.rules["redis"]
    assert redis.target_list == (Target(gproxy.config.Address("10.0.0.5", 6379), weight=3),
                                 Target(gproxy.config.Address("10.0.0.6", 6379), backup=True),
                                 Target(gproxy.config.Address("10.0.0.7", 6379)))
    assert [str(t) for t in redis.targets] == ["10.0.0.5:6379", "10.0.0.6:6379", "10.0.0.7:6379"]
    # nothing but addresses: the rule is the same as one written with plain strings
    plain = parse('[[rule]]\nlisten = "127.0.0.1:0"\ntargets = ["10.0.0.5:5432", "10.0.0.6:5432"]\n')
    assert config.rules["plain"].target == plain.rules["127.0.0.1:0"].target


@pytest.mark.parametrize("targets, words", [
    ('[{address = "10.0.0.5:1", wieght = 3}, "10.0.0.6:1"]',
     "target 1: unknown key \"wieght\" (did you mean \"weight\"?)"),
    ('["10.0.0.6:1", {address = "10.0.0.5:1", weight = 0}]',
     "target 2 (10.0.0.5:1): weight: expected a whole number from 1 to 256, got 0"),
    ('[{address = "10.0.0.5:1", weight = "3"}, "10.0.0.6:1"]',
     'weight: expected a whole number from 1 to 256, got "3"'),
    ('[{address = "10.0.0.5:1", weight = 257}, "10.0.0.6:1"]', "from 1 to 256, got 257"),
    ('[{address = "10.0.0.5:1", backup = "yes"}, "10.0.0.6:1"]', 'backup: expected true or false, got "yes"'),
    ('[{address = "10.0.0.5:1", backup = true}]', "every target is a backup"),
    ('[{weight = 2}, "10.0.0.6:1"]', "target 1: missing address"),
    ('[{address = "10.0.0.5:1"}, "10.0.0.5:1"]', "a target is listed twice"),
    ('[{address = "nope"}, "10.0.0.6:1"]', "expected HOST:PORT"),
    ('[1, 2]', "expected addresses as strings or tables"),
])
def test_bad_target_tables_name_file_rule_key_and_target(targets, words):
    with pytest.raises(gproxy.ConfigError) as caught:
        parse(f'[[rule]]\nname = "r"\nlisten = "127.0.0.1:0"\ntargets = {targets}\n', "g.toml")
    message = str(caught.value)
    assert message.startswith("g.toml: rule 'r': targets: ") and words in message, message


def test_the_documented_examples_load():
    from doctext import DOCS_DIR, fences, section
    for heading in ("Health checks", "Weights, backups and failback"):
        text = section(DOCS_DIR / "configuration.md", heading)
        blocks = [b for b in fences(DOCS_DIR / "configuration.md") if b.info == "toml" and b.text in text]
        assert len(blocks) == 1, heading
        config = parse(blocks[0].text, heading)
        assert all(rule.check for rule in config.rules.values())
