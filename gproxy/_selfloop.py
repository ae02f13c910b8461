"""Forwarding loops: a target that leads back to the forwarder's own listening socket.

Typical use (the forwarder does this)::

    refuse_at_start(rule, listener)          # ConfigError: the target *is* the listen address
    own = OwnUpstreams() if may_loop(rule, bound) else None
    key = own.note(upstream_sock)            # after connect(): this socket's local address
    if own is not None and client_address in own: ...   # a client that is ourselves: refuse

A loop (``gproxy 127.0.0.1:P 127.0.0.1:P``) makes each connection dial the listener
again: every fd fills up, and when the client leaves, the chain stays half-closed.
Two guards, so that neither costs the ordinary path anything:

- at start, the target's addresses (a name is resolved once, briefly) are compared
  with the bound address, a wildcard listener matching every local address of its
  family with the same port: the CLI exits 2;
- for what start cannot see (a target function, a name that resolves differently
  later), a forwarder whose listening port some target could reach records the
  local address of each upstream socket it opens, and refuses an accepted client
  coming from one of them: the loop is cut at its first turn. Where no target can
  reach the listening port (the usual case), this costs nothing at all.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from typing import Dict, Iterable, Optional, Tuple

import gevent
import gevent.socket

from gproxy import _gevent
from gproxy._sockets import RawSocket
from gproxy.config import Address, ConfigError, Rule

__all__ = ["refuse_at_start", "may_loop", "OwnUpstreams", "address_key"]


#: how long start may spend resolving a target name to compare it with the listener
_RESOLVE_TIMEOUT = 2.0

Key = Tuple[str, int]


def address_key(sockaddr) -> Optional[Key]:
    """(host, port) of an IP socket address, an IPv4-mapped IPv6 host written as IPv4."""
    if not isinstance(sockaddr, tuple) or len(sockaddr) < 2:
        return None  # a Unix socket
    host = sockaddr[0]
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return host, sockaddr[1]


def may_loop(rule: Rule, bound) -> bool:
    """Could any target reach the listening port? (A target function: perhaps.)"""
    bound_key = address_key(bound)
    if bound_key is None:
        return False
    if callable(rule.target) and not isinstance(rule.target, tuple):
        return True
    return any(isinstance(t, Address) and t.port == bound_key[1] for t in _every_target(rule))


def _every_target(rule: Rule) -> tuple:
    """The rule's fixed targets, and route_sni's."""
    return rule.targets + tuple(endpoint for _name, endpoint in rule.route_sni or ())


def refuse_at_start(rule: Rule, listener: socket.socket) -> None:
    """Raise ConfigError if a target is the address ``listener`` is bound to."""
    bound = address_key(listener.getsockname())
    if bound is None:
        return
    for target in _every_target(rule):
        if not isinstance(target, Address) or target.port != bound[1]:
            continue
        for host in _resolve(target):
            if _same(host, bound[0], listener):
                raise ConfigError("target", f"{target} is this forwarder's own listening address "
                                            f"{_describe(bound)}: a forwarding loop")


def _resolve(target: Address) -> Iterable[str]:
    if target.family is not None:
        return [target.host]
    try:
        with gevent.Timeout(_RESOLVE_TIMEOUT):
            infos = gevent.socket.getaddrinfo(target.host, target.port, 0, socket.SOCK_STREAM)
    except (OSError, gevent.Timeout):
        return []  # not resolvable now: each connection resolves again, and the guard sees it
    return [key[0] for info in infos if (key := address_key(info[4])) is not None]  # all IP addresses


def _same(host: str, bound_host: str, listener: socket.socket) -> bool:
    if host == bound_host:
        return True
    try:
        bound_ip, ip = ipaddress.ip_address(bound_host), ipaddress.ip_address(host)
    except ValueError:
        return False
    if not bound_ip.is_unspecified:
        return False
    if ip.version != bound_ip.version:  # [::] takes IPv4 too unless it is IPv6-only
        if ip.version == 6 or _v6only(listener):
            return False
    return _is_local(ip)


def _v6only(listener: socket.socket) -> bool:
    try:
        return bool(listener.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY))
    except (OSError, AttributeError):
        return True


def _is_local(ip) -> bool:
    """Is ``ip`` one of this host's addresses? Binding to it says so, with no port taken."""
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    with _gevent.RealSocket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((str(ip), 0))
        except OSError as exc:
            return exc.errno != errno.EADDRNOTAVAIL
    return True


def _describe(key: Key) -> str:
    return f"[{key[0]}]:{key[1]}" if ":" in key[0] else f"{key[0]}:{key[1]}"


class OwnUpstreams:
    """The local addresses of this forwarder's upstream sockets, to know a client that is us.

    An address is noted right after ``connect()`` is called, before the loop can run
    the listener's accept, so a self-connection is never accepted unrecognised."""

    __slots__ = ("_keys",)

    def __init__(self) -> None:
        self._keys: Dict[Key, None] = {}

    def note(self, sock: RawSocket, previous: Optional[Key] = None) -> Optional[Key]:
        if previous is not None:
            self._keys.pop(previous, None)
        try:
            key = address_key(sock.getsockname())
        except OSError:
            return None
        if key is not None:
            self._keys[key] = None
        return key

    def forget(self, key: Key) -> None:
        self._keys.pop(key, None)

    def __contains__(self, client_address) -> bool:
        return address_key(client_address) in self._keys

    def __len__(self) -> int:
        return len(self._keys)
