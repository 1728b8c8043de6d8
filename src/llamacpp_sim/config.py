"""Configuration of one simulated backend."""

from __future__ import annotations

from dataclasses import dataclass

from llamacpp_sim.faults import Fault
from llamacpp_sim.profiles import PROFILES, Profile
from llamacpp_sim.prompt_cache import HostCache, PromptCaches, StateSize


@dataclass(frozen=True)
class SimConfig:
    """One simulated llama-server; durations are model seconds, divided by ``time_scale``.

    The cache settings are llama-server's flags with its defaults (pinned build): ``similarity``
    is ``--slot-prompt-similarity`` (0 disables the search by prefix), ``cache_ram_mib``
    ``--cache-ram`` (MiB of host memory for saved slot states, -1 no limit, 0 off; the profile
    gives the bytes per token), ``cache_idle_slots`` ``--cache-idle-slots``, ``kv_unified``
    ``--kv-unified`` (llama-server turns it on only when ``-np`` is auto). ``n_ctx`` is each
    slot's context (llama-server's ``-c`` divided by ``-np``, or all of ``-c`` when unified: the
    slots then share those ``n_ctx`` tokens). ``cache_ram_tokens``, the simulator's older
    setting, bounds the host cache in tokens instead and wins when given (0: off).
    """

    slots: int = 2
    model: str = "sim-model"
    profile: str | Profile = "test"
    time_scale: float = 1.0
    port: int = 0
    host: str = "127.0.0.1"
    n_ctx: int = 4096
    load_time_s: float = 0.0
    similarity: float = 0.10
    cache_ram_mib: int = 8192
    cache_idle_slots: bool = True
    kv_unified: bool = False
    cache_ram_tokens: int | None = None
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
        if self.cache_ram_mib < -1:
            raise ValueError("cache_ram_mib must be >= -1")
        if self.cache_ram_tokens is not None and self.cache_ram_tokens < 0:
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

    @property
    def n_ctx_total(self) -> int:
        """llama-server's ``n_ctx``: the KV cells of all slots together."""
        return self.n_ctx if self.kv_unified else self.n_ctx * self.slots

    def state_size(self) -> StateSize:
        profile = self.resolved_profile()
        # One KV stream per slot, or a single one when unified (llama_context n_stream).
        n_stream = 1 if self.kv_unified else self.slots
        return StateSize(profile.kv_bytes_per_token, profile.n_layer, n_stream)

    def host_cache(self) -> HostCache | None:
        size = self.state_size()
        if self.cache_ram_tokens is not None:
            if self.cache_ram_tokens == 0:
                return None
            per_token = size.of(2) - size.of(1)
            return HostCache(self.cache_ram_tokens * per_token, self.n_ctx_total, size)
        if self.cache_ram_mib == 0:
            return None
        return HostCache.from_mib(self.cache_ram_mib, self.n_ctx_total, size)

    def prompt_caches(self) -> PromptCaches:
        return PromptCaches(
            self.slots,
            similarity=self.similarity,
            host=self.host_cache(),
            cache_idle_slots=self.cache_idle_slots,
            kv_unified=self.kv_unified,
        )
