"""Passive health: take a backend out when live traffic fails on it, let it back carefully.

`failures_to_eject` consecutive failures (5xx, resets, garbage, timeouts; never the client's
own doing) eject a backend at once. Its first ejection lasts `base_s`, each later one twice the
previous, up to `max_s`. When the time is up it returns only after `good_polls` consecutive
good health polls. At most `max_fraction` of the fleet is ejected at a time, so a bad
configuration or a poisonous request pattern cannot take every backend out.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class EjectionState:
    consecutive_failures: int = 0
    times_ejected: int = 0
    ejected: bool = False
    ejected_until: float = 0.0
    good_polls: int = 0


class EjectionPolicy:
    def __init__(
        self,
        failures_to_eject: int,
        base_s: float,
        max_s: float,
        good_polls: int,
        max_fraction: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failures_to_eject = failures_to_eject
        self.base_s = base_s
        self.max_s = max_s
        self.good_polls = good_polls
        self.max_fraction = max_fraction
        self._clock = clock

    def on_failure(self, state: EjectionState, ejected_now: int, fleet_size: int) -> bool:
        """Count a failure; True when it ejects the backend."""
        state.consecutive_failures += 1
        state.good_polls = 0
        if state.ejected or state.consecutive_failures < self.failures_to_eject:
            return False
        if ejected_now + 1 > self.max_fraction * fleet_size:
            return False
        duration = min(self.max_s, self.base_s * 2**state.times_ejected)
        state.ejected = True
        state.times_ejected += 1
        state.ejected_until = self._clock() + duration
        return True

    def on_success(self, state: EjectionState) -> None:
        state.consecutive_failures = 0

    def on_poll(self, state: EjectionState, healthy: bool) -> bool:
        """Count a health poll; True when it readmits an ejected backend."""
        if not healthy:
            state.good_polls = 0
            return False
        state.good_polls += 1
        if not state.ejected or self._clock() < state.ejected_until:
            return False
        if state.good_polls < self.good_polls:
            return False
        state.ejected = False
        state.consecutive_failures = 0
        return True
