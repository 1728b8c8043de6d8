"""Speed profiles of simulated models.

A step of the continuous-batching engine decodes one token for every generating slot and fills
the rest of the batch with prompt tokens. Its duration is::

    decode_step_s * (1 + batch_slowdown * (generating - 1)) + prompt_tokens / prompt_tps

so a lone stream decodes at ``decode_tps`` and every stream slows as more slots work, while a
long prompt being prefilled stalls the others for a moment, as on real hardware.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    """Speeds of one simulated model on one kind of hardware."""

    name: str
    prompt_tps: float
    decode_tps: float
    batch_slowdown: float = 0.1
    n_batch: int = 512
    embedding_dim: int = 64

    @property
    def decode_step_s(self) -> float:
        return 1.0 / self.decode_tps

    def step_s(self, generating: int, prompt_tokens: int) -> float:
        decode_s = 0.0
        if generating > 0:
            decode_s = self.decode_step_s * (1.0 + self.batch_slowdown * (generating - 1))
        return decode_s + prompt_tokens / self.prompt_tps


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile("cpu-1b", prompt_tps=200.0, decode_tps=40.0, batch_slowdown=0.35, n_batch=512),
        Profile("gpu-8b", prompt_tps=3000.0, decode_tps=90.0, batch_slowdown=0.08, n_batch=2048),
        Profile("gpu-70b", prompt_tps=600.0, decode_tps=20.0, batch_slowdown=0.05, n_batch=2048),
        Profile("test", prompt_tps=20000.0, decode_tps=2000.0, batch_slowdown=0.1, n_batch=512),
    )
}
