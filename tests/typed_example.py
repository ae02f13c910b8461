"""A typed test file, as a user writes one: ``mypy --strict`` must pass it (tests/test_typing.py
checks that, and runs it with pytest). It is not collected by the suite itself (no ``test_``
prefix on the file): run it with ``python -m pytest tests/typed_example.py``."""

from __future__ import annotations

import socket
import threading
from typing import Iterator, List, Tuple

import pytest

import gproxy
from gproxy import ConnectionRecord, Forwarder, toxics
from gproxy.client import Client, Connection, Proxy, Toxic, Unreachable
from gproxy.testing import ForwarderFactory, connections_in_test, forwarding

pytest_plugins = ["gproxy.testing"]


@pytest.fixture(scope="module")
def upstream() -> Iterator[Tuple[str, int]]:
    """An echo server on a thread of its own."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve(sock: socket.socket) -> None:
        with sock:
            while data := sock.recv(4096):
                sock.sendall(data)

    def accept() -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(sock,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    host, port = listener.getsockname()[:2]
    yield host, port
    listener.close()


@pytest.fixture(scope="module")
def proxy(gproxy_module_forwarder: ForwarderFactory, upstream: Tuple[str, int]) -> Forwarder:
    return gproxy_module_forwarder(upstream, idle_timeout=30)


def round_trip(fw: Forwarder, data: bytes = b"ping") -> bytes:
    with socket.create_connection((fw.host, fw.port), timeout=5) as sock:
        sock.sendall(data)
        got = b""
        while len(got) < len(data):   # a slicer may cut the echo: one recv may get part of it
            chunk = sock.recv(len(data) - len(got))
            if not chunk:
                break
            got += chunk
        return got


def shout(chunk: bytes, record: ConnectionRecord) -> toxics.ToxicResult:
    return chunk.upper() if record.bytes_upstream else None


class EveryOther:
    """A Python toxic with state per connection: each connection gets an instance."""

    def __init__(self) -> None:
        self.seen = 0

    def __call__(self, chunk: bytes, record: ConnectionRecord) -> toxics.ToxicResult:
        self.seen += 1
        return None if self.seen % 2 else chunk

    def eof(self, record: ConnectionRecord) -> toxics.ToxicResult:
        return None


def test_typed_toxics(proxy: Forwarder) -> None:
    proxy.add_toxic(toxics.latency(50, jitter=5))
    proxy.add_toxic(toxics.bandwidth(1000), stream="upstream", name="thin")
    proxy.add_toxic("slicer", average_size=2, stream="upstream")
    proxy.add_toxic(shout, stream="upstream")
    assert round_trip(proxy) == b"PING"
    names: List[str] = [toxic.name for toxic in proxy.toxics()]
    assert names == ["thin", "slicer_upstream", "shout_upstream", "latency_downstream"]
    proxy.remove_toxic("shout_upstream")
    proxy.update_toxic("thin", rate=2000)
    with proxy.toxic(toxics.limit_data(0, stream="upstream")) as toxic:
        assert toxic.stream == "upstream"
    proxy.add_toxic(EveryOther, stream="upstream")
    proxy.add_toxic(toxics.trigger(r"never\d+", action="close", once=False))
    assert round_trip(proxy) == b"ping"
    schedule: toxics.Schedule = toxics.Schedule(on=3600, off=60, ramp=0.5, steps=5)
    assert proxy.add_toxic("latency", name="waves", latency=1, schedule=schedule).schedule == schedule


def test_reset_between_tests(proxy: Forwarder) -> None:
    assert proxy.toxics() == [] and round_trip(proxy) == b"ping"


def test_records_and_marks(proxy: Forwarder) -> None:
    mark: int = proxy.mark()
    with socket.create_connection(proxy.address, timeout=5) as sock:
        sock.sendall(b"x")
        assert sock.recv(1) == b"x"
        records = proxy.connections(since=mark)
        assert [r.client_address for r in records] == [sock.getsockname()]
        assert connections_in_test(proxy) == records
        local = records[0].upstream_local_address
        assert isinstance(local, tuple) and local[1] > 0
    assert proxy.url("redis://").startswith("redis://127.0.0.1:")


def test_forwarding_on_a_thread(upstream: Tuple[str, int]) -> None:
    with forwarding(upstream, thread=True, reset_between_tests=False) as fw:
        with fw.toxic("latency", latency=10):
            assert round_trip(fw) == b"ping"
    assert gproxy.Outcome.EOF.value == "eof"


def load(path: str) -> None:
    service = gproxy.load_config(path)   # a FileService, not Any
    service.start()
    service.stop()


def slow_down(api: Client, name: str) -> List[Toxic]:
    """What a test does through ``gproxy --api`` (or a toxiproxy server) with the typed client:
    checked by mypy here, run against a real server by tests/test_client.py."""
    proxy: Proxy = api.proxy(name)
    api.add_toxic(proxy.name, toxics.latency(100, jitter=10), toxicity=0.5)
    api.add_toxic(proxy.name, "bandwidth", stream="upstream", attributes={"rate": 64})
    mark: int = api.mark(proxy.name)
    opened: List[Connection] = api.connections(proxy.name, since=mark).connections
    for conn in opened:
        if conn.upstream_local is not None:
            api.reset_connection(proxy.name, conn.id)
    return api.toxics(proxy.name)


def test_the_api_client_raises_typed_errors() -> None:
    with socket.socket() as sock:   # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    with pytest.raises(Unreachable):
        slow_down(Client(f"http://127.0.0.1:{port}", timeout=5), "redis")
