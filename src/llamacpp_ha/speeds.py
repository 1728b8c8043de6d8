"""How fast each backend works, learned from llama-server's own `timings`.

Routing estimates when a request would start on each backend: the prompt it must compute there
at that backend's prefill rate, after the wait for a slot. Both come from here: the prefill rate
(`prompt_n / prompt_ms`), the decode rate of one stream (`predicted_n / predicted_ms`), how many
tokens a byte of prompt text makes (`usage.prompt_tokens` against the text's size: the
tokenizer and the chat template), and how long answers usually are. Each is an exponential
moving average; a configured or default figure stands in until the backend has been measured.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .usage import Usage

# Stand-ins until measured: a mid-range GPU's prefill and decode for an 8B model, the usual
# 4 bytes of English text per token, and a short answer.
DEFAULT_PREFILL_TPS = 2000.0
DEFAULT_DECODE_TPS = 50.0
DEFAULT_TOKENS_PER_BYTE = 0.25
DEFAULT_COMPLETION_TOKENS = 256.0
# A prompt computed in fewer tokens than this measures the per-request overhead, not the rate.
_MIN_RATE_TOKENS = 32
_WEIGHT = 0.2  # of each new measurement in the moving averages


def _blend(old: float, new: float) -> float:
    return old + _WEIGHT * (new - old)


@dataclass
class Speeds:
    """One backend's learned rates; `measured` names the ones measured so far."""

    prefill_tps: float = DEFAULT_PREFILL_TPS
    decode_tps: float = DEFAULT_DECODE_TPS
    tokens_per_byte: float = DEFAULT_TOKENS_PER_BYTE
    completion_tokens: float = DEFAULT_COMPLETION_TOKENS
    measured: set[str] = field(default_factory=set)

    def observe(self, usage: Usage, prompt_bytes: int) -> None:
        """Learn from one answer's counts; `prompt_bytes` is the size of its prompt text."""
        computed, prompt_ms = usage.computed_tokens, usage.prompt_ms
        if computed is not None and computed >= _MIN_RATE_TOKENS and prompt_ms:
            self._learn("prefill_tps", computed * 1000.0 / prompt_ms)
        completion, predicted_ms = usage.completion_tokens, usage.predicted_ms
        if completion is not None and completion > 1 and predicted_ms:
            self._learn("decode_tps", completion * 1000.0 / predicted_ms)
        if completion is not None:
            self._learn("completion_tokens", float(completion))
        if usage.prompt_tokens and prompt_bytes >= 64:
            self._learn("tokens_per_byte", usage.prompt_tokens / prompt_bytes)

    def _learn(self, name: str, value: float) -> None:
        # The first measurement replaces the stand-in; later ones move the average.
        if name in self.measured:
            value = _blend(getattr(self, name), value)
        self.measured.add(name)
        setattr(self, name, value)

    def expected_s(self, uncached_tokens: int, max_tokens: int) -> float:
        """How long a request should hold a slot here: its prefill, then its answer."""
        typical = self.completion_tokens
        answer = min(max_tokens, 2 * typical) if max_tokens else typical
        return uncached_tokens / self.prefill_tps + answer / self.decode_tps
