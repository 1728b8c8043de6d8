"""PNG plots of a full run (matplotlib lives in bench/.venv only, so the smoke run skips this).

Per regime: time to first token and cache hit rate by workload and contender (medians over the
repetitions, the bars' whiskers their range) and, for the first repetition, the distribution
of time to first token on the saturated chat and the Mooncake trace; then the overhead
section's relay delays.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on the benchmark machine

import matplotlib.pyplot as plt

from bench.client import Outcome
from bench.metrics import RunResult
from bench.overhead import RELAY_LIMIT_MS, OverheadResult
from bench.summary import Aggregate, Spread, aggregate

_COLORS = {
    "direct": "#888888",
    "ha-affinity": "#d62728",
    "ha-affinity-least-busy": "#ff7f0e",
    "ha-least-busy": "#ffbb78",
    "ha-round-robin": "#ff9896",
    "ha-cost": "#e377c2",
    "nginx-rr": "#2ca02c",
    "nginx-lc": "#98df8a",
    "haproxy": "#1f77b4",
    "sglang-ca": "#9467bd",
    "sglang-rr": "#c5b0d5",
    "litellm": "#8c564b",
}


def _color(key: str) -> str:
    return _COLORS.get(key, "#333333")


def _bars(
    ax: Any, rows: list[Aggregate], values: list[Spread | None], scale: float, alpha: float
) -> None:
    xs = list(range(len(rows)))
    mid = [(v.median if v else 0.0) * scale for v in values]
    low = [m - (v.lo * scale if v else m) for m, v in zip(mid, values, strict=True)]
    high = [(v.hi * scale if v else m) - m for m, v in zip(mid, values, strict=True)]
    ax.bar(
        xs,
        mid,
        color=[_color(r.contender) for r in rows],
        alpha=alpha,
        yerr=[low, high],
        ecolor="black",
        capsize=2,
        error_kw={"lw": 0.8, "alpha": 0.7},
    )


def _names(regime: dict[str, Any]) -> list[str]:
    return [w["name"] for w in regime["workloads"]]


def _ttft_bars(out: Path, rows: list[Aggregate], regime: dict[str, Any]) -> str:
    names = _names(regime)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4.6), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        mine = [r for r in rows if r.workload == name]
        _bars(ax, mine, [r.ttft_p99_ms for r in mine], 1.0, 0.35)
        _bars(ax, mine, [r.ttft_p50_ms for r in mine], 1.0, 1.0)
        ax.set_xticks(
            list(range(len(mine))), [r.contender for r in mine], rotation=60, ha="right", fontsize=8
        )
        ax.set_yscale("log")
        ax.set_title(name, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("time to first token, ms (wall; solid p50, light p99)")
    fig.suptitle(
        f"{regime['name']}: time to first token by workload (wall clock at each workload's "
        "time scale), medians and range over the runs"
    )
    fig.tight_layout()
    path = f"{regime['name']}-ttft.png"
    fig.savefig(out / path, dpi=110)
    plt.close(fig)
    return path


def _hit_bars(out: Path, rows: list[Aggregate], regime: dict[str, Any]) -> str:
    names = _names(regime)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4.4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        mine = [r for r in rows if r.workload == name]
        _bars(ax, mine, [r.hit_rate for r in mine], 100.0, 1.0)
        infinite = Spread.of(regime["ceilings"].get(name) or [])
        if infinite is not None:
            ax.axhline(infinite.median * 100, color="black", ls="--", lw=1)
            ax.text(0, infinite.median * 100 + 1, "ceiling, infinite caches", fontsize=8)
        capacity = Spread.of((regime.get("capacity_ceilings") or {}).get(name) or [])
        if capacity is not None:
            ax.axhline(capacity.median * 100, color="black", ls=":", lw=1)
            ax.text(0, capacity.median * 100 + 1, "ceiling, the fleet's caches", fontsize=8)
        ax.set_xticks(
            list(range(len(mine))), [r.contender for r in mine], rotation=60, ha="right", fontsize=8
        )
        ax.set_ylim(0, 100)
        ax.set_title(name, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("prompt tokens served from cache, %")
    fig.suptitle(
        f"{regime['name']}: prompt cache hit rate (token-weighted, from the backends' "
        "counters), medians and range over the runs"
    )
    fig.tight_layout()
    path = f"{regime['name']}-cache-hit.png"
    fig.savefig(out / path, dpi=110)
    plt.close(fig)
    return path


def _ttft_cdf(
    out: Path, regime: str, runs: dict[str, list[Outcome]] | None, workload: str
) -> str | None:
    if not runs:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, outcomes in runs.items():
        values = sorted(o.ttft_s * 1000 for o in outcomes if o.ok and o.ttft_s is not None)
        if not values:
            continue
        ys = [(i + 1) / len(values) for i in range(len(values))]
        ax.step(values, ys, where="post", label=key, color=_color(key))
    ax.set_xscale("log")
    ax.set_xlabel("time to first token, ms (wall)")
    ax.set_ylabel("share of requests")
    ax.set_title(f"TTFT distribution, {regime} / {workload} (first repetition)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = f"{regime}-ttft-cdf-{workload}.png"
    fig.savefig(out / path, dpi=110)
    plt.close(fig)
    return path


def _relay(out: Path, over: list[OverheadResult], tick_ms: float) -> str | None:
    if not over:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for o in over:
        if o.rep:
            continue  # the first repetition's ramp: one line per contender
        ns = sorted(o.relay_ms)
        ys = [o.relay_ms[n].get("p99") for n in ns]
        pts = [(n, y) for n, y in zip(ns, ys, strict=True) if y is not None]
        if pts:
            ax.plot(
                *zip(*pts, strict=True), marker="o", label=o.contender, color=_color(o.contender)
            )
    ax.axhline(RELAY_LIMIT_MS, color="black", ls="--", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(f"concurrent streams ({1000 / tick_ms:g} chunks/s each)")
    ax.set_ylabel("p99 delay per chunk, ms (backend write to client read)")
    ax.set_title("Relay delay under concurrent streams")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = "relay-delay.png"
    fig.savefig(out / path, dpi=110)
    plt.close(fig)
    return path


def draw(
    out: Path,
    results: list[RunResult],
    raw: dict[str, dict[str, dict[str, list[Outcome]]]],
    over: list[OverheadResult],
    context: dict[str, Any],
) -> list[str]:
    paths = []
    rows = aggregate(results, context["labels"])
    for regime in context["regimes"]:
        mine = [r for r in rows if r.regime == regime["name"]]
        if mine:
            paths += [_ttft_bars(out, mine, regime), _hit_bars(out, mine, regime)]
        for name in ("chat-saturated", "mooncake"):
            cdf = _ttft_cdf(out, regime["name"], raw.get(regime["name"], {}).get(name), name)
            if cdf:
                paths.append(cdf)
    relay = _relay(out, over, (context.get("overhead_plan") or {}).get("ramp_tick_ms", 100.0))
    if relay:
        paths.append(relay)
    return paths
