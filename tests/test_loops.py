"""Forwarding loops: refused at start when visible, cut at the first turn when not."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys

import pytest

import gproxy
from gproxy import ConfigError
from peers import TIMEOUT, Server, connect, echo, free_port, recv_all, recv_exactly


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gproxy", *args], capture_output=True, text=True,
                          timeout=TIMEOUT, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("listen, target", [
    ("127.0.0.1:{p}", "127.0.0.1:{p}"),        # the same literal
    ("127.0.0.1:{p}", "localhost:{p}"),        # a name resolving to it
    ("0.0.0.0:{p}", "127.0.0.1:{p}"),          # a wildcard listener and a local address
])
def test_cli_refuses_a_target_that_is_its_own_listener(listen, target):
    port = free_port()
    result = run_cli(listen.format(p=port), target.format(p=port))
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gproxy: error: TARGET:") and "loop" in lines[0], lines


def test_the_same_port_elsewhere_is_no_loop(forwarder_factory):
    with Server(echo) as upstream:
        port = upstream.address[1]
        # 127.0.0.2 listens on the port the upstream (on 127.0.0.1) has: a different address
        fw = forwarder_factory(("127.0.0.1", port), listen=("127.0.0.2", port))
        with connect(fw.address) as client:
            client.sendall(b"ok")
            assert recv_exactly(client, 2) == b"ok"
        forwarder_factory.wait_closed(fw, accepted=1)


def test_start_refuses_it_in_the_api_too():
    port = free_port()
    fw = gproxy.Forwarder(f"0.0.0.0:{port}", f"localhost:{port}")
    with pytest.raises(ConfigError) as bad:
        fw.start()
    assert bad.value.field == "target"
    with socket.socket() as probe:  # the listener was closed again
        probe.bind(("127.0.0.1", port))


def test_a_loop_start_cannot_see_is_cut_at_its_first_turn(forwarder_factory, caplog):
    # A target function hides the loop from start(): it returns the forwarder's own address.
    bound = []
    caplog.set_level(logging.WARNING, logger="gproxy")
    fw = forwarder_factory(lambda client: bound[0])
    bound.append(fw.address)
    for _ in range(3):
        with connect(fw.address) as client:
            try:
                assert recv_all(client) == b""   # ended at once, one way or the other
            except ConnectionResetError:
                pass
    stats = forwarder_factory.wait_closed(fw)  # nothing left half-closed
    assert stats.active == 0 and stats.accepted <= 6, stats   # 3 clients + 3 refused selves at most
    warnings = [r.getMessage() for r in caplog.records if "forwarding loop" in r.getMessage()]
    assert len(warnings) == 3, warnings
