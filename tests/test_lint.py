"""The code's habits, checked with the suite: ruff over the code, tests, benchmarks and tools
(pycodestyle, pyflakes, import order, bugbear's likely bugs) and mypy over ``gproxy/`` (the
package ships ``py.typed``, a promise that its annotations are checked). Both are configured in
pyproject.toml and pinned in requirements.txt, so a new release of either cannot turn the suite
red by itself. To see and fix what they find::

    python -m ruff check --fix gproxy tests benchmarks tools
    python -m mypy gproxy
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def check(tool: str, *args: str) -> None:
    """Run ``python -m tool args`` in the repository; fail with its output unless it exits 0."""
    if importlib.util.find_spec(tool) is None:
        pytest.fail(f"{tool} is not installed: pip install -r requirements.txt", pytrace=False)
    result = subprocess.run([sys.executable, "-m", tool, *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=100)
    if result.returncode != 0:
        pytest.fail(f"python -m {tool} {' '.join(args)}: exit {result.returncode}\n"
                    f"{result.stdout}{result.stderr}", pytrace=False)


@pytest.mark.timeout(120)
def test_ruff_finds_nothing():
    check("ruff", "check", "gproxy", "tests", "benchmarks", "tools")


@pytest.mark.timeout(120)
@pytest.mark.skipif(sys.version_info < (3, 10), reason="mypy 2 runs on Python 3.10 or later")
def test_mypy_finds_nothing():
    check("mypy", "gproxy")
