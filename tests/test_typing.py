"""The typed toxic API: the Literal types, helpers and overloads match what the toxics accept at
run time."""

from __future__ import annotations

import inspect
import typing

import pytest

from gproxy import toxics

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
