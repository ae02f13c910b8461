"""The typed public surface: Forwarder's keyword options, py.typed, and what help() shows."""

from __future__ import annotations

import dataclasses
import inspect
import pydoc
import sys
from pathlib import Path

import pytest

import gproxy
from gproxy import ConfigError
from gproxy.config import Rule

ROOT = Path(__file__).resolve().parent.parent

HOOKS = ("on_open", "on_close")


def test_forwarder_options_are_typed_keyword_parameters_with_rules_defaults():
    # inspect rather than running mypy: the same facts mypy and IDEs read (names, kinds,
    # annotations, defaults), checked in milliseconds with no extra dependency.
    signature = inspect.signature(gproxy.Forwarder)
    params = signature.parameters
    assert list(params)[:2] == ["listen", "target"]
    assert all(params[n].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for n in ("listen", "target"))
    options = [p for p in params.values() if p.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in options), signature  # no **options
    rule_fields = {f.name: f.default for f in dataclasses.fields(Rule)}
    del rule_fields["listen"], rule_fields["target"]
    assert {p.name for p in options} == set(rule_fields) | set(HOOKS), signature
    for p in options:
        assert p.annotation is not inspect.Parameter.empty, p
        expected = None if p.name in HOOKS else rule_fields[p.name]
        assert p.default == expected and type(p.default) is type(expected), p


def test_a_misspelt_option_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match="idel_timeout"):
        gproxy.Forwarder("127.0.0.1:0", "127.0.0.1:1", idel_timeout=5)


def test_help_shows_every_option():
    text = pydoc.render_doc(gproxy.Forwarder, renderer=pydoc.plaintext).replace("'", "")
    for name in ("connect_timeout: Optional[float] = 10.0", "idle_timeout: Optional[float] = None",
                 "splice: bool = True", "on_close: Optional[", "max_connections: Optional[int] = None"):
        assert name in text, text[:3000]


def test_py_typed_ships_as_package_data():
    assert (ROOT / "gproxy" / "py.typed").is_file()
    if sys.version_info >= (3, 11):
        import tomllib
        config = tomllib.loads((ROOT / "pyproject.toml").read_text())
        assert "py.typed" in config["tool"]["setuptools"]["package-data"]["gproxy"]


@pytest.mark.parametrize("hook", HOOKS)
def test_a_hook_must_be_callable(hook):
    with pytest.raises(ConfigError) as bad:
        gproxy.Forwarder("127.0.0.1:0", "127.0.0.1:1", **{hook: "not callable"})
    assert bad.value.field == hook
