"""``Forwarder.start(thread=True)``: a forwarder on an OS thread of its own in a patched program,
so code that blocks the program's hub cannot stall it; and what waits cooperatively for it.
Each case is a patched program of its own (patching is process-wide), run as users run one."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from peers import TIMEOUT

ROOT = Path(__file__).resolve().parent.parent

#: a patched program's start: an echo upstream served by a real OS thread on real sockets, so it
#: answers whatever the program's own hub does; and a client run with os.system, which gevent
#: does not patch: the whole program waits for it, hub included
PRELUDE = '''
from gevent import monkey
monkey.patch_all()

import faulthandler, os, socket, sys, time
import gevent
import gproxy
from gproxy import _gevent

faulthandler.dump_traceback_later(60, exit=True)  # a hang shows where, then exits

listener = _gevent.RealSocket()
listener.bind(("127.0.0.1", 0))
listener.listen(16)

def echo(conn):
    with conn:
        try:
            while data := conn.recv(4096):
                conn.sendall(data)
        except ConnectionResetError:  # the forwarder aborted it (stopped at exit)
            pass

def accept():
    while True:
        fd, _ = listener._accept()  # accept() would wrap it in the patched socket class
        _gevent.start_real_thread(echo, (_gevent.RealSocket(fileno=fd),))

_gevent.start_real_thread(accept, ())
UPSTREAM = listener.getsockname()

CLIENT = "import socket, sys; s = socket.create_connection(('127.0.0.1', %d), timeout=%g); " \\
         "s.sendall(b'ping'); sys.exit(0 if s.recv(4) == b'ping' else 3)"

def blocking_round_trip(fw, timeout):
    """A client in a subprocess the whole program waits for (os.system): its exit status."""
    status = os.system(f"{sys.executable} -c \\"{CLIENT % (fw.port, timeout)}\\" 2>/dev/null")
    return os.waitstatus_to_exitcode(status)
'''


def run(script: str) -> str:
    result = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(script)], capture_output=True,
                            text=True, timeout=TIMEOUT * 3, cwd=ROOT, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return result.stdout


def test_a_thread_forwarder_serves_while_the_patched_program_blocks_in_os_system():
    out = run('''
        with gproxy.Forwarder("127.0.0.1:0", UPSTREAM) as shared:   # patched: the program's hub
            print("shared hub:", blocking_round_trip(shared, 1))
        fw = gproxy.Forwarder("127.0.0.1:0", UPSTREAM).start(thread=True)
        assert fw._host.thread is not None and fw._host.thread_id != _gevent.thread_id()
        print("own thread:", blocking_round_trip(fw, 10))
        fw.stop()
    ''')
    # on the program's hub the client times out: nothing serves while os.system waits
    assert "shared hub: 1" in out and "own thread: 0" in out, out


def test_a_patched_caller_waits_for_a_thread_forwarder_cooperatively():
    """stop() drains for up to 10 s; the client still has to speak, in a greenlet of the
    program's hub. Waiting on the hub lets it: the drain ends as soon as it has. Blocking the
    OS thread would hold it to the drain's deadline and cut the connection."""
    out = run('''
        fw = gproxy.Forwarder("127.0.0.1:0", UPSTREAM).start(thread=True)
        sock = socket.create_connection(fw.address, timeout=10)   # patched: cooperative

        def client():
            gevent.sleep(0.2)  # sleep-ok: the client's turn comes while stop() drains
            sock.sendall(b"late")
            got = sock.recv(4)
            sock.close()
            return got

        talking = gevent.spawn(client)
        gevent.sleep(0)    # sleep-ok: the client greenlet starts its wait before stop()
        began = time.monotonic()
        fw.stop(timeout=10)
        print("stopped after", round(time.monotonic() - began, 1), "got", talking.get(timeout=1))
    ''')
    assert "got b'late'" in out, out
    took = float(out.split("stopped after ")[1].split()[0])
    assert took < 5, out


def test_wait_idle_in_a_patched_program_lets_the_programs_greenlets_close():
    out = run('''
        fw = gproxy.Forwarder("127.0.0.1:0", UPSTREAM).start(thread=True)
        sock = socket.create_connection(fw.address, timeout=10)

        def client():
            gevent.sleep(0.2)  # sleep-ok: the client closes while wait_idle() waits
            sock.close()

        gevent.spawn(client)
        began = time.monotonic()
        print("idle", fw.wait_idle(5), "after", round(time.monotonic() - began, 1))
        fw.stop()
    ''')
    assert "idle True" in out, out


def test_toxic_changes_and_wait_idle_from_a_patched_program():
    out = run('''
        fw = gproxy.Forwarder("127.0.0.1:0", UPSTREAM).start(thread=True)
        fw.add_toxic(gproxy.toxics.latency(200))
        began = time.monotonic()
        assert blocking_round_trip(fw, 10) == 0
        print("with latency", time.monotonic() - began >= 0.2)
        fw.remove_toxic("latency_downstream")
        seen = []
        fw.add_toxic(lambda chunk, record: seen.append(record.upstream_local_address), name="tap")
        assert blocking_round_trip(fw, 10) == 0
        print("tap ran on", len(seen), "chunk(s)")
        print("idle", fw.wait_idle(10))
        fw.stop()
    ''')
    assert "with latency True" in out and "tap ran on 1 chunk(s)" in out and "idle True" in out, out


def test_a_patched_program_that_exits_without_stopping_its_thread_forwarder_exits_cleanly():
    out = run('''
        fw = gproxy.Forwarder("127.0.0.1:0", UPSTREAM).start(thread=True)
        assert blocking_round_trip(fw, 10) == 0
        kept = socket.create_connection(fw.address, timeout=10)   # open at exit
        kept.sendall(b"x"); assert kept.recv(1) == b"x"
        print("leaving")
    ''')
    assert out.strip() == "leaving"


def test_thread_false_serves_on_the_calling_threads_hub_in_an_unpatched_program():
    script = textwrap.dedent('''
        import socket
        import gevent, gproxy
        from gproxy import _gevent
        server = socket.create_server(("127.0.0.1", 0))
        fw = gproxy.Forwarder("127.0.0.1:0", server.getsockname()).start(thread=False)
        assert fw._host.thread is None and fw._host.thread_id == _gevent.thread_id()
        fw.stop()
        print("OK")
    ''')
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=TIMEOUT * 3, cwd=ROOT, stdin=subprocess.DEVNULL)
    assert result.returncode == 0 and result.stdout.strip() == "OK", result.stdout + result.stderr


@pytest.mark.timeout(120)
def test_pytest_run_patched_with_thread_forwarders(tmp_path):
    """The way docs/embedding.md says to run a suite patched: ``python -m gevent.monkey
    --module pytest``; the plugin's fixtures take thread=True, and a test may block the hub."""
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["gproxy.testing"]\n')
    (tmp_path / "client.py").write_text(textwrap.dedent('''
        import socket, sys
        sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
        sock.sendall(b"ping")
        sys.exit(0 if sock.recv(4) == b"ping" else 3)
    '''))
    (tmp_path / "test_patched.py").write_text(textwrap.dedent('''
        import os, socket, sys
        import gevent.monkey
        import pytest
        from gproxy import _gevent

        @pytest.fixture(scope="module")
        def upstream():
            listener = _gevent.RealSocket()
            listener.bind(("127.0.0.1", 0))
            listener.listen(16)
            def serve():
                while True:
                    fd, _ = listener._accept()
                    with _gevent.RealSocket(fileno=fd) as conn:
                        conn.sendall(conn.recv(4))
            _gevent.start_real_thread(serve, ())
            return listener.getsockname()

        @pytest.fixture(scope="module")
        def proxy(gproxy_module_forwarder, upstream):
            return gproxy_module_forwarder(upstream, thread=True)

        def test_the_process_is_patched():
            assert gevent.monkey.is_module_patched("socket")

        def test_os_system_through_a_thread_forwarder(proxy):
            proxy.add_toxic("latency", latency=50)
            status = os.system(f"{sys.executable} client.py {proxy.port}")   # blocks the whole process
            assert os.waitstatus_to_exitcode(status) == 0

        def test_reset_reached_it(proxy):
            assert proxy.toxics() == []
    '''))
    import os
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-m", "gevent.monkey", "--module", "pytest", "-q", "-p",
                             "no:cacheprovider", str(tmp_path)], capture_output=True, text=True,
                            timeout=100, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed" in result.stdout, result.stdout
