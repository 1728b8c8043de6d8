"""PNG plots of a full run (matplotlib lives in bench/.venv only, so the smoke run skips this)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on the benchmark machine

import matplotlib.pyplot as plt

from bench.client import Outcome
from bench.metrics import RunResult
from bench.overhead import RELAY_LIMIT_MS, OverheadResult

_COLORS = {
    "direct": "#888888",
    "ha-affinity": "#d62728",
    "ha-affinity-least-busy": "#ff7f0e",
    "ha-least-busy": "#ffbb78",
    "ha-round-robin": "#ff9896",
    "nginx-rr": "#2ca02c",
    "nginx-lc": "#98df8a",
    "haproxy": "#1f77b4",
    "sglang-ca": "#9467bd",
    "sglang-rr": "#c5b0d5",
    "litellm": "#8c564b",
}


def _color(key: str) -> str:
    return _COLORS.get(key, "#333333")


def _ttft_bars(out: Path, results: list[RunResult], context: dict[str, Any]) -> str:
    names = [w["name"] for w in context["workloads"]]
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4.6), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        mine = [r for r in results if r.workload == name]
        xs = range(len(mine))
        p50 = [r.ttft_ms["p50"] or 0 for r in mine]
        p99 = [r.ttft_ms["p99"] or 0 for r in mine]
        ax.bar(xs, p99, color=[_color(r.contender) for r in mine], alpha=0.35, label="p99")
        ax.bar(xs, p50, color=[_color(r.contender) for r in mine], label="p50")
        ax.set_xticks(list(xs), [r.contender for r in mine], rotation=60, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_title(name, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("time to first token, ms (wall; solid p50, light p99)")
    fig.suptitle(f"Time to first token by workload (time scale {context['time_scale']:g})")
    fig.tight_layout()
    path = "ttft.png"
    fig.savefig(out / path, dpi=110)
    plt.close(fig)
    return path


def _hit_bars(out: Path, results: list[RunResult], context: dict[str, Any]) -> str:
    names = [w["name"] for w in context["workloads"]]
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4.4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        mine = [r for r in results if r.workload == name]
        xs = range(len(mine))
        ax.bar(
            xs,
            [(r.hit_rate or 0) * 100 for r in mine],
            color=[_color(r.contender) for r in mine],
        )
        ax.axhline(context["ceilings"][name] * 100, color="black", ls="--", lw=1)
        ax.text(0, context["ceilings"][name] * 100 + 1, "ceiling, infinite caches", fontsize=8)
        capacity = (context.get("capacity_ceilings") or {}).get(name)
        if capacity is not None:
            ax.axhline(capacity * 100, color="black", ls=":", lw=1)
            ax.text(0, capacity * 100 + 1, "ceiling, the fleet's caches", fontsize=8)
        ax.set_xticks(list(xs), [r.contender for r in mine], rotation=60, ha="right", fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_title(name, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("prompt tokens served from cache, %")
    fig.suptitle("Prompt cache hit rate (token-weighted, from the backends' counters)")
    fig.tight_layout()
    path = "cache-hit.png"
    fig.savefig(out / path, dpi=110)
    plt.close(fig)
    return path


def _ttft_cdf(out: Path, raw: dict[str, dict[str, list[Outcome]]], workload: str) -> str | None:
    runs = raw.get(workload)
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
    ax.set_title(f"TTFT distribution, {workload}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = f"ttft-cdf-{workload}.png"
    fig.savefig(out / path, dpi=110)
    plt.close(fig)
    return path


def _relay(out: Path, over: list[OverheadResult]) -> str | None:
    if not over:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for o in over:
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
    ax.set_xlabel("concurrent streams (10 chunks/s each)")
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
    raw: dict[str, dict[str, list[Outcome]]],
    over: list[OverheadResult],
    context: dict[str, Any],
) -> list[str]:
    paths = []
    if results:
        paths += [_ttft_bars(out, results, context), _hit_bars(out, results, context)]
    for name in ("chat-saturated", "mooncake"):
        cdf = _ttft_cdf(out, raw, name)
        if cdf:
            paths.append(cdf)
    relay = _relay(out, over)
    if relay:
        paths.append(relay)
    return paths
