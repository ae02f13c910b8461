"""Service: named forwarders on the test's own hub, driven with gevent sockets from greenlets."""

from __future__ import annotations

import time

import gevent
import gevent.socket
import pytest

from gproxy.config import ConfigError
from gproxy.service import DuplicateName, Service, UnknownName, is_enabled
from peers import TIMEOUT, Gate, Server, echo, free_port


def roundtrip(address, data: bytes = b"ping") -> bytes:
    """Send, half-close, read to EOF: when it returns, the echo upstream has finished too."""
    with gevent.Timeout(TIMEOUT):
        with gevent.socket.create_connection(address) as sock:
            sock.sendall(data)
            sock.shutdown(gevent.socket.SHUT_WR)
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
            return reply


def refused(address) -> bool:
    try:
        gevent.socket.create_connection(address, timeout=TIMEOUT).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.fixture
def upstream():
    with Server(echo) as server:
        yield server


@pytest.fixture
def service():
    service = Service(drain_timeout=0)
    yield service
    service.stop()


@pytest.mark.timeout(30)
def test_create_get_list_remove(service, upstream):
    fw = service.create("echo", "127.0.0.1:0", upstream.address)
    assert service["echo"] is fw and "echo" in service and list(service) == ["echo"]
    assert roundtrip(fw.address) == b"ping"
    with pytest.raises(DuplicateName):
        service.create("echo", "127.0.0.1:0", upstream.address)
    with pytest.raises(ConfigError):
        service.create("bad", "127.0.0.1:70000", upstream.address)
    assert list(service) == ["echo"]
    service.remove("echo")
    assert "echo" not in service and refused(fw.address)
    with pytest.raises(UnknownName):
        service.remove("echo")
    with pytest.raises(UnknownName):
        service["echo"]


@pytest.mark.timeout(30)
def test_created_disabled_listens_once_enabled_or_reset(service, upstream):
    fw = service.create("later", "127.0.0.1:0", upstream.address, enabled=False)
    assert not is_enabled(fw)
    service.reset()
    assert is_enabled(fw) and roundtrip(fw.address) == b"ping"


@pytest.mark.timeout(30)
def test_a_proxy_made_disabled_stays_so_when_the_service_starts(service, upstream):
    """gproxy --api --toxiproxy-config populates before the service serves: serving (start())
    must not enable what was created or populated disabled."""
    made = service.create("made", "127.0.0.1:0", upstream.address, enabled=False)
    off, on = service.populate([{"name": "off", "listen": "127.0.0.1:0", "target": upstream.address,
                                 "enabled": False},
                                {"name": "on", "listen": "127.0.0.1:0", "target": upstream.address}])
    service.start()
    assert not is_enabled(made) and not is_enabled(off) and is_enabled(on)
    service.reset()
    assert is_enabled(made) and is_enabled(off) and roundtrip(off.address) == b"ping"


@pytest.mark.timeout(30)
def test_populate_is_idempotent_and_replaces_what_differs(service, upstream):
    with Server(echo) as other:
        first = service.populate([
            {"name": "a", "listen": "127.0.0.1:0", "target": upstream.address},
            {"name": "b", "listen": "127.0.0.1:0", "target": upstream.address},
        ])
        a, b = first
        again = service.populate([
            {"name": "a", "listen": "127.0.0.1:0", "target": upstream.address},
            {"name": "b", "listen": "%s:%d" % b.address, "target": other.address},
        ])
        assert again[0] is a                         # same: left alone, same port
        assert again[1] is not b and again[1].address == b.address   # differs: replaced in place
        assert roundtrip(again[1].address) == b"ping" and other.accepted == 1
        # a bad entry anywhere changes nothing
        with pytest.raises(ConfigError) as info:
            service.populate([{"name": "c", "listen": "127.0.0.1:0", "target": upstream.address},
                              {"name": "d", "listen": "nowhere", "target": upstream.address}])
        assert info.value.field == "proxies[1].listen"
        assert list(service) == ["a", "b"]


@pytest.mark.timeout(30)
def test_populate_is_all_or_nothing_when_a_bind_fails(service, upstream):
    """A port in use midway undoes what the call did before it: the proxy it replaced
    serves again as before (same object, same port, same target), the one it created is
    gone, and the error names the proxy and the address."""
    with Server(echo) as other:
        a, b = service.populate([
            {"name": "a", "listen": "127.0.0.1:0", "target": upstream.address},
            {"name": "b", "listen": "127.0.0.1:0", "target": upstream.address},
        ])
        with gevent.socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            busy = "127.0.0.1:%d" % taken.getsockname()[1]
            fresh = free_port()
            with pytest.raises(OSError) as info:
                service.populate([
                    {"name": "a", "listen": "%s:%d" % a.address, "target": other.address},  # replaced
                    {"name": "c", "listen": "127.0.0.1:%d" % fresh, "target": upstream.address},  # new
                    {"name": "d", "listen": busy, "target": upstream.address},  # fails
                ])
        assert info.value.strerror.startswith(f'proxy "d": cannot listen on {busy}: '), info.value
        assert service.items() == [("a", a), ("b", b)]
        assert roundtrip(a.address) == b"ping" and upstream.accepted >= 1 and other.accepted == 0
        assert roundtrip(b.address) == b"ping"
        assert refused(("127.0.0.1", fresh))


@pytest.mark.timeout(30)
def test_update_moves_listener_and_keeps_the_old_one_on_failure(service, upstream):
    fw = service.create("p", "127.0.0.1:0", upstream.address)
    with gevent.socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError):
            service.update("p", listen="127.0.0.1:%d" % taken.getsockname()[1])
    assert service["p"] is fw and roundtrip(fw.address) == b"ping"
    moved = service.update("p", listen="127.0.0.1:%d" % free_port())
    assert moved.address != fw.address and refused(fw.address)
    assert roundtrip(moved.address) == b"ping"


@pytest.mark.timeout(30)
def test_stop_drains_all_in_parallel_with_one_deadline():
    gate = Gate()
    service = Service(drain_timeout=1.0)
    with Server(gate) as held:
        fws = [service.create(f"p{i}", "127.0.0.1:0", held.address) for i in range(8)]
        clients = [gevent.socket.create_connection(fw.address) for fw in fws]
        for _ in fws:  # waited for in a thread, so this hub keeps accepting
            gevent.get_hub().threadpool.apply(gate.get)
        started = time.monotonic()
        service.stop()
        took = time.monotonic() - started
        gate.release()
        for client in clients:
            client.close()
    assert 0.9 <= took < 5, took   # one deadline for all 8, not one after another (8 s)

