"""llama-server's prompt caches: the tokens each slot holds and the host-memory cache of states.

A pure model, with no clock and no I/O: the engine drives it request by request, and the
benchmark replays workloads through it offline (``bench/ceiling.py``). It follows the pinned
llama.cpp sources (llama-cpp-python 0.3.36, ``vendor/llama.cpp/tools/server/``), cited by file,
line and function:

- Slot choice, ``server-context.cpp:1528-1640`` ``get_available_slot()``: the slot named by
  ``id_slot``; else the idle, non-empty slot with the highest ``f_sim = lcp / len(prompt)``
  above ``--slot-prompt-similarity`` (0 disables the search; ``common/common.h:697``, default
  0.1); else the least recently used idle slot (ties go to the *last* such slot: ``t_last_used
  <= t_last``, line 1604; never-used slots have -1, line 226; the time is set on release, 520).
- The host cache (``--cache-ram``, ``common/common.h:634``, default 8192 MiB) is consulted only
  when the slot was picked by LRU (line 1613), or by similarity with ``f_keep = lcp /
  len(slot) < 0.5`` (lines 1579-1589): the slot's state is saved, then the best saved state is
  restored into it, and only for completions (lines 1618-1634).
- ``server-task.cpp:1711-1791`` ``server_prompt_cache::alloc()``: a state already contained in a
  saved one is not saved again; one over the whole limit is skipped; saved states the new one
  contains are dropped; the oldest states go first to make room in bytes.
  ``server-task.cpp:1793-1868`` ``load()``: a saved state is taken only if it keeps at least 25 %
  of itself (``f_keep``) and beats the slot's own prompt on both ``f_keep`` and ``f_sim``; it is
  *moved* out of the cache (``states.erase``, line 1864), so two requests cannot both restore
  it. ``server-task.cpp:1870-1899`` ``update()``: the byte limit, then the token limit
  (``n_ctx``, server-context.cpp:1340, raised to what the bytes allow).
- ``server-context.cpp:2417-2433`` in ``process_single_task()``, ``--cache-idle-slots`` (on by
  default, ``common/common.h:630``; off without a host cache, lines 1401-1404): once a task has
  a slot, every idle slot is saved to the host cache, and cleared with ``--kv-unified``
  (``tools/server/server.cpp:156-160``: on by default only when ``-np`` is auto, then 4 slots).
- ``server-context.cpp:1648-1672`` ``try_clear_idle_slots()``, called when a decode finds no room
  (line 3710): with ``--kv-unified``, idle slots are purged (not saved) one at a time, lowest
  id first.
- Prompt processing (``update_slots()``, ``SLOT_STATE_STARTED``, lines 3195-3395): ``n_past``
  (``cache_n``) is the common prefix of the slot's tokens and the prompt (line 3200), one less
  when it covers the whole prompt ([TAG_PROMPT_LOGITS], line 3384); the slot keeps only those
  tokens (3395), then gains the prompt and every generated token but the last
  (``handle_last_sampled_token()``, lines 475-512, pushes a sampled token only when it is
  decoded).

The fractions are C++ ``float``s: they are rounded to single precision here as there, so that a
tie is a tie on both sides.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field

# server-context.cpp get_available_slot(): "if we are about to lose a large portion of the
# existing context - save it in the prompt cache".
F_KEEP_SAVE = 0.5
# server-task.cpp server_prompt_cache::load(): "don't trash large prompts".
F_KEEP_RESTORE_MIN = 0.25
_MIB = 1024 * 1024


def f32(value: float) -> float:
    """``value`` rounded to a C++ ``float``."""
    result: float = struct.unpack("f", struct.pack("f", value))[0]
    return result


def common_prefix_len(a: list[int], b: list[int]) -> int:
    """Length of the common prefix (``server_tokens::get_common_prefix`` for text tokens)."""
    n = min(len(a), len(b))
    if n == 0 or a[0] != b[0]:
        return 0
    # Galloping on slice equality, then a binary search in the block that differs: the
    # comparisons run in C, and the cost follows the prefix rather than the length.
    lo, step = 0, 64
    while True:
        hi = min(n, lo + step)
        if a[lo:hi] != b[lo:hi]:
            break
        if hi == n:
            return n
        lo, step = hi, step * 2
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class StateSize:
    """Bytes of one slot's saved state, as ``llama_state_seq_get_size()`` counts them.

    From ``llama-kv-cache.cpp`` ``state_write()``: the stream count and a cell count per stream
    (one stream per slot, or one in all with a unified KV cache); then, for the slot's cells, a
    position, a sequence count and a sequence id each (12 bytes), ``v_trans`` and the layer
    count, per layer the K and V types and row sizes (24 bytes), and the K and V rows.
    """

    kv_bytes_per_token: int
    n_layer: int
    n_stream: int = 1

    def of(self, n_tokens: int) -> int:
        head = 4 + 4 * self.n_stream
        if n_tokens <= 0:
            return head
        return head + 8 + 24 * self.n_layer + n_tokens * (12 + self.kv_bytes_per_token)


@dataclass(frozen=True)
class _Saved:
    tokens: list[int]  # never changed once saved: a restore hands out a copy
    size: int


class HostCache:
    """``server_prompt_cache``: saved slot states, oldest first, bounded by ``--cache-ram``.

    ``limit_bytes`` 0 means no byte limit (``--cache-ram -1``); ``limit_tokens`` is the server's
    whole context (``n_ctx``), which binds only without a byte limit.
    """

    def __init__(self, limit_bytes: int, limit_tokens: int, state_size: StateSize) -> None:
        self.limit_bytes = max(limit_bytes, 0)
        self.limit_tokens = max(limit_tokens, 0)
        self.state_size = state_size
        self._states: list[_Saved] = []
        self.saves = 0
        self.hits = 0
        self.evictions = 0
        # Restores refused because the match kept under a quarter of a saved state.
        self.refusals = 0

    @classmethod
    def from_mib(cls, cache_ram_mib: int, n_ctx_total: int, state_size: StateSize) -> HostCache:
        """As llama-server builds it from ``--cache-ram N`` (MiB; -1: no limit)."""
        return cls(cache_ram_mib * _MIB if cache_ram_mib > 0 else 0, n_ctx_total, state_size)

    @property
    def total_bytes(self) -> int:
        return sum(s.size for s in self._states)

    @property
    def total_tokens(self) -> int:
        return sum(len(s.tokens) for s in self._states)

    def __len__(self) -> int:
        return len(self._states)

    def entries(self) -> list[list[int]]:
        """The saved token sequences, oldest first (copies)."""
        return [list(s.tokens) for s in self._states]

    def clone(self) -> HostCache:
        twin = HostCache(self.limit_bytes, self.limit_tokens, self.state_size)
        twin._states = list(self._states)
        twin.saves, twin.hits = self.saves, self.hits
        twin.evictions, twin.refusals = self.evictions, self.refusals
        return twin

    def save(self, tokens: list[int]) -> int:
        """``alloc()`` and the copy into it: the bytes copied, 0 when nothing was saved."""
        if not tokens:
            return 0
        n = len(tokens)
        for state in self._states:
            if common_prefix_len(state.tokens, tokens) == n:
                return 0  # "prompt is already in the cache, skipping"
        size = self.state_size.of(n)
        if self.limit_bytes > 0 and size > self.limit_bytes:
            return 0  # "skip over-limit entries to avoid disturbing the cache"
        self._states = [
            s for s in self._states if common_prefix_len(s.tokens, tokens) != len(s.tokens)
        ]
        if self.limit_bytes > 0:
            total = self.total_bytes
            while self._states and total + size > self.limit_bytes:
                total -= self._states.pop(0).size
                self.evictions += 1
        self._states.append(_Saved(list(tokens), size))
        self.saves += 1
        return size

    def load(self, slot_tokens: list[int], prompt: list[int]) -> list[int] | None:
        """``load()``: the saved state to restore for ``prompt``, moved out of the cache."""
        if not prompt:
            return None
        lcp_best = common_prefix_len(slot_tokens, prompt)
        # "empty slot: any cache entry wins"
        f_keep_best = f32(lcp_best / len(slot_tokens)) if slot_tokens else -1.0
        f_sim_best = f32(lcp_best / len(prompt))
        best = -1
        for i, state in enumerate(self._states):
            lcp = common_prefix_len(state.tokens, prompt)
            f_keep = f32(lcp / len(state.tokens))
            f_sim = f32(lcp / len(prompt))
            if f_keep < F_KEEP_RESTORE_MIN:
                if lcp > lcp_best:
                    self.refusals += 1
                continue
            if f_keep_best < f_keep and f_sim_best < f_sim:
                f_keep_best, f_sim_best, best = f_keep, f_sim, i
        if best < 0:
            return None
        self.hits += 1
        return list(self._states.pop(best).tokens)

    def update(self) -> None:
        """``update()``: evict the oldest states over the byte limit, then the token limit."""
        if self.limit_bytes > 0:
            total = self.total_bytes
            while self._states and total > self.limit_bytes:
                total -= self._states.pop(0).size
                self.evictions += 1
        if self.limit_tokens <= 0:
            return
        size_per_token = max(1.0, self.total_bytes / max(1, self.total_tokens))
        limit = self.limit_tokens
        if self.limit_bytes > 0:
            limit = max(limit, int(self.limit_bytes / size_per_token))
        n_tokens = self.total_tokens
        while self._states and n_tokens > limit:
            n_tokens -= len(self._states.pop(0).tokens)
            self.evictions += 1


@dataclass(eq=False)
class SlotCache:
    """What one slot's KV cache holds, and when the slot was last released."""

    id: int
    tokens: list[int] = field(default_factory=list)
    t_last_used: float = -1.0  # server_slot::t_last_used: -1 until the first release
    busy: bool = False


@dataclass(frozen=True)
class Launch:
    """A task given a slot: the tokens it finds cached and the state copies that cost."""

    slot_id: int
    cache_n: int
    restored_tokens: int  # a state restored from the host cache (0: none)
    copied_bytes: int  # saved to and restored from host memory for this launch


class PromptCaches:
    """Every slot's cache and the host cache of one server, with llama-server's rules."""

    def __init__(
        self,
        n_slots: int,
        *,
        similarity: float,
        host: HostCache | None,
        cache_idle_slots: bool,
        kv_unified: bool,
    ) -> None:
        self.slots = [SlotCache(i) for i in range(n_slots)]
        self.similarity = f32(similarity)
        self.host = host
        # process_single_task(): "--cache-idle-slots requires --cache-ram, disabling".
        self.cache_idle_slots = cache_idle_slots and host is not None
        self.kv_unified = kv_unified
        # How launches went: which rule picked the slot, how often the host cache was asked.
        self.by_similarity = 0
        self.by_lru = 0
        self.lookups = 0

    def clone(self) -> PromptCaches:
        twin = PromptCaches(
            len(self.slots),
            similarity=self.similarity,
            host=self.host.clone() if self.host is not None else None,
            cache_idle_slots=self.cache_idle_slots,
            kv_unified=self.kv_unified,
        )
        twin.slots = [SlotCache(s.id, list(s.tokens), s.t_last_used, s.busy) for s in self.slots]
        twin.by_similarity, twin.by_lru, twin.lookups = (
            self.by_similarity,
            self.by_lru,
            self.lookups,
        )
        return twin

    def counters(self) -> dict[str, int]:
        """What the rules did so far, by name."""
        host = self.host
        return {
            "picked by similarity": self.by_similarity,
            "picked by LRU": self.by_lru,
            "host cache lookups": self.lookups,
            "states saved": host.saves if host else 0,
            "states restored": host.hits if host else 0,
            "restores refused (f_keep < 0.25)": host.refusals if host else 0,
            "states evicted": host.evictions if host else 0,
        }

    @property
    def used_tokens(self) -> int:
        """KV cells in use across slots (what a unified KV cache holds)."""
        return sum(len(s.tokens) for s in self.slots)

    def choose(self, prompt: list[int], id_slot: int | None) -> tuple[SlotCache, bool, bool] | None:
        """``get_available_slot()``: the slot, whether the host cache is consulted, and whether
        the slot was picked as the least recently used."""
        ret: SlotCache | None = self.slots[id_slot] if id_slot is not None else None
        update_cache = False
        if self.similarity != 0.0:
            f_sim_best = 0.0
            for slot in self.slots:
                if id_slot is not None and slot.id != id_slot:
                    continue
                if slot.busy or not slot.tokens:
                    continue
                lcp = common_prefix_len(slot.tokens, prompt)
                f_sim = f32(lcp / len(prompt)) if prompt else math.nan
                if f_sim > f_sim_best and f_sim > self.similarity:
                    f_sim_best, ret = f_sim, slot
            # The real server also computes this for a busy slot named by id_slot, and would
            # save and restore into it while it works; that task is deferred here untouched.
            if ret is not None and not ret.busy:
                kept = f32(f_sim_best * len(prompt))
                f_keep = f32(kept / len(ret.tokens)) if ret.tokens else math.nan
                if f_keep < F_KEEP_SAVE:
                    update_cache = True
        picked_by_lru = ret is None
        if ret is None:
            t_last = -1.0
            for slot in self.slots:
                if slot.busy:
                    continue
                if ret is None or slot.t_last_used <= t_last:
                    t_last, ret = slot.t_last_used, slot
            if ret is not None:
                update_cache = True
        if ret is None:
            return None
        return ret, update_cache, picked_by_lru

    def launch(
        self,
        prompt: list[int],
        id_slot: int | None = None,
        *,
        cache_prompt: bool = True,
        stateless: bool = False,
    ) -> Launch | None:
        """Give ``prompt`` a slot (None: the task waits, as the server defers it).

        ``stateless``: an embedding or rerank task, which neither reuses nor saves a cache.
        """
        chosen = self.choose(prompt, id_slot)
        if chosen is None or chosen[0].busy:
            return None
        slot, update_cache, by_lru = chosen
        if by_lru:
            self.by_lru += 1
        elif id_slot is None:
            self.by_similarity += 1
        copied = restored_n = 0
        if update_cache and self.host is not None and not stateless:
            self.lookups += 1
            copied += self.host.save(slot.tokens)
            restored = self.host.load(slot.tokens, prompt)
            if restored is not None:
                slot.tokens = restored
                restored_n = len(restored)
                copied += self.host.state_size.of(restored_n)
            self.host.update()
        n_past = common_prefix_len(slot.tokens, prompt) if cache_prompt and not stateless else 0
        if n_past == len(prompt) and n_past > 0:
            n_past -= 1  # [TAG_PROMPT_LOGITS]: at least one token is evaluated
        del slot.tokens[n_past:]
        slot.busy = True
        if self.cache_idle_slots and self.host is not None:
            for other in self.slots:
                if other.busy:
                    continue
                saved = self.host.save(other.tokens)
                if saved:
                    copied += saved
                    self.host.update()
                if self.kv_unified:
                    other.tokens.clear()  # [TAG_IDLE_SLOT_CLEAR]
        return Launch(slot.id, n_past, restored_n, copied)

    def release(self, slot_id: int, now: float) -> None:
        slot = self.slots[slot_id]
        slot.busy = False
        slot.t_last_used = now

    def purge_idle(self) -> bool:
        """``try_clear_idle_slots()``: empty one idle slot (unified KV only); False if none."""
        if not self.kv_unified:
            return False
        for slot in self.slots:
            if not slot.busy and slot.tokens:
                slot.tokens.clear()
                return True
        return False
