"""PROXY protocol against real receivers: nginx (``listen ... proxy_protocol``) and HAProxy
(``accept-proxy``) answer each request with the client address and port they were told,
which must be the real client's, for v1 and v2, IPv4 and IPv6.

Both run as this user, from configs in a temporary directory, never as a system service.
Each starts daemonised: the command returns only after its listening sockets are bound,
so its exit is the readiness signal.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import textwrap

import pytest

from peers import TIMEOUT, free_port, recv_all
from test_access import connect_from
from test_proxy_header import _ipv6_loopback


def _binary(name: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed: .ci/run installs it")
        pytest.skip(f"{name} is not installed (.ci/run installs it)")
    return path


def _free_port6() -> int:
    with socket.socket(socket.AF_INET6) as sock:
        sock.bind(("::1", 0))
        return sock.getsockname()[1]


class Daemon:
    """A receiver started with ``command`` (which daemonises once bound), stopped via its pid file."""

    def __init__(self, name: str, command, pidfile: str, logfile: str, port: int, port6):
        self.name, self.pidfile, self.logfile = name, pidfile, logfile
        self.address = ("127.0.0.1", port)
        self.address6 = ("::1", port6) if port6 else None
        done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise AssertionError(f"{name} did not start ({done.returncode}): {done.stdout} {done.stderr} "
                                 f"{self.log()}")

    def log(self) -> str:
        try:
            with open(self.logfile) as f:
                return f.read()
        except OSError:
            return ""

    def stop(self) -> None:
        try:
            with open(self.pidfile) as f:
                pids = [int(p) for p in f.read().split()]
        except (OSError, ValueError):
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def nginx(tmp_path_factory):
    binary = _binary("nginx")
    root = tmp_path_factory.mktemp("nginx")
    port, port6 = free_port(), (_free_port6() if _ipv6_loopback() else None)
    listen6 = f"listen [::1]:{port6} proxy_protocol;" if port6 else ""
    temp = "\n".join(f"    {kind}_temp_path {root}/{kind};" for kind in
                     ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (root / "nginx.conf").write_text(textwrap.dedent(f"""\
        pid {root}/nginx.pid;
        error_log {root}/error.log info;
        worker_processes 1;
        events {{ worker_connections 64; }}
        http {{
            access_log off;
        {temp}
            server {{
                listen 127.0.0.1:{port} proxy_protocol;
                {listen6}
                location / {{
                    default_type text/plain;
                    return 200 "$proxy_protocol_addr $proxy_protocol_port";
                }}
            }}
        }}
        """))
    daemon = Daemon("nginx", [binary, "-p", str(root), "-c", str(root / "nginx.conf"),
                              "-e", str(root / "error.log")],
                    str(root / "nginx.pid"), str(root / "error.log"), port, port6)
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def haproxy(tmp_path_factory):
    binary = _binary("haproxy")
    root = tmp_path_factory.mktemp("haproxy")
    port, port6 = free_port(), (_free_port6() if _ipv6_loopback() else None)
    bind6 = f"    bind [::1]:{port6} accept-proxy\n" if port6 else ""
    (root / "haproxy.cfg").write_text(
        "global\n"
        f"    pidfile {root}/haproxy.pid\n"
        "defaults\n"
        "    mode http\n"
        "    timeout connect 5s\n"
        "    timeout client 20s\n"
        "    timeout server 20s\n"
        "frontend real_client\n"
        f"    bind 127.0.0.1:{port} accept-proxy\n"
        f"{bind6}"
        '    http-request return status 200 content-type text/plain lf-string "%[src] %[src_port]"\n'
    )
    daemon = Daemon("haproxy", [binary, "-D", "-f", str(root / "haproxy.cfg"), "-p", str(root / "haproxy.pid")],
                    str(root / "haproxy.pid"), str(root / "haproxy.log"), port, port6)
    yield daemon
    daemon.stop()


def ask(sock: socket.socket) -> str:
    """One HTTP/1.0 request; the body of the answer (the receiver closes after it)."""
    with sock:
        sock.sendall(b"GET / HTTP/1.0\r\nHost: gproxy.test\r\n\r\n")
        response = recv_all(sock)
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") or head.startswith(b"HTTP/1.0 200"), response
    return body.decode().strip()


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("receiver", ["nginx", "haproxy"])
def test_receiver_sees_the_real_ipv4_client(forwarder_factory, request, receiver, version):
    daemon = request.getfixturevalue(receiver)
    fw = forwarder_factory(daemon.address, proxy_protocol=version)
    client = connect_from("127.0.0.3", fw.address)   # not the forwarder's own 127.0.0.1
    source = client.getsockname()
    assert ask(client) == f"{source[0]} {source[1]}", daemon.log()
    forwarder_factory.wait_closed(fw, accepted=1)


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback")
@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("receiver", ["nginx", "haproxy"])
def test_receiver_sees_the_real_ipv6_client(forwarder_factory, request, receiver, version):
    daemon = request.getfixturevalue(receiver)
    fw = forwarder_factory(f"[{daemon.address6[0]}]:{daemon.address6[1]}", listen="[::1]:0",
                           proxy_protocol=version)
    client = socket.create_connection(("::1", fw.address[1]), timeout=TIMEOUT)
    port = client.getsockname()[1]
    assert ask(client) == f"::1 {port}", daemon.log()
    forwarder_factory.wait_closed(fw, accepted=1)


@pytest.mark.parametrize("receiver", ["nginx", "haproxy"])
def test_a_header_passed_on_from_a_trusted_proxy(forwarder_factory, request, receiver):
    """accept_proxy_from + proxy_protocol: the receiver sees the client the first proxy named."""
    from gproxy import _proxyproto
    daemon = request.getfixturevalue(receiver)
    fw = forwarder_factory(daemon.address, proxy_protocol="v2", accept_proxy_from=["127.0.0.1"])
    client = socket.create_connection(fw.address, timeout=TIMEOUT)
    client.sendall(_proxyproto.encode(1, ("203.0.113.9", 4242), ("198.51.100.1", 443)))
    assert ask(client) == "203.0.113.9 4242", daemon.log()
    forwarder_factory.wait_closed(fw, accepted=1)
