"""Fault injection: toxiproxy's toxics, as records and as the collection a forwarder keeps.

Typical use (through a started Forwarder, which owns a ``Toxics`` collection)::

    fw.add_toxic("latency", latency=100, jitter=10)         # downstream, every connection
    fw.add_toxic(toxics.latency(100, jitter=10))            # the same, typed: one helper per type
    with fw.toxic("bandwidth", stream="upstream", rate=64):  # KB/s, removed on exit
        ...
    seen = []
    fw.add_toxic(lambda chunk, conn: seen.append(chunk), name="tap")   # a tap: passes everything

Toxics have toxiproxy's names, attributes, defaults and meanings (``TYPES``), and gproxy adds
its own (``trigger``); the helpers (``latency()``, ``trigger()``...) spell each type's
attributes as typed parameters, for type checkers and IDEs, and return a ``ToxicSpec`` that
``add_toxic`` takes. A toxic in Python is any callable ``toxic(chunk, record)``: it returns
``None`` (pass the chunk), bytes, bytearray or memoryview (pass these instead; empty drops
it), ``Delay(seconds)`` or ``Delay(seconds, data)``, ``CLOSE`` or ``RESET`` (close or reset
the connection, dropping the chunk), or ``Delay(seconds, data=None, action=RESET)`` (pass the
chunk, end the connection ``seconds`` later). A class is made into an instance per
connection; an ``eof(record)`` method is called at the EOF. Anything else it returns, or
raises, is a bug in the program: reported naming the toxic (on stderr if logging is not
configured), and the connection ends with outcome ERROR.

The chain a direction with toxics runs through (``Link``, a stage per toxic, and the
stage protocol a new toxic implements) is in ``gproxy._chain``; its docstring is the
theory of operation. In short: a change never loses, duplicates or reorders a byte that
was read, and a toxic that ends the connection either fires or gives back what it caught.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Callable, Dict, List, Literal, Mapping, Optional, Protocol, Tuple, Type, Union

# toxic types in modules of their own: importing one registers it (TYPES lists them in this order)
from gproxy import _trigger  # noqa: F401  isort: skip
from gproxy import _proto_redis  # noqa: F401  isort: skip
from gproxy import _proto_http  # noqa: F401  isort: skip
from gproxy import _proto_pg  # noqa: F401  isort: skip
from gproxy._chain import BUILTIN, CLOSE, PYTHON, RESET, Action, Delay
from gproxy._schedule import Schedule
from gproxy._schedule import from_table as schedule_from
from gproxy.config import ConfigError, show
from gproxy.stats import ConnectionRecord

# What users get (docs/embedding.md#what-is-public). Toxics and make_toxic are the forwarder's
# machinery: importable, not promised. The chain itself (Link, the stages) is gproxy._chain's.
__all__ = ["Toxic", "TYPES", "STREAMS", "Delay", "CLOSE", "RESET", "ToxicExists", "ToxicNotFound",
           "ToxicSpec", "ToxicType", "StreamName", "PythonToxic", "PerConnectionToxic", "ToxicResult",
           "AttributeValue", "TriggerAction", "Schedule",
           "latency", "bandwidth", "slow_close", "timeout", "reset_peer", "slicer", "limit_data", "trigger",
           "redis_error", "redis_delay", "http_response", "http_delay", "pg_error"]

# Defined with the chain that acts on them; their public home is here.
for _public in (Delay, Action, Schedule):
    _public.__module__ = __name__
del _public

#: toxiproxy's stream names, in its direction order (index = relay.UPSTREAM/DOWNSTREAM)
STREAMS = ("upstream", "downstream")

# -- types, for type checkers (mypy --strict, IDEs) ------------------------------------------

#: a stream's name as type checkers know it (at run time any case is taken)
StreamName = Literal["upstream", "downstream"]
#: every built-in type's name (``TYPES`` at run time; a test keeps the two the same)
ToxicType = Literal["latency", "bandwidth", "slow_close", "timeout", "reset_peer", "slicer", "limit_data",
                    "trigger", "redis_error", "redis_delay", "http_response", "http_delay", "pg_error"]
#: what a Python toxic may return: pass the chunk (None), these bytes instead (empty drops
#: it), ``Delay``, ``CLOSE`` or ``RESET``
ToxicResult = Union[None, bytes, bytearray, memoryview, Delay, Action]


class PerConnectionToxic(Protocol):
    """A Python toxic's class: made into an instance per connection (with no arguments),
    which is called with each chunk; an ``eof(record)`` method, if it has one, at the EOF."""

    def __call__(self, chunk: bytes, record: ConnectionRecord) -> ToxicResult: ...


#: a toxic written in Python: a function called with each chunk of its stream and the
#: connection's record, or a class of which each connection gets an instance
PythonToxic = Union[Callable[[bytes, ConnectionRecord], ToxicResult], Type[PerConnectionToxic]]
#: an attribute's value in ``add_toxic("TYPE", **attributes)`` (each type says which it takes)
AttributeValue = Union[int, float, str]

#: every built-in type: its attributes and their defaults (toxiproxy's: Go's zero values),
#: toxiproxy's in its order, then gproxy's own; each is a stage class (gproxy._chain); an
#: attribute's type is its default's: int (a whole number >= 0), str or bool
TYPES: Dict[str, Dict[str, Any]] = {name: dict(stage.attributes) for name, stage in BUILTIN.items()}

#: the largest attribute value: toxiproxy's attributes are Go int64s, so its clients send no
#: more; every stage runs with it, where ~400 digits overflowed the float of a time
MAX_ATTRIBUTE = 2**63 - 1


class ToxicExists(ConfigError):
    """A toxic with that name is on the forwarder already (toxiproxy: 409)."""


class ToxicNotFound(ConfigError, LookupError):
    """No toxic with that name (toxiproxy: 404)."""


@dataclass(frozen=True)
class Toxic:
    """One toxic as the API shows it: ``as_dict()`` is toxiproxy's JSON shape."""

    name: str
    type: str                        #: a ``ToxicType``, or ``"python"``
    stream: StreamName = "downstream"
    toxicity: float = 1.0
    attributes: Dict[str, Any] = field(default_factory=dict)
    #: the callable of a toxic written in Python, else None
    function: Optional[Callable] = field(default=None, repr=False, compare=False)
    #: when it acts (``Schedule``), or None: always. A scheduled toxic's ``toxicity`` is the
    #: one in force now (0 while off)
    schedule: Optional[Schedule] = None

    def as_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "type": self.type, "stream": self.stream,
                "toxicity": self.toxicity, "attributes": dict(self.attributes)}


# -- building and validating -----------------------------------------------------------

def default_stream(type: object) -> str:
    """The stream of a toxic given none: toxiproxy's ``"downstream"``, or the one stream a
    type works on (``redis_error``, ``http_response``... act on requests: ``"upstream"``)."""
    fixed = BUILTIN[type].stream if isinstance(type, str) and type in BUILTIN else None
    return fixed or "downstream"


def make_toxic(type: Union[str, PythonToxic, "ToxicSpec"], *, name: Optional[str] = None,
               stream: Optional[str] = None, toxicity: Optional[float] = None,
               attributes: Optional[Dict[str, Any]] = None,
               schedule: Union[Schedule, Mapping[str, Any], None] = None) -> Toxic:
    """A validated Toxic; ``ConfigError`` names the culprit. ``type`` is a type name, a
    ``ToxicSpec`` (a helper's: its name, stream and toxicity stand unless given here, and
    differing ones are an error) or a Python toxic (a callable). ``stream`` None is
    ``"downstream"`` (toxiproxy's default) or, for a type that works on one stream only
    (``redis_error``, ``http_response``...), that one; ``toxicity`` None is 1. The HTTP API,
    the config file and the Python API all build their toxics here: one set of checks, names
    and defaults."""
    if isinstance(type, ToxicSpec):
        spec = type
        if attributes:
            raise ConfigError(f"toxic {spec.name or spec.type}: {sorted(attributes)[0]}",
                              f"give the attributes to {spec.type}(), not beside it")
        name = _once("name", name, spec.name, spec)
        stream = _once("stream", None if stream is None else _stream(stream), spec.stream, spec)
        toxicity = _once("toxicity", toxicity, spec.toxicity, spec)
        type, attributes = spec.type, dict(spec.attributes)
    if stream is None:
        stream = default_stream(type)
    if toxicity is None:
        toxicity = 1.0
    function = None
    if callable(type) and not isinstance(type, str):
        function, type = type, PYTHON
        default_name = getattr(function, "__name__", None) or function.__class__.__name__
    elif isinstance(type, str):
        if type not in TYPES:
            raise ConfigError("type", f"unknown toxic type {show(type)} (known: {', '.join(TYPES)})")
        default_name = type
    else:
        raise ConfigError("type", f"a toxic type name or a callable, not {show(type)}")
    stream = _stream(stream)
    only = BUILTIN[type].stream if function is None else None
    if only is not None and stream != only:
        raise ConfigError("stream", f"must be {show(only)} for {type} toxics, not {show(stream)}")
    if name is None or name == "":
        name = f"{default_name}_{stream}"
    if not isinstance(name, str):
        raise ConfigError("name", f"must be a string, not {show(name)}")
    label = f"toxic {name}"
    toxicity = _toxicity(toxicity, label)
    if schedule is not None:
        try:
            schedule = schedule_from(schedule)   # a config file's table, or a Schedule
        except ConfigError as exc:
            raise ConfigError(f"{label}: {exc.field}", str(exc)[len(exc.field) + 2:]) from None
    given = dict(attributes or {})
    if function is not None:
        if given:
            raise ConfigError(f"{label}: {sorted(given)[0]}", "a Python toxic takes no attributes")
        return Toxic(name, PYTHON, stream, toxicity, {}, function, schedule)
    return Toxic(name, type, stream, toxicity, _attributes(type, TYPES[type], given, label), schedule=schedule)


def _once(what: str, here: Any, in_spec: Any, spec: "ToxicSpec") -> Any:
    if here is None:
        return in_spec
    if in_spec is not None and here != in_spec:
        raise ConfigError(f"toxic {spec.name or spec.type}: {what}",
                          f"given twice: {in_spec!r} in {spec.type}(), {here!r} beside it")
    return here


def _stream(stream: Any) -> StreamName:
    if isinstance(stream, str) and stream.lower() in STREAMS:
        return "upstream" if stream.lower() == "upstream" else "downstream"  # toxiproxy takes any case
    raise ConfigError("stream", f"must be {show('upstream')} or {show('downstream')}, not {show(stream)}")


def _toxicity(value: object, label: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"{label}: toxicity", f"must be a number from 0 to 1, not {show(value)}")
    return float(value)


def _attributes(type: str, defaults: Dict[str, Any], given: Dict[str, Any], label: str) -> Dict[str, Any]:
    result = dict(defaults)
    for key, value in given.items():
        if key not in defaults:
            raise ConfigError(f"{label}: {key}",
                              f"{type} has no such attribute (it has: {', '.join(defaults)})")
        result[key] = _attribute(defaults[key], value, f"{label}: {key}")
    problem = BUILTIN[type].check(result)
    if problem is not None:
        raise ConfigError(f"{label}: {problem[0]}", problem[1])
    return result


def _attribute(default: Any, value: Any, culprit: str) -> Any:
    """``value`` checked against the type of the attribute's ``default``."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(culprit, f"must be true or false, not {show(value)}")
        return value
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(culprit, f"must be a string, not {show(value)}")
        return value
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_ATTRIBUTE:
        raise ConfigError(culprit, f"must be a whole number from 0 to {MAX_ATTRIBUTE}, not {show(value)}")
    return value


def _updated(toxic: Toxic, changes: Dict[str, Any]) -> Toxic:
    """``toxic`` with ``changes`` (toxicity and attributes) applied, validated."""
    label = f"toxic {toxic.name}"
    changes = dict(changes)
    for fixed in ("name", "type", "stream"):
        if fixed in changes and changes.pop(fixed) != getattr(toxic, fixed):
            raise ConfigError(f"{label}: {fixed}", "cannot be changed; remove the toxic and add it again")
    toxicity = _toxicity(changes.pop("toxicity"), label) if "toxicity" in changes else toxic.toxicity
    attributes = changes.pop("attributes", None) or {}
    attributes.update(changes)
    if toxic.type == PYTHON:
        if attributes:
            raise ConfigError(f"{label}: {sorted(attributes)[0]}", "a Python toxic takes no attributes")
        return replace(toxic, toxicity=toxicity)
    merged = dict(toxic.attributes)
    merged.update(attributes)
    return replace(toxic, toxicity=toxicity, attributes=_attributes(toxic.type, TYPES[toxic.type], merged, label))


# -- the per-forwarder collection ---------------------------------------------------------

class _Entry:
    """A toxic's place in a chain; stages of open connections follow it by identity. A toxic
    whose stage has a ``reverse`` half also has an entry in the other chain (``main`` is then
    its entry, and that one's ``reverse`` this one): hidden from listings, following it."""

    __slots__ = ("toxic", "removed", "main", "reverse", "peak", "factor", "runner")

    def __init__(self, toxic: Toxic, main: Optional["_Entry"] = None):
        self.toxic = toxic
        self.removed = False
        self.main = main
        self.reverse: Optional[_Entry] = None
        # a scheduled toxic's: its toxicity while on, the share of it in force now (the
        # toxic's toxicity is their product), and what follows the schedule (the forwarder's)
        self.peak: Optional[float] = None
        self.factor = 1.0
        self.runner: Any = None

    def cancel(self) -> None:
        self.removed = True
        if self.runner is not None:
            self.runner.cancel()


class Toxics:
    """The toxics of one forwarder: a chain per direction, names unique across both.
    Used on the forwarder's hub only; the caller bumps the version and kicks pumps."""

    def __init__(self) -> None:
        self.chains: Tuple[List[_Entry], List[_Entry]] = ([], [])

    def __len__(self) -> int:
        return len(self.list())

    def list(self) -> List[Toxic]:
        """Upstream first, then downstream, each in the order added (as toxiproxy lists them)."""
        return [entry.toxic for chain in self.chains for entry in chain if entry.main is None]

    def get(self, name: str) -> Toxic:
        return self._find(name).toxic

    def add(self, toxic: Toxic) -> Toxic:
        for chain in self.chains:
            if any(entry.toxic.name == toxic.name for entry in chain):
                raise ToxicExists(f"toxic {toxic.name}", "a toxic with this name exists already")
        direction = STREAMS.index(toxic.stream)
        entry = _Entry(toxic)
        if toxic.schedule is not None:
            entry.peak = toxic.toxicity
            factor = toxic.schedule.at(0)[0]
            entry.factor = 1.0 if factor is None else factor
            toxic = entry.toxic = replace(toxic, toxicity=entry.peak * entry.factor)
        self.chains[direction].append(entry)
        if toxic.function is None and BUILTIN[toxic.type].reverse is not None:
            # first on the other stream, as its own is last: the toxic added last is the one
            # next to the target on both, so each reply half counts the replies to exactly
            # the requests its own half passed on (not another toxic's answers)
            entry.reverse = _Entry(toxic, main=entry)
            self.chains[1 - direction].insert(0, entry.reverse)
        return toxic

    def update(self, name: str, changes: Dict[str, Any]) -> Toxic:
        """Change toxicity or attributes. A scheduled toxic's new toxicity is the one it has
        while on: the schedule's share of it is in force at once."""
        entry = self._find(name)
        peak = entry.peak
        if peak is not None and changes.get("toxicity") is not None:
            changes = dict(changes)
            peak = _toxicity(changes["toxicity"], f"toxic {name}")
            changes["toxicity"] = peak * entry.factor
        self._set(entry, _updated(entry.toxic, changes))
        entry.peak = peak
        return entry.toxic

    def set_factor(self, entry: _Entry, factor: float) -> None:
        """A scheduled toxic's share of its toxicity (its schedule's runner calls this)."""
        assert entry.peak is not None
        entry.factor = factor
        self._set(entry, replace(entry.toxic, toxicity=entry.peak * factor))

    def _set(self, entry: _Entry, toxic: Toxic) -> None:
        entry.toxic = toxic
        if entry.reverse is not None:
            entry.reverse.toxic = toxic

    def entry(self, name: str) -> _Entry:
        return self._find(name)

    def entries(self) -> List[_Entry]:
        """Each toxic's entry, in the order ``list()`` gives."""
        return [entry for chain in self.chains for entry in chain if entry.main is None]

    def remove(self, name: str) -> Toxic:
        entry = self._find(name)
        direction = STREAMS.index(entry.toxic.stream)
        for chain, each in ((self.chains[direction], entry), (self.chains[1 - direction], entry.reverse)):
            if each is not None:
                chain.remove(each)
                each.cancel()
        return entry.toxic

    def clear(self) -> None:
        for chain in self.chains:
            for entry in chain:
                entry.cancel()
            chain.clear()

    def stop_schedules(self) -> None:
        """The forwarder stops: every schedule stops where it is (the toxics stay)."""
        for entry in self.entries():
            if entry.runner is not None:
                entry.runner.cancel()

    def _find(self, name: str) -> _Entry:
        for chain in self.chains:
            for entry in chain:
                if entry.toxic.name == name and entry.main is None:
                    return entry
        raise ToxicNotFound(f"toxic {name}", "no toxic with this name")


# -- one typed helper per built-in type ------------------------------------------------------

@dataclass(frozen=True)
class ToxicSpec:
    """A built-in toxic described, not yet added: what the helpers below return, and what
    ``Forwarder.add_toxic`` and ``Forwarder.toxic`` take in place of a type name. ``name``,
    ``stream`` and ``toxicity`` None: not said here (``add_toxic``'s keywords, else
    ``TYPE_STREAM``, ``"downstream"`` and 1). Validated when made: a bad value raises
    ``ConfigError`` where the helper is called."""

    type: ToxicType
    #: every attribute of the type, defaults filled in (read-only)
    attributes: Mapping[str, Any] = field(hash=False)
    name: Optional[str] = None
    stream: Optional[StreamName] = None
    toxicity: Optional[float] = None

    def __repr__(self) -> str:
        said = "".join(f", {key}={getattr(self, key)!r}" for key in ("name", "stream", "toxicity")
                       if getattr(self, key) is not None)
        return f"ToxicSpec({self.type!r}, {dict(self.attributes)!r}{said})"


def _spec(type: ToxicType, attributes: Dict[str, Any], name: Optional[str],
          stream: Optional[StreamName], toxicity: Optional[float]) -> ToxicSpec:
    label = f"toxic {name or type}"
    if name is not None and not isinstance(name, str):
        raise ConfigError(f"{label}: name", f"must be a string, not {name!r}")
    checked = _attributes(type, TYPES[type], attributes, label)
    return ToxicSpec(type, MappingProxyType(checked), name,
                     None if stream is None else _stream(stream),
                     None if toxicity is None else _toxicity(toxicity, label))


def latency(latency: int = 0, jitter: int = 0, *, name: Optional[str] = None,
            stream: Optional[StreamName] = None, toxicity: Optional[float] = None) -> ToxicSpec:
    """Each chunk, and the EOF, arrive ``latency`` +- ``jitter`` milliseconds late."""
    return _spec("latency", {"latency": latency, "jitter": jitter}, name, stream, toxicity)


def bandwidth(rate: int = 0, *, name: Optional[str] = None,
              stream: Optional[StreamName] = None, toxicity: Optional[float] = None) -> ToxicSpec:
    """At most ``rate`` KB/s (1 KB = 1000 bytes) pass; 0 is no limit."""
    return _spec("bandwidth", {"rate": rate}, name, stream, toxicity)


def slow_close(delay: int = 0, *, name: Optional[str] = None,
               stream: Optional[StreamName] = None, toxicity: Optional[float] = None) -> ToxicSpec:
    """The EOF is passed on ``delay`` milliseconds later."""
    return _spec("slow_close", {"delay": delay}, name, stream, toxicity)


def timeout(timeout: int = 0, *, name: Optional[str] = None,
            stream: Optional[StreamName] = None, toxicity: Optional[float] = None) -> ToxicSpec:
    """Nothing passes (held); the connection is closed after ``timeout`` ms (0: never)."""
    return _spec("timeout", {"timeout": timeout}, name, stream, toxicity)


def reset_peer(timeout: int = 0, *, name: Optional[str] = None,
               stream: Optional[StreamName] = None, toxicity: Optional[float] = None) -> ToxicSpec:
    """``timeout`` ms after the first chunk, both sides are reset (RST)."""
    return _spec("reset_peer", {"timeout": timeout}, name, stream, toxicity)


def slicer(average_size: int = 0, size_variation: int = 0, delay: int = 0, *,
           name: Optional[str] = None, stream: Optional[StreamName] = None,
           toxicity: Optional[float] = None) -> ToxicSpec:
    """Chunks cut into slices of ``average_size`` +- ``size_variation`` bytes, ``delay``
    microseconds apart (``average_size`` at least 1 and above ``size_variation``)."""
    return _spec("slicer", {"average_size": average_size, "size_variation": size_variation,
                            "delay": delay}, name, stream, toxicity)


def limit_data(bytes: int = 0, *, name: Optional[str] = None,
               stream: Optional[StreamName] = None, toxicity: Optional[float] = None) -> ToxicSpec:
    """``bytes`` bytes pass, then the connection is closed."""
    return _spec("limit_data", {"bytes": bytes}, name, stream, toxicity)


#: what a ``trigger`` does at its point
TriggerAction = Literal["reset", "close", "drop", "delay"]


def trigger(match: str = "", after_bytes: int = 0, action: TriggerAction = "reset", delay: int = 0,
            once: bool = True, *, name: Optional[str] = None, stream: Optional[StreamName] = None,
            toxicity: Optional[float] = None) -> ToxicSpec:
    """At a point of the stream (the end of a ``match``, a regex given as a string, or after
    ``after_bytes`` bytes), ``delay`` ms later: reset, close, drop or delay; ``once`` or every
    time (gproxy's own type: see gproxy._trigger)."""
    return _spec("trigger", {"match": match, "after_bytes": after_bytes, "action": action,
                             "delay": delay, "once": once}, name, stream, toxicity)


def redis_error(command: str = "", error: str = "ERR injected by gproxy", *, name: Optional[str] = None,
                stream: StreamName = "upstream", toxicity: Optional[float] = None) -> ToxicSpec:
    """Redis commands named ``command`` (any case; empty: all) get ``-error`` in place of the
    server's reply, in order; upstream only (gproxy's own type: see gproxy._proto_redis)."""
    return _spec("redis_error", {"command": command, "error": error}, name, stream, toxicity)


def redis_delay(command: str = "", delay: int = 0, *, name: Optional[str] = None,
                stream: StreamName = "upstream", toxicity: Optional[float] = None) -> ToxicSpec:
    """Redis commands named ``command`` (any case; empty: all) reach the server ``delay`` ms
    after they came, so their replies come that much later; upstream only (gproxy's own type:
    see gproxy._proto_redis)."""
    return _spec("redis_delay", {"command": command, "delay": delay}, name, stream, toxicity)


def http_response(status: int = 503, body: str = "", path: str = "", *, name: Optional[str] = None,
                  stream: StreamName = "upstream", toxicity: Optional[float] = None) -> ToxicSpec:
    """HTTP/1.x requests whose target starts with ``path`` (empty: all) get ``status`` and
    ``body`` in place of the target's response, in order, on a connection that goes on;
    upstream only (gproxy's own type: see gproxy._proto_http)."""
    return _spec("http_response", {"status": status, "body": body, "path": path}, name, stream, toxicity)


def http_delay(delay: int = 0, path: str = "", *, name: Optional[str] = None,
               stream: StreamName = "upstream", toxicity: Optional[float] = None) -> ToxicSpec:
    """HTTP/1.x requests whose target starts with ``path`` (empty: all) reach the target
    ``delay`` ms after their header section came, so their responses come that much later;
    upstream only (gproxy's own type: see gproxy._proto_http)."""
    return _spec("http_delay", {"delay": delay, "path": path}, name, stream, toxicity)


def pg_error(query: str = "", code: str = "XX000", message: str = "injected by gproxy", *,
             name: Optional[str] = None, stream: StreamName = "upstream",
             toxicity: Optional[float] = None) -> ToxicSpec:
    """PostgreSQL queries whose SQL matches ``query`` (a regex tried at its start, any case;
    empty: all) get an ErrorResponse with SQLSTATE ``code`` and ``message``, then
    ReadyForQuery, in place of the server's reply; upstream only (gproxy's own type: see
    gproxy._proto_pg)."""
    return _spec("pg_error", {"query": query, "code": code, "message": message}, name, stream, toxicity)
