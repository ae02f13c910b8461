"""Helpers for users' own test suites: a started forwarder in front of any address.

Typical use, as a pytest plugin (pytest loads it once gproxy is installed; ``-p no:gproxy``
turns that off, and a ``conftest.py`` with ``pytest_plugins = ["gproxy.testing"]`` loads it
where gproxy is not installed)::

    def test_app_survives_a_cut(gproxy_forwarder):
        fw = gproxy_forwarder(("127.0.0.1", 5432), idle_timeout=5)
        app = connect_app(port=fw.port)
        ...
        print(fw.statistics())

    @pytest.fixture(scope="session")
    def db_proxy(gproxy_session_forwarder):      # one forwarder for the whole session
        return gproxy_session_forwarder(("127.0.0.1", 5432))

    def test_app_retries_while_the_database_is_down(db_proxy):
        app = App(db_port=db_proxy.port)
        with db_proxy.down():                    # refused, open connections cut
            assert app.get("key") is None        # degraded, not crashed
        assert app.get("key") == "value"         # and back once it is up again
        db_proxy.add_toxic(toxics.latency(500))
        assert app.get("key") is None            # its 0.1 s timeout fires

or without pytest::

    with forwarding(("127.0.0.1", 5432)) as fw:
        ...

A TLS proxy in front of a plaintext test server, with a throwaway CA (``trustme`` makes it;
install it with the tests' dependencies)::

    with ThrowawayCA() as ca, forwarding(("127.0.0.1", 6379), **ca.server_options()) as fw:
        client = ca.client_context().wrap_socket(socket.create_connection(fw.address),
                                                 server_hostname="localhost")

(the ``gproxy_tls_ca`` fixture is one ``ThrowawayCA`` for the session; ``ca.issue(...)`` makes
more certificates, ``ca.origination_options()`` points ``target_tls`` at a test server that
uses ``ca.server_context()``).

A factory for every scope: ``gproxy_forwarder`` (function), ``gproxy_class_forwarder``,
``gproxy_module_forwarder``, ``gproxy_session_forwarder``; each stops what it made when its
scope ends, open connections aborted at once (a test ends when it ends). Their type, for
annotations, is ``ForwarderFactory``. (None for "package": pytest caches a package-scoped
fixture that a plugin defines for the whole session, so it would not be what it says; a
package's conftest.py can define one on ``forwarding()``.)

The target comes first and ``listen`` is keyword-only (default ``127.0.0.1:0``, a free
port): ``Forwarder(listen, target)`` puts listen first, so a positional listen here would
be read the wrong way round; it is a ``TypeError`` instead. ``thread=True`` serves from a
thread of its own even in a patched process (``Forwarder.start``).

The per-test reset: at the end of every test, *before* any fixture is torn down (a
``pytest_runtest_teardown`` hook that runs ahead of pytest's own, which finalises the
fixtures), every running forwarder the factories or ``forwarding()`` made, or that
``reset_between_tests(fw)`` was given, is reset (``Forwarder.reset()``: every toxic
removed, enabled again). So the test's own fixtures, torn down after it, talk through a
clean proxy, and nothing one test did to a shared proxy reaches the next.
``reset_between_tests=False`` (a factory's or ``forwarding()``'s keyword) or
``reset_between_tests(fw, False)`` keeps a forwarder out of it. ``connections_in_test(fw)``
lists the open connections of such a forwarder opened since the current test began (its
fixtures' setup included): a session-scoped proxy's connections of earlier tests are not
this test's to cut.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import os
import shutil
import tempfile
import weakref
from typing import TYPE_CHECKING, Any, Dict, Generator, Iterator, List, Optional, Tuple

from gproxy.config import AddressLike, TargetLike

if TYPE_CHECKING:
    from typing_extensions import Protocol

    from gproxy.forwarder import Forwarder
    from gproxy.stats import ConnectionRecord
else:
    from typing import Protocol

__all__ = ["forwarding", "reset_between_tests", "connections_in_test", "ForwarderFactory",
           "gproxy_forwarder", "gproxy_class_forwarder", "gproxy_module_forwarder",
           "gproxy_session_forwarder", "ThrowawayCA", "gproxy_tls_ca"]

LOCAL = "127.0.0.1:0"

#: forwarders under the per-test reset, and each one's mark (Forwarder.mark) when the
#: current test began or, made during it, when it came under the reset
_marks: "weakref.WeakKeyDictionary[Forwarder, int]" = weakref.WeakKeyDictionary()


class _Lock:
    """Guards _marks (forwarders come and go from any thread): an OS lock, patched or not,
    made with the first forwarder, so that the plugin alone never imports gevent."""

    _lock: Any = None  # a real lock, made at first use

    def __enter__(self) -> None:
        if self._lock is None:
            from gproxy import _gevent
            type(self)._lock = _gevent.real_lock()
        self._lock.acquire()

    def __exit__(self, *exc_info: Any) -> None:
        self._lock.release()


_lock = _Lock()


class ForwarderFactory(Protocol):
    """The type of the factory fixtures: ``factory(target, *, listen="127.0.0.1:0",
    thread=None, reset_between_tests=True, **options)`` returns a started ``Forwarder``
    (``options``: Forwarder's keyword options)."""

    def __call__(self, target: TargetLike, *, listen: AddressLike = ..., thread: Optional[bool] = ...,
                 reset_between_tests: bool = ..., **options: Any) -> Forwarder: ...


def reset_between_tests(fw: Forwarder, enabled: bool = True) -> Forwarder:
    """Put ``fw`` (any Forwarder, started or not) under the plugin's per-test reset, or
    with ``enabled`` False take it out; returns ``fw``. It only matters while pytest runs
    the plugin; a stopped forwarder is left alone."""
    with _lock:
        if enabled:
            _marks.setdefault(fw, fw.mark())
        else:
            _marks.pop(fw, None)
    return fw


def connections_in_test(fw: Forwarder) -> List[ConnectionRecord]:
    """The open connections of ``fw`` accepted since the current test began (its fixtures'
    setup included), or since ``fw`` came under the reset during it. ``fw`` must be under
    the per-test reset (``ValueError`` otherwise); ``fw.mark()`` and
    ``fw.connections(since=mark)`` do the same for any span."""
    with _lock:
        mark = _marks.get(fw)
    if mark is None:
        raise ValueError(f"{fw!r} is not under the per-test reset: made by a gproxy fixture, "
                         f"forwarding() or reset_between_tests() it would be")
    return fw.connections(since=mark)


#: ``--gproxy-capture DIR``: where each test's captures go (None: off); the test that runs
#: now, its captures' numbers and its captures ((forwarder, capture) pairs); the node ids of
#: the tests whose setup or body failed; the files kept so far (the terminal summary lists them)
_capture_dir: Optional[str] = None
_test_name: Optional[str] = None
_capture_numbers: Iterator[int] = iter(())
_captures: List[Any] = []
_failed: set = set()
_kept: List[str] = []


def _capture(fw: Forwarder) -> None:
    """While a test runs with ``--gproxy-capture``: capture ``fw`` into a file of the test's.
    Not under the lock: capture() waits for the forwarder's hub."""
    name = _test_name
    if _capture_dir is None or name is None or fw.capturing is not None:
        return   # off, between tests, or its own capture runs (the test's: it wins)
    import os
    import re
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")[:150]
    try:
        capture = fw.capture(os.path.join(_capture_dir, f"{stem}.{next(_capture_numbers)}.pcap"))
    except RuntimeError:   # its own capture began meanwhile
        return
    with _lock:
        _captures.append((fw, capture))


def _end_captures(keep: bool) -> List[str]:
    """Stop the test's captures; keep their files (listed) or delete them."""
    import os
    with _lock:
        captures = list(_captures)
        _captures.clear()
    kept = []
    for _fw, capture in captures:
        capture.stop()
        if keep and capture.connections:
            kept.append(capture.path)
        else:
            with contextlib.suppress(OSError):
                os.remove(capture.path)
    return kept


def _forwarders() -> List[Forwarder]:
    if not _marks:  # no forwarder yet: nothing to lock, nor gevent to load
        return []
    with _lock:
        return list(_marks)


def _start(target: TargetLike, listen: AddressLike, thread: Optional[bool], reset: bool,
           options: Any) -> Forwarder:
    from gproxy.forwarder import Forwarder  # gevent loads when a forwarder is first wanted
    fw = Forwarder(listen, target, **options)
    if reset:
        reset_between_tests(fw)
    try:
        fw.start(thread=thread)
    except BaseException:
        reset_between_tests(fw, False)
        raise
    if reset:
        _capture(fw)
    return fw


@contextlib.contextmanager
def forwarding(target: TargetLike, *, listen: AddressLike = LOCAL, thread: Optional[bool] = None,
               reset_between_tests: bool = True, **options: Any) -> Iterator[Forwarder]:
    """A started forwarder to ``target`` for the ``with`` block; stopped (no drain) after it.
    ``options`` are Forwarder's keyword options; ``thread`` is ``Forwarder.start``'s. Under
    pytest it is reset after each test while it runs, unless ``reset_between_tests`` is False."""
    fw = _start(target, listen, thread, reset_between_tests, options)
    try:
        yield fw
    finally:
        fw.stop(timeout=0)


@contextlib.contextmanager
def _factory() -> Iterator[ForwarderFactory]:
    started: List[Forwarder] = []

    def make(target: TargetLike, *, listen: AddressLike = LOCAL, thread: Optional[bool] = None,
             reset_between_tests: bool = True, **options: Any) -> Forwarder:
        fw = _start(target, listen, thread, reset_between_tests, options)
        started.append(fw)
        return fw

    try:
        yield make
    finally:
        for fw in started:
            fw.stop(timeout=0)


class ThrowawayCA:
    """A certificate authority that lives as long as this object, and certificates it signs,
    as PEM files in a temporary directory (removed by ``close()`` or the ``with`` block's end).

    - ``ca_file``: the CA's certificate, what clients trust (``--cacert``, ``tls_ca``).
    - ``cert_file``, ``key_file``: a server certificate for ``names`` (default ``localhost``
      and ``127.0.0.1``) and its key, what ``server_options()`` gives a Forwarder.
    - ``issue(*names, expired=False)``: another certificate, as ``(cert_file, key_file)``: for
      another name, a client (mutual TLS), or one that expired yesterday.
    - ``client_context(cert=None)``: an ``ssl.SSLContext`` that trusts the CA (and presents
      ``cert``, an ``issue()`` result); ``server_context(cert=None)`` one for a TLS test server.
    """

    def __init__(self, names: Tuple[str, ...] = ("localhost", "127.0.0.1")) -> None:
        try:
            import trustme
        except ImportError:
            raise ImportError("ThrowawayCA needs trustme: pip install trustme") from None
        self._ca = trustme.CA()
        self.directory = tempfile.mkdtemp(prefix="gproxy-tls-")
        self._count = 0
        self.ca_file = os.path.join(self.directory, "ca.pem")
        self._ca.cert_pem.write_to_path(self.ca_file)
        self.cert_file, self.key_file = self.issue(*names)

    def issue(self, *names: str, expired: bool = False) -> Tuple[str, str]:
        """A new certificate for ``names`` signed by this CA: ``(cert_file, key_file)``."""
        self._count += 1
        options: Dict[str, Any] = {}
        if expired:
            now = datetime.datetime.now(datetime.timezone.utc)
            options = {"not_before": now - datetime.timedelta(days=30),
                       "not_after": now - datetime.timedelta(days=1)}
        leaf = self._ca.issue_cert(*(names or ("localhost",)), **options)
        cert_file = os.path.join(self.directory, f"cert{self._count}.pem")
        key_file = os.path.join(self.directory, f"key{self._count}.pem")
        with open(cert_file, "wb") as out:
            for blob in leaf.cert_chain_pems:
                out.write(blob.bytes())
        leaf.private_key_pem.write_to_path(key_file)
        return cert_file, key_file

    def server_options(self) -> Dict[str, Any]:
        """Forwarder keywords that terminate TLS with ``cert_file``."""
        return {"tls_cert": self.cert_file, "tls_key": self.key_file}

    def origination_options(self) -> Dict[str, Any]:
        """Forwarder keywords that speak TLS to a target whose certificate this CA signed."""
        return {"target_tls": True, "target_tls_ca": self.ca_file}

    def client_context(self, cert: Optional[Tuple[str, str]] = None) -> Any:
        """An ``ssl.SSLContext`` for clients: it trusts this CA, and presents ``cert`` if given."""
        import ssl
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if cert is not None:
            ctx.load_cert_chain(*cert)
        return ctx

    def server_context(self, cert: Optional[Tuple[str, str]] = None) -> Any:
        """An ``ssl.SSLContext`` for a TLS test server presenting ``cert`` (default ``cert_file``)."""
        import ssl
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(*(cert or (self.cert_file, self.key_file)))
        return ctx

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> "ThrowawayCA":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _reset_all() -> Optional[BaseException]:
    """Reset every running forwarder under the reset; the first failure, if any, returned
    rather than raised, so that one forwarder's trouble never keeps the others dirty."""
    forwarders = _forwarders()
    if not forwarders:
        return None
    from gproxy.forwarder import State
    failure = None
    for fw in forwarders:
        if fw.state is not State.RUNNING:
            continue
        try:
            fw.reset()
        except Exception as exc:  # stopped meanwhile by someone else, say: reported below
            if fw.state is State.RUNNING and failure is None:
                failure = exc
    return failure


def _begin_test() -> None:
    if not _marks:
        return
    with _lock:
        for fw in list(_marks):
            _marks[fw] = fw.mark()


try:
    import pytest
except ImportError:  # the helpers above work without pytest
    pytest = None  # type: ignore[assignment]

if pytest is not None:
    def _fixture(scope: Any, name: str, doc: str) -> Any:
        def fixture() -> Iterator[ForwarderFactory]:
            with _factory() as make:
                yield make
        fixture.__doc__ = doc
        fixture.__name__ = name
        return pytest.fixture(scope=scope, name=name)(fixture)

    gproxy_forwarder = _fixture("function", "gproxy_forwarder", """A factory:
        ``gproxy_forwarder(target, *, listen="127.0.0.1:0", thread=None, reset_between_tests=True,
        **options)`` returns a started Forwarder; every one it made is stopped when the test ends.""")
    gproxy_class_forwarder = _fixture("class", "gproxy_class_forwarder", """The same factory for
        class-scoped fixtures: its forwarders are stopped when the class's last test ends.""")
    gproxy_module_forwarder = _fixture("module", "gproxy_module_forwarder", """The same factory
        for module-scoped fixtures: its forwarders are stopped when the module's last test ends.""")
    gproxy_session_forwarder = _fixture("session", "gproxy_session_forwarder", """The same factory
        for session-scoped fixtures (a database proxy every test shares): its forwarders are
        stopped when the test session ends.""")

    @pytest.fixture(scope="session")
    def gproxy_tls_ca() -> Iterator[ThrowawayCA]:
        """One ThrowawayCA for the test session: ``**gproxy_tls_ca.server_options()`` makes a
        forwarder terminate TLS, ``gproxy_tls_ca.client_context()`` trusts it."""
        with ThrowawayCA() as ca:
            yield ca

    _OTHER_NAME = {"gproxy": "gproxy.testing", "gproxy.testing": "gproxy"}

    def pytest_plugin_registered(plugin: object, manager: Any) -> None:
        """Loaded once under either name: as ``gproxy`` (the ``pytest11`` entry point of an
        installed gproxy) or as ``gproxy.testing`` (``pytest_plugins``, ``-p``). The other
        name is blocked, which pytest's loaders take as "nothing to load": registering this
        module a second time under it would be an error."""
        import sys
        if plugin is not sys.modules[__name__]:
            return
        other = _OTHER_NAME.get(manager.get_name(plugin) or "")
        if other is not None and manager.get_plugin(other) is None and not manager.is_blocked(other):
            manager.set_blocked(other)

    def pytest_addoption(parser: Any) -> None:
        parser.getgroup("gproxy").addoption(
            "--gproxy-capture", metavar="DIR", default=None,
            help="capture every gproxy forwarder under the per-test reset while each test runs, "
                 "and keep DIR/TEST.N.pcap of the tests that fail (default: off)")

    def pytest_configure(config: Any) -> None:
        global _capture_dir
        directory = config.getoption("gproxy_capture", None)
        if directory:
            import os
            os.makedirs(directory, exist_ok=True)
            _capture_dir = os.path.abspath(directory)

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(item: Any) -> None:
        """Before the test's fixtures are set up: where connections_in_test() starts counting,
        and, with --gproxy-capture, where its captures begin."""
        global _test_name, _capture_numbers
        _begin_test()
        if _capture_dir is not None:
            _test_name = item.nodeid
            _capture_numbers = itertools.count()
            for fw in _forwarders():
                from gproxy.forwarder import State
                if fw.state is State.RUNNING:
                    _capture(fw)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(item: Any, call: Any) -> Generator[None, Any, None]:
        outcome = yield
        if _capture_dir is not None and outcome.get_result().failed:
            _failed.add(item.nodeid)   # its setup or the test failed: its captures are kept

    def pytest_terminal_summary(terminalreporter: Any) -> None:
        if _kept:
            terminalreporter.write_sep("-", "gproxy captures of failed tests")
            for path in _kept:
                terminalreporter.write_line(path)

    try:  # pluggy 1.1 and later (pytest 8 requires 1.3): a wrapper that may raise
        _wrapper = pytest.hookimpl(wrapper=True, tryfirst=True)
    except TypeError:  # older: pluggy 1.0 passes a raise in an old-style wrapper on too
        _wrapper = pytest.hookimpl(hookwrapper=True, tryfirst=True)

    @_wrapper
    def pytest_runtest_teardown(item: Any, nextitem: Any) -> Iterator[Any]:
        """Ahead of pytest's own teardown, which finalises the test's fixtures: they are torn
        down with the forwarders already clean. A reset that failed is raised once they are."""
        failure = _reset_all()
        try:
            result = yield
        finally:
            if _capture_dir is not None:
                _finish_captures(item)
        if failure is not None:
            raise failure
        return result

    def _finish_captures(item: Any) -> None:
        """After the test's teardown (its traffic is in the files too): keep the captures of
        a test that failed, for the terminal summary to list, and delete the others."""
        global _test_name
        _test_name = None
        _kept.extend(_end_captures(item.nodeid in _failed))
        _failed.discard(item.nodeid)
