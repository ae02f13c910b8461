"""Forwarder's interface for being managed (what Service, FileService and testing use), and the
rule that nothing outside forwarder.py reaches past it into a Forwarder's private members."""

from __future__ import annotations

import ast
import logging
import socket
import threading
from pathlib import Path

import gevent
import gevent.socket
import pytest

import gproxy
from gproxy.forwarder import Forwarder, State
from gproxy.service import Service
from peers import TIMEOUT, Server, echo

PACKAGE = Path(gproxy.__file__).resolve().parent

#: the interface for being managed: each says what it does, its default and what None means
MANAGED = ("state", "bound_address", "listening", "start_here", "listens_on", "inherit_listener",
           "inherit_socket", "return_listener", "count_on", "show_own_targets", "retire",
           "listening_fileno", "release_listener")


def _forwarders_private_names() -> set:
    """Every private method of Forwarder and every private attribute it sets on itself."""
    tree = ast.parse((PACKAGE / "forwarder.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Forwarder")
    names = set()
    for node in ast.walk(cls):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
              and node.value.id == "self" and isinstance(node.ctx, ast.Store)):
            names.add(node.attr)
    return {n for n in names if n.startswith("_") and not n.endswith("__")}


def test_no_module_outside_forwarder_py_touches_a_forwarders_private_members():
    """By name, on anything but ``self``: a module that reaches into a Forwarder must use the
    managed interface instead. (A private name another class shares on its own ``self`` is fine.)"""
    private = _forwarders_private_names()
    assert {"_state", "_address", "_server", "_keep_listener", "_claim_start", "_start_on_hub"} <= private
    touches = []
    for path in sorted(PACKAGE.glob("*.py")):
        if path.name == "forwarder.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Attribute) and node.attr in private
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
                touches.append((path.name, node.lineno, node.attr))
    assert touches == [], "\n".join(f"{file}:{line}: .{attr}" for file, line, attr in sorted(touches))


@pytest.mark.parametrize("name", MANAGED)
def test_the_managed_interface_is_documented(name):
    member = getattr(Forwarder, name)
    doc = (member.fget if isinstance(member, property) else member).__doc__
    assert doc and len(doc.split()) >= 12, f"Forwarder.{name} needs a docstring that says what it does"


def test_state_moves_forward_and_bound_address_is_none_until_started():
    with Server(echo) as upstream:
        fw = Forwarder("127.0.0.1:0", upstream.address)
        assert fw.state is State.NEW and str(fw.state) == "new"
        assert fw.bound_address is None and not fw.listening and fw.enabled
        fw.start()
        assert fw.state is State.RUNNING and fw.listening
        assert fw.bound_address == fw.address and fw.bound_address[1] > 0
        fw.disable()
        assert fw.state is State.RUNNING and not fw.listening
        fw.enable()
        assert fw.listening
        fw.stop()
        assert fw.state is State.STOPPED and not fw.listening
        assert fw.bound_address == fw.address  # where it listened
        assert "stopped" in repr(fw)
    unstarted = Forwarder("127.0.0.1:0", "127.0.0.1:1")
    unstarted.stop()
    assert unstarted.state is State.STOPPED and unstarted.bound_address is None


def test_state_is_stopping_while_it_drains(forwarder_factory, caplog):
    caplog.set_level(logging.INFO, logger="gproxy.forwarder")
    draining = threading.Event()

    class Draining(logging.Handler):  # logged once the state is STOPPING, before the drain waits
        def emit(self, record):
            if "draining" in record.getMessage():
                draining.set()

    handler = Draining()
    logging.getLogger("gproxy.forwarder").addHandler(handler)
    try:
        with forwarder_factory.gated(drain_timeout=TIMEOUT) as (fw, client, server):
            stopping = threading.Thread(target=fw.stop)
            stopping.start()
            assert draining.wait(TIMEOUT)
            assert fw.state is State.STOPPING and not fw.listening
            client.close()
            server.close()
            stopping.join(TIMEOUT)
    finally:
        logging.getLogger("gproxy.forwarder").removeHandler(handler)
    assert fw.state is State.STOPPED


@pytest.mark.timeout(30)
def test_start_here_serves_on_this_hub_and_stays_new_when_it_cannot_listen():
    """Unpatched, start_here() serves on the calling thread's hub (no thread of its own); a
    port in use leaves it NEW, so it can be started once the port is free."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    with Server(echo) as upstream:
        fw = Forwarder(f"127.0.0.1:{port}", upstream.address)
        with pytest.raises(OSError):
            fw.start_here()
        assert fw.state is State.NEW and fw.bound_address is None
        taken.close()
        assert fw.start_here() is fw and fw.listening
        try:
            with gevent.Timeout(TIMEOUT):
                with gevent.socket.create_connection(fw.address) as sock:
                    sock.sendall(b"here")
                    assert sock.recv(4) == b"here"  # served while this greenlet waits
        finally:
            fw.stop()
        assert fw.state is State.STOPPED


@pytest.mark.timeout(30)
def test_return_listener_hands_the_socket_back_after_a_takeover_is_undone(tmp_path):
    """The Unix socket file of a takeover that is rolled back stays with the old forwarder:
    stopping the new one does not remove it, stopping the old one does."""
    path = tmp_path / "s.sock"
    with Server(echo) as upstream:
        old = Forwarder(f"unix:{path}", upstream.address).start_here()
        new = Forwarder(f"unix:{path}", upstream.address)
        with pytest.raises(ValueError):
            new.return_listener(old)  # nothing inherited yet
        new.inherit_listener(old)
        new.start_here()
        new.return_listener(old)
        new.stop()
        assert path.exists() and old.listening
        with gevent.Timeout(TIMEOUT):
            with gevent.socket.socket(socket.AF_UNIX) as sock:
                sock.connect(str(path))
                sock.sendall(b"old")
                assert sock.recv(3) == b"old"
        old.stop()
        assert not path.exists()


@pytest.mark.timeout(30)
def test_count_on_and_show_own_targets_carry_a_replaced_rules_metrics():
    with Server(echo) as upstream, Server(echo) as other:
        service = Service(drain_timeout=0)
        try:
            first = service.create("p", "127.0.0.1:0", upstream.address)
            with gevent.Timeout(TIMEOUT):
                with gevent.socket.create_connection(first.address) as sock:
                    sock.sendall(b"x")
                    assert sock.recv(1) == b"x"
            assert first.wait_idle(TIMEOUT)
            assert list(first.counters.target_up.values()) == [True]
            replaced = service.update("p", target=other.address)
            assert replaced is not first and replaced.counters is first.counters
            assert replaced.statistics().accepted == 1  # counts on from the first one's totals
            # the gauges are the new rule's: the first one's target dropped out
            assert replaced.counters.target_up == {"127.0.0.1:%d" % other.address[1]: True}
        finally:
            service.stop()
