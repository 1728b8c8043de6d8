"""Per-backend slot accounting: our own in-flight count is authoritative.

llama-server's `/slots` only reconciles it: a slot busy there that we did not fill (a client
talking to the backend around us) counts as busy here too, so we never overfill a backend.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class SlotTracker:
    """Counts a backend's slots; `try_claim()` and `release()` are the only ways to change it.

    The scheduler claims with `try_claim()` rather than blocking on one backend, because it
    chooses among all backends for the head of one global queue.
    """

    def __init__(self, on_release: Callable[[], None] | None = None) -> None:
        self.total = 0
        self.in_flight = 0
        self.external_busy = 0
        self._on_release = on_release
        self._changed = asyncio.Condition()

    @property
    def busy(self) -> int:
        return min(self.total, self.in_flight + self.external_busy)

    @property
    def free(self) -> int:
        return max(0, self.total - self.in_flight - self.external_busy)

    def try_claim(self) -> bool:
        if self.free <= 0:
            return False
        self.in_flight += 1
        return True

    async def release(self) -> None:
        # Awaited, never spawned as a task: the scheduler must see the freed slot before it
        # next checks for room, or a queued request can wait for a slot that is already free.
        if self.in_flight <= 0:
            raise RuntimeError("release() without a matching claim")
        self.in_flight -= 1
        async with self._changed:
            self._changed.notify_all()
        if self._on_release is not None:
            self._on_release()

    def observe(self, total: int, busy_on_backend: int) -> bool:
        """Reconcile with the backend's own view; True when free capacity changed."""
        before = self.free
        self.total = max(0, total)
        # Requests we sent that the backend has not started yet make busy_on_backend smaller
        # than in_flight; only the excess is traffic that reached it around us.
        self.external_busy = max(0, busy_on_backend - self.in_flight)
        return self.free != before

    async def wait_idle(self) -> None:
        """Wait until none of our requests is in flight (used to drain a backend)."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.in_flight == 0)
