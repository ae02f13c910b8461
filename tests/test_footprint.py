"""What a rule costs at rest: memory held per rule, measured with tracemalloc, not timed."""

from __future__ import annotations

import gc
import tracemalloc

import pytest

from gproxy.service import Service
from peers import Server, echo
from test_service import roundtrip

#: what one rule may hold at rest: its objects (forwarder, context, counters, listener and
#: watchers: about 7 KiB), far below one read buffer (262144 bytes by default)
_PER_RULE = 32 * 1024


def _traced() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


@pytest.mark.timeout(60)
def test_rules_hold_no_read_buffer_idle_or_after_use():
    """200 idle rules on one hub allocate no read buffer each; after a connection through 50
    of them they share one (the hub runs one of them at a time, so one buffer per thread is
    enough)."""
    with Server(echo) as upstream:
        service = Service(drain_timeout=0)
        tracemalloc.start()
        try:
            base = _traced()
            rules = [service.create(f"r{i}", "127.0.0.1:0", upstream.address) for i in range(200)]
            idle = _traced() - base
            for fw in rules[:50]:
                assert roundtrip(fw.address) == b"ping"
            used = _traced() - base
        finally:
            tracemalloc.stop()
            service.stop()
    assert idle < 200 * _PER_RULE, f"{idle / 200 / 1024:.0f} KiB per idle rule"
    # one shared buffer (256 KiB) for the 50, not one each (12.5 MiB)
    assert used < 200 * _PER_RULE + 2 * 262144, f"{(used - idle) / 50 / 1024:.0f} KiB per used rule"
