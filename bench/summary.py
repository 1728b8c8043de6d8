"""Repetitions folded into one row per (regime, workload, contender), and the goal check.

Every figure of a row is the median of its runs with their range (``Spread``); a contender
that ran once has a range of one value. The goal check compares the default llamacpp-ha
policy's medians with the other contenders' medians in the same regime and workload. The
overhead section's repetitions fold the same way (`overhead_rows`), each added latency taken
against direct's of the same repetition first.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from bench.metrics import RunResult
from bench.overhead import OverheadResult, carried_streams, generator_limit

# The round-robin reference of "prompt tokens computed vs round robin": llamacpp-ha's own
# round robin, the one round robin that runs in every regime with every repetition.
ROUND_ROBIN = "ha-round-robin"
LEAST_BUSY = "ha-least-busy"
SGLANG_CA = "sglang-ca"
# Workloads whose requests build on earlier ones (conversations), where affinity must halve
# the prompt tokens computed.
MULTI_TURN = ("chat", "mooncake")
# Below this capacity ceiling the fleet's caches allow no hit rate worth a goal (random
# prompts share nothing).
MEANINGFUL_CEILING = 0.05


@dataclass(frozen=True)
class Spread:
    median: float
    lo: float
    hi: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float | None]) -> Spread | None:
        present = [float(v) for v in values if v is not None]
        if not present:
            return None
        return cls(statistics.median(present), min(present), max(present), len(present))


@dataclass
class Aggregate:
    """One contender on one workload of one regime, over its repetitions."""

    regime: str
    workload: str
    contender: str
    label: str
    runs: int
    requests: Spread | None
    completed: Spread | None
    failed: int  # summed over the runs
    rejected: int
    ttft_p50_ms: Spread | None
    ttft_p90_ms: Spread | None
    ttft_p99_ms: Spread | None
    e2e_p50_s: Spread | None
    e2e_p99_s: Spread | None
    tpot_ms: Spread | None
    req_per_s: Spread | None
    out_tok_per_s: Spread | None
    hit_rate: Spread | None
    prompt_tokens_computed: Spread | None
    computed_vs_round_robin: Spread | None
    requests_deferred_max: Spread | None
    max_reorder_delay_s: Spread | None
    max_cache_wait_s: Spread | None
    imbalance: Spread | None
    balancer_cpu_ms_per_request: Spread | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _cpu_per_request(r: RunResult) -> float | None:
    if r.balancer_cpu_s is None or not r.requests:
        return None
    return r.balancer_cpu_s / r.requests * 1000


def aggregate(results: list[RunResult], labels: dict[str, str]) -> list[Aggregate]:
    """One row per (regime, workload, contender), in the order the runs were made."""
    groups: dict[tuple[str, str, str], list[RunResult]] = {}
    for r in results:
        groups.setdefault((r.regime, r.workload, r.contender), []).append(r)
    # The reference's prompt tokens computed, by (regime, workload, rep): the same workload.
    reference = {
        (r.regime, r.workload, r.rep): r.prompt_tokens_computed
        for r in results
        if r.contender == ROUND_ROBIN
    }

    def vs_rr(r: RunResult) -> float | None:
        base = reference.get((r.regime, r.workload, r.rep))
        return r.prompt_tokens_computed / base if base else None

    out = []
    for (regime, workload, contender), runs in groups.items():
        out.append(
            Aggregate(
                regime=regime,
                workload=workload,
                contender=contender,
                label=labels.get(contender, contender),
                runs=len(runs),
                requests=Spread.of([r.requests for r in runs]),
                completed=Spread.of([r.completed for r in runs]),
                failed=sum(r.failed for r in runs),
                rejected=sum(r.rejected for r in runs),
                ttft_p50_ms=Spread.of([r.ttft_ms["p50"] for r in runs]),
                ttft_p90_ms=Spread.of([r.ttft_ms["p90"] for r in runs]),
                ttft_p99_ms=Spread.of([r.ttft_ms["p99"] for r in runs]),
                e2e_p50_s=Spread.of([r.e2e_s["p50"] for r in runs]),
                e2e_p99_s=Spread.of([r.e2e_s["p99"] for r in runs]),
                tpot_ms=Spread.of([r.tpot_ms for r in runs]),
                req_per_s=Spread.of([r.req_per_s for r in runs]),
                out_tok_per_s=Spread.of([r.out_tok_per_s for r in runs]),
                hit_rate=Spread.of([r.hit_rate for r in runs]),
                prompt_tokens_computed=Spread.of([r.prompt_tokens_computed for r in runs]),
                computed_vs_round_robin=Spread.of([vs_rr(r) for r in runs]),
                requests_deferred_max=Spread.of([r.requests_deferred_max for r in runs]),
                max_reorder_delay_s=Spread.of([r.max_reorder_delay_s for r in runs]),
                max_cache_wait_s=Spread.of([r.max_cache_wait_s for r in runs]),
                imbalance=Spread.of([r.imbalance for r in runs]),
                balancer_cpu_ms_per_request=Spread.of([_cpu_per_request(r) for r in runs]),
            )
        )
    return out


def spread_from_json(value: dict[str, Any] | None) -> Spread | None:
    return None if value is None else Spread(**value)


def aggregate_from_json(data: dict[str, Any]) -> Aggregate:
    fields: dict[str, Any] = {
        k: spread_from_json(v) if isinstance(v, dict) or v is None else v for k, v in data.items()
    }
    return Aggregate(**fields)


# -- the goal check --------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """One cell: ``ok`` is None where the goal does not apply or a figure is missing."""

    ok: bool | None
    figure: str

    def cell(self) -> str:
        if self.ok is None:
            return f"- ({self.figure})" if self.figure else "-"
        return f"{'yes' if self.ok else '**no**'} ({self.figure})"


GOALS: tuple[tuple[str, str], ...] = (
    ("hit_vs_sglang", "hit rate >= sglang-ca's"),
    ("hit_vs_ceiling", "hit rate >= 0.9 x the fleet's ceiling"),
    ("computed_vs_rr", "prompt tokens computed <= 0.5 x round robin's"),
    ("ttft_p50", "TTFT p50 <= every contender's"),
    ("ttft_p99", "TTFT p99 <= 0.67 x sglang-ca's and <= ha-least-busy's"),
    ("throughput", "throughput >= every contender's - 3%"),
    ("random_vs_lb", "random: TTFT p50/p99 within 3% of ha-least-busy"),
    ("deferred", "requests_deferred = 0"),
)


def _m(s: Spread | None) -> float | None:
    return None if s is None else s.median


def _ms(v: float) -> str:
    return f"{v:,.0f} ms"


def goal_check(
    rows: list[Aggregate], default: str, capacity: dict[str, float | None]
) -> dict[str, dict[str, Verdict]]:
    """For each workload of one regime: goal -> verdict for the ``default`` contender."""
    out: dict[str, dict[str, Verdict]] = {}
    workloads = list(dict.fromkeys(r.workload for r in rows))
    for name in workloads:
        mine = {r.contender: r for r in rows if r.workload == name}
        me = mine.get(default)
        if me is None:
            continue
        others = [r for k, r in mine.items() if k != default]
        out[name] = {
            "hit_vs_sglang": _hit_vs_sglang(me, mine.get(SGLANG_CA)),
            "hit_vs_ceiling": _hit_vs_ceiling(me, capacity.get(name)),
            "computed_vs_rr": _computed_vs_rr(me, name),
            "ttft_p50": _ttft_p50(me, others),
            "ttft_p99": _ttft_p99(me, mine.get(SGLANG_CA), mine.get(LEAST_BUSY)),
            "throughput": _throughput(me, others),
            "random_vs_lb": _random_vs_lb(me, mine.get(LEAST_BUSY), name),
            "deferred": _deferred(me),
        }
    return out


def _hit_vs_sglang(me: Aggregate, sglang: Aggregate | None) -> Verdict:
    mine, theirs = _m(me.hit_rate), _m(sglang.hit_rate) if sglang else None
    if mine is None or theirs is None:
        return Verdict(None, "no sglang-ca run" if sglang is None else "n/a")
    return Verdict(mine >= theirs, f"{mine:.1%} vs {theirs:.1%}")


def _hit_vs_ceiling(me: Aggregate, ceiling: float | None) -> Verdict:
    mine = _m(me.hit_rate)
    if mine is None or ceiling is None:
        return Verdict(None, "n/a")
    if ceiling < MEANINGFUL_CEILING:
        return Verdict(None, f"ceiling {ceiling:.1%}")
    return Verdict(mine >= 0.9 * ceiling, f"{mine:.1%} vs 0.9 x {ceiling:.1%}")


def _computed_vs_rr(me: Aggregate, workload: str) -> Verdict:
    if not workload.startswith(MULTI_TURN):
        return Verdict(None, "")
    ratio = _m(me.computed_vs_round_robin)
    if ratio is None:
        return Verdict(None, "no round-robin run")
    return Verdict(ratio <= 0.5, f"{ratio:.2f} x round robin's")


def _ttft_p50(me: Aggregate, others: list[Aggregate]) -> Verdict:
    mine = _m(me.ttft_p50_ms)
    theirs = [(r.contender, v) for r in others if (v := _m(r.ttft_p50_ms)) is not None]
    if mine is None or not theirs:
        return Verdict(None, "n/a")
    best_key, best = min(theirs, key=lambda kv: kv[1])
    return Verdict(mine <= best, f"{_ms(mine)} vs {best_key} {_ms(best)}")


def _ttft_p99(me: Aggregate, sglang: Aggregate | None, lb: Aggregate | None) -> Verdict:
    mine = _m(me.ttft_p99_ms)
    sg = _m(sglang.ttft_p99_ms) if sglang else None
    least = _m(lb.ttft_p99_ms) if lb else None
    if mine is None or (sg is None and least is None):
        return Verdict(None, "n/a")
    ok = (sg is None or mine <= 0.67 * sg) and (least is None or mine <= least)
    parts = [_ms(mine)]
    if sg is not None:
        parts.append(f"sglang-ca {_ms(sg)}")
    if least is not None:
        parts.append(f"least-busy {_ms(least)}")
    return Verdict(ok, " vs ".join(parts))


def _throughput(me: Aggregate, others: list[Aggregate]) -> Verdict:
    mine = _m(me.out_tok_per_s)
    theirs = [(r.contender, v) for r in others if (v := _m(r.out_tok_per_s)) is not None]
    if mine is None or not theirs:
        return Verdict(None, "n/a")
    best_key, best = max(theirs, key=lambda kv: kv[1])
    return Verdict(mine >= 0.97 * best, f"{mine:,.0f} vs {best_key} {best:,.0f} tok/s")


def _random_vs_lb(me: Aggregate, lb: Aggregate | None, workload: str) -> Verdict:
    if not workload.startswith("random"):
        return Verdict(None, "")
    if lb is None or me.contender == LEAST_BUSY:
        return Verdict(None, "no ha-least-busy run" if lb is None else "is least busy")
    pairs = [(_m(me.ttft_p50_ms), _m(lb.ttft_p50_ms)), (_m(me.ttft_p99_ms), _m(lb.ttft_p99_ms))]
    if any(a is None or b is None for a, b in pairs):
        return Verdict(None, "n/a")
    ok = all(a <= 1.03 * b for a, b in pairs if a is not None and b is not None)
    figure = ", ".join(
        f"{q} {a / b - 1:+.1%}" for q, (a, b) in zip(("p50", "p99"), pairs, strict=True) if a and b
    )
    return Verdict(ok, figure)


def _deferred(me: Aggregate) -> Verdict:
    d = me.requests_deferred_max
    if d is None:
        return Verdict(None, "n/a")
    rng = "" if d.lo == d.hi else f" [{d.lo:.0f}-{d.hi:.0f}]"
    return Verdict(d.median == 0, f"{d.median:.0f}{rng}")


# -- the overhead section ----------------------------------------------------------------------


@dataclass
class OverheadRow:
    """One contender's overhead figures over the repetitions. The TTFT figures are added to
    direct's of the same repetition (direct's own row: its absolute TTFT)."""

    contender: str
    label: str
    reps: int
    ttft_low_p50_ms: Spread | None
    ttft_low_p99_ms: Spread | None
    ttft_high_p50_ms: Spread | None
    ttft_high_p99_ms: Spread | None
    cpu_ms_per_request: Spread | None
    cpu_ms_per_stream1: Spread | None
    cpu_us_per_chunk: Spread | None
    rss_idle_mb: Spread | None
    rss_kb_per_stream: Spread | None
    open_streams: Spread | None
    carried: Spread | None  # most streams relayed within the limit
    carried_why: tuple[str, ...]  # per repetition: limit, generator or max (see carried_streams)
    failures: int  # summed over the repetitions

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _minus(mine: float | None, theirs: float | None) -> float | None:
    return None if mine is None or theirs is None else mine - theirs


def overhead_rows(over: list[OverheadResult], labels: dict[str, str]) -> list[OverheadRow]:
    """One row per contender, in the order they first ran."""
    direct = {o.rep: o for o in over if o.contender == "direct"}
    groups: dict[str, list[OverheadResult]] = {}
    for o in over:
        groups.setdefault(o.contender, []).append(o)
    rows = []
    for key, runs in groups.items():
        is_direct = key == "direct"

        def ttft(o: OverheadResult, phase: str, q: str, absolute: bool = is_direct) -> float | None:
            mine = getattr(o, phase).get(q)
            if absolute:
                return None if mine is None else float(mine)
            base = direct.get(o.rep)
            theirs = None if base is None else getattr(base, phase).get(q)
            return _minus(mine, theirs)

        carried: list[float | None] = []
        why: list[str] = []
        for o in runs:
            if is_direct:
                carried.append(generator_limit(o.relay_ms))
                why.append("generator")
                continue
            base = direct.get(o.rep)
            n, reason = carried_streams(o, base.relay_ms if base is not None else {})
            carried.append(n)
            why.append(reason)
        rows.append(
            OverheadRow(
                contender=key,
                label=labels.get(key, runs[0].label),
                reps=len(runs),
                ttft_low_p50_ms=Spread.of([ttft(o, "ttft_low_ms", "p50") for o in runs]),
                ttft_low_p99_ms=Spread.of([ttft(o, "ttft_low_ms", "p99") for o in runs]),
                ttft_high_p50_ms=Spread.of([ttft(o, "ttft_high_ms", "p50") for o in runs]),
                ttft_high_p99_ms=Spread.of([ttft(o, "ttft_high_ms", "p99") for o in runs]),
                cpu_ms_per_request=Spread.of([o.cpu_ms_per_request for o in runs]),
                cpu_ms_per_stream1=Spread.of([o.cpu_ms_per_stream1 for o in runs]),
                cpu_us_per_chunk=Spread.of([o.cpu_us_per_chunk for o in runs]),
                rss_idle_mb=Spread.of([o.rss_idle_mb for o in runs]),
                rss_kb_per_stream=Spread.of([o.rss_kb_per_stream for o in runs]),
                open_streams=Spread.of([o.open_streams for o in runs]),
                carried=Spread.of(carried),
                carried_why=tuple(why),
                failures=sum(o.failures for o in runs),
            )
        )
    return rows
