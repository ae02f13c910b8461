"""Bad input is refused at construction, naming the field: never a traceback at the first client."""

from __future__ import annotations

import subprocess
import sys

import pytest

import gproxy
from gproxy import ConfigError
from gproxy.config import Rule, parse_address
from peers import TIMEOUT

LONG_LABEL = "a" * 64
LONG_NAME = ".".join(["a" * 50] * 5)  # 254 characters, labels all fine


@pytest.mark.parametrize("field, value, says", [
    # defect 6: names no resolver can look up
    ("target", f"{LONG_LABEL}.example.com:80", "longer than 63"),
    ("target", "a..b:80", "empty label"),
    ("target", f"{LONG_NAME}:80", "longer than 253"),
    ("target", "ex ample.com:80", "cannot be in a host name"),
    ("target", "db/1:80", "cannot be in a host name"),
    ("target", "999.1.1.1:80", "not a valid IPv4 address"),
    ("listen", f"{LONG_LABEL}:0", "longer than 63"),
    ("listen", ".:0", "empty label"),
    # defect 7: ports, URLs
    ("target", "127.0.0.1:²", "port"),
    ("target", "127.0.0.1:٨٠", "port"),
    ("listen", "٨٠", "HOST:PORT"),
    ("listen", ("127.0.0.1", 80.0), "port"),
    ("listen", ("127.0.0.1", None), "port"),
    ("target", ("127.0.0.1", "80.5"), "port"),
    ("target", "redis://127.0.0.1:6379", "got a URL"),
    ("target", "http://example.com/", "got a URL"),
])
def test_bad_addresses_are_config_errors_naming_the_field(field, value, says):
    other = "127.0.0.1:0" if field == "target" else "127.0.0.1:9"
    args = (other, value) if field == "target" else (value, other)
    with pytest.raises(ConfigError) as bad:
        gproxy.Forwarder(*args)
    assert bad.value.field == field and says in str(bad.value), bad.value


@pytest.mark.parametrize("address", [
    "localhost:80", "db.internal:5432", "my_db:5432", "bücher.example:80", "example.com.:80",
    f"{'a' * 63}.example:80", "[::1]:80", "1.2.3.4:80", "80",
])
def test_valid_addresses_still_pass(address):
    assert parse_address(address, "target").port in (80, 5432)


@pytest.mark.parametrize("field, value", [
    ("backlog", 2147483648), ("backlog", "2147483648"), ("backlog", 65536),
    ("buffer_size", "٨٠"), ("max_connections", "٨٠"), ("idle_timeout", "٨٠"),
    ("idle_timeout", True), ("splice", "no"), ("splice", 0), ("splice", None),
    ("on_open", "not callable"), ("on_close", 3),
    # strings are read strictly: ASCII digits (and a decimal point for seconds), nothing else
    ("max_fails", "1_0"), ("backlog", "1_0"), ("buffer_size", " 5"), ("max_connections", "+5"),
    ("idle_timeout", "1_0"), ("connect_timeout", "1e3"), ("drain_timeout", " 5"),
    ("fail_timeout", "infinity"), ("max_connections_per_client", "0x10"),
])
def test_bad_options_are_config_errors_naming_the_field(field, value):
    with pytest.raises(ConfigError) as bad:
        gproxy.Forwarder("127.0.0.1:0", "127.0.0.1:9", **{field: value})
    assert bad.value.field == field, bad.value


def test_a_target_equal_to_listen_is_refused():
    with pytest.raises(ConfigError) as bad:
        Rule.build("127.0.0.1:4000", "127.0.0.1:4000")
    assert bad.value.field == "target" and "loop" in str(bad.value)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gproxy", *args], capture_output=True, text=True,
                          timeout=TIMEOUT, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("args, culprit", [
    (["127.0.0.1:0", f"{LONG_LABEL}.example:80"], "TARGET"),
    (["127.0.0.1:0", "a..b:80"], "TARGET"),
    ([f"{LONG_LABEL}:0", "127.0.0.1:80"], "LISTEN"),
    (["127.0.0.1:0", "127.0.0.1:²"], "TARGET"),
    (["127.0.0.1:0", "127.0.0.1:٨٠"], "TARGET"),
    (["127.0.0.1:0", "redis://127.0.0.1:6379"], "TARGET"),
    (["--backlog", "2147483648", "127.0.0.1:0", "127.0.0.1:80"], "--backlog"),
    (["--bulk-threads", "-1", "127.0.0.1:0", "127.0.0.1:80"], "--bulk-threads"),
    (["--bulk-threads", "lots", "127.0.0.1:0", "127.0.0.1:80"], "--bulk-threads"),
    (["127.0.0.1:4001", "127.0.0.1:4001"], "TARGET"),
    (["--max-fails", "1_0", "127.0.0.1:0", "127.0.0.1:80"], "--max-fails"),
    (["--idle-timeout", "1_0", "127.0.0.1:0", "127.0.0.1:80"], "--idle-timeout"),
])
def test_cli_refuses_them_in_one_line_with_exit_2(args, culprit):
    result = run_cli(*args)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"gproxy: error: {culprit}:"), result.stderr


@pytest.mark.parametrize("field, value, expected", [
    ("max_fails", "3", 3), ("backlog", "-0", None), ("idle_timeout", "2.5", 2.5), ("idle_timeout", ".5", 0.5),
    ("connect_timeout", "5.", 5.0), ("drain_timeout", "0", 0.0), ("max_fails", 3, 3), ("fail_timeout", 1.5, 1.5),
])
def test_numbers_as_strings_still_pass_when_plain(field, value, expected):
    """The command line hands every option over as a string: plain ones stay accepted."""
    if expected is None:
        with pytest.raises(ConfigError):
            Rule.build("127.0.0.1:0", "127.0.0.1:9", **{field: value})
        return
    assert getattr(Rule.build("127.0.0.1:0", "127.0.0.1:9", **{field: value}), field) == expected
