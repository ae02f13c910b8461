"""The protocol toxic that docs/toxics.md writes from scratch (``line_error``) works as written:
loaded from the docs (the only copy), registered for this test only, it answers a line protocol
on the fake clock and through a real forwarder, in order, and leaves the registry as it was."""

from __future__ import annotations

import sys
import types

import pytest

from doctext import DOCS_DIR, marked_block
from gproxy import _chain, toxics
from gproxy.toxics import Toxics, make_toxic
from peers import Server, connect, recv_exactly
from test_toxic_chain import Direction, FakeConn


@pytest.fixture
def line_error():
    """The guide's module, imported as gproxy._proto_line would be, for this test only."""
    block = marked_block(DOCS_DIR / "toxics.md", "_proto_line.py")
    assert block.info == "python"
    module = types.ModuleType("gproxy._proto_line")
    before = dict(_chain.BUILTIN)
    try:
        exec(compile(block.text, "docs/toxics.md (_proto_line.py)", "exec"), module.__dict__)
        assert list(_chain.BUILTIN) == list(before) + ["line_error"]
        toxics.TYPES["line_error"] = dict(_chain.BUILTIN["line_error"].attributes)
        sys.modules[module.__name__] = module
        yield module
    finally:
        _chain.BUILTIN.clear()
        _chain.BUILTIN.update(before)
        toxics.TYPES.pop("line_error", None)
        sys.modules.pop(module.__name__, None)


def test_the_guides_toxic_answers_in_order_on_the_fake_clock(line_error):
    toxics_ = Toxics()
    conn = FakeConn()
    up = Direction(conn, 0, toxics_, 1)
    down = Direction(conn, 1, toxics_, 2)
    toxics_.add(make_toxic("line_error", stream="upstream", attributes={"word": "fail", "reply": "NO"}))

    def run():
        for _ in range(3):
            up.run(0.0, 1)
            down.run(0.0, 1)
    for byte in b"get a\nFAIL b\nget c\n":   # one byte at a time
        up.feed(bytes([byte]), 0.0, 1)
        run()
    assert up.got == b"get a\n" and down.got == b""      # FAIL waits for get a's reply
    down.feed(b"a=1", 0.0, 1)
    run()
    assert up.got == b"get a\n"                          # half a reply: still waiting
    down.feed(b"\n", 0.0, 1)
    run()
    assert up.got == b"get a\nget c\n" and down.got == b"a=1\nNO\n"
    down.feed(b"c=3\n", 0.0, 1)
    run()
    assert down.got == b"a=1\nNO\nc=3\n"


def test_the_guides_toxic_through_a_forwarder(line_error, forwarder_factory):
    def serve(sock):
        pending = b""
        while True:
            data = sock.recv(4096)
            if not data:
                return
            pending += data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                sock.sendall(b"ok " + line + b"\n")

    with Server(serve) as upstream:
        fw = forwarder_factory(upstream.address)
        with pytest.raises(Exception, match="reply: must be one line"):
            fw.add_toxic("line_error", stream="upstream", reply="a\nb")
        fw.add_toxic("line_error", stream="upstream", word="drop", reply="REFUSED")
        with connect(fw.address) as client:
            client.sendall(b"one\ndrop table\ntwo\n")   # pipelined
            expected = b"ok one\nREFUSED\nok two\n"
            assert recv_exactly(client, len(expected)) == expected
