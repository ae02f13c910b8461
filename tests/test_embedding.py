"""gproxy.Forwarder inside other programs, each test a subprocess script the way users write them."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import gproxy
from doctext import documents, fences
from gproxy import ConfigError, Outcome
from peers import TIMEOUT, Server, connect, echo, recv_all, recv_exactly

ROOT = Path(__file__).resolve().parent.parent

# A threaded echo server in plain blocking Python, for the scripts below.
ECHO_SERVER = '''
import socket, threading
def _echo(sock):
    with sock:
        while True:
            data = sock.recv(65536)
            if not data:
                break
            sock.sendall(data)
def echo_server():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    def accept():
        while True:
            sock, _ = listener.accept()
            threading.Thread(target=_echo, args=(sock,), daemon=True).start()
    threading.Thread(target=accept, daemon=True).start()
    return listener.getsockname()
def round_trip(address, data):
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
def os_threads():
    # threading's own count: /proc/self/task may still list a thread that join() saw finish
    import gevent.monkey
    if gevent.monkey.is_module_patched("threading"):
        return len(os.listdir("/proc/self/task"))  # patched: threading counts greenlets
    return threading.active_count()
def open_fds():
    return len(os.listdir("/proc/self/fd"))
import os
'''


def run_script(body: str, prelude: str = "") -> str:
    script = prelude + ECHO_SERVER + textwrap.dedent(body)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=TIMEOUT * 3, cwd=ROOT, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stdout.strip().endswith("OK"), result.stdout
    return result.stdout


PATCHED = "from gevent import monkey; monkey.patch_all()\n"


def test_patched_program_urllib_through_forwarder_to_threaded_http_server():
    run_script('''
        import http.server, threading, urllib.request
        import gproxy

        class Hello(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = b"hello " * 5000
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        threads = os_threads()
        with gproxy.Forwarder("127.0.0.1:0", server.server_address) as fw:
            assert os_threads() == threads, "patched: serves on the caller's hub, no OS thread"
            host, port = fw.address
            for _ in range(20):
                with urllib.request.urlopen(f"http://{host}:{port}/", timeout=10) as response:
                    assert response.read() == b"hello " * 5000
            stats = fw.statistics()
        assert stats.accepted == 20 and stats.bytes_downstream > 20 * 30000, stats
        server.shutdown()
        print("OK")
    ''', prelude=PATCHED)


def test_unpatched_program_plain_blocking_sockets():
    run_script('''
        import gevent.monkey
        import gproxy
        assert not gevent.monkey.is_module_patched("socket")
        target = echo_server()
        threads = os_threads()
        fw = gproxy.Forwarder("127.0.0.1:0", target)
        fw.start()
        assert os_threads() == threads + 1, "unpatched: a hub in a thread of its own"
        data = os.urandom(3_000_000)
        assert round_trip(fw.address, data) == data
        fw.stop()
        assert os_threads() == threads
        print("OK")
    ''')


def test_a_forwarders_thread_is_named_after_its_bound_address_or_its_name(forwarder_factory):
    import threading
    unnamed = forwarder_factory(("127.0.0.1", 1))
    named = forwarder_factory(("127.0.0.1", 1), name="web")
    names = [t.name for t in threading.enumerate() if t.name.startswith("gproxy ")]
    assert f"gproxy 127.0.0.1:{unnamed.address[1]}" in names, names
    assert "gproxy web" in names and "gproxy 127.0.0.1:0" not in names, names
    named.stop()
    assert "gproxy web" not in [t.name for t in threading.enumerate()]


@pytest.mark.parametrize("prelude", ["", PATCHED], ids=["unpatched", "patched"])
def test_many_forwarders_at_once_and_chained(prelude):
    run_script('''
        import threading
        import gproxy
        target = echo_server()
        forwarders = [gproxy.Forwarder("127.0.0.1:0", target).start() for _ in range(10)]
        # a chain: client -> chain[0] -> chain[1] -> chain[2] -> echo
        chain = []
        hop = target
        for _ in range(3):
            chain.insert(0, gproxy.Forwarder("127.0.0.1:0", hop).start())
            hop = chain[0].address
        failures = []
        def use(address, seed):
            data = bytes([seed]) * 200_000 + os.urandom(seed * 1000)
            if round_trip(address, data) != data:
                failures.append(address)
        clients = [threading.Thread(target=use, args=(fw.address, i)) for i, fw in enumerate(forwarders)]
        clients.append(threading.Thread(target=use, args=(chain[0].address, 99)))
        for c in clients: c.start()
        for c in clients: c.join()
        assert not failures, failures
        for fw in forwarders + chain:
            fw.stop()
        assert [fw.statistics().accepted for fw in forwarders] == [1] * 10
        assert [fw.statistics().accepted for fw in chain] == [1, 1, 1]
        print("OK")
    ''', prelude=prelude)


@pytest.mark.parametrize("prelude", ["", PATCHED], ids=["unpatched", "patched"])
def test_start_stop_cycles_leave_no_thread_greenlet_or_fd(prelude):
    run_script('''
        import gc, greenlet
        import gproxy
        target = echo_server()
        def greenlets():
            gc.collect()
            return sum(isinstance(o, greenlet.greenlet) for o in gc.get_objects())
        def cycle():
            with gproxy.Forwarder("127.0.0.1:0", target, idle_timeout=30) as fw:
                assert round_trip(fw.address, b"abc" * 1000) == b"abc" * 1000
        for _ in range(3):  # first uses create what lives for the process (the hub, a resolver)
            cycle()
        before = (os_threads(), open_fds(), greenlets())
        for _ in range(30):
            cycle()
        after = (os_threads(), open_fds(), greenlets())
        assert after[:2] == before[:2], (before, after)
        # greenlet frees the main greenlet of an exited thread lazily, so the last forwarder
        # thread's may still be counted: one at most, where a leak would show thirty
        assert after[2] - before[2] <= 1, (before, after)
        print("OK")
    ''', prelude=prelude)


def test_forwarder_api_contract(forwarder_factory):
    with pytest.raises(ConfigError) as bad:
        gproxy.Forwarder("127.0.0.1:0", "127.0.0.1:1", idle_timeout="soon")
    assert isinstance(bad.value, ValueError) and bad.value.field == "idle_timeout"
    with pytest.raises(TypeError, match="idle_timout"):  # keyword-only options: Python's own error
        gproxy.Forwarder("127.0.0.1:0", "127.0.0.1:1", idle_timout=3)
    with pytest.raises(ConfigError) as bad:
        no_such_port = 70000
        gproxy.Forwarder(("127.0.0.1", no_such_port), "127.0.0.1:1")
    assert bad.value.field == "listen"

    fw = gproxy.Forwarder("127.0.0.1:0", "127.0.0.1:1")
    with pytest.raises(RuntimeError):
        fw.address  # noqa: B018 (the property raises before start)
    fw.start()
    assert fw.address[0] == "127.0.0.1" and fw.address[1] > 0
    with pytest.raises(RuntimeError):
        fw.start()
    fw.stop()
    fw.stop()  # harmless
    with pytest.raises(RuntimeError):
        fw.start()


def test_port_in_use_raises_oserror_naming_the_address():
    with Server(echo) as taken:
        fw = gproxy.Forwarder(taken.address, "127.0.0.1:1")
        with pytest.raises(OSError, match="cannot listen on 127.0.0.1:%d: address already in use"
                           % taken.address[1]):
            fw.start()


def test_hooks_and_statistics(forwarder_factory):
    opened, closed = [], []
    with Server(echo) as upstream:
        fw = forwarder_factory(upstream.address, on_open=opened.append, on_close=closed.append)
        client = connect(fw.address)
        client.sendall(b"12345")
        assert recv_exactly(client, 5) == b"12345"
        live = fw.statistics()
        assert (live.active, live.accepted, live.bytes_upstream, live.bytes_downstream) == (1, 1, 5, 5)
        client.shutdown(1)
        assert recv_all(client) == b""
        client.close()
        done = forwarder_factory.wait_closed(fw, accepted=1)
    assert (done.active, done.bytes_upstream, done.bytes_downstream) == (0, 5, 5)
    assert opened[0].outcome is None and opened[0].id == closed[0].id
    assert closed[0].outcome is Outcome.EOF and closed[0].duration >= 0
    assert (closed[0].bytes_upstream, closed[0].bytes_downstream) == (5, 5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        done.active = 3  # a snapshot is immutable


def test_a_failing_hook_is_logged_not_fatal(forwarder_factory, caplog, no_errors_logged):
    def broken(record):
        raise RuntimeError("hook bug")

    with Server(echo) as upstream:
        fw = forwarder_factory(upstream.address, on_open=broken)
        client = connect(fw.address)
        client.sendall(b"ok")
        assert recv_exactly(client, 2) == b"ok"
        client.close()
        forwarder_factory.wait_closed(fw, accepted=1)
    assert any("hook bug" in r.exc_text or "hook" in r.getMessage() for r in no_errors_logged.records)
    no_errors_logged.records.clear()  # the error was expected


def test_pytest_plugin_fixture(tmp_path):
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["gproxy.testing"]\n')
    (tmp_path / "test_user.py").write_text(textwrap.dedent('''
        import socket, threading
        def test_through_proxy(gproxy_forwarder):
            listener = socket.socket()
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            def serve():
                sock, _ = listener.accept()
                sock.sendall(sock.recv(100).upper())
                sock.close()
            threading.Thread(target=serve, daemon=True).start()
            fw = gproxy_forwarder(listener.getsockname())
            with socket.create_connection(fw.address, timeout=10) as client:
                client.sendall(b"hello")
                assert client.recv(100) == b"HELLO"
            assert fw.statistics().accepted == 1
    '''))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                            capture_output=True, text=True, timeout=TIMEOUT * 3, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


def documented_examples():
    """Every ``# example: NAME`` block of the README and docs/, by name."""
    found = {}
    for path in documents():
        for block in fences(path):
            if block.info == "python" and block.text.startswith("# example: "):
                name = block.text.splitlines()[0][len("# example: "):]
                assert name not in found, f"two examples named {name!r}"
                found[name] = block.text
    return found


@pytest.mark.parametrize("name", sorted(documented_examples()))
def test_documented_examples_run_as_written(name):
    example = documented_examples()[name]
    # Exactly as a reader would paste them: nothing substituted, nothing listening beforehand.
    result = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True,
                            timeout=TIMEOUT * 3, cwd=ROOT, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "b'ping'" in result.stdout, result.stdout


def test_the_docs_show_every_mode():
    # patched, unpatched and asyncio programs (docs/embedding.md), and toxics (docs/toxics.md)
    assert set(documented_examples()) == {"unpatched", "patched", "asyncio", "toxics"}


# The program's thread serves (or waits in serve_forever), a real OS thread of its own
# controls: every public call that touches the forwarder's hub must work from there.
CONTROL_FROM_ANOTHER_THREAD = '''
    import faulthandler, logging, socket
    import gevent.monkey
    import gproxy
    faulthandler.dump_traceback_later(30, exit=True)  # a hang shows where, then exits
    start_new_thread = gevent.monkey.get_original("_thread", "start_new_thread")
    allocate_lock = gevent.monkey.get_original("_thread", "allocate_lock")

    def released_later():
        lock = allocate_lock()
        lock.acquire()
        return lock

    listening = released_later()
    class Listening(logging.Handler):  # the readiness signal: the "listening on" line
        def emit(self, record):
            if record.getMessage().startswith("listening on"):
                listening.release()
    logging.getLogger("gproxy").addHandler(Listening())
    logging.getLogger("gproxy").setLevel(logging.INFO)

    target = echo_server()
    fw = gproxy.Forwarder("127.0.0.1:0", target)
    results, finished = [], released_later()

    def control():
        try:
            assert listening.acquire(timeout=10), "never listened"
            sock = socket.create_connection(fw.address, timeout=10)
            sock.sendall(b"ping")
            assert sock.recv(4) == b"ping"
            assert [r.outcome for r in fw.connections()] == [None]
            assert fw.statistics().active == 1
            fw.add_toxic("latency", latency=1)
            assert [t.name for t in fw.toxics()] == ["latency_downstream"]
            fw.remove_toxic("latency_downstream")
            fw.disable()
            assert not fw.enabled and sock.recv(4) == b""
            sock.close()
            try:
                socket.create_connection(fw.address, timeout=10).close()
                raise AssertionError("a disabled forwarder accepted")
            except ConnectionRefusedError:
                pass
            fw.enable()
            assert round_trip(fw.address, b"abc" * 10000) == b"abc" * 10000
            assert fw.wait_idle(10)
            assert fw.statistics().accepted == 2
            fw.stop()
            fw.stop()  # again: nothing to do
            results.append("stopped")
        except BaseException as exc:
            results.append(repr(exc))
            raise
        finally:
            finished.release()

    if MODE.startswith("start"):
        fw.start()
    start_new_thread(control, ())
    fw.serve_forever()  # returns once the other thread's stop() stopped it
    assert finished.acquire(timeout=10), "stop() did not return"
    assert results == ["stopped"], results
    print("OK")
'''


@pytest.mark.parametrize("mode,prelude", [
    ("serve_forever", ""), ("serve_forever", PATCHED), ("start", ""), ("start", PATCHED),
], ids=["serve_forever-unpatched", "serve_forever-patched", "start-thread", "start-patched"])
def test_a_forwarder_is_controlled_and_stopped_from_another_os_thread(mode, prelude):
    run_script(CONTROL_FROM_ANOTHER_THREAD, prelude=prelude + f"MODE = {mode!r}\n")


# The same for a config file's service (gproxy.load_config): its rules run on the program's hub
# (patched, or serve_forever()) or on a hub in a thread of its own, and another OS thread drives it.
FILE_SERVICE_FROM_ANOTHER_THREAD = '''
    import faulthandler, logging, socket, tempfile
    import gevent.monkey
    import gproxy
    faulthandler.dump_traceback_later(30, exit=True)  # a hang shows where, then exits
    start_new_thread = gevent.monkey.get_original("_thread", "start_new_thread")
    allocate_lock = gevent.monkey.get_original("_thread", "allocate_lock")

    def released_later():
        lock = allocate_lock()
        lock.acquire()
        return lock

    listening = released_later()
    class Listening(logging.Handler):  # the readiness signal: the first "listening on" line
        def emit(self, record):
            if record.getMessage().startswith("listening on") and listening.locked():
                listening.release()
    logging.getLogger("gproxy").addHandler(Listening())
    logging.getLogger("gproxy").setLevel(logging.INFO)

    target = "%s:%d" % echo_server()
    path = os.path.join(tempfile.mkdtemp(), "gproxy.toml")
    RULE = '[[rule]]\\nname = "%s"\\nlisten = "127.0.0.1:0"\\ntarget = "%s"\\n'
    with open(path, "w") as f:
        f.write(RULE % ("web", target))
    files = gproxy.load_config(path)
    results, finished = [], released_later()

    def control():
        try:
            assert listening.acquire(timeout=10), "never listened"
            web = files["web"]
            assert round_trip(web.address, b"ping") == b"ping"
            web.add_toxic("latency", latency=1)
            assert [t.name for t in web.toxics()] == ["latency_downstream"]
            with open(path, "a") as f:
                f.write(RULE % ("api", target))
            assert files.reload() is True
            assert sorted(files) == ["api", "web"] and files["web"] is web
            assert round_trip(files["api"].address, b"pong" * 10000) == b"pong" * 10000
            assert web.wait_idle(10) and files["api"].wait_idle(10)
            assert files.statistics().accepted == 2
            files.stop()
            files.stop()  # again: nothing to do
            assert files.reload() is False  # refused: stopped
            results.append("stopped")
        except BaseException as exc:
            results.append(repr(exc))
            raise
        finally:
            finished.release()

    if MODE.startswith("start"):
        files.start()
    start_new_thread(control, ())
    files.serve_forever()  # returns once the other thread's stop() stopped it
    assert finished.acquire(timeout=10), "stop() did not return"
    assert results == ["stopped"], results
    print("OK")
'''


@pytest.mark.parametrize("mode,prelude", [
    ("serve_forever", ""), ("serve_forever", PATCHED), ("start", ""), ("start", PATCHED),
], ids=["serve_forever-unpatched", "serve_forever-patched", "start-thread", "start-patched"])
def test_a_file_service_is_controlled_and_stopped_from_another_os_thread(mode, prelude):
    run_script(FILE_SERVICE_FROM_ANOTHER_THREAD, prelude=prelude + f"MODE = {mode!r}\n")
