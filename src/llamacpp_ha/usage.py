"""Token counts from llama-server's answers: `usage` (OpenAI) and `timings` (llama.cpp).

`timings.cache_n` is the number of prompt tokens llama-server took from its cache; it is what
shows whether affinity paid. For a stream, the counts ride on the last events; `sse.py` keeps
the last event that carries them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Usage:
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    completion_tokens: int | None = None
    # From `timings` only: the prompt tokens computed (not reused) and how long each phase took.
    computed_tokens: int | None = None
    prompt_ms: float | None = None
    predicted_ms: float | None = None
    slot: int | None = None  # the slot that served it, when the answer says (`/completion`)

    @property
    def cache_hit_ratio(self) -> float | None:
        if not self.prompt_tokens or self.cached_tokens is None:
            return None
        return self.cached_tokens / self.prompt_tokens


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _ms(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    return None


def from_answer(answer: Any) -> Usage:
    """Counts in one JSON answer (or one SSE event's JSON)."""
    usage = Usage()
    if not isinstance(answer, dict):
        return usage
    usage.slot = _int(answer.get("id_slot"))
    timings = answer.get("timings")
    if isinstance(timings, dict):
        cached, computed = _int(timings.get("cache_n")), _int(timings.get("prompt_n"))
        usage.cached_tokens = cached
        usage.computed_tokens = computed
        usage.prompt_ms = _ms(timings.get("prompt_ms"))
        usage.predicted_ms = _ms(timings.get("predicted_ms"))
        if cached is not None and computed is not None:
            usage.prompt_tokens = cached + computed
        usage.completion_tokens = _int(timings.get("predicted_n"))
    counts = answer.get("usage")
    if isinstance(counts, dict):
        usage.prompt_tokens = _int(counts.get("prompt_tokens", counts.get("input_tokens")))
        usage.completion_tokens = _int(counts.get("completion_tokens", counts.get("output_tokens")))
        details = counts.get("prompt_tokens_details")
        if isinstance(details, dict) and usage.cached_tokens is None:
            usage.cached_tokens = _int(details.get("cached_tokens"))
    return usage
