"""A client and a server exchanging requests and replies through one connection's toxic chain,
on the fake clock (tests/test_toxic_chain.py's), while toxics come and go: the property test of
the protocol toxics (gproxy/_protocol.py).

A protocol's test subclasses ``Exchange`` (how requests are written, how the server reads them
and replies, how the client reads the replies, the toxic's attributes) and calls ``check``:
every request gets its own reply or an answer, in order, and the server gets exactly the
requests not answered, whole and in order. The toxic starts acting only where the client
waits for nothing (``quiet``): that is its documented precondition.
"""

from __future__ import annotations

import random
from typing import List, Optional, Tuple

from gproxy._chain import _EOF
from gproxy.toxics import Toxics, make_toxic
from test_toxic_chain import Direction, FakeConn

UPSTREAM, DOWNSTREAM = 0, 1


class Exchange:
    toxic_type = ""

    # -- what a protocol's test says ---------------------------------------------------------

    def requests(self, rng: random.Random, count: int) -> List[Tuple[bytes, Optional[bytes]]]:
        """(bytes, id) per request; id None for filler that gets no reply."""
        raise NotImplementedError

    def server_read(self, data: bytes, pos: int) -> Optional[Tuple[Optional[bytes], int]]:
        """One whole request at ``pos``: (its id, or None for filler; where it ends), or None
        if it is not all there. Anything malformed fails the test (an assert)."""
        raise NotImplementedError

    def server_reply(self, ident: bytes) -> bytes:
        raise NotImplementedError

    def client_read(self, data: bytes) -> List[Optional[bytes]]:
        """The whole replies in ``data``, in order: the id a server's reply names, or None for
        an answer of the toxic; anything else (messages that are no reply) left out."""
        raise NotImplementedError

    def toxic_attributes(self, rng: random.Random) -> dict:
        raise NotImplementedError

    # -- the exchange --------------------------------------------------------------------------

    def __init__(self, seed: int):
        self.rng = rng = random.Random(seed)
        self.toxics = Toxics()
        self.conn = FakeConn()
        self.up = Direction(self.conn, UPSTREAM, self.toxics, seed * 2)
        self.down = Direction(self.conn, DOWNSTREAM, self.toxics, seed * 2 + 1)
        self.commands = self.requests(rng, rng.randint(20, 120))
        self.stream = b"".join(encoded for encoded, _ in self.commands)
        self.ends = [0]   # where each request ends in the stream
        for encoded, _ in self.commands:
            self.ends.append(self.ends[-1] + len(encoded))
        self.fed = 0
        self.parsed = 0            # what the server read of what it got
        self.received: List[bytes] = []   # the ids the server got
        self.out = bytearray()     # the server's replies not yet sent
        self.now, self.version, self.made = 0.0, 0, 0

    def quiet(self) -> bool:
        """Between requests with every reply in: where the toxic may start acting."""
        sent = sum(1 for i, (_e, ident) in enumerate(self.commands) if ident and self.ends[i + 1] <= self.fed)
        return (self.fed in self.ends and not self.out and self.parsed == len(self.up.got)
                and not self.up.link.held() and not self.down.link.held()
                and len(self.client_read(bytes(self.down.got))) == sent)

    def serve(self) -> None:
        got = bytes(self.up.got)
        while True:
            found = self.server_read(got, self.parsed)
            if found is None:
                return
            ident, self.parsed = found
            if ident is not None:
                self.received.append(ident)
                self.out += self.server_reply(ident)

    def run(self) -> None:
        for end in (self.up, self.down):
            end.run(self.now, self.version)
        self.serve()

    def step(self) -> None:
        rng, toxics = self.rng, self.toxics
        action = rng.random()
        if action < 0.35 and self.fed < len(self.stream):
            # like a client: mostly a request whole and then its reply; now and then a
            # pipeline, or a request cut anywhere
            if self.fed in self.ends and rng.random() < 0.7 and not self.quiet():
                return self.run()
            at = next(i for i, end in enumerate(self.ends) if end > self.fed) - 1   # the request it is in
            ahead = self.ends[min(at + rng.choice([1, 1, 1, 1, 1, 1, 2, 5]), len(self.commands))] - self.fed
            n = ahead if rng.random() < 0.8 else min(ahead, rng.choice([1, 1, 3, 17, 200, 5000, 70000]))
            self.up.feed(self.stream[self.fed:self.fed + n], self.now, self.version)
            self.fed = min(self.fed + n, len(self.stream))
        elif action < 0.6 and self.out:
            n = rng.choice([1, 2, 9, 100, len(self.out), len(self.out)])
            self.down.feed(bytes(self.out[:n]), self.now, self.version)
            del self.out[:n]
        elif action < 0.7:
            self.now += rng.choice([0.0, 0.001, 0.01, 0.1])
        elif action < 0.85:
            if rng.random() < 0.7:
                if self.quiet():
                    toxics.add(make_toxic(self.toxic_type, name=f"t{self.made}", stream="upstream",
                                          toxicity=rng.choice([1.0, 1.0, 0.5]),
                                          attributes=self.toxic_attributes(rng)))
                    self.made += 1
                    self.version += 1
            else:
                kind, attributes = other_toxic(rng)
                toxics.add(make_toxic(kind, name=f"t{self.made}", attributes=attributes,
                                      stream=rng.choice(["upstream", "downstream"])))
                self.made += 1
                self.version += 1
        elif action < 0.92:
            present = toxics.list()
            if present:
                toxic = rng.choice(present)
                if toxic.type == self.toxic_type:   # an update rolls again: it may start acting
                    changes = rng.choice([{"toxicity": 0.0}] + ([{"toxicity": 1.0}, self.toxic_attributes(rng)]
                                                                 if self.quiet() else []))
                else:
                    changes = {"toxicity": rng.choice([0.0, 1.0])}
                toxics.update(toxic.name, changes)
                self.version += 1
        elif action < 0.985:
            present = toxics.list()
            if present:
                toxics.remove(rng.choice(present).name)
                self.version += 1
        else:
            toxics.clear()
            self.version += 1
        self.run()

    def finish(self) -> None:
        self.up.feed(self.stream[self.fed:], self.now, self.version)
        self.fed = len(self.stream)
        self.up.feed(_EOF, self.now, self.version)
        self.toxics.clear()
        self.version += 1
        for _ in range(100_000):
            self.run()
            if self.out:
                self.down.feed(bytes(self.out), self.now, self.version)
                self.out.clear()
            if self.up.eof and not self.down.eof_sent and not self.out and self.parsed == len(self.up.got):
                self.down.feed(_EOF, self.now, self.version)
            if self.up.eof and self.down.eof:
                return
            self.now += 0.05
        raise AssertionError("the exchange never ended")

    def answered(self) -> int:
        return sum(1 for _e, ident in self.commands if ident) - len(self.received)


def other_toxic(rng: random.Random):
    kind = rng.choice(["latency", "slicer", "bandwidth"])
    if kind == "latency":
        return kind, {"latency": rng.choice([0, 5, 50])}
    if kind == "slicer":
        return kind, {"average_size": rng.randint(1, 30), "delay": rng.choice([0, 100])}
    return kind, {"rate": rng.choice([1, 100, 10_000])}


def check(kind, seed: int, steps: int = 400) -> Exchange:
    exchange = kind(seed)
    for _ in range(steps):
        exchange.step()
    exchange.finish()
    where = f"seed {seed}"
    assert exchange.conn.outcome is None, (where, exchange.conn.error)
    assert exchange.parsed == len(exchange.up.got), f"{where}: the server got the start of a request only"
    ids = [ident for _e, ident in exchange.commands if ident is not None]
    received = set(exchange.received)
    assert [i for i in ids if i in received] == exchange.received, f"{where}: the server got requests out of order"
    replies = exchange.client_read(bytes(exchange.down.got))
    assert len(replies) == len(ids), (where, len(replies), len(ids))
    for ident, reply in zip(ids, replies):
        assert reply == (ident if ident in received else None), (where, ident, reply)
    return exchange


def check_many(kind, seeds: range, answered_at_least: int) -> None:
    """``check`` each seed; and the property is only worth something if the toxic answered."""
    answered = sum(bool(check(kind, seed).answered()) for seed in seeds)
    assert answered >= answered_at_least, answered
