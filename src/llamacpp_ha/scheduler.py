"""Hands queued requests to backends with a free slot, in FIFO order.

`acquire()` enqueues a request and waits; the drain walks the queue from the front and gives
each entry a backend chosen by the policy among those that serve its model and have room. An
entry that cannot be placed does not block later entries for other models.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import replace

from .errors import NoCapacity, NoHealthyBackend, QueueFull, QueueTimeout
from .policies import BackendCandidate, Policy, RoutingRequest
from .queue import QueueEntry, RequestQueue
from .registry import BackendState, Registry
from .session_store import SessionStore

log = logging.getLogger("llamacpp_ha.scheduler")


class Lease:
    """One claimed slot on `backend`; `release()` is idempotent so every exit path may call it."""

    def __init__(self, backend: BackendState, queue_wait_s: float) -> None:
        self.backend = backend
        self.queue_wait_s = queue_wait_s
        self.released = False

    async def release(self) -> None:
        if not self.released:
            self.released = True
            await self.backend.slots.release()


class Scheduler:
    """Owns the drain task; the queue and the slot counts are the state it works on."""

    def __init__(
        self,
        queue: RequestQueue,
        registry: Registry,
        policy: Policy,
        sessions: SessionStore,
        max_queue: int,
    ) -> None:
        self._queue = queue
        self._registry = registry
        self.policy = policy
        self._sessions = sessions
        self.max_queue = max_queue
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="scheduler")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def notify_slot_released(self) -> None:
        self._queue.wakeup.set()

    def can_serve(self, routing: RoutingRequest) -> bool:
        """True when some ready backend may take this request, now or once a slot frees."""
        return bool(self._eligible(routing))

    def reject_all(self, error: NoCapacity) -> int:
        """Fail every queued request with `error` (shutting down); the number failed."""
        failed = 0
        for entry in self._queue:
            self._queue.remove(entry)
            if entry.future is not None and not entry.future.done():
                entry.future.set_exception(error)
                failed += 1
        return failed

    async def acquire(
        self, routing: RoutingRequest, timeout_s: float, *, retry: bool = False, priority: int = 0
    ) -> Lease:
        """Wait for a slot on a backend that serves `routing.model`; raise NoCapacity if none."""
        if not self.can_serve(routing):
            raise _no_backend(routing)
        entry = QueueEntry(routing=routing, priority=priority)
        entry.future = asyncio.get_running_loop().create_future()
        # A retry has already waited its turn once, so it goes to the front.
        self._queue.put(entry, front=retry)
        self._drain()
        if not entry.future.done() and len(self._queue) > self.max_queue:
            self._queue.remove(entry)
            raise QueueFull(f"the queue is full ({self.max_queue} requests waiting)")
        try:
            backend = await asyncio.wait_for(asyncio.shield(entry.future), timeout_s)
        except TimeoutError:
            self._queue.remove(entry)
            if not entry.future.done():
                entry.future.cancel()
                raise QueueTimeout(
                    f"no slot became free within {timeout_s:g} s",
                    retry_after_s=max(1, math.ceil(timeout_s / 4)),
                ) from None
            backend = entry.future.result()  # placed just as the timeout fired: use it
        except asyncio.CancelledError:
            self._queue.remove(entry)
            placed = entry.future.done() and not entry.future.cancelled()
            if placed and entry.future.exception() is None:
                await entry.future.result().slots.release()
            else:
                entry.future.cancel()
            raise
        return Lease(backend, queue_wait_s=time.monotonic() - entry.enqueued_at)

    def _eligible(self, routing: RoutingRequest) -> list[BackendState]:
        return [
            b
            for b in self._registry.backends
            if b.routable
            and b.name not in routing.exclude
            and self._registry.serves(b, routing.model)
        ]

    async def _run(self) -> None:
        while True:
            await self._queue.wakeup.wait()
            self._queue.wakeup.clear()
            self._drain()

    def _drain(self) -> None:
        # Most queued requests share a model and exclude nothing: compute each distinct
        # eligibility once per drain, not once per entry.
        eligible_for: dict[tuple[str | None, frozenset[str]], list[BackendState]] = {}
        for entry in self._queue:
            assert entry.future is not None
            if entry.future.done():  # cancelled by its waiter; it removes itself
                continue
            key = (entry.routing.model, entry.routing.exclude)
            if key not in eligible_for:
                eligible_for[key] = self._eligible(entry.routing)
            eligible = eligible_for[key]
            if not eligible:
                # Every backend that could serve it is down: fail now rather than let it wait
                # out its timeout for a capacity that is not coming back soon.
                self._queue.remove(entry)
                entry.future.set_exception(_no_backend(entry.routing))
                continue
            backend = self._place(entry.routing, eligible)
            if backend is not None:
                self._queue.remove(entry)
                entry.future.set_result(backend)

    def _place(self, routing: RoutingRequest, eligible: list[BackendState]) -> BackendState | None:
        if not any(b.slots.free > 0 for b in eligible):
            return None
        candidates = [
            BackendCandidate(name=b.name, free_slots=b.slots.free, total_slots=b.slots.total)
            for b in eligible
        ]
        preferred = self._sessions.lookup(routing.prefix_keys)
        if preferred is not None:
            routing = replace(routing, preferred_backend=preferred)
        choice = self.policy.select(candidates, routing)
        if choice is None:
            return None
        backend = next(b for b in eligible if b.name == choice)
        # Choosing and claiming happen with no await in between: on one event loop nothing
        # else can take this slot, so select-and-claim is atomic.
        if not backend.slots.try_claim():
            raise RuntimeError(f"policy chose {choice}, which has no free slot")
        return backend


def _no_backend(routing: RoutingRequest) -> NoHealthyBackend:
    if routing.model:
        return NoHealthyBackend(f"no ready backend serves model {routing.model!r}")
    return NoHealthyBackend("no backend is ready")
