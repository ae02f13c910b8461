"""Who may connect: allow/deny lists, a per-client limit, and the line saying who was refused.

All of it is checked before anything is dialled.

Typical use (relay does this for every client when the rule has any of these options)::

    access = Access.from_rule(rule)          # None when the rule restricts nobody
    why, key = access.admit(client_key(conn.client_address))   # why None: let in
    ...
    access.release(key)                      # at teardown, for the per-client count

Networks are parsed when the rule is built (``config.Rule``) and compiled to integers
here; per client the cost is one ``inet_pton`` and an AND and compare per network.

An IPv4 client is IPv4 on both sides of the comparison, whatever form it comes in: a
dual-stack listener reports it as ``::ffff:a.b.c.d`` and ``client_key`` unmaps that, and a
network written in the mapped form (``::ffff:10.0.0.0/104``) is read as the IPv4 network it
stands for (``config.networks``). So either form matches on either listener, and a client is
counted once for ``max_connections_per_client``. Other IPv6 networks (``::/0`` among them)
match IPv6 clients only.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from socket import AF_INET, AF_INET6, inet_ntop, inet_pton
from typing import Dict, Optional, Sequence, Tuple, Union

__all__ = ["Access", "DeniedLog", "Network", "client_key", "compile_networks", "describe_key", "in_networks"]


Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

#: at most one "denied" line per client address per this many seconds
LOG_EVERY = 60.0
#: forget addresses not seen for LOG_EVERY once the table holds this many
_PRUNE_AT = 4096


_MAPPED = b"\x00" * 10 + b"\xff\xff"  # ::ffff:0:0/96: IPv4 clients of a dual-stack listener

#: networks ready for matching: (address length in bytes, network as int, netmask as int)
Compiled = Tuple[Tuple[int, int, int], ...]


def client_key(address) -> Optional[bytes]:
    """An accepted client's IP, packed (4 bytes for IPv4, IPv4-mapped IPv6 included; 16 for
    IPv6), or ``None`` for a Unix-socket client, which has no address. inet_pton, not
    ipaddress: this runs for every client of a rule with access control."""
    if type(address) is not tuple or not address:
        return None
    host = address[0]
    try:
        if ":" in host:
            packed = inet_pton(AF_INET6, host.partition("%")[0])
            return packed[12:] if packed[:12] == _MAPPED else packed
        return inet_pton(AF_INET, host)
    except (OSError, TypeError, ValueError):
        return None


def describe_key(key: Optional[bytes]) -> str:
    if key is None:
        return "unix"
    return inet_ntop(AF_INET if len(key) == 4 else AF_INET6, key)


def compile_networks(networks: Optional[Sequence[Network]]) -> Compiled:
    return tuple((net.max_prefixlen // 8, int(net.network_address), int(net.netmask))
                 for net in networks or ())


def in_networks(key: bytes, networks: Compiled) -> bool:
    """Whether the packed IP ``key`` is in one of the compiled ``networks``."""
    length, value = len(key), int.from_bytes(key, "big")
    for net_length, net, mask in networks:
        if net_length == length and value & mask == net:
            return True
    return False


class DeniedLog:
    """One INFO line per client address per ``LOG_EVERY`` seconds, saying how many were
    refused since that address's previous line: a scan or a flood cannot fill the log."""

    def __init__(self, logger: logging.Logger, every: float = LOG_EVERY) -> None:
        # the caller's logger (relay's: the line is about a connection), so this module has none
        self.log = logger
        self.every = every
        self._last: Dict[str, Tuple[float, int]] = {}   # address -> (when logged, suppressed since)

    def note(self, key: str, message: str, *args, extra: Optional[dict] = None) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last[0] < self.every:
            self._last[key] = (last[0], last[1] + 1)
            return
        if len(self._last) >= _PRUNE_AT:
            self._last = {k: v for k, v in self._last.items() if now - v[0] < self.every}
        suppressed = last[1] if last is not None else 0
        more = f" ({suppressed} more from {key} in the last {self.every:g}s)" if suppressed else ""
        self._last[key] = (now, 0)
        if self.log.isEnabledFor(logging.INFO):
            self.log.info(message + more, *args, extra=extra)


class Access:
    """The allow/deny lists and the per-client limit of one rule. ``deny`` is checked first;
    without ``allow`` everyone not denied may connect. Unix-socket clients have no address:
    the lists and the per-client limit do not apply to them."""

    __slots__ = ("allow", "deny", "per_client", "open_per_client")

    def __init__(self, allow: Optional[Sequence[Network]], deny: Optional[Sequence[Network]],
                 per_client: Optional[int]) -> None:
        self.allow = compile_networks(allow) if allow is not None else None
        self.deny = compile_networks(deny)
        self.per_client = per_client
        #: open connections per client IP, for ``per_client``; entries at 0 are removed
        self.open_per_client: Dict[object, int] = {}

    @classmethod
    def from_rule(cls, rule) -> Optional["Access"]:
        """``None`` when the rule restricts nobody, so relay skips the check entirely."""
        allow = getattr(rule, "allow", None)
        deny = getattr(rule, "deny", None)
        per_client = getattr(rule, "max_connections_per_client", None)
        if allow is None and not deny and per_client is None:
            return None
        return cls(allow, deny, per_client)

    def admit(self, key: Optional[bytes]) -> Tuple[Optional[str], Optional[bytes]]:
        """For a client whose packed IP is ``key`` (``client_key``): (None, key) to let it in,
        counted under ``key`` (release it at the end) or (None, None) if not counted; or
        (reason, None) to refuse it."""
        if key is None:
            return None, None
        if self.deny and in_networks(key, self.deny):
            return "denied by deny", None
        if self.allow is not None and not in_networks(key, self.allow):
            return "not in allow", None
        if self.per_client is None:
            return None, None
        count = self.open_per_client.get(key, 0)
        if count >= self.per_client:
            return (f"already {count} connection(s) from {describe_key(key)} "
                    "(max_connections_per_client)"), None
        self.open_per_client[key] = count + 1
        return None, key

    def release(self, key) -> None:
        """A connection counted under ``key`` by ``admit`` has ended."""
        count = self.open_per_client.get(key, 0) - 1
        if count > 0:
            self.open_per_client[key] = count
        else:
            self.open_per_client.pop(key, None)
