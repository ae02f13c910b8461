"""A connection's direction states (relay.MOVES) under random orders of events.

Each scenario opens one connection and, from a seeded random generator, drives it with a
sequence of events: data each way (small, or bulk that a bulk lane takes), a clean EOF from
either peer, a reset from either peer, toxic changes (which kick every pump), parking passes,
an abort, and races made on the hub itself (kicks, parking passes and an abort queued in one
pass of the loop, before any of them runs). Whatever the order, every byte read arrives in
order, and (checked for every test by conftest's ``checked_states``, see statecheck.py) each
direction makes only moves of the table, ends exactly once, and the teardown runs once,
after both ended. A failure names its seed.
"""

from __future__ import annotations

import random
import socket
import threading
import time

import pytest

from gproxy import Outcome, relay
from gproxy import forwarder as forwarder_module
from peers import TIMEOUT, Gate, Server, connect, payload, recv_exactly, reset

SMALL_BUFFER = 16384
SCENARIOS = 24
EVENTS = ("up", "down", "bulk_up", "bulk_down", "eof_client", "eof_upstream", "rst_client",
          "rst_upstream", "toxic", "park", "abort", "race", "race_abort")


def test_the_table_ends_every_state():
    """ENDED is the only end, every state can reach it, and NEW is the only way in."""
    states = set(relay.MOVES)
    assert states == set(relay.DirectionState)
    assert relay.MOVES[relay.ENDED] == ()
    for state in states:
        seen, todo = set(), [state]
        while todo:
            for after in relay.MOVES[todo.pop()]:
                if after not in seen:
                    seen.add(after)
                    todo.append(after)
        assert relay.ENDED in seen or state is relay.ENDED, state
        assert relay.NEW not in seen, state


class Scenario:
    """One connection through ``fw`` and the test's ends of it: ``client`` and ``server``."""

    def __init__(self, fw, gate, rng, seed):
        self.fw, self.rng, self.seed = fw, rng, seed
        self.client = connect(fw.address)
        self.server = gate.get()
        deadline = time.monotonic() + TIMEOUT
        while not fw.connections():  # accepted, but perhaps not yet listed
            assert time.monotonic() < deadline, "never listed"
            time.sleep(0.005)  # sleep-ok: polling the open connections another thread adds
        self.id = fw.connections()[-1].id
        self.open = {"up": True, "down": True}   # each way: may still carry bytes
        self.ended = False                        # reset or aborted: nothing more to read
        self.toxic = None
        self.n = 0

    def step(self, event: str) -> None:
        rng = self.rng
        if event in ("up", "down", "bulk_up", "bulk_down"):
            way = event.rsplit("_", 1)[-1]
            if self.open[way] and not self.ended:
                bulk = event.startswith("bulk")
                size = rng.randint(SMALL_BUFFER * 4, 1 << 20) if bulk else rng.randint(1, 400)
                self.carry(way, size)
        elif event in ("eof_client", "eof_upstream"):
            way = "up" if event == "eof_client" else "down"
            if self.open[way] and not self.ended:
                src, dst = self.ends(way)
                src.shutdown(socket.SHUT_WR)
                assert dst.recv(1) == b"", f"seed {self.seed}: no EOF passed on {way}"
                self.open[way] = False
        elif event in ("rst_client", "rst_upstream"):
            if not self.ended:
                reset(self.client if event == "rst_client" else self.server)
                self.ended = True
        elif event == "toxic":  # add or remove one: kicks every pump of every connection
            if self.toxic is None:
                self.n += 1
                self.toxic = f"lag{self.n}"
                self.fw.add_toxic("latency", name=self.toxic, stream=rng.choice(["upstream", "downstream"]),
                                  latency=rng.choice([0, 1, 3]))
            else:
                self.fw.remove_toxic(self.toxic)
                self.toxic = None
        elif event == "park":
            self.on_hub(park=2)
        elif event == "abort":
            self.fw.abort_connection(self.id)
            self.ended = True
        elif event in ("race", "race_abort"):
            self.on_hub(park=rng.randint(0, 2), kick=True, abort=event == "race_abort",
                        order=rng.random())
            self.ended |= event == "race_abort"

    def on_hub(self, park=0, kick=False, abort=False, order=0.0):
        """Queue kicks, parking passes and perhaps an abort in one go on the hub: none of the
        callbacks they schedule runs before all are queued."""
        fw, conn_id = self.fw, self.id

        def race():
            context = fw._context
            conn = context.active.get(conn_id)
            now = time.monotonic() - context.stalled
            if abort and order < 0.5 and conn is not None:
                conn.abort(Outcome.CLOSED, "race")
            if kick:
                relay.toxics_changed(context)
            for _ in range(park):
                relay.sweep(context, now, True)
            if abort and order >= 0.5 and conn is not None:
                conn.abort(Outcome.CLOSED, "race")
        fw._on_hub(race)

    def ends(self, way):
        return (self.client, self.server) if way == "up" else (self.server, self.client)

    def carry(self, way: str, size: int) -> None:
        src, dst = self.ends(way)
        data = payload(size, seed=self.rng.randrange(1 << 30))
        sender = threading.Thread(target=src.sendall, args=(data,), daemon=True)
        sender.start()
        assert recv_exactly(dst, size) == data, f"seed {self.seed}: bytes {way} differ"
        sender.join(TIMEOUT)
        assert not sender.is_alive()

    def close(self) -> None:
        if self.toxic is not None:
            self.fw.remove_toxic(self.toxic)
        for sock in (self.client, self.server):
            sock.close()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("bulk_threads", [0, 1])
def test_random_event_orders_end_each_direction_once(forwarders, checked_states, monkeypatch, bulk_threads):
    monkeypatch.setattr(forwarder_module, "_PARK_EVERY", 0.02)  # the forwarder's own passes too
    gate = Gate()
    with Server(gate) as upstream:
        fw = forwarders(upstream.address, buffer_size=SMALL_BUFFER, bulk_threads=bulk_threads)
        try:
            for seed in range(SCENARIOS):
                rng = random.Random(seed)
                scenario = Scenario(fw, gate, rng, seed)
                try:
                    for event in rng.choices(EVENTS, k=rng.randint(2, 14)):
                        scenario.step(event)
                finally:
                    scenario.close()
                forwarders.wait_closed(fw, accepted=seed + 1)
                problems = checked_states.problems()
                assert not problems, f"seed {seed}: {problems}"
        finally:
            gate.release()
    records = forwarders.records
    assert len(records) == SCENARIOS
    assert len(checked_states.checked) == SCENARIOS
    assert all(states.teardowns == 1 for states in checked_states.checked)
