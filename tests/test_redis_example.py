"""The worked example of docs/toxics.md, run as a reader runs it: saved as test_greeter.py and run by
pytest in a fresh process (an app on redis-py against a real redis-server, through a gproxy
forwarder, surviving a latency spike, an outage and resets).

The example is found by its marker (``<!-- example-file: test_greeter.py -->`` right before its
fence), so the docs hold the only copy and nothing here can drift from it.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from doctext import DOCS_DIR, ROOT, marked_block
from peers import TIMEOUT
from test_real_clients import need

EXAMPLE = DOCS_DIR / "toxics.md"


def test_the_example_stands_alone():
    # A reader has no tests/ directory: the example brings its own redis-server.
    text = marked_block(EXAMPLE, "test_greeter.py").text
    assert "test_real_clients" not in text and "from tests" not in text and "peers" not in text
    assert "def redis_socket" in text


@pytest.mark.timeout(TIMEOUT * 6)
def test_the_worked_redis_example_passes_as_written(tmp_path):
    need("redis-server")
    block = marked_block(EXAMPLE, "test_greeter.py")
    assert block.info == "python"
    (tmp_path / "test_greeter.py").write_text(block.text)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_greeter.py"],
                            capture_output=True, text=True, timeout=TIMEOUT * 5, cwd=tmp_path, env=env,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout, result.stdout
