"""gproxy: a TCP port forwarder on gevent that never loses a byte.

Typical use::

    import gproxy
    with gproxy.Forwarder("127.0.0.1:0", "db.internal:5432") as fw:
        print(fw.address)

    service = gproxy.load_config("/etc/gproxy.toml")   # every rule of a config file
    service.start(); service.reload(); service.stop()
"""

import logging

from gproxy.config import ConfigError, Target
from gproxy.forwarder import Forwarder
from gproxy.stats import ConnectionRecord, Outcome, Statistics

# The public surface: these names, the public modules (gproxy.cli, .forwarder, .metrics,
# .testing, .toxics) and the logger names; docs/embedding.md#what-is-public lists them all.
__all__ = ["Forwarder", "ConfigError", "ConnectionRecord", "Outcome", "Statistics", "Target",
           "FileService", "load_config", "__version__"]
__version__ = "0.1.0"


def load_config(path: str):
    """Read and validate a TOML config file (``ConfigError`` naming file, rule and key):
    a :class:`gproxy.FileService` to ``start()``, ``reload()`` and ``stop()``."""
    from gproxy.fileservice import FileService  # the TOML reader loads only when wanted
    return FileService(path)


def __getattr__(name: str):
    if name == "FileService":   # as in load_config: the TOML reader loads only when wanted
        from gproxy.fileservice import FileService
        return FileService
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


logging.getLogger(__name__).addHandler(logging.NullHandler())
