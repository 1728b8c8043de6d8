"""The two regimes of the benchmark: a fleet, its time scales and the workloads sized for it.

- ``decode-bound``: Llama 3 8B on GPUs (the simulator's ``gpu-8b``: prefill 3,000 tokens/s,
  decode 90 tokens/s, 128 KiB of KV per token): a miss on a 1,000-token system prompt costs a
  third of a second, a 150-token reply about two seconds, so what cache affinity saves is small
  next to decoding. The workloads of the earlier single-regime benchmark, sampled larger.
- ``prefill-bound``: Llama 3 70B on GPUs (``gpu-70b``: prefill 600 tokens/s, decode 20
  tokens/s, 320 KiB of KV per token) with prompts closer to their real sizes: the Mooncake
  trace at a quarter of its token lengths instead of a sixteenth (prompts of ~2,900 tokens on
  average, capped at 6,000), 4,000-token system prompts, 1,400-3,400-token random prompts. A
  miss costs seconds and stalls every other slot of its backend while it is computed (a step's
  batch carries the prompt's tokens), which is what llama.cpp hardware does.

Both fleets have the same slots (4, 4, 2, 2), n_ctx 8192 per slot and ``--cache-ram`` 8192 MiB
per backend, llama-server's default: about 65k tokens of the 8B model's KV but only about 26k
of the 70B model's, a handful of Mooncake prompts per backend. The capacity ceiling shows where
that host cache binds: for the prefill-bound Mooncake sample the fleet's ceiling is 41-44% with
8192 MiB against 47-55% with 16 times as much (the three repetitions' samples), so the host
cache's capacity matters there; for the chat and burst workloads of either regime (three
system prompts, 3-12k tokens) and the decode-bound Mooncake sample the ceiling is the same
with 16 times the cache, and the gap to the infinite-cache ceiling is llama-server's rules and
timing, not capacity.

Arrival rates put each fleet under comparable load: the medium chat at about half of what the
fleet serves, the saturated chat a little over all of it (~125% of the fleet's rate on cached
turns), the Mooncake sample and the random prompts at about half to two thirds of the fleet
(the 4-slot backends, which get twice the traffic of the 2-slot ones under any slot-weighted
routing but compute prompts no faster, at the top of that), the bursts five times 40
requests. Every workload has at least 200 requests per seed (the Mooncake sample is 160
conversations, ~480-500 requests, four times the earlier 40 over a four times longer span), so
p99 is not one request. Time scales keep every run at 10-25 s of wall time and a stream of at
most a few thousand chunks a second: 8 for the decode-bound fleet (10 for its Mooncake
sample), 32 for the prefill-bound one (96 for Mooncake, whose ~1,400 model seconds load the
fleet like the others; 56 for random, 40 for the bursts).
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
            "token: --cache-ram 8192 MiB holds ~65k tokens per backend, more than any workload "
            "here needs); 1,000-token system prompts, 600-1,400-token random prompts, the "
            "Mooncake trace's lengths / 16 (~900-token prompts)",
            FleetSpec(SLOTS, ("gpu-8b",) * len(SLOTS), 8.0),
            decode_bound_workloads,
            peers_once=True,
            time_scales={"mooncake": 10.0},
        ),
        Regime(
            "prefill-bound",
            "Prefill-bound: a 70B model, misses cost seconds",
            "gpu-70b backends (prefill 600 tokens/s, decode 20 tokens/s, 320 KiB of KV per "
            "token: --cache-ram 8192 MiB holds ~26k tokens per backend, which bounds the "
            "Mooncake sample's fleet ceiling: 41-44% against 47-55% with 16 times the cache); "
            "4,000-token system prompts, 1,400-3,400-token random prompts, the Mooncake trace's "
            "lengths / 4 (~2,900-token prompts)",
            FleetSpec(SLOTS, ("gpu-70b",) * len(SLOTS), 32.0),
            prefill_bound_workloads,
            # Mooncake's 160 conversations of ~2,900-token prompts need ~1,400 model seconds
            # to load the fleet as much as the other workloads do, random's ~700.
            time_scales={"mooncake": 96.0, "random": 56.0, "burst": 40.0},
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
