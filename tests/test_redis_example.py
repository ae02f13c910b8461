"""The README's worked example, run as written: an app on redis-py against a real redis-server,
through a gproxy forwarder, surviving a latency spike, an outage, and resets.

The README shows this file from ``import redis`` down; a test below keeps the two the same.
"""

from pathlib import Path

from test_real_clients import redis_server  # noqa: F401  (fixture: a real redis-server's port)

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from gproxy.testing import forwarding


class Greeter:
    """The app: reads its greeting from redis; while redis misbehaves it serves the last one."""

    def __init__(self, port):
        self.db = redis.Redis(port=port, socket_timeout=0.25, socket_connect_timeout=0.25,
                              retry=Retry(NoBackoff(), 1))   # one quick retry, on a new connection
        self.last = None

    def greeting(self):
        try:
            self.last = self.db.get("greeting")
            return self.last, "live"
        except redis.RedisError:
            return self.last, "cached"


def test_greeter_survives_latency_an_outage_and_resets(redis_server):
    redis.Redis(port=redis_server).set("greeting", "hello")
    with forwarding(("127.0.0.1", redis_server)) as proxy:
        app = Greeter(port=proxy.address[1])
        assert app.greeting() == (b"hello", "live")

        with proxy.toxic("latency", latency=1000):       # replies a second late: timeouts
            assert app.greeting() == (b"hello", "cached")
        assert app.greeting() == (b"hello", "live")

        with proxy.down():                               # connections cut, new ones refused
            assert app.greeting() == (b"hello", "cached")
        assert app.greeting() == (b"hello", "live")

        for connection in proxy.connections():           # one reset: the retry hides it
            proxy.abort_connection(connection.id)
        assert app.greeting() == (b"hello", "live")

        with proxy.toxic("reset_peer", timeout=0):       # every reply reset
            assert app.greeting() == (b"hello", "cached")
        assert app.greeting() == (b"hello", "live")


def test_readme_shows_this_example():
    here = Path(__file__).read_text()
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    example = here[here.index("import redis"):here.index("\n\ndef test_readme_shows_this_example")]
    assert example + "\n" in readme
