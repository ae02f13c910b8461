"""The pytest plugin (gproxy.testing) as users run it: pytest in a subprocess on a directory of
their tests, real forwarders in front of a real upstream.

What it promises: the per-test reset runs before the test's fixtures are torn down; there is
a factory for every scope; any forwarder can come under the reset; connections of a test can
be told from those of earlier tests; the plugin loads once from its entry point, never twice,
and ``-p no:gproxy`` keeps it out."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from peers import TIMEOUT

ROOT = Path(__file__).resolve().parent.parent

#: a conftest every user directory here starts with: an upstream that greets each client
#: with "hi", then echoes what it reads, until the client closes
UPSTREAM = '''
import socket, threading
import pytest

@pytest.fixture(scope="session")
def upstream():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    def serve(sock):
        with sock:
            sock.sendall(b"hi")
            while data := sock.recv(4096):
                sock.sendall(data)
    def accept():
        while True:
            sock, _ = listener.accept()
            threading.Thread(target=serve, args=(sock,), daemon=True).start()
    threading.Thread(target=accept, daemon=True).start()
    return listener.getsockname()

def greet(fw, timeout=5.0):
    """b"hi" through fw, or None when refused"""
    try:
        with socket.create_connection(fw.address, timeout=timeout) as sock:
            return sock.recv(2)
    except ConnectionRefusedError:
        return None
'''


def run_pytest(tmp_path: Path, files: dict, *args: str, plugin_line: bool = True, env_extra=None,
               python_path=()) -> subprocess.CompletedProcess:
    """pytest in a subprocess on ``files`` written to tmp_path (conftest.py gets UPSTREAM, and
    ``pytest_plugins`` unless ``plugin_line`` is False)."""
    conftest = ('pytest_plugins = ["gproxy.testing"]\n' if plugin_line else "") + UPSTREAM
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "conftest.py").write_text(conftest + textwrap.dedent(files.pop("conftest.py", "")))
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    paths = [*map(str, python_path), str(ROOT), os.environ.get("PYTHONPATH")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, paths)), **(env_extra or {}))
    env.pop("PYTEST_ADDOPTS", None)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                           *args, str(tmp_path)], capture_output=True, text=True,
                          timeout=TIMEOUT * 3, cwd=tmp_path, env=env)


def passed(result: subprocess.CompletedProcess, count: int) -> None:
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(rf"\b{count} passed\b", result.stdout), result.stdout


# -- 1. the reset comes before the test's fixtures are torn down --------------------------------

def test_fixtures_torn_down_after_a_test_talk_through_a_clean_proxy(tmp_path):
    result = run_pytest(tmp_path, {"test_order.py": '''
        import socket, time
        import pytest
        from conftest import greet

        @pytest.fixture(scope="session")
        def proxy(gproxy_session_forwarder, upstream):
            return gproxy_session_forwarder(upstream)

        seen = []

        @pytest.fixture
        def client(proxy):
            yield
            # the test's toxics would hold this for ever (timeout 0) or refuse it (disabled)
            seen.append((proxy.enabled, proxy.toxics(), greet(proxy, timeout=2)))

        @pytest.fixture
        def own_proxy(gproxy_forwarder, upstream):
            fw = gproxy_forwarder(upstream)
            yield fw
            seen.append((fw.enabled, fw.toxics(), greet(fw, timeout=2)))

        def test_1_holds_everything(proxy, client):
            proxy.add_toxic("timeout", timeout=0)
            with pytest.raises(socket.timeout):
                greet(proxy, timeout=0.2)

        def test_2_disables(proxy, client):
            proxy.disable()
            assert greet(proxy) is None

        def test_3_function_factory(own_proxy):
            own_proxy.add_toxic("timeout", timeout=0)
            own_proxy.disable()

        def test_4_teardowns_saw_it_clean():
            assert seen == [(True, [], b"hi")] * 3
    '''})
    passed(result, 4)


def test_a_module_fixture_torn_down_after_the_last_test_sees_it_clean_too(tmp_path):
    result = run_pytest(tmp_path, {
        "test_a.py": '''
            import pytest
            from conftest import greet
            import report

            @pytest.fixture(scope="module")
            def proxy(gproxy_session_forwarder, upstream):
                fw = gproxy_session_forwarder(upstream)
                yield fw
                report.seen.append((fw.toxics(), greet(fw, timeout=2)))

            def test_poisons_it(proxy):
                proxy.add_toxic("timeout", timeout=0)
        ''',
        "test_b.py": '''
            import report
            def test_the_module_teardown_saw_it_clean():
                assert report.seen == [([], b"hi")]
        ''',
        "report.py": "seen = []\n"})
    passed(result, 2)


# -- 2. every scope, and any forwarder under the reset -----------------------------------------

def test_a_factory_for_every_scope_stopped_when_its_scope_ends(tmp_path):
    result = run_pytest(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/test_a_scopes.py": '''
            import pytest
            from gproxy.forwarder import State
            from conftest import greet
            made = {}

            @pytest.fixture(scope="class")
            def per_class(gproxy_class_forwarder, upstream):
                return gproxy_class_forwarder(upstream)

            @pytest.fixture(scope="module")
            def per_module(gproxy_module_forwarder, upstream):
                return gproxy_module_forwarder(upstream)

            class TestOne:
                def test_first(self, per_class, per_module, per_package, per_session):
                    made.update(cls=per_class, module=per_module, package=per_package,
                                session=per_session)
                    for fw in made.values():
                        assert greet(fw) == b"hi"
                        fw.add_toxic("limit_data", bytes=0)

                def test_same_class_same_forwarders_reset(self, per_class, per_module):
                    assert per_class is made["cls"] and per_module is made["module"]
                    assert per_class.toxics() == [] and greet(per_class) == b"hi"

            class TestTwo:
                def test_a_new_class_forwarder(self, per_class, per_module):
                    assert made["cls"].state is State.STOPPED
                    assert per_class is not made["cls"] and per_module is made["module"]
        ''',
        "pkg/test_b_later.py": '''
            from gproxy.forwarder import State
            from pkg.test_a_scopes import made

            def test_module_one_stopped(per_package, per_session):
                assert made["module"].state is State.STOPPED
                assert per_package is made["package"] and per_package.state is State.RUNNING
                assert per_session is made["session"] and per_session.toxics() == []
        ''',
        "pkg/conftest.py": '''
            import pytest
            from gproxy.testing import forwarding

            @pytest.fixture(scope="package")      # a package's own factory: forwarding()
            def per_package(upstream):
                with forwarding(upstream) as fw:
                    yield fw

            @pytest.fixture(scope="session")
            def per_session(gproxy_session_forwarder, upstream):
                return gproxy_session_forwarder(upstream)
        ''',
        "test_z_after_the_package.py": '''
            from gproxy.forwarder import State
            from pkg.test_a_scopes import made

            def test_package_one_stopped_session_one_runs():
                assert made["package"].state is State.STOPPED
                assert made["session"].state is State.RUNNING
        '''})
    passed(result, 5)


def test_forwarding_and_any_forwarder_come_under_the_reset(tmp_path):
    result = run_pytest(tmp_path, {"test_any.py": '''
        import pytest
        import gproxy
        from gproxy.testing import forwarding, reset_between_tests
        from conftest import greet

        @pytest.fixture(scope="module")
        def with_forwarding(upstream):
            with forwarding(upstream) as fw:
                yield fw

        @pytest.fixture(scope="module")
        def kept(upstream):
            with forwarding(upstream, reset_between_tests=False) as fw:
                yield fw

        @pytest.fixture(scope="module")
        def plain(upstream):
            fw = reset_between_tests(gproxy.Forwarder("127.0.0.1:0", upstream).start())
            yield fw
            fw.stop()

        def test_1_poison_all(with_forwarding, kept, plain):
            for fw in (with_forwarding, kept, plain):
                fw.add_toxic("limit_data", bytes=0)
            plain.disable()

        def test_2_reset_unless_kept_out(with_forwarding, kept, plain):
            assert with_forwarding.toxics() == [] and greet(with_forwarding) == b"hi"
            assert plain.enabled and plain.toxics() == [] and greet(plain) == b"hi"
            assert [t.type for t in kept.toxics()] == ["limit_data"]
    '''})
    passed(result, 2)


def test_a_failing_reset_fails_the_test_after_its_fixtures_are_torn_down(tmp_path):
    result = run_pytest(tmp_path, {"test_fail.py": '''
        import pytest
        torn_down = []

        @pytest.fixture
        def fixture():
            yield
            torn_down.append(True)

        def test_reset_breaks(gproxy_forwarder, upstream, fixture):
            fw = gproxy_forwarder(upstream)
            def broken():
                raise RuntimeError("reset broke")
            fw.reset = broken

        def test_fixtures_were_torn_down_all_the_same():
            assert torn_down == [True]
    '''})
    assert result.returncode == 1, result.stdout + result.stderr
    assert "2 passed, 1 error" in result.stdout and "reset broke" in result.stdout, result.stdout


# -- 5. connections of this test ------------------------------------------------------------------

def test_connections_in_test_leaves_out_earlier_tests_connections(tmp_path):
    result = run_pytest(tmp_path, {"test_conns.py": '''
        import socket
        import pytest
        from gproxy.testing import connections_in_test

        @pytest.fixture(scope="session")
        def proxy(gproxy_session_forwarder, upstream):
            return gproxy_session_forwarder(upstream)

        pool = []

        def open_one(proxy):
            sock = socket.create_connection(proxy.address, timeout=5)
            assert sock.recv(2) == b"hi"
            pool.append(sock)
            return sock.getsockname()

        @pytest.fixture
        def fixture_connection(proxy):
            return open_one(proxy)      # opened in this test's setup: this test's

        def test_1_pools_a_connection(proxy):
            open_one(proxy)
            assert len(connections_in_test(proxy)) == 1

        def test_2_sees_only_its_own(proxy, fixture_connection):
            mine = open_one(proxy)
            records = connections_in_test(proxy)
            assert [r.client_address for r in records] == [fixture_connection, mine]
            assert len(proxy.connections()) == 3
            for record in records:             # "abort all" of this test only
                proxy.abort_connection(record.id)
            for sock in pool[1:]:
                with pytest.raises(ConnectionResetError):
                    sock.recv(1)
            pool[0].sendall(b"still here")     # the earlier test's connection lives on
            assert pool[0].recv(10) == b"still here"

        def test_3_not_under_the_reset_is_an_error():
            import gproxy
            with gproxy.Forwarder("127.0.0.1:0", "127.0.0.1:9") as fw:
                with pytest.raises(ValueError, match="not under the per-test reset"):
                    connections_in_test(fw)
    '''})
    passed(result, 3)


# -- 6. the entry point ----------------------------------------------------------------------------

def installed(tmp_path: Path) -> Path:
    """A site directory in which gproxy looks installed to importlib.metadata, with the entry
    points pyproject.toml declares (what pip writes into the dist-info)."""
    try:
        import tomllib
    except ImportError:  # Python < 3.11: gproxy depends on tomli there
        import tomli as tomllib
    entry_points = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    site = tmp_path / "site"
    info = site / "gproxy-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: gproxy\nVersion: 0.1.0\n")
    lines = []
    for group, points in entry_points.items():
        lines.append(f"[{group}]")
        lines += [f"{name} = {value}" for name, value in points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return site


PLUGIN_IN_USE = {"test_user.py": '''
    from conftest import greet

    def test_fixture_and_reset(gproxy_forwarder, upstream, request):
        fw = gproxy_forwarder(upstream)
        assert greet(fw) == b"hi"
        names = [name for name, plugin in request.config.pluginmanager.list_name_plugin()
                 if getattr(plugin, "__name__", None) == "gproxy.testing"]
        print("REGISTERED AS", names)
'''}


def test_the_entry_point_loads_the_plugin_without_a_conftest_line(tmp_path):
    site = installed(tmp_path)
    result = run_pytest(tmp_path / "user", dict(PLUGIN_IN_USE), "-s", plugin_line=False, python_path=[site])
    passed(result, 1)
    assert "REGISTERED AS ['gproxy']" in result.stdout


def test_a_conftest_naming_the_plugin_beside_the_entry_point_registers_it_once(tmp_path):
    site = installed(tmp_path)
    result = run_pytest(tmp_path / "user", dict(PLUGIN_IN_USE), "-s", plugin_line=True, python_path=[site])
    passed(result, 1)
    assert "REGISTERED AS ['gproxy']" in result.stdout


def test_dash_p_beside_the_entry_point_registers_it_once(tmp_path):
    site = installed(tmp_path)
    result = run_pytest(tmp_path / "user", dict(PLUGIN_IN_USE), "-s", "-p", "gproxy.testing",
                        plugin_line=False, python_path=[site])
    passed(result, 1)
    assert "REGISTERED AS ['gproxy.testing']" in result.stdout


def test_dash_p_no_gproxy_keeps_the_plugin_out(tmp_path):
    site = installed(tmp_path)
    result = run_pytest(tmp_path / "user", dict(PLUGIN_IN_USE), "-p", "no:gproxy",
                        plugin_line=False, python_path=[site])
    assert result.returncode != 0
    assert "fixture 'gproxy_forwarder' not found" in result.stdout, result.stdout


def test_the_plugin_loads_without_importing_gevent(tmp_path):
    site = installed(tmp_path)
    result = run_pytest(tmp_path / "user", {"test_light.py": '''
        import sys
        def test_nothing_loaded_gevent(request):
            assert request.config.pluginmanager.get_plugin("gproxy") is not None
            assert not [name for name in sys.modules if name.split(".")[0] in ("gevent", "greenlet")]
    '''}, plugin_line=False, python_path=[site])
    passed(result, 1)
