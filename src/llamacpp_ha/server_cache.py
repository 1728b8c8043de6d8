"""A shadow of one llama-server's prompt caches, kept by llama-server's own rules.

What a backend will reuse of a prompt depends on more than what it holds: llama-server gives a
task the idle slot most similar to its prompt, and looks in its host cache (`--cache-ram`) only
when it picked the slot as least recently used, or when the slot it picked shares less than half
of its own content with the prompt. So a conversation whose state sits in the host cache still
misses if another conversation with the same system prompt idles in a slot: that slot is picked,
the host cache is not consulted, and only the system prompt is reused.

`ServerCaches` replays every task we send a backend through those rules (the pinned llama.cpp
sources, `server-context.cpp` `get_available_slot()` and `server-task.cpp`
`server_prompt_cache::load()/alloc()`, also modelled by the simulator's `prompt_cache.py`), over
prefix keys instead of tokens: each slot and each saved state is the keys of its prompt with
their token counts. `predict()` says, without changing anything, which slot a prompt would get
and how many tokens it would reuse; `launch()` applies it when the request is sent, and
`release()` when it ends. It assumes llama-server's defaults with an explicit `-np`: similarity
0.1, idle slots saved to the host cache at each new task, no unified KV cache. Traffic that
reaches the backend around us makes it drift; each launch overwrites a slot with what was sent,
so it heals as the backend works.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

SIMILARITY = 0.1  # --slot-prompt-similarity
F_KEEP_SAVE = 0.5  # below it, the picked slot's state is saved and the host cache consulted
F_KEEP_RESTORE_MIN = 0.25  # a saved state is restored only if it keeps this share of itself


@dataclass(frozen=True, slots=True)
class CachedPrompt:
    """A prompt as keys, with the tokens covered up to each key and its length in tokens."""

    keys: tuple[str, ...] = ()
    tokens_at: tuple[int, ...] = ()
    length: int = 0

    def scaled(self, factor: float) -> CachedPrompt:
        return CachedPrompt(
            self.keys, tuple(round(t * factor) for t in self.tokens_at), round(self.length * factor)
        )

    def shared(self, other: CachedPrompt) -> int:
        """Tokens of the longest common prefix (keys are cumulative: equal at n, equal below)."""
        mine, theirs = self.keys, other.keys
        if not mine or not theirs or mine[0] != theirs[0]:
            return 0  # most prompts compared share nothing: said at once
        depth = len(mine) if len(mine) < len(theirs) else len(theirs)
        # One holding all of the other (a conversation's next turn) is said at once too.
        if mine[depth - 1] != theirs[depth - 1]:
            lo, hi = 1, depth - 1
            while lo < hi:  # the largest depth whose keys are equal
                mid = (lo + hi + 1) // 2
                if mine[mid - 1] == theirs[mid - 1]:
                    lo = mid
                else:
                    hi = mid - 1
            depth = lo
        # Conditionals, not min(): this runs several times per backend per decision.
        at, other_at = self.tokens_at[depth - 1], other.tokens_at[depth - 1]
        return at if at < other_at else other_at


@dataclass(eq=False)
class _Slot:
    id: int
    prompt: CachedPrompt = field(default_factory=CachedPrompt)
    busy: bool = False
    last_used: float = -1.0


class Prediction(NamedTuple):
    """A named tuple, not a frozen dataclass: a decision makes one per backend with an idle
    slot, and a frozen dataclass's `__init__` sets each field through a guarded `setattr`."""

    slot: int  # the slot the task will get
    reused: int  # prompt tokens it will take from the cache
    restores: CachedPrompt | None = None  # the saved state it restores, if any


# Idle slots holding the same prompt hold it to the same depth: grouped by this, the slot
# llama-server would pick is found by comparing each distinct prompt once, not every slot.
_Content = tuple[str, int, int]


def _content(prompt: CachedPrompt) -> _Content | None:
    if not prompt.keys or not prompt.length:
        return None  # nothing that can be shared
    return (prompt.keys[-1], prompt.tokens_at[-1], prompt.length)


class ServerCaches:
    """One backend's slots and host cache, as llama-server keeps them.

    Every task costs in proportion to what differs, not to the slots: idle slots are grouped by
    the prompt they hold (kept ordered by slot id), and an idle slot whose prompt was found
    saved is not saved again until the host cache lets something go. A backend with hundreds
    of slots (the overhead benchmark's stand-in has thousands) routes as fast as one with four.
    """

    def __init__(self, n_slots: int, host_tokens: int) -> None:
        self.slots = [_Slot(i) for i in range(n_slots)]
        self._host_tokens = host_tokens
        self._saved: list[CachedPrompt] = []  # oldest first
        # Idle slots by the prompt they hold, each list in slot id order; and the busy ones.
        # Both by the prompt's first key: a prompt shares nothing with those that start
        # otherwise, and is compared only with those that do not.
        self._groups: dict[str, dict[_Content, list[_Slot]]] = {}
        self._busy_groups: dict[str, dict[_Content, list[_Slot]]] = {}
        # Idle slots by (last used, -id): the least recently used one, ties to the highest id
        # (llama-server's `<=`). Entries go stale when a slot is taken or used again, and are
        # dropped when they come to the top, or all at once when there are too many.
        self._lru = [(-1.0, -slot.id, slot) for slot in self.slots]
        heapq.heapify(self._lru)
        # Idle slots whose prompt is not known to be in the host cache (`--cache-idle-slots`
        # saves them at each new task); the others' saving would change nothing.
        self._unsaved: set[_Slot] = set(self.slots)
        self._forgotten = 0  # times the host cache let something go
        # What saving a prompt would leave, while the host cache is unchanged: predictions ask
        # it of the same least recently used slot request after request.
        self._after_saving: dict[int, tuple[CachedPrompt, list[CachedPrompt]]] = {}
        # Those lists (and the host cache's own) by their states' first key: a prompt can only
        # restore a state that starts as it does, and most of a host cache's states do not.
        self._alike: dict[int, tuple[list[CachedPrompt], dict[str, list[CachedPrompt]]]] = {}
        # Tokens are counted from the text at the backend's measured tokens per byte; what is
        # held was counted at the ratio of its day.
        self.tokens_per_byte: float | None = None
        # The last prediction, while nothing it depends on has changed: a request's is asked
        # when it is weighed, again when it is placed, and once more when it is launched.
        self._planned: tuple[CachedPrompt, int | None, _Slot, bool, Prediction] | None = None

    @property
    def saved(self) -> list[CachedPrompt]:
        """The host cache's states, oldest first."""
        return self._saved

    @saved.setter
    def saved(self, states: list[CachedPrompt]) -> None:
        self._planned = None
        if states is not self._saved:
            self._after_saving.clear()
            self._alike.clear()
        kept = {id(s) for s in states}
        if any(id(s) not in kept for s in self._saved):
            self._forgot()
        self._saved = states

    @property
    def host_tokens(self) -> int:
        return self._host_tokens

    @host_tokens.setter
    def host_tokens(self, tokens: int) -> None:
        self._planned = None
        if tokens != self._host_tokens:
            self._after_saving.clear()
            self._alike.clear()
            self._forgot()
        self._host_tokens = tokens

    def _forgot(self) -> None:
        """The host cache let a state go (or changed size): any idle slot may need saving."""
        self._forgotten += 1
        self._unsaved = {slot for slot in self.slots if not slot.busy}

    def _set(self, slot: _Slot, prompt: CachedPrompt, busy: bool) -> None:
        """Every change of a slot's prompt or state goes here, to keep the groups true."""
        self._planned = None
        held = _content(slot.prompt)
        if held is not None:
            by_first = self._busy_groups if slot.busy else self._groups
            first = slot.prompt.keys[0]
            groups = by_first[first]
            group = groups[held]
            del group[bisect.bisect_left(group, slot.id, key=_slot_id)]
            if not group:
                del groups[held]
                if not groups:
                    del by_first[first]
        slot.prompt, slot.busy = prompt, busy
        if busy:
            self._unsaved.discard(slot)
        else:
            self._unsaved.add(slot)
        content = _content(prompt)
        if content is not None:
            groups = (self._busy_groups if busy else self._groups).setdefault(prompt.keys[0], {})
            bisect.insort(groups.setdefault(content, []), slot, key=_slot_id)

    def busy_holders(self, prompt: CachedPrompt) -> list[tuple[int, list[_Slot]]]:
        """The busy slots that share some of `prompt`, grouped by what they hold: (tokens
        shared, the group's slots in id order), most shared first."""
        alike = self._busy_groups.get(prompt.keys[0]) if prompt.keys else None
        if not alike:
            return []  # most prompts: no busy slot starts as they do
        found = []
        for group in alike.values():
            shared = group[0].prompt.shared(prompt)
            if shared:
                found.append((shared, group))
        found.sort(key=_first_item, reverse=True)
        return found

    def track(self, tokens_per_byte: float) -> None:
        """Count what is held at the backend's current ratio when it has moved by over 5 %."""
        old = self.tokens_per_byte
        self.tokens_per_byte = tokens_per_byte
        if old is None or abs(tokens_per_byte / old - 1) <= 0.05:
            if old is not None:
                self.tokens_per_byte = old
            return
        factor = tokens_per_byte / old
        for slot in self.slots:
            self._set(slot, slot.prompt.scaled(factor), slot.busy)
        # A state rescaled to no tokens holds nothing worth restoring.
        self.saved = [s for s in (state.scaled(factor) for state in self.saved) if s.length]
        self._forgot()

    def predict(self, prompt: CachedPrompt, id_slot: int | None = None) -> Prediction | None:
        """Where `prompt` would go and what it would reuse; None when no slot is idle."""
        planned = self._plan(prompt, id_slot)
        return None if planned is None else planned[4]

    def _plan(
        self, prompt: CachedPrompt, id_slot: int | None
    ) -> tuple[CachedPrompt, int | None, _Slot, bool, Prediction] | None:
        """The slot `prompt` would get, whether the host cache is consulted, and what it would
        reuse: made once while the shadow is unchanged."""
        planned = self._planned
        if planned is not None and planned[0] is prompt and planned[1] == id_slot:
            return planned
        chosen = self._choose(prompt, id_slot)
        if chosen is None:
            return None
        slot, consult, reused = chosen
        prediction = self._predict(prompt, slot, consult, reused)
        planned = self._planned = (prompt, id_slot, slot, consult, prediction)
        return planned

    def _predict(self, prompt: CachedPrompt, slot: _Slot, consult: bool, reused: int) -> Prediction:
        # `reused`: what the slot itself shares with the prompt (its choice counted it).
        # The slot's own state is saved first, which may push out the oldest saved ones.
        restores = None
        if consult:
            alike = self._starting_alike(self._saving(slot.prompt), prompt)
            best = self._best_saved(slot, prompt, reused, alike)
            if best is not None:
                restores, reused = best
        # llama-server evaluates at least the prompt's last token.
        last = prompt.length - 1
        return Prediction(slot.id, reused if reused < last else (last if last > 0 else 0), restores)

    def launch(self, prompt: CachedPrompt, id_slot: int | None = None) -> Prediction | None:
        """The task is sent: apply what `predict()` says to the shadow."""
        planned = self._plan(prompt, id_slot)
        if planned is None:
            return None
        _, _, slot, consult, prediction = planned
        if consult:
            saved = self._saving(slot.prompt)
            if prediction.restores is not None and prediction.restores in saved:
                saved = [s for s in saved if s is not prediction.restores]  # moved, not copied
            self.saved = saved
        self._set(slot, prompt, busy=True)
        # --cache-idle-slots: every idle slot is saved, in slot order; those known to be saved
        # already would change nothing.
        pending, at = sorted(self._unsaved, key=_slot_id), 0
        while at < len(pending):
            other, at = pending[at], at + 1
            forgotten = self._forgotten
            self.saved = self._saving(other.prompt)
            self._unsaved.discard(other)
            if self._forgotten != forgotten:
                # Saving it pushed a state out: the slots after it are all looked at now, as
                # llama-server's loop goes on (those before it, at the next task).
                pending = sorted((s for s in self._unsaved if s.id > other.id), key=_slot_id)
                at = 0
        return prediction

    def release(self, slot_id: int, now: float) -> None:
        self._planned = None
        if 0 <= slot_id < len(self.slots):
            slot = self.slots[slot_id]
            if slot.busy:
                self._set(slot, slot.prompt, busy=False)
            slot.last_used = now
            if len(self._lru) > 2 * len(self.slots) + 16:
                self._lru = [(s.last_used, -s.id, s) for s in self.slots if not s.busy]
                heapq.heapify(self._lru)
            else:
                heapq.heappush(self._lru, (now, -slot.id, slot))

    def lost(self, state: CachedPrompt, floor: int) -> None:
        """A restore of `state` was predicted and did not happen: the host cache had already
        let it go, so it holds less than what was saved after it. Shrink to that (not below
        `floor`)."""
        if state not in self.saved:
            return
        newer = self.saved[self.saved.index(state) + 1 :]
        self.host_tokens = max(floor, min(self.host_tokens, sum(s.length for s in newer)))
        kept = [s for s in self.saved if s is not state]
        used = sum(s.length for s in kept)
        while kept and used > self.host_tokens:
            used -= kept.pop(0).length
        self.saved = kept

    def answered(self, slot_id: int, prompt: CachedPrompt, generated: int) -> None:
        """The answer's tokens stay in the slot after the prompt, if it still holds it."""
        if 0 <= slot_id < len(self.slots):
            slot = self.slots[slot_id]
            if slot.prompt is prompt and generated > 0:
                grown = CachedPrompt(prompt.keys, prompt.tokens_at, prompt.length + generated)
                self._set(slot, grown, slot.busy)

    def best_held(self, prompt: CachedPrompt) -> int:
        """Tokens of `prompt` held anywhere here (a slot, busy or not, or a saved state that
        would be restored): what a busy backend may offer once a slot frees."""
        held = 0
        if prompt.keys:
            # Only the slots whose prompt starts alike, one of each group: its slots hold the
            # same prompt to the same depth.
            first = prompt.keys[0]
            for by_first in (self._groups, self._busy_groups):
                for group in by_first.get(first, {}).values():
                    shared = group[0].prompt.shared(prompt)
                    if shared > held:
                        held = shared
        for state in self._starting_alike(self.saved, prompt):
            shared = state.shared(prompt)
            if shared >= F_KEEP_RESTORE_MIN * state.length:
                held = max(held, shared)
        return min(held, max(prompt.length - 1, 0))

    def _choose(self, prompt: CachedPrompt, id_slot: int | None) -> tuple[_Slot, bool, int] | None:
        """`get_available_slot()`: the slot, whether the host cache is consulted, and the
        tokens the slot shares with the prompt."""
        named = None
        if id_slot is not None:
            named = self.slots[id_slot] if id_slot < len(self.slots) else None
            if named is not None and named.busy:
                return None
        best: _Slot | None = named
        best_sim = 0.0
        best_shared = 0
        if prompt.length:
            # The most similar idle slot, the lowest id among equals (llama-server's loop goes
            # through the slots in order and keeps a strictly better one).
            first = prompt.keys[0] if prompt.keys else None
            groups: Iterable[list[_Slot]] = ()
            if named is not None:
                if _content(named.prompt) is not None and named.prompt.keys[0] == first:
                    groups = ([named],)
            elif first is not None:
                alike = self._groups.get(first)
                if alike:
                    groups = alike.values()  # the others share nothing
            for group in groups:
                shared = group[0].prompt.shared(prompt)
                f_sim = shared / prompt.length
                if f_sim <= SIMILARITY:
                    continue
                if f_sim > best_sim or (
                    f_sim == best_sim and best is not None and group[0].id < best.id
                ):
                    best, best_sim, best_shared = group[0], f_sim, shared
        if best is not None:
            if best is named and not best_sim:  # named, and not similar: not counted above
                best_shared = named.prompt.shared(prompt)
            length = best.prompt.length
            keeps = best_sim * prompt.length / length if length else 0.0
            return best, keeps < F_KEEP_SAVE, best_shared
        lru = self._lru
        while lru:
            last_used, _, slot = lru[0]
            if not slot.busy and slot.last_used == last_used:
                return slot, True, slot.prompt.shared(prompt)
            heapq.heappop(lru)
        return None

    def _starting_alike(
        self, states: list[CachedPrompt], prompt: CachedPrompt
    ) -> Sequence[CachedPrompt]:
        """The states of `states` (the host cache, or what saving a slot would make of it)
        that start with `prompt`'s first key, in their order: the only ones it can share with."""
        if not prompt.keys:
            return ()
        known = self._alike.get(id(states))
        if known is None or known[0] is not states:
            if len(self._alike) >= 64:
                self._alike.clear()
            groups: dict[str, list[CachedPrompt]] = {}
            for state in states:
                if state.keys:
                    groups.setdefault(state.keys[0], []).append(state)
            known = self._alike[id(states)] = (states, groups)
        return known[1].get(prompt.keys[0], ())

    def _best_saved(
        self, slot: _Slot, prompt: CachedPrompt, own: int, alike: Sequence[CachedPrompt]
    ) -> tuple[CachedPrompt, int] | None:
        """`server_prompt_cache::load()`: the saved state that beats the slot's own (`own`
        tokens shared with `prompt`), among those that start alike (the host cache's order),
        and the tokens it shares."""
        held, length = slot.prompt.length, prompt.length
        keep_best = own / held if held else -1.0
        sim_best = own / length if length else 0.0
        found = None
        for state in alike:
            if not state.length:
                continue  # nothing to restore (a tiny prompt rescaled to no tokens)
            shared = state.shared(prompt)
            keep = shared / state.length
            if keep < F_KEEP_RESTORE_MIN:
                continue
            sim = shared / length if length else 0.0
            if keep_best < keep and sim_best < sim:
                keep_best, sim_best, found = keep, sim, (state, shared)
        return found

    def _saving(self, prompt: CachedPrompt) -> list[CachedPrompt]:
        """The saved states once `prompt` is saved (`server_prompt_cache::alloc()`): not again
        if a saved state contains it; the saved states it contains dropped; the oldest go
        first to make room."""
        saved = self._saved
        if not prompt.length or prompt.length > self._host_tokens:
            return saved
        known = self._after_saving.get(id(prompt))
        if known is not None and known[0] is prompt:
            return known[1]
        if len(self._after_saving) >= 64:
            self._after_saving.clear()
        after = self._saved_with(prompt)
        self._after_saving[id(prompt)] = (prompt, after)
        return after

    def _saved_with(self, prompt: CachedPrompt) -> list[CachedPrompt]:
        saved = self._saved
        first = _first(prompt)
        if first is None:  # no keys to compare by
            if any(_contains(s, prompt) for s in saved):
                return saved
            kept = [s for s in saved if not _contains(prompt, s)]
        else:
            # Only a state that starts alike can hold it, or be held by it (or one with no
            # keys): compared inline, before the call.
            for state in saved:
                if state.keys and state.keys[0] == first and _contains(state, prompt):
                    return saved
            kept = [
                s
                for s in saved
                if not ((not s.keys or s.keys[0] == first) and _contains(prompt, s))
            ]
        used = sum(s.length for s in kept)
        while kept and used + prompt.length > self.host_tokens:
            used -= kept.pop(0).length
        return [*kept, prompt]


def _contains(big: CachedPrompt, small: CachedPrompt) -> bool:
    """Whether `big` holds all of `small`: every key of it (its text; the template's few
    tokens past the last key are not known, and are taken to match)."""
    if big.length < small.length or len(big.keys) < len(small.keys):
        return False
    return not small.keys or big.keys[len(small.keys) - 1] == small.keys[-1]


def _first(prompt: CachedPrompt) -> str | None:
    """The key two prompts must both start with to share anything (None: nothing shareable).
    Loops over slots and saved states compare it inline: a call per state costs more than
    the comparison, and most share nothing."""
    return prompt.keys[0] if prompt.keys else None


def _slot_id(slot: _Slot) -> int:
    return slot.id


def _first_item(item: tuple[int, list[_Slot]]) -> int:
    return item[0]
