"""Real clients and servers through the gproxy command: curl to http.server, redis-cli to redis-server.

The tools come from Debian packages that .ci/run installs. Elsewhere a missing tool skips its
test, except under CI (CI=true), where it fails: a green CI must mean these ran.
"""

from __future__ import annotations

import functools
import http.server
import shutil
import subprocess
import threading

import pytest

from peers import TIMEOUT, Proxy, need, payload
from peers import redis_server as peers_redis_server


@pytest.fixture
def http_server(tmp_path):
    (tmp_path / "blob").write_bytes(payload(5_000_017, seed=11))

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[::-1])

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(Handler, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address, tmp_path
    server.shutdown()
    server.server_close()


def test_curl_downloads_and_uploads_through_gproxy(http_server):
    curl = need("curl")
    (host, port), root = http_server
    with Proxy("-q", f"{host}:{port}") as proxy:
        url = f"http://{proxy.address[0]}:{proxy.address[1]}"
        download = subprocess.run([curl, "-sS", "--fail", f"{url}/blob", "-o", str(root / "got")],
                                  capture_output=True, timeout=TIMEOUT)
        assert download.returncode == 0, download.stderr
        assert (root / "got").read_bytes() == (root / "blob").read_bytes()
        upload = subprocess.run([curl, "-sS", "--fail", "--data-binary", f"@{root / 'blob'}",
                                 "-H", "Content-Type: application/octet-stream", f"{url}/echo"],
                                capture_output=True, timeout=TIMEOUT)
        assert upload.returncode == 0, upload.stderr
        assert upload.stdout == (root / "blob").read_bytes()[::-1]
        code, output = proxy.stop()
    assert code == 0 and "Traceback" not in output


@pytest.fixture
def redis_server():
    with peers_redis_server() as port:
        yield port


def test_redis_cli_and_benchmark_through_gproxy(redis_server):
    cli = need("redis-cli")
    value = payload(1_000_003, seed=12).hex()
    with Proxy("-q", f"127.0.0.1:{redis_server}") as proxy:
        port = str(proxy.address[1])
        stored = subprocess.run([cli, "-p", port, "-x", "SET", "big"], input=value, capture_output=True,
                                text=True, timeout=TIMEOUT)
        assert stored.stdout.strip() == "OK", stored
        fetched = subprocess.run([cli, "-p", port, "--raw", "GET", "big"], capture_output=True, text=True,
                                 timeout=TIMEOUT)
        assert fetched.stdout.rstrip("\n") == value
        bench = shutil.which("redis-benchmark")
        if bench:  # many short connections at once: every one must complete
            result = subprocess.run([bench, "-p", port, "-c", "20", "-n", "2000", "-k", "0", "-t", "ping",
                                     "-q"], capture_output=True, text=True, timeout=TIMEOUT * 3)
            assert result.returncode == 0 and "requests per second" in result.stdout, result
        code, output = proxy.stop()
    assert code == 0 and "Traceback" not in output
