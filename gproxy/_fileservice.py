"""A service run from a config file: load it, start every rule, reload it on demand, stop.

Typical use, in a program (``gproxy.load_config`` is this class)::

    service = gproxy.load_config("gproxy.toml")   # ConfigError naming file, rule and key
    service.start()                               # OSError if an address cannot be bound
    service["postgres"].address                   # each rule's Forwarder, by name
    service.reload()                              # False (and the old rules stay) on a bad file
    service.stop()

The command line runs one on its main hub (``gproxy -c FILE``, SIGHUP reloads). In a
program that gevent has not patched, ``start()`` runs the rules on a hub in a thread of
their own, as ``Forwarder.start()`` does (:mod:`gproxy._hubthread` hosts both), and a
program that exits without ``stop()`` has them stopped at exit; in a patched program they
run on the calling thread's hub. Either way the methods may be called from any thread.

A reload leaves open connections alone: those of a changed or removed rule run on, on the
old forwarder, until they end by themselves, or for the file's ``reload_drain_timeout``
(none: no limit); ``stop()`` ends them with the rest, under ``drain_timeout``.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Optional

from gevent.event import Event

from gproxy._configfile import RELOADED_SETTINGS, ConfigFile, load
from gproxy._hubthread import HubEnded, HubHost
from gproxy.config import ConfigError
from gproxy.forwarder import Forwarder
from gproxy.service import Service
from gproxy.stats import Statistics

__all__ = ["FileService"]

# The logger keeps the module's old name: logger names are public (docs/operations.md#loggers).
log = logging.getLogger("gproxy.fileservice")


class FileService:
    """The rules of one config file, run as a :class:`gproxy.service.Service`."""

    def __init__(self, path: str, config: Optional[ConfigFile] = None):
        self.path = str(path)
        #: the configuration in force: the file as last loaded successfully
        self.config = config if config is not None else load(self.path)
        self.service = Service()
        self._host: Optional[HubHost] = None   # where the rules run, once started
        self._done: Optional[Event] = None     # set on that hub once stopped

    # -- reading ----------------------------------------------------------------------

    def __getitem__(self, name: str) -> Forwarder:
        return self.service[name]

    def __iter__(self):
        return iter(self.service)

    def __len__(self) -> int:
        return len(self.service)

    def statistics(self) -> Statistics:
        """Every rule's statistics, added up."""
        return self.service.statistics()

    # -- life ---------------------------------------------------------------------------

    def start(self, *, here: bool = False) -> "FileService":
        """Bind every rule's address and serve; raise ``OSError`` (nothing left bound) if one
        fails. ``here``: on this thread's hub even when unpatched (a program that runs the hub
        itself, like the command line)."""
        if self._host is not None:
            raise RuntimeError("a FileService starts once")
        self._begin(here)
        return self

    def serve_forever(self) -> None:
        """Start if not started, then wait until ``stop()``."""
        host = self._host if self._host is not None else self._begin(here=True)
        if not host.join():
            assert self._done is not None  # made on the hub before start returned
            self._done.wait()

    def reload(self, config: Optional[ConfigFile] = None) -> bool:
        """Read the file again and apply it (``Service.reload``): True if it was applied. A file
        that does not load, or an address that cannot be bound, is logged as an ERROR and
        changes nothing: the configuration in force stays. ``config``: the file as another
        process read and validated it (a ``--workers`` parent), applied instead of reading."""
        if self._stopped():
            log.error("reload of %s refused: the service is stopped", self.path,
                      extra=self._fields("reload_failed", error="the service is stopped"))
            return False
        if config is None:
            try:
                config = load(self.path)
            except ConfigError as exc:
                log.error("reload failed, the running configuration stays: %s", exc,
                          extra=self._fields("reload_failed", error=str(exc)))
                return False
        try:
            changes = self._call(self._reload_here, config)
        except HubEnded:
            log.error("reload of %s refused: the service is stopped", self.path)
            return False
        except (OSError, ConfigError) as exc:
            error = getattr(exc, "strerror", None) or str(exc)
            log.error("reload of %s failed, the running configuration stays: %s", self.path, error,
                      extra=self._fields("reload_failed", error=error))
            return False
        if _restart_only(config.settings) != _restart_only(self.config.settings):
            settings = sorted(set(_restart_only(config.settings)) | set(_restart_only(self.config.settings)))
            log.warning("reload of %s: process-wide settings (%s) take effect on restart only",
                        self.path, ", ".join(settings), extra=self._fields("reload_settings", settings=settings))
        self.config = config
        names: Dict[str, list] = {what: [] for what in ("added", "changed", "removed", "unchanged")}
        for name, what in changes.items():
            names[what].append(name)
        # JSON: the names of the rules added, changed and removed; only how many were unchanged
        log.info("reloaded %s: %s", self.path, ", ".join(f"{len(names[what])} {what}" for what in names),
                 extra=self._fields("reload", added=names["added"], changed=names["changed"],
                                    removed=names["removed"], unchanged=len(names["unchanged"])))
        return True

    def _fields(self, event: str, **more) -> dict:
        """A reload line's fields for a JSON log (gproxy._jsonlog)."""
        return {"fields": {"event": event, "file": self.path, **more}}

    def stop(self, timeout: Optional[float] = None) -> None:
        """Stop accepting everywhere, drain (for ``timeout``, default each rule's
        ``drain_timeout``), abort what is left. A second call while draining aborts; one
        after the service has stopped does nothing."""
        if self._host is None or self._stopped():
            return
        self._host.stop(self._stop_here, timeout)

    def __enter__(self) -> "FileService":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # -- on the hub -------------------------------------------------------------------------

    def _begin(self, here: bool) -> HubHost:
        host = self._host = HubHost()
        try:
            host.start(self._start_here, here=here, name=lambda: f"gproxy {self.path}",
                       at_exit=lambda: self.stop(timeout=0))
        except BaseException:
            self._host = self._done = None  # nothing runs: it may be started again
            raise
        return host

    def _start_here(self) -> None:
        self._done = Event()
        try:
            with self.service.locked():
                self.service.reload(self.config.options)
                self._set_toxics(self.config, None)
        except BaseException:
            self._done.set()
            raise

    def _reload_here(self, config: ConfigFile) -> Dict[str, str]:
        # only the file's own rules: proxies the HTTP API made (gproxy -c FILE --api) stay;
        # the old forwarders of changed and removed rules drain under the new file's limit.
        # One step, so no API call sees the rules without their file's toxics.
        with self.service.locked():
            changes = self.service.reload(config.options, config.settings.get("reload_drain_timeout"),
                                          owned=self.config.rules)
            self._set_toxics(config, self.config)
        return changes

    def _set_toxics(self, config: ConfigFile, previous: Optional[ConfigFile]) -> None:
        """Each rule's toxics as ``config`` says (``Forwarder.set_toxics``): the toxics the
        previous file named and this one does not go, the API's stay. One INFO line per rule
        whose toxics changed (a reload's changes of toxics alone leave the rule "unchanged")."""
        for name, toxics in config.toxics.items():
            owned = [toxic.name for toxic in previous.toxics.get(name, ())] if previous is not None else []
            done = self.service[name].set_toxics(toxics, owned)
            if done and previous is not None:
                log.info("rule %s: toxics %s", name, ", ".join(f"{toxic} {what}" for toxic, what in done.items()),
                         extra=self._fields("reload_toxics", rule=name, toxics=done))

    def _stop_here(self, timeout: Optional[float]) -> None:
        assert self._host is not None and self._done is not None  # stop() calls it once started
        try:
            self.service.stop(timeout)
        finally:
            self._done.set()
            self._host.end()

    def _stopped(self) -> bool:
        """Whether stop() has finished: the service's hub (in thread mode) is gone."""
        return self._done is not None and self._done.is_set()

    def _call(self, func: Callable, *args: Any):
        """``func(*args)`` on the service's hub, from whichever thread calls. A stopped
        service has no hub to run it: ``HubEnded`` (a RuntimeError)."""
        if self._host is None:
            return func(*args)
        if self._stopped():
            raise HubEnded(began=False)
        return self._host.call(func, *args)


def _restart_only(settings: Dict[str, Any]) -> Dict[str, Any]:
    """The settings a reload cannot apply: a change to them waits for a restart."""
    return {key: value for key, value in settings.items() if key not in RELOADED_SETTINGS}


# Its public name is gproxy.FileService (what gproxy.load_config returns): say so in reprs and help().
FileService.__module__ = "gproxy"
