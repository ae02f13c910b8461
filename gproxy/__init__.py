"""gproxy: a TCP port forwarder on gevent that never loses a byte.

Typical use::

    import gproxy
    with gproxy.Forwarder("127.0.0.1:0", "db.internal:5432") as fw:
        print(fw.address)

    service = gproxy.load_config("/etc/gproxy.toml")   # every rule of a config file
    service.start(); service.reload(); service.stop()

``Forwarder`` and the submodules load on first use: the pytest plugin (``gproxy.testing``,
which pytest loads in every run once gproxy is installed) costs a run that never uses it
neither gevent's import time nor anything gevent does when imported.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any, List

from gproxy.config import ConfigError, Target
from gproxy.stats import ConnectionRecord, Outcome, Statistics
from gproxy.targets import CheckResult, TargetNotFound, TargetState, TargetStatus

if TYPE_CHECKING:
    from gproxy._fileservice import FileService
    from gproxy.forwarder import Forwarder

# The public surface: these names, the public modules (gproxy.cli, .forwarder, .metrics,
# .testing, .toxics, .client) and the logger names; docs/embedding.md#what-is-public lists them all.
__all__ = ["Forwarder", "ConfigError", "ConnectionRecord", "Outcome", "Statistics", "Target",
           "TargetState", "TargetStatus", "CheckResult", "TargetNotFound", "FileService", "load_config",
           "__version__"]
__version__ = "0.4.0"



def __getattr__(name: str) -> Any:
    if name == "Forwarder":
        from gproxy.forwarder import Forwarder
        globals()["Forwarder"] = Forwarder
        return Forwarder
    if name == "FileService":   # as in load_config: the TOML reader loads only when wanted
        from gproxy._fileservice import FileService
        return FileService
    if name in _PUBLIC_MODULES:  # gproxy.toxics after `import gproxy` alone, as before it was lazy
        return importlib.import_module(f"{__name__}.{name}")  # the import binds it here too
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: the submodules a user may import; the rest are gproxy's machinery, reached by their full
#: names only (an attribute of the package would read as an invitation)
_PUBLIC_MODULES = ("cli", "client", "forwarder", "metrics", "testing", "toxics")


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(__all__) | set(_PUBLIC_MODULES))


def load_config(path: str) -> FileService:
    """Read and validate a TOML config file (``ConfigError`` naming file, rule and key):
    a :class:`gproxy.FileService` to ``start()``, ``reload()`` and ``stop()``."""
    from gproxy._fileservice import FileService  # the TOML reader loads only when wanted
    return FileService(path)


logging.getLogger(__name__).addHandler(logging.NullHandler())
