"""Slots, their prompt caches, the server's own FIFO and the continuous-batching clock.

Slot choice follows llama-server: the slot named by ``id_slot``; otherwise the idle slot whose
cache shares the longest common prefix with the prompt, if ``lcp / len(prompt)`` exceeds the
similarity threshold; otherwise the least recently used idle slot. A task that finds no idle
slot waits in a FIFO (llama-server's deferred queue) until a slot is released.

One engine task steps every busy slot together: each step decodes one token for each generating
slot and fills the rest of the batch with prompt tokens, and lasts as long as the profile says
(``profiles.py``), divided by the time scale.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from llamacpp_sim.profiles import Profile
from llamacpp_sim.prompt_cache import HostCache, common_prefix_len

# Behind schedule by more than this, the clock forgives the debt instead of bursting to catch
# up: at large time scales the event loop's own overhead exceeds a step.
_MAX_LAG_S = 0.05


@dataclass(eq=False)
class GenTask:
    """One request's work in the engine: prefill ``prompt``, then decode ``reply`` ids."""

    prompt: list[int]
    reply: list[int]
    id_slot: int | None = None
    reuse_cache: bool = True
    on_start: Callable[[GenTask], None] | None = None
    task_id: int = 0
    slot_id: int | None = None
    cache_n: int = 0
    n_past: int = 0
    n_generated: int = 0
    paused: bool = False
    done: bool = False
    cancelled: bool = False
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
    """One llama-server slot and the tokens its KV cache holds."""

    id: int
    n_ctx: int
    cache: list[int] = field(default_factory=list)
    last_used: float = 0.0
    task: GenTask | None = None
    last_task: GenTask | None = None


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
        similarity: float,
        cache_ram_tokens: int,
    ) -> None:
        self.profile = profile
        self.slots = [Slot(i, n_ctx) for i in range(n_slots)]
        self.time_scale = time_scale
        self.similarity = similarity
        self.host_cache = HostCache(cache_ram_tokens) if cache_ram_tokens > 0 else None
        self.stats = EngineStats()
        self.max_concurrent = 0
        self._deferred: deque[GenTask] = deque()
        self._wake = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._next_task_id = 0

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
        # Earlier deferred tasks go first: a newcomer may only take a slot if nobody waits for
        # one, as in llama-server's FIFO (a task naming a busy slot waits whatever the queue).
        slot = self._pick_slot(task) if not self._deferred else None
        if slot is None:
            self._deferred.append(task)
            self._drain_deferred()
        else:
            self._assign(task, slot)

    def cancel(self, task: GenTask) -> None:
        """Drop ``task`` wherever it is; idempotent. Its slot keeps what it had processed."""
        if task.done:
            return
        task.cancelled = True
        if task in self._deferred:
            self._deferred.remove(task)
            self._finish(task)
            return
        self._finish(task)

    def _pick_slot(self, task: GenTask) -> Slot | None:
        if task.id_slot is not None:
            wanted = self.slots[task.id_slot]
            return wanted if wanted.task is None else None
        idle = [s for s in self.slots if s.task is None]
        if not idle:
            return None
        best: Slot | None = None
        best_sim = self.similarity
        if task.reuse_cache and task.prompt:
            for slot in idle:
                sim = common_prefix_len(slot.cache, task.prompt) / len(task.prompt)
                if sim > best_sim:
                    best, best_sim = slot, sim
        if best is not None:
            return best
        return min(idle, key=lambda s: s.last_used)

    def _assign(self, task: GenTask, slot: Slot) -> None:
        lcp = common_prefix_len(slot.cache, task.prompt) if task.reuse_cache else 0
        if self.host_cache is not None and task.reuse_cache:
            restored = self.host_cache.best(task.prompt, better_than=lcp)
            if lcp < len(slot.cache):
                self.host_cache.save(slot.cache)
            if restored is not None:
                slot.cache = restored
                lcp = common_prefix_len(restored, task.prompt)
        # llama-server always evaluates at least the last prompt token to get fresh logits.
        cache_n = min(lcp, max(task.n_prompt - 1, 0))
        del slot.cache[cache_n:]
        task.cache_n = cache_n
        task.n_past = cache_n
        task.slot_id = slot.id
        task.started_at = time.monotonic()
        slot.task = task
        slot.last_task = task
        slot.last_used = task.started_at
        self.max_concurrent = max(self.max_concurrent, self.processing)
        self.stats.prompt_tokens_cached_total += cache_n
        if task.on_start is not None:
            task.on_start(task)
        self._wake.set()

    def _finish(self, task: GenTask) -> None:
        task.done = True
        task.changed.set()
        if task.slot_id is None:
            return
        slot = self.slots[task.slot_id]
        if slot.task is task:
            slot.task = None
            slot.last_used = time.monotonic()
            self._drain_deferred()

    def _drain_deferred(self) -> None:
        for task in list(self._deferred):
            slot = self._pick_slot(task)
            if slot is not None:
                self._deferred.remove(task)
                self._assign(task, slot)
            elif task.id_slot is None:
                break

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
            deadline += self.profile.step_s(len(generating), n_prompt_tokens) / self.time_scale
            delay = deadline - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                await asyncio.sleep(0)
                if delay < -_MAX_LAG_S:
                    deadline = loop.time()
            self._apply_step(prefill, generating)

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
            token = task.reply[task.n_generated]
            task.n_generated += 1
            task.last_token_at = now
            self.stats.tokens_predicted_total += 1
            if task.slot_id is not None:
                self.slots[task.slot_id].cache.append(token)
        self.stats.n_tokens_max = max(self.stats.n_tokens_max, task.n_prompt + task.n_generated)
        if task.n_generated >= len(task.reply):
            self.stats.tokens_predicted_seconds_total += task.predicted_ms / 1000.0
            self._finish(task)


def _start_key(task: GenTask) -> float:
    return task.started_at or 0.0
