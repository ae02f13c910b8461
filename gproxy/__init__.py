"""gproxy: a TCP port forwarder on gevent that never loses a byte.

Typical use::

    import gproxy
    with gproxy.Forwarder("127.0.0.1:0", "db.internal:5432") as fw:
        print(fw.address)
"""

import logging

from gproxy.config import ConfigError
from gproxy.forwarder import Forwarder
from gproxy.stats import ConnectionRecord, Outcome, Statistics

__all__ = ["Forwarder", "ConfigError", "ConnectionRecord", "Outcome", "Statistics", "__version__"]
__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
