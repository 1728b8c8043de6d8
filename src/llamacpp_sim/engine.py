"""Slots, the server's own FIFO and the continuous-batching clock.

Which slot a task gets, what it finds cached there and what the host cache saves and restores
follow llama-server's rules, modelled in ``prompt_cache.py``. A task that finds no idle slot
waits in a FIFO (llama-server's deferred queue, ``server-context.cpp:2383-2395``); each slot
released moves one waiting task to the front of the queue, as
``server_queue::pop_deferred_task()`` does (``server-queue.cpp:90-113``).

One engine task steps every busy slot together: each step decodes one token for each generating
slot and fills the rest of the batch with prompt tokens, and lasts as long as the profile says
(``profiles.py``), divided by the time scale. Copies of slot states to and from host memory
stall the whole step loop, as they stall llama-server's one main thread. With a unified KV
cache the slots share ``n_ctx`` cells: when a step does not fit, idle slots are purged one at a
time, and when none is left every working slot fails (``server-context.cpp:3664-3716``:
``try_clear_idle_slots()``, then "Context size has been exceeded." for every processing slot).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from llamacpp_sim.config import SimConfig
from llamacpp_sim.profiles import Profile, positions_sum
from llamacpp_sim.prompt_cache import HostCache, PromptCaches, SlotCache

# Behind schedule by more than this, the clock forgives the debt instead of bursting to catch
# up: at large time scales the event loop's own overhead exceeds a step.
_MAX_LAG_S = 0.05
CONTEXT_EXCEEDED = "Context size has been exceeded."


@dataclass(eq=False)
class GenTask:
    """One request's work in the engine: prefill ``prompt``, then decode ``reply`` ids."""

    prompt: list[int]
    reply: list[int]
    id_slot: int | None = None
    # The request's cache_prompt (true by default); stateless: an embedding, which neither
    # reuses nor saves a cache.
    cache_prompt: bool = True
    stateless: bool = False
    on_start: Callable[[GenTask], None] | None = None
    task_id: int = 0
    slot_id: int | None = None
    cache_n: int = 0
    restored_n: int = 0
    n_past: int = 0
    n_generated: int = 0
    paused: bool = False
    done: bool = False
    cancelled: bool = False
    error: str | None = None
    arrived_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    prompt_done_at: float | None = None
    last_token_at: float | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def n_prompt(self) -> int:
        return len(self.prompt)

    @property
    def prompt_n(self) -> int:
        return self.n_prompt - self.cache_n

    @property
    def prefilled(self) -> bool:
        return self.n_past >= self.n_prompt

    @property
    def prompt_ms(self) -> float:
        if self.started_at is None or self.prompt_done_at is None:
            return 0.0
        return (self.prompt_done_at - self.started_at) * 1000.0

    @property
    def predicted_ms(self) -> float:
        if self.prompt_done_at is None or self.last_token_at is None:
            return 0.0
        return (self.last_token_at - self.prompt_done_at) * 1000.0


@dataclass(eq=False)
class Slot:
    """One llama-server slot: its task, and what its KV cache holds (``state``)."""

    id: int
    n_ctx: int
    state: SlotCache
    task: GenTask | None = None
    last_task: GenTask | None = None

    @property
    def cache(self) -> list[int]:
        return self.state.tokens


@dataclass
class EngineStats:
    """Counters behind ``/metrics``."""

    prompt_tokens_total: int = 0
    prompt_tokens_cached_total: int = 0
    prompt_seconds_total: float = 0.0
    tokens_predicted_total: int = 0
    tokens_predicted_seconds_total: float = 0.0
    n_decode_total: int = 0
    n_busy_slots_total: int = 0
    n_tokens_max: int = 0


class Engine:
    """The slots of one simulated backend and the step loop that drives them."""

    def __init__(
        self,
        profile: Profile,
        n_slots: int,
        n_ctx: int,
        time_scale: float,
        caches: PromptCaches | None = None,
    ) -> None:
        self.profile = profile
        self.caches = caches or PromptCaches(
            n_slots, similarity=0.1, host=None, cache_idle_slots=False, kv_unified=False
        )
        if len(self.caches.slots) != n_slots:
            raise ValueError("the prompt caches have another number of slots")
        self.slots = [Slot(i, n_ctx, self.caches.slots[i]) for i in range(n_slots)]
        # A unified KV cache: every slot may grow to n_ctx, and all of them share n_ctx cells.
        self.pool_tokens = n_ctx if self.caches.kv_unified else None
        self.time_scale = time_scale
        self.stats = EngineStats()
        self.max_concurrent = 0
        self.max_deferred = 0  # the most tasks that ever waited here for a slot
        self._deferred: deque[GenTask] = deque()
        self._released: list[int] = []
        self._in_step = False
        self._stall_s = 0.0
        self._wake = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._next_task_id = 0

    @classmethod
    def from_config(cls, config: SimConfig) -> Engine:
        return cls(
            config.resolved_profile(),
            config.slots,
            config.n_ctx,
            config.time_scale,
            config.prompt_caches(),
        )

    @property
    def host_cache(self) -> HostCache | None:
        return self.caches.host

    @property
    def processing(self) -> int:
        return sum(1 for s in self.slots if s.task is not None)

    @property
    def deferred(self) -> int:
        return len(self._deferred)

    def start(self) -> None:
        self._runner = asyncio.get_running_loop().create_task(self._run(), name="sim-engine")

    async def aclose(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
            self._runner = None

    def submit(self, task: GenTask) -> None:
        task.task_id = self._next_task_id
        self._next_task_id += 1
        # A newcomer takes an idle slot if there is one. Tasks waiting without id_slot leave no
        # slot idle (a release hands its slot on at once), so only tasks waiting for a busy
        # named slot can be overtaken, as in llama-server.
        if not self._start(task):
            self._deferred.append(task)
            self.max_deferred = max(self.max_deferred, len(self._deferred))

    def cancel(self, task: GenTask) -> None:
        """Drop ``task`` wherever it is; idempotent. Its slot keeps what it had processed."""
        if task.done:
            return
        task.cancelled = True
        if task in self._deferred:
            self._deferred.remove(task)
        self._finish(task)

    def _start(self, task: GenTask) -> bool:
        launch = self.caches.launch(
            task.prompt, task.id_slot, cache_prompt=task.cache_prompt, stateless=task.stateless
        )
        if launch is None:
            return False
        slot = self.slots[launch.slot_id]
        task.cache_n = task.n_past = launch.cache_n
        task.restored_n = launch.restored_tokens
        task.slot_id = slot.id
        task.started_at = time.monotonic()
        slot.task = task
        slot.last_task = task
        self._stall_s += self.profile.copy_s(launch.copied_bytes)
        self.max_concurrent = max(self.max_concurrent, self.processing)
        self.stats.prompt_tokens_cached_total += launch.cache_n
        if task.on_start is not None:
            task.on_start(task)
        self._wake.set()
        return True

    def _finish(self, task: GenTask) -> None:
        task.done = True
        task.changed.set()
        if task.slot_id is None:
            return
        slot = self.slots[task.slot_id]
        if slot.task is task:
            slot.task = None
            self.caches.release(slot.id, time.monotonic())
            self._released.append(slot.id)
            if not self._in_step:
                self._pop_deferred()

    def _pop_deferred(self) -> None:
        # server_queue::pop_deferred_task(): each release moves one waiting task to the front of
        # the queue, one that named the released slot if any, else the oldest; so of two slots
        # released in one step, the second one's task is served first.
        front: list[GenTask] = []
        for slot_id in self._released:
            if not self._deferred:
                break
            chosen = next((t for t in self._deferred if t.id_slot == slot_id), self._deferred[0])
            self._deferred.remove(chosen)
            front.insert(0, chosen)
        self._released.clear()
        for task in front:
            if not self._start(task):
                self._deferred.append(task)  # queue_tasks.defer(): to the back

    def _fits(self, need: int) -> bool:
        """Room in a unified KV cache for ``need`` more cells, purging idle slots for it."""
        if self.pool_tokens is None:
            return True
        while self.pool_tokens - self.caches.used_tokens < need:
            if not self.caches.purge_idle():
                return False
        return True

    def _fail_working(self, message: str) -> None:
        self._in_step = True
        try:
            for slot in self.slots:
                task = slot.task
                if task is not None:
                    task.error = message
                    self._finish(task)
                    slot.cache.clear()  # "simply clear the entire context"
        finally:
            self._in_step = False
        self._pop_deferred()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time()
        while True:
            active = [s.task for s in self.slots if s.task is not None and not s.task.paused]
            if not active:
                self._wake.clear()
                await self._wake.wait()
                deadline = loop.time()
                continue
            generating = [t for t in active if t.prefilled]
            budget = max(self.profile.n_batch - len(generating), 0)
            prefill: list[tuple[GenTask, int]] = []
            for task in sorted((t for t in active if not t.prefilled), key=_start_key):
                if budget <= 0:
                    break
                n = min(budget, task.n_prompt - task.n_past)
                prefill.append((task, n))
                budget -= n
            n_prompt_tokens = sum(n for _, n in prefill)
            if not self._fits(n_prompt_tokens + len(generating)):
                self._fail_working(CONTEXT_EXCEEDED)
                continue
            step_s = self.profile.step_s(
                len(generating),
                n_prompt_tokens,
                prompt_positions=sum(positions_sum(t.n_past, n) for t, n in prefill),
                decode_context=sum(t.n_prompt + t.n_generated for t in generating),
            )
            deadline += (self._stall_s + step_s) / self.time_scale
            self._stall_s = 0.0
            delay = deadline - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                await asyncio.sleep(0)
                if delay < -_MAX_LAG_S:
                    deadline = loop.time()
            self._in_step = True
            try:
                self._apply_step(prefill, generating)
            finally:
                self._in_step = False
            self._pop_deferred()

    def _apply_step(self, prefill: list[tuple[GenTask, int]], generating: list[GenTask]) -> None:
        now = time.monotonic()
        stats = self.stats
        stats.n_decode_total += 1
        stats.n_busy_slots_total += len(prefill) + len(generating)
        for task, n in prefill:
            if task.done:
                continue
            slot = self.slots[task.slot_id] if task.slot_id is not None else None
            if slot is not None:
                slot.cache.extend(task.prompt[task.n_past : task.n_past + n])
            task.n_past += n
            stats.prompt_tokens_total += n
            if task.prefilled:
                task.prompt_done_at = now
                stats.prompt_seconds_total += task.prompt_ms / 1000.0
                # The batch that ends a prompt also yields the first sampled token.
                self._emit_token(task, now)
            task.changed.set()
        for task in generating:
            if task.done:
                continue
            self._emit_token(task, now)
            task.changed.set()

    def _emit_token(self, task: GenTask, now: float) -> None:
        if task.n_generated < len(task.reply):
            if task.n_generated > 0 and task.slot_id is not None:
                # The previous token was decoded in this step, so it is in the KV cache now; the
                # last sampled token never is (handle_last_sampled_token()).
                self.slots[task.slot_id].cache.append(task.reply[task.n_generated - 1])
            task.n_generated += 1
            task.last_token_at = now
            self.stats.tokens_predicted_total += 1
        self.stats.n_tokens_max = max(self.stats.n_tokens_max, task.n_prompt + task.n_generated)
        if task.n_generated >= len(task.reply):
            self.stats.tokens_predicted_seconds_total += task.predicted_ms / 1000.0
            self._finish(task)


def _start_key(task: GenTask) -> float:
    return task.started_at or 0.0
