"""Chaos over time (issue 20, item 11): a toxic's ``Schedule`` (on, off, repeat, ramp), its time
line on a fake clock, the chain's promise under random schedules (nothing lost, duplicated or
reordered: toggling off hands back what was held), and the runner on a real forwarder's hub:
one greenlet sleeping between changes, gone with its toxic or its forwarder."""

from __future__ import annotations

import logging
import random
import time

import pytest

import gproxy
from gproxy._chain import _EOF, BUILTIN
from gproxy._schedule import Runner
from gproxy.toxics import Schedule, Toxics, make_toxic
from peers import Server, connect, echo, recv_exactly
from test_reload import lines, write  # noqa: F401  (lines is a fixture)
from test_toxic_chain import (
    DOWNSTREAM,
    STREAMS,
    UPSTREAM,
    Direction,
    FakeConn,
    first_difference,
    passing_toxic,
    words,
)

NS = 1_000_000_000


def random_schedule(rng: random.Random) -> Schedule:
    on = rng.choice([None, 0.01, 0.05, 0.3, 1.0])
    ramp = 0.0 if rng.random() < 0.5 else rng.uniform(0.01, on if on is not None else 2.0)
    return Schedule(on=on, off=0.0 if on is None else rng.choice([0.0, 0.02, 0.5]),
                    repeat=None if on is None or rng.random() < 0.3 else rng.randint(1, 4),
                    ramp=ramp, steps=rng.randint(1, max(1, min(7, int(ramp * 100)))),
                    start=rng.choice([0.0, 0.0, 0.1, 0.0137]))


# -- the time line --------------------------------------------------------------------------------

def factor_by_definition(schedule: Schedule, t: float):
    """What the schedule's docstring says, in floating point, away from boundaries."""
    if t < schedule.start:
        return 0.0
    into = t - schedule.start
    if schedule.on is not None:
        length = schedule.on + schedule.off
        if schedule.repeat is not None and into >= schedule.repeat * length:
            return None
        into -= (into // length) * length
        if into >= schedule.on:
            return 0.0
    if into >= schedule.ramp:
        return 1.0
    return int(into * schedule.steps / schedule.ramp) / schedule.steps


def test_the_time_line_follows_its_definition_and_always_moves_on():
    rng = random.Random(7)
    for _ in range(2000):
        schedule = random_schedule(rng)
        t = 0
        changes = 0
        while t is not None and t < 5 * NS:
            factor, following = schedule.at(t)
            if factor is None:
                assert following is None
                break
            assert 0.0 <= factor <= 1.0
            assert following is None or following > t, (schedule, t, following)   # never stuck
            if following is not None:   # constant until the next change: look inside the interval
                probe = rng.randint(t, following - 1)
                assert schedule.at(probe)[0] == factor, (schedule, t, probe)
                middle = (t + following) / 2 / NS
                expected = factor_by_definition(schedule, middle)
                if following - t > 1000 and abs(middle * NS - round(middle * NS)) < 1:
                    assert expected == pytest.approx(factor), (schedule, middle)
            changes += 1
            t = following
        assert changes < 100_000


def test_a_schedule_with_repeats_ends_and_one_without_never_does():
    assert Schedule(on=2, off=3, repeat=2).at(10 * NS - 1) == (0.0, 10 * NS)
    assert Schedule(on=2, off=3, repeat=2).at(10 * NS) == (None, None)
    assert Schedule(on=2, repeat=3).at(0) == (1.0, 6 * NS)   # on throughout, no needless wake-ups
    assert Schedule().at(0) == (1.0, None)
    assert Schedule(start=1).at(0) == (0.0, NS)
    # a ramp: 0, 1/4, 2/4, 3/4 a quarter of a second apart, then all of it
    ramp = Schedule(ramp=1, steps=4)
    assert [ramp.at(t * NS // 4) for t in range(5)] == [
        (0.0, NS // 4), (0.25, NS // 2), (0.5, 3 * NS // 4), (0.75, NS), (1.0, None)]


@pytest.mark.parametrize("fields, message", [
    ({"on": 0}, "schedule: on: expected a number of seconds > 0 (at most a year), got 0"),
    ({"on": float("inf")}, "schedule: on: expected a number of seconds > 0 (at most a year), got inf"),
    ({"on": True}, "schedule: on: expected a number of seconds > 0 (at most a year), got True"),
    ({"on": 1, "off": -1}, "schedule: off: expected a number of seconds >= 0 (at most a year), got -1"),
    ({"repeat": 2}, "schedule: repeat: needs on: without it there is one cycle, for ever"),
    ({"on": 1, "repeat": 0}, "schedule: repeat: expected a whole number from 1 to 9223372036854775807, got 0"),
    ({"ramp": 1, "steps": 0}, "schedule: steps: expected a whole number from 1 to 10000, got 0"),
    ({"on": 0.001}, "schedule: on: must be 0 or at least 0.01 s, got 0.001"),
    ({"on": 1, "off": 0.005}, "schedule: off: must be 0 or at least 0.01 s, got 0.005"),
    ({"ramp": 1, "steps": 101},
     "schedule: steps: at most one step per 0.01 s: a ramp of 1 s takes at most 100, got 101"),
    ({"start": "1"}, "schedule: start: expected a number of seconds >= 0 (at most a year), got '1'"),
])
def test_bad_schedules_name_the_field(fields, message):
    with pytest.raises(gproxy.ConfigError) as caught:
        Schedule(**fields)
    assert str(caught.value) == message


# -- the chain's promise under random schedules ---------------------------------------------------

class FakeRunner:
    """A runner on the fake clock: what ``Runner.step`` does, at the times it asks for."""

    def __init__(self, toxics: Toxics, name: str, origin: float):
        entry = toxics.entry(name)
        self.runner = Runner(name, entry.toxic.schedule, lambda factor: toxics.set_factor(entry, factor),
                             lambda: toxics.remove(name), origin=origin)
        entry.runner = self.runner
        self.due = origin

    def run(self, now: float) -> bool:
        """Apply what is due by ``now``; True if the toxics changed."""
        changed = False
        while not self.runner.cancelled and self.due is not None and self.due <= now:
            following = self.runner.step(round((self.due - self.runner.origin) * NS))
            changed = True
            self.due = None if following is None else self.runner.origin + following / NS
        return changed


def check_schedules(seed: int, steps: int = 300) -> None:
    rng = random.Random(seed)
    toxics = Toxics()
    conn = FakeConn()
    ends = [Direction(conn, d, toxics, seed * 2 + d) for d in (UPSTREAM, DOWNSTREAM)]
    streams = [words(rng.randint(50, 400), d) for d in (UPSTREAM, DOWNSTREAM)]
    fed = [0, 0]
    now, version, made = 0.0, 0, 0
    runners = []
    for _ in range(steps):
        action = rng.random()
        if action < 0.4:
            d = rng.randrange(2)
            end = ends[d]
            if not end.eof_sent:
                if fed[d] < len(streams[d]):
                    n = rng.randint(1, 200)
                    end.feed(streams[d][fed[d]:fed[d] + n], now, version)
                    fed[d] += n
                elif rng.random() < 0.3:
                    end.feed(_EOF, now, version)
        elif action < 0.7:
            now += rng.choice([0.0, 0.0005, 0.01, 0.05, 0.3])
        elif action < 0.85:   # a scheduled toxic that holds what it stops: its off phase gives it back
            kind, attributes = ("timeout", {"timeout": 0}) if rng.random() < 0.4 else passing_toxic(rng)
            if callable(kind):
                continue
            stream = BUILTIN[kind].stream or rng.choice(STREAMS)   # protocol toxics: upstream only
            name = f"t{made}"
            made += 1
            toxics.add(make_toxic(kind, name=name, stream=stream, toxicity=rng.choice([1.0, 0.5]),
                                  attributes=attributes, schedule=random_schedule(rng)))
            runners.append(FakeRunner(toxics, name, now))
            version += 1
        elif action < 0.95:   # the API changes its toxicity (the one it has while on)
            present = toxics.list()
            if present:
                toxics.update(rng.choice(present).name, {"toxicity": rng.choice([0.0, 0.5, 1.0])})
                version += 1
        else:
            present = toxics.list()
            if present:
                toxics.remove(rng.choice(present).name)
                version += 1
        if any([runner.run(now) for runner in runners]):
            version += 1
        if rng.random() < 0.5:
            for end in ends:
                end.run(now, version)
    for d, end in enumerate(ends):
        if not end.eof_sent:
            end.feed(streams[d][fed[d]:], now, version)
            end.feed(_EOF, now, version)
    # every schedule runs on (each ends, or its toxic acts for ever with nothing held back
    # for ever but a timeout's hold, which its removal gives back)
    for _ in range(20):
        now += 0.25
        if any([runner.run(now) for runner in runners]):
            version += 1
        for end in ends:
            end.run(now, version)
    toxics.clear()
    version += 1
    for _ in range(10_000):
        soonest = [end.run(now, version) for end in ends]
        if all(end.eof for end in ends):
            break
        now = min((t for t in soonest if t is not None), default=now + 1.0)
    assert conn.outcome is None, (seed, conn.outcome, conn.error)
    for d, end in enumerate(ends):
        assert end.eof, f"seed {seed}, {STREAMS[d]}: no EOF; {first_difference(end.sent, end.got)}"
        assert end.got == end.sent, f"seed {seed}, {STREAMS[d]}: {first_difference(end.sent, end.got)}"


def test_random_schedules_never_lose_duplicate_or_reorder_a_byte():
    for seed in range(200):
        check_schedules(seed)


def test_a_ramp_adds_connections_and_never_takes_one_back():
    """One draw per connection: as the toxicity rises, the toxic acts on more connections,
    and each it acts on stays under it (toxiproxy's draw per update would shuffle them)."""
    toxics = Toxics()
    toxics.add(make_toxic("latency", attributes={"latency": 10}, schedule=Schedule(ramp=1, steps=10)))
    entry = toxics.entry("latency_downstream")
    ends = [Direction(FakeConn(), DOWNSTREAM, toxics, seed) for seed in range(200)]
    acting = set()
    for step in range(11):
        toxics.set_factor(entry, step / 10)
        for end in ends:
            end.link.sync(step, float(step))
        now = {i for i, end in enumerate(ends) if end.link.stages[0].active}
        assert acting <= now, step
        acting = now
    assert len(acting) == 200
    assert 10 < len({i for i in range(200) if ends[i].link.stages[0].draw < 0.5}) < 190


def test_a_step_that_keeps_a_toxic_acting_does_not_restart_its_timers():
    """A timeout under a ramp: a step that leaves the connection under it does not restart the
    time it has been acting (an update by the API would)."""
    toxics = Toxics()
    toxics.add(make_toxic("timeout", attributes={"timeout": 100}, schedule=Schedule(ramp=1, steps=2)))
    entry = toxics.entry("timeout_downstream")
    toxics.set_factor(entry, 1.0)
    end = Direction(FakeConn(), DOWNSTREAM, toxics, 0)
    end.feed(b"held", 0.0, 1)
    toxics.set_factor(entry, 0.99 if end.link.stages[0].draw < 0.99 else 1.0)   # still acting
    end.run(0.09, 2)
    end.run(0.1, 2)
    assert end.conn.outcome is not None and end.got == b""   # closed 100 ms after it began, not after the step


# -- on a forwarder --------------------------------------------------------------------------------

def runner_of(fw: gproxy.Forwarder, name: str) -> Runner:
    return fw._on_hub(lambda: fw._context.toxics.entry(name).runner)


def test_an_on_phase_holds_the_bytes_its_off_phase_gives_back_and_the_end_removes_it(lines):  # noqa: F811
    with Server(echo) as target, gproxy.Forwarder("127.0.0.1:0", target.address) as fw:
        with connect(fw.address) as client:
            began = time.monotonic()
            fw.add_toxic("timeout", schedule=Schedule(on=0.3, repeat=1))   # a 0.3 s partition, once
            client.sendall(b"ping")
            assert recv_exactly(client, 4) == b"ping"   # held while on, given back in order
            assert time.monotonic() - began >= 0.3
            assert lines.wait_for("toxic timeout_downstream: its schedule is over: removed")
            assert fw.toxics() == []
            client.sendall(b"pong")
            assert recv_exactly(client, 4) == b"pong"
        fw.wait_idle(10)


def test_a_toxic_added_before_start_begins_its_schedule_when_the_forwarder_runs(lines):  # noqa: F811
    fw = gproxy.Forwarder("127.0.0.1:0", "127.0.0.1:1")
    toxic = fw.add_toxic("latency", latency=5, schedule=Schedule(start=0.05, on=3600))
    assert toxic.toxicity == 0.0 and fw.toxics()[0].schedule == Schedule(start=0.05, on=3600)
    with fw:
        lines.wait_for("toxic latency_downstream on")
        assert fw.toxics()[0].toxicity == 1.0


@pytest.mark.parametrize("how", ["remove", "reset", "stop", "block"])
def test_the_schedule_ends_with_its_toxic_or_its_forwarder(how):
    fw = gproxy.Forwarder("127.0.0.1:0", "127.0.0.1:1").start()
    try:
        schedule = Schedule(on=0.01, off=0.01)   # changes every 10 ms, for ever
        if how == "block":
            with fw.toxic("latency", schedule=schedule):
                runner = runner_of(fw, "latency_downstream")
        else:
            fw.add_toxic("latency", schedule=schedule)
            runner = runner_of(fw, "latency_downstream")
            {"remove": lambda: fw.remove_toxic("latency_downstream"), "reset": fw.reset, "stop": fw.stop}[how]()
        assert runner.cancelled
        fw._on_hub(lambda: runner.greenlet.join(5))   # killed: it ends at once, without a change
        assert runner.greenlet.dead
    finally:
        fw.stop()


def test_a_toxicity_set_while_scheduled_is_the_one_it_has_while_on():
    with gproxy.Forwarder("127.0.0.1:0", "127.0.0.1:1") as fw:
        fw.add_toxic("latency", toxicity=0.5, schedule=Schedule(on=3600, off=1))
        assert fw.toxics()[0].toxicity == 0.5
        assert fw.update_toxic("latency_downstream", toxicity=0.25).toxicity == 0.25
        assert fw._on_hub(lambda: fw._context.toxics.entry("latency_downstream").peak) == 0.25
        fw._on_hub(lambda: fw._context.toxics.set_factor(fw._context.toxics.entry("latency_downstream"), 0.0))
        assert fw.update_toxic("latency_downstream", toxicity=1).toxicity == 0.0   # off: it waits for on


def test_a_config_files_schedule_runs_on_its_rule(tmp_path, lines):  # noqa: F811
    path = write(tmp_path / "gproxy.toml", """\
        [[rule]]
        name = "db"
        listen = "127.0.0.1:0"
        target = "127.0.0.1:1"
        [[rule.toxic]]
        type = "latency"
        latency = 100
        schedule = {start = 0.05, on = 3600}
        """)
    with gproxy.load_config(path) as files:
        toxic = files["db"].toxics()[0]
        assert toxic.schedule == Schedule(start=0.05, on=3600) and toxic.toxicity == 0.0   # off until start
        lines.wait_for("db: toxic latency_downstream on")
        assert files["db"].toxics()[0].toxicity == 1.0


def test_changes_are_logged_once_each_and_ramp_steps_at_debug(lines):  # noqa: F811
    """On a fake clock (a loaded machine may stall the hub past a step, which is then skipped,
    as it should be): a line per change, none for a boundary that changes nothing."""
    logging.getLogger("gproxy").setLevel(logging.DEBUG)
    lines.setLevel(logging.DEBUG)
    applied, finished = [], []
    runner = Runner("latency_downstream", Schedule(on=0.2, off=0.1, ramp=0.1, steps=2, repeat=2),
                    applied.append, lambda: finished.append(True), lambda: "db: ")
    t = 0
    while t is not None:
        t = runner.step(t)
    assert applied == [0.0, 0.5, 1.0, 0.0, 0.5, 1.0, 0.0] and finished == [True]
    said = [m for m in lines.messages if "toxic latency_downstream" in m]
    assert said == ["db: toxic latency_downstream off",
                    "db: toxic latency_downstream ramping: 0.5 of its toxicity",
                    "db: toxic latency_downstream on",
                    "db: toxic latency_downstream off",
                    "db: toxic latency_downstream ramping: 0.5 of its toxicity",
                    "db: toxic latency_downstream on",
                    "db: toxic latency_downstream off",
                    "db: toxic latency_downstream: its schedule is over: removed"]
