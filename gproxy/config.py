"""What a forwarder is told to do: addresses, targets, timeouts and limits, validated once.

Typical use::

    rule = Rule.build("127.0.0.1:0", "db.internal:5432", idle_timeout=300)
    rule.listen      # Address(host='127.0.0.1', port=0)
    rule.target      # Address(host='db.internal', port=5432)
    Rule.build("unix:/run/app.sock", ["db1:5432", "db2:5432"], balance="round-robin").targets

Every problem raises :class:`ConfigError` (a ``ValueError``) naming the field,
so the CLI can print one line and exit 2, and embedders get a normal exception.
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import functools
import ipaddress
import logging
import math
import re
import socket
import sys
from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple, Union

try:
    import resource
except ImportError:  # Windows: no rlimits to read
    resource = None  # type: ignore[assignment]

try:
    import grp
    import pwd
except ImportError:  # Windows: no users or groups to own a socket file
    grp = pwd = None  # type: ignore[assignment]

__all__ = ["Address", "UnixAddress", "Endpoint", "Target", "ConfigError", "Rule", "parse_address",
           "parse_tcp_address", "parse_targets", "parse_target_list", "check_hook", "owner_id", "AddressLike",
           "TargetLike", "BALANCES", "CHECKS", "MAX_WEIGHT", "UNIX_FILE_OPTIONS"]

AddressLike = Union[str, int, Tuple[str, int], "Address", "UnixAddress"]
#: one of several targets: an address, a :class:`Target`, or a mapping with ``address`` and
#: optionally ``weight`` and ``backup`` (a config file's ``{address = "...", weight = 3}``)
TargetEntry = Union[AddressLike, "Target", Mapping[str, object]]
#: one address, several (tried in the order ``balance`` says), or a function of the client's
#: address returning either, called for each client
TargetLike = Union[AddressLike, Sequence[TargetEntry], Callable[..., object]]

#: the largest ``weight`` a target may have (HAProxy's)
MAX_WEIGHT = 256

#: the options that shape a Unix socket file, meaningless for any other listen address
UNIX_FILE_OPTIONS = ("unix_mode", "unix_user", "unix_group")

#: how the targets of a rule are ordered for each client
BALANCES = ("failover", "round-robin", "least-connections")
#: what an active health check does (``Rule.check``); ``None`` is no check
CHECKS = ("tcp", "send-expect", "http")
Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

#: fds kept back for the listener, logging, pipes and the interpreter itself
#: when ``max_connections`` is derived from the fd limit.
_FD_RESERVE = 64

#: a derived ``max_connections`` under this is worth a warning at startup.
_FEW_CONNECTIONS = 100

#: ``max_connections`` where the fd limit cannot be read (Windows: no ``resource`` module).
_NO_FD_LIMIT = 10000

log = logging.getLogger(__name__)


#: how a message spells the value it quotes: Python's repr, unless whoever reads the input
#: says otherwise (``spelled``: a config file's errors quote values as TOML writes them)
_spelling: "contextvars.ContextVar[Callable[[object], str]]" = contextvars.ContextVar(
    "gproxy_value_spelling", default=repr)


def show(value) -> str:
    """``value`` as an error message quotes it: in the spelling of the input being read."""
    return _spelling.get()(value)


@contextlib.contextmanager
def spelled(spell: Callable[[object], str]) -> Iterator[None]:
    """Within this block, messages quote values with ``spell`` (``gproxy._configfile``: TOML)."""
    token = _spelling.set(spell)
    try:
        yield
    finally:
        _spelling.reset(token)


#: what a string given for a number may hold (the command line gives every option as one):
#: ASCII digits only, and a sign so that "-1" is told it is out of range. int() and float()
#: would also take "1_0", " 5", "+5", "1e3", "inf" and other scripts' digits.
_WHOLE = re.compile(r"-?[0-9]+")
_DECIMAL = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")


class ConfigError(ValueError):
    """A bad address, option or value; ``field`` names the culprit."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class Address:
    """A host and a port. ``host`` is an IP literal or a name to resolve."""

    host: str
    port: int

    @functools.cached_property
    def family(self) -> Optional[int]:
        """``AF_INET``/``AF_INET6`` for an IP literal, ``None`` for a name."""
        try:
            ip = ipaddress.ip_address(self.host)
        except ValueError:
            return None
        return socket.AF_INET6 if ip.version == 6 else socket.AF_INET

    @property
    def sockaddr(self) -> Tuple[str, int]:
        return (self.host, self.port)

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class UnixAddress:
    """A Unix socket: ``path`` is a file path, or ``@name`` in Linux's abstract namespace."""

    path: str
    family = socket.AF_UNIX if hasattr(socket, "AF_UNIX") else None
    port = None

    @property
    def abstract(self) -> bool:
        return self.path.startswith("@")

    @property
    def sockaddr(self) -> str:
        """What ``bind``/``connect`` take: the path, or NUL and the name for the abstract namespace."""
        return "\0" + self.path[1:] if self.abstract else self.path

    def __str__(self) -> str:
        return f"unix:{self.path}"


Endpoint = Union[Address, UnixAddress]


@dataclass(frozen=True)
class Target:
    """One of several targets, and how the balance treats it.

    - ``address``: where to connect (an :data:`Endpoint`).
    - ``weight`` (default 1, at most 256): its share of the clients under ``round-robin``
      (smooth weighted round-robin, as nginx's: weights 3 and 1 give A A B A, not A A A B)
      and ``least-connections`` (open connections divided by the weight); ``failover``
      ignores it.
    - ``backup`` (default ``False``): given clients only while every target that is not a
      backup is down (or, for one client, failed to connect).
    - ``max_connections`` (default 0: no limit): the most connections open (or being
      connected) to it at once, from every forwarder of the rule; a client that finds every
      target it may use at its limit waits in the rule's queue (``Rule.queue_timeout``,
      ``Rule.max_queue``), HAProxy's ``maxconn`` on a ``server``.
    """

    address: Endpoint
    weight: int = 1
    backup: bool = False
    max_connections: int = 0

    def __str__(self) -> str:
        return str(self.address)


def _unix(text: str, field: str) -> UnixAddress:
    path = text[len("unix:"):]
    if UnixAddress.family is None:
        raise ConfigError(field, f"Unix sockets are not available on this platform: {show(text)}")
    if not path or path == "@":
        raise ConfigError(field, f"missing path in {show(text)} (unix:/PATH or unix:@NAME)")
    if path.startswith("@") and not sys.platform.startswith("linux"):
        raise ConfigError(field, f"the abstract namespace (unix:@NAME) is Linux only: {show(text)}")
    if "\0" in path:
        raise ConfigError(field, f"a NUL byte in {show(text)}")
    limit = 107  # sun_path is 108 bytes with its terminating NUL
    if len(path.encode()) > limit:
        raise ConfigError(field, f"a Unix socket path is at most {limit} bytes, got {len(path.encode())}")
    return UnixAddress(path)


def _port(text: Union[str, int], field: str) -> int:
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise ConfigError(field, f"port must be a whole number from 0 to 65535, got {show(text)}")
    if isinstance(text, int):
        port = text
    else:
        # ASCII digits only: str.isdigit() also takes '²' (which int() refuses) and '٨٠'.
        if not (text.isascii() and text.isdigit()):
            raise ConfigError(field, f"port must be a number from 0 to 65535, got {show(text)}")
        port = int(text)
    if not 0 <= port <= 65535:
        raise ConfigError(field, f"port must be from 0 to 65535, got {port}")
    return port


#: what a host name may hold once IDNA-encoded: letters, digits, '-', '.', and '_' (which
#: DNS itself allows and /etc/hosts, Docker and SRV names use).
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._")


def _check_host_name(host: str, field: str) -> None:
    """Refuse a name no resolver can look up, now rather than at every connection.

    A name is what the ``idna`` codec (the one ``getaddrinfo`` applies to str hosts)
    encodes, at most 253 characters, labels of 1 to 63, and not a mangled IPv4 address.
    """
    try:
        encoded = host.encode("idna").decode("ascii")
    except UnicodeError:
        encoded = None
    labels = host.rstrip(".").split(".")
    if any(not label for label in labels):
        raise ConfigError(field, f"empty label in host name {show(host)}")
    for label in (encoded or host).rstrip(".").split("."):
        if len(label) > 63:
            raise ConfigError(field, f"host name label longer than 63 characters: {show(label[:20])}...")
    if encoded is None:
        raise ConfigError(field, f"not a valid host name: {show(host)}")
    if len(encoded.rstrip(".")) > 253:
        raise ConfigError(field, f"host name longer than 253 characters: {show(host[:20])}...")
    bad = set(encoded) - _NAME_CHARS
    if bad:
        raise ConfigError(field, f"character {show(sorted(bad)[0])} cannot be in a host name: {show(host)}")
    if labels[-1].isdigit():  # DNS names never end in a numeric label: a typo'd IPv4 address
        raise ConfigError(field, f"not a valid IPv4 address: {show(host)}")


def parse_address(value: AddressLike, field: str) -> Endpoint:
    """Parse ``HOST:PORT``, ``[IPV6]:PORT``, ``PORT`` (meaning 127.0.0.1), ``(host, port)``,
    ``unix:/PATH`` or ``unix:@NAME`` (Linux's abstract namespace)."""
    if isinstance(value, (Address, UnixAddress)):
        return value
    if isinstance(value, str) and value.strip().startswith("unix:"):
        return _unix(value.strip(), field)
    if isinstance(value, tuple):
        if len(value) != 2 or not isinstance(value[0], str):
            raise ConfigError(field, f"expected (host, port), got {show(value)}")
        host, port = value[0].strip("[]"), _port(value[1], field)
    elif isinstance(value, int) and not isinstance(value, bool):
        host, port = "127.0.0.1", _port(value, field)
    elif isinstance(value, str):
        text = value.strip()
        if "://" in text:
            raise ConfigError(field, f"expected HOST:PORT, got a URL: {show(value)}")
        if text.isascii() and text.isdigit():
            host, port = "127.0.0.1", _port(text, field)
        elif text.startswith("["):
            close = text.find("]")
            if close < 0 or text[close + 1:close + 2] != ":":
                raise ConfigError(field, f"expected [IPV6]:PORT, got {show(value)}")
            host, port = text[1:close], _port(text[close + 2:], field)
        elif ":" in text:
            host, _, port_text = text.rpartition(":")
            if ":" in host:
                raise ConfigError(field, f"write an IPv6 address in brackets, [{host}]:{port_text}")
            port = _port(port_text, field)
        else:
            raise ConfigError(field, f"expected HOST:PORT, [IPV6]:PORT or PORT, got {show(value)}")
    else:
        raise ConfigError(field, f"expected an address string or (host, port), got {show(value)}")
    if not host:
        raise ConfigError(field, f"missing host in {show(value)}")
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(field, f"not an IPv6 address: {show(host)}") from None
    else:
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            _check_host_name(host, field)
    return Address(host, port)


def _is_one_address(value) -> bool:
    """A (host, port) pair, as opposed to a sequence of addresses: a list is always a
    sequence; a pair is one address unless its second item is an address itself."""
    if not isinstance(value, tuple) or len(value) != 2 or not isinstance(value[0], str):
        return False
    second = value[1]
    return not isinstance(second, (str, Address, UnixAddress, tuple, Target, Mapping)) or \
        (isinstance(second, str) and ":" not in second)


def parse_tcp_address(value: AddressLike, field: str) -> Address:
    """``parse_address`` for what listens on TCP only (the HTTP API, /metrics, a worker's port)."""
    address = parse_address(value, field)
    if isinstance(address, UnixAddress):
        raise ConfigError(field, f"expected HOST:PORT, got a Unix socket: {show(str(address))}")
    return address


_TARGET_KEYS = ("address", "weight", "backup", "max_connections")
#: the most a target's max_connections may be (a number beyond any fd table)
MAX_TARGET_CONNECTIONS = 1_000_000


def _target_entry(item, field: str, where: str) -> Target:
    """One entry of a target list: an address, a Target, or {address, weight, backup}."""
    if isinstance(item, Target):
        item = {"address": item.address, "weight": item.weight, "backup": item.backup,
                "max_connections": item.max_connections}
    if not isinstance(item, Mapping):
        return Target(parse_address(item, field))
    unknown = [key for key in item if key not in _TARGET_KEYS]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), _TARGET_KEYS, n=1)
        hint = f"did you mean {show(close[0])}?" if close else f"a target has {', '.join(_TARGET_KEYS)}"
        raise ConfigError(field, f"{where}: unknown key {show(unknown[0])} ({hint})")
    if "address" not in item:
        raise ConfigError(field, f"{where}: missing address (address = \"HOST:PORT\")")
    address = parse_address(item["address"], field)
    weight = item.get("weight", 1)
    if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= MAX_WEIGHT:
        raise ConfigError(field, f"{where} ({address}): weight: expected a whole number from 1 to "
                                 f"{MAX_WEIGHT}, got {show(weight)}")
    backup = item.get("backup", False)
    if not isinstance(backup, bool):
        raise ConfigError(field, f"{where} ({address}): backup: expected {show(True)} or {show(False)}, "
                                 f"got {show(backup)}")
    limit = item.get("max_connections", 0)
    if not valid_target_limit(limit):
        raise ConfigError(field, f"{where} ({address}): max_connections: expected a whole number from 0 "
                                 f"(no limit) to {MAX_TARGET_CONNECTIONS}, got {show(limit)}")
    return Target(address, weight, backup, limit)


def valid_target_limit(value) -> bool:
    """Whether ``value`` is a target's max_connections: a whole number, 0 (no limit) to
    MAX_TARGET_CONNECTIONS."""
    return not isinstance(value, bool) and isinstance(value, int) and 0 <= value <= MAX_TARGET_CONNECTIONS


def parse_target_list(value, field: str = "target") -> Tuple[Target, ...]:
    """One address or a list of targets (addresses, :class:`Target` objects or mappings with
    ``address``, ``weight``, ``backup``) -> a tuple of Targets: at least one, none repeated,
    not all of them backups."""
    if isinstance(value, (list, tuple)) and not _is_one_address(value):
        if not value:
            raise ConfigError(field, "expected at least one target")
        targets = tuple(_target_entry(item, field, f"target {number}") for number, item in enumerate(value, 1))
    else:
        targets = (_target_entry(value, field, "the target"),)
    for target in targets:
        if target.address.port == 0:
            raise ConfigError(field, f"port 0 cannot be connected to: {target}")
    if len({target.address for target in targets}) != len(targets):
        raise ConfigError(field, "a target is listed twice")
    if all(target.backup for target in targets):
        raise ConfigError(field, "every target is a backup: backups stand in for the others, "
                                 "so at least one must not be one")
    return targets


def parse_targets(value, field: str = "target") -> Tuple[Endpoint, ...]:
    """One address or a list of them -> a tuple of endpoints, at least one, none repeated."""
    return tuple(target.address for target in parse_target_list(value, field))


def parse_route_sni(value, field: str = "route_sni") -> Optional[Tuple[Tuple[str, Endpoint], ...]]:
    """``{"db.example": "10.0.0.5:5432", "*.cache.example": "10.0.0.6:6379"}`` (or its items)
    -> ((name, endpoint), ...), names lower case in their ASCII (IDNA) form with no trailing
    dot, a wildcard only as the whole first label; None for None or an empty mapping."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, (list, tuple)) and all(isinstance(i, (tuple, str)) for i in value):
        # (name, address) pairs, or the command line's "NAME=HOST:PORT"
        items = []
        for item in value:
            if isinstance(item, str):
                name, equals, address = item.partition("=")
                if not equals:
                    raise ConfigError(field, f"expected NAME=HOST:PORT, got {show(item)}")
                item = (name, address)
            if len(item) != 2:
                raise ConfigError(field, f"expected (name, address), got {show(item)}")
            items.append(item)
        if len({normal for normal in (str(name).strip().lower().rstrip(".") for name, _a in items)}) \
                != len(items):
            raise ConfigError(field, "a server name is routed twice")
    else:
        raise ConfigError(field, f"expected a table of server names to addresses "
                                 f"({{ \"db.example\" = \"10.0.0.5:5432\" }}), got {show(value)}")
    routes: Dict[str, Endpoint] = {}
    for name, address in items:
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(field, f"expected a server name, got {show(name)}")
        pattern = name.strip()
        wild = pattern.startswith("*.")
        host = pattern[2:] if wild else pattern
        if "*" in host:
            raise ConfigError(field, f"{show(name)}: a wildcard is only a whole first label (*.example.com)")
        try:
            ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            pass
        else:
            raise ConfigError(field, f"{show(name)}: SNI carries host names, never IP addresses")
        _check_host_name(host, f"{field}: {name}")
        host = host.encode("idna").decode("ascii").lower().rstrip(".")
        key = "*." + host if wild else host
        if key in routes:
            raise ConfigError(field, f"{show(name)} is routed twice")
        endpoint = parse_address(address, f"{field}: {name}")
        if endpoint.port == 0:
            raise ConfigError(f"{field}: {name}", f"port 0 cannot be connected to: {endpoint}")
        routes[key] = endpoint
    return tuple(routes.items()) or None


def _seconds(value, field: str, *, zero_is_off: bool) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or (isinstance(value, str) and not _DECIMAL.fullmatch(value)):
        raise ConfigError(field, f"expected a number of seconds, got {show(value)}")
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ConfigError(field, f"expected a number of seconds, got {show(value)}") from None
    if math.isnan(seconds) or seconds < 0 or math.isinf(seconds):
        raise ConfigError(field, f"expected a finite number of seconds >= 0, got {show(value)}")
    if seconds == 0 and zero_is_off:
        return None
    return seconds


def _count(value, field: str, *, minimum: int, maximum: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) \
            or (isinstance(value, str) and not _WHOLE.fullmatch(value)):
        raise ConfigError(field, f"expected a whole number, got {show(value)}")
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(field, f"expected a whole number, got {show(value)}") from None
    if number < minimum:
        raise ConfigError(field, f"must be at least {minimum}, got {number}")
    if maximum is not None and number > maximum:
        raise ConfigError(field, f"must be at most {maximum}, got {number}")
    return number


def _flag(value, field: str) -> bool:
    if not isinstance(value, bool):  # "no" is truthy: guessing would be wrong half the time
        raise ConfigError(field, f"expected {show(True)} or {show(False)}, got {show(value)}")
    return value


def _unmapped(network: Network) -> Network:
    """An IPv4-mapped network (``::ffff:10.0.0.0/104``) as the IPv4 network it stands for
    (``10.0.0.0/8``); any other network as it is. Clients are matched the same way (IPv4,
    whether they reached an IPv4 or a dual-stack listener, which reports ``::ffff:a.b.c.d``):
    a mapped network kept as IPv6 would never match anyone."""
    if network.version == 6 and network.prefixlen >= 96 and network.network_address.ipv4_mapped is not None:
        return ipaddress.IPv4Network((network.network_address.ipv4_mapped, network.prefixlen - 96))
    return network


def networks(value, field: str) -> Optional[Tuple[Network, ...]]:
    """``"10.0.0.0/8"``, ``"127.0.0.1"``, ``"::1"`` or a list of them -> a tuple of networks.
    ``None`` stays ``None`` (no list), which is not the same as an empty list. IPv4-mapped
    networks (``::ffff:127.0.0.1``) are read as the IPv4 networks they stand for."""
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    try:
        items = list(items)
    except TypeError:
        raise ConfigError(field, f"expected a list of addresses or CIDRs, got {show(value)}") from None
    parsed = []
    for item in items:
        if isinstance(item, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
            parsed.append(_unmapped(item))
            continue
        if not isinstance(item, str):
            raise ConfigError(field, f"expected an address or CIDR, got {show(item)}")
        try:
            # strict: "10.1.2.3/8" is refused rather than silently read as 10.0.0.0/8
            parsed.append(_unmapped(ipaddress.ip_network(item.strip().strip("[]"), strict=True)))
        except ValueError as exc:
            # ipaddress's own words add something only when they say which part is wrong
            why = "" if "does not appear to be" in str(exc) else f" ({exc})"
            raise ConfigError(field, f"not an address or CIDR: {show(item)}{why}") from None
    return tuple(parsed)


def _proxy_version(value) -> str:
    text = "off" if value is None or value is False else str(value).strip().lower()
    aliases = {"off": "off", "none": "off", "v1": "v1", "1": "v1", "v2": "v2", "2": "v2"}
    if text not in aliases or isinstance(value, bool) and value:
        raise ConfigError("proxy_protocol", f"expected off, v1 or v2, got {show(value)}")
    return aliases[text]


def _positive_seconds(value, field: str) -> float:
    seconds = _seconds(value, field, zero_is_off=False)
    if not seconds:
        raise ConfigError(field, f"expected a number of seconds > 0, got {show(value)}")
    return seconds


def _check_type(value) -> Optional[str]:
    if value is None or value is False:
        return None
    text = value.strip().lower() if isinstance(value, str) else None
    if text == "off":
        return None
    if text not in CHECKS:
        raise ConfigError("check", f"expected {', '.join(CHECKS)} or off, got {show(value)}")
    return text


#: what a backslash may escape in check_send: C's and TOML's spellings of the usual bytes
_ESCAPES = {"r": b"\r", "n": b"\n", "t": b"\t", "0": b"\0", "\\": b"\\", '"': b'"', "'": b"'"}
_ESCAPE = re.compile(r"\\(x[0-9A-Fa-f]{2}|.?)", re.S)

#: the most a check sends, and the most of an answer it reads (HAProxy's tune.chksize)
CHECK_BUFFER = 16384


def _check_bytes(value, field: str) -> Optional[bytes]:
    """``check_send``: bytes as they are; text with backslash escapes (``\\r``, ``\\n``,
    ``\\t``, ``\\0``, ``\\xHH``, ``\\\\``) read, so that ``PING\\r\\n`` written where no
    escape is read first (a TOML literal string, the command line) still means CR LF."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    elif isinstance(value, str):
        parts, end = [], 0
        for match in _ESCAPE.finditer(value):
            parts.append(value[end:match.start()].encode("utf-8"))
            code = match.group(1)
            if code.startswith("x") and len(code) == 3:
                parts.append(bytes((int(code[1:], 16),)))
            elif code in _ESCAPES:
                parts.append(_ESCAPES[code])
            else:
                raise ConfigError(field, f"unknown escape \\{code} in {show(value)} "
                                         "(use \\r, \\n, \\t, \\0, \\xHH or \\\\)")
            end = match.end()
        parts.append(value[end:].encode("utf-8"))
        data = b"".join(parts)
    else:
        raise ConfigError(field, f"expected text or bytes to send, got {show(value)}")
    if len(data) > CHECK_BUFFER:
        raise ConfigError(field, f"at most {CHECK_BUFFER} bytes, got {len(data)}")
    return data or None


def _check_regex(value, field: str) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(field, f"expected a regular expression, got {show(value)}")
    try:
        re.compile(value.encode("utf-8"))
    except re.error as exc:
        raise ConfigError(field, f"not a regular expression: {show(value)} ({exc})") from None
    return value


#: an HTTP method is a token (RFC 9110 5.6.2); a path and a Host are visible ASCII
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_VISIBLE = re.compile(r"[\x21-\x7e]+")


def _http_word(value, field: str, pattern: "re.Pattern[str]", what: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ConfigError(field, f"expected {what}, got {show(value)}")
    return value


def http_status_ranges(value, field: str = "check_http_status") -> Tuple[Tuple[int, int], ...]:
    """``"200-399"``, ``"200"``, ``"200,204,300-399"`` (or a number) -> ((low, high), ...)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(field, f"expected HTTP status codes such as \"200-399\", got {show(value)}")
    ranges = []
    for item in value.split(","):
        low, dash, high = item.strip().partition("-")
        if not (low.isascii() and low.isdigit() and (not dash or (high.isascii() and high.isdigit()))):
            raise ConfigError(field, f"expected codes or ranges such as \"200-399\", got {show(value)}")
        low_code, high_code = int(low), int(high or low)
        if not 100 <= low_code <= high_code <= 599:
            raise ConfigError(field, f"a range runs from 100 to 599, low to high: {show(item.strip())}")
        ranges.append((low_code, high_code))
    return tuple(ranges)


def _unix_mode(value, field: str) -> Optional[int]:
    """Permission bits, as chmod(1) takes them: a string of octal digits ("0660", "660"; a
    0o prefix too), or an int (0o660 in Python or TOML). Only 0 to 0o777: setuid, setgid and
    sticky mean nothing on a socket, and the bound catches a mode written in decimal."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        digits = text[2:] if text[:2].lower() == "0o" else text
        if not (1 <= len(digits) <= 6 and digits.isascii() and all(c in "01234567" for c in digits)):
            raise ConfigError(field, f"expected a mode in octal digits, like \"0660\", got {show(value)}")
        mode = int(digits, 8)
    elif isinstance(value, int) and not isinstance(value, bool):
        mode = value
    else:
        raise ConfigError(field, f"expected a mode in octal digits, like \"0660\", got {show(value)}")
    if not 0 <= mode <= 0o777:
        decimal = " (a bare number is decimal: write \"0660\" or 0o660)" if isinstance(value, int) else ""
        raise ConfigError(field, f"expected permission bits from 0000 to 0777, got {show(value)}{decimal}")
    return mode


#: the largest uid or gid: (uid_t)-1 means "leave it" to chown(2)
_MAX_ID = 2 ** 32 - 2


def owner_id(value: Union[str, int], kind: str) -> int:
    """The uid (``kind`` "user") or gid ("group") of a name or number, as chown(1) reads it:
    a name first, then digits as the id itself (a user without a passwd entry, such as a
    systemd DynamicUser seen from outside). ``LookupError`` naming it if there is none."""
    if isinstance(value, int):
        return value
    if pwd is None:
        raise LookupError(f"this platform has no {kind}s")
    try:
        return pwd.getpwnam(value).pw_uid if kind == "user" else grp.getgrnam(value).gr_gid
    except KeyError:
        if value.isascii() and value.isdigit() and int(value) <= _MAX_ID:
            return int(value)
        raise LookupError(f"no such {kind}: {show(value)}") from None


def _owner(value, field: str, kind: str) -> Optional[Union[str, int]]:
    """A user or group name, or a numeric id: looked up now, so that ``--check`` and a reload
    find a misspelt name rather than the bind. Kept as given (a name reads better in logs)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = value.strip()
        if not value or not value.isprintable():
            raise ConfigError(field, f"expected a {kind} name or id, got {show(value)}")
    elif isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_ID:
        raise ConfigError(field, f"expected a {kind} name or id, got {show(value)}")
    try:
        owner_id(value, kind)
    except LookupError as exc:
        raise ConfigError(field, str(exc)) from None
    return value


def check_hook(hook: Optional[Callable], field: str) -> Optional[Callable]:
    """A connection hook must be callable or ``None``: found now, not at the first client."""
    if hook is not None and not callable(hook):
        raise ConfigError(field, f"expected a function or None, got {show(hook)}")
    return hook


def default_max_connections() -> int:
    """Half the fd limit (a connection holds two fds) less a reserve, like HAProxy's maxconn.

    The reserve (for the listener, splice's pipes, logging and the interpreter) is 64 fds,
    or a quarter of a low limit, so that ``ulimit -n 64`` still leaves 24 connections, not 1;
    a figure under 100 is logged as a WARNING naming the limit.
    """
    soft = fd_limit()
    if soft is None:
        return _NO_FD_LIMIT
    reserve = min(_FD_RESERVE, soft // 4)
    figure = max(1, (soft - reserve) // 2)
    if figure < _FEW_CONNECTIONS:
        log.warning("the fd limit (ulimit -n) is %d: max_connections %d (2 fds each, %d kept in "
                    "reserve); raise the limit for more", soft, figure, reserve)
    return figure


def fd_limit() -> Optional[int]:
    """The soft limit on open fds, or None where there is none to read (no ``resource``)."""
    if resource is None:
        return None
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return soft


@dataclass(frozen=True)
class Rule:
    """One forwarding rule. ``None`` turns a timeout or limit off.

    - ``listen``: where to accept clients. Port 0 picks a free port.
    - ``target``: where to connect for each client. A name is resolved per
      connection and every address it has is tried in turn. Several targets are a
      tuple of them (of :class:`Target` objects when any has a ``weight`` or is a
      ``backup``); a function of the client's address is called per client and
      returns an address or a list. ``targets`` is always a tuple of endpoints (empty
      for a function), ``target_list`` of Targets.
    - ``name`` (default ``None``: the listen address stands for it): the rule's name in
      logs and metrics, and its identity in a config file's reload.
    - ``balance`` (default ``"failover"``): the order targets are tried in for each client.
      ``failover`` always starts from the first that is up, so new clients go back to a
      target as soon as it is up again; ``round-robin`` spreads clients over the targets
      that are up by their weights (smooth weighted round-robin); ``least-connections``
      starts from the one with fewest open connections per weight (ties: round-robin).
      Backups come after every other target that is up, down targets last. A connect that
      fails moves on to the next target for the same client.
    - ``max_fails`` (default 1): after this many connects in a row fail, a target is
      down: skipped (tried only after every other failed) for ``fail_timeout``, then
      tried again. 0 never marks a target down.
    - ``fail_timeout`` (default 10 s): how long a down target is skipped.
    - ``connect_timeout`` (default 10 s): for each connect attempt upstream;
      0 or ``None`` waits as long as the kernel does.
    - ``idle_timeout`` (default ``None``, off): close a connection that moved no
      byte in either direction for this long (0 is off too). A one-way stream
      is not idle.
    - ``half_close_timeout`` (default ``None``, off): like ``idle_timeout``, for a
      connection one side of which has already closed (HAProxy's ``timeout
      client-fin``), so peers that never finish cannot pile up.
    - ``max_connections`` (default: half the fd limit less a reserve of 64 fds, or of
      a quarter of a limit under 256; 10000 where there is no fd limit to read): at the
      limit gproxy stops accepting and the kernel's listen queue holds new clients.
    - ``backlog`` (default 1024): the listen queue length.
    - ``buffer_size`` (default 256 KiB): the most read in one call (and the pipe size
      when splicing: 256 KiB costs half the CPU per GB of 64 KiB here), and the most
      held for a peer that is not reading. Nothing is reserved per idle connection.
    - ``drain_timeout`` (default 10 s): on stop, how long open connections may
      finish before they are aborted; 0 aborts at once, ``None`` waits for ever.
    - ``splice`` (default ``True``): move bytes with ``os.splice`` (zero copy)
      where the platform has it; ``False`` always copies through user space.
    - ``bulk_threads`` (default ``None``: one per CPU, at most 8): threads that splice a
      connection's bulk off the event loop, so small messages elsewhere are not kept
      waiting (gproxy/offload.py); ``0`` splices on the event loop. Only with ``splice``.
    - ``proxy_protocol`` (default ``"off"``): ``"v1"`` or ``"v2"`` sends HAProxy's PROXY
      header (the real client and listen addresses) to the target before any payload.
    - ``accept_proxy_from`` (default ``None``: nobody): networks (CIDRs or addresses) whose
      clients must start with a PROXY v1/v2 header; its address then stands for the client
      in allow/deny, limits, logs and a PROXY header sent on.
    - ``proxy_header_timeout`` (default 5 s): how long such a client has to send its header.
    - ``allow`` (default ``None``: everyone) and ``deny`` (default ``None``: nobody):
      networks; a client in ``deny``, or outside a given ``allow``, is closed at once
      without dialling. ``deny`` is checked first. Stored as tuples of networks.
    - ``max_connections_per_client`` (default ``None``: no limit): more open connections
      than this from one client address are refused the same way.
    - ``queue_timeout`` (default ``None``: ``connect_timeout``, as HAProxy's ``timeout
      queue`` falls back to ``timeout connect``): how long a client may wait in the rule's
      queue for a target with room (targets with ``max_connections``) before it is closed
      with outcome ``queue timeout``; 0 waits as long as it takes.
    - ``max_queue`` (default 0: no limit of its own; the rule's ``max_connections`` bounds
      it, every waiter being an accepted connection): the most clients waiting at once; one
      more is closed at once, outcome ``queue timeout`` (HAProxy's ``maxqueue``, whose 0
      means the same).
    - ``reuse_port`` (default ``False``): set ``SO_REUSEPORT`` on the listening socket, so
      several processes can listen on the same address and the kernel spreads clients
      over them (``gproxy --workers``; Linux). Not for Unix sockets.

    Active health checks (off unless ``check`` is given; HAProxy's ``check``, ``inter``, ``rise``,
    ``fall`` and ``timeout check``, with its defaults). Each fixed target is checked on the
    forwarder's event loop, never holding up a client; a target is down while its check *or*
    passive health says so:

    - ``check`` (default ``None``: no check; ``"off"`` is the same): ``"tcp"`` connects;
      ``"send-expect"`` connects, sends ``check_send`` and reads until ``check_expect``
      matches what the target answers; ``"http"`` sends one request and reads the status.
    - ``check_send`` (default ``None``: send nothing, read a banner): the bytes to send; text
      is UTF-8 with backslash escapes (``"PING\\r\\n"``). At most 16384 bytes.
    - ``check_expect`` (required by ``"send-expect"``): a regular expression searched for in the
      answer (``"^\\+PONG"``); the check fails when the target closes, 16384 bytes arrive, or
      ``check_timeout`` passes without a match.
    - ``check_http_path`` (default ``"/"``), ``check_http_method`` (default ``"GET"``),
      ``check_http_host`` (default ``None``: the target's address), ``check_http_status``
      (default ``"200-399"``, HAProxy's: codes and ranges, ``"200,204"``): what ``"http"``
      sends (HTTP/1.1, ``Connection: close``) and which status codes pass.
    - ``check_interval`` (default 2 s, at least 0.01): from the start of one check to the
      start of the next (the first comes at a random point of the first interval, so many
      targets are not checked at once).
    - ``check_timeout`` (default ``None``: ``check_interval``): the most one check may take,
      resolving, connecting, sending and reading included.
    - ``rise`` (default 2) and ``fall`` (default 3): passing checks in a row that bring a down
      target up, and failing ones that take an up target down. A target starts up and its
      first check decides (HAProxy's ``init-state up``); after ``max_fails`` failed connects it
      is down until ``rise`` checks in a row pass or a client's connect works.
    - TLS (docs/tls.md): ``tls_cert`` (default ``None``: clients speak plain TCP) makes the rule
      terminate TLS with that certificate (a PEM file, its chain after it; several: chosen by
      the ClientHello's server name, the first for any other); ``tls_key`` (default ``None``:
      each key is in its certificate's file), ``tls_ca`` with ``tls_verify_client`` (mutual
      TLS), ``tls_min_version`` (default ``"1.2"``), ``tls_ciphers``, ``tls_alpn`` and
      ``tls_handshake_timeout`` (default 10 s, for each handshake, the target's too).
      ``target_tls`` (default ``False``) speaks TLS to the targets: ``target_tls_ca`` (default
      the system's CAs), ``target_tls_server_name`` (default the target's host),
      ``target_tls_cert``/``target_tls_key`` (a client certificate), ``target_tls_verify``
      (default ``True``).
    - ``unix_mode`` (default ``None``: as bind(2) makes it, 0777 less the umask),
      ``unix_user`` and ``unix_group`` (default ``None``: gproxy's own): the permission bits
      (an int, or octal digits as a string: ``"0660"``) and the owner (a name or an id) of
      a listen address's Unix socket file, set before it accepts anyone (HAProxy's ``bind
      unix@... mode user group``). Only for ``unix:/PATH``; a config file's ``[defaults]``
      apply them to its ``unix:/PATH`` rules only.
    - ``route_sni`` (default ``None``: no routing by name): server names (``"db.example"``, or
      ``"*.cache.example"`` for exactly one more label) to addresses: a client's TLS
      ClientHello is read, without terminating TLS, and a name that matches goes to that
      address; a name that matches none, no name, or bytes that are not TLS go to ``target``.
      Stored as a tuple of (name, endpoint), names lower case, no trailing dot. The client
      has ``proxy_header_timeout`` to send its ClientHello (see gproxy/_sni.py).
    """

    listen: Endpoint
    target: Union[Endpoint, Tuple[Union[Endpoint, "Target"], ...], Callable]
    name: Optional[str] = None
    balance: str = "failover"
    max_fails: int = 1
    fail_timeout: float = 10.0
    connect_timeout: Optional[float] = 10.0
    idle_timeout: Optional[float] = None
    half_close_timeout: Optional[float] = None
    max_connections: Optional[int] = None
    backlog: int = 1024
    buffer_size: int = 262144
    drain_timeout: Optional[float] = 10.0
    splice: bool = True
    bulk_threads: Optional[int] = None
    proxy_protocol: str = "off"
    accept_proxy_from: Optional[Tuple[Network, ...]] = None
    proxy_header_timeout: float = 5.0
    allow: Optional[Tuple[Network, ...]] = None
    deny: Optional[Tuple[Network, ...]] = None
    max_connections_per_client: Optional[int] = None
    queue_timeout: Optional[float] = None
    max_queue: int = 0
    reuse_port: bool = False
    check: Optional[str] = None
    check_send: Optional[bytes] = None
    check_expect: Optional[str] = None
    check_http_path: str = "/"
    check_http_method: str = "GET"
    check_http_status: str = "200-399"
    check_http_host: Optional[str] = None
    check_interval: float = 2.0
    check_timeout: Optional[float] = None
    rise: int = 2
    fall: int = 3
    unix_mode: Optional[int] = None
    unix_user: Optional[Union[str, int]] = None
    unix_group: Optional[Union[str, int]] = None
    route_sni: Optional[Tuple[Tuple[str, Endpoint], ...]] = None
    tls_cert: Optional[Tuple[str, ...]] = None
    tls_key: Optional[Tuple[str, ...]] = None
    tls_ca: Optional[str] = None
    tls_verify_client: bool = False
    tls_min_version: str = "1.2"
    tls_ciphers: Optional[str] = None
    tls_alpn: Optional[Tuple[str, ...]] = None
    tls_handshake_timeout: float = 10.0
    target_tls: bool = False
    target_tls_ca: Optional[str] = None
    target_tls_server_name: Optional[str] = None
    target_tls_cert: Optional[str] = None
    target_tls_key: Optional[str] = None
    target_tls_verify: bool = True

    @property
    def terminates_tls(self) -> bool:
        """Whether clients speak TLS to this rule (``tls_cert`` given)."""
        return self.tls_cert is not None

    @property
    def targets(self) -> Tuple[Endpoint, ...]:
        """Every fixed target's address in the order given; empty when the target is a function."""
        target = self.target
        if isinstance(target, tuple):
            return tuple(t.address if isinstance(t, Target) else t for t in target)
        return () if callable(target) else (target,)

    @property
    def target_list(self) -> Tuple[Target, ...]:
        """Every fixed target as a :class:`Target` (weight and backup); empty for a function."""
        target = self.target
        if isinstance(target, tuple):
            return tuple(t if isinstance(t, Target) else Target(t) for t in target)
        return () if callable(target) else (Target(target),)

    @classmethod
    def build(cls, listen: AddressLike, target: TargetLike, **options) -> "Rule":
        """Validate everything; raise :class:`ConfigError` naming the first bad field."""
        known = {f.name for f in fields(cls)} - {"listen", "target"}
        for name in options:
            if name not in known:
                raise ConfigError(name, "unknown option")
        defaults = cls(Address("", 0), Address("", 0))
        opt = {name: options.get(name, getattr(defaults, name)) for name in known}
        listen_address = parse_address(listen, "listen")
        if callable(target) and not isinstance(target, (str, tuple, list)):
            targets: Tuple[Endpoint, ...] = ()
        else:
            entries = parse_target_list(target, "target")
            targets = tuple(entry.address for entry in entries)
            if listen_address in targets:
                raise ConfigError("target", f"{listen_address} is the listening address: a forwarding loop")
            # plain addresses unless a weight or a backup says more; one target needs neither
            # (a limit, even on one target, routes its clients through gproxy.targets)
            plain = len(targets) == 1 and not entries[0].max_connections \
                or all(entry == Target(entry.address) for entry in entries)
            target = entries if not plain else targets[0] if len(targets) == 1 else targets
        name = opt["name"]
        if name is not None and (not isinstance(name, str) or not name.strip() or len(name) > 200
                                 or not name.isprintable()):
            raise ConfigError("name", f"expected a short printable string, got {show(name)}")
        balance = opt["balance"]
        if balance not in BALANCES:
            raise ConfigError("balance", f"expected one of {', '.join(BALANCES)}, got {show(balance)}")
        fail_timeout = _seconds(opt["fail_timeout"], "fail_timeout", zero_is_off=False)
        if fail_timeout is None:
            raise ConfigError("fail_timeout", "expected a number of seconds")
        max_connections = opt["max_connections"]
        if max_connections is None:
            max_connections = default_max_connections()
        unix_file: Dict[str, Any] = {"unix_mode": _unix_mode(opt["unix_mode"], "unix_mode"),
                     "unix_user": _owner(opt["unix_user"], "unix_user", "user"),
                     "unix_group": _owner(opt["unix_group"], "unix_group", "group")}
        for key, value in unix_file.items():
            if value is None:
                continue
            if not isinstance(listen_address, UnixAddress):
                raise ConfigError(key, f"only for a Unix socket file (listen unix:/PATH), not {listen_address}")
            if listen_address.abstract:
                raise ConfigError(key, f"{listen_address} is in the abstract namespace: there is no "
                                       "file to set a mode or owner on")
        buffer_size = _count(opt["buffer_size"], "buffer_size", minimum=1)
        if buffer_size > 64 << 20:
            raise ConfigError("buffer_size", f"must be at most 64 MiB, got {buffer_size}")
        checks = _check_options(opt, function=not targets)
        route_sni = parse_route_sni(opt["route_sni"])
        if route_sni is not None and listen_address in {endpoint for _name, endpoint in route_sni}:
            raise ConfigError("route_sni", f"{listen_address} is the listening address: a forwarding loop")
        from gproxy import _tls  # (it reads this module's helpers: imported here, not at the top)
        tls = _tls.validate(opt)
        if tls["target_tls"] and tls["target_tls_verify"] and tls["target_tls_server_name"] is None \
                and any(isinstance(t, UnixAddress) for t in targets):
            raise ConfigError("target_tls_server_name", "a Unix socket target has no host name to check its "
                                                        "certificate against: give one")
        return cls(
            listen=listen_address,
            target=target,
            name=name,
            balance=balance,
            max_fails=_count(opt["max_fails"], "max_fails", minimum=0),
            fail_timeout=fail_timeout,
            connect_timeout=_seconds(opt["connect_timeout"], "connect_timeout", zero_is_off=True),
            idle_timeout=_seconds(opt["idle_timeout"], "idle_timeout", zero_is_off=True),
            half_close_timeout=_seconds(opt["half_close_timeout"], "half_close_timeout", zero_is_off=True),
            max_connections=_count(max_connections, "max_connections", minimum=1),
            # the kernel caps the queue at net.core.somaxconn anyway; past INT_MAX listen() overflows
            backlog=_count(opt["backlog"], "backlog", minimum=1, maximum=65535),
            buffer_size=buffer_size,
            drain_timeout=_seconds(opt["drain_timeout"], "drain_timeout", zero_is_off=False),
            splice=_flag(opt["splice"], "splice"),
            bulk_threads=None if opt["bulk_threads"] is None else
            _count(opt["bulk_threads"], "bulk_threads", minimum=0, maximum=64),
            proxy_protocol=_proxy_version(opt["proxy_protocol"]),
            accept_proxy_from=networks(opt["accept_proxy_from"], "accept_proxy_from"),
            proxy_header_timeout=_positive_seconds(opt["proxy_header_timeout"], "proxy_header_timeout"),
            allow=networks(opt["allow"], "allow"),
            deny=networks(opt["deny"], "deny"),
            max_connections_per_client=None if opt["max_connections_per_client"] is None else
            _count(opt["max_connections_per_client"], "max_connections_per_client", minimum=1),
            queue_timeout=None if opt["queue_timeout"] is None else
            _seconds(opt["queue_timeout"], "queue_timeout", zero_is_off=False),
            max_queue=_count(opt["max_queue"], "max_queue", minimum=0),
            reuse_port=_flag(opt["reuse_port"], "reuse_port"),
            route_sni=route_sni,
            **checks,
            **unix_file,
            **tls,
        )


#: check options and the check types that use them (any other type refuses them when set)
CHECK_USERS = {
    "check_send": ("send-expect",), "check_expect": ("send-expect",),
    "check_http_path": ("http",), "check_http_method": ("http",), "check_http_status": ("http",),
    "check_http_host": ("http",),
}


def _check_options(opt: dict, function: bool) -> dict:
    """The health check options, validated: each alone, then together."""
    http_status = opt["check_http_status"]
    http_status = ",".join(f"{low}-{high}" if low != high else str(low)
                           for low, high in http_status_ranges(http_status))
    interval = _positive_seconds(opt["check_interval"], "check_interval")
    if interval < 0.01:
        raise ConfigError("check_interval", f"must be at least 0.01 s, got {show(opt['check_interval'])}")
    timeout = opt["check_timeout"]
    checks: Dict[str, Any] = dict(
        check=_check_type(opt["check"]),
        check_send=_check_bytes(opt["check_send"], "check_send"),
        check_expect=_check_regex(opt["check_expect"], "check_expect"),
        check_http_path=_http_word(opt["check_http_path"], "check_http_path", _VISIBLE,
                                   "a path such as \"/health\" (visible ASCII, no spaces)"),
        check_http_method=_http_word(opt["check_http_method"], "check_http_method", _TOKEN,
                                     "an HTTP method such as \"GET\""),
        check_http_status=http_status,
        check_http_host=None if opt["check_http_host"] is None else _http_word(
            opt["check_http_host"], "check_http_host", _VISIBLE, "a host name (visible ASCII, no spaces)"),
        check_interval=interval,
        check_timeout=None if timeout is None else _positive_seconds(timeout, "check_timeout"),
        rise=_count(opt["rise"], "rise", minimum=1),
        fall=_count(opt["fall"], "fall", minimum=1),
    )
    if not checks["check_http_path"].startswith("/"):
        raise ConfigError("check_http_path", f"must start with /, got {show(opt['check_http_path'])}")
    kind = checks["check"]
    if kind is None:
        return checks  # the other keys may wait in [defaults] for the rules that check
    if function:
        raise ConfigError("check", "needs fixed targets: a target function's answers are not "
                                   "known before a client comes")
    defaults = Rule(Address("", 0), Address("", 0))
    for key, users in CHECK_USERS.items():
        if kind not in users and checks[key] != getattr(defaults, key):
            raise ConfigError(key, f"is for check = {' or '.join(map(show, users))}, not {show(kind)}")
    if kind == "send-expect" and checks["check_expect"] is None:
        raise ConfigError("check_expect", f"required by check = {show('send-expect')}: a regular expression "
                                          "the target's answer must match")
    return checks
