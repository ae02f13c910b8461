"""Who may connect: allow/deny lists, a per-client connection limit, and the rate-limited
line that says a client was refused. Checked before anything is dialled.

Typical use (relay does this for every client when the rule has any of these options)::

    access = Access.from_rule(rule)          # None when the rule restricts nobody
    why = access.admit(conn, ip)             # None: let in; else the reason, in words
    ...
    access.release(conn)                     # at teardown, for the per-client count

Addresses and networks are parsed once, when the rule is built (``config.Rule``);
per client the cost is one ``ipaddress`` parse and one membership test per network.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from typing import Dict, Optional, Sequence, Tuple, Union

__all__ = ["Access", "DeniedLog", "Network", "client_ip", "in_networks"]

log = logging.getLogger(__name__)

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

#: at most one "denied" line per client address per this many seconds
LOG_EVERY = 60.0
#: forget addresses not seen for LOG_EVERY once the table holds this many
_PRUNE_AT = 4096


def client_ip(address) -> Optional[Union[ipaddress.IPv4Address, ipaddress.IPv6Address]]:
    """The IP of an accepted client's address (IPv4-mapped IPv6 seen as IPv4); ``None`` for a
    Unix-socket client, which has no address."""
    if not isinstance(address, tuple) or not address:
        return None
    try:
        ip = ipaddress.ip_address(address[0].split("%", 1)[0])
    except (ValueError, AttributeError):
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def in_networks(ip, networks: Sequence[Network]) -> bool:
    for net in networks:
        if ip.version == net.version and ip in net:
            return True
    return False


class DeniedLog:
    """One INFO line per client address per ``LOG_EVERY`` seconds, saying how many were
    refused since that address's previous line: a scan or a flood cannot fill the log."""

    def __init__(self, logger: logging.Logger = log, every: float = LOG_EVERY) -> None:
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
        self.allow = tuple(allow) if allow is not None else None
        self.deny = tuple(deny) if deny else ()
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

    def admit(self, ip) -> Tuple[Optional[str], object]:
        """(None, key) to let the client in, counting it under ``key`` (release it at the end),
        or (reason, None) to refuse it."""
        if ip is None:
            return None, None
        if self.deny and in_networks(ip, self.deny):
            return "denied by deny", None
        if self.allow is not None and not in_networks(ip, self.allow):
            return "not in allow", None
        if self.per_client is None:
            return None, None
        count = self.open_per_client.get(ip, 0)
        if count >= self.per_client:
            return f"already {count} connection(s) from {ip} (max_connections_per_client)", None
        self.open_per_client[ip] = count + 1
        return None, ip

    def release(self, key) -> None:
        """A connection counted under ``key`` by ``admit`` has ended."""
        count = self.open_per_client.get(key, 0) - 1
        if count > 0:
            self.open_per_client[key] = count
        else:
            self.open_per_client.pop(key, None)
