"""The two regimes of the benchmark: a fleet, its time scale and the workloads sized for it.

- ``decode-bound``: Llama 3 8B on GPUs (the simulator's ``gpu-8b``, prefill 3,000 tokens/s):
  a miss on a 1,000-token system prompt costs a third of a second, a reply of 150 tokens about
  two seconds, so what a router's cache affinity saves is small next to decoding.
- ``prefill-bound``: Llama 3 70B on GPUs (``gpu-70b``, prefill 600 tokens/s, 320 KiB of KV per
  token) with prompts at close to their real sizes (the Mooncake trace at a quarter of its
  token lengths instead of a sixteenth; 4,000-token system prompts; 3,000-token random
  prompts): a miss costs seconds and stalls every other slot of its backend while it is
  computed, which is what llama.cpp hardware does.

Both fleets have the same slots (4, 4, 2, 2) and ``--cache-ram`` 8192 MiB per backend, which
holds about 65k tokens of the 8B model's KV but only about 26k of the 70B model's: a few
Mooncake prompts or conversations per backend, so the host cache's capacity matters there (the
capacity ceiling says by how much). Arrival rates put each fleet under comparable load: the
medium chat at about half of what the fleet serves, the saturated chat a little over all of it.
Each workload has at least 200 requests (the Mooncake sample is 160 conversations, four times
the previous 40, over a four times longer span) so that p99 is not one request.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from bench import workloads as wl
from bench.fleet import FleetSpec

SLOTS = (4, 4, 2, 2)
# The prefill-bound regime's system prompts (three of them, as in the decode-bound regime).
SYSTEM_70B = 4000


@dataclass(frozen=True)
class Regime:
    name: str
    title: str
    description: str
    spec: FleetSpec
    workloads: Callable[[int], list[wl.Workload]]
    # Contenders other than the routing ones (every llamacpp-ha policy, SGLang's cache_aware,
    # HAProxy) run here, once.
    peers_once: bool = False
    # Time scales of single workloads, where the regime's (``spec.time_scale``) would make a
    # run too long or its stream of chunks too dense for two cores: workload name -> scale.
    time_scales: Mapping[str, float] = field(default_factory=dict)

    def spec_for(self, workload: str) -> FleetSpec:
        scale = self.time_scales.get(workload)
        return self.spec if scale is None else replace(self.spec, time_scale=scale)

    def with_time_scale(self, time_scale: float) -> Regime:
        """Every workload at ``time_scale``."""
        return replace(self, spec=replace(self.spec, time_scale=time_scale), time_scales={})


def _trace() -> bool:
    return (wl.TRACE / wl.TRACE_FILE).exists()


def decode_bound_workloads(seed: int) -> list[wl.Workload]:
    # The fleet serves ~6 chat requests per model second (12 slots, ~2 s a 150-token reply):
    # chat-medium offers about half of that, chat-saturated a little more than all of it.
    out = [
        wl.chat(seed, "chat-medium", sessions_per_s=0.8, span_s=84),
        wl.chat(seed, "chat-saturated", sessions_per_s=2.2, span_s=32),
    ]
    if _trace():
        out.append(wl.mooncake(seed, "mooncake", wl.TraceScale(conversations=160, span_s=120)))
    out += [
        wl.random_prompts(seed, "random", rate_per_s=3.0, span_s=76),
        wl.burst(seed, "burst", per_burst=40, n_bursts=5, gap_s=12),
    ]
    return out


def prefill_bound_workloads(seed: int) -> list[wl.Workload]:
    # A 70B backend decodes a 150-token reply in ~8 model seconds and computes 600 prompt
    # tokens a second for all its slots at once: 4,000 tokens missed are ~7 s of a stalled
    # backend. The fleet serves ~1.3 cached chat requests per model second.
    out = [
        wl.chat(seed, "chat-medium", sessions_per_s=0.2, span_s=350, system_tokens=SYSTEM_70B),
        wl.chat(seed, "chat-saturated", sessions_per_s=0.42, span_s=165, system_tokens=SYSTEM_70B),
    ]
    if _trace():
        scale = wl.TraceScale(conversations=160, span_s=1440, token_divisor=4)
        out.append(wl.mooncake(seed, "mooncake", scale))
    out += [
        wl.random_prompts(
            seed, "random", rate_per_s=0.33, span_s=700, prompt_tokens=2400, spread=1000
        ),
        wl.burst(seed, "burst", per_burst=40, n_bursts=5, gap_s=50, system_tokens=SYSTEM_70B),
    ]
    return out


REGIMES: dict[str, Regime] = {
    r.name: r
    for r in (
        Regime(
            "decode-bound",
            "Decode-bound: an 8B model, misses are cheap",
            "gpu-8b backends (prefill 3,000 tokens/s, decode 90 tokens/s, 128 KiB of KV per "
            "token: --cache-ram 8192 MiB holds ~65k tokens per backend); 1,000-token system "
            "prompts, the Mooncake trace's lengths / 16",
            FleetSpec(SLOTS, ("gpu-8b",) * len(SLOTS), 8.0),
            decode_bound_workloads,
            peers_once=True,
        ),
        Regime(
            "prefill-bound",
            "Prefill-bound: a 70B model, misses cost seconds",
            "gpu-70b backends (prefill 600 tokens/s, decode 20 tokens/s, 320 KiB of KV per "
            "token: --cache-ram 8192 MiB holds ~26k tokens per backend); 4,000-token system "
            "prompts, 3,000-token random prompts, the Mooncake trace's lengths / 4",
            FleetSpec(SLOTS, ("gpu-70b",) * len(SLOTS), 32.0),
            prefill_bound_workloads,
            # Mooncake's 160 conversations of ~3,000-token prompts need ~1,400 model seconds
            # to load the fleet as much as the other workloads do, random's ~700.
            time_scales={"mooncake": 80.0, "random": 56.0, "burst": 40.0},
        ),
    )
}


def smoke_regime() -> Regime:
    def workloads(seed: int) -> list[wl.Workload]:
        out = [
            wl.chat(
                seed, "chat-smoke", sessions_per_s=1.5, span_s=3, system_tokens=200, turns=(2, 3)
            ),
            wl.random_prompts(seed, "random-smoke", rate_per_s=2.0, span_s=3, prompt_tokens=500),
            wl.burst(seed, "burst-smoke", per_burst=8, n_bursts=1),
        ]
        if _trace():
            out.append(
                wl.mooncake(seed, "mooncake-smoke", wl.TraceScale(conversations=3, span_s=3))
            )
        return out

    return Regime(
        "decode-bound",
        "Smoke: two small gpu-8b backends",
        "two gpu-8b backends of 2 slots, tiny workloads",
        FleetSpec((2, 2), ("gpu-8b", "gpu-8b"), 20.0),
        workloads,
        peers_once=True,
    )
