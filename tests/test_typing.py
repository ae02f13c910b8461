"""The typed toxic API: ``mypy --strict`` passes a typed test file (tests/typed_example.py) and
catches what is wrong in one; the Literal types, helpers and overloads match what the toxics
accept at run time."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap
import typing
from pathlib import Path

import pytest

from gproxy import toxics
from peers import TIMEOUT

ROOT = Path(__file__).resolve().parent.parent

#: each line a type checker must reject, with a fragment of what it says
WRONG = '''
    from __future__ import annotations
    import gproxy
    from gproxy import ConnectionRecord, Forwarder, toxics
    from gproxy.client import Client
    from gproxy.testing import ForwarderFactory

    def wrong(fw: Forwarder, factory: ForwarderFactory) -> None:
        toxics.latency(latnecy=100)                        # E: Unexpected keyword argument "latnecy"
        toxics.bandwidth("64")                             # E: incompatible type "str"
        toxics.trigger(action="explode")                   # E: incompatible type "Literal['explode']"
        fw.add_toxic("latencyy", latency=100)              # E: No overload variant of "add_toxic"
        fw.add_toxic("latency", stream="sideways")         # E: No overload variant of "add_toxic"
        fw.add_toxic(toxics.latency(100), latency=5)       # E: No overload variant of "add_toxic"
        fw.add_toxic("latency", latency=[100])             # E: No overload variant of "add_toxic"
        with fw.toxic("bogus"):                            # E: No overload variant of "toxic"
            pass
        port: str = fw.port                                # E: Incompatible types in assignment
        fw.connections(since="the start")                  # E: incompatible type "str"
        client: str = fw.connections()[0].client_address   # E: Incompatible types in assignment
        fw.start(thread="yes")                             # E: incompatible type "str"
        factory(("127.0.0.1", 1)).bogus()                  # E: "Forwarder" has no attribute "bogus"
        gproxy.load_config("x").bogus()                    # E: "FileService" has no attribute "bogus"
        api = Client()
        api.add_toxic("p", "latencyy")                     # E: No overload variant of "add_toxic"
        api.add_toxic("p", toxics.latency(1), attributes={"latency": 2})  # E: No overload variant of "add_toxic"
        api.add_toxic("p", "latency", stream="sideways")   # E: No overload variant of "add_toxic"
        api.connections("p", since="now")                  # E: incompatible type "str"
        proxy_port: str = api.proxy("p").port              # E: Incompatible types in assignment
        api.proxy("p").bogus                               # E: "Proxy" has no attribute "bogus"
'''


def mypy(*files: str) -> subprocess.CompletedProcess:
    # --follow-imports=silent: gproxy's modules are read for their types, but only the files
    # given are held to --strict (gproxy itself is not written for it, nor is gevent typed).
    # --config-file "": whatever mypy.ini sits around the checkout is not this test's.
    env = dict(os.environ, MYPYPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent",
                           "--config-file", "", "--no-incremental", "--hide-error-context",
                           "--no-error-summary", "--show-error-codes", *files],
                          capture_output=True, text=True, timeout=TIMEOUT * 6, cwd=ROOT, env=env)


@pytest.mark.timeout(180)
def test_mypy_strict_passes_the_typed_example_and_catches_each_mistake(tmp_path):
    wrong = tmp_path / "typed_wrong.py"
    wrong.write_text(textwrap.dedent(WRONG))
    result = mypy("tests/typed_example.py", str(wrong))
    assert result.returncode in (0, 1), result.stdout + result.stderr  # 2: mypy itself failed
    errors = [line for line in result.stdout.splitlines() if ": error: " in line]
    assert not [line for line in errors if "typed_example.py" in line], result.stdout
    found = {}
    for line in errors:
        number = int(line.split(":")[1])
        found.setdefault(number, []).append(line)
    for number, text in enumerate(wrong.read_text().splitlines(), 1):
        if "# E: " in text:
            expected = text.split("# E: ")[1].strip()
            assert any(expected in line for line in found.pop(number, [])), (number, text, result.stdout)
    assert not found, found  # no error where none was meant


def test_the_typed_example_runs(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             "--rootdir", str(tmp_path), str(ROOT / "tests" / "typed_example.py")],
                            capture_output=True, text=True, timeout=TIMEOUT * 3, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "5 passed" in result.stdout, result.stdout


def test_the_literal_types_name_every_type_and_stream():
    assert set(typing.get_args(toxics.ToxicType)) == set(toxics.TYPES)
    assert typing.get_args(toxics.StreamName) == toxics.STREAMS


def test_a_helper_per_type_whose_parameters_are_its_attributes_with_their_defaults():
    for name, defaults in toxics.TYPES.items():
        helper = getattr(toxics, name)
        params = inspect.signature(helper).parameters
        attributes = {p.name: p.default for p in params.values() if p.kind is p.POSITIONAL_OR_KEYWORD}
        assert attributes == defaults, name
        assert [p.name for p in params.values() if p.kind is p.KEYWORD_ONLY] == ["name", "stream", "toxicity"]
        if name != "slicer":  # whose defaults are no valid slicer (average_size 0)
            spec = helper()
            assert (spec.type, dict(spec.attributes)) == (name, defaults)


def test_a_helper_validates_where_it_is_called():
    with pytest.raises(toxics.ConfigError, match="latency: must be a whole number"):
        toxics.latency(-5)
    with pytest.raises(toxics.ConfigError, match="average_size"):
        toxics.slicer(0)
    with pytest.raises(toxics.ConfigError, match="stream"):
        toxics.latency(1, stream="sideways")  # type: ignore[arg-type]


def test_a_spec_and_the_keywords_beside_it():
    spec = toxics.latency(100, jitter=10, stream="upstream")
    assert repr(spec) == "ToxicSpec('latency', {'latency': 100, 'jitter': 10}, stream='upstream')"
    toxic = toxics.make_toxic(spec, name="lag", toxicity=0.5)
    assert (toxic.name, toxic.type, toxic.stream, toxic.toxicity, toxic.attributes) == \
        ("lag", "latency", "upstream", 0.5, {"latency": 100, "jitter": 10})
    assert toxics.make_toxic(spec, stream="UPSTREAM").stream == "upstream"   # the same, said twice
    with pytest.raises(toxics.ConfigError, match="stream: given twice"):
        toxics.make_toxic(spec, stream="downstream")
    with pytest.raises(toxics.ConfigError, match="give the attributes to latency()"):
        toxics.make_toxic(spec, attributes={"latency": 5})
    assert hash(spec) == hash(toxics.latency(100, jitter=10, stream="upstream"))


def test_a_spec_acts_like_the_type_name(forwarder_factory):
    from peers import Server, connect, echo, recv_exactly
    with Server(echo) as upstream:
        fw = forwarder_factory(upstream.address)
        added = fw.add_toxic(toxics.limit_data(3), name="cap")
        assert added == fw.toxics()[0]
        assert (added.name, added.stream, added.attributes) == ("cap", "downstream", {"bytes": 3})
        with fw.toxic(toxics.latency(1, name="brief"), stream="upstream") as brief:
            assert [t.name for t in fw.toxics()] == ["brief", "cap"]
        assert brief.stream == "upstream" and [t.name for t in fw.toxics()] == ["cap"]
        client = connect(fw.address)
        client.sendall(b"abcdef")
        assert recv_exactly(client, 3) == b"abc" and client.recv(1) == b""   # 3 bytes, then closed
        client.close()
        forwarder_factory.wait_closed(fw, accepted=1)
