"""From raw outcomes and backend counters to the numbers of one (workload, contender) run."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.client import Outcome
from bench.fleet import BackendCounters


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default), ``q`` in [0, 100]."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass
class RunResult:
    """Everything reported about one contender on one workload."""

    workload: str
    contender: str
    label: str
    requests: int
    completed: int
    failed: int
    rejected: int
    unfinished: int
    wall_s: float
    ttft_ms: dict[str, float | None]
    e2e_s: dict[str, float | None]
    tpot_ms: float | None
    req_per_s: float
    out_tok_per_s: float
    prompt_tokens_computed: int
    prompt_tokens_cached: int
    hit_rate: float | None
    hit_rate_client: float | None
    imbalance: float | None
    tasks_per_backend: list[int]
    balancer_cpu_s: float | None
    errors: list[str] = field(default_factory=list)
    regime: str = ""
    rep: int = 0
    seed: int = 0
    # The most requests any one backend held deferred (llama-server's
    # ``llamacpp:requests_deferred`` gauge, sampled every ~200 ms during the run).
    requests_deferred_max: int | None = None
    # llamacpp-ha's own account (``routing.*`` of ``/monitor/data``), when its version has it.
    max_reorder_delay_s: float | None = None
    max_cache_wait_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def summarize(
    workload: str,
    contender: str,
    label: str,
    outcomes: list[Outcome],
    counters: list[BackendCounters],
    slots: list[int],
    balancer_cpu_s: float | None,
) -> RunResult:
    ok = [o for o in outcomes if o.ok]
    rejected = sum(1 for o in outcomes if o.rejected)
    unfinished = sum(1 for o in outcomes if o.error and o.error.startswith("unfinished"))
    failed = len(outcomes) - len(ok) - rejected
    ttft = [o.ttft_s * 1000 for o in ok if o.ttft_s is not None]
    e2e = [o.e2e_s for o in ok if o.e2e_s is not None]
    tpot = [o.tpot_s * 1000 for o in ok if o.tpot_s is not None]
    if ok:
        start = min(o.sent_at for o in ok)
        end = max(o.done_at or 0.0 for o in ok)
        active = max(end - start, 1e-9)
    else:
        active = 1e-9
    out_tokens = sum(o.output_tokens for o in ok)
    computed = sum(c.prompt_tokens for c in counters)
    cached = sum(c.cached_tokens for c in counters)
    client_prompt = sum(o.prompt_tokens or 0 for o in ok)
    client_cached = [o.cached_tokens for o in ok if o.cached_tokens is not None]
    tasks = [c.tasks for c in counters]
    imbalance = None
    if sum(tasks) > 0:
        # The busiest backend's requests per slot over the fleet's: 1.0 is a share exactly
        # proportional to slots; affinity may trade some of this for cache hits, on purpose.
        fair = sum(tasks) / sum(slots)
        imbalance = max(t / s for t, s in zip(tasks, slots, strict=True)) / fair
    errors: list[str] = []
    for o in outcomes:
        if o.error and o.error not in errors and len(errors) < 4:
            errors.append(o.error)
    return RunResult(
        workload=workload,
        contender=contender,
        label=label,
        requests=len(outcomes),
        completed=len(ok),
        failed=failed,
        rejected=rejected,
        unfinished=unfinished,
        wall_s=round(active, 3),
        ttft_ms={f"p{q}": percentile(ttft, q) for q in (50, 90, 99)},
        e2e_s={f"p{q}": percentile(e2e, q) for q in (50, 99)},
        tpot_ms=sum(tpot) / len(tpot) if tpot else None,
        req_per_s=len(ok) / active,
        out_tok_per_s=out_tokens / active,
        prompt_tokens_computed=computed,
        prompt_tokens_cached=cached,
        hit_rate=cached / (cached + computed) if cached + computed else None,
        hit_rate_client=(
            sum(client_cached) / client_prompt
            if client_prompt and len(client_cached) == len(ok)
            else None
        ),
        imbalance=imbalance,
        tasks_per_backend=tasks,
        balancer_cpu_s=balancer_cpu_s,
        errors=errors,
    )
