"""Every connection's direction states checked against ``relay.MOVES``, in every test.

conftest.py's autouse fixture runs each test inside ``checking_states()``: each new
``relay.Connection`` gets its per-direction state list swapped for a ``CheckedStates``, which
records every move (refusing none: an exception in a hub callback would hide what follows),
and ``_end_direction``/``_teardown`` are wrapped to count. After the test, ``problems()`` says
what broke the rules:

- a move that is not in ``relay.MOVES``;
- ``_end_direction`` called for a direction that had ended already;
- a teardown before both directions ended, or more than one;
- a connection torn down with a direction that did not end exactly once.

A connection still running when the test ends (a forwarder left to the garbage collector, a
daemon thread) is checked for its moves only.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator, List

from gproxy import relay


class CheckedStates(list):
    """A connection's ``[upstream state, downstream state]`` that keeps its history."""

    def __init__(self, states, conn) -> None:
        super().__init__(states)
        self.name = f"conn#{conn.id} of {conn.context.name}"
        self.moves: List[tuple] = []     # (direction, old, new), in order
        self.problems: List[str] = []
        self.teardowns = 0

    def __setitem__(self, direction, new) -> None:
        old = self[direction]
        if new not in relay.MOVES[old]:
            self.problems.append(f"direction {direction}: {old.name} -> {new.name} is not a move of relay.MOVES")
        self.moves.append((direction, old, new))
        super().__setitem__(direction, new)

    def ends(self, direction: int) -> int:
        return sum(1 for d, _old, new in self.moves if d == direction and new is relay.ENDED)

    def verdict(self) -> List[str]:
        problems = list(self.problems)
        if self.teardowns:
            if self.teardowns != 1:
                problems.append(f"torn down {self.teardowns} times")
            for direction in (relay.UPSTREAM, relay.DOWNSTREAM):
                if self.ends(direction) != 1:
                    problems.append(f"direction {direction} ended {self.ends(direction)} times")
        return [f"{self.name}: {p} (moves: {self.history()})" for p in problems]

    def history(self) -> str:
        return ", ".join(f"{d}:{old.name}->{new.name}" for d, old, new in self.moves)


class Ledger:
    def __init__(self) -> None:
        self.checked: List[CheckedStates] = []
        self.lock = threading.Lock()

    def problems(self) -> List[str]:
        with self.lock:
            checked = list(self.checked)
        return [problem for states in checked for problem in states.verdict()]


@contextlib.contextmanager
def checking_states() -> Iterator[Ledger]:
    ledger = Ledger()
    cls = relay.Connection
    init, end, teardown = cls.__init__, cls._end_direction, cls._teardown

    def checked_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        states = self._states = CheckedStates(self._states, self)
        with ledger.lock:
            ledger.checked.append(states)

    def checked_end(self, direction, *args, **kwargs):
        states = self._states
        if isinstance(states, CheckedStates) and states[direction] is relay.ENDED:
            states.problems.append(f"direction {direction} ended again")
        return end(self, direction, *args, **kwargs)

    def checked_teardown(self):
        states = self._states
        if isinstance(states, CheckedStates):
            states.teardowns += 1
            if not (states[0] is relay.ENDED and states[1] is relay.ENDED):
                states.problems.append(f"torn down in {states[0].name}/{states[1].name}")
        return teardown(self)

    cls.__init__, cls._end_direction, cls._teardown = checked_init, checked_end, checked_teardown
    try:
        yield ledger
    finally:
        cls.__init__, cls._end_direction, cls._teardown = init, end, teardown
