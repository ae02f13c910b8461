"""TLS on a rule's sides: its options, contexts, certificates by SNI, the handshake, the stream.

Typical use (``Rule.build``, ``relay.Context`` and ``_dial`` do this)::

    options = validate(opt)                      # the tls_* and target_tls_* keys: ConfigError if bad
    server = Terminator(rule)                    # tls_cert...: contexts, one per certificate
    problem = server.reload()                    # SIGHUP: new files, or the old ones kept and why
    stream = server.wrap(raw_client)             # a TLSSocket; handshake() before any payload
    handshake(stream, wait, timeout, "client")   # raises Failure: tls handshake failed, and why
    client = Originator(rule).wrap(raw_upstream, "db.internal")

Every TLS session runs on memory BIOs, not on the socket: the ``TLSSocket`` reads and writes
the raw non-blocking socket itself and hands OpenSSL the bytes. That costs one copy per
chunk, and buys what the socket BIO cannot give: a close_notify sent while the peer's data
still flows. (With the socket BIO, Python's ``shutdown()`` calls ``SSL_shutdown`` a second
time, which reads the socket and fails with "application data after close notify",
losing those bytes; on a memory BIO that second call finds nothing to read.)

A ``TLSSocket`` looks like the raw socket to the pumps (``recv_into``, ``recv``, ``send``,
``shutdown``, ``fileno``...), with the rules they rely on kept:

- ``recv_into`` fills the buffer or drains everything buffered: a short read means nothing is
  left inside OpenSSL, so the socket's readable watcher is again the whole truth. Only a full
  read may leave plaintext buffered (``buffered()``); relay then runs the direction again
  rather than waiting for the socket.
- ``send`` reports bytes taken only once their records are in the kernel. A send the socket
  cannot take whole raises ``BlockingIOError`` and keeps the records; the caller retries with
  the same leading bytes (as every pump does), and is then told how many were taken. At most
  one chunk's records are held per direction: backpressure holds.
- ``shutdown(SHUT_WR)`` (a half-close passed on) sends close_notify, then our FIN; reading
  goes on. ``close()`` of a connection that ended cleanly sends close_notify first too.
- A peer's close_notify is a clean EOF; a TCP FIN without it (a truncated stream, which many
  clients send) is taken as EOF too, noted in ``truncated`` for the connection's line.
- A TLS error after the handshake (a bad record, an alert) is a ``TLSError``, a
  ``ConnectionError``: the connection is reset, its line says why.
"""

from __future__ import annotations

import fnmatch
import logging
import socket
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from gproxy._failure import Failure
from gproxy.stats import Outcome

__all__ = ["validate", "TLS_KEYS", "TARGET_TLS_KEYS", "VERSIONS", "Terminator", "Originator", "TLSSocket",
           "TLSError", "handshake", "server_name", "HANDSHAKE_BUCKETS"]

log = logging.getLogger("gproxy.tls")  # (a public name: hosts configure it)

#: the options of a terminating rule (the client's side), and of an originating one (the target's)
TLS_KEYS = ("tls_cert", "tls_key", "tls_ca", "tls_verify_client", "tls_min_version", "tls_ciphers",
            "tls_alpn", "tls_handshake_timeout")
TARGET_TLS_KEYS = ("target_tls", "target_tls_ca", "target_tls_server_name", "target_tls_cert",
                   "target_tls_key", "target_tls_verify")

#: tls_min_version's values
VERSIONS = ("1.0", "1.1", "1.2", "1.3")

#: upper bounds (seconds) of the handshake duration histogram's buckets; +Inf is implied
HANDSHAKE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

#: ciphertext read from the socket in one call
_CHUNK = 65536


def _ssl():
    """The ssl module, imported when a rule first uses TLS: a program that patches with gevent
    after importing gproxy must not find ``ssl`` imported already (gevent warns, rightly)."""
    import ssl
    return ssl


def _IGNORE_EOF() -> int:
    """OpenSSL 3 takes a FIN without close_notify for a fatal error: it queues a decode_error
    alert and ends the session, the other direction with it. Told to ignore it, it reads the
    FIN as a close_notify; ``TLSSocket`` tells the two apart itself (``truncated``)."""
    return getattr(_ssl(), "OP_IGNORE_UNEXPECTED_EOF", 0)


# -- the options ----------------------------------------------------------------------------------

def _paths(value, field: str, ConfigError, show) -> Optional[Tuple[str, ...]]:
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items \
            or not all(isinstance(item, str) and item.strip() for item in items):
        raise ConfigError(field, f"expected a file path or a list of them, got {show(value)}")
    return tuple(items)


def _path(value, field: str, ConfigError, show) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(field, f"expected a file path, got {show(value)}")
    return value


def validate(opt: Dict[str, Any]) -> Dict[str, Any]:
    """The TLS options of ``opt`` (a Rule's options by name), checked alone and together, with
    every file loaded once so that a bad certificate or key is a ConfigError now, naming the
    key, and not a failed handshake later."""
    from gproxy.config import ConfigError, _flag, _positive_seconds, show
    out: Dict[str, Any] = {}
    out["tls_cert"] = _paths(opt["tls_cert"], "tls_cert", ConfigError, show)
    out["tls_key"] = _paths(opt["tls_key"], "tls_key", ConfigError, show)
    out["tls_ca"] = _path(opt["tls_ca"], "tls_ca", ConfigError, show)
    out["tls_verify_client"] = _flag(opt["tls_verify_client"], "tls_verify_client")
    version = opt["tls_min_version"]
    if isinstance(version, float):
        version = f"{version:.1f}"
    if version not in VERSIONS:
        raise ConfigError("tls_min_version",
                          f"expected one of {', '.join(VERSIONS)}, got {show(opt['tls_min_version'])}")
    out["tls_min_version"] = version
    ciphers = opt["tls_ciphers"]
    if ciphers is not None and (not isinstance(ciphers, str) or not ciphers.strip()):
        raise ConfigError("tls_ciphers", f"expected an OpenSSL cipher list, got {show(ciphers)}")
    out["tls_ciphers"] = ciphers
    alpn = opt["tls_alpn"]
    if alpn is not None:
        items = [a.strip() for a in alpn.split(",")] if isinstance(alpn, str) else alpn
        if not isinstance(items, (list, tuple)) or not items or not all(
                isinstance(a, str) and 0 < len(a.encode()) < 256 and a.isprintable() for a in items):
            raise ConfigError("tls_alpn",
                              f"expected protocol names such as [\"h2\", \"http/1.1\"], got {show(alpn)}")
        alpn = tuple(items)
    out["tls_alpn"] = alpn
    out["tls_handshake_timeout"] = _positive_seconds(opt["tls_handshake_timeout"], "tls_handshake_timeout")
    out["target_tls"] = _flag(opt["target_tls"], "target_tls")
    out["target_tls_ca"] = _path(opt["target_tls_ca"], "target_tls_ca", ConfigError, show)
    name = opt["target_tls_server_name"]
    if name is not None and (not isinstance(name, str) or not name.strip() or not name.isprintable()
                             or " " in name):
        raise ConfigError("target_tls_server_name", f"expected a host name, got {show(name)}")
    out["target_tls_server_name"] = name
    out["target_tls_cert"] = _path(opt["target_tls_cert"], "target_tls_cert", ConfigError, show)
    out["target_tls_key"] = _path(opt["target_tls_key"], "target_tls_key", ConfigError, show)
    out["target_tls_verify"] = _flag(opt["target_tls_verify"], "target_tls_verify")

    if out["tls_cert"] is None:
        for key in TLS_KEYS:
            if key not in ("tls_cert", "tls_min_version", "tls_handshake_timeout", "tls_verify_client") \
                    and out[key] is not None:
                raise ConfigError(key, "only with tls_cert (the certificate gproxy presents to clients)")
        if out["tls_verify_client"]:
            raise ConfigError("tls_verify_client", "only with tls_cert and tls_ca")
    else:
        keys = out["tls_key"]
        if keys is not None and len(keys) != len(out["tls_cert"]):
            raise ConfigError("tls_key", f"{len(keys)} key(s) for {len(out['tls_cert'])} certificate(s): give "
                                         "one per certificate, in the same order, or none (each key in its "
                                         "certificate's file)")
        if out["tls_verify_client"] and out["tls_ca"] is None:
            raise ConfigError("tls_verify_client", "needs tls_ca: the CA that signs the client certificates")
        if out["tls_ca"] is not None and not out["tls_verify_client"]:
            raise ConfigError("tls_ca", "only with tls_verify_client = true (it names who may sign client "
                                        "certificates)")
        _server_contexts(out, ConfigError)
    if not out["target_tls"]:
        for key in TARGET_TLS_KEYS[1:]:
            if out[key] is not None and not (key == "target_tls_verify" and out[key] is True):
                raise ConfigError(key, "only with target_tls")
    else:
        if out["target_tls_key"] is not None and out["target_tls_cert"] is None:
            raise ConfigError("target_tls_key", "only with target_tls_cert")
        _client_context(out, ConfigError)
    return out


# -- contexts -------------------------------------------------------------------------------------

def _load_error(ConfigError, field: str, path: str, exc: BaseException):
    if isinstance(exc, OSError) and exc.errno is not None and not isinstance(exc, _ssl().SSLError):
        from gproxy._sockets import describe_error
        return ConfigError(field, f"cannot load {path}: {describe_error(exc)}")
    reason = getattr(exc, "reason", None)
    what = {"PEM_LIB": "not PEM, or a certificate without its key (or with a key that is not its own)",
            "KEY_VALUES_MISMATCH": "the key is not the certificate's",
            "NO_CERTIFICATE_OR_CRL_FOUND": "no certificate in it"}.get(str(reason), None)
    if what is None:
        what = str(reason).lower().replace("_", " ") if reason else str(exc)
    return ConfigError(field, f"cannot load {path}: {what}")


def _common(ctx, opt: Dict[str, Any], ConfigError) -> None:
    ssl = _ssl()
    # a peer may not renegotiate: it would make a read wait for a write (and the reverse),
    # which the pumps do not do; TLS 1.3 has no renegotiation at all
    ctx.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0) | _IGNORE_EOF()
    version = opt.get("tls_min_version", "1.2")
    ctx.minimum_version = {"1.0": ssl.TLSVersion.TLSv1, "1.1": ssl.TLSVersion.TLSv1_1,
                           "1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}[version]
    ciphers = opt.get("tls_ciphers")
    if ciphers is not None:
        try:
            ctx.set_ciphers(ciphers)
        except ssl.SSLError:
            raise ConfigError("tls_ciphers", f"OpenSSL knows none of {ciphers!r}") from None


def _names(path: str) -> List[str]:
    """The DNS names a certificate file's first certificate is for (its SAN, else its CN)."""
    import _ssl as c_ssl
    try:
        decoded = c_ssl._test_decode_cert(path)  # type: ignore[attr-defined]
    except Exception:  # no such helper here, or not readable: the default certificate only
        return []
    names = [value.lower() for kind, value in decoded.get("subjectAltName", ()) if kind == "DNS"]
    if not names:
        for rdn in decoded.get("subject", ()):
            for key, value in rdn:
                if key == "commonName":
                    names.append(value.lower())
    return names


def _expiry(path: str) -> Optional[float]:
    import _ssl as c_ssl
    try:
        after = c_ssl._test_decode_cert(path)["notAfter"]  # type: ignore[attr-defined]
        return _ssl().cert_time_to_seconds(after)
    except Exception:
        return None


def _server_contexts(opt: Dict[str, Any], ConfigError) -> List[Tuple[List[str], Any]]:
    """[(names, SSLContext)] per certificate, the first the default; ConfigError if a file is bad."""
    ssl = _ssl()
    contexts = []
    keys = opt["tls_key"] or (None,) * len(opt["tls_cert"])
    for cert, key in zip(opt["tls_cert"], keys):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        _common(ctx, opt, ConfigError)
        try:
            ctx.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            bad = "tls_key" if key is not None and isinstance(exc, ssl.SSLError) and "KEY" in str(exc).upper() \
                and "CERT" not in str(getattr(exc, "reason", "")).upper() else "tls_cert"
            raise _load_error(ConfigError, bad, key if bad == "tls_key" and key else cert, exc) from None
        if opt["tls_verify_client"]:
            try:
                ctx.load_verify_locations(cafile=opt["tls_ca"])
            except (OSError, ssl.SSLError) as exc:
                raise _load_error(ConfigError, "tls_ca", opt["tls_ca"], exc) from None
            ctx.verify_mode = ssl.CERT_REQUIRED
        if opt["tls_alpn"]:
            ctx.set_alpn_protocols(list(opt["tls_alpn"]))
        contexts.append((_names(cert), ctx))
    return contexts


def _client_context(opt: Dict[str, Any], ConfigError) -> Any:
    ssl = _ssl()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0) | _IGNORE_EOF()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if opt["target_tls_verify"]:
        try:
            if opt["target_tls_ca"] is None:
                ctx.load_default_certs()
            else:
                ctx.load_verify_locations(cafile=opt["target_tls_ca"])
        except (OSError, ssl.SSLError) as exc:
            raise _load_error(ConfigError, "target_tls_ca", opt["target_tls_ca"], exc) from None
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if opt["target_tls_cert"] is not None:
        try:
            ctx.load_cert_chain(opt["target_tls_cert"], opt["target_tls_key"])
        except (OSError, ssl.SSLError) as exc:
            raise _load_error(ConfigError, "target_tls_cert", opt["target_tls_cert"], exc) from None
    return ctx


def _options(rule) -> Dict[str, Any]:
    return {key: getattr(rule, key) for key in TLS_KEYS + TARGET_TLS_KEYS}


class _Loaded:
    """What a reload replaces at once: the contexts and the SNI index into them."""

    __slots__ = ("default", "exact", "wildcards")

    def __init__(self, contexts: List[Tuple[List[str], Any]]) -> None:
        self.default = contexts[0][1]
        self.exact: Dict[str, Any] = {}
        self.wildcards: List[Tuple[str, Any]] = []
        for names, ctx in contexts:
            for name in names:
                if name.startswith("*."):
                    self.wildcards.append((name, ctx))
                else:
                    self.exact.setdefault(name, ctx)

    def pick(self, name: str) -> Any:
        """The context for a ClientHello's server name: an exact name first, then a wildcard
        for one label (``*.example.com`` is ``a.example.com``, not ``a.b.example.com``), then
        the first certificate (HAProxy's default certificate)."""
        ctx = self.exact.get(name)
        if ctx is not None:
            return ctx
        for pattern, ctx in self.wildcards:
            if fnmatch.fnmatchcase(name, pattern) and name.count(".") == pattern.count("."):
                return ctx
        return self.default


class Terminator:
    """A terminating rule's TLS: its certificates (reloadable) and the sessions made with them."""

    def __init__(self, rule) -> None:
        from gproxy.config import ConfigError
        self.rule_name = rule.name or str(rule.listen)
        self._opt = _options(rule)
        self._lock = threading.Lock()
        self._loaded = _Loaded(self._with_sni(_server_contexts(self._opt, ConfigError)))
        self._warn_expired()

    def _with_sni(self, contexts):
        for _, ctx in contexts:
            ctx.sni_callback = self._on_sni
        return contexts

    def _on_sni(self, sslobj, name: Optional[str], ctx) -> None:
        """OpenSSL's servername callback, in the handshake: note the name, pick its certificate."""
        sslobj.sni = name
        if name is not None:
            chosen = self._loaded.pick(name.lower())
            if chosen is not ctx:
                sslobj.context = chosen

    def _warn_expired(self) -> None:
        now = time.time()
        for cert in self._opt["tls_cert"]:
            expiry = _expiry(cert)
            if expiry is not None and expiry < now:
                log.warning("rule %s: tls_cert %s expired on %s; clients that check it will refuse it",
                            self.rule_name, cert, time.strftime("%Y-%m-%d", time.gmtime(expiry)))

    def reload(self) -> Optional[str]:
        """Load the certificate and key files again: new handshakes use them, sessions under
        way keep theirs. A file that is bad now keeps the old ones: returns why, else None."""
        from gproxy.config import ConfigError
        try:
            contexts = self._with_sni(_server_contexts(self._opt, ConfigError))
        except ConfigError as exc:
            return str(exc)
        with self._lock:
            self._loaded = _Loaded(contexts)
        self._warn_expired()
        return None

    def wrap(self, sock) -> "TLSSocket":
        ssl = _ssl()
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = self._loaded.default.wrap_bio(incoming, outgoing, server_side=True)
        obj.sni = None
        return TLSSocket(sock, obj, incoming, outgoing)


class Originator:
    """An originating rule's TLS: the client context (CAs, client certificate) for its targets."""

    def __init__(self, rule) -> None:
        from gproxy.config import ConfigError
        self._opt = _options(rule)
        self.server_name_given: Optional[str] = rule.target_tls_server_name
        self._ctx = _client_context(self._opt, ConfigError)
        if not rule.target_tls_verify:
            log.warning("rule %s: target_tls_verify = false: the targets' certificates are not checked, "
                        "so anyone on the path can pose as them", rule.name or rule.listen)

    def reload(self) -> Optional[str]:
        """Load the CA and client certificate files again; the old ones stay if one is bad."""
        from gproxy.config import ConfigError
        try:
            self._ctx = _client_context(self._opt, ConfigError)
        except ConfigError as exc:
            return str(exc)
        return None

    def wrap(self, sock, name: Optional[str]) -> "TLSSocket":
        ssl = _ssl()
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = self._ctx.wrap_bio(incoming, outgoing, server_side=False, server_hostname=name)
        obj.sni = name
        return TLSSocket(sock, obj, incoming, outgoing)


def server_name(given: Optional[str], endpoint) -> Optional[str]:
    """The name to ask a target for (SNI) and check its certificate against: the one given, else
    the target's host (an IP literal is checked against the certificate's IP addresses)."""
    if given is not None:
        return given
    return getattr(endpoint, "host", None)


# -- the stream -----------------------------------------------------------------------------------

class TLSError(ConnectionError):
    """TLS failed after the handshake (a bad record, an alert): the connection is reset."""


#: per OS thread: the buffer ciphertext is read into before OpenSSL takes it (one user at a
#: time, with no switch in between, as relay's scratch buffer)
_buffers = threading.local()


def _cipher_buffer() -> Tuple[bytearray, memoryview]:
    pair = getattr(_buffers, "pair", None)
    if pair is None:
        buf = bytearray(_CHUNK)
        pair = _buffers.pair = (buf, memoryview(buf))
    return pair


def describe(exc: BaseException) -> str:
    """An OpenSSL error in words: 'certificate verify failed: certificate has expired',
    'tlsv1 alert unknown ca', 'http request' (a plaintext HTTP client on a TLS port)."""
    verify = getattr(exc, "verify_message", None)
    if verify:  # OpenSSL's sentence, as a clause of our line
        verify = verify[:1].lower() + verify[1:].rstrip(".")
    reason = getattr(exc, "reason", None)
    if reason:
        text = str(reason).lower().replace("_", " ")
        return f"{text}: {verify}" if verify else text
    return str(exc) or type(exc).__name__


class TLSSocket:
    """A TLS session over a raw non-blocking socket, shaped like the socket (see the module's
    docstring for the rules it keeps)."""

    __slots__ = ("sock", "obj", "incoming", "outgoing", "_out", "_taken", "_eof", "_eof_told", "_fin_seen",
                 "truncated", "_close_wanted", "_closed_notify", "_flusher", "_linger", "family")

    def __init__(self, sock, obj, incoming, outgoing) -> None:
        self.sock = sock
        self.obj = obj
        self.incoming = incoming
        self.outgoing = outgoing
        self._out: Optional[memoryview] = None  # records the socket has not taken yet
        self._taken = 0          # plaintext bytes those records hold, to report when they are sent
        self._eof = False
        self._eof_told = False   # recv_into has returned 0 for it
        self._fin_seen = False   # the socket's EOF was handed to OpenSSL
        #: the peer ended the TCP stream without close_notify (taken as EOF)
        self.truncated = False
        self._close_wanted = False
        self._closed_notify = False
        self._flusher: Any = None  # a watcher that sends a close_notify the socket could not take
        self._linger = False     # SO_LINGER set: an abort, no close_notify
        self.family = sock.family

    # -- the socket's own ---------------------------------------------------------------------

    def fileno(self) -> int:
        return self.sock.fileno()

    def getsockopt(self, *args):
        return self.sock.getsockopt(*args)

    def setsockopt(self, level, option, value) -> None:
        if level == socket.SOL_SOCKET and option == socket.SO_LINGER:
            self._linger = True
        self.sock.setsockopt(level, option, value)

    def getpeername(self):
        return self.sock.getpeername()

    def getsockname(self):
        return self.sock.getsockname()

    # -- reading --------------------------------------------------------------------------------

    def buffered(self) -> bool:
        """Whether plaintext, ciphertext not yet decrypted, or the end of the stream (found
        behind the last bytes returned: a close_notify with no FIN leaves the socket silent)
        waits inside the session."""
        return bool(self.obj.pending() or self.incoming.pending or (self._eof and not self._eof_told))

    def recv_into(self, buffer, nbytes: int = 0) -> int:
        """Plaintext into ``buffer``: as much as fits, or all there is (see the module's rules);
        0 at the peer's close_notify or FIN; BlockingIOError when nothing is there."""
        if self._eof:
            self._eof_told = True
            return 0
        view = memoryview(buffer)
        size = nbytes or len(view)
        ssl = _ssl()
        obj, incoming = self.obj, self.incoming
        total = 0
        drained = False  # the socket gave less than asked: it has nothing more for now
        while total < size:
            # Ask OpenSSL only when it holds something (ciphertext, plaintext, the end): asked
            # with nothing, it raises SSLWantReadError, which cost a small message about a
            # tenth of its CPU when it happened twice per read (before the socket's bytes, and
            # after them, to learn they were all)
            if incoming.pending or obj.pending() or self._fin_seen:
                try:
                    n = obj.read(size - total, view[total:size])
                except ssl.SSLWantReadError:
                    n = -1  # a partial record: more ciphertext is needed
                except ssl.SSLZeroReturnError:
                    self.truncated = self._fin_seen  # a FIN fed in before OpenSSL said "closed"
                    n = 0
                except ssl.SSLEOFError:  # (an OpenSSL without OP_IGNORE_UNEXPECTED_EOF)
                    self.truncated = True
                    self.outgoing.read()  # no alert for it: the other direction goes on
                    n = 0
                except ssl.SSLError as exc:
                    raise TLSError(f"tls: {describe(exc)}") from None
                if n > 0:
                    total += n
                    continue
                if n == 0:
                    self.truncated = self.truncated or self._fin_seen
                    self._eof = True
                    break
            if drained:
                break
            cipher, cipher_view = _cipher_buffer()
            try:
                got = self.sock.recv_into(cipher)
            except BlockingIOError:
                break
            if got == 0:
                self._fin_seen = True
                drained = True
                incoming.write_eof()
            else:
                incoming.write(cipher_view[:got])
                drained = got < len(cipher)
        if self.outgoing.pending:  # a read may answer the peer (a TLS 1.3 key update)
            self._queue(self.outgoing.read())
            self._flush()
        if self._close_wanted and not self.buffered():
            self._close_wanted = False
            self._notify()
        if total == 0:
            if not self._eof:
                raise BlockingIOError
            self._eof_told = True
        return total

    def recv(self, size: int) -> bytes:
        buffer = bytearray(size)
        n = self.recv_into(buffer)
        return bytes(buffer[:n])

    # -- writing --------------------------------------------------------------------------------

    def _queue(self, records: bytes) -> None:
        if records:
            self._out = memoryview(records) if self._out is None else memoryview(bytes(self._out) + records)

    def _flush(self) -> bool:
        """Send held records: True once none is left."""
        out = self._out
        if out is None:
            return True
        try:
            sent = self.sock.send(out)
        except BlockingIOError:
            sent = 0
        if sent == len(out):
            self._out = None
            return True
        self._out = out[sent:]
        return False

    def send(self, data) -> int:
        """Encrypt ``data`` and send its records: len(data) once the kernel has them all, else
        BlockingIOError, the records held; a retry starting with the same bytes then sends the
        held records and returns how many bytes they were."""
        if self._out is not None:
            if not self._flush():
                raise BlockingIOError
            taken, self._taken = self._taken, 0
            return taken
        if not data:
            return 0
        ssl = _ssl()
        try:
            self.obj.write(data)
        except ssl.SSLError as exc:
            raise TLSError(f"tls: {describe(exc)}") from None
        records = self.outgoing.read()
        try:
            sent = self.sock.send(records)
        except BlockingIOError:
            sent = 0
        if sent == len(records):
            return len(data)
        self._out = memoryview(records)[sent:]
        self._taken = len(data)
        raise BlockingIOError

    # -- closing --------------------------------------------------------------------------------

    def shutdown(self, how: int) -> None:
        """A half-close passed on: close_notify, then our FIN; reading goes on. While plaintext
        waits inside the session to be read, the close_notify waits for it (OpenSSL's shutdown
        would take that record for one after the close): ``recv_into`` sends it then."""
        if self.buffered():
            self._close_wanted = True
            return
        self._notify()

    def _notify(self) -> None:
        if self._closed_notify:
            return
        self._closed_notify = True
        ssl = _ssl()
        try:
            self.obj.unwrap()
        except ssl.SSLWantReadError:
            pass  # sent ours; the peer's comes (or not) with its data
        except (ssl.SSLError, ValueError):
            pass  # the session is broken already: the FIN alone says it
        self._queue(self.outgoing.read())
        if self._flush():
            self._fin()
        else:  # the socket is full: finish from a watcher, on the hub
            from gevent import get_hub
            self._flusher = get_hub().loop.io(self.sock.fileno(), 2)
            self._flusher.start(self._flushed)

    def _flushed(self) -> None:
        try:
            done = self._flush()
        except OSError:
            done = True  # the peer is gone: the pumps find out
        if done:
            self._stop_flusher()
            self._fin()

    def _stop_flusher(self) -> None:
        if self._flusher is not None:
            self._flusher.close()
            self._flusher = None

    def _fin(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def forget(self, close_watcher: bool) -> None:
        """In a forked child: close this copy of the socket and say nothing on it (the session
        and the connection are the parent's)."""
        if close_watcher:
            self._stop_flusher()
        self.sock.close()

    def close(self) -> None:
        """Close the socket; a session that ended cleanly says close_notify first (best effort:
        what the socket takes now), an abort (SO_LINGER 0) does not."""
        self._stop_flusher()
        if not self._linger and not self._closed_notify and self.obj is not None:
            self._closed_notify = True
            ssl = _ssl()
            try:
                self.obj.unwrap()
            except (ssl.SSLError, ValueError):
                pass
            try:
                self._queue(self.outgoing.read())
                self._flush()
            except OSError:
                pass
        self.sock.close()

    def failed(self) -> None:
        """The handshake failed: no close_notify at close (its alert was the last word)."""
        self._closed_notify = True

    # -- what it negotiated ---------------------------------------------------------------------

    def info(self) -> Dict[str, Optional[str]]:
        """The version, cipher, SNI name and ALPN protocol, for the connection's line."""
        obj = self.obj
        cipher = obj.cipher()
        return {"version": obj.version(), "cipher": cipher[0] if cipher else None,
                "sni": getattr(obj, "sni", None), "alpn": obj.selected_alpn_protocol()}


# -- the handshake --------------------------------------------------------------------------------

def handshake(stream: TLSSocket, wait: Callable[[int, float], bool], timeout: float, side: str) -> None:
    """Run ``stream``'s handshake within ``timeout`` seconds. ``wait(events, seconds)`` waits
    for the socket (1 readable, 2 writable): False when the time is up. Raises Failure
    (``tls handshake failed``) naming the side and the reason; after a failure, the alert
    OpenSSL made for the peer is sent if the socket takes it at once."""
    ssl = _ssl()
    deadline = time.monotonic() + timeout
    obj, sock, incoming, outgoing = stream.obj, stream.sock, stream.incoming, stream.outgoing
    cipher, cipher_view = _cipher_buffer()
    try:
        while True:
            try:
                obj.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            records = outgoing.read()
            while records:
                try:
                    sent = sock.send(records)
                except BlockingIOError:
                    sent = 0
                records = records[sent:]
                if records and not wait(2, deadline - time.monotonic()):
                    raise Failure(Outcome.TLS_HANDSHAKE_FAILED, f"{side}: no TLS handshake within {timeout:g}s")
            if done:
                return
            while True:
                try:
                    got = sock.recv_into(cipher)
                except BlockingIOError:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or not wait(1, remaining):
                        raise Failure(Outcome.TLS_HANDSHAKE_FAILED,
                                      f"{side}: no TLS handshake within {timeout:g}s") from None
                    continue
                if got == 0:
                    raise Failure(Outcome.TLS_HANDSHAKE_FAILED, f"{side} closed during the TLS handshake")
                incoming.write(cipher_view[:got])
                break
    except ssl.SSLError as exc:
        _send_alert(stream)
        raise Failure(Outcome.TLS_HANDSHAKE_FAILED, f"{side}: {describe(exc)}") from None
    except OSError as exc:
        from gproxy._sockets import describe_error
        raise Failure(Outcome.TLS_HANDSHAKE_FAILED, f"{side} failed during the TLS handshake: "
                                                    f"{describe_error(exc)}") from None


def _send_alert(stream: TLSSocket) -> None:
    records = stream.outgoing.read()
    if records:
        try:
            stream.sock.send(records)
        except OSError:
            pass

