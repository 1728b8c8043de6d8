"""Per-key limits: concurrent requests and requests per minute.

A key over its limit gets 429 with `Retry-After` at once; other keys are not slowed, because
nothing here is shared between keys and a rejected request never enters the queue.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable

from .config import ClientKey
from .errors import TooManyRequests

_WINDOW_S = 60.0


class KeyLimits:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._in_flight: dict[str, int] = {}
        self._recent: dict[str, deque[float]] = {}

    def admit(self, key: ClientKey) -> None:
        """Count a request of `key`, or raise TooManyRequests; pair with `release()`."""
        now = self._clock()
        if key.max_concurrent is not None and self._in_flight.get(key.id, 0) >= key.max_concurrent:
            raise TooManyRequests(
                f"key {key.id} already has {key.max_concurrent} requests in flight",
                retry_after_s=1,
            )
        if key.requests_per_minute is not None:
            recent = self._recent.setdefault(key.id, deque())
            while recent and recent[0] <= now - _WINDOW_S:
                recent.popleft()
            if len(recent) >= key.requests_per_minute:
                wait = recent[0] + _WINDOW_S - now
                raise TooManyRequests(
                    f"key {key.id} is limited to {key.requests_per_minute} requests per minute",
                    retry_after_s=max(1, math.ceil(wait)),
                )
            recent.append(now)
        self._in_flight[key.id] = self._in_flight.get(key.id, 0) + 1

    def release(self, key: ClientKey) -> None:
        left = self._in_flight.get(key.id, 0) - 1
        if left > 0:
            self._in_flight[key.id] = left
        else:
            self._in_flight.pop(key.id, None)

    def in_flight(self, key_id: str) -> int:
        return self._in_flight.get(key_id, 0)
