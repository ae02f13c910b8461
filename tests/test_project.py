"""The project's own bookkeeping agrees with itself: one list of dependencies, and a version that
the changelog and the tags can be checked against.

Dependencies: pyproject.toml holds them for ``pip install gproxy[test]``; requirements.txt holds
the same, with a comment on why each is there, for the README's test command
(``pip install -r requirements.txt && python -m pytest``). requirements.txt does not install
gproxy itself (``-e .[test]``): the tests run the package from the checkout they are in, and an
installed copy, or an editable one pointing at another checkout, would be what ``python -m
gproxy`` imports in a subprocess started elsewhere.

Versions: ``gproxy.__version__`` is the version being worked towards, the changelog's
"Unreleased (X.Y.Z)" heading, until the release commit renames that heading "X.Y.Z (DATE)". A
release is tagged ``vX.Y.Z`` on that commit (an annotated tag); no other tags are made.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import gproxy

ROOT = Path(__file__).resolve().parent.parent

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


def _requirements(lines) -> dict:
    found = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            found[(req.name.lower(), str(req.marker or ""))] = str(req.specifier)
    return found


def test_requirements_txt_lists_exactly_the_dependencies_and_test_extra_of_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = _requirements(project["dependencies"] + project["optional-dependencies"]["test"])
    listed = _requirements((ROOT / "requirements.txt").read_text().splitlines())
    assert listed == declared, (
        f"only in requirements.txt: {sorted(set(listed.items()) - set(declared.items()))}; "
        f"only in pyproject.toml: {sorted(set(declared.items()) - set(listed.items()))}")


def _changelog_versions():
    """(version, released) per heading of CHANGELOG.md, newest first (test_docs checks the form)."""
    headings = re.findall(r"^## (.+)$", (ROOT / "CHANGELOG.md").read_text(), re.M)
    found = []
    for heading in headings:
        unreleased = re.fullmatch(r"Unreleased \((\d+\.\d+\.\d+)\)", heading)
        released = re.match(r"(\d+\.\d+\.\d+) \(", heading)
        if unreleased or released:
            found.append(((unreleased or released).group(1), released is not None))
    return found


@pytest.mark.xfail(gproxy.__version__ == "0.1.0", strict=True,
                   reason="__version__ says 0.1.0 while the changelog is at 0.4.0; the lead sets it "
                          "when the round ends (this mark then stops applying by itself)")
def test_the_version_is_the_changelogs_newest():
    versions = _changelog_versions()
    unreleased = [version for version, released in versions if not released]
    newest_released = next(version for version, released in versions if released)
    # working towards the Unreleased version, or exactly the newest release (its release commit)
    allowed = {newest_released, *unreleased}
    assert gproxy.__version__ in allowed, (gproxy.__version__, sorted(allowed))


def test_every_version_tag_names_a_released_version():
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    tags = subprocess.run(["git", "tag", "--list"], cwd=ROOT, capture_output=True, text=True,
                          timeout=30).stdout.split()
    released = {f"v{version}" for version, is_released in _changelog_versions() if is_released}
    assert all(tag in released for tag in tags), sorted(set(tags) - released)
