"""The documentation says what the code does: fences close, links land, and every list the code
can enumerate (Forwarder's parameters, outcomes, options, config keys, toxic types) is complete.

Each test reads the docs the way a renderer does (tests/doctext.py), so a stray fence fails here
at its line instead of turning prose into code and code into prose.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import re
import subprocess
import sys

import pytest

import gproxy
from doctext import DOCS_DIR, ROOT, anchors, documents, fences, links, section
from gproxy._configfile import SETTINGS, rule_keys
from gproxy.cli import build_parser
from gproxy.toxics import TYPES

DOCS = {path.relative_to(ROOT).as_posix(): path for path in documents()}


@pytest.mark.parametrize("name", sorted(DOCS))
def test_fences_are_balanced_and_name_their_language(name):
    fences(DOCS[name])   # FenceError names the line: an unclosed fence, or one opened by mistake


@pytest.mark.parametrize("name", sorted(DOCS))
def test_relative_links_point_at_files_and_headings_that_exist(name):
    path = DOCS[name]
    broken = []
    for line, target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):   # https:, mailto: and the like
            continue
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        if not resolved.exists() or ROOT not in resolved.parents:
            broken.append(f"{name}:{line}: {target}: no such file in the repository")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{name}:{line}: {target}: no heading with that anchor")
    assert not broken, "\n".join(broken)


def test_every_doc_is_linked_from_the_readme():
    linked = {target.partition("#")[0] for _, target in links(ROOT / "README.md")}
    for path in DOCS_DIR.iterdir():
        assert f"docs/{path.name}" in linked, f"README.md does not link docs/{path.name}"


def test_the_readme_keeps_its_two_commands():
    # The first screen: CI runs the second exactly (.ci/run), users paste the first.
    first_screen = (ROOT / "README.md").read_text().splitlines()[:25]
    assert "    pip install . && gproxy 127.0.0.1:8080 127.0.0.1:5432" in first_screen
    assert "    pip install -r requirements.txt && python -m pytest" in first_screen
    assert "pip install -r requirements.txt && python -m pytest" in (ROOT / ".ci" / "run").read_text()


def _documented_signature():
    """The ``gproxy.Forwarder(...)`` block of docs/embedding.md, as parameters: a list of
    (name, kind, annotation, default)."""
    blocks = [b.text for b in fences(DOCS_DIR / "embedding.md")
              if b.info == "python" and b.text.startswith("gproxy.Forwarder(")]
    assert len(blocks) == 1, blocks
    function = ast.parse("def " + blocks[0][len("gproxy."):].rstrip() + ": pass").body[0]
    args = function.args
    assert not (args.vararg or args.kwarg or args.posonlyargs), "Forwarder takes no *args or **options"
    shown = []
    positional_defaults = [None] * (len(args.args) - len(args.defaults)) + list(args.defaults)
    for arg, default in zip(args.args, positional_defaults):
        shown.append((arg.arg, inspect.Parameter.POSITIONAL_OR_KEYWORD, arg.annotation, default))
    for arg, default in zip(args.kwonlyargs, args.kw_defaults):
        shown.append((arg.arg, inspect.Parameter.KEYWORD_ONLY, arg.annotation, default))
    return [(name, kind, ast.unparse(annotation) if annotation else None,
             inspect.Parameter.empty if default is None else ast.literal_eval(default))
            for name, kind, annotation, default in shown]


def test_the_documented_forwarder_signature_is_the_real_one():
    real = [(p.name, p.kind, p.annotation if p.annotation is not p.empty else None, p.default)
            for p in inspect.signature(gproxy.Forwarder).parameters.values()]
    shown = _documented_signature()
    assert [p[0] for p in shown] == [p[0] for p in real], "parameters missing, extra or out of order"
    for doc, code in zip(shown, real):
        assert doc[:3] == code[:3], (doc, code)
        # 10 is not 10.0 in a signature a reader copies: the default's type is part of it
        assert doc[3] == code[3] and type(doc[3]) is type(code[3]), (doc, code)


def _table_rows(text: str) -> list:
    # cells split at unescaped pipes: `off\|v1\|v2` is one cell
    return [[cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
            for line in text.splitlines() if line.startswith("|") and not line.startswith("|---")]


def test_every_outcome_is_in_the_metrics_docs():
    labels = {outcome.name.lower() for outcome in gproxy.Outcome}
    metrics = section(DOCS_DIR / "operations.md", "Metrics")
    row = next(r for r in _table_rows(metrics) if r[0] == "`gproxy_connections_total`")
    assert set(re.findall(r"`(\w+)`", row[2])) - {"rule", "outcome"} == labels
    outcomes = {r[0].strip("`") for r in _table_rows(metrics) if r[0] != "outcome"
                and not r[0].startswith(("`gproxy_", "`process_")) and r[0] != "metric"}
    assert outcomes == labels


def test_every_metric_family_is_in_the_metrics_docs():
    from gproxy import metrics as page
    families = {name for name, _kind, _help in page._HEADERS.values()} | {"gproxy_build_info"} \
        | {name for name, _kind, _help in page._PROCESS_HEADERS}
    table = _table_rows(section(DOCS_DIR / "operations.md", "Metrics"))
    documented = {name for row in table for name in re.findall(r"`((?:gproxy|process)_\w+)`", row[0])}
    assert documented == families


def test_every_option_is_in_the_configuration_docs():
    table = _table_rows(section(DOCS_DIR / "configuration.md", "Options"))
    documented = {flag for row in table[1:] for flag in re.findall(r"`(-[-\w]+)", row[0])}
    flags = {flag for action in build_parser()._actions if action.help != argparse.SUPPRESS
             for flag in action.option_strings}
    assert documented == flags


def test_every_config_key_is_in_the_configuration_docs():
    tables = _table_rows(section(DOCS_DIR / "configuration.md", "Every key"))
    documented = {row[0].strip("`") for row in tables if row[0] not in ("top-level key", "rule key")}
    assert documented == set(rule_keys()) | set(SETTINGS)


def test_every_toxic_type_has_a_section():
    headings = re.findall(r"^### `(\w+)`$", section(DOCS_DIR / "toxics.md", "The toxics"), re.M)
    assert headings == list(TYPES)



def test_the_man_page_is_generated_from_the_current_parser():
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "manpage.py")], capture_output=True,
                            text=True, timeout=60, cwd=ROOT, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    committed = (DOCS_DIR / "gproxy.1").read_text()
    assert result.stdout == committed, "docs/gproxy.1 is stale: run python tools/manpage.py > docs/gproxy.1"


def test_the_man_page_has_every_option():
    page = (DOCS_DIR / "gproxy.1").read_text()
    for action in build_parser()._actions:
        if action.help != argparse.SUPPRESS:
            for flag in action.option_strings:
                assert flag.replace("-", r"\-") in page, flag


def test_the_changelog_lists_versions_newest_first_including_this_one():
    headings = re.findall(r"^## (.+)$", (ROOT / "CHANGELOG.md").read_text(), re.M)
    versions = []
    for heading in headings:
        # a release commit cannot name itself: the commit is for versions given afterwards
        match = re.fullmatch(r"Unreleased \((\d+\.\d+\.\d+)\)"
                             r"|(\d+\.\d+\.\d+) \(\d{4}-\d\d-\d\d(?:, commit [0-9a-f]{7,40})?\)", heading)
        assert match, f"CHANGELOG.md: {heading!r}: expected 'Unreleased (X.Y.Z)' or 'X.Y.Z (DATE[, commit SHA])'"
        versions.append(tuple(int(n) for n in (match.group(1) or match.group(2)).split(".")))
    assert versions == sorted(versions, reverse=True) and len(set(versions)) == len(versions), versions
    assert tuple(int(n) for n in gproxy.__version__.split(".")) in versions, gproxy.__version__
