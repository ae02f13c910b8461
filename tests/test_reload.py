"""A reload leaves open connections alone (issue 17 part 1): those of a changed or removed rule
run on, on the old forwarder, until their peers end them, bounded only by an explicit
``reload_drain_timeout``; ``drain_timeout`` stays what SIGTERM gives them. Run in-process
(``gproxy.load_config``) and as operators run it (``gproxy -c FILE``, SIGHUP, SIGTERM)."""

from __future__ import annotations

import logging
import socket
import textwrap
import threading
import time

import pytest

import gproxy
from gproxy.forwarder import State
from peers import TIMEOUT, Gate, Server, connect, echo, recv_all, recv_exactly
from test_configfile import ConfigProxy, first_byte, tagged

#: longer than the one second after which a stop closes a connection at rest
QUIET = 1.5


def write(path, text: str) -> str:
    path.write_text(textwrap.dedent(text))
    return str(path)


class Lines(logging.Handler):
    """The gproxy loggers' messages, which a test waits for: forwarders log from their hub's
    thread, after the event the test caused."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []
        self.changed = threading.Condition()

    def emit(self, record):
        with self.changed:
            self.messages.append(record.getMessage())
            self.changed.notify_all()

    def wait_for(self, text: str, timeout: float = TIMEOUT) -> str:
        with self.changed:
            found = self.changed.wait_for(lambda: [m for m in self.messages if text in m], timeout)
        assert found, f"no line with {text!r}; saw {self.messages}"
        return found[0]

    def having(self, text: str) -> list:
        with self.changed:
            return [m for m in self.messages if text in m]


@pytest.fixture
def lines():
    handler = Lines()
    logger = logging.getLogger("gproxy")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def pooled(client: socket.socket, server: socket.socket, request: bytes, answer: bytes) -> None:
    """One exchange on a pooled connection: the client asks, the server answers last (so the
    connection is at rest afterwards, the client's turn, as a pool leaves it)."""
    client.sendall(request)
    assert recv_exactly(server, len(request)) == request
    server.sendall(answer)
    assert recv_exactly(client, len(answer)) == answer


def end_by_peers(client: socket.socket, server: socket.socket) -> None:
    """The peers end the connection themselves: the client half-closes, the server answers
    its last bytes and closes; every byte arrives."""
    client.shutdown(socket.SHUT_WR)
    assert server.recv(1) == b""
    server.sendall(b"bye")
    server.shutdown(socket.SHUT_WR)
    assert recv_all(client) == b"bye"


def listening_inodes(port: int) -> set:
    """The kernel's inode numbers of the sockets listening on 127.0.0.1:port: the same number
    before and after a reload means the same socket, never closed and bound again."""
    inodes = set()
    with open("/proc/net/tcp") as table:
        next(table)
        for row in table:
            fields = row.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and local == f"0100007F:{port:04X}":
                inodes.add(inode)
    return inodes


RULE = """
    {settings}
    [[rule]]
    name = "db"
    listen = "127.0.0.1:{port}"
    target = "127.0.0.1:{target}"
    drain_timeout = 1
    """


# -- in a program ------------------------------------------------------------------------------


def test_a_quiet_pooled_connection_survives_a_reload_that_changes_its_rule(tmp_path, lines):
    gate = Gate()
    with Server(gate) as old_target, Server(tagged(b"N")) as new_target:
        path = tmp_path / "gproxy.toml"
        write(path, RULE.format(settings="", port=0, target=old_target.address[1]))
        files = gproxy.load_config(str(path)).start()
        try:
            port = files["db"].address[1]
            inodes = listening_inodes(port)
            client = connect(files["db"].address)
            server = gate.get()
            pooled(client, server, b"SELECT 1", b"1")
            old = files["db"]

            write(path, RULE.format(settings="", port=port, target=new_target.address[1]))
            assert files.reload()
            assert files["db"] is not old
            line = lines.wait_for("rule db (127.0.0.1:%d) changed" % port)
            assert line == ("rule db (127.0.0.1:%d) changed: new connections use the new settings; "
                            "1 old connection(s) drain until they end" % port)
            assert not lines.having("stopping")  # the port did not close
            assert listening_inodes(port) == inodes  # targets changed: the same listener serves on

            time.sleep(QUIET)  # sleep-ok: a pooled connection is quiet longer than a stop allows
            pooled(client, server, b"SELECT 2", b"2")  # still there, both ways
            stats = files.statistics()  # the old connection is counted while it drains, once
            assert (stats.active, stats.accepted, stats.bytes_upstream) == (1, 1, 16), stats
            assert first_byte(files["db"].address) == b"N"  # new clients get the new target

            end_by_peers(client, server)
            lines.wait_for("the 1 old connection(s) of a reload have ended")
            closed = lines.wait_for("127.0.0.1:%d eof" % old_target.address[1])
            assert closed.endswith("up 16 B, down 5 B")  # SELECT 1, SELECT 2; 1, 2, bye: every byte
            client.close()
            server.close()
        finally:
            gate.release()
            files.stop()


def test_a_removed_rules_connections_run_on_while_its_port_closes(tmp_path, lines):
    gate = Gate()
    with Server(gate) as target, Server(echo) as other:
        path = tmp_path / "gproxy.toml"
        text = RULE.format(settings="", port=0, target=target.address[1])
        write(path, text + RULE.replace('"db"', '"other"').format(settings="", port=0, target=other.address[1]))
        files = gproxy.load_config(str(path)).start()
        try:
            address = files["db"].address
            client = connect(address)
            server = gate.get()
            pooled(client, server, b"GET", b"OK")
            write(path, RULE.replace('"db"', '"other"').format(settings="", port=0, target=other.address[1]))
            assert files.reload()
            assert "db" not in list(files)
            lines.wait_for("stopping db (127.0.0.1:%d): draining 1 connection(s) until they end" % address[1])
            with pytest.raises(ConnectionRefusedError):
                connect(address)
            time.sleep(QUIET)  # sleep-ok: quiet longer than a stop allows
            pooled(client, server, b"GET", b"OK")
            end_by_peers(client, server)
            lines.wait_for("the 1 old connection(s) of a reload have ended")
            client.close()
            server.close()
        finally:
            gate.release()
            files.stop()


def test_reload_drain_timeout_cuts_old_connections_when_set(tmp_path, lines):
    gate = Gate()
    with Server(gate) as old_target, Server(tagged(b"N")) as new_target:
        path = tmp_path / "gproxy.toml"
        write(path, RULE.format(settings="", port=0, target=old_target.address[1]))
        files = gproxy.load_config(str(path)).start()
        try:
            port = files["db"].address[1]
            client = connect(files["db"].address)
            server = gate.get()
            pooled(client, server, b"PING", b"PONG")
            client.sendall(b"SLOW")  # the client's turn is taken: not at rest, a long answer comes
            assert recv_exactly(server, 4) == b"SLOW"
            write(path, RULE.format(settings="reload_drain_timeout = 0.5", port=port,
                                    target=new_target.address[1]))
            reloaded = time.monotonic()
            assert files.reload()
            lines.wait_for("1 old connection(s) drain for up to 0.5s")
            with pytest.raises(ConnectionResetError):  # aborted, not closed cleanly
                client.recv(1)
            assert time.monotonic() - reloaded >= 0.5
            lines.wait_for("db (127.0.0.1:%d): reload drain deadline (0.5s) hit: aborting 1 old connection(s)"
                           % port)
            assert not lines.having("process-wide settings")  # a reload applies it
            client.close()
            server.close()
        finally:
            gate.release()
            files.stop()


def test_stop_ends_a_reloads_drain_with_drain_timeout(tmp_path, lines):
    """A reload's old connections drain without limit, but a stop (SIGTERM) gives them the rule's
    drain_timeout from then, and closes those at rest, like any other connection."""
    gate = Gate()
    with Server(gate) as old_target, Server(tagged(b"N")) as new_target:
        path = tmp_path / "gproxy.toml"
        write(path, RULE.format(settings="", port=0, target=old_target.address[1]))
        files = gproxy.load_config(str(path)).start()
        try:
            port = files["db"].address[1]
            client = connect(files["db"].address)
            server = gate.get()
            pooled(client, server, b"PING", b"PONG")
            write(path, RULE.format(settings="", port=port, target=new_target.address[1]))
            assert files.reload()
            lines.wait_for("1 old connection(s) drain until they end")
            time.sleep(QUIET)  # sleep-ok: quiet longer than a stop allows
            pooled(client, server, b"PING", b"PONG")
            stopping = time.monotonic()
            files.stop()
            assert time.monotonic() - stopping < TIMEOUT / 2
            lines.wait_for("stopping db (127.0.0.1:%d): draining 1 connection(s) of an earlier reload "
                           "for up to 1s" % port)
            assert recv_all(client) == b""  # at rest: closed with a FIN, not cut
        finally:
            client.close()
            server.close()
            gate.release()


def test_a_retiring_forwarder_keeps_a_quiet_connection_until_stopped(lines):
    gate = Gate()
    with Server(gate) as upstream:
        fw = gproxy.Forwarder("127.0.0.1:0", upstream.address, drain_timeout=TIMEOUT)
        fw.start()
        client = connect(fw.address)
        server = gate.get()
        try:
            pooled(client, server, b"a", b"b")
            retiring = threading.Thread(target=fw.retire)
            retiring.start()
            lines.wait_for("stopping 127.0.0.1:%d: draining 1 connection(s) until they end" % fw.address[1])
            with pytest.raises(ConnectionRefusedError):
                connect(fw.address)  # not accepting: no successor took the listener
            time.sleep(QUIET)  # sleep-ok: quiet longer than a stop allows
            assert retiring.is_alive()
            pooled(client, server, b"c", b"d")
            fw.stop()  # the drain becomes a stop's: at rest, closed
            retiring.join(TIMEOUT)
            assert not retiring.is_alive() and fw.state is State.STOPPED
            assert recv_all(client) == b""  # closed at rest with a FIN, long before TIMEOUT
        finally:
            client.close()
            server.close()
            gate.release()


# -- gproxy -c FILE, SIGHUP, SIGTERM --------------------------------------------------------


@pytest.mark.timeout(90)
def test_sighup_keeps_a_quiet_connection_and_sigterm_drains_it(tmp_path):
    gate = Gate()
    with Server(gate) as old_target, Server(tagged(b"N")) as new_target:
        path = tmp_path / "gproxy.toml"
        write(path, RULE.format(settings="", port=0, target=old_target.address[1]))
        with ConfigProxy(str(path), 1, extra=()) as proxy:
            address = proxy.rules["db"]
            inodes = listening_inodes(address[1])
            client = connect(address)
            server = gate.get()
            try:
                pooled(client, server, b"SELECT 1", b"1")
                write(path, RULE.format(settings="", port=address[1], target=new_target.address[1]))
                assert "1 changed" in proxy.reload()
                proxy.wait_for("rule db (127.0.0.1:%d) changed: new connections use the new settings; "
                               "1 old connection(s) drain until they end" % address[1])
                assert listening_inodes(address[1]) == inodes
                time.sleep(QUIET)  # sleep-ok: quiet longer than a stop allows
                pooled(client, server, b"SELECT 2", b"2")
                assert first_byte(address) == b"N"
                client.sendall(b"SLOW")  # not at rest: SIGTERM's drain_timeout (1 s) must end it
                assert recv_exactly(server, 4) == b"SLOW"
                stopping = time.monotonic()
                code, output = proxy.stop()
                assert code == 0, output
                assert time.monotonic() - stopping < 1 + 5, output
                assert "draining 1 connection(s) of an earlier reload for up to 1s" in output
                assert "drain deadline (1s) hit: aborting 1 connection(s)" in output
                assert f"stopping 127.0.0.1:{address[1]}" not in output and "Traceback" not in output
            finally:
                client.close()
                server.close()
                gate.release()


def test_a_bad_reload_drain_timeout_is_one_line_exit_2(tmp_path):
    import subprocess
    import sys
    path = write(tmp_path / "bad.toml",
                 'reload_drain_timeout = "10"\n' + RULE.format(settings="", port=0, target=9))
    result = subprocess.run([sys.executable, "-m", "gproxy", "--check", "-c", path], capture_output=True,
                            text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f'gproxy: error: {path}: reload_drain_timeout: expected a number of seconds >= 0, got "10" '
        "(numbers go without quotes)"]
