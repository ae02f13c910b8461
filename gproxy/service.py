"""``Service``: named forwarders run, changed and stopped together on one hub.

Typical use (in a greenlet of the hub that runs them, e.g. the CLI's main hub)::

    from gproxy.service import Service

    service = Service(connect_timeout=5)           # defaults for every forwarder it creates
    service.create("redis", "127.0.0.1:0", "127.0.0.1:6379")
    service["redis"].address                       # the real bound port
    service.populate([{"name": "pg", "listen": "127.0.0.1:15432", "target": "db:5432"}])
    service.reset()                                # every proxy enabled, every toxic removed
    service.reload({"pg": {"listen": "127.0.0.1:15432", "target": ["db1:5432", "db2:5432"]}})
    service.stop()                                 # all drain in parallel, one deadline

This is toxiproxy's ``ProxyCollection``: the command line, the config file and the HTTP API
all drive one. Each forwarder is started on the hub of the thread that calls ``start()``
or ``create()``, whether or not the program is monkey-patched.

Thread-safety: none of it is thread-safe, by design. Every method must be called from
greenlets of the one hub that runs the service (the one whose thread created it); there the
only switches are the waits inside stop and drain, and a lock keeps changes from
interleaving across those waits. To drive a service from another thread, hand the call to
its hub (``hub.loop.run_callback_threadsafe``) and wait for the answer.

Atomic steps: ``with service.locked():`` holds every other change off (another greenlet's
call, a reload, a populate) until the block ends, whatever it waits for inside, so a name
looked up there stays that forwarder and a change made there lands on it. The HTTP API
runs each call so, after reading the request's body and before looking anything up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import weakref
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

import gevent
from gevent.event import Event
from gevent.lock import RLock

from gproxy.config import Address, ConfigError, Endpoint, Rule, parse_address
from gproxy.forwarder import Forwarder, State
from gproxy.listeners import Passed
from gproxy.stats import Statistics

__all__ = ["Service", "DuplicateName", "UnknownName", "ResetFailed"]

log = logging.getLogger(__name__)


class DuplicateName(ConfigError):
    """A proxy by this name exists already (toxiproxy: 409 "proxy already exists")."""

    def __init__(self, name: str):
        super().__init__("name", f"a proxy named {name!r} exists already")
        self.name = name


class UnknownName(KeyError):
    """No proxy by this name (toxiproxy: 404 "proxy not found")."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"no proxy named {self.name!r}"


class ResetFailed(OSError):
    """``reset()`` reset every proxy it could; these could not listen again (their address
    was taken meanwhile). ``failures``: ``{name: (address, OSError)}``, the address being the
    one the proxy listens on. Those proxies lost their toxics too and stay disabled."""

    def __init__(self, failures: Dict[str, tuple]):
        self.failures = failures
        super().__init__("; ".join(f'proxy "{name}": {exc.strerror or exc}'
                                   for name, (_, exc) in failures.items()))


def is_enabled(fw: Forwarder) -> bool:
    """Listening now: started, not stopped, and not disabled (``fw.disable()``)."""
    return fw.listening


def listen_address(fw: Forwarder) -> Endpoint:
    """Where ``fw`` listens: the real bound address once started, else what was asked for."""
    bound = fw.bound_address
    if isinstance(bound, tuple):  # a Unix socket's address is its path: the rule says it
        host, port = bound[:2]
        return Address(host, port)
    return fw.rule.listen


def _same_listen(fw: Forwarder, wanted: Endpoint) -> bool:
    """``wanted`` is what ``fw`` was asked for, or where it really listens (so asking again
    for port 0 and asking for the port it got both mean "the same")."""
    return wanted == fw.rule.listen or (fw.bound_address is not None and wanted == listen_address(fw))


class Service:
    """A collection of forwarders by name, in the order they were added.

    ``options`` are the defaults for every forwarder the service creates (any
    :class:`gproxy.config.Rule` option); each ``create`` may override them.
    Errors: :class:`DuplicateName` and bad values are :class:`ConfigError`; a missing name is
    :class:`UnknownName` (a ``KeyError``); binding failures are ``OSError``.
    """

    def __init__(self, **options: Any):
        Rule.build("127.0.0.1:0", "127.0.0.1:1", **options)  # bad defaults fail here, not later
        self.options: Dict[str, Any] = dict(options)
        self._forwarders: Dict[str, Forwarder] = {}
        self._lock = RLock()  # changes wait across stop/drain; nothing may interleave them
        self._stopped = Event()
        #: forwarders created or populated disabled: ``start()`` leaves them so (``reset()``
        #: and an update that enables one start it)
        self._held: "weakref.WeakSet[Forwarder]" = weakref.WeakSet()
        #: reloads' old forwarders while their connections drain, each with its retire() greenlet
        self._retired: List[Tuple[Forwarder, gevent.Greenlet]] = []
        #: listening sockets systemd passed (socket activation, ``Passed.from_systemd()``):
        #: a forwarder that would bind serves on the one it matches instead (default None)
        self.passed: Optional[Passed] = None

    # -- reading -----------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator["Service"]:
        """``with service.locked():`` no other change interleaves with the block, even where
        it waits (a forwarder stopping, toxics settling): what it looks up stays what it
        changes. Re-entrant, so the service's own methods may be called inside."""
        with self._lock:
            yield self

    def __getitem__(self, name: str) -> Forwarder:
        try:
            return self._forwarders[name]
        except KeyError:
            raise UnknownName(name) from None

    get = __getitem__

    def __contains__(self, name: object) -> bool:
        return name in self._forwarders

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._forwarders))

    def __len__(self) -> int:
        return len(self._forwarders)

    def items(self) -> List[tuple]:
        """``[(name, forwarder), ...]`` in the order they were added."""
        return list(self._forwarders.items())

    def statistics(self) -> Statistics:
        """Every proxy's statistics, added up, with the connections that reloads' old
        forwarders still drain."""
        each = [fw.statistics() for fw in self._forwarders.values()]
        shared = {id(fw.counters) for fw in self._forwarders.values()}
        for fw, _ in self._draining():
            stats = fw.statistics()
            if id(fw.counters) in shared:
                # a changed rule's old forwarder counts into its successor's counters, which
                # that one's statistics() has read: only what is open here is more
                counters = fw.counters
                stats = Statistics(active=stats.active, accepted=0, connect_failed=0,
                                   bytes_upstream=stats.bytes_upstream - counters.bytes_upstream,
                                   bytes_downstream=stats.bytes_downstream - counters.bytes_downstream)
            else:
                shared.add(id(fw.counters))  # a removed rule's: count its totals once
            each.append(stats)
        return Statistics(**{f.name: sum(getattr(s, f.name) for s in each)
                             for f in dataclasses.fields(Statistics)})

    def _passed_for(self, rules: Mapping[str, Rule]) -> Dict[str, int]:
        """Which socket systemd passed each rule serves on: ``{name: index}``."""
        return self.passed.match(rules) if self.passed is not None else {}

    def _draining(self) -> List[Tuple[Forwarder, gevent.Greenlet]]:
        self._retired = [(fw, g) for fw, g in self._retired if not g.dead]
        return list(self._retired)

    # -- adding and removing ------------------------------------------------------------

    def add(self, name: str, forwarder: Forwarder, *, start: bool = True) -> Forwarder:
        """Add a forwarder built elsewhere under ``name`` and, unless told not to, start it here."""
        _check_name(name)
        with self._lock:
            if name in self._forwarders:
                raise DuplicateName(name)
            if start and forwarder.state is State.NEW:
                forwarder.start_here()
            self._forwarders[name] = forwarder
            return forwarder

    def create(self, name: str, listen, target, *, enabled: bool = True, **options: Any) -> Forwarder:
        """A new forwarder from ``listen`` to ``target`` with the service's options (overridden
        by ``options``), started unless ``enabled`` is false. Nothing changes on error."""
        _check_name(name)
        options = {**self.options, **options}
        options.setdefault("name", name)  # logs and metrics call it what the service does
        fw = Forwarder(listen, target, **options)
        if not enabled:
            self._held.add(fw)
        return self.add(name, fw, start=enabled)

    def remove(self, name: str, timeout: Optional[float] = None) -> None:
        """Stop the forwarder (drain for ``timeout``, default its ``drain_timeout``) and forget it.
        The name is free again at once, before the drain ends."""
        with self._lock:
            fw = self[name]
            del self._forwarders[name]
        fw.stop(timeout)

    def update(self, name: str, *, listen=None, target=None, enabled: Optional[bool] = None,
               timeout: Optional[float] = None) -> Forwarder:
        """Change where a proxy listens or connects, or whether it is enabled.

        A new ``listen`` or ``target`` replaces the forwarder with a new one (same options, same
        toxics; the old one's connections drain for ``timeout``), as toxiproxy restarts a proxy.
        A new listen address is bound before the old one is let go, so a failure changes
        nothing. Returns the proxy's forwarder, new or not."""
        with self._lock:
            fw = self[name]
            new_listen = fw.rule.listen if listen is None else parse_address(listen, "listen")
            new_target = fw.rule.target if target is None else parse_address(target, "target")
            want_enabled = is_enabled(fw) if enabled is None else bool(enabled)
            if _same_listen(fw, new_listen) and new_target == fw.rule.target:
                self._set_enabled(fw, want_enabled)
                return fw
            # A listen address that did not change is the one it really has (port 0 or not).
            bind = listen_address(fw) if _same_listen(fw, new_listen) else new_listen
            new = Forwarder(bind, new_target, **_options_of(fw.rule))
            new.count_on(fw)
            new.copy_toxics(fw)
            new.take_capture(fw)           # and an API's capture goes on in the same file
            moved = bind != listen_address(fw)
            if want_enabled and moved:
                new.start_here()           # OSError here: the old one still runs
            fw.stop(timeout)
            if want_enabled and not moved:
                new.start_here()           # only now is the old address free
            self._forwarders[name] = new
            new.show_own_targets()
            return new

    def enable(self, name: str) -> Forwarder:
        """Listen again (a proxy created disabled starts now)."""
        with self._lock:
            fw = self[name]
            self._set_enabled(fw, True)
            return fw

    def disable(self, name: str) -> Forwarder:
        """Stop listening and cut the proxy's connections; its address and toxics are kept."""
        with self._lock:
            fw = self[name]
            self._set_enabled(fw, False)
            return fw

    @staticmethod
    def _set_enabled(fw: Forwarder, enabled: bool) -> None:
        if enabled == is_enabled(fw):
            return
        if fw.state is State.NEW:
            if enabled:
                fw.start_here()
            return  # a never-started forwarder is disabled already
        if enabled:
            fw.enable()
        else:
            fw.disable()

    # -- all of them ---------------------------------------------------------------------

    def start(self) -> "Service":
        """Start every forwarder not started yet, here. On a bind failure the ones started
        by this call are stopped again and the ``OSError`` is raised."""
        started = []
        with self._lock:
            taken = self._passed_for({name: fw.rule for name, fw in self._forwarders.items()})
            try:
                for name, fw in self._forwarders.items():
                    if fw.state is State.NEW and fw not in self._held:
                        if name in taken:
                            assert self.passed is not None  # sockets are taken only from what was passed
                            self.passed.give(taken[name], fw)
                        fw.start_here()
                        started.append(fw)
            except BaseException:
                _stop_all(started, 0)
                raise
        return self

    def stop(self, timeout: Optional[float] = None) -> None:
        """Stop every forwarder: all stop accepting at once and drain in parallel for up to
        ``timeout`` seconds (default: each one's ``drain_timeout``), then abort what is left.
        The forwarders stay in the collection, stopped. A second call while draining aborts.
        Reloads' old forwarders still draining stop the same way: their connections get
        ``timeout`` (default: their own ``drain_timeout``) from now, and those at rest are closed."""
        draining = self._draining()
        _stop_all(list(self._forwarders.values()) + [fw for fw, _ in draining], timeout)
        gevent.joinall([g for _, g in draining])
        self._stopped.set()

    def reload(self, specs: Mapping[str, Mapping[str, Any]], timeout: Optional[float] = None, *,
               owned: Optional[Iterable[str]] = None) -> Dict[str, str]:
        """Make the collection exactly ``specs``: ``{name: {"listen", "target", option...}}``
        in order, as a config file's reload does; returns ``{name: what happened}`` with
        ``added``, ``changed``, ``unchanged`` or ``removed``.

        - A proxy whose rule did not change is not touched: not its listener, not its
          connections, not its toxics.
        - A changed proxy gets a new forwarder for new connections; where its listen
          address stayed the same (or another proxy being replaced or removed had it),
          the new one serves on the very same listening socket (``Forwarder.take_over``),
          never closed and bound again, so no client is refused. Toxics carry over.
        - Old forwarders, changed or removed, stop accepting at once and ``retire()``: their
          connections run on in the background until they end by themselves, or for
          ``timeout`` seconds (default ``None``: no limit; a config file's
          ``reload_drain_timeout``), then the rest are aborted. A connection at rest is not
          closed, as a stop would: a reload cuts nobody. ``stop()`` stops them too.
        - An unchanged proxy that speaks TLS reads its certificate, key and CA files again
          (``Forwarder.reload_certificates``): renewed files take effect, bad ones keep the
          old (a WARNING says why).
        - ``owned``: the names this reload may remove (a config file's previous rules), so
          proxies made some other way (the HTTP API) stay; default: every name.

        Every forwarder is built, and every new address bound, before anything else
        changes: a bad spec (``ConfigError``) or a failed bind (``OSError``) leaves the
        running collection exactly as it was."""
        with self._lock:
            old = dict(self._forwarders)
            built: Dict[str, Forwarder] = {}
            result: Dict[str, str] = {}
            rules: Dict[str, Rule] = {}
            for name, spec in specs.items():
                _check_name(name)
                spec = dict(spec)
                options = {**self.options, **{k: v for k, v in spec.items() if k not in ("listen", "target")}}
                options.setdefault("name", name)
                rule = rules[name] = Rule.build(spec["listen"], spec["target"], **options)
                current = old.get(name)
                if current is not None and current.rule == rule and current.state is not State.STOPPED:
                    result[name] = "unchanged"
                else:
                    built[name] = Forwarder(spec["listen"], spec["target"], **options)
                    if current is not None:
                        built[name].count_on(current)  # its metrics go on, no counter reset
                    result[name] = "changed" if current is not None else "added"
            owned = set(old) if owned is None else set(owned)
            leaving = [fw for name, fw in old.items()
                       if name in built or (name not in result and name in owned)]
            taken = self._passed_for({**{name: fw.rule for name, fw in old.items() if name not in owned},
                                      **rules})
            _start_all(built, old, leaving, passed=(self.passed, taken))
            for name, new in built.items():
                previous = old.get(name)
                if previous is None:
                    continue
                new.copy_toxics(previous)  # what the API added to the rule stays
                new.take_capture(previous)   # and so does its capture, in the same file
                if previous.state is State.RUNNING and not previous.enabled:
                    new.disable()  # and so does a rule the API disabled
            kept = {name: fw for name, fw in old.items() if name not in result and name not in owned}
            self._forwarders = {**{name: built.get(name) or old[name] for name in result}, **kept}
            for new in built.values():
                new.show_own_targets()
            for name in old:
                if name not in result and name in owned:
                    result[name] = "removed"
            self._draining()  # forget those that have ended
            for name, what in result.items():
                if what == "unchanged":  # same paths, perhaps new files: renewed certificates
                    old[name].reload_certificates()
            for fw in leaving:
                self._retired.append((fw, gevent.spawn(fw.retire, timeout)))
            if self.passed is not None:
                for passed in self.passed.unused(taken):
                    if passed.origin != "systemd":  # ours alone: its port closes with it
                        self.passed.discard(passed)
                        continue
                    log.warning("systemd passed %s, which no rule listens on now: its clients wait in its "
                                "queue unserved until a rule takes it again", passed)
            return result

    def hand_over(self, timeout: Optional[float] = None) -> None:
        """Another process accepts on every listening socket now (a takeover,
        :mod:`gproxy._handover`): every forwarder closes its copy (never a Unix socket file)
        and retires, its connections running on until they end or for ``timeout`` seconds
        (default: no limit), as a reload's old forwarders do. Returns when all have ended; a
        ``stop()`` meanwhile ends them under ``drain_timeout``. The collection is empty after."""
        with self._lock:
            leaving, self._forwarders = list(self._forwarders.values()), {}
            self._draining()
            for fw in leaving:
                fw.release_listener()
                self._retired.append((fw, gevent.spawn(fw.retire, timeout)))
            draining = [g for _, g in self._retired]
        gevent.joinall(draining)

    def serve_forever(self) -> None:
        """Start what is not started, then wait until ``stop()``."""
        self.start()
        self._stopped.wait()

    def reset(self) -> None:
        """Every proxy enabled, every toxic removed (toxiproxy's ``POST /reset``). A proxy
        that cannot listen again does not stop the others: each is reset, then
        :class:`ResetFailed` (an ``OSError``) names every one that could not listen."""
        failures: Dict[str, tuple] = {}
        with self._lock:
            for name, fw in list(self._forwarders.items()):
                try:
                    fw.reset()  # toxics first: they go even if it cannot listen
                    if fw.state is State.NEW:
                        fw.start_here()
                except OSError as exc:
                    failures[name] = (listen_address(fw), exc)
        if failures:
            raise ResetFailed(failures)

    def check_populate(self, proxies: Iterable[Mapping[str, Any]],
                       where: Optional[Callable[[int, Any], str]] = None) -> List[tuple]:
        """What ``populate`` checks before it changes anything, alone: ``ConfigError`` naming
        the entry (``where(index, name)``, default ``proxies[INDEX].``) and the field; else
        the plan ``populate`` follows. Binds nothing, changes nothing."""
        plans = []
        seen = set()
        for index, spec in enumerate(proxies):
            if not isinstance(spec, Mapping):
                raise ConfigError(f"proxies[{index}]" if where is None else where(index, None).rstrip(": "),
                                  f"expected an object, got {spec!r}")
            spec = dict(spec)
            name = spec.pop("name", None)
            try:
                _check_name(name)
                if name in seen:
                    raise ConfigError("name", f"{name!r} appears twice")
                seen.add(name)
                for key in ("listen", "target"):
                    if key not in spec:
                        raise ConfigError(key, "missing")
                enabled = spec.pop("enabled", True)
                if not isinstance(enabled, bool):
                    raise ConfigError("enabled", f"expected true or false, got {enabled!r}")
                listen, target = spec.pop("listen"), spec.pop("target")
                options = {**self.options, **spec}
                options.setdefault("name", name)  # as create() names it
                rule = Rule.build(listen, target, **options)
            except ConfigError as exc:
                prefix = f"proxies[{index}]." if where is None else where(index, name)
                raise ConfigError(f"{prefix}{exc.field}", str(exc).split(": ", 1)[-1]) from None
            plans.append((name, rule, enabled, options))
        return plans

    def populate(self, proxies: Iterable[Mapping[str, Any]], timeout: Optional[float] = None) -> List[Forwarder]:
        """Create or replace proxies from ``[{"name", "listen", "target", "enabled"?, option...}]``.

        Idempotent: a proxy whose name, listen address, target and options match is left
        alone (not restarted, toxics and connections kept, ``enabled`` not applied); one
        that differs is stopped (draining for ``timeout``) and replaced by a new one. Every
        entry is validated before anything changes: a bad one raises ``ConfigError``
        naming it (``proxies[2].listen: ...``) and changes nothing. Every new address is
        bound before anything else changes (a replaced proxy on the same address hands its
        listening socket over, as a reload does), so a bind failure changes nothing either:
        what this call started is stopped again and the ``OSError`` names the proxy and the
        address (``proxy "d": cannot listen on ...``). Returns the forwarders in order."""
        plans = self.check_populate(proxies)
        with self._lock:
            current = dict(self._forwarders)
            result: List[Forwarder] = []
            built: Dict[str, Forwarder] = {}
            enabled_ones: Dict[str, Forwarder] = {}
            for name, rule, enabled, options in plans:
                old = current.get(name)
                if old is not None and _same_rule(old, rule):
                    result.append(old)
                    continue
                fw = built[name] = Forwarder(rule.listen, rule.target, **options)
                if old is not None:
                    fw.count_on(old)
                if enabled:
                    enabled_ones[name] = fw
                else:
                    self._held.add(fw)
                result.append(fw)
            leaving = [current[name] for name in built if name in current]
            _start_all(enabled_ones, current, leaving, label="proxy")  # OSError: nothing changed
            for name, fw in built.items():
                self._forwarders.pop(name, None)  # a replaced proxy goes to the end, as before
                self._forwarders[name] = fw
                fw.show_own_targets()
            _stop_all(leaving, timeout)
        return result


def _start_all(built: Dict[str, Forwarder], old: Dict[str, Forwarder], leaving: List[Forwarder],
               label: Optional[str] = None,
               passed: Tuple[Optional[Passed], Dict[str, int]] = (None, {})) -> None:
    """Start every forwarder of ``built`` here, each on the listening socket of a ``leaving``
    one with the same address if there is one (its own name's first, then any other's: a
    rule renamed), so no client is refused in between; else on the socket systemd passed
    for it (``passed``: the sockets and which one each name takes), else on one it binds.
    All or nothing: on a failure, those started are stopped, inherited sockets go back to
    their owners, and the ``OSError`` is raised (its message prefixed with ``label "name": ``
    when ``label`` is given)."""
    sockets, taken = passed
    sources: Dict[str, Forwarder] = {}
    claimed = set()
    for name, new in built.items():
        candidates = [old[name]] if name in old and old[name] in leaving else []
        if getattr(new.rule.listen, "port", None) != 0:  # port 0 asks for a port of its own
            candidates += [fw for fw in leaving if fw is not old.get(name)]
        for fw in candidates:
            if (id(fw) not in claimed and fw.listens_on(new.rule.listen)
                    and is_enabled(fw)):
                sources[name] = fw
                claimed.add(id(fw))
                break
    started: List[Forwarder] = []
    starting: Optional[str] = None
    try:
        for starting, new in built.items():
            source = sources.get(starting)
            if source is not None:
                new.inherit_listener(source)
            elif sockets is not None and starting in taken:
                sockets.give(taken[starting], new)
            new.start_here()
            started.append(new)
    except BaseException as exc:
        for done, new in built.items():  # inherited sockets go back to their owners
            source = sources.get(done)
            if source is not None and new in started:
                new.return_listener(source)
        _stop_all(started, 0)
        if label is not None and isinstance(exc, OSError):
            raise OSError(exc.errno, f'{label} "{starting}": {exc.strerror or exc}') from None
        raise


def _check_name(name) -> None:
    if not isinstance(name, str) or not name:
        raise ConfigError("name", f"expected a non-empty string, got {name!r}")
    if "/" in name:
        raise ConfigError("name", f"may not contain '/', got {name!r}")
    # The API's paths name it: /proxies/NAME, percent-encoded UTF-8, where clients drop
    # "." and ".." segments (RFC 3986) and a lone surrogate has no UTF-8 at all.
    if name in (".", ".."):
        raise ConfigError("name", f"may not be {name!r}")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError("name", f"must be Unicode text (UTF-8), got {name!r}") from None


def _options_of(rule: Rule) -> Dict[str, Any]:
    return {key: value for key, value in vars(rule).items() if key not in ("listen", "target")}


def _same_rule(fw: Forwarder, rule: Rule) -> bool:
    return (_same_listen(fw, rule.listen) and rule.target == fw.rule.target
            and _options_of(rule) == _options_of(fw.rule))


def _stop_all(forwarders: List[Forwarder], timeout: Optional[float]) -> None:
    """Stop them all in parallel: each stop closes its listener at once, then waits."""
    greenlets = [gevent.spawn(fw.stop, timeout) for fw in forwarders]
    gevent.joinall(greenlets)
    for greenlet in greenlets:
        if greenlet.exception is not None:
            raise greenlet.exception
