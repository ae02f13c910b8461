"""Test peers on 127.0.0.1:0 that report to the test through queues (toxiproxy's testhelper).

Plain threads and blocking sockets: these peers are the outside world, not gproxy.
Every blocking call has a timeout, so a broken forwarder fails a test instead of hanging it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import random
import re
import select
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Callable, List, Optional, Tuple

import pytest

TIMEOUT = 20.0  # the most any single socket operation in a test may wait


def free_port() -> int:
    """A port nobody listens on: bound and closed in the same test (a refused upstream)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def unanswered_listener():
    """Yields the (host, port) of a listener whose accept queue is full, so the kernel drops
    every SYN sent to it: a connect there is never answered. listen(0) holds one connection
    (with SYN cookies, Linux's default; without them a zero backlog drops every SYN already);
    the filler is waited for until the kernel has queued it, not guessed from a connect that
    took too long, which a loaded machine can make of a connect that did complete."""
    listener = socket.socket()
    fillers = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        with open("/proc/sys/net/ipv4/tcp_syncookies") as setting:
            cookies = setting.read().strip() != "0"
        if cookies:
            fillers.append(socket.create_connection(listener.getsockname(), timeout=TIMEOUT))
            assert select.select([listener], [], [], TIMEOUT)[0], "the filler was never queued"
            # a listener's tcp_info: tcpi_unacked is its accept queue, tcpi_sacked the backlog
            queued, backlog = struct.unpack_from(
                "II", listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104), 24)
            assert queued > backlog, f"accept queue not full: {queued} queued, backlog {backlog}"
        yield listener.getsockname()
    finally:
        for sock in fillers:
            sock.close()
        listener.close()


def connect(address, timeout: float = TIMEOUT) -> socket.socket:
    """A client socket: TCP to a (host, port), or a Unix socket to a path (str or bytes)."""
    if isinstance(address, (str, bytes)):
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(timeout)
        sock.connect(address)
        return sock
    sock = socket.create_connection(tuple(address), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def reset(sock: socket.socket) -> None:
    """Close with RST."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def recv_all(sock: socket.socket, chunk: int = 1 << 16) -> bytes:
    parts = []
    while True:
        data = sock.recv(chunk)
        if not data:
            return b"".join(parts)
        parts.append(data)


def read_until_closed(sock: socket.socket) -> bytes:
    """All a peer gets until the connection ends, by FIN or by RST (a toxic that ends a
    connection may do either)."""
    got = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return got
            got += chunk
    except ConnectionResetError:
        return got


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        data = sock.recv(n - got)
        if not data:
            raise EOFError(f"EOF after {got} of {n} bytes")
        parts.append(data)
        got += len(data)
    return b"".join(parts)


def payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def send_in_odd_chunks(sock: socket.socket, data: bytes, seed: int) -> None:
    """sendall in chunks of irregular, odd sizes, so no size lines up with a buffer."""
    rng = random.Random(seed)
    view = memoryview(data)
    offset = 0
    while offset < len(view):
        size = rng.choice((1, 7, 333, 4095, 4097, 65537, 131071, 300001))
        sock.sendall(view[offset:offset + size])
        offset += size


class Server:
    """Accept on 127.0.0.1:0 (or ``address``: a (host, port), or a str for a Unix socket)
    and run ``serve(sock)`` in a thread per client."""

    def __init__(self, serve: Callable[[socket.socket], None], backlog: int = 128,
                 address=("127.0.0.1", 0)):
        self.serve = serve
        self.errors: "queue.Queue[BaseException]" = queue.Queue()
        self.accepted = 0
        self.listener = socket.socket(socket.AF_UNIX if isinstance(address, str) else socket.AF_INET)
        self.listener.bind(address)
        self.listener.listen(backlog)
        self.address = self.listener.getsockname()
        self._threads: List[threading.Thread] = []
        self._closed = False
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return  # closed
            self.accepted += 1
            sock.settimeout(TIMEOUT)
            thread = threading.Thread(target=self._run, args=(sock,), daemon=True)
            thread.start()  # before close() can see it: joining an unstarted thread raises
            self._threads.append(thread)

    def _run(self, sock: socket.socket) -> None:
        try:
            self.serve(sock)
        except BaseException as exc:  # reported to the test, which decides
            self.errors.put(exc)
        finally:
            sock.close()

    def close(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        for thread in self._threads:
            thread.join(TIMEOUT)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def echo(sock: socket.socket) -> None:
    """Echo until EOF, then half-close: the reply to a half-close is the rest plus our FIN."""
    while True:
        data = sock.recv(1 << 16)
        if not data:
            break
        sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)
    recv_all(sock)


def bulk_streams(forwarder: Callable, count: int, goal: int) -> List[int]:
    """``count`` clients of ``forwarder(upstream address)`` (which returns the address to
    connect to), each sent an endless stream by its own upstream socket, all driven by this
    one thread, so the test serves every stream alike and only the forwarder can favour one:
    each pass writes to every upstream socket that has room and reads every client that has
    bytes. Returns the bytes each client had when the first reached ``goal``."""
    block = payload(1 << 18, seed=11)
    gate = Gate()
    with Server(gate) as upstream:
        try:
            address = forwarder(upstream.address)
            clients, sources = [], []
            for _ in range(count):
                clients.append(connect(address))
                sources.append(gate.get())
            received = {c: 0 for c in clients}
            selector = selectors.DefaultSelector()
            for sock in clients + sources:
                sock.setblocking(False)
                selector.register(sock, selectors.EVENT_READ if sock in received else selectors.EVENT_WRITE)
            while max(received.values()) < goal:
                events = selector.select(TIMEOUT)
                assert events, f"no stream moved for {TIMEOUT}s: {sorted(received.values())}"
                for key, _ in events:
                    sock = key.fileobj
                    try:
                        if sock in received:
                            received[sock] += len(sock.recv(1 << 18))
                        else:
                            sock.send(block)
                    except BlockingIOError:
                        pass
            selector.close()
            for sock in clients + sources:
                sock.close()
            return [received[c] for c in clients]
        finally:
            gate.release()


class Exchange:
    """Upstream that sends ``size`` seeded bytes while it hashes all it receives, both at once;
    after its own EOF and the client's, reports (sha256 of received, count) to ``results``."""

    def __init__(self, size_for: Callable[[int], int]):
        self.size_for = size_for
        self.results: "queue.Queue[Tuple[int, str, int]]" = queue.Queue()

    def __call__(self, sock: socket.socket) -> None:
        # the client announces its stream number first, so results are matched to clients
        stream = struct.unpack("!I", recv_exactly(sock, 4))[0]
        data = payload(self.size_for(stream), seed=10_000 + stream)
        sender = threading.Thread(target=self._send, args=(sock, data, stream), daemon=True)
        sender.start()
        digest, count = hashlib.sha256(), 0
        while True:
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            digest.update(chunk)
            count += len(chunk)
        sender.join(TIMEOUT)
        self.results.put((stream, digest.hexdigest(), count))

    @staticmethod
    def _send(sock, data, seed):
        send_in_odd_chunks(sock, data, seed)
        sock.shutdown(socket.SHUT_WR)


class Gate:
    """Upstream that hands each accepted socket to the test, which drives it by hand."""

    def __init__(self):
        self.sockets: "queue.Queue[socket.socket]" = queue.Queue()
        self._done = threading.Event()

    def __call__(self, sock: socket.socket) -> None:
        self.sockets.put(sock)
        self._done.wait(TIMEOUT * 3)  # keep the socket open until the test is done with it

    def get(self) -> socket.socket:
        return self.sockets.get(timeout=TIMEOUT)

    def release(self) -> None:
        self._done.set()


class Proxy:
    """``python -m gproxy`` in a subprocess, with its stderr read line by line into a queue."""

    LISTENING = re.compile(r"listening on (\S+):(\d+) -> ")

    def __init__(self, *args: str, listen: str = "127.0.0.1:0", preexec_fn=None, argv=None, env=None,
                 python_args=(), pass_fds=()):
        """``gproxy [args...] LISTEN TARGET`` (the last of ``args`` is the target), or exactly
        ``gproxy argv...`` when ``argv`` is given (``address`` is then the first rule's).
        ``python_args`` go to the interpreter before ``-m gproxy`` (a launcher's ``-c CODE ...``)."""
        if argv is None:
            argv = [*args[:-1], listen, args[-1]] if args else [listen]
        self.process = subprocess.Popen(
            [sys.executable, *python_args, "-m", "gproxy", *argv],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            preexec_fn=preexec_fn, env=env, pass_fds=pass_fds,
        )
        self.lines: "queue.Queue[Optional[str]]" = queue.Queue()
        self.seen: List[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        try:
            match = self.LISTENING.search(self.wait_for("listening on "))
        except BaseException:
            self.kill()  # no __exit__ runs when the constructor fails
            raise
        self.address = (match.group(1), int(match.group(2))) if match else None

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_for(self, text: str, timeout: float = TIMEOUT) -> str:
        """The next stderr line containing ``text``; every line read is kept in ``seen``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line with {text!r} within {timeout}s; saw {self.seen}") from None
            if line is None:
                raise AssertionError(f"gproxy exited ({self.process.wait()}) before {text!r}; saw {self.seen}")
            self.seen.append(line)
            if text in line:
                return line

    def count_lines(self, text: str, n: int, timeout: float = TIMEOUT) -> None:
        for _ in range(n):
            self.wait_for(text, timeout)

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))

    def rss_kib(self) -> int:
        with open(f"/proc/{self.process.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def signal(self, signum=signal.SIGTERM) -> None:
        self.process.send_signal(signum)

    def stop(self) -> Tuple[int, str]:
        """SIGTERM, wait, and return (exit status, everything on stderr)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(TIMEOUT)
        while True:
            try:
                line = self.lines.get(timeout=TIMEOUT)
            except queue.Empty:
                break
            if line is None:
                break
            self.seen.append(line)
        return code, "\n".join(self.seen)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(TIMEOUT)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()


def need(tool: str) -> str:
    """The path of ``tool``: a test that needs it is skipped here without it, and fails under CI
    (``.ci/run`` must install it)."""
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is not installed; .ci/run must install it")
        pytest.skip(f"{tool} is not installed")
    return path


@contextlib.contextmanager
def redis_server():
    """A throwaway redis-server on 127.0.0.1 (no persistence): its port, once it says it is
    ready (by its own word, not by sleeping); stopped on exit."""
    server = need("redis-server")
    port = free_port()
    process = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no", "--protected-mode", "no"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in process.stdout:
            if "Ready to accept connections" in line:
                break
        else:
            pytest.fail(f"redis-server exited with {process.wait()}")
        threading.Thread(target=process.stdout.read, daemon=True).start()
        yield port
    finally:
        process.terminate()
        process.wait(TIMEOUT)
