"""The toxic chain (``gproxy._chain.Link``) driven directly on a fake clock: no sockets, no hub, no
wall-clock time, so thousands of changes run in a second and every run can be replayed.

The property (DESIGN.md section 11): random add/update/remove/reset sequences over every kind of
toxic, applied while numbered words flow both ways, never lose, duplicate or reorder a byte. A
toxic that ends connections either fires (what arrived is then an in-order prefix, and the
connection ended) or gives back what it caught. Each run is one seed; a failure names it, and
``check(seed, may_fire)`` replays it.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from gproxy import Outcome
from gproxy._chain import _EOF, Link, _Marker
from gproxy.toxics import CLOSE, RESET, Delay, Toxics, make_toxic

UPSTREAM, DOWNSTREAM = 0, 1
STREAMS = ("upstream", "downstream")


class FakeConn:
    """What a Link asks of its connection: an id, a record for Python toxics, abort(), its
    links (the two halves of a protocol toxic meet through them) and a hub to wake a link on
    (noted in ``woken``: the fake clock runs both directions at every step anyway)."""

    id = 1

    def __init__(self):
        self.outcome = None
        self.error = None
        self.links = [None, None]
        self.woken = []
        self._hub = SimpleNamespace(loop=SimpleNamespace(run_callback=lambda f, *args: self.woken.append(args)))

    def kick(self, direction):
        pass

    def record(self):
        return SimpleNamespace(id=self.id)

    def abort(self, outcome, error=None):
        if self.outcome is None:
            self.outcome, self.error = outcome, error


class Direction:
    """One direction of the fake connection: its Link, the bytes put in, what came out."""

    def __init__(self, conn, direction, toxics, seed):
        self.conn = conn
        self.link = conn.links[direction] = Link(conn, direction, toxics, 0, random.Random(seed))
        self.sent = bytearray()
        self.got = bytearray()
        self.eof_sent = False
        self.eof = False   # the EOF was written: this direction's pump has ended

    def feed(self, data, now, version):
        """What the pump does with a read: the fast path while no toxic acts, else the chain."""
        self.sync(now, version)
        if data is _EOF:
            self.eof_sent = True
        else:
            self.sent += data
        if self.link.plain():
            if data is _EOF:
                self.eof = True
            else:
                self.got += data
        else:
            self.link.admit(data, now)
        self.run(now, version)

    def sync(self, now, version):
        if self.link.version != version:
            self.link.sync(version, now)

    def run(self, now, version):
        """Advance the chain to ``now`` and write what it released, as ``Link.pump`` does."""
        if self.eof or self.conn.outcome is not None:
            return None
        self.sync(now, version)
        soonest = self.link.advance(now)
        out = self.link.out
        while out:
            item = out.popleft()
            if item.__class__ is _Marker:
                self.link.out_size = 0
                if item is _EOF:
                    self.eof = True
                else:
                    self.conn.abort(Outcome.RESET if item.kind == "reset" else Outcome.CLOSED, item.reason)
                return None
            self.link.out_size -= len(item)
            self.got += item
        return soonest


def words(count: int, direction: int) -> bytes:
    return b"".join(b"%s%d," % (b"ud"[direction:direction + 1], i) for i in range(count))


def first_difference(sent: bytes, got: bytes) -> str:
    n = next((i for i, (a, b) in enumerate(zip(sent, got)) if a != b), min(len(sent), len(got)))
    return (f"{len(got)} of {len(sent)} bytes; first difference at byte {n}: "
            f"sent ...{bytes(sent[max(0, n - 20):n + 20])!r}, got ...{bytes(got[max(0, n - 20):n + 20])!r}")


# -- the toxics the property draws from ---------------------------------------------------------

def passing_toxic(rng: random.Random):
    """A toxic that passes every byte, in order, however late: (type or callable, attributes)."""
    kind = rng.choice(["latency", "bandwidth", "slicer", "slow_close", "tap", "copy", "delay",
                       "trigger", "per_connection", "redis_error", "http_response", "redis_delay",
                       "http_delay", "pg_error"])
    if kind == "latency":
        latency = rng.choice([0, 1, 20, 100])
        return kind, {"latency": latency, "jitter": rng.randint(0, latency)}
    if kind == "bandwidth":
        return kind, {"rate": rng.choice([0, 1, 10, 1000])}
    if kind == "slicer":
        average = rng.randint(1, 40)
        return kind, {"average_size": average, "size_variation": rng.randint(0, average - 1),
                      "delay": rng.choice([0, 100, 5000])}
    if kind == "slow_close":
        return kind, {"delay": rng.choice([0, 10, 300])}
    if kind == "tap":
        return (lambda chunk, record: None), {}
    if kind == "copy":   # each bytes-like type a Python toxic may return
        convert = rng.choice([bytes, bytearray, memoryview])
        return (lambda chunk, record: convert(chunk)), {}
    if kind == "trigger":   # a delay trigger acts as often as it likes: it only moves bytes later
        return kind, trigger_attributes(rng, "delay", fire=True)
    if kind == "per_connection":
        return per_connection_toxic(rng), {}
    if kind == "redis_error":   # words are no RESP: held until the EOF or its removal, then passed
        return kind, {"command": rng.choice(["", "GET"])}
    if kind == "http_response":   # nor HTTP: likewise
        return kind, {"path": rng.choice(["", "/x"]), "status": rng.choice([200, 503])}
    if kind == "redis_delay":   # likewise; a command it decides on passes later
        return kind, {"command": rng.choice(["", "GET"]), "delay": rng.choice([0, 5, 100])}
    if kind == "http_delay":
        return kind, {"path": rng.choice(["", "/x"]), "delay": rng.choice([0, 5, 100])}
    if kind == "pg_error":   # words start with u, no message type: it steps aside at once
        return kind, {"query": rng.choice(["", "u1"]), "code": "40001"}
    seconds, replace = rng.choice([0, 0.001, 0.05]), rng.random() < 0.5
    return (lambda chunk, record: Delay(seconds, bytearray(chunk) if replace else None)), {}


def trigger_attributes(rng: random.Random, action: str, fire: bool) -> dict:
    """A trigger's attributes, all of them (an update replaces them all, so match and
    after_bytes never meet); one that may not fire waits for what never comes."""
    attributes = {"action": action, "delay": rng.choice([0, 0, 5, 100]), "once": rng.random() < 0.6}
    if not fire:
        condition = rng.choice([{"match": "NEVER", "after_bytes": 0}, {"match": "", "after_bytes": 10 ** 12}])
    elif rng.random() < 0.5:   # words are u0,u1,... and d0,d1,...: these come, across any cut
        condition = {"match": rng.choice([r"[ud]1\d,", r"7,[ud]", r"[ud]\d*3\d,", r"(?<=9,)[ud]", r"5(?=,)"]),
                     "after_bytes": 0}
    else:
        condition = {"match": "", "after_bytes": rng.choice([0, 1, 77, 500, 2000])}
    if not attributes["once"] and not condition["match"] and not condition["after_bytes"]:
        condition["after_bytes"] = 1
    return {**attributes, **condition}


def per_connection_toxic(rng: random.Random):
    """A class: an instance per connection, counting its own chunks, that sees the EOF and
    passes it (maybe late, maybe with nothing before it)."""
    at_eof = rng.choice([None, b"", Delay(0), Delay(0.05)])

    class PerConnection:
        def __init__(self):
            self.chunks = 0

        def __call__(self, chunk, record):
            self.chunks += 1
            return Delay(0.001 * (self.chunks % 3))

        def eof(self, record):
            assert self.chunks >= 0
            return at_eof
    return PerConnection


def ending_toxic(rng: random.Random, may_fire: bool):
    """A toxic that ends connections: when it may not fire, it never gets the chance (it is
    removed or disarmed first, or its limit is out of reach)."""
    kind = rng.choice(["reset_peer", "limit_data", "timeout", "trigger"] +
                      (["python_end", "python_later"] if may_fire else []))
    if kind == "python_end":
        action, after = rng.choice([CLOSE, RESET]), rng.randint(1, 30)
        count = [0]

        def ender(chunk, record):
            count[0] += 1
            return action if count[0] >= after else None
        return ender, {}
    if kind == "python_later":   # passes the chunk, ends the connection a while later
        action, seconds, after = rng.choice([CLOSE, RESET]), rng.choice([0, 0.01, 0.2]), rng.randint(1, 30)
        count = [0]

        def later(chunk, record):
            count[0] += 1
            return Delay(seconds, None if count[0] % 2 else b"", action) if count[0] >= after else None
        return later, {}
    return kind, ending_attributes(kind, rng, may_fire)


def ending_attributes(kind: str, rng: random.Random, may_fire: bool) -> dict:
    if kind == "trigger":
        return trigger_attributes(rng, rng.choice(["reset", "close", "drop"]), may_fire)
    if kind == "limit_data":
        return {"bytes": rng.randint(0, 3000) if may_fire else 10 ** 12}
    if kind == "timeout":   # 0: never closes
        return {"timeout": rng.choice([0, 10, 200]) if may_fire else rng.choice([0, 10 ** 9])}
    return {"timeout": rng.choice([0, 10, 200]) if may_fire else 10 ** 9}   # reset_peer


def changed(toxic, rng: random.Random, may_fire: bool) -> dict:
    """Random changes for an update of ``toxic``: its toxicity, or its attributes."""
    if toxic.type == "python" or rng.random() < 0.4:
        return {"toxicity": rng.choice([0.0, 0.5, 1.0])}
    if toxic.type == "trigger":
        if toxic.attributes["action"] == "delay":
            return trigger_attributes(rng, "delay", fire=True)
        return ending_attributes(toxic.type, rng, may_fire)
    if toxic.type in ("reset_peer", "limit_data", "timeout"):
        return ending_attributes(toxic.type, rng, may_fire)
    while True:
        kind, attributes = passing_toxic(rng)
        if kind == toxic.type:
            return attributes


def is_subsequence(got: bytes, sent: bytes) -> bool:
    it = iter(sent)
    return all(byte in it for byte in got)


# -- the property ----------------------------------------------------------------------------------

def check(seed: int, may_fire: bool, steps: int = 300) -> None:
    rng = random.Random(seed)
    toxics = Toxics()
    conn = FakeConn()
    ends = [Direction(conn, d, toxics, seed * 2 + d) for d in (UPSTREAM, DOWNSTREAM)]
    streams = [words(rng.randint(50, 400), d) for d in (UPSTREAM, DOWNSTREAM)]
    fed = [0, 0]
    now, version, made = 0.0, 0, 0
    lossy = False   # a drop trigger that may fire was added: bytes may go missing, never out of order
    for _ in range(steps):
        action = rng.random()
        if action < 0.35:     # data (and, once a stream is all sent, its EOF)
            d = rng.randrange(2)
            end = ends[d]
            if not end.eof_sent and conn.outcome is None:
                if fed[d] < len(streams[d]):
                    n = rng.randint(1, 200)
                    end.feed(streams[d][fed[d]:fed[d] + n], now, version)
                    fed[d] += n
                elif rng.random() < 0.3:
                    end.feed(_EOF, now, version)
        elif action < 0.55:   # the clock
            now += rng.choice([0.0, 0.0005, 0.01, 0.05, 0.3])
        elif action < 0.75:   # add
            stream = rng.choice(STREAMS)
            kind, attributes = ending_toxic(rng, may_fire) if rng.random() < 0.3 else passing_toxic(rng)
            if kind in ("redis_error", "http_response", "redis_delay", "http_delay", "pg_error"):
                stream = "upstream"
            lossy = lossy or (may_fire and kind == "trigger")
            toxics.add(make_toxic(kind, name=f"t{made}", stream=stream,
                                  toxicity=rng.choice([1.0, 1.0, 0.5, 0.0]), attributes=attributes))
            made += 1
            version += 1
        elif action < 0.87:   # update
            present = toxics.list()
            if present:
                toxic = rng.choice(present)
                changes = changed(toxic, rng, may_fire)
                lossy = lossy or (may_fire and changes.get("action") == "drop")
                toxics.update(toxic.name, changes)
                version += 1
        elif action < 0.97:   # remove
            present = toxics.list()
            if present:
                toxics.remove(rng.choice(present).name)
                version += 1
        else:                 # reset: every toxic at once
            toxics.clear()
            version += 1
        if rng.random() < 0.5:  # the pumps notice a change at their next chunk, or later
            for end in ends:
                end.run(now, version)
    # The rest of the streams, with their EOFs; then every toxic goes and the chain drains.
    for d, end in enumerate(ends):
        if not end.eof_sent and conn.outcome is None:
            end.feed(streams[d][fed[d]:], now, version)
            end.feed(_EOF, now, version)
    toxics.clear()
    version += 1
    for _ in range(10_000):
        soonest = [end.run(now, version) for end in ends]
        if conn.outcome is not None or all(end.eof for end in ends):
            break
        now = min((t for t in soonest if t is not None), default=now + 1.0)
    for d, end in enumerate(ends):
        where = f"seed {seed}, may_fire={may_fire}, {STREAMS[d]}"
        if conn.outcome is None:
            assert end.eof, f"{where}: no EOF; {first_difference(end.sent, end.got)}"
            if lossy:
                assert is_subsequence(end.got, end.sent), \
                    f"{where}: out of order; {first_difference(end.sent, end.got)}"
            else:
                assert end.got == end.sent, f"{where}: {first_difference(end.sent, end.got)}"
        else:
            assert may_fire, f"{where}: ended by {conn.outcome}: {conn.error}"
            if lossy:
                assert is_subsequence(end.got, end.sent), \
                    f"{where}: out of order; {first_difference(end.sent, end.got)}"
            else:
                assert end.sent.startswith(end.got), \
                    f"{where}: not a prefix; {first_difference(end.sent, end.got)}"
    if conn.outcome is not None:
        assert conn.error and any(kind in conn.error for kind in
                                  ("timeout", "reset_peer", "limit_data", "Python", "trigger")), (seed, conn.error)
        assert conn.outcome in (Outcome.RESET, Outcome.CLOSED), (seed, conn.outcome)


@pytest.mark.parametrize("may_fire", [False, True], ids=["disarmed", "may-fire"])
def test_random_changes_never_lose_duplicate_or_reorder_a_byte(may_fire):
    for seed in range(300):
        check(seed, may_fire)


# -- the defects the property found, each on its own ------------------------------------------------

def chain_of(*specs, direction=DOWNSTREAM):
    """A Link on the fake clock through ``specs`` (type, attributes), added in order."""
    toxics = Toxics()
    for i, (kind, attributes) in enumerate(specs):
        toxics.add(make_toxic(kind, name=f"t{i}", stream=STREAMS[direction], attributes=attributes))
    end = Direction(FakeConn(), direction, toxics, 0)
    end.link.sync(0, 0.0)
    return toxics, end


def test_a_reset_hands_held_bytes_on_oldest_first_with_the_eof_last():
    """Two latencies of 300 ms: "old" has reached the second when "new" and the EOF enter the
    first. The reset removes both at once; the second's bytes are the older ones."""
    toxics, end = chain_of(("latency", {"latency": 300}), ("latency", {"latency": 300}))
    end.feed(b"old,", 0.0, 0)
    end.run(0.35, 0)
    end.feed(b"new,", 0.4, 0)
    end.feed(_EOF, 0.4, 0)
    assert end.got == b""
    toxics.clear()
    end.run(0.45, 1)
    assert end.got == b"old,new," and end.eof


def test_three_stages_removed_at_once_keep_order_into_a_kept_one():
    toxics, end = chain_of(("latency", {"latency": 100}), ("latency", {"latency": 100}),
                           ("latency", {"latency": 100}), ("timeout", {"timeout": 0}))
    for i, at in enumerate([0.0, 0.1, 0.2, 0.3]):
        end.feed(b"%d," % i, at, 0)   # 0 reaches the timeout; 1, 2, 3 sit one per latency
    end.run(0.3, 0)
    for name in ("t0", "t1", "t2"):
        toxics.remove(name)
    end.run(0.31, 1)
    assert end.got == b""          # the timeout still holds it all
    toxics.remove("t3")
    end.run(0.32, 2)
    assert end.got == b"0,1,2,3,"


@pytest.mark.parametrize("how", ["removed", "disarmed"])
def test_reset_peer_gives_back_what_it_caught_when_it_goes_before_firing(how):
    toxics, end = chain_of(("reset_peer", {"timeout": 1000}))
    end.feed(b"request", 0.0, 0)
    end.run(0.5, 0)
    assert end.got == b"" and end.link.busy()
    if how == "removed":
        toxics.remove("t0")
    else:
        toxics.update("t0", {"toxicity": 0.0})
    end.run(0.6, 1)
    assert end.got == b"request" and end.conn.outcome is None
    end.feed(b" next", 2.0, 1)   # well past the old deadline: it never fires
    end.run(2.0, 1)
    assert end.got == b"request next" and end.conn.outcome is None


def test_reset_peer_left_in_place_fires_and_drops_what_it_caught():
    toxics, end = chain_of(("reset_peer", {"timeout": 1000}))
    end.feed(b"request", 0.0, 0)
    assert end.run(0.999, 0) == 1.0 and end.conn.outcome is None
    end.run(1.0, 0)
    assert end.got == b"" and end.conn.outcome is Outcome.RESET and "reset_peer" in end.conn.error


# -- triggers and Python toxics' ends, exactly -------------------------------------------------------

def test_a_match_cut_byte_by_byte_resets_right_after_its_last_byte():
    toxics, end = chain_of(("trigger", {"match": r"BO+M", "action": "reset"}))
    for i, byte in enumerate(b"xxBOOOOMyy"):
        end.feed(bytes([byte]), i * 0.01, 0)
    assert end.got == b"xxBOOOOM" and end.conn.outcome is Outcome.RESET
    assert "trigger toxic t0 matched 'BO+M'" in end.conn.error


def test_a_match_longer_than_the_window_is_not_found_across_chunks_but_one_within_it_is():
    from gproxy._trigger import WINDOW
    pattern = r"<a{%d}>" % (WINDOW - 1)   # WINDOW + 1 bytes: found however it is cut
    toxics, end = chain_of(("trigger", {"match": pattern, "action": "close"}))
    message = b"<" + b"a" * (WINDOW - 1) + b">"
    for i in range(0, len(message), 7):
        end.feed(message[i:i + 7], 0.0, 0)
    assert end.got == message and end.conn.outcome is Outcome.CLOSED
    toxics, end = chain_of(("trigger", {"match": r"<a{%d}>" % WINDOW, "action": "close"}))
    longer = b"<" + b"a" * WINDOW + b">"
    for i in range(len(longer)):   # byte by byte: one byte too long to be seen whole
        end.feed(longer[i:i + 1], 0.0, 0)
    assert end.got == longer and end.conn.outcome is None
    end.feed(longer, 0.0, 0)                                # within one chunk it is
    assert end.conn.outcome is Outcome.CLOSED


def test_reset_with_a_delay_lets_what_comes_meanwhile_pass_then_drops_the_rest():
    toxics, end = chain_of(("trigger", {"match": "GO", "action": "reset", "delay": 100}))
    end.feed(b"ready GO steady", 0.0, 0)
    end.feed(b" more", 0.05, 0)
    assert end.got == b"ready GO steady more" and end.conn.outcome is None
    assert end.run(0.099, 0) == 0.1
    end.feed(b" late", 0.1, 0)
    assert end.got == b"ready GO steady more" and end.conn.outcome is Outcome.RESET


def test_drop_is_a_black_hole_that_holds_the_eof_until_removed():
    toxics, end = chain_of(("trigger", {"after_bytes": 4, "action": "drop"}))
    end.feed(b"keepGONE", 0.0, 0)
    end.feed(b"gone too", 1.0, 0)
    end.feed(_EOF, 2.0, 0)
    assert end.got == b"keep" and not end.eof and end.conn.outcome is None and end.link.busy()
    toxics.remove("t0")
    end.run(3.0, 1)
    assert end.eof
    assert end.got == b"keep"


def test_delay_pauses_the_stream_at_each_point_when_not_once():
    toxics, end = chain_of(("trigger", {"after_bytes": 3, "action": "delay", "delay": 100, "once": False}))
    end.feed(b"abcdefg", 0.0, 0)
    assert end.got == b"abc"
    end.run(0.1, 0)
    assert end.got == b"abcdef"
    end.run(0.199, 0)
    assert end.got == b"abcdef"
    end.run(0.2, 0)
    assert end.got == b"abcdefg"


def test_once_acts_at_the_first_match_only_per_connection():
    toxics, end = chain_of(("trigger", {"match": "X", "action": "delay", "delay": 100}))
    end.feed(b"aXbXc", 0.0, 0)
    assert end.got == b"aX"
    end.run(0.1, 0)
    end.feed(b"X", 0.2, 0)
    assert end.got == b"aXbXcX"


def test_a_python_delay_with_an_action_passes_the_chunk_first():
    toxics, end = chain_of((lambda chunk, record: Delay(0, action=RESET) if chunk == b"last" else None, {}))
    end.feed(b"first,", 0.0, 0)
    end.feed(b"last", 0.0, 0)
    assert end.got == b"first,last" and end.conn.outcome is Outcome.RESET


def test_a_python_delay_with_an_action_and_empty_data_ends_later_dropping_only_what_comes_after():
    toxics, end = chain_of((lambda chunk, record: Delay(0.5, b"", CLOSE) if chunk == b"cue" else None, {}))
    end.feed(b"a,", 0.0, 0)
    end.feed(b"cue", 0.0, 0)
    end.feed(b"b,", 0.2, 0)
    assert end.got == b"a,b," and end.conn.outcome is None
    end.feed(b"c,", 0.5, 0)
    assert end.got == b"a,b," and end.conn.outcome is Outcome.CLOSED


def test_a_python_toxic_sees_the_eof_and_may_write_before_it_or_replace_it():
    class Framer:
        """A class: one instance per connection."""
        made = 0

        def __init__(self):
            Framer.made += 1
            self.total = 0

        def __call__(self, chunk, record):
            self.total += len(chunk)

        def eof(self, record):
            return b"<%d bytes>" % self.total

    toxics, end = chain_of((Framer, {}))
    end.feed(b"abc", 0.0, 0)
    end.feed(b"de", 0.0, 0)
    end.feed(_EOF, 0.0, 0)
    assert end.got == b"abcde<5 bytes>" and end.eof and Framer.made == 1
    toxics, end = chain_of((type("Cut", (), {"__call__": lambda self, c, r: None,
                                              "eof": lambda self, r: RESET}), {}))
    end.feed(b"abc", 0.0, 0)
    end.feed(_EOF, 0.0, 0)
    assert end.got == b"abc" and not end.eof and end.conn.outcome is Outcome.RESET
