"""Fault injection: toxiproxy's toxics, as records and as the collection a forwarder keeps.

Typical use (through a started Forwarder, which owns a ``Toxics`` collection)::

    fw.add_toxic("latency", latency=100, jitter=10)         # downstream, every connection
    with fw.toxic("bandwidth", stream="upstream", rate=64):  # KB/s, removed on exit
        ...
    seen = []
    fw.add_toxic(lambda chunk, conn: seen.append(chunk), name="tap")   # a tap: passes everything

Toxics have toxiproxy's names, attributes, defaults and meanings (``TYPES``), and gproxy adds
its own (``trigger``). A toxic in Python is any callable ``toxic(chunk, record)``: it returns
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

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from gproxy import _trigger  # noqa: F401  (a toxic type in a module of its own registers itself)
from gproxy._chain import BUILTIN, CLOSE, PYTHON, RESET, Action, Delay
from gproxy.config import ConfigError

# What users get (docs/embedding.md#what-is-public). Toxics and make_toxic are the forwarder's
# machinery: importable, not promised. The chain itself (Link, the stages) is gproxy._chain's.
__all__ = ["Toxic", "TYPES", "STREAMS", "Delay", "CLOSE", "RESET", "ToxicExists", "ToxicNotFound"]

# Defined with the chain that acts on them; their public home is here.
for _public in (Delay, Action):
    _public.__module__ = __name__
del _public

#: toxiproxy's stream names, in its direction order (index = relay.UPSTREAM/DOWNSTREAM)
STREAMS = ("upstream", "downstream")

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
    type: str
    stream: str = "downstream"
    toxicity: float = 1.0
    attributes: Dict[str, Any] = field(default_factory=dict)
    #: the callable of a toxic written in Python, else None
    function: Optional[Callable] = field(default=None, repr=False, compare=False)

    def as_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "type": self.type, "stream": self.stream,
                "toxicity": self.toxicity, "attributes": dict(self.attributes)}


# -- building and validating -----------------------------------------------------------

def make_toxic(type: Union[str, Callable], *, name: Optional[str] = None, stream: str = "downstream",
               toxicity: float = 1.0, attributes: Optional[Dict[str, Any]] = None) -> Toxic:
    """A validated Toxic; ``ConfigError`` names the culprit. ``type`` is a type name or a
    Python toxic (a callable)."""
    function = None
    if callable(type) and not isinstance(type, str):
        function, type = type, PYTHON
        default_name = getattr(function, "__name__", None) or function.__class__.__name__
    elif isinstance(type, str):
        if type not in TYPES:
            raise ConfigError("type", f"unknown toxic type {type!r} (known: {', '.join(TYPES)})")
        default_name = type
    else:
        raise ConfigError("type", f"a toxic type name or a callable, not {type!r}")
    if isinstance(stream, str) and stream.lower() in STREAMS:
        stream = stream.lower()   # toxiproxy takes any case
    else:
        raise ConfigError("stream", f"must be 'upstream' or 'downstream', not {stream!r}")
    only = BUILTIN[type].stream if function is None else None
    if only is not None and stream != only:
        raise ConfigError("stream", f"must be {only!r} for a {type} toxic, not {stream!r}")
    if name is None or name == "":
        name = f"{default_name}_{stream}"
    if not isinstance(name, str):
        raise ConfigError("name", f"must be a string, not {name!r}")
    label = f"toxic {name}"
    toxicity = _toxicity(toxicity, label)
    given = dict(attributes or {})
    if function is not None:
        if given:
            raise ConfigError(f"{label}: {sorted(given)[0]}", "a Python toxic takes no attributes")
        return Toxic(name, PYTHON, stream, toxicity, {}, function)
    return Toxic(name, type, stream, toxicity, _attributes(type, TYPES[type], given, label))


def _toxicity(value, label: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"{label}: toxicity", f"must be a number from 0 to 1, not {value!r}")
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
            raise ConfigError(culprit, f"must be true or false, not {value!r}")
        return value
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(culprit, f"must be a string, not {value!r}")
        return value
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_ATTRIBUTE:
        raise ConfigError(culprit, f"must be a whole number from 0 to {MAX_ATTRIBUTE}, not {value!r}")
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
        return Toxic(toxic.name, toxic.type, toxic.stream, toxicity, {}, toxic.function)
    merged = dict(toxic.attributes)
    merged.update(attributes)
    return Toxic(toxic.name, toxic.type, toxic.stream, toxicity,
                 _attributes(toxic.type, TYPES[toxic.type], merged, label))


# -- the per-forwarder collection ---------------------------------------------------------

class _Entry:
    """A toxic's place in a chain; stages of open connections follow it by identity."""

    __slots__ = ("toxic", "removed")

    def __init__(self, toxic: Toxic):
        self.toxic = toxic
        self.removed = False


class Toxics:
    """The toxics of one forwarder: a chain per direction, names unique across both.
    Used on the forwarder's hub only; the caller bumps the version and kicks pumps."""

    def __init__(self) -> None:
        self.chains: Tuple[List[_Entry], List[_Entry]] = ([], [])

    def __len__(self) -> int:
        return len(self.chains[0]) + len(self.chains[1])

    def list(self) -> List[Toxic]:
        """Upstream first, then downstream, each in the order added (as toxiproxy lists them)."""
        return [entry.toxic for chain in self.chains for entry in chain]

    def get(self, name: str) -> Toxic:
        return self._find(name).toxic

    def add(self, toxic: Toxic) -> Toxic:
        for chain in self.chains:
            if any(entry.toxic.name == toxic.name for entry in chain):
                raise ToxicExists(f"toxic {toxic.name}", "a toxic with this name exists already")
        self.chains[STREAMS.index(toxic.stream)].append(_Entry(toxic))
        return toxic

    def update(self, name: str, changes: Dict[str, Any]) -> Toxic:
        entry = self._find(name)
        entry.toxic = _updated(entry.toxic, changes)
        return entry.toxic

    def remove(self, name: str) -> Toxic:
        entry = self._find(name)
        self.chains[STREAMS.index(entry.toxic.stream)].remove(entry)
        entry.removed = True
        return entry.toxic

    def clear(self) -> None:
        for chain in self.chains:
            for entry in chain:
                entry.removed = True
            chain.clear()

    def _find(self, name: str) -> _Entry:
        for chain in self.chains:
            for entry in chain:
                if entry.toxic.name == name:
                    return entry
        raise ToxicNotFound(f"toxic {name}", "no toxic with this name")
