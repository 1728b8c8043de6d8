"""How long our own event loop was stalled: so a timeout can tell a slow backend from us.

When the machine is loaded, or a request's work holds the loop, every timer fires late and a
poll that the backend answered in time looks timed out. `LoopLag` ticks every `tick_s` and
records how late each tick came; `stalled_s(since)` is the time lost that way since a moment,
which a deadline adds back before it blames the backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque

# Later than this is a stall; less is the ordinary jitter of a timer.
_JITTER_S = 0.005
_KEEP_S = 120.0


class LoopLag:
    def __init__(self, tick_s: float = 0.05) -> None:
        self._tick_s = tick_s
        self._stalls: deque[tuple[float, float]] = deque()  # (when it ended, how long)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="loop lag")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def stalled_s(self, since: float) -> float:
        """Seconds the loop was stalled since `since` (a `time.monotonic()` reading)."""
        total = 0.0
        for ended, late in reversed(self._stalls):
            if ended <= since:
                break
            total += min(late, ended - since)
        return total

    async def _run(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(self._tick_s)
            now = time.monotonic()
            late = now - before - self._tick_s
            if late > _JITTER_S:
                self._stalls.append((now, late))
            while self._stalls and self._stalls[0][0] < now - _KEEP_S:
                self._stalls.popleft()
