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
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace

from .errors import ModelLoadFailed, NoCapacity, NoHealthyBackend, QueueFull, QueueTimeout
from .model_loads import ModelLoads
from .pinning import choose_slot
from .policies import (
    BackendCandidate,
    CostModel,
    LeastBusyPolicy,
    Policy,
    RoutingRequest,
    RoutingSettings,
)
from .prefix_index import PrefixIndex, PromptKeys
from .queue import Lease, QueueEntry, RequestQueue
from .registry import BackendState, Registry
from .server_cache import CachedPrompt, ServerCaches
from .slot_ledger import Claim, SlotLedger
from .speeds import Speeds

__all__ = ["Lease", "RoutingView", "Scheduler"]

log = logging.getLogger("llamacpp_ha.scheduler")


class RoutingView:
    """The fleet as routing sees it during one drain; kept current as the drain claims slots."""

    def __init__(
        self, backends: Sequence[BackendState], index: PrefixIndex, now: float | None = None
    ) -> None:
        self._index = index
        self._now = time.monotonic() if now is None else now
        # A backend not yet measured is taken to work like the measured ones, on average:
        # a stand-in figure against a measured one would decide by the difference.
        self._speeds = speeds = _like_the_fleet(backends)
        self._caches: dict[str, ServerCaches] = {}
        self._ledgers: dict[str, SlotLedger] = {}
        self._seen: dict[str, _Seen] = {}
        for b in backends:  # one pass: a drain builds this for every backend, each time
            name, slots, shadow = b.name, b.slots, b.caches
            per_byte = speeds[name].tokens_per_byte
            if shadow.tokens_per_byte != per_byte:  # most drains: unchanged, nothing to do
                shadow.track(per_byte)
            self._caches[name] = shadow
            self._ledgers[name] = slots
            self._seen[name] = _Seen(
                slots.free,
                slots.total,
                slots.in_flight,
                slots.in_flight_tokens,
                b.n_ctx,
                speeds[name].prefill_tps,
            )
        self._frees: dict[str, list[float]] = {}  # per busy backend: when its slots free
        self._waiting: dict[str, int] = {}  # requests that chose to wait for it, this drain
        self._held: dict[PromptKeys, dict[str, int]] = {}
        self._prompts: dict[tuple[int, float, int], CachedPrompt] = {}

    def has_room(self, backends: Sequence[BackendState]) -> bool:
        return any(self._seen[b.name].free_slots > 0 for b in backends)

    def candidates(
        self, backends: Sequence[BackendState], routing: RoutingRequest
    ) -> list[BackendCandidate]:
        prompt = routing.prompt
        held = self._held.get(prompt)
        if held is None:
            held = self._held[prompt] = self._index.match(prompt.keys) if prompt.keys else {}
        out = []
        # Backends that count tokens alike (the same model, or not yet measured) share the
        # prompt's size in tokens and its shape for the cache shadow: made once per ratio.
        per_byte_seen: float | None = None
        tokens = 0
        cprompt: CachedPrompt | None = None
        for b in _fitting(backends, routing):
            name = b.name
            seen = self._seen[name]
            per_byte = self._speeds[name].tokens_per_byte
            if per_byte != per_byte_seen:
                per_byte_seen, cprompt = per_byte, None
                tokens = round(prompt.size * per_byte) if prompt.size else routing.prompt_tokens
            depth = held.get(name, 0)
            free = seen.free_slots
            cached = later = 0
            later_wait = 0.0
            if depth:
                # What llama-server's own rules make of what it holds: its cache shadow.
                shadow = self._caches[name]
                if cprompt is None:
                    cprompt = self.cached_prompt(routing, name, per_byte, tokens)
                prediction = shadow.predict(cprompt) if free > 0 else None
                cached = prediction.reused if prediction else shadow.best_held(cprompt)
                if free > 0:
                    later, later_wait = self._held_busy(name, cprompt)
            # Positional: a named tuple built from keywords costs a third more.
            out.append(
                BackendCandidate(
                    name,
                    free,
                    seen.total_slots,
                    seen.in_flight,
                    seen.in_flight_tokens,
                    seen.n_ctx,
                    depth,  # prefix_match
                    cached,  # cached_tokens
                    tokens,  # prompt_tokens
                    seen.prefill_tps,
                    0.0 if free > 0 else self._wait_s(name),  # wait_s
                    later,  # later_cached_tokens
                    later_wait,  # later_wait_s
                )
            )
        return out

    def cached_prompt(
        self, routing: RoutingRequest, backend: str, per_byte: float | None = None, tokens: int = 0
    ) -> CachedPrompt:
        """The request's prompt in `backend`'s tokens, as its cache shadow takes it."""
        if per_byte is None:
            per_byte = self._speeds[backend].tokens_per_byte
            size = routing.prompt.size
            tokens = round(size * per_byte) if size else routing.prompt_tokens
        # Backends that count tokens alike (the same model, or not yet measured) share it.
        key = (id(routing.prompt), per_byte, tokens)
        found = self._prompts.get(key)
        if found is None:
            prompt = routing.prompt
            found = self._prompts[key] = CachedPrompt(
                prompt.keys, tuple([round(end * per_byte) for end in prompt.ends]), tokens
            )
        return found

    def _held_busy(self, backend: str, prompt: CachedPrompt) -> tuple[int, float]:
        """The most of `prompt` a busy slot of `backend` is computing or holds, and when that
        slot should free (its request's remaining time)."""
        holders = self._caches[backend].busy_holders(prompt)
        if not holders:
            return 0, 0.0
        ledger = self._ledgers[backend]
        cap = max(prompt.length - 1, 0)
        # Busy slots grouped by what they hold (not every claim, not every slot: thousands may
        # be in flight); only those our claims landed on; the lowest slot id wins a tie.
        best, best_claim, best_id = 0, None, -1
        for shared, group in holders:
            shared = min(shared, cap)
            if shared < best:
                break
            for slot in group:
                claim = ledger.claim_on(slot.id)
                if claim is not None:
                    if shared > best or slot.id < best_id:
                        best, best_claim, best_id = shared, claim, slot.id
                    break
        if best_claim is None:
            return 0, 0.0
        return best, self._remaining_s(backend, best_claim)

    def _remaining_s(self, backend: str, claim: Claim) -> float:
        """How long `claim` should still hold its slot, by what `backend` is known to do now:
        estimates made before the backend was measured (the stand-in figures) are made again."""
        speeds = self._speeds[backend]
        return claim.remaining_s(
            self._now, speeds.expected_s(claim.uncached_tokens, claim.max_tokens)
        )

    def has_room_for(self, backends: Sequence[BackendState], routing: RoutingRequest) -> bool:
        return self.has_room(_fitting(backends, routing))

    def _wait_s(self, backend: str) -> float:
        """Until a slot frees on `backend` for the next request that waits for it: the slots
        free in the order their requests should end; requests already waiting go first."""
        frees = self._frees.get(backend)
        speeds = self._speeds[backend]
        typical = speeds.expected_s(0, 0)
        if frees is None:
            ledger = self._ledgers[backend]
            frees = sorted(self._remaining_s(backend, c) for c in ledger.claims)
            frees += [typical] * ledger.external_busy  # not ours: how long, we cannot know
            self._frees[backend] = frees = frees or [typical]
        ahead = self._waiting.get(backend, 0)
        rounds, position = divmod(ahead, len(frees))
        return frees[position] + rounds * typical

    def waits_for(self, backend: str) -> None:
        self._waiting[backend] = self._waiting.get(backend, 0) + 1

    def claimed(self, claim: Claim) -> None:
        seen = self._seen[claim.backend]
        seen.free_slots -= 1
        seen.in_flight += 1
        seen.in_flight_tokens += claim.tokens
        self._frees.pop(claim.backend, None)


@dataclass(slots=True)
class _Seen:
    """One backend as this drain sees it: changed as the drain claims its slots. The policy
    gets a frozen `BackendCandidate` of it, built only for the backends it is asked about."""

    free_slots: int
    total_slots: int
    in_flight: int
    in_flight_tokens: int
    n_ctx: int | None
    prefill_tps: float


@dataclass
class RoutingStats:
    """What reordering and waiting for a cached backend cost, for /stats and the monitor."""

    reordered: int = 0  # times a later request took a slot the one ahead could have had
    max_reorder_delay_s: float = 0.0  # the most a request waited after it was first passed
    cache_waits: int = 0  # requests that waited for a busy backend holding their prompt
    max_cache_wait_s: float = 0.0
    pinned: int = 0  # requests sent with id_slot


@dataclass
class _Decision:
    """Where one request would go now, with what routing saw of each candidate."""

    entry: QueueEntry
    routing: RoutingRequest
    eligible: list[BackendState]
    candidates: list[BackendCandidate]
    choice: str | None
    model: CostModel | None = None  # the policy, when it can say when a request starts

    @functools.cached_property
    def costs(self) -> list[float]:
        """What the cost model weighs per candidate; asked only when needed (a request that
        waits, or reordering), as most decisions place the request at once."""
        assert self.model is not None
        return self.model.costs(self.candidates, self.routing)

    @functools.cached_property
    def starts(self) -> list[float]:
        assert self.model is not None
        return self.model.starts(self.candidates)

    def gain(self, backend: str) -> float:
        """How much sooner the request starts on `backend` than anywhere else (0 unknown)."""
        if self.model is None:
            return 0.0
        here = math.inf
        elsewhere = math.inf
        for c, cost in zip(self.candidates, self.starts, strict=True):
            if c.name == backend:
                here = cost
            else:
                elsewhere = min(elsewhere, cost)
        if math.isinf(here) or math.isinf(elsewhere):
            return 0.0
        return elsewhere - here


class Scheduler:
    """Owns the drain task; the queue and the slot ledgers are the state it works on."""

    def __init__(
        self,
        queue: RequestQueue,
        registry: Registry,
        policy: Policy,
        index: PrefixIndex,
        max_queue: int,
        settings: RoutingSettings | None = None,
    ) -> None:
        self._queue = queue
        self._registry = registry
        self._cost_model: CostModel | None = None
        self.policy = policy
        self._index = index
        self.max_queue = max_queue
        self.settings = settings or RoutingSettings()
        self.stats = RoutingStats()
        # Overrules a policy that fails: it always answers, and only with a free candidate.
        self._fallback = LeastBusyPolicy()
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._failing_at: str | None = None  # where the last drain failed
        # Several replicas (replicas.py): takes a lease claimed here in shared state too
        # ("taken", "full", "older"), and hears when the queue has changed.
        self.confirm: Callable[[Lease, int], Awaitable[str]] | None = None
        self.queue_changed: Callable[[], None] | None = None
        self.unconfirmed: set[Lease] = set()  # placed, and waiting for `confirm`
        # Router-mode servers (model_loads.py): a model loaded nowhere is loaded, once.
        self.loads: ModelLoads | None = None

    @property
    def policy(self) -> Policy:
        return self._policy

    @policy.setter
    def policy(self, policy: Policy) -> None:
        # Asked once here, not per decision: isinstance() on a runtime Protocol is slow.
        self._policy = policy
        self._cost_model = policy if isinstance(policy, CostModel) else None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="scheduler")

    async def aclose(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def notify_slot_released(self) -> None:
        self._queue.wakeup.set()

    def can_serve(self, routing: RoutingRequest) -> bool:
        """True when some ready backend may take this request, now or once a slot frees, or
        once a router-mode server has loaded its model."""
        if self._eligible(routing):
            return True
        return self.loads is not None and self.loads.loadable(routing.model)

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
        """Wait for a slot on a backend that serves `routing.model`; raise NoCapacity if none.

        With other replicas (`confirm` set), the slot claimed here is then taken in shared
        state; if another replica took it first, the request waits again at the front."""
        started = time.monotonic()
        front = retry  # a retry has already waited its turn once, so it goes to the front
        deferred = 0
        while True:
            left = timeout_s - (time.monotonic() - started)
            lease = await self._queued(
                routing, max(left, 0.001), timeout_s, front, priority, started
            )
            if self.confirm is None:
                return lease
            try:
                outcome = await self.confirm(lease, deferred)
            except BaseException:
                await lease.release()
                raise
            finally:
                self.unconfirmed.discard(lease)
                # No longer waiting, for the fleet-wide order; told after the discard, or
                # shared state could keep it as our oldest waiting request.
                if self.queue_changed is not None:
                    self.queue_changed()
            if outcome == "taken":
                lease.queue_wait_s = time.monotonic() - started
                return lease
            await lease.release()
            deferred += outcome == "older"
            front = True

    async def _queued(
        self,
        routing: RoutingRequest,
        left_s: float,
        timeout_s: float,
        front: bool,
        priority: int,
        arrived_at: float,
    ) -> Lease:
        if not self.can_serve(routing):
            raise _no_backend(routing)
        # Waiting again after shared state said no: it keeps its arrival, so its age counts.
        entry = QueueEntry(routing=routing, priority=priority, enqueued_at=arrived_at, waited=front)
        entry.future = asyncio.get_running_loop().create_future()
        self._queue.put(entry, front=front)
        self._drain_supervised()
        entry.waited = True  # if a later drain places it
        if entry.future.done() and self.confirm is None:
            # Placed (or refused) by that drain: nothing to wait for. Not with other replicas:
            # a request told to give way must let the loop run before it claims again.
            return entry.future.result()
        if len(self._queue) > self.max_queue:
            self._queue.remove(entry)
            raise QueueFull(f"the queue is full ({self.max_queue} requests waiting)")
        try:
            return await asyncio.wait_for(asyncio.shield(entry.future), left_s)
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
                self.unconfirmed.discard(entry.future.result())
                await entry.future.result().release()
            else:
                entry.future.cancel()
            raise

    def _eligible(self, routing: RoutingRequest) -> list[BackendState]:
        exclude = routing.exclude
        return [
            b for b in self._registry.serving(routing.model) if b.routable and b.name not in exclude
        ]

    async def _run(self) -> None:
        while True:
            await self._queue.wakeup.wait()
            self._queue.wakeup.clear()
            self._drain_supervised()

    def _drain_supervised(self) -> None:
        try:
            self._drain()
            if self.queue_changed is not None:
                self.queue_changed()
            self._failing_at = None
        except Exception as exc:  # a bug must not leave the queue unattended
            # Where it was raised: the innermost frame (the outermost is this one).
            tb = exc.__traceback__
            while tb is not None and tb.tb_next is not None:
                tb = tb.tb_next
            where = f"{tb.tb_frame.f_code.co_name}:{tb.tb_lineno}" if tb is not None else "?"
            # The first failure at a place is an error; its repeats, debug (it runs again soon,
            # and a bug that fails every drain must not flood the log or spin the loop).
            log.log(
                logging.DEBUG if where == self._failing_at else logging.ERROR,
                "scheduler: the drain failed (%s in %s); it runs again shortly",
                type(exc).__name__,
                where,
            )
            self._failing_at = where
            asyncio.get_running_loop().call_later(_RETRY_DRAIN_S, self._queue.wakeup.set)

    def _drain(self) -> None:
        now = time.monotonic()
        view: RoutingView | None = None
        # Most queued requests share a model and exclude nothing: compute each distinct
        # eligibility once per drain, not once per entry.
        eligible_for: dict[tuple[str | None, frozenset[str]], list[BackendState]] = {}
        entries = [e for e in self._queue if e.future is not None and not e.future.done()]
        if self.loads is not None:
            self.loads.settle({e.routing.model for e in entries})
        done: set[QueueEntry] = set()
        wake_at: float | None = None
        for position, entry in enumerate(entries):
            if entry in done:
                continue
            key = (entry.routing.model, entry.routing.exclude)
            if key not in eligible_for:
                eligible_for[key] = self._eligible(entry.routing)
            eligible = eligible_for[key]
            if not eligible and self.loads is not None and self.loads.loadable(key[0]):
                # Loaded nowhere: it waits while a router-mode server loads it, once.
                assert key[0] is not None
                why = self.loads.waiting_for(key[0])
                if why is not None:
                    self._queue.remove(entry)
                    assert entry.future is not None
                    entry.future.set_exception(ModelLoadFailed(why))
                continue
            if not eligible:
                # Every backend that could serve it is down: fail now rather than let it wait
                # out its timeout for a capacity that is not coming back soon.
                self._queue.remove(entry)
                assert entry.future is not None
                entry.future.set_exception(_no_backend(entry.routing))
                continue
            if view is None:
                view = RoutingView(self._registry.backends, self._index, now)
            while True:
                decision = self._decide(entry, eligible, view, now)
                if decision is None or decision.choice is None:
                    break
                taker = self._better_taker(decision, entries[position + 1 :], done, view, now)
                if taker is None:
                    self._place(decision, view, now)
                    break
                # A request just behind gains more from this backend: it takes the slot, and
                # this one is considered again (another backend, or the next slot to free).
                self._place(taker, view, now)
                done.add(taker.entry)
                if entry.passed_at is None:
                    entry.passed_at = now
                entry.passed += 1
                self.stats.reordered += 1
            if decision is not None and decision.choice is None and entry.cache_wait_since:
                until = entry.cache_wait_since + self.settings.max_cache_wait_s
                wake_at = until if wake_at is None else min(wake_at, until)
        self._wake_at(wake_at)

    def _decide(
        self,
        entry: QueueEntry,
        eligible: list[BackendState],
        view: RoutingView,
        now: float,
        *,
        looking: bool = False,
    ) -> _Decision | None:
        """The policy's choice for `entry`, or None when no backend it may use has room.
        `looking`: only to compare (reordering); a choice to wait is not recorded."""
        routing = entry.routing
        if not view.has_room_for(eligible, routing):
            return None
        if entry.cache_wait_since is not None:
            routing = replace(routing, waited_s=now - entry.cache_wait_since)
        candidates = view.candidates(eligible, routing)
        choice = self._choose(candidates, routing)
        decision = _Decision(entry, routing, eligible, candidates, choice, self._cost_model)
        if choice is None and decision.model is not None and not looking:
            # It waits, by choice, for a busy backend that holds its prompt; those behind it
            # that wait for the same backend come after it.
            best = min(range(len(candidates)), key=decision.costs.__getitem__)
            view.waits_for(candidates[best].name)
            if entry.cache_wait_since is None:
                entry.cache_wait_since = now
        return decision

    def _better_taker(
        self,
        decision: _Decision,
        behind: list[QueueEntry],
        done: set[QueueEntry],
        view: RoutingView,
        now: float,
    ) -> _Decision | None:
        """Bounded reordering: a request in the window behind `decision.entry` that gains more
        from the chosen backend, and would take it; None to keep strict order."""
        entry, backend = decision.entry, decision.choice
        settings = self.settings
        if decision.model is None or backend is None or entry.passed >= settings.reorder_max:
            return None
        # The worst extra wait is bounded: once passed over for half the window, it is next
        # (the other half covers the wait for the slot it then gets).
        if entry.passed_at is not None and now - entry.passed_at >= settings.reorder_window_s / 2:
            return None
        if not behind:
            return None
        mine = decision.gain(backend)
        best: _Decision | None = None
        best_gain = mine + _REORDER_MARGIN_S
        looked = 0
        for other in behind:
            if looked >= settings.reorder_max:
                break
            if other.priority != entry.priority:
                break  # priority classes are strict
            if other.enqueued_at > entry.enqueued_at + settings.reorder_window_s:
                break
            if other in done:
                continue
            looked += 1
            eligible = [b for b in decision.eligible if b.name not in other.routing.exclude]
            if other.routing.model != entry.routing.model or not eligible:
                continue
            theirs = self._decide(other, eligible, view, now, looking=True)
            if theirs is None or theirs.choice != backend:
                continue  # it would not take this backend now
            gain = theirs.gain(backend)
            if gain > best_gain:
                best, best_gain = theirs, gain
        return best

    def _place(self, decision: _Decision, view: RoutingView, now: float) -> None:
        entry, routing, choice = decision.entry, decision.routing, decision.choice
        backend = next(b for b in decision.eligible if b.name == choice)
        chosen = next(c for c in decision.candidates if c.name == choice)
        cprompt = view.cached_prompt(routing, backend.name)
        shadow = backend.caches
        slot_id = None
        if routing.pinnable and self.settings.pin_slots:
            slot_id = choose_slot(shadow, backend.slots, cprompt)
        # A slot the client named is where llama-server puts it: so the shadow does too.
        named = slot_id if slot_id is not None else routing.client_slot
        prediction = shadow.predict(cprompt, named)
        uncached = max(0, chosen.prompt_tokens - chosen.cached_tokens)
        expected_s = backend.speeds.expected_s(uncached, routing.max_tokens)
        # Choosing and claiming happen with no await in between: on one event loop nothing
        # else can take this slot, so select-and-claim is atomic.
        claim = backend.slots.try_claim(
            slot_id,
            routing.prompt_tokens,
            expected_s,
            lands_on=prediction.slot if prediction is not None else None,
            work=(uncached, routing.max_tokens),
        )
        if claim is None:
            raise RuntimeError(f"{choice} was chosen with a free slot and had none")
        if prediction is not None:
            shadow.launch(cprompt, named)
        # It will hold the prompt once computed: the next turn of a conversation that comes
        # before this one ends should know where it is being computed.
        self._index.record(backend.name, routing.prompt.keys, cprompt.length)
        if slot_id is not None:
            self.stats.pinned += 1
        view.claimed(claim)
        if entry.passed_at is not None:
            delay = now - entry.passed_at
            self.stats.max_reorder_delay_s = max(self.stats.max_reorder_delay_s, delay)
        if entry.cache_wait_since is not None:
            self.stats.cache_waits += 1
            waited = now - entry.cache_wait_since
            self.stats.max_cache_wait_s = max(self.stats.max_cache_wait_s, waited)
        self._queue.remove(entry)
        assert entry.future is not None
        lease = Lease(
            backend,
            claim,
            queue_wait_s=now - entry.enqueued_at,
            predicted_depth=chosen.prefix_match,
            predicted_tokens=prediction.reused if prediction is not None else chosen.cached_tokens,
        )
        lease.cached_prompt = cprompt
        lease.restores = prediction.restores if prediction is not None else None
        lease.arrived_at = entry.enqueued_at
        lease.model = routing.model
        lease.waited = entry.waited
        backend.last_used_at = now
        if self.confirm is not None:
            self.unconfirmed.add(lease)
        entry.future.set_result(lease)

    def _wake_at(self, when: float | None) -> None:
        """Drain again when a request stops waiting for its cached backend, if nothing else
        (a slot freed, a new request) has woken the drain by then."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if when is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_at(when + 0.001, self._queue.wakeup.set)

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


# A drain that failed runs again after this long.
_RETRY_DRAIN_S = 0.05
# A later request takes the slot only if it gains this much more than the one ahead of it.
_REORDER_MARGIN_S = 0.005


# What a backend not measured yet borrows from those that are (every figure routing uses).
_FLEET_FIGURES = ("prefill_tps", "decode_tps", "tokens_per_byte", "completion_tokens")


def _like_the_fleet(backends: Sequence[BackendState]) -> dict[str, Speeds]:
    """Each backend's speeds, with the fleet's mean of a figure where it has not measured that
    one yet."""
    if backends:
        # Most drains: every backend has measured the same figures (all of them, once the
        # fleet has served a little; none, at first), so no figure is borrowed.
        first = backends[0].speeds.measured
        if all(b.speeds.measured == first for b in backends):
            return {b.name: b.speeds for b in backends}
    means = {}
    for name in _FLEET_FIGURES:
        measured = [getattr(b.speeds, name) for b in backends if name in b.speeds.measured]
        if measured:
            means[name] = sum(measured) / len(measured)
    out = {}
    for b in backends:
        speeds = b.speeds
        filled = {name: v for name, v in means.items() if name not in speeds.measured}
        out[b.name] = replace(speeds, **filled) if filled else speeds
    return out


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
