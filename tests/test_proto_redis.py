"""The ``redis_error`` toxic: RESP parsed at every cut, a property test on the fake clock (a client
and a server exchanging commands and replies through the chain while toxics come and go), and
real clients: redis-py against redis-server, and raw sockets that send one byte at a time.
"""

from __future__ import annotations

import socket

import pytest

from exchange import Exchange, check_many
from gproxy import ConfigError
from gproxy._chain import _EOF
from gproxy._proto_redis import RespReplies, RespRequests
from gproxy._protocol import EARLY
from gproxy.toxics import Toxics, make_toxic
from peers import TIMEOUT, recv_exactly, redis_server
from test_toxic_chain import Direction, FakeConn

UPSTREAM, DOWNSTREAM = 0, 1


# -- the parsers, cut everywhere --------------------------------------------------------------------

REQUESTS = (b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"             # an array of bulk strings
            b"PING\r\n"                                   # inline
            b"\r\n*0\r\n"                                 # filler: no reply
            b"*3\r\n$3\r\nset\r\n$1\r\nk\r\n$7\r\nhe\r\nllo\r\n"   # CRLF inside a value
            b"  client   reply  off\n"                    # inline, spaces, no CR
            b"*1\r\n$9\r\nSUBSCRIBE\r\n")


def request_events(chunks, parser_class=RespRequests):
    """(stream offset, event) for each event the parser finds in ``chunks``."""
    parser, events, offset = parser_class(), [], 0
    for chunk in chunks:
        position = 0
        while position < len(chunk):
            stop, found = parser.feed(chunk, position)
            offset += stop - position
            position = stop
            events.extend((offset, event) for event in found)
            if found and found[-1] == ("off",):
                return events
    return events


def test_requests_parse_the_same_however_they_are_cut():
    whole = request_events([REQUESTS])
    assert [(offset, event[0], event[1] if event[0] == "key" else None) for offset, event in whole] == [
        (20, "key", (b"GET", b"K")), (20, "end", None),
        (26, "key", (b"PING", None)), (26, "end", None),
        (28, "end", None), (32, "end", None),
        (52, "key", (b"SET", b"K")), (65, "end", None),
        (87, "key", (b"CLIENT", b"REPLY")), (87, "end", None),
        (106, "key", (b"SUBSCRIBE", None)), (106, "end", None)]
    assert [event[3] for _o, event in whole if event[0] == "key"] == [False, False, False, True, True]
    for cut in range(len(REQUESTS)):
        assert request_events([REQUESTS[:cut], REQUESTS[cut:]]) == whole, cut
    assert request_events([REQUESTS[i:i + 1] for i in range(len(REQUESTS))]) == whole


@pytest.mark.parametrize("garbage", [b"*x\r\n", b"*2\r\n+GET\r\n", b"*1\r\n$-5\r\n", b"*1\n", b"A" * 70_000,
                                     b"\x16\x03\x01\x00\xa5\x01\x00"])   # TLS: no line is coming
def test_what_is_not_resp_turns_the_parser_off(garbage):
    events = request_events([garbage])
    assert events and events[-1][1] == ("off",)


REPLIES = (b"+OK\r\n-ERR no\r\n:5\r\n$5\r\nhe\r\no\r\n$-1\r\n*-1\r\n*0\r\n"
           b"*2\r\n:1\r\n*1\r\n$0\r\n\r\n"
           b">2\r\n+invalidate\r\n+k\r\n"             # a push message: no reply
           b"%1\r\n+a\r\n|1\r\n+ttl\r\n:3\r\n:2\r\n"  # a map whose value carries an attribute
           b"_\r\n#t\r\n,1.5\r\n(12\r\n!3\r\nbad\r\n=7\r\ntxt:abc\r\n~1\r\n+s\r\n"
           b"|1\r\n+key\r\n+v\r\n:9\r\n")             # an attribute, then the reply it is about
REPLY_COUNT = 17


def test_replies_count_the_same_however_they_are_cut():
    def count(chunks):
        counter = RespReplies(None)
        total = 0
        for chunk in chunks:
            total += counter.feed(chunk)
        return total, counter.between()
    assert count([REPLIES]) == (REPLY_COUNT, True)
    for cut in range(1, len(REPLIES)):
        counter = RespReplies(None)
        first = counter.feed(REPLIES[:cut])
        assert first == count([REPLIES[:cut]])[0]
        assert first + counter.feed(REPLIES[cut:]) == REPLY_COUNT and counter.between(), cut
    assert count([REPLIES[i:i + 1] for i in range(len(REPLIES))]) == (REPLY_COUNT, True)


# -- the property: a client and a server through the chain, toxics changing ---------------------------

NAMES = [b"GET", b"SET", b"PING", b"INCR", b"del", b"Echo"]


class RedisExchange(Exchange):
    """Commands carry their id as their first argument; the server replies +id to each, and
    now and then sends a RESP3 push message between replies."""

    toxic_type = "redis_error"

    def requests(self, rng, count):
        commands = []
        for i in range(count):
            shape = rng.random()
            name = rng.choice(NAMES)
            if shape < 0.08:
                commands.append((rng.choice([b"\r\n", b"*0\r\n"]), None))
                continue
            ident = b"%d" % i
            if shape < 0.25:
                commands.append((name + b" " + ident + b"\r\n", ident))
                continue
            args = [name, ident]
            if rng.random() < 0.5:
                size = rng.choice([0, 3, 100, 2000]) if rng.random() < 0.99 else rng.randint(EARLY, 3 * EARLY)
                args.append((bytes(rng.getrandbits(8) for _ in range(64)) * (size // 64 + 1))[:size])
            commands.append((resp(*args), ident))
        return commands

    def server_read(self, data, pos):
        if pos >= len(data):
            return None
        if data[pos:pos + 1] != b"*":
            end = data.find(b"\n", pos)
            if end < 0:
                return None
            words = data[pos:end].split()
            return (words[1] if words else None), end + 1
        end = data.find(b"\r\n", pos)
        if end < 0:
            return None
        count, pos, args = int(data[pos + 1:end]), end + 2, []
        for _ in range(max(count, 0)):
            end = data.find(b"\r\n", pos)
            if end < 0:
                return None
            assert data[pos:pos + 1] == b"$", (pos, data[pos:pos + 20])
            size = int(data[pos + 1:end])
            if len(data) < end + 4 + size:
                return None
            args.append(data[end + 2:end + 2 + size])
            assert data[end + 2 + size:end + 4 + size] == b"\r\n"
            pos = end + 4 + size
        return (args[1] if args else None), pos

    def server_reply(self, ident):
        reply = b"+%s\r\n" % ident
        if self.rng.random() < 0.1:
            reply += b">2\r\n+invalidate\r\n+%d\r\n" % self.rng.randint(0, 99)
        return reply

    def client_read(self, data):
        replies, pos = [], 0
        while True:
            end = data.find(b"\r\n", pos)
            if end < 0:
                return replies
            if data[pos:pos + 1] == b">":
                for _ in range(int(data[pos + 1:end])):
                    end = data.find(b"\r\n", end + 2)
                    if end < 0:
                        return replies
            else:
                assert data[pos:pos + 1] in (b"+", b"-"), data[pos:pos + 30]
                replies.append(data[pos + 1:end] if data[pos:pos + 1] == b"+" else None)
            pos = end + 2

    def toxic_attributes(self, rng):
        return {"command": rng.choice(["", "GET", "set", "PING", "Echo", "GET 7", "INCR 12"]),
                "error": rng.choice(["ERR injected", "LOADING Redis is loading", "OOM no"])}


def test_commands_answered_or_passed_always_line_up_with_their_replies():
    check_many(RedisExchange, range(150), answered_at_least=60)


# -- each rule on its own, on the fake clock ----------------------------------------------------------

def through(command: str = "SET", **attributes):
    """A connection's two ends with one redis_error toxic (named t) on the fake clock."""
    toxics = Toxics()
    conn = FakeConn()
    up = Direction(conn, UPSTREAM, toxics, 1)
    down = Direction(conn, DOWNSTREAM, toxics, 2)
    toxics.add(make_toxic("redis_error", name="t", stream="upstream",
                          attributes={"command": command, "error": "ERR no", **attributes}))
    for end in (up, down):
        end.sync(0.0, 1)

    def run(version=1):
        for _ in range(3):   # each end runs after the other woke it
            up.run(0.0, version)
            down.run(0.0, version)
    return toxics, up, down, run


def resp(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def test_an_answer_waits_for_the_replies_to_the_commands_before_it():
    toxics, up, down, run = through()
    up.feed(resp(b"GET", b"a") + resp(b"SET", b"a", b"1") + resp(b"GET", b"b"), 0.0, 1)
    run()
    assert up.got == resp(b"GET", b"a") and down.got == b""   # SET and what follows wait
    down.feed(b"$1\r\nx", 0.0, 1)
    run()
    assert up.got == resp(b"GET", b"a") and down.got == b"$1\r\nx"   # a reply half way: not yet
    down.feed(b"\r\n", 0.0, 1)
    run()
    assert up.got == resp(b"GET", b"a") + resp(b"GET", b"b")
    assert down.got == b"$1\r\nx\r\n-ERR no\r\n"


def test_a_command_removed_before_it_was_read_whole_reaches_the_server_whole():
    toxics, up, down, run = through()
    command = resp(b"SET", b"k", b"v" * 1000)
    up.feed(command[:500], 0.0, 1)
    run()
    assert up.got == b""
    toxics.remove("t")
    run(2)
    up.feed(command[500:], 0.0, 2)
    run(2)
    assert up.got == command and down.got == b""


def test_a_toxic_removed_while_it_swallows_a_large_command_stays_until_its_end():
    toxics, up, down, run = through()
    command = resp(b"SET", b"k", b"v" * (3 * EARLY))
    up.feed(command[:EARLY + 100], 0.0, 1)
    run()
    assert down.got == b"-ERR no\r\n" and up.got == b""   # answered once EARLY bytes came
    toxics.remove("t")
    run(2)
    up.feed(command[EARLY + 100:-5], 0.0, 2)
    run(2)
    assert up.got == b"" and toxics.list() == []
    up.feed(command[-5:] + resp(b"PING"), 0.0, 2)
    run(2)
    assert up.got == resp(b"PING")   # the rest swallowed, then everything passes
    assert not any(stage.lingers() for stage in up.link.stages)
    assert up.link.version == -1 or not up.link.stages   # it asked to be synced away


def test_rolled_out_while_swallowing_it_finishes_that_command_first():
    toxics, up, down, run = through()
    command = resp(b"SET", b"k", b"v" * (2 * EARLY))
    up.feed(command[:EARLY], 0.0, 1)
    run()
    assert down.got == b"-ERR no\r\n"
    toxics.update("t", {"toxicity": 0.0})
    run(2)
    up.feed(command[EARLY:] + resp(b"SET", b"x", b"y"), 0.0, 2)
    run(2)
    assert up.got == resp(b"SET", b"x", b"y") and down.got == b"-ERR no\r\n"


def test_a_stream_that_ends_inside_a_command_passes_it_on():
    toxics, up, down, run = through()
    up.feed(resp(b"SET", b"k", b"v")[:10], 0.0, 1)
    up.feed(_EOF, 0.0, 1)
    run()
    assert up.got == resp(b"SET", b"k", b"v")[:10] and up.eof


@pytest.mark.parametrize("first", [b"*1\r\n$9\r\nSUBSCRIBE\r\n", b"garbage\x00\r\n*1\r\n+X\r\n"])
def test_after_a_mode_change_or_garbage_everything_passes(first):
    toxics, up, down, run = through("SET")
    up.feed(first, 0.0, 1)
    run()
    up.feed(resp(b"SET", b"k", b"v"), 0.0, 1)
    run()
    assert up.got == first + resp(b"SET", b"k", b"v") and down.got == b""


def test_what_cannot_start_a_command_passes_at_once_not_when_a_line_ends():
    """A TLS ClientHello has no line end: held, the client would wait for the server for ever."""
    toxics, up, down, run = through("")
    hello = b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03"
    up.feed(hello, 0.0, 1)
    run()
    assert up.got == hello


def test_more_replies_than_commands_turn_it_off_rather_than_answer_out_of_order():
    toxics, up, down, run = through()
    down.feed(b"+OK\r\n", 0.0, 1)   # a reply to a command sent before the toxic came
    run()
    up.feed(resp(b"SET", b"k", b"v"), 0.0, 1)
    run()
    assert up.got == resp(b"SET", b"k", b"v") and down.got == b"+OK\r\n"


def test_push_messages_are_not_replies():
    toxics, up, down, run = through()
    up.feed(resp(b"GET", b"a") + resp(b"SET", b"a", b"1"), 0.0, 1)
    run()
    down.feed(b">2\r\n+invalidate\r\n+a\r\n", 0.0, 1)
    run()
    assert down.got == b">2\r\n+invalidate\r\n+a\r\n"   # still waiting for GET's reply
    down.feed(b"$-1\r\n", 0.0, 1)
    run()
    assert down.got == b">2\r\n+invalidate\r\n+a\r\n$-1\r\n-ERR no\r\n"


@pytest.mark.parametrize("command, key, matches", [
    ("get", (b"GET", b"K"), True), ("GET", (b"GETSET", None), False), ("", (b"ANY", None), True),
    ("client setname", (b"CLIENT", b"SETNAME"), True), ("CLIENT SETNAME", (b"CLIENT", b"KILL"), False),
])
def test_command_matching(command, key, matches):
    toxics, up, down, run = through(command)
    stage = up.link.stages[0]
    assert (stage.answer(key) is not None) is matches


@pytest.mark.parametrize("attributes, culprit", [
    ({"error": "ERR a\r\nb"}, "error: must be one line"),
    ({"command": "CONFIG SET X"}, "command: a command name, or a name and its first argument"),
    ({"command": 5}, "command: must be a string"),
])
def test_bad_redis_error_attributes_name_the_culprit(attributes, culprit):
    with pytest.raises(ConfigError) as info:
        make_toxic("redis_error", stream="upstream", attributes=attributes)
    assert f"toxic redis_error_upstream: {culprit}" in str(info.value)


def test_redis_error_is_for_the_upstream_stream():
    with pytest.raises(ConfigError, match="stream: must be 'upstream' for redis_error toxics"):
        make_toxic("redis_error", stream="downstream")
    assert make_toxic("redis_error").stream == "upstream"  # given no stream, it takes its own


# -- real clients: redis-py against redis-server -------------------------------------------------------

@pytest.fixture
def redis_port():
    with redis_server() as port:
        yield port


def client(port: int, **options):
    redis = pytest.importorskip("redis")
    from redis.backoff import NoBackoff
    from redis.retry import Retry
    # no retries: redis-py 8 retries connection errors (LOADING is one) on a new connection
    return redis.Redis(port=port, socket_timeout=TIMEOUT, retry=Retry(NoBackoff(), 0), **options)


def calls(direct, command: str) -> int:
    """How many times redis-server ran ``command`` (INFO commandstats), asked directly."""
    return direct.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0)


def test_redis_py_gets_the_error_and_the_server_never_the_command(forwarder_factory, redis_port):
    import redis
    fw = forwarder_factory(("127.0.0.1", redis_port))
    direct = client(redis_port)
    app = client(fw.address[1])
    app.set("k", "before")                      # a pooled connection, idle when the toxic comes
    with fw.toxic("redis_error", stream="upstream", command="set", error="OOM command not allowed"):
        with pytest.raises(redis.exceptions.OutOfMemoryError, match="command not allowed"):
            app.set("k", "during")
        assert app.get("k") == b"before"       # other commands pass, on the same connection
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            app.set("k", "x" * (3 * EARLY))    # a large one is swallowed as it comes
        assert app.get("k") == b"before"
        [record] = fw.connections()
    assert calls(direct, "set") == 1
    app.set("k", "after")
    assert direct.get("k") == b"after" and [c.id for c in fw.connections()] == [record.id]
    app.close()
    direct.close()


@pytest.mark.parametrize("slice_it", [False, True], ids=["whole", "sliced-both-ways"])
def test_a_pipeline_gets_each_answer_in_its_place(forwarder_factory, redis_port, slice_it):
    import redis
    fw = forwarder_factory(("127.0.0.1", redis_port))
    direct = client(redis_port)
    app = client(fw.address[1])
    if slice_it:   # every command and reply cut into pieces of 1 to 3 bytes
        fw.add_toxic("slicer", stream="upstream", average_size=2, size_variation=1)
        fw.add_toxic("slicer", stream="downstream", average_size=2, size_variation=1)
    fw.add_toxic("redis_error", stream="upstream", command="GET", error="READONLY You can't write")
    pipe = app.pipeline(transaction=False)
    for i in range(50):
        pipe.set(f"k{i}", i).get(f"k{i}").incr("n")
    results = pipe.execute(raise_on_error=False)
    for i in range(50):
        ok, error, count = results[3 * i:3 * i + 3]
        assert ok is True and count == i + 1, (i, results[3 * i:3 * i + 3])
        assert isinstance(error, redis.exceptions.ReadOnlyError), error
    assert calls(direct, "get") == 0 and calls(direct, "set") == 50
    fw.reset()
    assert app.get("k49") == b"49"
    app.close()
    direct.close()


def test_loading_makes_redis_py_reconnect_and_every_connection_gets_it(forwarder_factory, redis_port):
    """LOADING is a ConnectionError to redis-py: with its retries it reconnects and asks again,
    and the toxic answers the new connection too (so a retry does not hide this toxic)."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
    fw = forwarder_factory(("127.0.0.1", redis_port))
    app = redis.Redis(port=fw.address[1], socket_timeout=TIMEOUT, retry=Retry(NoBackoff(), 2))
    with fw.toxic("redis_error", stream="upstream", command="ping", error="LOADING Redis is loading"):
        with pytest.raises(redis.exceptions.BusyLoadingError):
            app.ping()
        assert fw.statistics().accepted == 3   # the first try and two retries, each answered
    assert app.ping() is True
    app.close()


def test_one_byte_at_a_time_from_a_raw_socket(forwarder_factory, redis_port):
    fw = forwarder_factory(("127.0.0.1", redis_port))
    fw.add_toxic("redis_error", stream="upstream", command="", error="ERR every command")
    with socket.create_connection(fw.address, timeout=TIMEOUT) as sock:
        requests = resp(b"SET", b"a", b"1") + b"PING\r\n" + b"\r\n" + resp(b"GET", b"a")
        for byte in requests:
            sock.sendall(bytes([byte]))
        assert recv_exactly(sock, 3 * 20) == b"-ERR every command\r\n" * 3
        fw.reset()
        sock.sendall(b"PING\r\n")
        assert recv_exactly(sock, 7) == b"+PONG\r\n"


def test_an_idle_pooled_connection_is_answered_by_a_toxic_added_later(forwarder_factory, redis_port):
    import redis
    fw = forwarder_factory(("127.0.0.1", redis_port))
    app = client(fw.address[1])
    assert app.ping() is True
    fw.add_toxic("redis_error", name="boom", stream="upstream", command="PING", error="ERR boom")
    with pytest.raises(redis.exceptions.ResponseError, match="boom"):
        app.ping()
    fw.update_toxic("boom", toxicity=0.0)
    assert app.ping() is True
    fw.remove_toxic("boom")
    assert app.ping() is True and fw.statistics().accepted == 1
    app.close()
