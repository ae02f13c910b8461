"""Chaos over time: a toxic's ``Schedule`` (on, off, repeat, ramp) and the runner that follows it.

Typical use (``gproxy.toxics.Schedule`` is the public name)::

    fw.add_toxic(toxics.timeout(0), schedule=Schedule(on=2, off=8))            # a 2 s partition every 10 s
    fw.add_toxic("latency", latency=500, schedule=Schedule(ramp=60, steps=12))  # more connections each 5 s
    fw.remove_toxic("timeout_downstream")                                       # the schedule stops with it

A scheduled toxic is on the forwarder for the schedule's whole life; the schedule moves only
its toxicity: the toxicity it was given while *on* (during a ramp, that toxicity times 1/steps,
2/steps...), 0 while *off*. Each connection draws one number once per scheduled toxic, and the
toxic acts on it while that number is below the toxicity now: a ramp adds connections and never
takes one back, and every *on* phase hits the same ones. A change takes effect as an update does
(``Link.sync`` at the next chunk boundary), so toggling off hands back, in order, what the toxic
held; a connection the toxic keeps acting on across a change is not disturbed (its timers do not
restart). After ``repeat`` cycles the toxic is removed.

The time line is a pure function of the time since the schedule began (``Schedule.at``), in
whole nanoseconds so that a boundary is never missed nor met twice by rounding; the runner is
one greenlet on the forwarder's hub that sleeps until the next boundary (a gevent timer: no
polling) and applies what changed there. It ends when the toxic is removed (by anyone: the
API, ``reset()``, a reload) or the forwarder stops.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Tuple

from gproxy.config import ConfigError, show

__all__ = ["Schedule", "Runner", "KEYS"]

log = logging.getLogger("gproxy.toxics")

#: a schedule's fields, as a config file's ``schedule = {...}`` spells them
KEYS = ("on", "off", "repeat", "ramp", "steps", "start")
_NS = 1_000_000_000
#: the most steps a ramp takes (one toxicity change each)
MAX_STEPS = 10_000
#: the shortest on, off, and ramp step (seconds): at most 100 changes a second
MIN_PHASE = 0.01
#: the longest duration: a year, far beyond any game day, and safely inside a float's precision
_MAX_SECONDS = 366 * 86400.0


def _seconds(value: Any, key: str, positive: bool) -> float:
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
    if bad or not (value > 0 if positive else value >= 0) or value > _MAX_SECONDS:
        what = "> 0" if positive else ">= 0"
        raise ConfigError(f"schedule: {key}",
                          f"expected a number of seconds {what} (at most a year), got {show(value)}")
    return float(value)


def _count(value: Any, key: str, maximum: int) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise ConfigError(f"schedule: {key}", f"expected a whole number from 1 to {maximum}, got {show(value)}")
    return value


@dataclass(frozen=True)
class Schedule:
    """When a toxic acts: after ``start`` seconds off, ``on`` seconds on, then ``off`` seconds
    off, for ``repeat`` cycles (None: for ever); then the toxic is removed.

    - ``on`` (default None: for ever, one cycle): seconds on per cycle, at least 0.01.
    - ``off`` (default 0): seconds off after each *on* (0, or at least 0.01); needs ``on``.
    - ``repeat`` (default None: for ever): how many cycles, at least 1; needs ``on``.
    - ``ramp`` (default 0: at once): over the first ``ramp`` seconds of each *on* the toxicity
      rises from 0 to the toxic's in ``steps`` equal steps (``steps`` changes, ``ramp/steps``
      apart, the first at 0, ... the last at ``ramp`` reaching the toxic's toxicity); at most ``on``.
    - ``steps`` (default 10): 1 to 10000, and at most one per 0.01 s of ``ramp``.
    - ``start`` (default 0): seconds off before the first cycle.

    Bad values raise :class:`gproxy.ConfigError` naming the field (``schedule: on: ...``)."""

    on: Optional[float] = None
    off: float = 0.0
    repeat: Optional[int] = None
    ramp: float = 0.0
    steps: int = 10
    start: float = 0.0

    def __post_init__(self) -> None:
        on = None if self.on is None else _seconds(self.on, "on", positive=True)
        off = _seconds(self.off, "off", positive=False)
        repeat = None if self.repeat is None else _count(self.repeat, "repeat", 2**63 - 1)
        ramp = _seconds(self.ramp, "ramp", positive=False)
        steps = _count(self.steps, "steps", MAX_STEPS)
        start = _seconds(self.start, "start", positive=False)
        if on is None and off:
            raise ConfigError("schedule: off", "needs on: without it the toxic is on for ever")
        if on is None and repeat is not None:
            raise ConfigError("schedule: repeat", "needs on: without it there is one cycle, for ever")
        if on is not None and ramp > on:
            raise ConfigError("schedule: ramp", f"must be at most on ({on:g} s), got {show(self.ramp)}")
        # at most one change per MIN_PHASE: a schedule is for seconds and minutes, never a busy loop
        for key, value in (("on", on), ("off", off), ("ramp", ramp)):
            if value and value < MIN_PHASE - 1e-12:
                raise ConfigError(f"schedule: {key}", f"must be 0 or at least {MIN_PHASE:g} s, got {show(value)}")
        most = int(ramp / MIN_PHASE + 1e-9)
        if ramp and steps > most:
            raise ConfigError("schedule: steps", f"at most one step per {MIN_PHASE:g} s: a ramp of {ramp:g} s "
                                                 f"takes at most {most}, got {show(steps)}")
        for key, value in (("on", on), ("off", off), ("repeat", repeat), ("ramp", ramp), ("steps", steps),
                           ("start", start)):
            object.__setattr__(self, key, value)

    def as_dict(self) -> dict:
        """The fields that differ from their defaults (what a config file would say)."""
        return {key: getattr(self, key) for key in KEYS if getattr(self, key) != _DEFAULTS[key]}

    def at(self, elapsed: int) -> Tuple[Optional[float], Optional[int]]:
        """``(factor, next)`` at ``elapsed`` ns since the schedule began: the share of the
        toxic's toxicity in force (0 to 1), and when it may next change (ns since the
        beginning, always after ``elapsed``; None: never). ``(None, None)``: the schedule is
        over and the toxic goes."""
        start = round(self.start * _NS)
        if elapsed < start:
            return 0.0, start
        ramp = round(self.ramp * _NS)
        into = elapsed - start
        if self.on is None:   # one cycle, for ever: the ramp, then on
            return self._ramp(into, ramp, start, None)
        on, off = round(self.on * _NS), round(self.off * _NS)
        length = on + off
        cycle = into // length
        end = None if self.repeat is None else start + self.repeat * length
        if end is not None and elapsed >= end:
            return None, None
        begin = start + cycle * length
        into -= cycle * length
        if into >= on:
            return 0.0, begin + length
        if not off and not ramp:   # on from cycle to cycle: nothing changes until the end
            return 1.0, end
        return self._ramp(into, ramp, begin, begin + on)

    def _ramp(self, into: int, ramp: int, begin: int, after: Optional[int]) -> Tuple[float, Optional[int]]:
        if into >= ramp:
            return 1.0, after
        steps = self.steps
        step = into * steps // ramp
        return step / steps, begin + -(-(step + 1) * ramp // steps)   # the next step, rounded up


_DEFAULTS = {key: getattr(Schedule(), key) for key in KEYS}


def from_table(table: Any) -> Schedule:
    """A ``Schedule`` as it is, or one from a mapping (a config file's ``schedule = {on = 2,
    off = 5}``): unknown keys are errors."""
    if isinstance(table, Schedule):
        return table
    if not isinstance(table, Mapping):
        raise ConfigError("schedule", f"expected a Schedule, or a table such as {{on = 2, off = 5}}, "
                                      f"got {show(table)}")
    for key in table:
        if key not in KEYS:
            raise ConfigError(f"schedule: {key}", f"unknown key (a schedule has {', '.join(KEYS)})")
    return Schedule(**table)


class Runner:
    """Follows one toxic's schedule on the forwarder's hub: ``apply(factor)`` at each change,
    ``finish()`` when the schedule is over. ``origin`` (monotonic seconds) is when the schedule
    began: a reload's copy of the toxic goes on where the old one was."""

    def __init__(self, name: str, schedule: Schedule, apply: Callable[[float], None],
                 finish: Callable[[], None], label: Callable[[], str] = str, origin: Optional[float] = None):
        self.name = name
        self.schedule = schedule
        self.apply = apply
        self.finish = finish
        self.label = label
        self.origin = origin
        self.factor: Optional[float] = None
        self.greenlet: Any = None   # a gevent.Greenlet, while it runs
        self.cancelled = False

    def start(self) -> None:
        """Spawn the greenlet on this thread's hub (the forwarder's)."""
        if self.origin is None:
            self.origin = time.monotonic()
        if not self.cancelled and self.greenlet is None:
            import gevent  # here: reading a schedule (a config file, --check) needs no gevent
            self.greenlet = gevent.spawn(self._run)

    def cancel(self) -> None:
        """The toxic is gone, or the forwarder stops: change nothing more."""
        self.cancelled = True
        greenlet = self.greenlet
        if greenlet is not None and greenlet is not _current():
            greenlet.kill(block=False)

    def step(self, elapsed: int) -> Optional[int]:
        """Apply what the schedule says at ``elapsed`` ns; return when to look again (None:
        never). A fake clock drives this directly."""
        factor, following = self.schedule.at(elapsed)
        if factor is None:
            self.cancelled = True
            log.info("%stoxic %s: its schedule is over: removed", self.label(), self.name,
                     extra={"fields": {"event": "toxic_schedule_over", "toxic": self.name}})
            self.finish()
            return None
        if factor != self.factor:
            previous, self.factor = self.factor, factor
            self.apply(factor)
            if factor == 0.0 or factor == 1.0 or previous is None:
                state = ("off" if factor == 0.0 else "on" if factor == 1.0
                         else f"ramping ({factor:g} of its toxicity)")
                log.info("%stoxic %s %s", self.label(), self.name, state,
                         extra={"fields": {"event": "toxic_schedule", "toxic": self.name, "factor": factor}})
            else:
                log.debug("%stoxic %s ramping: %g of its toxicity", self.label(), self.name, factor,
                          extra={"fields": {"event": "toxic_schedule", "toxic": self.name, "factor": factor}})
        return following

    def _run(self) -> None:
        assert self.origin is not None  # start() set it
        target = 0
        while not self.cancelled:
            # never before the boundary slept for: a timer may wake a hair early, and a
            # boundary must not be met twice
            elapsed = max(round((time.monotonic() - self.origin) * _NS), target)
            following = self.step(elapsed)
            if following is None or self.cancelled:
                return
            target = following
            _sleep(max(0.0, (following - (time.monotonic() - self.origin) * _NS) / _NS))


def _current() -> Any:
    from greenlet import getcurrent
    return getcurrent()


def _sleep(seconds: float) -> None:
    import gevent
    gevent.sleep(seconds)
