"""`Watchdog`: one timer for all the deadlines of one exchange.

A streamed answer has two deadlines that move with every chunk: the backend must send its next
event within the idle timeout, and the client must take each chunk within the write timeout.
Two `asyncio.timeout()`s per chunk cost two timer handles scheduled and cancelled, and a
context manager each, for deadlines that almost never pass. Here a deadline is a float set
with the chunk, and one timer is armed at the earliest one; when it fires for a deadline that
has since moved later, it re-arms for that, so a healthy stream costs about one timer per
timeout period instead of two per chunk.

A deadline that moves with every chunk (the backend's silence) is moved by its owner through the
`Deadline` that `start` returns: one attribute set, later only, which the timer finds when it
fires.

What happens when a deadline passes is the owner's: the action given with it runs (close the
upstream so its read fails; cancel the task blocked on a client that does not read), and
`expired` says which deadline it was, for the error the owner then raises.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable


class Deadline:
    """One deadline: `when` on the loop's clock, and what runs if it passes. Its owner may set
    `when` later at any time; earlier only through `Watchdog.start`, which re-arms the timer."""

    __slots__ = ("action", "when")

    def __init__(self, when: float, action: Callable[[], object]) -> None:
        self.when = when
        self.action = action


class Watchdog:
    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        # The loop's clock itself, for an owner that reads it once a chunk.
        self.clock: Callable[[], float] = self._loop.time
        self._deadlines: dict[str, Deadline] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self.expired: str | None = None  # the deadline that passed, once one has

    def start(self, name: str, when: float, action: Callable[[], object]) -> Deadline:
        """Until `stop(name)`, `action` runs if the loop's clock reaches `when` (or the later
        time the returned deadline is moved to)."""
        deadline = self._deadlines[name] = Deadline(when, action)
        if when < self._timer_at:
            self._arm(when)
        return deadline

    def stop(self, name: str) -> None:
        self._deadlines.pop(name, None)  # the timer stays: when it fires, it re-arms or not

    def now(self) -> float:
        return self._loop.time()

    def close(self) -> None:
        self._deadlines.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at = math.inf

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(when, self._fire)
        self._timer_at = when

    def _fire(self) -> None:
        self._timer, self._timer_at = None, math.inf
        now = self._loop.time()
        for name, deadline in list(self._deadlines.items()):
            if deadline.when <= now:
                del self._deadlines[name]
                self.expired = name
                deadline.action()
                break
        # The others still hold (an idle backend's stream may be resumed elsewhere, and the
        # request's own deadline still runs), unless the action armed the timer already.
        if self._deadlines and self._timer is None:
            self._arm(min(deadline.when for deadline in self._deadlines.values()))
