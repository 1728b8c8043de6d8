"""Hands queued requests to backends with a free slot, in FIFO order.

`acquire()` enqueues a request and waits; the drain walks the queue from the front and gives
each entry a backend chosen by the policy among those that serve its model and have room. An
entry that cannot be placed does not block later entries for other models.

What the policy sees is a `RoutingView`, built once per drain: per backend its slots, our
requests and their tokens in flight, its slots' context size, and, per request, what the prefix
index says the backend holds of its prompt. A policy that raises or names a backend it may not
have is logged and overruled by least busy for that request; the drain itself is supervised, so
a failure in it never leaves the queue unattended.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import replace

from .errors import NoCapacity, NoHealthyBackend, QueueFull, QueueTimeout
from .policies import BackendCandidate, LeastBusyPolicy, Policy, RoutingRequest
from .prefix_index import PrefixIndex
from .queue import Lease, QueueEntry, RequestQueue
from .registry import BackendState, Registry
from .slot_ledger import Claim

__all__ = ["Lease", "RoutingView", "Scheduler"]

log = logging.getLogger("llamacpp_ha.scheduler")


class RoutingView:
    """The fleet as routing sees it during one drain; kept current as the drain claims slots."""

    def __init__(self, backends: Sequence[BackendState], index: PrefixIndex) -> None:
        self._index = index
        self._seen = {
            b.name: BackendCandidate(
                name=b.name,
                free_slots=b.slots.free,
                total_slots=b.slots.total,
                in_flight=b.slots.in_flight,
                in_flight_tokens=b.slots.in_flight_tokens,
                n_ctx=b.n_ctx,
            )
            for b in backends
        }

    def has_room(self, backends: Sequence[BackendState]) -> bool:
        return any(self._seen[b.name].free_slots > 0 for b in backends)

    def candidates(
        self, backends: Sequence[BackendState], routing: RoutingRequest
    ) -> list[BackendCandidate]:
        held = self._index.match(routing.prefix_keys) if routing.prefix_keys else {}
        seen = [self._seen[b.name] for b in _fitting(backends, routing)]
        return [replace(c, prefix_match=held.get(c.name, 0)) for c in seen]

    def has_room_for(self, backends: Sequence[BackendState], routing: RoutingRequest) -> bool:
        return self.has_room(_fitting(backends, routing))

    def claimed(self, claim: Claim) -> None:
        seen = self._seen[claim.backend]
        self._seen[claim.backend] = replace(
            seen,
            free_slots=seen.free_slots - 1,
            in_flight=seen.in_flight + 1,
            in_flight_tokens=seen.in_flight_tokens + claim.tokens,
        )


class Scheduler:
    """Owns the drain task; the queue and the slot ledgers are the state it works on."""

    def __init__(
        self,
        queue: RequestQueue,
        registry: Registry,
        policy: Policy,
        index: PrefixIndex,
        max_queue: int,
    ) -> None:
        self._queue = queue
        self._registry = registry
        self.policy = policy
        self._index = index
        self.max_queue = max_queue
        # Overrules a policy that fails: it always answers, and only with a free candidate.
        self._fallback = LeastBusyPolicy()
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
        self._drain_supervised()
        if not entry.future.done() and len(self._queue) > self.max_queue:
            self._queue.remove(entry)
            raise QueueFull(f"the queue is full ({self.max_queue} requests waiting)")
        try:
            return await asyncio.wait_for(asyncio.shield(entry.future), timeout_s)
        except TimeoutError:
            self._queue.remove(entry)
            if not entry.future.done():
                entry.future.cancel()
                raise QueueTimeout(
                    f"no slot became free within {timeout_s:g} s",
                    retry_after_s=max(1, math.ceil(timeout_s / 4)),
                ) from None
            return entry.future.result()  # placed just as the timeout fired: use it
        except asyncio.CancelledError:
            self._queue.remove(entry)
            placed = entry.future.done() and not entry.future.cancelled()
            if placed and entry.future.exception() is None:
                await entry.future.result().release()
            else:
                entry.future.cancel()
            raise

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
            self._drain_supervised()

    def _drain_supervised(self) -> None:
        try:
            self._drain()
        except Exception as exc:  # a bug must not leave the queue unattended
            where = exc.__traceback__.tb_frame.f_code.co_name if exc.__traceback__ else "?"
            log.error(
                "scheduler: the drain failed (%s in %s); it runs again at the next wake-up",
                type(exc).__name__,
                where,
            )
            self._queue.wakeup.set()

    def _drain(self) -> None:
        view: RoutingView | None = None
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
            if view is None:
                view = RoutingView(self._registry.backends, self._index)
            lease = self._place(entry, eligible, view)
            if lease is not None:
                self._queue.remove(entry)
                entry.future.set_result(lease)

    def _place(
        self, entry: QueueEntry, eligible: list[BackendState], view: RoutingView
    ) -> Lease | None:
        routing = entry.routing
        if not view.has_room_for(eligible, routing):
            return None
        candidates = view.candidates(eligible, routing)
        choice = self._choose(candidates, routing)
        if choice is None:
            return None
        backend = next(b for b in eligible if b.name == choice)
        # Choosing and claiming happen with no await in between: on one event loop nothing
        # else can take this slot, so select-and-claim is atomic.
        claim = backend.slots.try_claim(tokens=routing.prompt_tokens)
        if claim is None:
            raise RuntimeError(f"{choice} was chosen with a free slot and had none")
        view.claimed(claim)
        return Lease(backend, claim, queue_wait_s=time.monotonic() - entry.enqueued_at)

    def _choose(self, candidates: list[BackendCandidate], routing: RoutingRequest) -> str | None:
        try:
            choice = self.policy(candidates, routing)
        except Exception as exc:
            log.error(
                "routing policy failed (%s); least busy places this request", type(exc).__name__
            )
            return self._fallback(candidates, routing)
        if choice is None or any(c.name == choice and c.free_slots > 0 for c in candidates):
            return choice
        log.error(
            "routing policy chose %r, not a candidate with a free slot; least busy places "
            "this request",
            choice,
        )
        return self._fallback(candidates, routing)


def _fitting(backends: Sequence[BackendState], routing: RoutingRequest) -> Sequence[BackendState]:
    """Context fit: never a backend whose slots cannot hold the request while another's can;
    when none can, the largest, whose answer (llama-server's exceed_context_size_error) is the
    client's. A backend that does not report its context size is taken to fit."""
    needed = routing.prompt_tokens + routing.max_tokens
    if not needed or all(b.n_ctx is None or b.n_ctx >= needed for b in backends):
        return backends
    fitting = [b for b in backends if b.n_ctx is None or b.n_ctx >= needed]
    if fitting:
        return fitting
    largest = max(b.n_ctx or 0 for b in backends)
    return [b for b in backends if b.n_ctx == largest]


def _no_backend(routing: RoutingRequest) -> NoHealthyBackend:
    if routing.model:
        return NoHealthyBackend(f"no ready backend serves model {routing.model!r}")
    return NoHealthyBackend("no backend is ready")
