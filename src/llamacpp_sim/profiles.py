"""Speed and memory profiles of simulated models.

A step of the continuous-batching engine decodes one token for every generating slot and fills
the rest of the batch with prompt tokens. Its duration is::

    decode_step_s * (1 + batch_slowdown * (generating - 1))      weights, shared by the batch
    + decode_step_s * sum(context of each generating slot) / decode_kv_tokens   its KV reads
    + sum(1 + position / attn_tokens for each prompt token) / prompt_tps

so a lone stream decodes at ``decode_tps``, every stream slows as more slots work, a long
prompt being prefilled stalls the others for a moment, and attention makes later tokens dearer:
a prompt token at position ``attn_tokens`` costs twice one at the start (FLOPs per token: about
``2 * params`` for the weights, ``4 * n_layer * d_model * position`` for attention).

``kv_bytes_per_token`` is the KV cache of one token over all layers (f16 K and V:
``n_layer * n_kv_heads * head_dim * 2 * 2``); with ``n_layer`` it sizes a saved slot state
(``prompt_cache.StateSize``), which bounds what ``--cache-ram`` MiB hold, and each save or
restore stalls the server for ``bytes / host_copy_bytes_per_s``: llama-server copies the state
between the KV cache and host memory on its one main thread, between two batches.
A zero ``attn_tokens``, ``decode_kv_tokens`` or ``host_copy_bytes_per_s`` makes that cost free.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    """Speeds and KV sizes of one simulated model on one kind of hardware."""

    name: str
    prompt_tps: float
    decode_tps: float
    batch_slowdown: float = 0.1
    n_batch: int = 512
    embedding_dim: int = 64
    kv_bytes_per_token: int = 1024
    n_layer: int = 1
    attn_tokens: float = 0.0
    decode_kv_tokens: float = 0.0
    host_copy_bytes_per_s: float = 0.0

    @property
    def decode_step_s(self) -> float:
        return 1.0 / self.decode_tps

    def step_s(
        self,
        generating: int,
        prompt_tokens: int,
        *,
        prompt_positions: int = 0,
        decode_context: int = 0,
    ) -> float:
        """One step: ``prompt_positions`` is the sum of the prompt tokens' positions,
        ``decode_context`` the sum of the generating slots' context lengths."""
        decode_s = 0.0
        if generating > 0:
            decode_s = self.decode_step_s * (1.0 + self.batch_slowdown * (generating - 1))
            if self.decode_kv_tokens > 0:
                decode_s += self.decode_step_s * decode_context / self.decode_kv_tokens
        prompt_s = prompt_tokens / self.prompt_tps
        if self.attn_tokens > 0:
            prompt_s += prompt_positions / (self.attn_tokens * self.prompt_tps)
        return decode_s + prompt_s

    def copy_s(self, n_bytes: int) -> float:
        """Time the server's main loop spends copying a state to or from host memory."""
        if self.host_copy_bytes_per_s <= 0:
            return 0.0
        return n_bytes / self.host_copy_bytes_per_s


def positions_sum(start: int, n: int) -> int:
    """Sum of the positions ``start .. start + n - 1`` (the context each prompt token sees)."""
    return n * start + n * (n - 1) // 2


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        # Llama 3.2 1B on a CPU: 16 layers x 8 KV heads x 64 -> 32 KiB of KV per token; attention
        # on a CPU is dearer than the FLOP count says; the state copy is a memcpy.
        Profile(
            "cpu-1b",
            prompt_tps=200.0,
            decode_tps=40.0,
            batch_slowdown=0.35,
            n_batch=512,
            kv_bytes_per_token=32 * 1024,
            n_layer=16,
            attn_tokens=8192,
            decode_kv_tokens=76_000,
            host_copy_bytes_per_s=8e9,
        ),
        # Llama 3 8B on one GPU: 32 layers x 8 KV heads x 128 -> 128 KiB per token (a 2,000-token
        # prompt is a 256 MiB state); attention equals the weights' FLOPs near 30k tokens, less
        # efficiently run: 16k; 16 GB of weights read per decode step against 128 KiB per token
        # of context; states cross PCIe 4.0 x16 at about 12 GB/s.
        Profile(
            "gpu-8b",
            prompt_tps=3000.0,
            decode_tps=90.0,
            batch_slowdown=0.08,
            n_batch=2048,
            kv_bytes_per_token=128 * 1024,
            n_layer=32,
            attn_tokens=16384,
            decode_kv_tokens=122_000,
            host_copy_bytes_per_s=12e9,
        ),
        # Llama 3 70B, 4-bit weights on GPUs: 80 layers x 8 KV heads x 128 -> 320 KiB per token.
        Profile(
            "gpu-70b",
            prompt_tps=600.0,
            decode_tps=20.0,
            batch_slowdown=0.05,
            n_batch=2048,
            kv_bytes_per_token=320 * 1024,
            n_layer=80,
            attn_tokens=32768,
            decode_kv_tokens=131_072,
            host_copy_bytes_per_s=12e9,
        ),
        # Very fast and free of context costs: tests measure scheduling, not hardware.
        Profile("test", prompt_tps=20000.0, decode_tps=2000.0, batch_slowdown=0.1, n_batch=512),
    )
}
