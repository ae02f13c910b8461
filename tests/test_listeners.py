"""Listening sockets as operators set them up: a Unix socket file's mode and owner
(``unix_mode``, ``unix_user``, ``unix_group``), applied before anyone can connect, kept over
a reload, refused with one line naming the key when wrong."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap

import pytest

import gproxy
from peers import TIMEOUT, Server, echo, recv_all

ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False
needs_root = pytest.mark.skipif(not ROOT, reason="only root can give a file to another user")
NOBODY, NOGROUP = 65534, 65534


def run_cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gproxy", *args], capture_output=True, text=True,
                          timeout=TIMEOUT, stdin=subprocess.DEVNULL, **kwargs)


def write(path, text: str) -> str:
    with open(path, "w") as f:
        f.write(textwrap.dedent(text))
    return str(path)


def echo_through(path: str, data: bytes = b"ping") -> bytes:
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(TIMEOUT)
        client.connect(path)
        client.sendall(data)
        client.shutdown(socket.SHUT_WR)
        return recv_all(client)


@pytest.fixture
def shared_dir():
    """A directory other users may pass through (pytest's tmp_path is root's alone, 0700)."""
    path = tempfile.mkdtemp(prefix="gproxy-test-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def connect_as(uid: int, gid: int, path: str) -> int:
    """connect() to ``path`` from a process running as uid:gid: 0, or the errno it got. A
    fork that only makes system calls, not a new interpreter: root's Python is in /root, which
    other users cannot enter."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 255
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            probe = socket.socket(socket.AF_UNIX)
            code = probe.connect_ex(path)
            probe.close()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


# -- the mode ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode, expected", [("0660", 0o660), ("600", 0o600), ("0o666", 0o666), (0o640, 0o640)])
def test_the_socket_file_gets_the_mode(forwarder_factory, tmp_path, mode, expected):
    path = str(tmp_path / "gproxy.sock")
    with Server(echo) as upstream:
        fw = forwarder_factory(upstream.address, listen=f"unix:{path}", unix_mode=mode)
        info = os.lstat(path)
        assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == expected
        assert fw.rule.unix_mode == expected
        assert echo_through(path) == b"ping"


def test_no_client_can_connect_before_the_mode_is_set(forwarder_factory, tmp_path, monkeypatch):
    """The mode is set between bind() and listen(): at that moment a connect() is refused, so
    nobody ever connects through the permissions bind() gave the file."""
    path = str(tmp_path / "gproxy.sock")
    seen = []
    chmod = os.chmod

    def checking_chmod(target, mode, *args, **kwargs):
        if target == path:
            with socket.socket(socket.AF_UNIX) as probe:
                seen.append(probe.connect_ex(path))
        return chmod(target, mode, *args, **kwargs)

    monkeypatch.setattr(os, "chmod", checking_chmod)
    with Server(echo) as upstream:
        forwarder_factory(upstream.address, listen=f"unix:{path}", unix_mode="0600")
    assert seen == [errno.ECONNREFUSED]
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600


def test_without_the_options_the_file_is_as_bind_makes_it(forwarder_factory, tmp_path):
    path = str(tmp_path / "gproxy.sock")
    umask = os.umask(0o022)
    os.umask(umask)
    with Server(echo) as upstream:
        forwarder_factory(upstream.address, listen=f"unix:{path}")
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o777 & ~umask


# -- the owner --------------------------------------------------------------------------------


@needs_root
@pytest.mark.parametrize("user, group", [("nobody", "nogroup"), (NOBODY, NOGROUP), ("65534", None)])
def test_the_socket_file_gets_the_owner(forwarder_factory, tmp_path, user, group):
    path = str(tmp_path / "gproxy.sock")
    with Server(echo) as upstream:
        forwarder_factory(upstream.address, listen=f"unix:{path}", unix_user=user, unix_group=group,
                          unix_mode="0600")
        info = os.lstat(path)
        assert info.st_uid == NOBODY
        assert info.st_gid == (NOGROUP if group is not None else os.getegid())
        assert stat.S_IMODE(info.st_mode) == 0o600


@needs_root
def test_another_user_connects_only_when_the_file_lets_them(forwarder_factory, shared_dir):
    """What the options are for: a client running as another user (nobody) is refused by a
    file only gproxy's user may use, and let in by one given to its group."""
    with Server(echo) as upstream:
        closed = f"{shared_dir}/closed.sock"
        forwarder_factory(upstream.address, listen=f"unix:{closed}", unix_mode="0600")
        assert connect_as(NOBODY, NOGROUP, closed) == errno.EACCES
        opened = f"{shared_dir}/open.sock"
        fw = forwarder_factory(upstream.address, listen=f"unix:{opened}", unix_mode="0660",
                               unix_group="nogroup")
        assert connect_as(NOBODY, NOGROUP, opened) == 0
        forwarder_factory.wait_closed(fw, accepted=1)


def test_a_failed_chown_names_the_key_and_leaves_no_file(tmp_path, monkeypatch):
    path = str(tmp_path / "gproxy.sock")

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EPERM, "Operation not permitted")
    monkeypatch.setattr(os, "chown", refuse)
    fw = gproxy.Forwarder(f"unix:{path}", "127.0.0.1:9", unix_user=os.geteuid(), unix_mode="0600")
    with pytest.raises(OSError) as caught:
        fw.start()
    assert str(caught.value).endswith(f"cannot listen on unix:{path}: cannot give the socket file to "
                                      f"unix_user {os.geteuid()}: operation not permitted")
    assert not os.path.exists(path)  # the file bind() made goes too


@needs_root
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs util-linux's setpriv")
def test_without_the_right_to_chown_gproxy_exits_1_with_one_line(tmp_path):
    """Root without CAP_CHOWN (as under a unit's CapabilityBoundingSet) may not give the file away."""
    path = str(tmp_path / "gproxy.sock")
    result = subprocess.run(
        ["setpriv", "--inh-caps=-chown", "--bounding-set=-chown", sys.executable, "-m", "gproxy",
         "--unix-user", "nobody", f"unix:{path}", "127.0.0.1:9"],
        capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert lines == [f"gproxy: error: cannot listen on unix:{path}: cannot give the socket file to "
                     "unix_user nobody: operation not permitted"], result.stderr
    assert not os.path.exists(path)


# -- reload -----------------------------------------------------------------------------------


def test_a_reload_applies_a_new_mode_to_the_same_socket(tmp_path):
    path = str(tmp_path / "gproxy.sock")
    config = tmp_path / "gproxy.toml"
    rule = """
        [[rule]]
        name = "redis"
        listen = "unix:{path}"
        target = "{target}"
        unix_mode = "{mode}"
        """
    with Server(echo) as upstream:
        target = "%s:%d" % upstream.address
        write(config, rule.format(path=path, target=target, mode="0600"))
        files = gproxy.load_config(str(config)).start()
        try:
            before = os.lstat(path)
            assert stat.S_IMODE(before.st_mode) == 0o600
            write(config, rule.format(path=path, target=target, mode="0666"))
            assert files.reload()
            after = os.lstat(path)
            assert stat.S_IMODE(after.st_mode) == 0o666
            assert after.st_ino == before.st_ino  # the listener was handed over, not bound again
            assert echo_through(path) == b"ping"
        finally:
            files.stop()
    assert not os.path.exists(path)


# -- bad values -------------------------------------------------------------------------------


@pytest.mark.parametrize("listen, options, field, words", [
    ("unix:/tmp/x.sock", {"unix_mode": "rw-rw----"}, "unix_mode", "octal digits"),
    ("unix:/tmp/x.sock", {"unix_mode": "0668"}, "unix_mode", "octal digits"),
    ("unix:/tmp/x.sock", {"unix_mode": "01777"}, "unix_mode", "0000 to 0777"),
    ("unix:/tmp/x.sock", {"unix_mode": 660}, "unix_mode", "decimal"),
    ("unix:/tmp/x.sock", {"unix_mode": -1}, "unix_mode", "0000 to 0777"),
    ("unix:/tmp/x.sock", {"unix_mode": True}, "unix_mode", "octal digits"),
    ("unix:/tmp/x.sock", {"unix_user": "no-such-user-here"}, "unix_user", "no such user"),
    ("unix:/tmp/x.sock", {"unix_group": "no-such-group-here"}, "unix_group", "no such group"),
    ("unix:/tmp/x.sock", {"unix_user": ""}, "unix_user", "user name or id"),
    ("unix:/tmp/x.sock", {"unix_user": -5}, "unix_user", "user name or id"),
    ("unix:/tmp/x.sock", {"unix_group": 2 ** 32 - 1}, "unix_group", "group name or id"),
    ("127.0.0.1:0", {"unix_mode": "0660"}, "unix_mode", "only for a Unix socket file"),
    ("unix:@gproxy-test", {"unix_user": "root"}, "unix_user", "abstract namespace"),
])
def test_bad_values_are_config_errors_naming_the_key(listen, options, field, words):
    with pytest.raises(gproxy.ConfigError) as caught:
        gproxy.Forwarder(listen, "127.0.0.1:9", **options)
    assert caught.value.field == field and words in str(caught.value)


@pytest.mark.parametrize("args, culprit", [
    (["--unix-mode", "0999", "unix:/tmp/gproxy-x.sock", "127.0.0.1:9"], "--unix-mode: expected a mode"),
    (["--unix-user", "no-such-user-here", "unix:/tmp/gproxy-x.sock", "127.0.0.1:9"], "--unix-user: no such user"),
    (["--unix-group", "no-such-group-here", "unix:/tmp/gproxy-x.sock", "127.0.0.1:9"],
     "--unix-group: no such group"),
    (["--unix-mode", "0660", "127.0.0.1:0", "127.0.0.1:9"], "--unix-mode: only for a Unix socket file"),
    (["--unix-mode", "0660", "--api", "127.0.0.1:0"], "--unix-mode: only with a LISTEN"),
    (["--unix-mode", "0660", "-c", "gproxy.toml"], "--unix-mode: with -c"),
])
def test_bad_command_lines_are_one_line_and_exit_2(args, culprit):
    result = run_cli(*args)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and culprit in lines[0], result.stderr
    assert not os.path.exists("/tmp/gproxy-x.sock")


GOOD_RULE = """
[[rule]]
name = "redis"
listen = "unix:/run/gproxy/redis.sock"
target = "127.0.0.1:6379"
"""


@pytest.mark.parametrize("text, culprit", [
    (GOOD_RULE + "unix_mode = 660\n", "rule 'redis': unix_mode: expected permission bits"),
    (GOOD_RULE + "unix_mode = '0o8'\n", "rule 'redis': unix_mode: expected a mode"),
    (GOOD_RULE + "unix_user = 'no-such-user-here'\n", "rule 'redis': unix_user: no such user"),
    (GOOD_RULE + "unix_group = 'no-such-group-here'\n", "rule 'redis': unix_group: no such group"),
    (GOOD_RULE.replace("unix:/run/gproxy/redis.sock", "127.0.0.1:16379") + "unix_mode = '0660'\n",
     "rule 'redis': unix_mode: only for a Unix socket file"),
    ("[defaults]\nunix_mode = 'x'\n" + GOOD_RULE, "[defaults] unix_mode: expected a mode"),
    ("[defaults]\nunix_group = 'no-such-group-here'\n" + GOOD_RULE, "[defaults] unix_group: no such group"),
])
def test_bad_files_name_file_rule_and_key(tmp_path, text, culprit):
    path = write(tmp_path / "bad.toml", text)
    result = run_cli("--check", "-c", path)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{path}: {culprit}" in lines[0], result.stderr


def test_defaults_give_the_mode_to_socket_file_rules_only(tmp_path):
    """[defaults] unix_mode is HAProxy's global unix-bind: for the rules that listen on a socket
    file; a TCP rule and an abstract socket beside them are not errors."""
    path = write(tmp_path / "ok.toml", """
        [defaults]
        unix_mode = 0o660
        unix_group = "root"

        [[rule]]
        name = "redis"
        listen = "unix:/run/gproxy/redis.sock"
        target = "127.0.0.1:6379"

        [[rule]]
        name = "web"
        listen = "127.0.0.1:18080"
        target = "127.0.0.1:8080"

        [[rule]]
        name = "abstract"
        listen = "unix:@gproxy-test"
        target = "127.0.0.1:8080"

        [[rule]]
        name = "private"
        listen = "unix:/run/gproxy/private.sock"
        target = "127.0.0.1:6379"
        unix_mode = "0600"
        """)
    result = run_cli("--check", "-c", path)
    assert result.returncode == 0, result
    lines = result.stdout.splitlines()
    assert "  redis: unix:/run/gproxy/redis.sock (mode 0660, group root) -> 127.0.0.1:6379" in lines
    assert "  web: 127.0.0.1:18080 -> 127.0.0.1:8080" in lines
    assert "  abstract: unix:@gproxy-test -> 127.0.0.1:8080" in lines
    assert "  private: unix:/run/gproxy/private.sock (mode 0600, group root) -> 127.0.0.1:6379" in lines
