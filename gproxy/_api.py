"""toxiproxy's HTTP API on ``gevent.pywsgi``: JSON in, ``Service`` calls, JSON out.

Typical use (what ``gproxy --api 127.0.0.1:8474`` does)::

    service = Service()
    api = Api(service, "127.0.0.1:8474").start()   # on this thread's hub
    api.address                                     # the real bound (host, port)
    api.mount("GET", "/metrics", render)            # render(environ) -> (status, headers, body)
    ...
    api.stop()

The routes, fields, status codes and error bodies (``{"error": "...", "status": 409}``) are
those of Shopify's toxiproxy server, so its clients drive gproxy unchanged. A request that
fails changes nothing. Nothing here forwards a byte: the service and its forwarders do.

Every call is atomic against every other (and against a config file's reload): its whole
body is read first, then the lookup by name, the change and the answer are made in one
step under the service's lock (``Service.locked``). So a proxy deleted or replaced while a
request was arriving is looked up as it is when the request is complete: 404 if it is
gone, and a toxic acknowledged is on the proxy that serves, never on one that went away.
Paths are UTF-8, percent-encoded (``/proxies/caf%C3%A9``).

gproxy's own routes sit beside toxiproxy's, under a proxy's path, and leave toxiproxy's as
they are: ``/proxies/NAME/targets...`` (run-time target control) and
``/proxies/NAME/connections...`` (list, reset or close its open connections; the only routes
that read a query string, ``?since=MARK``).

Whoever can reach this port can make the host connect anywhere: it listens on loopback
unless told otherwise. Requests from web browsers (a ``User-Agent`` starting ``Mozilla/``)
are refused, as toxiproxy refuses them, so a web page cannot drive it either.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import urllib.parse
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union, cast

from gevent.pywsgi import WSGIServer

from gproxy import __version__, _http
from gproxy._sockets import describe_address, describe_error
from gproxy.config import AddressLike, ConfigError, parse_tcp_address
from gproxy.forwarder import Forwarder
from gproxy.service import DuplicateName, ResetFailed, Service, UnknownName, is_enabled, listen_address
from gproxy.stats import ConnectionRecord
from gproxy.targets import TargetNotFound
from gproxy.toxics import default_stream

__all__ = ["Api", "ApiError", "populate_specs", "read_toxiproxy_config"]

# The logger keeps the module's old name: logger names are public (docs/operations.md#loggers).
log = logging.getLogger("gproxy.api")

#: a mounted route: environ -> (HTTP status, headers, body: bytes or an iterable of bytes)
Handler = Callable[[dict], Tuple[int, List[Tuple[str, str]], Union[bytes, Iterable[bytes]]]]

_REASONS = {200: "OK", 201: "Created", 204: "No Content", 400: "Bad Request", 403: "Forbidden",
            404: "Not Found", 405: "Method Not Allowed", 409: "Conflict", 413: "Payload Too Large",
            500: "Internal Server Error"}

#: the largest request body read; toxiproxy's bodies are a few hundred bytes.
_MAX_BODY = 1 << 20

#: an API client silent this long (between requests, or inside one) is disconnected, so stalled
#: clients cannot pile up; toxiproxy's server closes idle keep-alive connections after 60 s too.
_CLIENT_TIMEOUT = _http.CLIENT_TIMEOUT

#: where a proxy created without ``listen`` listens (toxiproxy: every interface, port 0).
_DEFAULT_LISTEN = "127.0.0.1:0"


class ApiError(Exception):
    """An answer other than success: toxiproxy's ``{"error": message, "status": status}``."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.message, self.status = message, status


def _bad_body(detail: str) -> ApiError:
    return ApiError(f"bad request body: {detail}", 400)


_PROXY_NOT_FOUND = ("proxy not found", 404)
_PROXY_EXISTS = ("proxy already exists", 409)
_TOXIC_NOT_FOUND = ("toxic not found", 404)
_NO_CAPTURE = ("no capture running", 404)
_TOXIC_EXISTS = ("toxic already exists", 409)
_INVALID_STREAM = ("stream was invalid, can be either upstream or downstream", 400)
_INVALID_TYPE = ("invalid toxic type", 400)
_TARGET_NOT_FOUND = ("target not found", 404)
_CONNECTION_NOT_FOUND = ("connection not found", 404)

#: a connection id or a mark: ASCII digits only (int() would take " 1", "+1", "١")
_DIGITS = re.compile(r"[0-9]+", re.ASCII)


class Api:
    """The HTTP API of ``service`` on ``listen`` (default loopback, toxiproxy's port 8474).

    ``drop_timeout`` is how long a deleted, replaced or moved proxy's connections may
    finish (default 0: cut at once, as toxiproxy does). ``client_timeout`` (default 60 s)
    disconnects an API client that sends nothing for that long."""

    def __init__(self, service: Service, listen: AddressLike = "127.0.0.1:8474", *,
                 drop_timeout: float = 0.0, client_timeout: float = _CLIENT_TIMEOUT):
        self.service = service
        self.listen = parse_tcp_address(listen, "api")
        self.drop_timeout = drop_timeout
        self.client_timeout = client_timeout
        self._server: Optional[WSGIServer] = None
        self._mounted: Dict[Tuple[str, str], Handler] = {}

    # -- serving -----------------------------------------------------------------------

    def mount(self, method: str, path: str, handler: Handler) -> None:
        """Serve ``method path`` (an exact path) with ``handler(environ) -> (status, headers,
        body)``, e.g. ``GET /metrics``. Mounted routes win over toxiproxy's."""
        self._mounted[(method.upper(), path)] = handler

    def start(self, listener=None) -> "Api":
        """Bind and serve on this thread's hub; ``OSError`` if the address cannot be bound.
        ``listener``: a listening gevent socket to serve on instead (one systemd passed)."""
        server = _http.server((self.listen.host, self.listen.port) if listener is None else listener, self, log,
                              client_timeout=self.client_timeout)
        try:
            server.start()
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen on {self.listen} (API): {describe_error(exc)}") from None
        self._server = server
        log.info("HTTP API (toxiproxy) listening on %s", describe_address(self.address))
        return self

    def listening_fileno(self) -> Optional[int]:
        """The listening socket's fd while serving, else None (what a handover passes on)."""
        return None if self._server is None or self._server.socket is None else self._server.socket.fileno()

    @property
    def address(self) -> Tuple[str, int]:
        """The real bound ``(host, port)``; valid once started."""
        if self._server is None:
            raise RuntimeError("the API has not been started")
        return self._server.address[:2]

    def stop(self, timeout: float = 1.0) -> None:
        """Stop accepting and let requests in progress finish for up to ``timeout`` seconds."""
        if self._server is not None:
            self._server.stop(timeout=timeout)

    # -- WSGI ------------------------------------------------------------------------------

    def __call__(self, environ: dict, start_response) -> List[bytes]:
        try:
            status, headers, body = self._respond(environ)
        except ApiError as exc:
            status, headers, body = _error(exc.message, exc.status)
        except Exception as exc:  # a bug: say so, keep serving
            log.exception("API request %s %s failed", environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"))
            status, headers, body = _error(f"internal error: {exc}", 500)
        start_response(f"{status} {_REASONS.get(status, '')}".rstrip(), headers)
        return [body] if isinstance(body, bytes) else body  # a mounted route's may be pieces

    def _respond(self, environ: dict):
        if environ.get("HTTP_USER_AGENT", "").startswith("Mozilla/"):
            # toxiproxy's answer, verbatim: a web page must not drive the API (CSRF)
            return 403, [("Content-Type", "text/plain; charset=utf-8")], b"User agent not allowed\n"
        method = environ["REQUEST_METHOD"].upper()
        try:  # WSGI hands the path over as Latin-1 text: its bytes are the client's UTF-8
            path = (environ.get("PATH_INFO") or "/").encode("latin-1").decode("utf-8")
        except UnicodeError:
            raise ApiError("bad request path: not UTF-8", 400) from None
        mounted = self._mounted.get((method, path))
        if mounted is not None:
            return mounted(environ)
        if path != "/" and path.endswith("/"):
            raise ApiError("not found", 404)
        parts = path.strip("/").split("/")
        route = _route(parts)
        if route is None:
            if any(key[1] == path for key in self._mounted):
                raise ApiError("method not allowed", 405)
            raise ApiError("not found", 404)
        name, args = route
        handler = getattr(self, f"_{name}_{method.lower()}", None)
        if method == "PATCH" and handler is None:  # toxiproxy takes PATCH for updates, POST too
            handler = getattr(self, f"_{name}_post", None)
        if handler is None:
            raise ApiError("method not allowed", 405)
        # The body first: reading it waits on the client, and nothing looked up may be
        # held across a wait. Then lookup, change and answer in one step.
        body = _read_body(environ) if method in ("POST", "PATCH") else None
        if name.startswith("connection"):  # gproxy's own: the only routes that read a query
            args = (*args, _since(environ.get("QUERY_STRING") or ""))
        with self.service.locked():
            result = handler(body, *args)
        if result is None:
            return 204, [], b""
        status, obj = result
        return status, [("Content-Type", "application/json")], json.dumps(obj).encode() + b"\n"

    # -- proxies ------------------------------------------------------------------------------

    def _proxies_get(self, body):
        return 200, {name: self._proxy_json(name, fw) for name, fw in self.service.items()}

    def _proxies_post(self, body):
        body = _object(_json(body))
        name, upstream = body.get("name"), body.get("upstream")
        _fields(body, name=str, listen=str, upstream=str, enabled=bool)
        if not name:
            raise ApiError("missing required field: name", 400)
        if not upstream:
            raise ApiError("missing required field: upstream", 400)
        if name in self.service:
            raise ApiError(*_PROXY_EXISTS)
        enabled = body.get("enabled")
        try:
            fw = self.service.create(name, body.get("listen") or _DEFAULT_LISTEN, upstream,
                                     enabled=True if enabled is None else enabled)
        except DuplicateName:
            raise ApiError(*_PROXY_EXISTS) from None
        except ConfigError as exc:
            raise _config_error(exc) from None
        except OSError as exc:
            raise ApiError(str(exc.strerror or exc), 500) from None
        return 201, self._proxy_json(name, fw)

    def _populate_post(self, body):
        try:
            specs = populate_specs(_json(body))
            try:
                forwarders = self.service.populate(specs, timeout=self.drop_timeout)
            except ConfigError as exc:
                raise _config_error(exc) from None
            except OSError as exc:
                raise ApiError(str(exc.strerror or exc), 500) from None
        except ApiError as exc:  # toxiproxy answers populate's errors with the proxies list too
            return exc.status, {"error": exc.message, "status": exc.status, "proxies": []}
        names = [spec["name"] for spec in specs]
        return 201, {"proxies": [self._proxy_json(name, fw) for name, fw in zip(names, forwarders)]}

    def _proxy_get(self, body, name):
        return 200, self._proxy_json(name, self._proxy(name))

    def _proxy_post(self, body, name):
        self._proxy(name)
        body = _object(_json(body))
        _fields(body, name=str, listen=str, upstream=str, enabled=bool)
        try:
            fw = self.service.update(name, listen=body.get("listen"), target=body.get("upstream"),
                                     enabled=body.get("enabled"), timeout=self.drop_timeout)
        except ConfigError as exc:
            raise _config_error(exc) from None
        except OSError as exc:
            raise ApiError(str(exc.strerror or exc), 500) from None
        return 200, self._proxy_json(name, fw)

    def _proxy_delete(self, body, name):
        try:
            self.service.remove(name, timeout=self.drop_timeout)
        except UnknownName:
            raise ApiError(*_PROXY_NOT_FOUND) from None

    def _reset_post(self, body):
        """toxiproxy stops at the first proxy that cannot listen again; here every other one
        is reset all the same, then 500 lists each that could not (``failures``)."""
        try:
            self.service.reset()
        except ResetFailed as exc:
            failures = [{"name": name, "listen": str(address), "error": str(error.strerror or error)}
                        for name, (address, error) in exc.failures.items()]
            return 500, {"error": f"not every proxy could be reset: {exc}", "status": 500,
                         "failures": failures}

    def _version_get(self, body):
        return 200, {"version": __version__}

    # -- toxics -----------------------------------------------------------------------------

    def _toxics_get(self, body, name):
        return 200, [_toxic_json(t) for t in _toxics_of(self._proxy(name))]

    def _toxics_post(self, body, name):
        fw = self._proxy(name)
        body = _object(_json(body))
        _fields(body, name=str, type=str, stream=str, toxicity=(int, float), attributes=dict)
        stream = (body.get("stream") or default_stream(body.get("type"))).lower()
        if stream not in ("upstream", "downstream"):
            raise ApiError(*_INVALID_STREAM)
        kind = body.get("type") or ""
        toxic_name = body.get("name") or f"{kind}_{stream}"
        _check_path_name(toxic_name)
        if any(t.name == toxic_name for t in _toxics_of(fw)):
            raise ApiError(*_TOXIC_EXISTS)
        toxicity = body.get("toxicity")
        try:
            # kind and stream are the client's strings: add_toxic checks them (ConfigError below)
            toxic = fw.add_toxic(cast(Any, kind), name=toxic_name, stream=cast(Any, stream),
                                 toxicity=1.0 if toxicity is None else toxicity,
                                 **(body.get("attributes") or {}))
        except ConfigError as exc:
            if exc.field == "type":
                raise ApiError(*_INVALID_TYPE) from None
            raise _bad_body(str(exc)) from None
        except TypeError as exc:  # an attribute name that is no keyword at all
            raise _bad_body(str(exc)) from None
        return 200, _toxic_json(toxic)

    def _toxic_get(self, body, name, toxic_name):
        return 200, _toxic_json(self._toxic(self._proxy(name), toxic_name))

    def _toxic_post(self, body, name, toxic_name):
        fw = self._proxy(name)
        self._toxic(fw, toxic_name)
        body = _object(_json(body))
        _fields(body, toxicity=(int, float), attributes=dict)
        changes = dict(body.get("attributes") or {})
        if body.get("toxicity") is not None:
            changes["toxicity"] = body["toxicity"]
        try:
            toxic = fw.update_toxic(toxic_name, **changes)
        except ConfigError as exc:
            raise _bad_body(str(exc)) from None
        except TypeError as exc:
            raise _bad_body(str(exc)) from None
        return 200, _toxic_json(toxic)

    def _toxic_delete(self, body, name, toxic_name):
        fw = self._proxy(name)
        self._toxic(fw, toxic_name)
        fw.remove_toxic(toxic_name)

    # -- gproxy's own: the targets of a proxy ----------------------------------------------------

    def _targets_get(self, body, name):
        return 200, [target.as_dict() for target in self._proxy(name).targets()]

    def _target_get(self, body, name, address):
        fw = self._proxy(name)
        try:
            return 200, fw.set_target(address).as_dict()  # no change: only the lookup
        except TargetNotFound:
            raise ApiError(*_TARGET_NOT_FOUND) from None

    def _target_post(self, body, name, address):
        fw = self._proxy(name)
        body = _object(_json(body))
        unknown = sorted(set(body) - {"state", "weight", "max_connections"})
        if unknown:  # unlike toxiproxy's routes: a misspelt field must not pass for a change
            raise _bad_body(f"unknown field {unknown[0]!r} (a target takes state, weight and max_connections)")
        if body.get("state") is None and body.get("weight") is None and body.get("max_connections") is None:
            raise _bad_body("expected state, weight or max_connections")
        try:
            target = fw.set_target(address, state=body.get("state"), weight=body.get("weight"),
                                   max_connections=body.get("max_connections"))
        except TargetNotFound:
            raise ApiError(*_TARGET_NOT_FOUND) from None
        except ConfigError as exc:
            raise ApiError(str(exc), 400) from None
        return 200, target.as_dict()

    # -- gproxy's own: the open connections of a proxy ----------------------------------------------

    def _connections_get(self, body, name, since):
        fw = self._proxy(name)
        mark = fw.mark()  # before the list: a connection accepted meanwhile is at or after it
        now = time.time()
        return 200, {"mark": mark, "connections": [_connection_json(r, now) for r in fw.connections(since)]}

    def _connections_reset_post(self, body, name, since):
        return 200, {"ids": self._cut_all(name, since, Forwarder.abort_connection)}

    def _connections_close_post(self, body, name, since):
        return 200, {"ids": self._cut_all(name, since, Forwarder.close_connection)}

    def _connection_get(self, body, name, id, since):
        fw = self._proxy(name)
        number = _connection_id(id, since)
        for record in fw.connections(number):
            if record.id == number:
                return 200, _connection_json(record, time.time())
        raise ApiError(*_CONNECTION_NOT_FOUND)

    def _connection_reset_post(self, body, name, id, since):
        self._cut(name, id, since, Forwarder.abort_connection)

    def _connection_close_post(self, body, name, id, since):
        self._cut(name, id, since, Forwarder.close_connection)

    def _cut(self, name: str, id: str, since: Optional[int], cut: Callable[[Forwarder, int], bool]) -> None:
        fw = self._proxy(name)
        if not cut(fw, _connection_id(id, since)):
            raise ApiError(*_CONNECTION_NOT_FOUND)

    def _cut_all(self, name: str, since: Optional[int], cut: Callable[[Forwarder, int], bool]) -> List[int]:
        fw = self._proxy(name)
        return [record.id for record in fw.connections(since) if cut(fw, record.id)]

    # -- captures (gproxy's own; docs/toxics.md#captures) ------------------------------------------

    def _capture_get(self, body, name):
        capture = self._proxy(name).capturing
        if capture is None:
            raise ApiError(*_NO_CAPTURE)
        return 200, _capture_json(capture)

    def _capture_post(self, body, name):
        fw = self._proxy(name)
        body = _object(_json(body))
        unknown = sorted(set(body) - {"path", "connection"})
        if unknown:
            raise _bad_body(f"unknown field {unknown[0]!r} (a capture takes path and connection)")
        _fields(body, path=str, connection=int)
        if not body.get("path"):
            raise ApiError("missing required field: path", 400)
        try:   # a new file only: the API never overwrites one
            capture = fw.capture(body["path"], connection=body.get("connection"), exclusive=True)
        except FileExistsError:
            raise ApiError(f"{body['path']} exists: a capture writes a new file", 409) from None
        except OSError as exc:
            raise ApiError(f"cannot write {body['path']}: {exc.strerror or exc}", 400) from None
        except RuntimeError:
            raise ApiError("a capture is running on this proxy", 409) from None
        return 201, _capture_json(capture)

    def _capture_delete(self, body, name):
        capture = self._proxy(name).capturing
        if capture is None:
            raise ApiError(*_NO_CAPTURE)
        capture.stop()
        return 200, _capture_json(capture)

    # -- helpers --------------------------------------------------------------------------------

    def _proxy(self, name: str) -> Forwarder:
        try:
            return self.service[name]
        except UnknownName:
            raise ApiError(*_PROXY_NOT_FOUND) from None

    @staticmethod
    def _toxic(fw: Forwarder, toxic_name: str):
        for toxic in _toxics_of(fw):
            if toxic.name == toxic_name:
                return toxic
        raise ApiError(*_TOXIC_NOT_FOUND)

    @staticmethod
    def _proxy_json(name: str, fw: Forwarder) -> Dict[str, Any]:
        return {"name": name, "listen": str(listen_address(fw)),
                "upstream": ",".join(map(str, fw.rule.targets)) or str(fw.rule.target),
                "enabled": is_enabled(fw), "toxics": [_toxic_json(t) for t in _toxics_of(fw)]}


def populate_specs(body: Any) -> List[Dict[str, Any]]:
    """toxiproxy's list of proxies (``POST /populate``'s body, and toxiproxy-server's ``-config``
    file): ``[{name, upstream, listen?, enabled?}]`` as ``Service.populate`` takes it. Fields it
    does not know are ignored, as toxiproxy ignores them; ``ApiError`` (400) names the entry."""
    if not isinstance(body, list):
        raise _bad_body(f"expected an array of proxies, got {_json_type(body)}")
    specs = []
    for index, entry in enumerate(body, 1):
        entry = _object(entry, f"proxy {index}")
        _fields(entry, where=f" at proxy {index}", name=str, listen=str, upstream=str, enabled=bool)
        if not entry.get("name"):
            raise ApiError(f"missing required field: name at proxy {index}", 400)
        if not entry.get("upstream"):
            raise ApiError(f"missing required field: upstream at proxy {index}", 400)
        enabled = entry.get("enabled")
        specs.append({"name": entry["name"], "listen": entry.get("listen") or _DEFAULT_LISTEN,
                      "target": entry["upstream"], "enabled": True if enabled is None else enabled})
    return specs


def read_toxiproxy_config(path: str) -> List[Dict[str, Any]]:
    """toxiproxy-server's ``-config FILE`` (``gproxy --toxiproxy-config FILE``): its proxies as
    ``Service.populate`` takes them, read as ``POST /populate`` reads its body; ``ConfigError``
    naming the file and the entry. toxiproxy's file has no toxics (its decoder skips the
    field): a ``toxics`` field is ignored here too, with a WARNING."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError(path, f"cannot read it: {os.strerror(exc.errno).lower() if exc.errno else exc}") \
            from None
    try:
        body = json.loads(data)
    except RecursionError:
        raise ConfigError(path, "not JSON: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(path, f"not JSON: {exc}") from None
    try:
        specs = populate_specs(body)
    except ApiError as exc:
        raise ConfigError(path, exc.message[len("bad request body: "):] if exc.message.startswith(
            "bad request body: ") else exc.message) from None
    for index, entry in enumerate(body, 1):
        if entry.get("toxics"):
            log.warning("%s: proxy %d (%s): toxics: ignored, as toxiproxy-server ignores them; give toxics "
                        "through the API, or in a config file's [[rule.toxic]]", path, index,
                        json.dumps(entry["name"]))
    return specs


def _route(parts: List[str]):
    """(handler name, path arguments) for toxiproxy's paths, or None."""
    if parts == ["proxies"]:
        return "proxies", ()
    if parts in (["populate"], ["reset"], ["version"]):
        return parts[0], ()
    if len(parts) >= 2 and parts[0] == "proxies" and parts[1]:
        if len(parts) == 2:
            return "proxy", (parts[1],)
        if len(parts) == 3 and parts[2] == "toxics":
            return "toxics", (parts[1],)
        if len(parts) == 4 and parts[2] == "toxics" and parts[3]:
            return "toxic", (parts[1], parts[3])
        if parts[2] == "connections":  # gproxy's own, beside toxiproxy's
            return _connection_route(parts[1], parts[3:])
        if parts[2:] == ["capture"]:  # gproxy's own, beside toxiproxy's
            return "capture", (parts[1],)
        if parts[2:] == ["targets"]:  # gproxy's own, beside toxiproxy's
            return "targets", (parts[1],)
        if len(parts) >= 4 and parts[2] == "targets" and parts[3]:
            # the rest of the path: a unix:/PATH target, whose slashes came percent-encoded
            # (%2F) or not, is one address (PATH_INFO arrives decoded either way)
            return "target", (parts[1], "/".join(parts[3:]))
    return None


def _connection_route(name: str, rest: List[str]):
    """``/proxies/NAME/connections[/reset|/close|/ID[/reset|/close]]``: an id is a number, so
    the words ``reset`` and ``close`` are never one."""
    if not rest:
        return "connections", (name,)
    if len(rest) == 1 and rest[0] in ("reset", "close"):
        return f"connections_{rest[0]}", (name,)
    if rest[0] and rest[0] not in ("reset", "close"):
        if len(rest) == 1:
            return "connection", (name, rest[0])
        if len(rest) == 2 and rest[1] in ("reset", "close"):
            return f"connection_{rest[1]}", (name, rest[0])
    return None


def _since(query: str) -> Optional[int]:
    """The ``since`` mark of a connections route's query (None without one)."""
    try:
        fields = urllib.parse.parse_qs(query, keep_blank_values=True, strict_parsing=bool(query),
                                       max_num_fields=10)
    except ValueError as exc:
        raise ApiError(f"bad query: {exc}", 400) from None
    unknown = sorted(set(fields) - {"since"})
    if unknown:  # a misspelt parameter must not widen what a reset reaches
        raise ApiError(f"bad query: unknown parameter {unknown[0]!r} (these routes take since)", 400)
    if "since" not in fields:
        return None
    values = fields["since"]
    if len(values) != 1 or not _DIGITS.fullmatch(values[0]) or len(values[0]) > 20:
        raise ApiError(f"since: expected a mark, a whole number from 0, got {','.join(values)!r}", 400)
    return int(values[0])


def _connection_id(text: str, since: Optional[int]) -> int:
    if since is not None:
        raise ApiError("bad query: a connection by its id takes no since", 400)
    if not _DIGITS.fullmatch(text) or len(text) > 20:
        raise ApiError(f"bad connection id: expected a whole number, got {text!r}", 400)
    return int(text)


def _connection_json(record: ConnectionRecord, now: float) -> Dict[str, Any]:
    """A connection as gproxy's own routes show it: its ends as ``[host, port]`` (a Unix
    socket's in words, ``"unix:/path"``), null until the upstream is connected."""
    return {"id": record.id, "client": _end(record.client_address), "upstream": _end(record.upstream_address),
            "upstream_local": _end(record.upstream_local_address), "target": record.upstream,
            "state": record.state, "age": round(max(0.0, now - record.started), 6),
            "bytes_upstream": record.bytes_upstream, "bytes_downstream": record.bytes_downstream}


def _end(address: Any) -> Any:
    if address is None:
        return None
    if isinstance(address, tuple):
        return [address[0], address[1]]
    return describe_address(address)

def _capture_json(capture) -> Dict[str, Any]:
    return {"path": capture.path, "connection": capture.connection, "running": capture.running,
            "connections": capture.connections}


def _toxics_of(fw: Forwarder) -> list:
    return fw.toxics()


def _toxic_json(toxic) -> Dict[str, Any]:
    return toxic.as_dict()


def _config_error(exc: ConfigError) -> ApiError:
    """400 naming the field as the JSON has it (``upstream``, which a Rule calls ``target``)."""
    field, _, message = str(exc).partition(": ")
    field = field.replace("target", "upstream")
    return ApiError(f"{field}: {message}" if message else field, 400)


def _error(message: str, status: int):
    body = json.dumps({"error": message, "status": status}).encode() + b"\n"
    return status, [("Content-Type", "application/json")], body


def _read_body(environ: dict) -> bytes:
    """The whole request body (at most ``_MAX_BODY`` bytes)."""
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        raise ApiError("bad Content-Length", 400) from None
    if length > _MAX_BODY:
        raise ApiError(f"request body over {_MAX_BODY} bytes", 413)
    try:
        data = environ["wsgi.input"].read(length) if length else environ["wsgi.input"].read(_MAX_BODY + 1)
    except OSError as exc:  # the client stalled (client_timeout) or went away mid-body
        raise _bad_body(f"cannot read it: {exc}") from None
    if len(data) > _MAX_BODY:
        raise ApiError(f"request body over {_MAX_BODY} bytes", 413)
    return data


def _json(data: Optional[bytes]) -> Any:
    if not data or not data.strip():
        raise _bad_body("EOF")  # what toxiproxy says of an empty body
    try:
        return json.loads(data)
    except RecursionError:  # the C decoder recurses per level: '[' * 100000 gets here
        raise _bad_body("nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise _bad_body(str(exc)) from None


def _check_path_name(name: str) -> None:
    """A toxic's name must be one its path can carry, as a proxy's must (``service._check_name``)."""
    if "/" in name or name in (".", "..") or not _utf8(name):
        raise _bad_body(f"name: a URL path cannot carry {name!r}")


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, which JSON's \ud800 can spell
        return False
    return True


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), "a number")


def _object(value: Any, where: str = "") -> dict:
    if not isinstance(value, dict):
        raise _bad_body(f"expected an object{' for ' + where if where else ''}, got {_json_type(value)}")
    return value


def _fields(body: dict, where: str = "", **types) -> None:
    """Each field present and not null has its JSON type (toxiproxy's decoder rejects the rest;
    like it, fields it does not know are ignored). ``where`` ends the message (`` at proxy 2``)."""
    for key, kind in types.items():
        value = body.get(key)
        if value is None:
            continue
        wrong = (not isinstance(value, kind)) or (kind is not bool and isinstance(value, bool))
        if wrong:
            raise _bad_body(f"{key}: expected {_json_type(_example(kind))}, got {_json_type(value)}{where}")


def _example(kind):
    kind = kind[0] if isinstance(kind, tuple) else kind
    return kind()
