"""Configuration of one simulated backend."""

from __future__ import annotations

from dataclasses import dataclass

from llamacpp_sim.faults import Fault
from llamacpp_sim.profiles import PROFILES, Profile


@dataclass(frozen=True)
class SimConfig:
    """One simulated llama-server; durations are model seconds, divided by ``time_scale``."""

    slots: int = 2
    model: str = "sim-model"
    profile: str | Profile = "test"
    time_scale: float = 1.0
    port: int = 0
    host: str = "127.0.0.1"
    n_ctx: int = 4096
    load_time_s: float = 0.0
    similarity: float = 0.10
    cache_ram_tokens: int = 0
    aliases: tuple[str, ...] = ()
    slots_endpoint: bool = True
    embeddings: bool = True
    default_max_tokens: int = 16
    fault: Fault | None = None
    name: str = "sim"
    # Serve https with this PEM certificate and key, as llama-server's --ssl-cert-file does.
    tls_certfile: str | None = None
    tls_keyfile: str | None = None

    def __post_init__(self) -> None:
        if self.slots < 1:
            raise ValueError("slots must be >= 1")
        if self.time_scale <= 0:
            raise ValueError("time_scale must be > 0")
        if self.n_ctx < 8:
            raise ValueError("n_ctx must be >= 8")
        if self.load_time_s < 0:
            raise ValueError("load_time_s must be >= 0")
        if not 0.0 <= self.similarity <= 1.0:
            raise ValueError("similarity must be between 0 and 1")
        if self.cache_ram_tokens < 0:
            raise ValueError("cache_ram_tokens must be >= 0")
        if self.default_max_tokens < 1:
            raise ValueError("default_max_tokens must be >= 1")
        if isinstance(self.profile, str) and self.profile not in PROFILES:
            raise ValueError(
                f"unknown profile {self.profile!r} (known: {', '.join(sorted(PROFILES))})"
            )

    def resolved_profile(self) -> Profile:
        return self.profile if isinstance(self.profile, Profile) else PROFILES[self.profile]

    def scaled(self, model_seconds: float) -> float:
        return model_seconds / self.time_scale
