"""The one global FIFO of requests waiting for a slot, and the `Lease` each is given."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .policies import RoutingRequest
    from .registry import BackendState
    from .server_cache import CachedPrompt
    from .slot_ledger import Claim


class Lease:
    """One claimed slot on `backend`; `release()` is idempotent so every exit path may call it."""

    def __init__(
        self,
        backend: BackendState,
        claim: Claim,
        queue_wait_s: float,
        predicted_depth: int = 0,
        predicted_tokens: int = 0,
    ) -> None:
        self.backend = backend
        self.claim = claim
        self.queue_wait_s = queue_wait_s
        self.arrived_at = time.monotonic()  # when its request first queued
        self.model: str | None = None  # the model its request asked for
        self.waited = False  # its request waited in the queue before it was placed
        # What routing expected the backend to hold of the prompt: keys, and tokens; and the
        # prompt as the backend's cache shadow holds it.
        self.predicted_depth = predicted_depth
        self.predicted_tokens = predicted_tokens
        self.cached_prompt: CachedPrompt | None = None
        self.restores: CachedPrompt | None = None  # the saved state the shadow expects back
        # Shared state (several replicas): the lease's id there, and who gives it back.
        self.shared_id: str | None = None
        self.on_release: Callable[[Lease], None] | None = None
        self.released = False

    @property
    def backend_name(self) -> str:
        return self.backend.name

    async def release(self) -> None:
        if not self.released:
            self.released = True
            if self.claim.lands_on is not None:
                self.backend.caches.release(self.claim.lands_on, time.monotonic())
            await self.backend.slots.release(self.claim)
            if self.on_release is not None:
                self.on_release(self)


@dataclass(eq=False)
class QueueEntry:
    """A request waiting for a backend; the scheduler resolves `future` with the slot it claimed."""

    routing: RoutingRequest
    priority: int = 0
    enqueued_at: float = field(default_factory=time.monotonic)
    # Reordering: how often a later request took a slot it could have had, and since when;
    # and since when it has chosen to wait for a busy backend that holds its prompt.
    passed: int = 0
    passed_at: float | None = None
    cache_wait_since: float | None = None
    # It was not placed as it arrived: it waits (or waited) its turn, for the fleet-wide order.
    waited: bool = False
    # No default future: it must be created on the running loop by whoever enqueues.
    future: asyncio.Future[Lease] | None = None


class RequestQueue:
    """Entries in FIFO order within each priority (higher first), with O(1) removal from
    anywhere (timeouts, disconnects). Appending at equal priority, the common case, is O(1)."""

    def __init__(self) -> None:
        self._entries: dict[QueueEntry, None] = {}
        self.wakeup = asyncio.Event()

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[QueueEntry]:
        # A copy, so the scheduler may remove entries while it walks them.
        return iter(list(self._entries))

    def __contains__(self, entry: object) -> bool:
        return entry in self._entries

    def put(self, entry: QueueEntry, *, front: bool = False) -> None:
        """Queue `entry` behind every entry of its priority or higher (`front`: before them)."""
        last = next(reversed(self._entries), None)
        if not front and (last is None or last.priority >= entry.priority):
            self._entries[entry] = None
            return
        ordered = list(self._entries)
        if front:
            position = next(
                (i for i, e in enumerate(ordered) if e.priority <= entry.priority), len(ordered)
            )
        else:
            position = next(
                (i for i, e in enumerate(ordered) if e.priority < entry.priority), len(ordered)
            )
        ordered.insert(position, entry)
        self._entries = dict.fromkeys(ordered)

    def first(self) -> QueueEntry | None:
        """The entry served next, without the copy that iterating makes."""
        return next(iter(self._entries), None)

    def remove(self, entry: QueueEntry) -> None:
        self._entries.pop(entry, None)

    def oldest_wait_s(self) -> float:
        first = next(iter(self._entries), None)
        return 0.0 if first is None else time.monotonic() - first.enqueued_at
