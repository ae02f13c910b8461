"""The config file: TOML -> validated rules, every error naming the file, the rule and the key.

Typical use::

    config = load("/etc/gproxy.toml")      # ConfigError: "/etc/gproxy.toml: rule 'pg': idle_timeout: ..."
    config.rules["postgres"]               # a validated gproxy.config.Rule
    config.options["postgres"]             # the keyword arguments that make its Forwarder
    config.settings                        # process-wide keys: {"log_format": "text", ...}

The format (``gproxy --check -c FILE`` validates one)::

    log_format = "text"                    # process-wide settings first
    [defaults]                             # any rule option; a rule may override each
    connect_timeout = 5
    [[rule]]
    name = "postgres"                      # unique; default: the listen address
    listen = "127.0.0.1:15432"             # unique
    targets = ["db1:5432", "db2:5432"]     # or target = "HOST:PORT"
    balance = "failover"
    # a target may be a table: {address = "db3:5432", weight = 3} or {address = ..., backup = true}
    # or {address = ..., max_connections = 100} (then queue_timeout, max_queue: the rule's queue)
    [[rule.toxic]]                         # toxics, as the HTTP API and add_toxic() take them
    type = "latency"
    latency = 100                          # the type's attributes, by name
    schedule = {on = 2, off = 8}           # optional: chaos over time (gproxy.toxics.Schedule)

Every option of a rule is a :class:`gproxy.config.Rule` field, with the ``Forwarder``
keyword's name: whatever a Forwarder accepts, the file accepts, and nothing else. The file
is stricter than Python about types: a number is a TOML number (``max_fails = "3"`` is an
error, not 3), and a key gproxy does not know is named as unknown, with the closest known
one, before anything is said about keys that are missing. Errors quote values the way TOML
writes them (``true``, ``"text"``), not the way Python prints them.
"""

from __future__ import annotations

import datetime
import difflib
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Iterable, List, Mapping, Optional

from gproxy.config import CHECK_USERS, UNIX_FILE_OPTIONS, ConfigError, Rule, UnixAddress, parse_address, spelled
from gproxy.toxics import TYPES, Toxic, make_toxic

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the same parser, from PyPI
    import tomli as tomllib

__all__ = ["ConfigFile", "load", "parse", "SETTINGS", "RELOADED_SETTINGS"]

#: process-wide keys (the rest of the top level is [defaults] and [[rule]]), with their checks
SETTINGS = ("log_format", "metrics", "reload_drain_timeout", "control_socket")

#: the process-wide keys a reload applies (the others take effect on restart only)
RELOADED_SETTINGS = ("reload_drain_timeout",)

#: rule keys that are not Rule options (listen and target are Rule's positional arguments)
_NOT_DEFAULTS = ("name", "listen", "target", "targets", "toxic")

#: a [[rule.toxic]] table's own keys; the others are the type's attributes
TOXIC_KEYS = ("type", "name", "stream", "toxicity", "schedule")


@dataclass
class ConfigFile:
    """A validated config file: rules by name, in file order, and the process-wide settings."""

    path: str
    rules: Dict[str, Rule] = field(default_factory=dict)
    #: per rule, ``Forwarder(**options[name])`` builds it: listen, target and every option given
    options: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    settings: Dict[str, Any] = field(default_factory=dict)
    #: per rule, its ``[[rule.toxic]]`` tables as validated toxics, in file order (every rule
    #: has a list, maybe empty)
    toxics: Dict[str, List[Toxic]] = field(default_factory=dict)


def load(path: str) -> ConfigFile:
    """Read and validate ``path``; raise :class:`ConfigError` naming the file, rule and key."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read it: {os.strerror(exc.errno).lower() if exc.errno else exc}") \
            from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), f"not UTF-8 text (byte {exc.start})") from None
    return parse(text, str(path))


def parse(text: str, path: str = "<config>") -> ConfigFile:
    """Validate a config file's text; ``path`` names it in errors."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, f"TOML syntax: {exc}") from None
    with spelled(toml_value):  # every message quotes values as the file writes them
        return _parse(document, path)


def _parse(document: Dict[str, Any], path: str) -> ConfigFile:
    config = ConfigFile(path)

    def fail(where: str, message: str) -> ConfigError:
        return ConfigError(f"{path}: {where}", message)

    for key, value in document.items():
        if key in ("defaults", "rule"):
            continue
        if key not in SETTINGS:
            known = ", ".join(SETTINGS + ("[defaults]", "[[rule]]"))
            raise fail(key, "unknown key" + (_close_match(key, SETTINGS + ("defaults", "rule"))
                                             or f" (the top level has {known})"))
        config.settings[key] = _setting(key, value, fail)

    defaults = document.get("defaults", {})
    if not isinstance(defaults, dict):
        raise fail("defaults", "expected a table: [defaults]")
    for key in defaults:
        if key in _NOT_DEFAULTS:
            raise fail(f"[defaults] {key}", "belongs in each [[rule]], not in [defaults]")
    _check_keys(defaults, _OPTIONS, lambda key, message: fail(f"[defaults] {key}", message))
    # A Unix socket file's mode and owner in [defaults] are for the unix:/PATH rules (HAProxy's
    # global unix-bind): checked on such an address, and left out of every other rule.
    probe = "unix:/defaults.sock" if any(key in defaults for key in UNIX_FILE_OPTIONS) else "127.0.0.1:0"
    try:  # bad defaults are reported once, as the defaults' fault
        Rule.build(probe, "127.0.0.1:1", **defaults)
    except ConfigError as exc:
        raise fail(f"[defaults] {exc.field}", _message(exc)) from None

    rules = document.get("rule")
    if rules is None:
        raise fail("rule", "no [[rule]]: nothing to forward")
    if not isinstance(rules, list) or not all(isinstance(r, dict) for r in rules):
        raise fail("rule", "expected [[rule]] tables")
    listens: Dict[Any, str] = {}
    for index, table in enumerate(rules, 1):
        name = table.get("name")
        label = f"rule {name!r}" if isinstance(name, str) else f"rule #{index}"
        _check_keys(table, _RULE_KEYS, lambda key, message, label=label: fail(f"{label}: {key}", message))
        if "listen" not in table:
            raise fail(f"{label}: listen", "missing")
        if "target" in table and "targets" in table:
            raise fail(f"{label}: targets", "give target or targets, not both")
        if "target" not in table and "targets" not in table:
            raise fail(f"{label}: target", "missing (target = \"HOST:PORT\" or targets = [...])")
        target_key = "targets" if "targets" in table else "target"
        target = table[target_key]
        if target_key == "targets" and not isinstance(target, list):
            raise fail(f"{label}: targets", f"expected a list of addresses, got {toml_value(target)}")
        if isinstance(target, list) and not all(isinstance(t, (str, dict)) for t in target):
            raise fail(f"{label}: {target_key}", "expected addresses as strings or tables "
                       f"({{address = \"HOST:PORT\", weight = 3}}), got {toml_value(target)}")
        if not isinstance(target, (str, list)):
            raise fail(f"{label}: {target_key}", f"expected \"HOST:PORT\", got {toml_value(target)}")
        if not isinstance(table["listen"], str):
            raise fail(f"{label}: listen", f"expected \"HOST:PORT\", got {toml_value(table['listen'])}")
        options = {**_defaults_for(table["listen"], defaults),
                   **{k: v for k, v in table.items() if k not in ("listen", "target", "targets", "toxic")}}
        # [defaults] may hold the keys of several kinds of check: each rule takes its own kind's
        kind = options.get("check")
        kind = kind.strip().lower() if isinstance(kind, str) else kind
        for key, users in CHECK_USERS.items():
            if key in defaults and key not in table and kind not in users:
                del options[key]
        try:
            rule = Rule.build(table["listen"], target, **options)
        except ConfigError as exc:
            key = target_key if exc.field == "target" else exc.field
            raise fail(f"{label}: {key}", _message(exc)) from None
        rule_name = rule.name if rule.name is not None else str(rule.listen)
        if rule_name in config.rules:
            raise fail(f"{label}: name", f"{rule_name!r} names an earlier rule too; names are unique")
        if _binds(rule.listen):
            other = listens.get(rule.listen)
            if other is not None:
                raise fail(f"{label}: listen", f"{rule.listen} is the listen address of rule {other!r} too")
            listens[rule.listen] = rule_name
        config.rules[rule_name] = rule
        config.options[rule_name] = {"listen": table["listen"], "target": target, **options}
        config.toxics[rule_name] = _toxics(table.get("toxic", []),
                                           lambda key, message, label=label: fail(f"{label}: {key}", message))
    return config


def _toxics(tables: Any, fail) -> List[Toxic]:
    """A rule's ``[[rule.toxic]]`` tables, validated by ``make_toxic`` as the HTTP API's and
    ``add_toxic()``'s are: the same names, defaults and checks."""
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise fail("toxic", f"expected [[rule.toxic]] tables, got {toml_value(tables)}")
    toxics: List[Toxic] = []
    for index, table in enumerate(tables, 1):
        given = table.get("name")
        where = f"toxic {given}" if isinstance(given, str) and given else f"toxic #{index}"
        kind = table.get("type")
        if kind is None:
            raise fail(f"{where}: type", f"missing (one of {', '.join(TYPES)})")
        if not isinstance(kind, str):  # a Python toxic has no TOML spelling
            raise fail(f"{where}: type", f"expected a toxic type name, got {toml_value(kind)}")
        try:
            toxic = make_toxic(kind, name=given, stream=table.get("stream"), toxicity=table.get("toxicity"),
                               attributes={k: v for k, v in table.items() if k not in TOXIC_KEYS},
                               schedule=table.get("schedule"))
        except ConfigError as exc:
            culprit = exc.field if exc.field.startswith("toxic ") else f"{where}: {exc.field}"
            raise fail(culprit, _message(exc)) from None
        if any(toxic.name == other.name for other in toxics):
            raise fail(f"toxic {toxic.name}: name", f"{toxic.name!r} names an earlier toxic of this rule too; "
                                                  "names are unique per rule")
        toxics.append(toxic)
    return toxics


def _option_kinds() -> Dict[str, str]:
    """Every Rule option whose value is a number or a flag: ``{name: "int" | "float" | "bool"}``,
    read from the annotations, so a new option is checked without being listed here."""
    kinds = {}
    for option in fields(Rule):
        spelled_type = option.type if isinstance(option.type, str) else getattr(option.type, "__name__", "")
        kind = re.sub(r"^Optional\[(.*)\]$", r"\1", spelled_type)
        if kind in ("int", "float", "bool") and option.name not in _NUMBER_OR_TEXT:
            kinds[option.name] = kind
    return kinds


#: options stored as numbers that the file may also give as text: a mode, "0660" or 0o660
_NUMBER_OR_TEXT = ("unix_mode",)


#: the keys a [[rule]] may have, and those [defaults] may have
_OPTION_KINDS = _option_kinds()
_OPTIONS = tuple(f.name for f in fields(Rule) if f.name not in _NOT_DEFAULTS)
_RULE_KEYS = _NOT_DEFAULTS + _OPTIONS


def _check_keys(table: Mapping[str, Any], known: Iterable[str], fail) -> None:
    """Unknown keys first (a misspelt ``targtes`` is not a missing ``target``), then numbers
    that are not TOML numbers: ``"3"`` is refused, not read as 3 (nor ``"1_0"`` as 10)."""
    known = tuple(known)
    for key in table:
        if key not in known:
            raise fail(key, f"unknown key{_close_match(key, known)}")
    for key, value in table.items():
        kind = _OPTION_KINDS.get(key)
        if kind in ("int", "float") and (isinstance(value, bool) or not isinstance(value, (int, float))):
            what = "a whole number" if kind == "int" else "a number of seconds"
            unquote = " (numbers go without quotes)" if isinstance(value, str) else ""
            raise fail(key, f"expected {what}, got {toml_value(value)}{unquote}")


def _close_match(key: str, known: Iterable[str]) -> str:
    """`` (did you mean 'X'?)`` for the known key closest to a misspelt one, or nothing."""
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def toml_value(value: Any) -> str:
    """``value`` as TOML writes it: ``true``, ``"text"``, ``[1, 2]``, ``{ a = 1 }``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        # JSON's escapes are TOML's basic string's; anything unprintable is escaped, so a
        # message stays on its one line
        return json.dumps(value, ensure_ascii=not value.isprintable())
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(toml_value, value)) + "]"
    if isinstance(value, dict):
        items = (f"{k if _BARE_KEY.fullmatch(k) else toml_value(k)} = {toml_value(v)}" for k, v in value.items())
        return "{ " + ", ".join(items) + " }" if value else "{}"
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    return repr(value)
def _defaults_for(listen: str, defaults: Dict[str, Any]) -> Dict[str, Any]:
    """The [defaults] that apply to a rule listening on ``listen``: all but the Unix socket
    file's options, unless it listens on a socket file."""
    text = listen.strip()
    if text.startswith("unix:") and not text.startswith("unix:@"):
        return defaults
    return {key: value for key, value in defaults.items() if key not in UNIX_FILE_OPTIONS}


def _binds(address) -> bool:
    """Whether two rules with this listen address would collide (port 0 never does)."""
    return isinstance(address, UnixAddress) or address.port != 0


def _message(exc: ConfigError) -> str:
    return str(exc)[len(exc.field) + 2:] if str(exc).startswith(exc.field + ": ") else str(exc)


def _setting(key: str, value: Any, fail) -> Any:
    if key == "reload_drain_timeout":
        # no "off": leaving the key out is no limit, and TOML has no null to write it with
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
            unquote = " (numbers go without quotes)" if isinstance(value, str) else ""
            raise fail(key, f"expected a number of seconds >= 0, got {toml_value(value)}{unquote}")
        return float(value)
    if key == "control_socket":
        if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
            raise fail(key, f"expected the path of a Unix socket, such as \"/run/gproxy/control.sock\", "
                            f"got {toml_value(value)}")
        if len(value.encode()) > 107:
            raise fail(key, f"a Unix socket path is at most 107 bytes, got {len(value.encode())}")
        return value
    if key == "log_format":
        if value not in ("text", "json"):
            raise fail(key, f"expected \"text\" or \"json\", got {toml_value(value)}")
        return value
    # metrics: an address to serve HTTP on
    if not isinstance(value, str):
        raise fail(key, f"expected \"HOST:PORT\", got {toml_value(value)}")
    try:
        parse_address(value, key)
    except ConfigError as exc:
        raise fail(key, _message(exc)) from None
    return value


def rule_keys() -> Mapping[str, Optional[object]]:
    """Every key a [[rule]] may have, with its default (for documentation and tests)."""
    keys: Dict[str, Optional[object]] = {"name": None, "listen": None, "target": None, "targets": None,
                                         "toxic": None}
    keys.update({f.name: f.default for f in fields(Rule) if f.name not in ("listen", "target", "name")})
    return keys
