"""Lines about a rule rather than a connection (a target down or up, a reload, a drain) name
their rule, and a JSON log carries it, the target and the event as fields of their own."""

from __future__ import annotations

import json
import logging
import signal
import textwrap
import threading

import pytest

import gproxy
from gproxy._jsonlog import JsonFormatter
from peers import TIMEOUT, Gate, Proxy, Server, connect, echo, free_port, recv_all, recv_exactly


class Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []
        self.changed = threading.Condition()
        self.setFormatter(JsonFormatter())

    def emit(self, record):
        with self.changed:
            self.records.append(record)
            self.changed.notify_all()

    def wait_for(self, text: str) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: any(text in r.getMessage() for r in self.records), TIMEOUT)

    def json(self, text: str) -> dict:
        """The one line whose message holds ``text``, as the JSON log writes it."""
        found = [r for r in self.records if text in r.getMessage()]
        assert len(found) == 1, [r.getMessage() for r in self.records]
        return json.loads(self.format(found[0]))


@pytest.fixture
def lines():
    handler = Lines()
    logger = logging.getLogger("gproxy")
    old = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old)


def round_trip(address) -> None:
    with connect(address) as client:
        client.sendall(b"ping")
        assert recv_exactly(client, 4) == b"ping"


def test_target_down_and_up_lines_carry_rule_and_target(forwarder_factory, lines):
    port = free_port()
    with Server(echo) as second:
        # fail_timeout 0: the down target is tried first again by the next client
        fw = forwarder_factory([("127.0.0.1", port), second.address], name="pg", fail_timeout=0)
        round_trip(fw.address)
        with Server(echo, address=("127.0.0.1", port)):
            round_trip(fw.address)
        forwarder_factory.wait_closed(fw, accepted=2)
    down = lines.json("is down")
    assert down["event"] == "target_down" and down["rule"] == "pg" and down["target"] == f"127.0.0.1:{port}"
    assert down["level"] == "WARNING" and down["fails"] == 1 and "refused" in down["error"], down
    up = lines.json("is up again")
    assert (up["event"], up["rule"], up["target"]) == ("target_up", "pg", f"127.0.0.1:{port}"), up


def test_the_drain_lines_name_the_rule(forwarder_factory, lines):
    gate = Gate()
    with Server(gate) as upstream:
        fw = forwarder_factory(upstream.address, name="pg")
        client = connect(fw.address)
        server = gate.get()
        client.sendall(b"busy")
        assert recv_exactly(server, 4) == b"busy"
        fw.stop(timeout=0.1)   # shorter than a connection at rest is given: the deadline ends it
        with pytest.raises(ConnectionResetError):   # aborted
            recv_all(client)
        client.close()
        server.close()
        gate.release()
    address = f"127.0.0.1:{fw.address[1]}"
    drain = lines.json("draining 1 connection(s)")
    assert (drain["event"], drain["rule"], drain["listen"], drain["connections"]) == ("drain", "pg", address, 1)
    deadline = lines.json("drain deadline")
    assert deadline["message"] == f"stopping pg ({address}): drain deadline (0.1s) hit: aborting 1 connection(s)"
    assert (deadline["event"], deadline["rule"], deadline["level"]) == ("drain_deadline", "pg", "WARNING")


def test_drain_timeout_none_waits_until_the_connections_end(forwarder_factory, lines):
    """``drain_timeout=None`` means for ever, as documented (it was a TypeError in the stop)."""
    gate = Gate()
    with Server(gate) as upstream:
        fw = forwarder_factory(upstream.address, drain_timeout=None)
        client = connect(fw.address)
        server = gate.get()
        stopper = threading.Thread(target=fw.stop)
        stopper.start()
        lines.wait_for("until they end")   # the stop has begun
        assert stopper.is_alive()
        client.sendall(b"still served")
        assert recv_exactly(server, 12) == b"still served"
        client.close()
        server.close()
        gate.release()
        stopper.join(TIMEOUT)
        assert not stopper.is_alive()
    drain = lines.json("until they end")
    assert drain["event"] == "drain" and "timeout" not in drain, drain   # None: no limit


def test_reload_lines_carry_the_file_and_the_rules(tmp_path, lines, no_errors_logged):
    with Server(echo) as upstream:
        rule = """
            [[rule]]
            name = "{name}"
            listen = "127.0.0.1:0"
            target = "127.0.0.1:{port}"
            idle_timeout = {idle}
            """
        path = tmp_path / "gproxy.toml"
        path.write_text(textwrap.dedent(rule.format(name="alpha", port=upstream.address[1], idle=60)
                                        + rule.format(name="gone", port=upstream.address[1], idle=60)))
        files = gproxy.load_config(str(path)).start()
        try:
            path.write_text(textwrap.dedent(rule.format(name="alpha", port=upstream.address[1], idle=30)
                                            + rule.format(name="beta", port=upstream.address[1], idle=60)))
            assert files.reload() is True
            path.write_text("[[rule]]\nname = 'alpha'\n")
            assert files.reload() is False
        finally:
            files.stop()
    reloaded = lines.json("reloaded ")
    assert reloaded["event"] == "reload" and reloaded["file"] == str(path)
    assert (reloaded["added"], reloaded["changed"], reloaded["removed"], reloaded["unchanged"]) == \
        (["beta"], ["alpha"], ["gone"], 0), reloaded
    failed = lines.json("reload failed")
    assert failed["event"] == "reload_failed" and failed["file"] == str(path) and "listen" in failed["error"]
    assert [r.getMessage() for r in no_errors_logged.records] == [failed["message"]]
    no_errors_logged.records.clear()   # the one ERROR this test means to cause


def test_json_event_lines_from_the_command_line():
    """End to end: ``--log-format json``, a target down, then SIGTERM past the drain deadline."""
    gate = Gate()
    dead = free_port()
    with Server(gate) as upstream:
        proxy = Proxy(argv=["--log-format", "json", "--drain-timeout", "0.1", "127.0.0.1:0",
                            f"127.0.0.1:{dead}", f"127.0.0.1:{upstream.address[1]}"])
        try:
            listening = json.loads(proxy.seen[-1])
            assert listening["event"] == "listening" and listening["listen"] == "%s:%d" % proxy.address
            client = connect(proxy.address)
            server = gate.get()
            down = json.loads(proxy.wait_for("is down"))
            assert (down["event"], down["target"], down["rule"]) == \
                ("target_down", f"127.0.0.1:{dead}", listening["rule"]), down
            proxy.signal(signal.SIGTERM)
            deadline = json.loads(proxy.wait_for("drain deadline"))
            assert deadline["event"] == "drain_deadline" and deadline["rule"] == listening["rule"]
            with pytest.raises(ConnectionResetError):
                recv_all(client)
            client.close()
            server.close()
        finally:
            gate.release()
            code, output = proxy.stop()
    assert code == 0, output
    assert all(json.loads(line) for line in output.splitlines())
