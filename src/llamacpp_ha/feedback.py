"""What routing learns from each answer: the closed loop of the cache-aware policy.

Once a backend has answered, its `timings` say what it really did: how many prompt tokens it
reused (`cache_n`) against what the prefix index predicted, how fast it computed the rest, and
what the prompt was in its tokens. This module feeds those back: the prediction's outcome is
counted (agree, over, under: the index's own accuracy), an over-prediction corrects the index,
the backend's speeds are learned, and the prompt is recorded as held by the backend (and by
the slot its cache shadow gave it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .policies import RoutingRequest
from .prefix_index import CacheIndex
from .queue import Lease
from .registry import BackendState
from .usage import Usage

# A prediction within this many tokens of what was reused, or this share of the prompt, agrees:
# llama-server recomputes the last token or two of a prompt, and templates add a few.
_AGREE_TOKENS = 32
_AGREE_SHARE = 0.1


@dataclass
class PredictionCounts:
    """How the index's predictions of reused tokens compared with `timings.cache_n`."""

    agree: int = 0
    over: int = 0  # predicted more than was reused: the backend had lost it
    under: int = 0  # reused more than predicted
    predicted_tokens: int = 0
    reused_tokens: int = 0

    @property
    def total(self) -> int:
        return self.agree + self.over + self.under

    @property
    def accuracy(self) -> float | None:
        return round(self.agree / self.total, 3) if self.total else None


@dataclass
class Feedback:
    """Applies one answer's outcome to the index, the pins and the backend's speeds."""

    index: CacheIndex
    counts: dict[str, PredictionCounts] = field(default_factory=dict)

    def capacity_changed(self, backend: BackendState) -> None:
        """What `backend` can hold: its slots' contexts plus its host prompt cache."""
        n_ctx = backend.n_ctx or 0
        self.index.set_capacity(
            backend.name, backend.slots.total * n_ctx + backend.config.host_cache_tokens
        )

    def answered(
        self, backend: BackendState, routing: RoutingRequest, lease: Lease, usage: Usage
    ) -> str | None:
        """Learn from a good answer; returns the prediction's outcome when it can be judged."""
        prompt = routing.prompt
        backend.speeds.observe(usage, prompt.size)
        self.capacity_changed(backend)
        outcome = self._judge(backend.name, routing, lease, usage)
        tokens = usage.prompt_tokens or round(prompt.size * backend.speeds.tokens_per_byte)
        self.index.record(backend.name, prompt.keys, tokens)
        if outcome == "over" and lease.restores is not None:
            backend.caches.lost(lease.restores, floor=usage.prompt_tokens or 0)
        slot = lease.claim.lands_on
        if slot is not None and lease.cached_prompt is not None and usage.completion_tokens:
            backend.caches.answered(slot, lease.cached_prompt, usage.completion_tokens)
        return outcome

    def _judge(
        self, backend: str, routing: RoutingRequest, lease: Lease, usage: Usage
    ) -> str | None:
        reused = usage.cached_tokens
        if reused is None or not routing.prompt.keys:
            return None
        predicted = lease.predicted_tokens
        tolerance = max(_AGREE_TOKENS, _AGREE_SHARE * (usage.prompt_tokens or 0))
        counts = self.counts.setdefault(backend, PredictionCounts())
        counts.predicted_tokens += predicted
        counts.reused_tokens += reused
        if predicted - reused > tolerance:
            counts.over += 1
            # What was reused, in keys: those whose text ends within the reused tokens.
            per_byte = max(usage.prompt_tokens or 0, 1) / max(routing.prompt.size, 1)
            found = sum(1 for end in routing.prompt.ends if end * per_byte <= reused)
            self.index.correct(backend, routing.prompt.keys, lease.predicted_depth, found)
            return "over"
        if reused - predicted > tolerance:
            counts.under += 1
            self.index.regain(backend)
            return "under"
        counts.agree += 1
        return "agree"

    def forget_backend(self, name: str) -> None:
        self.index.forget_backend(name)
