"""Per-backend slot accounting: our own count of requests in flight is authoritative.

`SlotLedger` is what the scheduler and the registry need of one backend's slots; `SlotTracker`
keeps it in this process. llama-server's `/slots` only reconciles it: a slot busy there that we
did not fill (a client talking to the backend around us) counts as busy here too, so we never
overfill a backend. A claim names its slot when the request is pinned to one (`id_slot`), else
llama-server picks the slot and the claim says `None`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, eq=False)
class Claim:
    """One slot held on `backend`: a specific one (`slot_id`), or any one llama-server picks."""

    backend: str
    slot_id: int | None = None
    tokens: int = 0  # the request's estimated prompt tokens
    expected_s: float = 0.0  # how long it should hold the slot (routing's estimate)
    lands_on: int | None = None  # the slot llama-server should give it, pinned or not
    started_at: float = field(default_factory=time.monotonic)
    # Its work, so the estimate can be made again as the backend's speeds are learned: the
    # prompt tokens it should compute and the most it may answer.
    uncached_tokens: int = 0
    max_tokens: int = 0

    def remaining_s(self, now: float, expected_s: float | None = None) -> float:
        """How long it should still hold the slot, by `expected_s` (its estimate made again
        now) or the one made when it was claimed. One that has outrun its estimate is not
        about to end for that: it is taken to need half its estimate again."""
        expected = self.expected_s if expected_s is None else expected_s
        left = self.started_at + expected - now
        return left if left > 0 else expected / 2


class SlotLedger(Protocol):
    """One backend's slots: how many there are, who holds them, and what it reports busy."""

    @property
    def total(self) -> int: ...

    @property
    def in_flight(self) -> int: ...

    @property
    def in_flight_tokens(self) -> int: ...

    @property
    def external_busy(self) -> int: ...

    @property
    def elsewhere(self) -> int: ...

    @property
    def busy(self) -> int: ...

    @property
    def free(self) -> int: ...

    @property
    def claims(self) -> frozenset[Claim]: ...

    def claim_on(self, slot_id: int) -> Claim | None:
        """Our claim whose request should be on llama-server's slot `slot_id`, if any."""
        ...

    def shared(self, elsewhere: int, split: int | None) -> bool:
        """Other balancer replicas hold `elsewhere` slots; or, when they cannot be asked
        (`split`: how many replicas there are), this one takes at most its share. True when
        free capacity changed."""
        ...

    def try_claim(
        self,
        slot_id: int | None = None,
        tokens: int = 0,
        expected_s: float = 0.0,
        lands_on: int | None = None,
        work: tuple[int, int] = (0, 0),
    ) -> Claim | None:
        """A claim on a free slot (that one, if `slot_id` is given), or None. `work`: the
        prompt tokens it should compute and its `max_tokens`."""
        ...

    async def release(self, claim: Claim) -> None:
        """Give the slot back; awaited, so the next drain sees it free."""
        ...

    @property
    def freed(self) -> int:
        """How many slots have been given back so far, ours and other replicas'."""
        ...

    def observe(
        self, total: int, busy_on_backend: int, freed_when_asked: int | None = None
    ) -> bool:
        """Reconcile with the backend's own view, read when `freed` was `freed_when_asked`;
        True when free capacity changed."""
        ...

    async def wait_idle(self) -> None:
        """Wait until none of our requests is in flight (used to drain a backend)."""
        ...


class SlotTracker:
    """A `SlotLedger` in this process; `try_claim()` and `release()` are the only ways to change
    it. The scheduler claims with `try_claim()` rather than blocking on one backend, because it
    chooses among all backends for the head of one global queue.
    """

    def __init__(self, backend: str = "", on_release: Callable[[], None] | None = None) -> None:
        self.backend = backend
        self.total = 0
        self.external_busy = 0
        self.elsewhere = 0  # held by other balancer replicas (shared state)
        self.split: int | None = None  # those cannot be asked: our share is total / split
        self.freed = 0
        self._claims: set[Claim] = set()
        # Kept as claims come and go: a routing decision reads them with thousands in flight.
        self._tokens = 0
        self._landed: dict[int, Claim] = {}
        self._on_release = on_release
        self._changed = asyncio.Condition()

    @property
    def in_flight(self) -> int:
        return len(self._claims)

    @property
    def busy(self) -> int:
        return min(self.total, self.in_flight + self.elsewhere + self.external_busy)

    @property
    def free(self) -> int:
        free = self.total - self.in_flight - self.elsewhere - self.external_busy
        if self.split is not None:
            free = min(free, -(-self.total // self.split) - self.in_flight)
        return max(0, free)

    @property
    def in_flight_tokens(self) -> int:
        return self._tokens

    @property
    def claims(self) -> frozenset[Claim]:
        return frozenset(self._claims)

    def claim_on(self, slot_id: int) -> Claim | None:
        return self._landed.get(slot_id)

    def try_claim(
        self,
        slot_id: int | None = None,
        tokens: int = 0,
        expected_s: float = 0.0,
        lands_on: int | None = None,
        work: tuple[int, int] = (0, 0),
    ) -> Claim | None:
        if self.free <= 0:
            return None
        if slot_id is not None and (
            not 0 <= slot_id < self.total or any(c.slot_id == slot_id for c in self._claims)
        ):
            return None
        claim = Claim(
            self.backend,
            slot_id,
            tokens,
            expected_s,
            lands_on,
            uncached_tokens=work[0],
            max_tokens=work[1],
        )
        self._claims.add(claim)
        self._tokens += tokens
        if lands_on is not None:
            self._landed[lands_on] = claim
        return claim

    async def release(self, claim: Claim) -> None:
        # Awaited, never spawned as a task: the scheduler must see the freed slot before it
        # next checks for room, or a queued request can wait for a slot that is already free.
        if claim not in self._claims:
            raise RuntimeError("release() of a claim this ledger does not hold")
        self._claims.discard(claim)
        self.freed += 1
        self._tokens -= claim.tokens
        if claim.lands_on is not None and self._landed.get(claim.lands_on) is claim:
            del self._landed[claim.lands_on]
        async with self._changed:
            self._changed.notify_all()
        if self._on_release is not None:
            self._on_release()

    def observe(
        self, total: int, busy_on_backend: int, freed_when_asked: int | None = None
    ) -> bool:
        before = self.free
        self.total = max(0, total)
        if self.split is not None:
            # The other replicas cannot be asked: from now on, what the backend reports busy
            # beside our requests is all we know of theirs.
            self.elsewhere = 0
        # Requests we sent that the backend has not started yet make busy_on_backend smaller
        # than in_flight; only the excess is traffic that reached it around us (or around
        # every replica: what the others hold is counted apart).
        most = max(0, busy_on_backend - self.in_flight - self.elsewhere)
        # Slots freed while the read was on its way may still be busy in it, or not: the
        # traffic around us is then between `least` and `most`. The last estimate stands
        # where it lies between them: counting those slots busy would keep a free slot idle
        # until the next poll (and a request queued at another replica would lose its turn
        # to a younger one); counting them free could overfill the backend when the traffic
        # around us has grown.
        stale = 0 if freed_when_asked is None else self.freed - freed_when_asked
        least = max(0, most - stale)
        self.external_busy = min(most, max(least, self.external_busy))
        return self.free != before

    def shared(self, elsewhere: int, split: int | None) -> bool:
        before = self.free
        elsewhere = max(0, elsewhere)
        self.freed += max(0, self.elsewhere - elsewhere)
        self.elsewhere = elsewhere
        self.split = split
        return self.free != before

    async def wait_idle(self) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.in_flight == 0)
