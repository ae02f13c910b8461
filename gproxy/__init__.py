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

__all__ = ["Forwarder", "ConfigError", "ConnectionRecord", "Outcome", "Statistics", "Target", "load_config",
           "__version__"]
__version__ = "0.1.0"



def load_config(path: str):
    """Read and validate a TOML config file (``ConfigError`` naming file, rule and key):
    a :class:`gproxy.fileservice.FileService` to ``start()``, ``reload()`` and ``stop()``."""
    from gproxy.fileservice import FileService  # the TOML reader loads only when wanted
    return FileService(path)


logging.getLogger(__name__).addHandler(logging.NullHandler())
