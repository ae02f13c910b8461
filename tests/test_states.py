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
from gproxy import offload as offload_module
from peers import TIMEOUT, Gate, Server, connect, payload, recv_exactly, reset

SMALL_BUFFER = 16384
SCENARIOS = 40
#: each event and its weight: most keep the connection going, a few end it
EVENTS = {"up": 3, "down": 3, "bulk_up": 1, "bulk_down": 1, "eof_client": 1, "eof_upstream": 1,
          "rst_client": 0.3, "rst_upstream": 0.3, "bulk_rst": 0.5, "toxic": 3, "toxic_end": 0.3, "park": 2,
          "abort": 0.3, "race": 3, "race_abort": 0.3}


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
        self.toxics = []                          # the names of the toxics in place
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
        elif event == "bulk_rst":  # the receiver of a bulk stream resets in the middle of it
            way = rng.choice(["up", "down"])
            if self.open[way] and not self.ended:
                self.carry(way, 4 << 20, reset_after=rng.randint(1, 1 << 18))
                self.ended = True
        elif event in ("rst_client", "rst_upstream"):
            if not self.ended:
                reset(self.client if event == "rst_client" else self.server)
                self.ended = True
        elif event == "toxic":  # add or remove one: kicks every pump of every connection
            if self.toxics and rng.random() < 0.5:
                self.fw.remove_toxic(self.toxics.pop(rng.randrange(len(self.toxics))))
            else:
                self.add_toxic("latency", latency=rng.choice([0, 1, 3]))
        elif event == "toxic_end":  # a toxic ends the connection when bytes come its way
            if not self.ended:
                kind, way = rng.choice(["limit_data", "reset_peer"]), rng.choice(["up", "down"])
                self.add_toxic(kind, way, **({"bytes": rng.randint(0, 100)} if kind == "limit_data" else {}))
                if self.open[way]:
                    self.ends(way)[0].sendall(payload(200, seed=self.n))
                    self.ended = True
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

    def add_toxic(self, kind: str, way=None, **attributes) -> None:
        self.n += 1
        way = way or self.rng.choice(["up", "down"])
        name = f"{kind}{self.n}"
        self.fw.add_toxic(kind, name=name, stream="upstream" if way == "up" else "downstream", **attributes)
        self.toxics.append(name)

    def ends(self, way):
        return (self.client, self.server) if way == "up" else (self.server, self.client)

    def carry(self, way: str, size: int, reset_after=None) -> None:
        """Send ``size`` bytes ``way`` and check what arrives; with ``reset_after``, the
        receiver resets after reading that many (the sender then meets the reset)."""
        src, dst = self.ends(way)
        data = payload(size, seed=self.rng.randrange(1 << 30))

        def send():
            try:
                src.sendall(data)
            except OSError:
                if reset_after is None:
                    raise
        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        n = size if reset_after is None else reset_after
        assert recv_exactly(dst, n) == data[:n], f"seed {self.seed}: bytes {way} differ"
        if reset_after is not None:
            reset(dst)
        sender.join(TIMEOUT)
        assert not sender.is_alive()

    def close(self) -> None:
        for sock in (self.client, self.server):
            sock.close()
        for name in self.toxics:
            self.fw.remove_toxic(name)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("bulk_threads", [0, 1])
def test_random_event_orders_end_each_direction_once(forwarders, checked_states, monkeypatch, bulk_threads):
    monkeypatch.setattr(forwarder_module, "_PARK_EVERY", 0.02)  # the forwarder's own passes too
    monkeypatch.setattr(offload_module, "LINGER_MS", 20)  # a lane holds a direction longer
    gate = Gate()
    with Server(gate) as upstream:
        fw = forwarders(upstream.address, buffer_size=SMALL_BUFFER, bulk_threads=bulk_threads)
        try:
            for seed in range(SCENARIOS):
                rng = random.Random(seed)
                scenario = Scenario(fw, gate, rng, seed)
                try:
                    if rng.random() < 0.5:  # half the connections meet a toxic at once
                        scenario.add_toxic("latency", latency=rng.choice([0, 1]))
                    for event in rng.choices(list(EVENTS), weights=list(EVENTS.values()), k=rng.randint(4, 20)):
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
    moves = {(old, new) for states in checked_states.checked for _d, old, new in states.moves}
    assert (relay.RUNNING, relay.CHAIN) in moves, "no pump ran a toxic chain"
    if forwarders.splice and bulk_threads:
        assert (relay.RUNNING, relay.LANE) in moves, "no bulk lane took a direction"
