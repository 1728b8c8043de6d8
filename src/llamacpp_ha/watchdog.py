"""`Watchdog`: one timer for all the deadlines of one exchange.

A streamed answer has two deadlines that move with every chunk: the backend must send its next
event within the idle timeout, and the client must take each chunk within the write timeout.
Two `asyncio.timeout()`s per chunk cost two timer handles scheduled and cancelled, and a
context manager each, for deadlines that almost never pass. Here a deadline is a float set
with the chunk, and one timer is armed at the earliest one; when it fires for a deadline that
has since moved later, it re-arms for that, so a healthy stream costs about one timer per
timeout period instead of two per chunk.

What happens when a deadline passes is the owner's: the action given with it runs (close the
upstream so its read fails; cancel the task blocked on a client that does not read), and
`expired` says which deadline it was, for the error the owner then raises.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable


class Watchdog:
    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._deadlines: dict[str, tuple[float, Callable[[], object]]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self.expired: str | None = None  # the deadline that passed, once one has

    def start(self, name: str, when: float, action: Callable[[], object]) -> None:
        """Until `stop(name)`, `action` runs if the loop's clock reaches `when`."""
        self._deadlines[name] = (when, action)
        if when < self._timer_at:
            self._arm(when)

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
        for name, (when, action) in list(self._deadlines.items()):
            if when <= now:
                del self._deadlines[name]
                self.expired = name
                action()
                break
        # The others still hold (an idle backend's stream may be resumed elsewhere, and the
        # request's own deadline still runs), unless the action armed the timer already.
        if self._deadlines and self._timer is None:
            self._arm(min(when for when, _ in self._deadlines.values()))
