"""allow/deny and max_connections_per_client: refused clients are closed before anything is dialled."""

from __future__ import annotations

import logging
import socket

import pytest

from gproxy import ConfigError, Forwarder, Outcome
from peers import TIMEOUT, Gate, Server, echo, recv_exactly


def connect_from(source_ip: str, address) -> socket.socket:
    """A client whose source address is ``source_ip`` (any 127.x.y.z is loopback on Linux)."""
    sock = socket.socket()
    sock.settimeout(TIMEOUT)
    sock.bind((source_ip, 0))
    sock.connect(tuple(address))
    return sock


def refused(source_ip: str, address) -> bool:
    """True once the forwarder has closed a client from ``source_ip`` without a byte. The reset
    may even beat connect() back: with a timeout set, Python's connect polls and reads SO_ERROR."""
    try:
        sock = connect_from(source_ip, address)
    except ConnectionResetError:
        return True
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    finally:
        sock.close()


def served(sock: socket.socket) -> bool:
    with sock:
        sock.sendall(b"ping")
        return sock.recv(4) == b"ping"


class Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def relay_lines():
    handler = Lines()
    logger = logging.getLogger("gproxy.relay")
    old = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield handler.records
    logger.removeHandler(handler)
    logger.setLevel(old)


@pytest.mark.parametrize("options", [
    {"allow": ["127.0.0.1"]},
    {"allow": ["127.0.0.0/30"], "deny": ["127.0.0.2/31"]},   # deny is checked first
    {"deny": ["127.0.0.3"]},
])
def test_allow_and_deny_by_source_address(forwarder_factory, relay_lines, options):
    with Server(echo) as upstream:
        fw = forwarder_factory(upstream.address, **options)
        assert served(connect_from("127.0.0.1", fw.address))
        assert refused("127.0.0.3", fw.address)
        assert refused("127.0.0.3", fw.address)
        forwarder_factory.wait_closed(fw, accepted=3)
        assert upstream.accepted == 1  # the refused clients never caused a connect
        outcomes = sorted(str(r.outcome) for r in forwarder_factory.records)
        assert outcomes == ["denied", "denied", "eof"]
        assert fw.counters.outcomes[Outcome.DENIED] == 2
    denied = [r for r in relay_lines if "denied" in r.getMessage()]
    assert len(denied) == 1, [r.getMessage() for r in relay_lines]   # one line per address per minute
    assert denied[0].levelno == logging.INFO and "127.0.0.3" in denied[0].getMessage()


def test_the_denied_line_counts_what_it_held_back(forwarder_factory, relay_lines):
    with Server(echo) as upstream:
        fw = forwarder_factory(upstream.address, deny=["127.0.0.3"])
        for _ in range(3):
            assert refused("127.0.0.3", fw.address)
        forwarder_factory.wait_closed(fw, accepted=3)
        fw._context.denied_log.every = 0   # the minute is over, without waiting for it
        assert refused("127.0.0.3", fw.address)
        forwarder_factory.wait_closed(fw, accepted=4)
    denied = [r.getMessage() for r in relay_lines if "denied" in r.getMessage()]
    assert len(denied) == 2 and "2 more from 127.0.0.3" in denied[1], denied


def test_max_connections_per_client(forwarder_factory):
    gate = Gate()
    with Server(gate) as upstream:
        fw = forwarder_factory(upstream.address, max_connections_per_client=1)
        first = connect_from("127.0.0.1", fw.address)
        held = gate.get()
        assert refused("127.0.0.1", fw.address)       # a second from the same address
        other = connect_from("127.0.0.3", fw.address)                  # another address is counted apart
        held_other = gate.get()
        first.close()
        held.close()
        with forwarder_factory.closed:
            assert forwarder_factory.closed.wait_for(
                lambda: any(str(r.outcome) == "eof" for r in forwarder_factory.records), TIMEOUT)
        again = connect_from("127.0.0.1", fw.address)
        held_again = gate.get()
        for sock in (other, held_other, again, held_again):
            sock.close()
        gate.release()
        forwarder_factory.wait_closed(fw, accepted=4)
        assert upstream.accepted == 3
        assert fw._context.access.open_per_client == {}   # nothing left counted


@pytest.mark.parametrize("options, field", [
    ({"allow": ["10.0.0.0/33"]}, "allow"),
    ({"deny": ["10.1.2.3/8"]}, "deny"),          # host bits set: refused, not silently widened
    ({"deny": [42]}, "deny"),
    ({"max_connections_per_client": 0}, "max_connections_per_client"),
    ({"accept_proxy_from": ["nope"]}, "accept_proxy_from"),
    ({"proxy_protocol": "v3"}, "proxy_protocol"),
    ({"proxy_header_timeout": 0}, "proxy_header_timeout"),
])
def test_bad_values_name_the_option(options, field):
    with pytest.raises(ConfigError) as bad:
        Forwarder("127.0.0.1:0", "127.0.0.1:1", **options)
    assert bad.value.field == field


def test_a_rule_without_these_options_has_no_check():
    fw = Forwarder("127.0.0.1:0", "127.0.0.1:1")
    context = fw._context
    assert context.access is None and context.accept_proxy is None and context.proxy_version == 0


def test_cli_allow_deny_and_proxy_protocol_as_users_run_them():
    import json

    from peers import Proxy
    from test_proxy_header import read_header

    gate = Gate()
    with Server(gate) as upstream:
        proxy = Proxy("--deny", "127.0.0.3", "--proxy-protocol", "v1", "--log-format", "json",
                      f"127.0.0.1:{upstream.address[1]}")
        try:
            assert refused("127.0.0.3", proxy.address)
            denied = json.loads(proxy.wait_for('"outcome": "denied"'))
            assert denied["client"].startswith("127.0.0.3:") and denied["level"] == "INFO"
            client = connect_from("127.0.0.2", proxy.address)
            server = gate.get()
            info = read_header(server)
            assert info.source == client.getsockname() and info.destination == proxy.address
            client.close()
            server.close()
            proxy.wait_for('"outcome": "eof"')
            assert upstream.accepted == 1
        finally:
            gate.release()
            code, output = proxy.stop()
    assert code == 0, output
    assert all(json.loads(line) for line in output.splitlines())


# -- IPv4-mapped addresses (::ffff:a.b.c.d): the form a dual-stack listener reports -------------


def _ipv6_usable() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


LISTENERS = [
    pytest.param("0.0.0.0:0", id="ipv4-listener"),
    pytest.param("[::]:0", id="dual-stack-listener",
                 marks=pytest.mark.skipif(not _ipv6_usable(), reason="no IPv6")),
]


@pytest.mark.parametrize("listen", LISTENERS)
@pytest.mark.parametrize("options", [
    pytest.param({"allow": ["127.0.0.1"]}, id="allow-ipv4"),
    pytest.param({"allow": ["::ffff:127.0.0.1"]}, id="allow-mapped"),
    pytest.param({"allow": ["::ffff:127.0.0.0/127"]}, id="allow-mapped-cidr"),
    pytest.param({"deny": ["127.0.0.3"]}, id="deny-ipv4"),
    pytest.param({"deny": ["::ffff:127.0.0.3"]}, id="deny-mapped"),
    pytest.param({"deny": ["::ffff:127.0.0.2/127"]}, id="deny-mapped-cidr"),
    pytest.param({"allow": ["::ffff:127.0.0.0/104"], "deny": ["::ffff:7f00:3"]}, id="both-mapped"),
])
def test_allow_and_deny_in_either_form_on_either_listener(forwarder_factory, listen, options):
    """127.0.0.1 is served and 127.0.0.3 refused whether the rule names them as IPv4 or in the
    IPv4-mapped form, on an IPv4 listener and on a dual-stack one (which sees ::ffff:127.0.0.x)."""
    with Server(echo) as upstream:
        fw = forwarder_factory(upstream.address, listen=listen, **options)
        address = ("127.0.0.1", fw.address[1])
        assert refused("127.0.0.3", address)
        assert served(connect_from("127.0.0.1", address))
        forwarder_factory.wait_closed(fw, accepted=2)
        assert upstream.accepted == 1
        assert sorted(str(r.outcome) for r in forwarder_factory.records) == ["denied", "eof"]


@pytest.mark.parametrize("listen", LISTENERS)
def test_one_client_is_counted_once_whatever_form_it_connects_in(forwarder_factory, listen):
    """max_connections_per_client counts 127.0.0.1 once, whether it reached the listener as
    IPv4 or (on a dual-stack listener) through an IPv6 socket as ::ffff:127.0.0.1."""
    gate = Gate()
    with Server(gate) as upstream:
        fw = forwarder_factory(upstream.address, listen=listen, max_connections_per_client=1)
        first = connect_from("127.0.0.1", ("127.0.0.1", fw.address[1]))
        held = gate.get()
        if listen.startswith("["):
            second = socket.socket(socket.AF_INET6)
            second.settimeout(TIMEOUT)
            try:
                second.connect(("::ffff:127.0.0.1", fw.address[1]))
                assert second.recv(1) == b""
            except ConnectionResetError:
                pass
            finally:
                second.close()
        else:
            assert refused("127.0.0.1", ("127.0.0.1", fw.address[1]))
        for sock in (first, held):
            sock.close()
        gate.release()
        forwarder_factory.wait_closed(fw, accepted=2)
        assert upstream.accepted == 1
        assert fw._context.access.open_per_client == {}


def test_mapped_networks_are_read_as_ipv4():
    from ipaddress import ip_network

    rule = Forwarder("127.0.0.1:0", "127.0.0.1:1", allow=["::ffff:10.0.0.0/104", "::ffff:127.0.0.2", "::1"],
                     deny=["::ffff:0:0/96"], accept_proxy_from=["::ffff:10.1.2.3"]).rule
    assert rule.allow == (ip_network("10.0.0.0/8"), ip_network("127.0.0.2/32"), ip_network("::1/128"))
    assert rule.deny == (ip_network("0.0.0.0/0"),)
    assert rule.accept_proxy_from == (ip_network("10.1.2.3/32"),)


@pytest.mark.parametrize("listen", LISTENERS)
@pytest.mark.parametrize("trusted", ["127.0.0.3", "::ffff:127.0.0.3"])
def test_accept_proxy_from_in_either_form_on_either_listener(forwarder_factory, listen, trusted):
    """A trusted proxy named in either form must send a PROXY header, whose address then
    stands for the client; another client's first bytes are payload."""
    from gproxy import _proxyproto

    gate = Gate()
    with Server(gate) as upstream:
        fw = forwarder_factory(upstream.address, listen=listen, accept_proxy_from=[trusted])
        address = ("127.0.0.1", fw.address[1])
        trusted_client = connect_from("127.0.0.3", address)
        trusted_client.sendall(_proxyproto.encode_v1(("10.9.8.7", 4242), ("10.0.0.1", 80)) + b"hi")
        server = gate.get()
        assert server.recv(16) == b"hi"   # the header was taken, not passed on as payload
        other = connect_from("127.0.0.1", address)
        other.sendall(b"PROXY TCP4 is payload here")
        other_server = gate.get()
        assert recv_exactly(other_server, 26) == b"PROXY TCP4 is payload here"
        for sock in (trusted_client, server, other, other_server):
            sock.close()
        gate.release()
        forwarder_factory.wait_closed(fw, accepted=2)
    clients = sorted(r.client for r in forwarder_factory.records)
    assert clients[0] == "10.9.8.7:4242" and "127.0.0.1" in clients[1], clients
