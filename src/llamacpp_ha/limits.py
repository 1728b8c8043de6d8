"""Per-key limits: concurrent requests and requests per minute.

A key over its limit gets 429 with `Retry-After` at once; other keys are not slowed, because
nothing here is shared between keys and a rejected request never enters the queue.

`KeyLimits` counts in this process. `FleetKeyLimits` counts across balancer replicas, in
shared state (`replicas.py`); while that cannot be reached, each replica holds a key to its
share of the limits (the limit over the live replicas, rounded up), counted here.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from .config import ClientKey
from .errors import TooManyRequests

if TYPE_CHECKING:
    from .replicas import Replicas

_WINDOW_S = 60.0


class KeyLimits:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._in_flight: dict[str, int] = {}
        self._recent: dict[str, deque[float]] = {}

    async def admit(self, key: ClientKey) -> str | None:
        """Count a request of `key`, or raise TooManyRequests; pair with `release()` and
        what this returns (an id in shared state, or None)."""
        self.admit_here(key)
        return None

    def admit_here(self, key: ClientKey, share: int = 1) -> None:
        """Count a request of `key` in this process against 1/`share` of its limits."""
        now = self._clock()
        concurrent = _part(key.max_concurrent, share)
        if concurrent is not None and self._in_flight.get(key.id, 0) >= concurrent:
            raise _over_concurrency(key, concurrent)
        per_minute = _part(key.requests_per_minute, share)
        if per_minute is not None:
            recent = self._recent.setdefault(key.id, deque())
            while recent and recent[0] <= now - _WINDOW_S:
                recent.popleft()
            if len(recent) >= per_minute:
                raise _over_rate(key, per_minute, recent[0] + _WINDOW_S - now)
            recent.append(now)
        self._in_flight[key.id] = self._in_flight.get(key.id, 0) + 1

    def release(self, key: ClientKey, ticket: str | None = None) -> None:
        left = self._in_flight.get(key.id, 0) - 1
        if left > 0:
            self._in_flight[key.id] = left
        else:
            self._in_flight.pop(key.id, None)

    def in_flight(self, key_id: str) -> int:
        return self._in_flight.get(key_id, 0)


class FleetKeyLimits(KeyLimits):
    """Limits that hold across replicas: one round trip per admission of a limited key."""

    def __init__(self, replicas: Replicas, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(clock)
        self._replicas = replicas

    async def admit(self, key: ClientKey) -> str | None:
        if key.max_concurrent is None and key.requests_per_minute is None:
            self.admit_here(key)
            return None
        ticket, retry_after_s, reason = await self._replicas.admit_key(
            key.id, key.max_concurrent, key.requests_per_minute
        )
        if reason == "concurrent":
            raise _over_concurrency(key, key.max_concurrent or 0)
        if reason == "rate":
            raise _over_rate(key, key.requests_per_minute or 0, retry_after_s)
        if ticket is None:  # shared state is away: this replica's share, counted here
            self.admit_here(key, share=len(self._replicas.live))
            return None
        # Counted here as well, for /monitor and for the tests' "nothing left admitted".
        self._in_flight[key.id] = self._in_flight.get(key.id, 0) + 1
        return ticket

    def release(self, key: ClientKey, ticket: str | None = None) -> None:
        super().release(key, ticket)
        if ticket is not None:
            self._replicas.release_key(key.id, ticket)


def _part(limit: int | None, share: int) -> int | None:
    return None if limit is None else math.ceil(limit / max(1, share))


def _over_concurrency(key: ClientKey, limit: int) -> TooManyRequests:
    return TooManyRequests(f"key {key.id} already has {limit} requests in flight", retry_after_s=1)


def _over_rate(key: ClientKey, limit: int, wait_s: float) -> TooManyRequests:
    return TooManyRequests(
        f"key {key.id} is limited to {limit} requests per minute",
        retry_after_s=max(1, math.ceil(wait_s)),
    )
