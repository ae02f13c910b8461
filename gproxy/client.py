"""A typed client for the HTTP API of ``gproxy --api``, and of a toxiproxy server.

Typical use::

    from gproxy import toxics
    from gproxy.client import Client, NotFound

    api = Client("http://127.0.0.1:8474")      # default: $TOXIPROXY_URL, else localhost:8474
    proxy = api.create_proxy("redis", "127.0.0.1:6379", listen="127.0.0.1:26379")
    api.add_toxic("redis", toxics.latency(100, jitter=10))         # a typed helper's spec
    api.add_toxic("redis", "bandwidth", stream="upstream", attributes={"rate": 64})
    api.disable("redis"); api.enable("redis")
    mark = api.mark("redis")                    # gproxy's own routes from here on
    ...
    api.reset_connections("redis", since=mark)  # RST to what was opened since the mark
    api.start_capture("redis", "/tmp/redis.pcap"); api.stop_capture("redis")
    api.reset()                                 # every proxy enabled, every toxic gone

The calls are toxiproxy's routes (``docs/api.md``), so a real toxiproxy server answers them
too; the connection, target and capture calls are gproxy's own, and a toxiproxy server
answers them 404 (``NotFound``). Every answer is decoded into frozen dataclasses (``Proxy``,
``Toxic``, ``Connection``, ``Target``, ``Capture``); every error is an exception carrying the
HTTP status and the server's own message (``ApiError`` and its subclasses), or
``Unreachable`` when no answer came.

Only the standard library is used (``urllib.request``): no gevent, so it works in any
program, patched or not, and from any thread. Environment proxies (``http_proxy``) are not
used: the API is meant to be reached directly, usually on loopback.
"""

from __future__ import annotations

import http.client
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union, overload

if TYPE_CHECKING:
    from gproxy.toxics import AttributeValue, StreamName, ToxicSpec, ToxicType

__all__ = ["Client", "Proxy", "Toxic", "Connection", "Connections", "Target", "Capture", "Address",
           "ClientError", "ApiError", "BadRequest", "NotFound", "Conflict", "Unreachable", "DEFAULT_URL"]

#: where a client goes when neither its ``url`` nor ``$TOXIPROXY_URL`` says (toxiproxy-cli's default)
DEFAULT_URL = "http://localhost:8474"

#: seconds a call may take before it fails with ``Unreachable`` (toxiproxy's Go client: 30)
_TIMEOUT = 30.0

#: an end of a connection as gproxy's routes give it: ``(host, port)``, or a Unix socket's
#: address in words (``"unix:/run/app.sock"``)
Address = Union[Tuple[str, int], str]


# -- errors -----------------------------------------------------------------------------------

class ClientError(Exception):
    """Anything a call of ``Client`` raises."""


class ApiError(ClientError):
    """The server answered with an error: ``status`` (the HTTP status) and ``message``
    (the server's own words: the ``error`` field of its JSON, else its text)."""

    def __init__(self, status: int, message: str, body: Any = None):
        super().__init__(f"HTTP {status}: {message}")
        #: the HTTP status code
        self.status = status
        #: what the server said
        self.message = message
        #: the whole decoded JSON answer (e.g. ``/reset``'s ``failures``), or None
        self.body = body


class BadRequest(ApiError):
    """400: the request was refused as it was (a bad field, attribute or address)."""


class NotFound(ApiError):
    """404: no such proxy, toxic, connection or target (or route: gproxy's own routes on a
    toxiproxy server)."""


class Conflict(ApiError):
    """409: a proxy or toxic by that name exists already."""


class Unreachable(ClientError):
    """No answer: the server could not be reached, did not answer within the timeout, or
    answered something that is not HTTP."""


_ERRORS = {400: BadRequest, 404: NotFound, 409: Conflict}


# -- what the server says ---------------------------------------------------------------------

@dataclass(frozen=True)
class Toxic:
    """A toxic as the server lists it (toxiproxy's JSON shape)."""

    name: str
    type: str
    stream: str                      #: ``"upstream"`` or ``"downstream"``
    toxicity: float
    attributes: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Toxic":
        return cls(name=str(data.get("name", "")), type=str(data.get("type", "")),
                   stream=str(data.get("stream", "downstream")), toxicity=float(data.get("toxicity", 1.0)),
                   attributes=dict(data.get("attributes") or {}))


@dataclass(frozen=True)
class Proxy:
    """A proxy as the server lists it: ``listen`` is the real address (a port 0 asked for
    is the port it got), ``upstream`` its target(s) in words."""

    name: str
    listen: str
    upstream: str
    enabled: bool
    toxics: List[Toxic] = field(default_factory=list)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Proxy":
        return cls(name=str(data.get("name", "")), listen=str(data.get("listen", "")),
                   upstream=str(data.get("upstream", "")), enabled=bool(data.get("enabled")),
                   toxics=[Toxic.from_json(t) for t in data.get("toxics") or []])

    @property
    def host(self) -> str:
        """The host part of ``listen`` (without an IPv6 address's brackets)."""
        return _split(self.listen)[0]

    @property
    def port(self) -> int:
        """The port part of ``listen``."""
        return _split(self.listen)[1]


@dataclass(frozen=True)
class Connection:
    """An open connection of a proxy (gproxy's own routes; docs/api.md says each field)."""

    id: int
    client: Optional[Address]
    upstream: Optional[Address]         #: the target's end; None while connecting
    upstream_local: Optional[Address]   #: gproxy's end of the upstream connection: the target's client
    target: str                         #: the target as configured
    state: str                          #: connecting, open, client_eof, upstream_eof or closing
    age: float                          #: seconds since it was accepted
    bytes_upstream: int
    bytes_downstream: int

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Connection":
        return cls(id=int(data["id"]), client=_address(data.get("client")),
                   upstream=_address(data.get("upstream")), upstream_local=_address(data.get("upstream_local")),
                   target=str(data.get("target", "")), state=str(data.get("state", "")),
                   age=float(data.get("age", 0.0)), bytes_upstream=int(data.get("bytes_upstream", 0)),
                   bytes_downstream=int(data.get("bytes_downstream", 0)))


@dataclass(frozen=True)
class Connections:
    """A proxy's open connections, oldest first, and ``mark``: the id its next connection
    will get (``since=mark`` later asks for the connections opened after this list)."""

    mark: int
    connections: List[Connection]


@dataclass(frozen=True)
class Target:
    """One target of a proxy (gproxy's own routes; docs/api.md says each field). ``check``
    is the last active check's JSON, or None."""

    address: str
    state: str                          #: enabled, drain or disabled
    weight: int
    backup: bool
    up: bool
    reason: Optional[str]
    active: int
    check: Optional[Dict[str, Any]] = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Target":
        return cls(address=str(data.get("address", "")), state=str(data.get("state", "")),
                   weight=int(data.get("weight", 1)), backup=bool(data.get("backup")), up=bool(data.get("up")),
                   reason=data.get("reason"), active=int(data.get("active", 0)), check=data.get("check"))


@dataclass(frozen=True)
class Capture:
    """A proxy's capture (gproxy's own routes; docs/api.md): the pcap file it writes on the
    server's host, the one connection it captures (None: all), whether it still runs, and how
    many connections it captured."""

    path: str
    connection: Optional[int]
    running: bool
    connections: int

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Capture":
        connection = data.get("connection")
        return cls(path=str(data.get("path", "")), connection=None if connection is None else int(connection),
                   running=bool(data.get("running")), connections=int(data.get("connections", 0)))


# -- the client --------------------------------------------------------------------------------

class Client:
    """Calls to the API at ``url`` (``"http://host:port"``; a bare ``host:port`` gets
    ``http://``). ``url`` None: ``$TOXIPROXY_URL``, else ``DEFAULT_URL``. ``timeout``: seconds
    per call. Safe to share between threads: it holds no connection between calls."""

    def __init__(self, url: Optional[str] = None, *, timeout: float = _TIMEOUT,
                 user_agent: Optional[str] = None):
        url = url or os.environ.get("TOXIPROXY_URL") or DEFAULT_URL
        if "://" not in url:
            url = "http://" + url
        #: the API's base URL, without a trailing slash
        self.url = url.rstrip("/")
        self.timeout = timeout
        from gproxy import __version__
        self.user_agent = user_agent or f"gproxy-client/{__version__}"
        # no ProxyHandler from the environment: an http_proxy meant for the web must not carry
        # calls meant for a local API
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def __repr__(self) -> str:
        return f"Client({self.url!r})"

    # -- toxiproxy's routes ---------------------------------------------------------------

    def version(self) -> str:
        """The server's version (gproxy's, or toxiproxy's)."""
        answer = self._call("GET", "/version")
        return str(answer.get("version", "")) if isinstance(answer, dict) else str(answer)

    def proxies(self) -> Dict[str, Proxy]:
        """Every proxy, by name."""
        return {name: Proxy.from_json(data) for name, data in self._call("GET", "/proxies").items()}

    def proxy(self, name: str) -> Proxy:
        return Proxy.from_json(self._call("GET", _path("proxies", name)))

    def create_proxy(self, name: str, upstream: str, *, listen: Optional[str] = None,
                     enabled: bool = True) -> Proxy:
        """A new proxy from ``listen`` (None: the server's default; gproxy's is
        127.0.0.1:0) to ``upstream``. ``Conflict`` if the name is taken."""
        body: Dict[str, Any] = {"name": name, "upstream": upstream, "enabled": enabled}
        if listen is not None:
            body["listen"] = listen
        return Proxy.from_json(self._call("POST", "/proxies", body))

    def update_proxy(self, name: str, *, listen: Optional[str] = None, upstream: Optional[str] = None,
                     enabled: Optional[bool] = None) -> Proxy:
        """Change what is given (None: unchanged)."""
        body = {key: value for key, value in (("listen", listen), ("upstream", upstream), ("enabled", enabled))
                if value is not None}
        return Proxy.from_json(self._call("POST", _path("proxies", name), body))

    def enable(self, name: str) -> Proxy:
        return self.update_proxy(name, enabled=True)

    def disable(self, name: str) -> Proxy:
        """Stop listening and close the proxy's connections, until ``enable``."""
        return self.update_proxy(name, enabled=False)

    def delete_proxy(self, name: str) -> None:
        self._call("DELETE", _path("proxies", name))

    def populate(self, proxies: Iterable[Mapping[str, Any]]) -> List[Proxy]:
        """Create or replace each of ``proxies`` (``{"name", "upstream", "listen"?,
        "enabled"?}``); one that is unchanged is left alone."""
        answer = self._call("POST", "/populate", [dict(p) for p in proxies])
        return [Proxy.from_json(p) for p in answer.get("proxies") or []]

    def reset(self) -> None:
        """Every proxy enabled, every toxic removed."""
        self._call("POST", "/reset")

    def toxics(self, proxy: str) -> List[Toxic]:
        return [Toxic.from_json(t) for t in self._call("GET", _path("proxies", proxy, "toxics"))]

    def toxic(self, proxy: str, name: str) -> Toxic:
        return Toxic.from_json(self._call("GET", _path("proxies", proxy, "toxics", name)))

    @overload
    def add_toxic(self, proxy: str, toxic: "ToxicSpec", *, name: Optional[str] = None,
                  stream: Optional["StreamName"] = None, toxicity: Optional[float] = None) -> Toxic: ...

    @overload
    def add_toxic(self, proxy: str, toxic: "ToxicType", *, name: Optional[str] = None,
                  stream: Optional["StreamName"] = None, toxicity: Optional[float] = None,
                  attributes: Optional[Mapping[str, "AttributeValue"]] = None) -> Toxic: ...

    def add_toxic(self, proxy: str, toxic: Union[str, "ToxicSpec"], *, name: Optional[str] = None,
                  stream: Optional[str] = None, toxicity: Optional[float] = None,
                  attributes: Optional[Mapping[str, Any]] = None) -> Toxic:
        """Add a toxic: a typed helper's spec (``toxics.latency(100)``: its name, stream and
        toxicity stand unless given here) or a type name with ``attributes``. ``name`` None:
        the server's ``TYPE_STREAM``; ``stream`` None: downstream; ``toxicity`` None: 1."""
        if isinstance(toxic, str):
            kind, given = toxic, dict(attributes or {})
        else:
            if attributes:
                raise TypeError("give the attributes to the toxic's helper, not beside it")
            kind, given = toxic.type, dict(toxic.attributes)
            name = toxic.name if name is None else name
            stream = toxic.stream if stream is None else stream
            toxicity = toxic.toxicity if toxicity is None else toxicity
        body: Dict[str, Any] = {"type": kind, "attributes": given}
        for key, value in (("name", name), ("stream", stream), ("toxicity", toxicity)):
            if value is not None:
                body[key] = value
        return Toxic.from_json(self._call("POST", _path("proxies", proxy, "toxics"), body))

    def update_toxic(self, proxy: str, name: str, *, toxicity: Optional[float] = None,
                     attributes: Optional[Mapping[str, "AttributeValue"]] = None) -> Toxic:
        """Change a toxic's toxicity and/or some of its attributes (the rest stay)."""
        body: Dict[str, Any] = {"attributes": dict(attributes or {})}
        if toxicity is not None:
            body["toxicity"] = toxicity
        return Toxic.from_json(self._call("POST", _path("proxies", proxy, "toxics", name), body))

    def remove_toxic(self, proxy: str, name: str) -> None:
        self._call("DELETE", _path("proxies", proxy, "toxics", name))

    # -- gproxy's own routes: connections, targets, captures --------------------------------------------

    def connections(self, proxy: str, since: Optional[int] = None) -> Connections:
        """The proxy's open connections (with ``since``, those opened after that mark) and a mark."""
        answer = self._call("GET", _path("proxies", proxy, "connections") + _since(since))
        return Connections(mark=int(answer["mark"]),
                           connections=[Connection.from_json(c) for c in answer["connections"]])

    def mark(self, proxy: str) -> int:
        """The id the proxy's next connection will get: ``since=`` for the calls here."""
        return self.connections(proxy, since=1 << 62).mark  # asks for no connection, only the mark

    def connection(self, proxy: str, id: int) -> Connection:
        return Connection.from_json(self._call("GET", _path("proxies", proxy, "connections", str(id))))

    def reset_connection(self, proxy: str, id: int) -> None:
        """Abort one connection: both sides get an RST. ``NotFound`` if it is not open."""
        self._call("POST", _path("proxies", proxy, "connections", str(id), "reset"))

    def close_connection(self, proxy: str, id: int) -> None:
        """Close one connection: both sides get a FIN (EOF). ``NotFound`` if it is not open."""
        self._call("POST", _path("proxies", proxy, "connections", str(id), "close"))

    def reset_connections(self, proxy: str, since: Optional[int] = None) -> List[int]:
        """Abort every open connection (with ``since``, those opened after that mark): their ids."""
        answer = self._call("POST", _path("proxies", proxy, "connections", "reset") + _since(since))
        return [int(i) for i in answer["ids"]]

    def close_connections(self, proxy: str, since: Optional[int] = None) -> List[int]:
        """Close every open connection (with ``since``, those opened after that mark): their ids."""
        answer = self._call("POST", _path("proxies", proxy, "connections", "close") + _since(since))
        return [int(i) for i in answer["ids"]]

    def targets(self, proxy: str) -> List[Target]:
        return [Target.from_json(t) for t in self._call("GET", _path("proxies", proxy, "targets"))]

    def set_target(self, proxy: str, address: str, *, state: Optional[str] = None,
                   weight: Optional[int] = None) -> Target:
        """Set a target's ``state`` (enabled, drain, disabled) and/or ``weight``."""
        body = {key: value for key, value in (("state", state), ("weight", weight)) if value is not None}
        return Target.from_json(self._call("POST", _path("proxies", proxy, "targets", address), body))

    def start_capture(self, proxy: str, path: str, *, connection: Optional[int] = None) -> Capture:
        """Capture what crosses the proxy (or only its connection ``connection``) into ``path``,
        a pcap file the server creates on its host (``Conflict`` if it exists, or if a capture
        runs on the proxy already)."""
        body: Dict[str, Any] = {"path": path}
        if connection is not None:
            body["connection"] = connection
        return Capture.from_json(self._call("POST", _path("proxies", proxy, "capture"), body))

    def capture(self, proxy: str) -> Capture:
        """The running capture (``NotFound`` if none runs)."""
        return Capture.from_json(self._call("GET", _path("proxies", proxy, "capture")))

    def stop_capture(self, proxy: str) -> Capture:
        """Stop the running capture: its file is complete when this returns."""
        return Capture.from_json(self._call("DELETE", _path("proxies", proxy, "capture")))

    # -- HTTP ----------------------------------------------------------------------------

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        """The decoded JSON answer (None for an empty one), or the error raised."""
        data = None if body is None else json.dumps(body).encode()
        if data is None and method == "POST":
            data = b""
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"User-Agent": self.user_agent,
                                                  "Content-Type": "application/json"})
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                text = response.read()
        except urllib.error.HTTPError as error:
            with error:
                raise _api_error(error.code, _read(error)) from None
        except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise Unreachable(f"{method} {self.url}{path}: {_describe(reason)}") from None
        if not text.strip():
            return None
        try:
            return json.loads(text)
        except ValueError:
            raise Unreachable(f"{method} {self.url}{path}: the answer is not JSON: {text[:100]!r}") from None


def _read(error: urllib.error.HTTPError) -> bytes:
    try:
        return error.read()
    except OSError:
        return b""


def _api_error(status: int, raw: bytes) -> ApiError:
    """toxiproxy's ``{"error": message, "status": status}``; Go's plain text otherwise."""
    body: Any = None
    message = raw.decode("utf-8", "replace").strip()
    try:
        body = json.loads(raw)
    except ValueError:
        pass
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        message = body["error"]
    return _ERRORS.get(status, ApiError)(status, message or f"HTTP status {status}", body)


def _describe(reason: object) -> str:
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror.lower()
    return str(reason) or type(reason).__name__


def _path(*parts: str) -> str:
    """Each part percent-encoded as one path segment (a name with ``/``, ``?``, ``%``, UTF-8)."""
    return "".join("/" + urllib.parse.quote(part, safe="") for part in parts)


def _since(since: Optional[int]) -> str:
    return "" if since is None else f"?since={int(since)}"


def _address(value: Any) -> Optional[Address]:
    if isinstance(value, list) and len(value) == 2:
        return str(value[0]), int(value[1])
    return None if value is None else str(value)


def _split(listen: str) -> Tuple[str, int]:
    host, _, port = listen.rpartition(":")
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise ValueError(f"not a host:port address: {listen!r}") from None


def main(argv: Optional[List[str]] = None) -> int:
    """``gproxy-cli``, toxiproxy-cli's verbs and flags (``python -m gproxy.client``)."""
    from gproxy._clientcli import main as cli_main
    return cli_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
