"""Several targets for one rule: the order to try them in for each client, and passive health.

Typical use (_dial.connect_upstream does this for every client of a rule with several
targets, or a function as its target)::

    targets = Targets(rule, label="postgres")
    for endpoint in targets.order(client_address):
        if connect(endpoint):
            targets.succeeded(endpoint)     # counted open until targets.released(endpoint)
            break
        targets.failed(endpoint, "connection refused")

The order, per client: the targets that are up, as ``balance`` says (``failover``: in the
order given; ``round-robin``: smooth weighted round-robin, nginx's, so a target of weight 3
gets three clients of every four, interleaved, and a down target's share is spread evenly
over the others; ``least-connections``: fewest open connections per weight, ties broken by
the same rotation); then the *backup* targets that are up, which lead only when no other
target is up; then the down ones, a last resort, soonest to recover first. A change in which
targets are up restarts the rotation, so the shares are exact from there on.

Health is passive, like nginx's ``max_fails``/``fail_timeout``: ``max_fails`` connects in
a row that fail mark a target *down*; a down target is tried only after every other one,
until ``fail_timeout`` has passed, when the next client tries it first again. It is
remembered per target, not per client, and logged once per change: one WARNING when a
target goes down, one INFO when it is up again, each with the reason.

With an active check (``Rule.check``; the checks themselves are :mod:`gproxy._health`'s), each
result comes in through :meth:`Targets.checked`: ``fall`` failures in a row take a target
down, ``rise`` passes in a row bring it up, and the first result decides at once (the target
starts up, as HAProxy's do). The two verdicts combine: a target is down while either says
so. A target that passive health took down needs ``rise`` passing checks in a row after
that (or a client's connect that works) to be up again, so a quiet rule's target comes back
without any client, and ``gproxy_target_up`` is always current.

Runtime control (``Forwarder.set_target``, the HTTP API's target routes) sets a target's
:class:`TargetState` and weight here. ``DRAIN`` and ``DISABLED`` targets get no new client,
not even as a last resort, while the connections they have go on; backups take over when
every other target is drained, disabled or down. A ``DISABLED`` target is not checked either
(HAProxy's maintenance mode: a backend being worked on sees no traffic from gproxy), and its
first check once enabled again decides at once, as at start. A weight set at run time
applies to the next client. :meth:`Targets.statuses` is what ``Forwarder.targets()`` shows.

Per-target limits (``Target.max_connections``; HAProxy's ``maxconn`` on a server): a target
at its limit is left out of a client's order, so the balance picks among those with room;
when every target the client would start with is full (the targets that are up, or the
backups when none is, or the down ones when nothing is up) ``order`` answers None and the
client waits in the rule's queue (:class:`Queue`; the wait is ``_dial``'s) rather than
going to a backup or a down target. A slot is taken when a client is about to connect
(``claim``; on a rule with no limit, once its connect worked: ``succeeded``, so a limit
set at run time finds the count right) and given back when that connect fails
(``unclaim``) or the connection ends (``released``); each time one frees, ``dispatch``
hands it to the oldest waiter that can use a target with room. Slot counts and the queue
are shared with the rule's next forwarder (``inherit``), so the limit holds across a
reload. (A slot that frees because a down target's ``fail_timeout`` ran out wakes nobody:
the next slot that frees, or the next client, finds it.)

A rule with one fixed target and no check does not route its clients through this module:
they connect the way they always did, with no work per connection here, until its target is
drained or disabled (``relay.Context.route_by_targets``).
"""

from __future__ import annotations

import enum
import ipaddress
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from gproxy.config import (
    MAX_TARGET_CONNECTIONS,
    MAX_WEIGHT,
    Address,
    ConfigError,
    Endpoint,
    Rule,
    Target,
    parse_address,
    parse_target_list,
    show,
    valid_target_limit,
)
from gproxy.stats import Counters, TargetView

__all__ = ["Targets", "Queue", "Waiter", "TargetError", "TargetState", "TargetStatus", "CheckResult",
           "TargetNotFound"]

log = logging.getLogger(__name__)


class TargetError(Exception):
    """The rule's target function failed or returned something that is not an address."""


class TargetNotFound(KeyError):
    """No target of the rule has this address (the HTTP API: 404 "target not found")."""

    def __init__(self, address: object):
        super().__init__(address)
        self.address = address

    def __str__(self) -> str:
        return f"no target {self.address}"


class TargetState(enum.Enum):
    """What a target takes, as set at run time (``Forwarder.set_target``); ``str()`` gives
    the value. HAProxy's server states are the model: ``ready``, ``drain``, ``maint``."""

    #: new clients as ``balance`` gives them (the state every target starts in)
    ENABLED = "enabled"
    #: no new client; its open connections go on until they end; still checked
    DRAIN = "drain"
    #: no new client, and not checked; its open connections go on until they end
    DISABLED = "disabled"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class CheckResult:
    """The last active health check of a target."""

    passed: bool     #: whether it passed
    reason: str      #: what it found: ``"connected"``, ``"HTTP status 503, expected 200-399"``...
    at: float        #: ``time.time()`` when it ended
    duration: float  #: seconds it took
    passes: int      #: checks passed in a row (0 after a failure)
    failures: int    #: checks failed in a row (0 after a pass)
    checks: int      #: checks made since the rule started (or since it was enabled after being disabled)


@dataclass(frozen=True)
class TargetStatus:
    """One target of a rule as ``Forwarder.targets()`` shows it (a snapshot)."""

    address: str          #: as configured: ``10.0.0.5:6379``, ``[::1]:6379``, ``unix:/run/redis.sock``
    state: TargetState    #: ``ENABLED``, ``DRAIN`` or ``DISABLED``
    weight: int           #: its weight now (the configured one unless set at run time)
    backup: bool          #: a backup: clients only while no other target is up
    up: bool              #: not marked down (what ``gproxy_target_up`` says)
    reason: Optional[str]  #: why it is down, or why it came back up last; None: no change seen
    active: int           #: connections open to it now (a reload's old connections included)
    check: Optional[CheckResult]  #: its last active check; None: no check, or none ended yet
    max_connections: int = 0  #: its limit now (as configured unless set at run time); 0: none
    queued: int = 0       #: clients waiting in the rule's queue now (the same for every target)

    def as_dict(self) -> Dict[str, Any]:
        """The JSON the HTTP API answers with."""
        check = self.check
        return {"address": self.address, "state": str(self.state), "weight": self.weight, "backup": self.backup,
                "up": self.up, "reason": self.reason, "active": self.active,
                "max_connections": self.max_connections, "queued": self.queued,
                "check": None if check is None else {
                    "result": "passed" if check.passed else "failed", "reason": check.reason,
                    "time": round(check.at, 3), "duration": round(check.duration, 6),
                    "passes": check.passes, "failures": check.failures, "checks": check.checks}}


_ENABLED, _DISABLED = TargetState.ENABLED, TargetState.DISABLED


def parse_state(value: Union[TargetState, str]) -> TargetState:
    """A TargetState from itself or its value; ConfigError naming ``state`` otherwise."""
    if isinstance(value, TargetState):
        return value
    if isinstance(value, str):
        for state in TargetState:
            if state.value == value:
                return state
    raise ConfigError("state", f"expected enabled, drain or disabled, got {show(value)}")


def parse_limit(value: int) -> int:
    """A max_connections set at run time (0: no limit); ConfigError naming ``max_connections``."""
    if not valid_target_limit(value):
        raise ConfigError("max_connections", f"expected a whole number from 0 (no limit) to "
                                             f"{MAX_TARGET_CONNECTIONS}, got {show(value)}")
    return value


class _Room:
    """One target's connection slots: shared by every forwarder of the rule (``inherit``)."""

    __slots__ = ("limit", "busy")

    def __init__(self) -> None:
        self.limit = 0  # its max_connections now; 0: no limit
        self.busy = 0   # connections being made to it or open (claim() to unclaim() or released())


def parse_weight(value: int) -> int:
    """A weight set at run time: the config file's range; ConfigError naming ``weight``."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WEIGHT:
        raise ConfigError("weight", f"expected a whole number from 1 to {MAX_WEIGHT}, got {show(value)}")
    return value


class _Health:
    __slots__ = ("fails", "down_until", "down", "active", "checked_down", "passes", "failures",
                 "checks", "check_reason", "current", "name", "admin", "weight", "given_weight", "backup",
                 "reason", "check_passed", "check_at", "check_duration", "room", "given_limit", "limit")

    def __init__(self, name: str) -> None:
        self.name = name        # the target as configured, as logs and metrics name it
        self.admin = _ENABLED   # its state set at run time
        self.weight: Optional[int] = None  # its weight set at run time; None: as configured
        self.given_weight = 1   # its configured weight
        self.backup = False     # configured a backup
        self.reason: Optional[str] = None  # why it went down, or came back, last
        self.check_passed = False   # the last check's result, its end (time.time()) and length
        self.check_at = 0.0
        self.check_duration: Optional[float] = None
        self.fails = 0          # connects failed in a row
        self.down = False       # passive health says down
        self.down_until = 0.0   # monotonic time a down target becomes worth trying again
        self.active = 0         # connections open to it now (least-connections)
        self.checked_down = False   # the active check says down
        self.passes = 0         # checks passed in a row
        self.failures = 0       # checks failed in a row
        self.checks = 0         # checks done so far
        self.check_reason = ""  # what the last check found
        self.current = 0        # smooth weighted round-robin's running score
        self.room = _Room()     # its slots (max_connections), shared with the rule's next forwarder
        self.given_limit = 0    # its configured max_connections
        self.limit: Optional[int] = None  # its max_connections set at run time; None: as configured

    @property
    def is_down(self) -> bool:
        return self.down or self.checked_down


#: one target as order() reads it: (address, weight, backup, its health)
_Slot = Tuple[Endpoint, int, bool, _Health]

#: what an active check keeps per target, carried over a reload only to a rule that checks
_CHECKED = ("checked_down", "passes", "failures", "checks", "check_reason", "check_passed", "check_at",
            "check_duration")


class Waiter:
    """One client in the queue."""

    __slots__ = ("conn", "targets", "given", "waiting", "greenlet", "since")

    def __init__(self, conn, targets) -> None:
        self.conn = conn
        self.targets = targets  # the gproxy.targets.Targets whose order it takes (its forwarder's)
        #: once its turn came: (the target whose slot was taken for it, or None, its order)
        self.given: Optional[Tuple[Any, List[Any]]] = None
        self.waiting = False    # in the hub.switch() of _dial._wait_turn now
        self.greenlet: Any = None
        self.since = time.monotonic()


class Queue:
    """The clients of a rule waiting for a target with room, oldest first.

    HAProxy's backend queue is the model: a client waits only when every target it could
    use is full; a slot that frees goes to the oldest waiter that can use it, handed over
    with the slot already taken for it (``Targets.claim``), so a client arriving just then
    cannot take it first, and newcomers queue behind waiters. Per rule, not per target: a
    waiter takes the first slot any of its targets frees, the balance choosing among those
    with room. One queue serves every forwarder of a rule (``Targets.inherit``)."""

    __slots__ = ("waiters",)

    def __init__(self) -> None:
        #: waiter -> None, in the order they came (a dict: O(1) to leave from the middle)
        self.waiters: Dict[Waiter, None] = {}

    def __len__(self) -> int:
        return len(self.waiters)

    def join(self, conn, targets) -> Waiter:
        waiter = Waiter(conn, targets)
        self.waiters[waiter] = None
        return waiter

    def oldest_first(self) -> List[Waiter]:
        return list(self.waiters)

    def hand(self, waiter: Waiter, endpoint, order: List[Any]) -> None:
        """``waiter``'s turn: ``endpoint``'s slot was taken for it (None: no target takes
        clients now; it finds out why itself); wake it on the next pass of the loop."""
        self.waiters.pop(waiter, None)
        waiter.given = (endpoint, order)
        waiter.conn._hub.loop.run_callback(_wake, waiter)


def _wake(waiter: Waiter) -> None:
    """Hub callback: switch to the waiter if it still waits (it may have timed out or been
    aborted since its turn was handed; wait() then gives the slot back)."""
    if waiter.waiting:
        waiter.greenlet.switch("turn")  # (_dial._QUEUE_TURN)


class Targets:
    """The targets of one rule, their order per client and their health."""

    def __init__(self, rule: Rule, label: str = "") -> None:
        self.label = label or str(rule.listen)
        self.function: Optional[Callable] = rule.target if callable(rule.target) else None
        self.static: Tuple[Endpoint, ...] = rule.targets
        self.entries: Tuple[Target, ...] = rule.target_list  # with their weights and backups
        self.balance = rule.balance
        self.max_fails = rule.max_fails
        self.fail_timeout = rule.fail_timeout
        self.check = rule.check
        self.rise = rule.rise
        self.fall = rule.fall
        #: whether up and down are this module's to say (several targets, a function, a
        #: check); else gproxy_target_up is the last connect's result (``Counters.target_up``)
        self.tracks_health = len(rule.targets) != 1 or bool(rule.check)
        self._health: Dict[Endpoint, _Health] = {}
        #: the queue of clients waiting for a target with room (shared with the rule's next
        #: forwarder), and whether any target has a limit (else nobody ever waits)
        self.queue = Queue()
        self.limited = False
        self.max_queue = rule.max_queue
        #: per fixed target (address, weight, backup, health): what order() reads, prebuilt
        self._slots: Tuple[_Slot, ...] = self._slots_of(self.entries)
        self._parsed: Dict[object, Tuple[_Slot, ...]] = {}  # a function's answers, parsed

    def order(self, client_address) -> Optional[List[Endpoint]]:
        """Every target, in the order this client should try them; None when every target
        it would start with is at its max_connections (it waits in the queue)."""
        slots = self._slots if self.function is None else self._call(client_address)
        if len(slots) == 1 and slots[0][3].admin is _ENABLED and not self.limited:
            return [slots[0][0]]
        now = time.monotonic()
        primaries: List[_Slot] = []
        backups: List[_Slot] = []
        down: List[_Slot] = []
        for slot in slots:
            state = slot[3]
            if state.admin is not _ENABLED:
                continue  # drained or disabled: no new client at all
            if state.checked_down or state.down and now < state.down_until:
                down.append(slot)
            elif slot[2]:
                backups.append(slot)
            else:
                primaries.append(slot)
        if self.limited:  # a full target is nobody's choice; all full in the lead: queue
            lead = primaries or backups or down
            primaries, backups, down = _with_room(primaries), _with_room(backups), _with_room(down)
            if lead and not _with_room(lead):
                return None
        if primaries:
            order = self._balanced(primaries)
            order.extend(slot[0] for slot in backups)  # this client's fallback only
        else:
            order = self._balanced(backups)
        if down:  # a last resort, soonest to recover first: better than no answer at all
            down.sort(key=lambda slot: (slot[3].checked_down, slot[3].down_until))
            order.extend(slot[0] for slot in down)
        return order

    def _balanced(self, group: List[_Slot]) -> List[Endpoint]:
        """``group`` (targets that are up) in the order ``balance`` gives this client."""
        count = len(group)
        if count < 2 or self.balance == "failover":
            return [slot[0] for slot in group]
        if self.balance == "round-robin":
            start = self._rotate(group)
            return [slot[0] for slot in group[start:]] + [slot[0] for slot in group[:start]]
        loads = [slot[3].active / slot[1] for slot in group]
        least = min(loads)
        if loads.count(least) > 1:  # ties take turns, by weight
            tied = [index for index in range(count) if loads[index] == least]
            start = tied[self._rotate([group[index] for index in tied])]
        else:
            start = loads.index(least)
        # then the others by load; equal loads in the order that follows the first, as
        # round-robin's, so that a fallback from a target that failed is spread too
        ranked = sorted(range(count), key=lambda index: (loads[index], (index - start) % count))
        return [group[index][0] for index in ranked]

    @staticmethod
    def _rotate(group: List[_Slot]) -> int:
        """Smooth weighted round-robin (nginx's): each target's score grows by its weight, the
        highest is chosen (its index returned) and loses the total. Weights 5, 1, 1 give
        A A B A C A A, not A A A A A B C, and equal weights take turns in the order given."""
        total = best = 0
        best_score = None
        index = 0
        for _address, weight, _backup, state in group:
            score = state.current = state.current + weight
            total += weight
            if best_score is None or score > best_score:
                best, best_score = index, score
            index += 1
        group[best][3].current -= total
        return best

    def _slots_of(self, entries: Sequence[Target]) -> Tuple[_Slot, ...]:
        slots = []
        for entry in entries:
            state = self._state(entry.address)
            state.given_weight, state.backup = entry.weight, entry.backup
            state.given_limit = entry.max_connections
            state.room.limit = state.given_limit if state.limit is None else state.limit
            self.limited = self.limited or bool(state.room.limit)
            slots.append((entry.address, state.weight or entry.weight, entry.backup, state))
        return tuple(slots)

    # -- slots and the queue --------------------------------------------------------------

    def claim(self, endpoint: Endpoint) -> bool:
        """Take a slot of ``endpoint`` for a client about to connect to it: False if it is
        at its max_connections. Given back by :meth:`unclaim`, or once the connect worked
        (``succeeded(endpoint, claimed=True)``) by :meth:`released`."""
        state = self._health.get(endpoint)
        room = (state if state is not None else self._state(endpoint)).room
        if room.limit and room.busy >= room.limit:
            return False
        room.busy += 1
        return True

    def unclaim(self, endpoint: Endpoint) -> None:
        """A slot :meth:`claim` took was not used (the connect failed, or was aborted)."""
        state = self._health.get(endpoint)
        if state is not None and state.room.busy > 0:
            state.room.busy -= 1
        if self.queue.waiters:
            self.dispatch()

    def must_queue(self) -> bool:
        """Whether a new client goes behind the clients waiting already (FIFO)."""
        return bool(self.queue.waiters) and self.limited

    def queue_full(self) -> bool:
        """Whether ``max_queue`` clients wait already."""
        return bool(self.max_queue) and len(self.queue.waiters) >= self.max_queue

    def full_line(self) -> str:
        """Why a client waits: the targets' slots, for its log line."""
        rooms = ", ".join(f"{state.name} {state.room.busy}/{state.room.limit}" for state in self._health.values()
                          if state.room.limit)
        return f"every target it may use is at its max_connections ({rooms}); {len(self.queue)} waiting"

    def dispatch(self) -> None:
        """Slots may have freed (a connection ended, a connect failed, a target came up or
        was enabled, a limit was raised): hand each to the oldest waiter that can use one,
        its slot taken for it, until no waiter can."""
        blocked = set()  # Targets with fixed targets that have no room: no waiter of theirs can go
        for waiter in self.queue.oldest_first():
            targets = waiter.targets
            if id(targets) in blocked or waiter.given is not None:
                continue
            try:
                order = targets.order(waiter.conn.client_address)
            except TargetError:
                order = []  # it finds out why itself, when woken
            if order is None:
                if targets.function is None:
                    blocked.add(id(targets))
                continue
            first = order[0] if order and targets.claim(order[0]) else None
            self.queue.hand(waiter, first, order)

    def adopt(self, endpoint: Endpoint, connections) -> None:
        """A plain rule's one target gets a limit at run time: its open connections (which
        the plain path does not count) take its slots, and give them back when they end."""
        state = self._state(endpoint)
        for conn in connections:
            if conn.target is None:
                conn.target = endpoint
                state.room.busy += 1
                state.active += 1

    def _state(self, endpoint: Endpoint) -> _Health:
        state = self._health.get(endpoint)
        if state is None:
            state = self._health[endpoint] = _Health(str(endpoint))
        return state

    def _restart_rotation(self) -> None:
        """Which targets are up changed: the rotation starts afresh over those that are, so
        their shares are exact from here (a score earned before would skew the next few)."""
        for state in self._health.values():
            state.current = 0

    def note(self, endpoint: Endpoint) -> None:
        """Know ``endpoint`` from now on (a route_sni target), as the fixed targets are known:
        metrics and ``statuses()`` show it before any client went there."""
        self._state(endpoint)

    def succeeded(self, endpoint: Endpoint, claimed: bool = False) -> None:
        """A connect to ``endpoint`` worked; it counts as open (and holds a slot: one it
        ``claimed`` before, else one taken now) until :meth:`released`."""
        state = self._health.get(endpoint)
        if state is None:
            state = self._state(endpoint)
        elif state.down:
            state.down = False
            if not state.checked_down:
                self._log_up(endpoint, "a client's connect worked")
        state.fails = 0
        state.active += 1
        if not claimed:
            state.room.busy += 1

    def released(self, endpoint: Endpoint) -> None:
        """A connection to ``endpoint`` that :meth:`succeeded` has ended: its slot too."""
        state = self._health.get(endpoint)
        if state is not None:
            if state.active > 0:
                state.active -= 1
            if state.room.busy > 0:
                state.room.busy -= 1
            if self.queue.waiters:
                self.dispatch()

    def failed(self, endpoint: Endpoint, error: str) -> None:
        """A connect to ``endpoint`` failed (refused, unreachable, timed out)."""
        state = self._state(endpoint)
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

    def checked(self, endpoint: Endpoint, passed: bool, reason: str, duration: Optional[float] = None) -> None:
        """One active check of ``endpoint`` ended: it ``passed`` or not, ``reason`` says what
        it found, and it took ``duration`` seconds (``gproxy._health`` calls this on the
        forwarder's hub)."""
        state = self._state(endpoint)
        state.checks += 1
        state.check_reason = reason
        state.check_passed, state.check_at, state.check_duration = passed, time.time(), duration
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

    def inherit(self, old: "Targets") -> bool:
        """Take over ``old``'s health and state of the targets both have (a rule replaced by a
        reload): down stays down, checks go on counting, a drained target stays drained; a
        weight set at run time stays unless the new rule gives the target another weight.
        Open connections stay ``old``'s. True if a target is now drained or disabled."""
        kept = ("fails", "down_until", "down", "reason", "admin") + (_CHECKED if self.check else ())
        reweighted = False
        self.queue = old.queue  # its waiters and the new clients wait in one line
        for endpoint, state in old._health.items():
            if endpoint in self.static or self.function is not None:
                mine = self._state(endpoint)  # the very object order() reads
                for name in kept:
                    setattr(mine, name, getattr(state, name))
                if state.weight is not None and state.given_weight == mine.given_weight:
                    mine.weight, reweighted = state.weight, True
                # one set of slots for the old connections and the new: the limit is the target's
                mine.room = state.room
                if state.limit is not None and state.given_limit == mine.given_limit:
                    mine.limit = state.limit  # set at run time, and the file did not change it
                mine.room.limit = mine.given_limit if mine.limit is None else mine.limit
                self.limited = self.limited or bool(mine.room.limit)
        if reweighted:
            self._slots = self._slots_of(self.entries)
        return self.restricted()

    def restricted(self) -> bool:
        """Whether a target is drained or disabled."""
        return any(state.admin is not _ENABLED for state in self._health.values())

    def checking(self, endpoint: Endpoint) -> bool:
        """Whether ``endpoint`` is to be checked now (not while it is disabled)."""
        state = self._health.get(endpoint)
        return state is None or state.admin is not _DISABLED

    def none_open(self) -> str:
        """Why a client has no target to try: the line of its connect failure."""
        states = ", ".join(f"{state.name} {state.admin}" for state in self._health.values())
        return f"no target takes new clients ({states})"

    # -- runtime control ---------------------------------------------------------------------

    def find(self, address: Union[str, Endpoint, Any]) -> Endpoint:
        """The target at ``address`` (a string as configured, ``"[::1]:6379"``,
        ``"unix:/run/redis.sock"``, or anything ``parse_address`` takes); TargetNotFound."""
        for endpoint, state in self._health.items():
            if address == endpoint or address == state.name:
                return endpoint
        try:
            wanted = parse_address(address, "target")
        except (ConfigError, TypeError):
            raise TargetNotFound(address) from None
        for endpoint in self._health:
            if wanted == endpoint or _same_ip(wanted, endpoint):
                return endpoint
        raise TargetNotFound(address)

    def set(self, endpoint: Endpoint, state: Optional[TargetState] = None, weight: Optional[int] = None,
            limit: Optional[int] = None) -> None:
        """Set ``endpoint``'s state, weight and max_connections (None: unchanged); one INFO
        line if that changed anything. New clients see it at once; open connections are left
        alone (a lower limit than the connections open takes no connection away)."""
        health = self._health[endpoint]
        changes = []
        if limit is not None and limit != health.room.limit:
            changes.append(f"max_connections {limit or 'none'} (was {health.room.limit or 'none'})")
        if limit is not None:
            health.limit = health.room.limit = limit
            self.limited = any(other.room.limit for other in self._health.values())
        if state is not None and state is not health.admin:
            changes.append(f"{state} (was {health.admin})")
            if health.admin is _DISABLED:  # back from maintenance: its first check decides
                health.checks = health.passes = health.failures = 0
            health.admin = state
        if weight is not None and weight != (health.weight or health.given_weight):
            changes.append(f"weight {weight} (was {health.weight or health.given_weight})")
        if weight is not None:
            health.weight = weight
            self._slots = self._slots_of(self.entries)
            self._parsed.clear()
        if not changes:
            return
        self._restart_rotation()
        log.info("%s: target %s set to %s", self.label, health.name, ", ".join(changes),
                 extra=self._fields("target_state", endpoint, state=str(health.admin),
                                    weight=health.weight or health.given_weight,
                                    max_connections=health.room.limit))
        if self.queue.waiters:
            self.dispatch()
        if state is not None and state is not _ENABLED and self.function is None \
                and all(other.admin is not _ENABLED for other in self._health.values()):
            log.warning("%s: every target is drained or disabled: new clients are refused", self.label,
                        extra={"fields": {"event": "no_target", "rule": self.label}})

    def views(self, counters: Counters) -> Dict[str, TargetView]:
        """Each known target as metrics shows it, by name (``Counters.health``)."""
        views = {}
        for state in list(self._health.values()):  # known()'s order: the fixed targets first
            views[state.name] = TargetView(self._up(state, counters), state.admin.value,
                                     state.weight or state.given_weight, state.check_duration,
                                     state.room.limit)
        return views

    def statuses(self, counters: Counters) -> List[TargetStatus]:
        """Each known target as ``Forwarder.targets()`` shows it."""
        return [self.status(endpoint, counters) for endpoint in self.known()]

    def status(self, endpoint: Endpoint, counters: Counters) -> TargetStatus:
        """One target as ``Forwarder.targets()`` shows it."""
        state = self._state(endpoint)
        counts = counters.targets.get(state.name)
        up = self._up(state, counters)
        reason = state.reason
        if not self.tracks_health and not up and counts is not None:
            reason = f"its last connect failed: {counts.last_error}"
        check = None
        if state.checks:
            check = CheckResult(state.check_passed, state.check_reason, state.check_at,
                                state.check_duration or 0.0, state.passes, state.failures, state.checks)
        return TargetStatus(state.name, state.admin, state.weight or state.given_weight, state.backup, up,
                            reason, counts.active if counts is not None else 0, check, state.room.limit,
                            len(self.queue))

    def _up(self, state: _Health, counters: Counters) -> bool:
        if self.tracks_health:
            return not state.is_down
        return counters.target_up.get(state.name, True)

    def is_up(self, endpoint: Endpoint) -> bool:
        """False while ``endpoint`` is marked down, by passive health or by its check (for
        statistics and metrics)."""
        state = self._health.get(endpoint)
        return state is None or not state.is_down

    def _log_down(self, endpoint: Endpoint, reason: str, more: str = "", **fields) -> None:
        """The one line a target's going down makes: WARNING, with the reason."""
        self._state(endpoint).reason = reason
        self._restart_rotation()
        log.warning("%s: target %s is down after %s%s", self.label, endpoint, reason, more,
                    extra=self._fields("target_down", endpoint, reason=reason, **fields))
        if self.queue.waiters:  # the last full target of its group down: backups may lead now
            self.dispatch()

    def _log_up(self, endpoint: Endpoint, reason: str, **fields) -> None:
        """The one line a target's coming back makes: INFO, with the reason."""
        self._state(endpoint).reason = reason
        self._restart_rotation()
        log.info("%s: target %s is up again: %s", self.label, endpoint, reason,
                 extra=self._fields("target_up", endpoint, reason=reason, **fields))
        if self.queue.waiters:  # the waiters may go to it now
            self.dispatch()

    def known(self) -> List[Endpoint]:
        """The fixed targets, then any a target function returned so far."""
        seen = list(self.static)
        # (a list of the keys first: metrics may call this from another thread while a
        # target function's answer adds one)
        seen.extend(endpoint for endpoint in list(self._health) if endpoint not in self.static)
        return seen

    def _fields(self, event: str, endpoint: Endpoint, **more) -> dict:
        """A health change's fields for a JSON log line (gproxy._jsonlog)."""
        return {"fields": {"event": event, "rule": self.label, "target": str(endpoint), **more}}

    def _call(self, client_address) -> Sequence[_Slot]:
        function = self.function
        assert function is not None  # only a rule whose target is a function calls it
        try:
            answer = function(client_address)
        except Exception as exc:
            raise TargetError(f"the target function raised {type(exc).__name__}: {exc}") from None
        try:
            key = tuple(answer) if isinstance(answer, list) else answer
            parsed = self._parsed.get(key)
        except TypeError:  # unhashable: parse it every time
            key, parsed = None, None
        if parsed is None:
            try:
                parsed = self._slots_of(parse_target_list(answer, "target"))
            except ConfigError as exc:
                raise TargetError(f"the target function returned {answer!r}: "
                                  f"{str(exc).split(': ', 1)[-1]}") from None
            if key is not None and len(self._parsed) < 1024:
                self._parsed[key] = parsed
        return parsed


def _with_room(group: List[_Slot]) -> List[_Slot]:
    """The targets of ``group`` below their max_connections."""
    return [slot for slot in group if not slot[3].room.limit or slot[3].room.busy < slot[3].room.limit]


def _same_ip(one: Endpoint, other: Endpoint) -> bool:
    """Two spellings of one IP address and port (``[::1]:80``, ``[0:0::1]:80``)."""
    if not (isinstance(one, Address) and isinstance(other, Address)) or one.port != other.port \
            or one.family is None or other.family is None:
        return False
    return ipaddress.ip_address(one.host) == ipaddress.ip_address(other.host)


def _times(count: int) -> str:
    return "once" if count == 1 else f"{count} times in a row"
