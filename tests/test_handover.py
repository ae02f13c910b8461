"""Handover (issue 17 part 2): a new gproxy takes the running one's listening sockets over its
control socket (``control_socket``, ``gproxy --takeover PATH``), starts accepting, then the old
one stops accepting and drains. No client is refused or cut across restarts, also when the new
configuration differs, and the metrics port moves along instead of failing to bind."""

from __future__ import annotations

import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request

import gevent
import pytest

from gproxy import _handover as handover
from peers import TIMEOUT, Gate, Proxy, Server, connect, recv_all, recv_exactly
from test_configfile import ConfigProxy, first_byte, tagged

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_PEERCRED is Linux's")

QUIET = 1.5  # longer than the second after which a stop closes a connection at rest


def write(path, text: str) -> str:
    path.write_text(textwrap.dedent(text))
    return str(path)


def config(control: str, port: int, target: int, metrics: int) -> str:
    return f"""
        control_socket = "{control}"
        metrics = "127.0.0.1:{metrics}"

        [[rule]]
        name = "web"
        listen = "127.0.0.1:{port}"
        target = "127.0.0.1:{target}"
        drain_timeout = 1
        """


def free_ports(count: int) -> list:
    """Ports nobody listens on, all different (bound together, then closed)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class Taker(ConfigProxy):
    """``gproxy --takeover PATH -c FILE``: started, it has taken over (its rules listen)."""

    def __init__(self, control: str, path: str, count: int = 1):
        super().__init__(path, count, extra=("--takeover", control))


def wait_exit(proxy: Proxy) -> tuple:
    """The old process's exit status and log, once it has drained by itself (no signal)."""
    code = proxy.process.wait(TIMEOUT)
    _, output = proxy.stop()
    return code, output


@pytest.mark.timeout(120)
def test_a_restart_loop_under_load_refuses_and_cuts_nobody(tmp_path):
    control = str(tmp_path / "control.sock")
    port, metrics = free_ports(2)
    with Server(tagged(b"A")) as a, Server(tagged(b"B")) as b:
        path = tmp_path / "gproxy.toml"
        write(path, config(control, port, a.address[1], metrics))
        proxy = ConfigProxy(str(path), 1)
        started = [proxy]  # every process, killed at the end whatever happens
        errors, served, stop = [], {b"A": 0, b"B": 0}, threading.Event()

        def hammer():
            while not stop.is_set():
                try:
                    served[first_byte(("127.0.0.1", port))] += 1
                except (OSError, KeyError) as exc:
                    errors.append(exc)
        clients = [threading.Thread(target=hammer) for _ in range(4)]
        for client in clients:
            client.start()
        try:
            for turn in range(4):  # every takeover with a different target: the config changes
                target = (b, a)[turn % 2]
                write(path, config(control, port, target.address[1], metrics))
                before = dict(served)
                new = Taker(control, str(path))
                started.append(new)
                code, output = wait_exit(proxy)
                assert code == 0 and "Traceback" not in output, output
                assert "accepts on the listening sockets now: this process stops accepting" in output
                new.wait_for("took 3 listening socket(s) over from pid")
                tag = (b"B", b"A")[turn % 2]
                while served[tag] == before[tag]:  # the new target answers: the new process serves
                    assert not errors, errors[:3]
                    time.sleep(0.01)  # sleep-ok: lets the hammering threads run
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=TIMEOUT) as page:
                    assert b'gproxy_connections_total{rule="web"' in page.read()
                proxy = new
        finally:
            stop.set()
            for client in clients:
                client.join(TIMEOUT)
            code, output = proxy.stop()
            for process in started:
                process.kill()
        assert not errors, errors[:3]
        assert served[b"A"] > 0 and served[b"B"] > 0
        assert code == 0 and "Address already in use" not in output


def test_the_old_process_keeps_a_quiet_connection_until_its_peers_end_it(tmp_path):
    control = str(tmp_path / "control.sock")
    port, metrics = free_ports(2)
    gate = Gate()
    with Server(gate) as held, Server(tagged(b"N")) as new_target:
        path = tmp_path / "gproxy.toml"
        write(path, config(control, port, held.address[1], metrics))
        old = ConfigProxy(str(path), 1)
        try:
            client = connect(("127.0.0.1", port))
            server = gate.get()
            client.sendall(b"SELECT 1")
            assert recv_exactly(server, 8) == b"SELECT 1"
            server.sendall(b"1")  # the server spoke last: at rest, as a pooled connection is
            assert recv_exactly(client, 1) == b"1"

            write(path, config(control, port, new_target.address[1], metrics))
            with Taker(control, str(path)) as new:  # killed on leaving, whatever happens
                old.wait_for("rule web (127.0.0.1:%d) handed over to another process: it accepts there now; "
                             "1 connection(s) here drain until they end" % port)
                assert first_byte(("127.0.0.1", port)) == b"N"
                time.sleep(QUIET)  # sleep-ok: quiet longer than a stop would allow
                assert old.process.poll() is None  # still draining its one connection
                client.sendall(b"SELECT 2")
                assert recv_exactly(server, 8) == b"SELECT 2"
                server.sendall(b"2")
                assert recv_exactly(client, 1) == b"2"
                client.shutdown(socket.SHUT_WR)  # the peers end it, both ways
                assert server.recv(1) == b""
                server.shutdown(socket.SHUT_WR)
                assert recv_all(client) == b""
                code, output = wait_exit(old)
                assert code == 0, output
                assert "the 1 old connection(s) of a handover have ended" in output
                code, output = new.stop()
                assert code == 0, output
        finally:
            client.close()
            server.close()
            gate.release()
            old.kill()


def test_a_takeover_that_cannot_start_changes_nothing(tmp_path):
    control = str(tmp_path / "control.sock")
    port, metrics = free_ports(2)
    with Server(tagged(b"A")) as a, socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen(1)
        path = tmp_path / "gproxy.toml"
        write(path, config(control, port, a.address[1], metrics))
        with ConfigProxy(str(path), 1) as old:
            # the new configuration adds a rule on a port someone else holds: it cannot start
            write(path, config(control, port, a.address[1], metrics) + f"""
                [[rule]]
                name = "extra"
                listen = "127.0.0.1:{squatter.getsockname()[1]}"
                target = "127.0.0.1:{a.address[1]}"
                """)
            result = subprocess.run([sys.executable, "-m", "gproxy", "--takeover", control, "-c", str(path)],
                                    capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
            assert result.returncode == 1, result
            assert "address already in use" in result.stderr.splitlines()[-1], result.stderr
            old.wait_for("takeover through %s failed, nothing changed" % control)
            assert first_byte(("127.0.0.1", port)) == b"A"  # the old one serves on, as before
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=TIMEOUT):
                pass
            # and a later takeover still works
            write(path, config(control, port, a.address[1], metrics))
            with Taker(control, str(path)) as new:
                assert old.process.wait(TIMEOUT) == 0
                assert first_byte(("127.0.0.1", port)) == b"A"
                assert new.stop()[0] == 0


def test_the_control_socket_is_the_owners_alone_and_not_shared(tmp_path):
    control = str(tmp_path / "control.sock")
    port, metrics = free_ports(2)
    with Server(tagged(b"A")) as a:
        path = tmp_path / "gproxy.toml"
        write(path, config(control, port, a.address[1], metrics))
        with ConfigProxy(str(path), 1) as proxy:
            assert stat.S_IMODE(os.stat(control).st_mode) == 0o600
            other = tmp_path / "other.toml"
            write(other, config(control, 0, a.address[1], 0))
            result = subprocess.run([sys.executable, "-m", "gproxy", "-c", str(other)], capture_output=True,
                                    text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
            assert result.returncode == 1
            assert result.stderr.strip().splitlines()[-1] == (
                f"gproxy: error: cannot listen on {control} for takeovers: a running gproxy listens there "
                f"(take its sockets over with --takeover {control})")
            assert proxy.stop()[0] == 0


def test_taking_over_from_nobody_is_one_line_and_exit_1(tmp_path):
    missing = str(tmp_path / "nobody.sock")
    result = subprocess.run([sys.executable, "-m", "gproxy", "--takeover", missing, "127.0.0.1:0", "127.0.0.1:9"],
                            capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"gproxy: error: cannot take over from {missing}: No such file or directory"]


def test_a_single_rule_hands_over_too(tmp_path):
    control = str(tmp_path / "control.sock")
    with Server(tagged(b"A")) as a:
        with Proxy("--control-socket", control, "127.0.0.1:%d" % a.address[1]) as old:
            with Proxy("--control-socket", control, "--takeover", control, "127.0.0.1:%d" % a.address[1],
                       listen="%s:%d" % old.address) as new:
                assert new.seen[-1].endswith(", on a socket taken over")
                assert old.process.wait(TIMEOUT) == 0
                assert first_byte(new.address) == b"A"
                assert new.stop()[0] == 0


# -- the protocol -----------------------------------------------------------------------------


def test_more_sockets_than_one_message_carries_arrive_in_order(tmp_path):
    """SCM_RIGHTS carries at most 253 fds a message: 230 go in two, each the very same file."""
    path = str(tmp_path / "control.sock")
    pipes = [os.pipe() for _ in range(115)]
    fds = [fd for pair in pipes for fd in pair]
    offered = [handover.Offered("rule", f"r{i}", f"127.0.0.1:{i}", fd) for i, fd in enumerate(fds)]
    handed = []
    server = handover.ControlServer(path, lambda: offered, handed.append).start()
    try:
        taking = handover.take(path)
        try:
            assert [entry["name"] for entry in taking.sockets] == [o.name for o in offered]
            for entry, fd in zip(taking.sockets, fds):
                assert os.fstat(entry["fd"]).st_ino == os.fstat(fd).st_ino
                assert not os.get_inheritable(entry["fd"])
            assert taking.confirm() == os.getpid()
            gevent.sleep(0.01)  # sleep-ok: the server's greenlet calls handed_over after answering
            assert handed == [os.getpid()]
        finally:
            for entry in taking.sockets:
                os.close(entry["fd"])
    finally:
        server.close()
        for fd in fds:
            os.close(fd)


def test_a_rule_the_new_process_drops_closes_its_port(tmp_path):
    """A socket taken over is the new process's alone: when no rule takes it (at the takeover,
    or after a reload) it is closed, so its port refuses clients instead of queueing them."""
    control = str(tmp_path / "control.sock")
    port, gone, metrics = free_ports(3)
    with Server(tagged(b"A")) as a:
        path = tmp_path / "gproxy.toml"
        dropped_at_takeover = f"""
            [[rule]]
            name = "gone"
            listen = "127.0.0.1:{gone}"
            target = "127.0.0.1:{a.address[1]}"
            """
        write(path, config(control, port, a.address[1], metrics) + dropped_at_takeover)
        with ConfigProxy(str(path), 2) as old:
            write(path, config(control, port, a.address[1], metrics))
            with Taker(control, str(path)) as new:
                assert any("not taking over fd" in line and "'gone'" in line for line in new.seen), new.seen
                assert old.process.wait(TIMEOUT) == 0
                with pytest.raises(ConnectionRefusedError):
                    connect(("127.0.0.1", gone))
                # and after a reload that drops a rule whose socket was taken over
                write(path, config(control, 0, a.address[1], metrics).replace('name = "web"', 'name = "other"'))
                assert "1 removed" in new.reload()
                new.wait_for("stopping web")
                with pytest.raises(ConnectionRefusedError):
                    connect(("127.0.0.1", port))
                assert new.stop()[0] == 0


def received(manager) -> tuple:
    """The next datagram on a fake systemd's notify socket, with the sender's pid (SO_PASSCRED:
    systemd tells its processes apart the same way)."""
    message, ancillary, _, _ = manager.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("3i")))
    pids = [struct.unpack("3i", data)[0] for level, kind, data in ancillary
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS]
    return (pids[0] if pids else None), message


def test_under_systemd_the_new_process_becomes_the_main_one_and_the_old_one_falls_silent(tmp_path):
    """A takeover's new process tells systemd it is the main process now (MAINPID=, accepted with
    NotifyAccess=all): otherwise systemd takes the old one's exit, once drained, for the service's
    end and kills the new one. The old one, once it has handed over, sends nothing: a STOPPING=1
    from it, on a SIGTERM meant for it alone, would stop the whole service."""
    control = str(tmp_path / "control.sock")
    port, metrics = free_ports(2)
    gate = Gate()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager, Server(gate) as held:
        manager.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        manager.bind(str(tmp_path / "notify.sock"))
        manager.settimeout(TIMEOUT)
        env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock")}
        path = tmp_path / "gproxy.toml"
        write(path, config(control, port, held.address[1], metrics))
        old = ConfigProxy(str(path), 1, env=env)
        client = server = None
        try:
            assert received(manager) == (old.process.pid, b"READY=1")
            client = connect(("127.0.0.1", port))
            server = gate.get()  # the old process drains this one after the handover
            with ConfigProxy(str(path), 1, env=env, extra=("--takeover", control)) as new:
                pid = new.process.pid
                assert received(manager) == (pid, b"MAINPID=%d\nREADY=1" % pid)
                old.wait_for("1 connection(s) here drain until they end")
                old.signal(signal.SIGTERM)  # ends the old one's drain, not the service
                code, output = wait_exit(old)
                assert code == 0, output
                code, output = new.stop()
                assert code == 0, output
                assert received(manager) == (pid, b"STOPPING=1")  # nothing from the old one before it
        finally:
            for sock in (client, server):
                if sock is not None:
                    sock.close()
            gate.release()
            old.kill()
