"""The ``pg_error`` toxic: the frontend/backend protocol parsed at every cut (and at random
cuts: a property), a property test on the fake clock (a client and a server exchanging simple
and extended queries through the chain while toxics come and go), and psycopg 3 against a real
PostgreSQL server started for this module.
"""

from __future__ import annotations

import glob
import os
import pwd
import random
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

from exchange import Exchange, check_many
from gproxy import ConfigError, toxics
from gproxy._proto_pg import STATEMENTS, PgReplies, PgRequests, error_response
from gproxy.toxics import Toxics, make_toxic
from peers import TIMEOUT, free_port
from test_api import address_of, api, create, server  # noqa: F401  (fixtures)
from test_proto_redis import request_events
from test_real_clients import need
from test_toxic_chain import Direction, FakeConn

UPSTREAM, DOWNSTREAM = 0, 1


# -- the wire, as a client and a server write it ---------------------------------------------------

def message(kind: bytes, body: bytes = b"") -> bytes:
    return kind + (len(body) + 4).to_bytes(4, "big") + body


def packet(code: int, body: bytes = b"") -> bytes:
    return (len(body) + 8).to_bytes(4, "big") + code.to_bytes(4, "big") + body


def query(sql: bytes) -> bytes:
    return message(b"Q", sql + b"\0")


def batch(sql: bytes, name: bytes = b"") -> bytes:
    """An extended-protocol batch as libpq writes one: Parse, Bind, Describe, Execute, Sync."""
    return (message(b"P", name + b"\0" + sql + b"\0\0\0") + bind(name)
            + message(b"D", b"P\0") + message(b"E", b"\0\0\0\0\0") + message(b"S"))


def bind(name: bytes) -> bytes:
    return message(b"B", b"\0" + name + b"\0\0\0\0\0\0\1\0\0")


SSL_REQUEST = packet(80877103)
STARTUP = packet(196608, b"user\0me\0database\0db\0\0")


def ready(status: bytes = b"I") -> bytes:
    return message(b"Z", status)


def complete(tag: bytes) -> bytes:
    return message(b"C", tag + b"\0")


# -- the parsers, cut everywhere ------------------------------------------------------------------

REQUESTS = (SSL_REQUEST + STARTUP
            + message(b"p", b"secret\0")                        # a password: no reply of its own
            + query(b"  select 1")
            + batch(b"UPDATE t SET a = 1", b"s1")
            + message(b"d", b"1\t2\n") + message(b"c")           # COPY data: none either
            + bind(b"s1") + message(b"E", b"\0\0\0\0\0") + message(b"S")   # a prepared statement
            + message(b"D", b"Ss1\0") + message(b"H") + message(b"S")    # no SQL to match
            + message(b"S")                                      # a lone Sync gets a ReadyForQuery
            + message(b"F", b"\0\0\0\1\0\0\0\0\0\0")             # a function call
            + packet(80877102, b"\0\0\0\1\0\0\0\2")               # a cancel request: none
            + message(b"X"))


def keys(events):
    return [(event[1], event[2]) for _o, event in events if event[0] == "key"]


def test_requests_parse_the_same_however_they_are_cut():
    whole = request_events([REQUESTS], PgRequests)
    assert keys(whole) == [(None, "byte"), (None, "messages"), (b"  select 1", "messages"),
                           (b"UPDATE t SET a = 1", "messages"), (b"UPDATE t SET a = 1", "messages"),
                           (None, "messages"), (None, "messages"), (None, "messages")]
    assert [event[0] for _o, event in whole].count("end") == 13
    assert all(event[0] != "off" for _o, event in whole)
    for cut in range(len(REQUESTS)):
        assert request_events([REQUESTS[:cut], REQUESTS[cut:]], PgRequests) == whole, cut
    assert request_events([REQUESTS[i:i + 1] for i in range(len(REQUESTS))], PgRequests) == whole


@pytest.mark.parametrize("seed", range(200))
def test_random_cuts_parse_the_same(seed):
    rng = random.Random(seed)
    stream = b"".join(rng.choice([query(b"select %d" % rng.getrandbits(20)), batch(b"update x"),
                                  query(b"x" * rng.choice([0, 10, 5000, 9000])), message(b"d", b"z" * 300),
                                  batch(b"select 'long'" + b" " * 6000), message(b"S")])
                      for _ in range(rng.randint(1, 30)))
    whole = request_events([stream], PgRequests)
    cuts = sorted(rng.sample(range(len(stream) + 1), min(len(stream), rng.randint(1, 60))))
    chunks = [stream[a:b] for a, b in zip([0] + cuts, cuts + [len(stream)])]
    assert request_events(chunks, PgRequests) == whole


def test_a_long_query_is_decided_on_its_first_4_kib_not_held_whole():
    sql = b"SELECT '" + b"x" * 100_000 + b"'"
    [(offset, key), (end, _end)] = request_events([query(sql)], PgRequests)
    assert key[1] == sql[:4096] and offset == 5 + 4096 and end == len(query(sql))


def test_named_statements_are_remembered_to_a_bound():
    parser = PgRequests()
    stream = b"".join(batch(b"select %d" % i, b"s%d" % i) for i in range(STATEMENTS + 10)) + query(b"x")
    position = 0
    while position < len(stream):
        position, _events = parser.feed(stream, position)
    assert len(parser.statements) == STATEMENTS
    assert b"s9" not in parser.statements and parser.statements[b"s10"] == b"select 10"


@pytest.mark.parametrize("garbage", [
    b"\x16\x03\x01\x00\xa5\x01\x00",        # a TLS ClientHello, where a message should be
    message(b"Q")[:1] + b"\0\0\0\3",        # a length below its own size
    (20_000).to_bytes(4, "big") + b"\0\3\0\0",   # a startup packet beyond PostgreSQL's limit
    message(b"P", b"\0x\0\0\0") + query(b"select 1"),   # a Query inside a batch
    b"GET / HTTP/1.1\r\n"])
def test_what_is_not_this_protocol_turns_the_parser_off(garbage):
    events = request_events([garbage], PgRequests)
    assert events and events[-1][1] == ("off",)


REPLIES = (b"N"                                                  # no to SSLRequest
           + message(b"R", b"\0\0\0\0") + message(b"S", b"a\0b\0") + message(b"K", b"\0" * 8) + ready()
           + message(b"T", b"\0\0") + message(b"N", b"SNOTICE\0\0") + complete(b"SELECT 0") + ready(b"T")
           + message(b"1") + message(b"2") + message(b"E", b"C40001\0\0") + ready(b"E")
           + message(b"A", b"\0\0\0\1c\0p\0"))                   # a notification: no reply


def test_replies_count_the_same_however_they_are_cut():
    def count(chunks):
        counter = PgReplies(__import__("collections").deque(["byte", "messages", "messages", "messages"]))
        total = sum(counter.feed(chunk) for chunk in chunks)
        return total, counter.between(), counter.status
    assert count([REPLIES]) == (4, True, b"E")
    for cut in range(1, len(REPLIES)):
        assert count([REPLIES[:cut], REPLIES[cut:]]) == (4, True, b"E"), cut
    assert count([REPLIES[i:i + 1] for i in range(len(REPLIES))]) == (4, True, b"E")


# -- the property: a client and a server through the chain, toxics changing ----------------------------

class PgExchange(Exchange):
    """Queries carry their id in their SQL (``SELECT id``), simple or extended; the server
    answers each with a CommandComplete naming it, now and then after a notice, and a
    ReadyForQuery."""

    toxic_type = "pg_error"

    def requests(self, rng, count):
        made = []
        for i in range(count):
            shape = rng.random()
            if shape < 0.08:
                made.append((message(b"d", b"row\n" * rng.randint(0, 50)), None))
                continue
            ident = b"%d" % i
            sql = rng.choice([b"SELECT ", b"select ", b"  Select "]) + ident
            if rng.random() < 0.05:
                sql += b" -- " + b"x" * rng.choice([5000, 70_000])
            made.append((query(sql) if shape < 0.6 else batch(sql, rng.choice([b"", b"st"])), ident))
        return made

    def server_read(self, data, pos):
        ident = None
        while True:
            if len(data) < pos + 5:
                return None
            kind, length = data[pos:pos + 1], int.from_bytes(data[pos + 1:pos + 5], "big")
            end = pos + 1 + length
            if len(data) < end:
                return None
            body = data[pos + 5:end]
            if kind in (b"Q", b"P"):
                sql = body.split(b"\0")[0 if kind == b"Q" else 1]
                ident = sql.split()[1]
            else:
                assert kind in b"BDESd", (pos, data[pos:pos + 20])
            if kind in (b"Q", b"S", b"d"):
                return ident, end
            pos = end

    def server_reply(self, ident):
        reply = complete(b"SELECT " + ident) + ready(self.rng.choice([b"I", b"T"]))
        if self.rng.random() < 0.1:
            reply = message(b"N", b"SNOTICE\0Mhello\0\0") + reply
        return reply

    def client_read(self, data):
        replies, pos, current = [], 0, None
        while len(data) >= pos + 5:
            kind, length = data[pos:pos + 1], int.from_bytes(data[pos + 1:pos + 5], "big")
            end = pos + 1 + length
            if len(data) < end:
                break
            body = data[pos + 5:end]
            if kind == b"C":
                current = body[:-1].split()[1]
            elif kind == b"E":
                assert b"C40001\0" in body, body
                current = None
            elif kind == b"Z":
                replies.append(current)
            pos = end
        return replies

    def toxic_attributes(self, rng):
        return {"query": rng.choice(["", "SELECT 1", "select 2", ".*7", "SELECT 3\\b", "nothing"]),
                "code": "40001", "message": rng.choice(["", "could not serialize access"])}


def test_queries_answered_or_passed_always_line_up_with_their_replies():
    check_many(PgExchange, range(150), answered_at_least=60)


# -- each rule on its own, on the fake clock -------------------------------------------------------

def through(query_pattern: str = "UPDATE", **attributes):
    toxics_ = Toxics()
    conn = FakeConn()
    up = Direction(conn, UPSTREAM, toxics_, 1)
    down = Direction(conn, DOWNSTREAM, toxics_, 2)
    toxics_.add(make_toxic("pg_error", name="t", stream="upstream",
                           attributes={"query": query_pattern, "code": "40001", "message": "no", **attributes}))

    def run(version=1):
        for _ in range(3):
            up.run(0.0, version)
            down.run(0.0, version)
    return toxics_, up, down, run


def test_the_answer_reports_a_failed_transaction_when_the_server_was_in_one():
    _toxics, up, down, run = through()
    up.feed(query(b"BEGIN") + query(b"update t") + query(b"ROLLBACK") + query(b"update t"), 0.0, 1)
    run()
    assert up.got == query(b"BEGIN")
    down.feed(complete(b"BEGIN") + ready(b"T"), 0.0, 1)
    run()
    assert up.got == query(b"BEGIN") + query(b"ROLLBACK")
    down.feed(complete(b"ROLLBACK") + ready(b"I"), 0.0, 1)
    run()
    failed, idle = error_response("40001", "no", b"E"), error_response("40001", "no", b"I")
    assert down.got == complete(b"BEGIN") + ready(b"T") + failed + complete(b"ROLLBACK") + ready(b"I") + idle


def test_an_ssl_request_answered_n_goes_on_and_one_answered_s_turns_it_off():
    _toxics, up, down, run = through()
    up.feed(SSL_REQUEST, 0.0, 1)
    run()
    down.feed(b"N", 0.0, 1)
    up.feed(STARTUP, 0.0, 1)
    run()
    down.feed(message(b"R", b"\0\0\0\0") + ready(), 0.0, 1)
    up.feed(query(b"update t"), 0.0, 1)
    run()
    assert up.got == SSL_REQUEST + STARTUP and down.got.endswith(error_response("40001", "no"))

    _toxics, up, down, run = through()
    up.feed(SSL_REQUEST, 0.0, 1)
    run()
    down.feed(b"S", 0.0, 1)
    up.feed(b"\x16\x03\x01 update t", 0.0, 1)   # TLS from here: it passes, whatever it holds
    run()
    assert up.got == SSL_REQUEST + b"\x16\x03\x01 update t" and down.got == b"S"


def test_a_query_removed_before_it_was_read_whole_reaches_the_server_whole():
    toxics_, up, down, run = through()
    whole = query(b"UPDATE t SET a = '" + b"v" * 1000 + b"'")
    up.feed(whole[:500], 0.0, 1)
    run()
    assert up.got == b""
    toxics_.remove("t")
    run(2)
    up.feed(whole[500:], 0.0, 2)
    run(2)
    assert up.got == whole and down.got == b""


@pytest.mark.parametrize("attributes, culprit", [
    ({"code": "4001"}, "code: a SQLSTATE"),
    ({"code": "40001x"}, "code: a SQLSTATE"),
    ({"message": "a\0b"}, "message: must have no NUL character"),
    ({"query": "(unclosed"}, "query: not a regular expression"),
    ({"code": 40001}, "code: must be a string"),
])
def test_bad_pg_error_attributes_name_the_culprit(attributes, culprit):
    with pytest.raises(ConfigError) as info:
        make_toxic("pg_error", stream="upstream", attributes=attributes)
    assert f"toxic pg_error_upstream: {culprit}" in str(info.value)


def test_pg_error_is_for_the_upstream_stream_and_has_a_typed_helper():
    with pytest.raises(ConfigError, match="stream: must be 'upstream' for pg_error toxics"):
        make_toxic("pg_error", stream="downstream")
    spec = toxics.pg_error("update", "40001", "serialization failure")
    assert spec.type == "pg_error" and spec.stream == "upstream"
    assert spec.attributes == {"query": "update", "code": "40001", "message": "serialization failure"}


# -- real clients: psycopg 3 against PostgreSQL ---------------------------------------------------

def pg_tool(name: str) -> str:
    """A PostgreSQL server program: on PATH, or where Debian's postgresql package puts it."""
    found = shutil.which(name) or max(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), default=None)
    return found or need(name)


@pytest.fixture(scope="module")
def pg_port():
    """A PostgreSQL server of its own: trust authentication, its socket and data in a temporary
    directory, a free port on 127.0.0.1 (run as the postgres user when the tests run as root,
    which the server refuses)."""
    initdb, postgres = pg_tool("initdb"), pg_tool("postgres")
    base = Path(tempfile.mkdtemp(prefix="gproxy-pg-"))   # not under pytest's, which only root may enter
    user = None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root, and there is no postgres user to run the server as")
        os.chown(base, owner.pw_uid, owner.pw_gid)
        user = "postgres"
    data = base / "data"
    subprocess.run([initdb, "-D", str(data), "-A", "trust", "-U", "gproxy", "--no-sync", "-E", "UTF8"],
                   user=user, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)
    port = free_port()
    process = subprocess.Popen([postgres, "-D", str(data), "-p", str(port), "-k", str(base),
                                "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
                                "-c", "logging_collector=off"],
                               user=user, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for line in process.stderr:   # ready by its own word, not by sleeping
            if "ready to accept connections" in line:
                break
        else:
            pytest.fail(f"postgres exited with {process.wait()}")
        threading.Thread(target=process.stderr.read, daemon=True).start()
        yield port
    finally:
        process.terminate()
        process.wait(TIMEOUT)
        shutil.rmtree(base, ignore_errors=True)


def connect(port: int, **options):
    psycopg = pytest.importorskip("psycopg")
    return psycopg.connect(host="127.0.0.1", port=port, user="gproxy", dbname="postgres",
                           connect_timeout=int(TIMEOUT), **options)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("prepare", [False, True], ids=["simple", "extended"])
def test_psycopg_gets_the_sqlstate_and_the_session_goes_on(forwarder_factory, pg_port, prepare):
    import psycopg
    fw = forwarder_factory(("127.0.0.1", pg_port))
    with connect(pg_port, autocommit=True) as direct, connect(fw.address[1]) as app:
        direct.execute("CREATE TABLE IF NOT EXISTS accounts (id int PRIMARY KEY, n int)")
        direct.execute("TRUNCATE accounts")
        direct.execute("INSERT INTO accounts VALUES (1, 0)")
        # prepare=True: the extended protocol, and after the first, a Bind of a named statement
        execute = (lambda sql, *args: app.execute(sql, args, prepare=True)) if prepare else \
            (lambda sql, *args: app.execute(sql.replace("%s", str(args[0])) if args else sql))
        with fw.toxic(toxics.pg_error("update accounts", "40001", "could not serialize access")):
            for _ in range(3):
                with pytest.raises(psycopg.errors.SerializationFailure, match="could not serialize") as info:
                    execute("UPDATE accounts SET n = n + %s WHERE id = 1", 1)
                assert info.value.sqlstate == "40001"
                assert app.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
                app.rollback()
                assert execute("SELECT n FROM accounts WHERE id = %s", 1).fetchone() == (0,)   # not matched
                app.commit()
        execute("UPDATE accounts SET n = n + %s WHERE id = 1", 5)                # the toxic is gone
        app.commit()
        assert direct.execute("SELECT n FROM accounts").fetchone() == (5,)       # only that one arrived
        [record] = fw.connections()


@pytest.mark.timeout(60)
def test_admin_shutdown_to_every_query_with_autocommit(forwarder_factory, pg_port):
    import psycopg
    fw = forwarder_factory(("127.0.0.1", pg_port))
    with connect(fw.address[1], autocommit=True) as app:
        fw.add_toxic("pg_error", stream="upstream", code="57P01", message="terminating connection")
        with pytest.raises(psycopg.errors.AdminShutdown):
            app.execute("SELECT 1")
        assert app.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        fw.remove_toxic("pg_error_upstream")
        assert app.execute("SELECT 2").fetchone() == (2,)


@pytest.mark.timeout(60)
def test_a_pipeline_is_decided_by_its_first_statement(forwarder_factory, pg_port):
    """psycopg's pipeline mode sends its statements in one batch, up to one Sync: the first
    decides the batch (a failing first statement would make the server skip the rest too), a
    later one is not looked at (the documented limit)."""
    import psycopg
    fw = forwarder_factory(("127.0.0.1", pg_port))
    fw.add_toxic(toxics.pg_error(".*'fail'", "22012", "division by zero, said gproxy"))
    with connect(fw.address[1], autocommit=True) as app:
        with pytest.raises(psycopg.errors.DivisionByZero, match="said gproxy"):
            with app.pipeline():
                app.execute("SELECT 'fail'")
                app.execute("SELECT 2")
        with app.pipeline():
            first = app.execute("SELECT 1")
            second = app.execute("SELECT 'fail'")
        assert first.fetchone() == (1,) and second.fetchone() == ("fail",)
        assert app.execute("SELECT 3").fetchone() == (3,)


def test_psql_through_the_toxic(forwarder_factory, pg_port):
    psql = need("psql")
    fw = forwarder_factory(("127.0.0.1", pg_port))
    fw.add_toxic(toxics.pg_error("select 2", "40001", "injected"))
    done = subprocess.run([psql, "-h", "127.0.0.1", "-p", str(fw.address[1]), "-U", "gproxy", "-d", "postgres",
                           "-At", "-v", "ON_ERROR_STOP=0", "-c", "SELECT 1", "-c", "SELECT 2", "-c", "SELECT 3"],
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.stdout.split() == ["1", "3"] and "ERROR:  injected" in done.stderr


@pytest.mark.timeout(60)
def test_over_the_http_api(api, pg_port):  # noqa: F811  (the fixture, imported)
    """gproxy --api takes pg_error as toxiproxy's clients send it; psycopg gets the error."""
    import psycopg
    listen = create(api, "pg", ("127.0.0.1", pg_port))["listen"]
    status, answer = api.call("POST", "/proxies/pg/toxics", {"type": "pg_error", "stream": "upstream",
                                                            "attributes": {"code": "4000"}})
    assert status == 400 and "code: a SQLSTATE" in answer["error"], answer
    status, toxic = api.call("POST", "/proxies/pg/toxics", {"type": "pg_error", "stream": "upstream",
                                                            "attributes": {"query": "select 1", "code": "40P01"}})
    assert status == 200 and toxic["attributes"] == {"query": "select 1", "code": "40P01",
                                                     "message": "injected by gproxy"}, toxic
    with connect(address_of(listen)[1], autocommit=True) as app:
        with pytest.raises(psycopg.errors.DeadlockDetected, match="injected by gproxy"):
            app.execute("SELECT 1")
        assert app.execute("SELECT 2").fetchone() == (2,)
        assert api.call("DELETE", "/proxies/pg/toxics/pg_error_upstream")[0] == 204
        assert app.execute("SELECT 1").fetchone() == (1,)
