"""Several targets for one rule: the order to try them in for each client, and passive health.

Typical use (relay.connect_upstream does this for every client of a rule with several
targets, or a function as its target)::

    targets = Targets(rule, label="postgres")
    for endpoint in targets.order(client_address):
        if connect(endpoint):
            targets.succeeded(endpoint)     # counted open until targets.released(endpoint)
            break
        targets.failed(endpoint, "connection refused")

Health is passive, like nginx's ``max_fails``/``fail_timeout``: ``max_fails`` connects in
a row that fail mark a target *down*; a down target is tried only after every other one,
until ``fail_timeout`` has passed, when the next client tries it first again. It is
remembered per target, not per client, and logged once per change: one WARNING when a
target goes down, one INFO when it is up again, each with the reason.

With an active check (``Rule.check``; the checks themselves are :mod:`gproxy.health`'s), each
result comes in through :meth:`Targets.checked`: ``fall`` failures in a row take a target
down, ``rise`` passes in a row bring it up, and the first result decides at once (the target
starts up, as HAProxy's do). The two verdicts combine: a target is down while either says
so. A target that passive health took down needs ``rise`` passing checks in a row after
that (or a client's connect that works) to be up again, so a quiet rule's target comes back
without any client, and ``gproxy_target_up`` is always current.

A rule with one fixed target and no check does not use this module at all: its clients
connect the way they always did, with no work per connection here.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from gproxy.config import ConfigError, Endpoint, Rule, parse_targets

__all__ = ["Targets", "TargetError"]

log = logging.getLogger(__name__)


class TargetError(Exception):
    """The rule's target function failed or returned something that is not an address."""


class _Health:
    __slots__ = ("fails", "down_until", "down", "active", "checked_down", "passes", "failures",
                 "checks", "check_reason")

    def __init__(self) -> None:
        self.fails = 0          # connects failed in a row
        self.down = False       # passive health says down
        self.down_until = 0.0   # monotonic time a down target becomes worth trying again
        self.active = 0         # connections open to it now (least-connections)
        self.checked_down = False   # the active check says down
        self.passes = 0         # checks passed in a row
        self.failures = 0       # checks failed in a row
        self.checks = 0         # checks done so far
        self.check_reason = ""  # what the last check found

    @property
    def is_down(self) -> bool:
        return self.down or self.checked_down


#: what an active check keeps per target, carried over a reload only to a rule that checks
_CHECKED = ("checked_down", "passes", "failures", "checks", "check_reason")


class Targets:
    """The targets of one rule, their order per client and their health."""

    def __init__(self, rule: Rule, label: str = "") -> None:
        self.label = label or str(rule.listen)
        self.function: Optional[Callable] = None if rule.targets else rule.target
        self.static: Tuple[Endpoint, ...] = rule.targets
        self.balance = rule.balance
        self.max_fails = rule.max_fails
        self.fail_timeout = rule.fail_timeout
        self.check = rule.check
        self.rise = rule.rise
        self.fall = rule.fall
        self._health: Dict[Endpoint, _Health] = {}
        self._next = 0          # where round-robin starts for the next client
        self._parsed: Dict[object, Tuple[Endpoint, ...]] = {}  # a function's answers, parsed

    def order(self, client_address) -> List[Endpoint]:
        """Every target, in the order this client should try them."""
        candidates = self.static if self.function is None else self._call(client_address)
        count = len(candidates)
        if count > 1:
            if self.balance == "round-robin":
                start = self._next % count
                self._next = start + 1
                candidates = candidates[start:] + candidates[:start]
            elif self.balance == "least-connections":
                start = self._next % count
                self._next = start + 1
                rotated = candidates[start:] + candidates[:start]  # ties are spread too
                candidates = sorted(rotated, key=self._active)
        health = self._health
        if not health:
            return list(candidates)
        now = time.monotonic()
        usable, skipped = [], []
        for endpoint in candidates:
            state = health.get(endpoint)
            if state is not None and (state.checked_down or state.down and now < state.down_until):
                skipped.append(endpoint)
            else:
                usable.append(endpoint)
        if skipped:  # a last resort, soonest to recover first: better than no answer at all
            skipped.sort(key=lambda endpoint: (health[endpoint].checked_down, health[endpoint].down_until))
            usable.extend(skipped)
        return usable

    def succeeded(self, endpoint: Endpoint) -> None:
        """A connect to ``endpoint`` worked; it counts as open until :meth:`released`."""
        state = self._health.get(endpoint)
        if state is None:
            state = self._health[endpoint] = _Health()
        elif state.down:
            state.down = False
            if not state.checked_down:
                self._log_up(endpoint, "a client's connect worked")
        state.fails = 0
        state.active += 1

    def released(self, endpoint: Endpoint) -> None:
        """A connection to ``endpoint`` that :meth:`succeeded` has ended."""
        state = self._health.get(endpoint)
        if state is not None and state.active > 0:
            state.active -= 1

    def failed(self, endpoint: Endpoint, error: str) -> None:
        """A connect to ``endpoint`` failed (refused, unreachable, timed out)."""
        state = self._health.get(endpoint)
        if state is None:
            state = self._health[endpoint] = _Health()
        state.fails += 1
        if not self.max_fails or state.fails < self.max_fails:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s: target %s failed (%s), %d in a row", self.label, endpoint, error, state.fails,
                          extra=self._fields("target_failed", endpoint, fails=state.fails, error=error))
            return
        state.down_until = time.monotonic() + self.fail_timeout
        if not state.down:
            state.down = True
            state.passes = 0  # a check must pass `rise` times from now on to clear it
            if not state.checked_down:
                self._log_down(endpoint, f"{state.fails} failed connect(s) in a row: {error}",
                               f"; skipping it for {self.fail_timeout:g}s", fails=state.fails, error=error,
                               skipped_for=self.fail_timeout)

    def checked(self, endpoint: Endpoint, passed: bool, reason: str) -> None:
        """One active check of ``endpoint`` ended: it ``passed`` or not, and ``reason`` says
        what it found (``gproxy.health`` calls this on the forwarder's hub)."""
        state = self._health.get(endpoint)
        if state is None:
            state = self._health[endpoint] = _Health()
        state.checks += 1
        state.check_reason = reason
        if passed:
            state.failures = 0
            state.passes += 1
            if state.is_down and state.passes >= self.rise:
                state.checked_down = state.down = False
                state.fails = 0
                self._log_up(endpoint, f"its {self.check} check passed {_times(state.passes)}: {reason}",
                             check=self.check, passes=state.passes)
            return
        state.passes = 0
        state.failures += 1
        # a target starts up and its first check decides, as HAProxy's (init-state up)
        if state.checked_down:
            return
        if not (state.checks == 1 or state.failures >= self.fall):
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s: target %s: %s check failed (%d of %d): %s", self.label, endpoint,
                          self.check, state.failures, self.fall, reason)
            return
        state.checked_down = True
        if not state.down:
            self._log_down(endpoint, f"its {self.check} check failed {_times(state.failures)}: {reason}",
                           check=self.check, failures=state.failures)

    def inherit(self, old: "Targets") -> None:
        """Take over ``old``'s health of the targets both have (a rule replaced by a reload):
        down stays down, checks go on counting; open connections stay ``old``'s."""
        kept = ("fails", "down_until", "down") + (_CHECKED if self.check else ())
        for endpoint, state in old._health.items():
            if endpoint in self.static or self.function is not None:
                mine = self._health[endpoint] = _Health()
                for name in kept:
                    setattr(mine, name, getattr(state, name))

    def is_up(self, endpoint: Endpoint) -> bool:
        """False while ``endpoint`` is marked down, by passive health or by its check (for
        statistics and metrics)."""
        state = self._health.get(endpoint)
        return state is None or not state.is_down

    def _log_down(self, endpoint: Endpoint, reason: str, more: str = "", **fields) -> None:
        """The one line a target's going down makes: WARNING, with the reason."""
        log.warning("%s: target %s is down after %s%s", self.label, endpoint, reason, more,
                    extra=self._fields("target_down", endpoint, reason=reason, **fields))

    def _log_up(self, endpoint: Endpoint, reason: str, **fields) -> None:
        """The one line a target's coming back makes: INFO, with the reason."""
        log.info("%s: target %s is up again: %s", self.label, endpoint, reason,
                 extra=self._fields("target_up", endpoint, reason=reason, **fields))

    def known(self) -> List[Endpoint]:
        """The fixed targets, then any a target function returned so far."""
        seen = list(self.static)
        seen.extend(endpoint for endpoint in self._health if endpoint not in self.static)
        return seen

    def _fields(self, event: str, endpoint: Endpoint, **more) -> dict:
        """A health change's fields for a JSON log line (gproxy.jsonlog)."""
        return {"fields": {"event": event, "rule": self.label, "target": str(endpoint), **more}}

    def _active(self, endpoint: Endpoint) -> int:
        state = self._health.get(endpoint)
        return state.active if state is not None else 0

    def _call(self, client_address) -> Sequence[Endpoint]:
        try:
            answer = self.function(client_address)
        except Exception as exc:
            raise TargetError(f"the target function raised {type(exc).__name__}: {exc}") from None
        try:
            key = tuple(answer) if isinstance(answer, list) else answer
            parsed = self._parsed.get(key)
        except TypeError:  # unhashable: parse it every time
            key, parsed = None, None
        if parsed is None:
            try:
                parsed = parse_targets(answer, "target")
            except ConfigError as exc:
                raise TargetError(f"the target function returned {answer!r}: "
                                  f"{str(exc).split(': ', 1)[-1]}") from None
            if key is not None and len(self._parsed) < 1024:
                self._parsed[key] = parsed
        return parsed


def _times(count: int) -> str:
    return "once" if count == 1 else f"{count} times in a row"
