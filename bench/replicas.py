"""Several llamacpp-ha replicas behind an L4 balancer, against one: what sharing state costs.

Three setups on the same simulated fleet (the decode-bound regime's), each behind HAProxy in TCP
mode with round robin over connections (what a user puts in front of replicas: it knows
nothing of slots or prompts), for the multi-turn workloads:

- ``1 replica``: one balancer, nothing shared (the single-process default);
- ``1 replica + Redis``: the same with ``--state-url``: every dispatch and release goes through
  Redis, so the difference to the first is the round trips' cost;
- ``3 replicas + Redis``: three balancers sharing state: every turn of a conversation may reach
  another replica, and slots are claimed by three processes at once.

Reported per setup, median over the repetitions [range]: hit rate (from the backends'
counters), TTFT p50 / p99, the most requests a backend ever held deferred (must be 0: never
overfilled), the replicas' Redis round trips (mean and max per claim, from their own account),
claims Redis refused (a slot another replica had just taken), and the hit rate over the single
replica's. Writes ``OUT/REPLICAS.md`` and ``OUT/replicas.json``.

    bench/.venv/bin/python bench/replicas.py --out bench/results [--reps 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp

from bench import fleet, loadgen, metrics, procs
from bench.contenders import Running, _tcp_open, _wait_ready
from bench.regimes import REGIMES
from bench.run import SEED, _wait_idle, cpu_split

WORKLOADS = ("chat-medium", "chat-saturated")
ONLY = {s for s in os.environ.get("REPLICAS_ONLY", "").split(",") if s}
REPS = 3


@dataclass(frozen=True)
class Setup:
    key: str
    label: str
    replicas: int
    shared: bool


SETUPS = (
    Setup("one", "1 replica", 1, False),
    Setup("one-redis", "1 replica + Redis", 1, True),
    Setup("three-redis", "3 replicas + Redis", 3, True),
)


@dataclass
class Started:
    running: Running
    children: list[procs.Child] = field(default_factory=list)
    replica_urls: list[str] = field(default_factory=list)

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()


def start(setup: Setup, urls: list[str], log_dir: Path, cpu: str | None) -> Started:
    started = Started(Running(base_url=None))
    try:
        state: list[str] = []
        if setup.shared:
            binary = shutil.which("redis-server")
            if binary is None:
                raise RuntimeError("redis-server is not installed (Debian package redis-server)")
            port = procs.free_port()
            command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
            redis = procs.spawn(
                "redis", procs.pinned([*command, "--appendonly", "no"], cpu), log_dir
            )
            started.children.append(redis)
            _wait_ready(redis, _tcp_open(port))
            state = ["--state-url", f"redis://127.0.0.1:{port}/0"]
        for i in range(setup.replicas):
            port = procs.free_port()
            command = [sys.executable, "-m", "llamacpp_ha", "--host", "127.0.0.1"]
            command += ["--port", str(port), "--log-level", "warning", *state]
            command += ["--replica-id", f"r{i}"]
            for url in urls:
                command += ["--backend", url]
            child = procs.spawn(f"llamacpp-ha-r{i}", procs.pinned(command, cpu), log_dir)
            started.children.append(child)
            started.replica_urls.append(f"http://127.0.0.1:{port}")
        for child, base in zip(
            started.children[len(started.children) - setup.replicas :],
            started.replica_urls,
            strict=True,
        ):
            _wait_ready(child, _ready(base, len(urls), setup.replicas if setup.shared else 0))
        haproxy = _start_haproxy(started.replica_urls, log_dir, cpu)
        started.children.append(haproxy[0])
        started.running = Running(base_url=haproxy[1], child=haproxy[0])
        return started
    except BaseException:
        started.stop()
        raise


def _ready(base: str, backends: int, replicas: int) -> Any:
    async def ready(session: aiohttp.ClientSession) -> bool:
        async with session.get(base + "/monitor/data") as resp:
            data = await resp.json()
        states = [b.get("state") for b in data.get("backends", [])]
        if len(states) != backends or any(s != "ready" for s in states):
            return False
        shared = data.get("replicas")
        return not replicas or (bool(shared) and len(shared["replicas"]) == replicas)

    return ready


def _start_haproxy(replicas: list[str], log_dir: Path, cpu: str | None) -> tuple[procs.Child, str]:
    binary = shutil.which("haproxy")
    if binary is None:
        raise RuntimeError("haproxy is not installed (Debian package haproxy)")
    port = procs.free_port()
    servers = "\n".join(
        f"  server r{i} {url.removeprefix('http://')}" for i, url in enumerate(replicas)
    )
    conf = f"""
global
  maxconn 8192
  nbthread 1
defaults
  mode tcp
  timeout connect 5s
  timeout client 600s
  timeout server 600s
frontend fe
  bind 127.0.0.1:{port}
  default_backend replicas
backend replicas
  balance roundrobin
{servers}
"""
    log_dir.mkdir(parents=True, exist_ok=True)
    conf_path = log_dir / "haproxy-tcp.cfg"
    conf_path.write_text(conf)
    child = procs.spawn(
        "haproxy", procs.pinned([binary, "-db", "-f", str(conf_path)], cpu), log_dir
    )
    _wait_ready(child, _tcp_open(port))
    return child, f"http://127.0.0.1:{port}"


async def _replica_accounts(urls: list[str]) -> list[dict[str, Any]]:
    found = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        for url in urls:
            async with http.get(url + "/monitor/data") as resp:
                data = await resp.json()
            found.append(
                {
                    "served": data["requests"]["succeeded"],
                    "queue_wait_p95_ms": data["latency_ms"]["queue_wait"]["p95"],
                    **(data.get("replicas") or {}),
                }
            )
    return found


async def _measure(started: Started, workload: Any, fl: fleet.Fleet, deadline_s: float) -> Any:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        before = await fleet.snapshot(http, fl.urls)
    stop = asyncio.Event()
    watcher = asyncio.create_task(fleet.watch_deferred(fl.urls, stop))
    try:
        outcomes, _ = await loadgen.replay(
            started.running, workload, fl.spec.time_scale, deadline_s
        )
    finally:
        stop.set()
        deferred = await watcher
    await _wait_idle(fl.urls)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        after = await fleet.snapshot(http, fl.urls)
    accounts = await _replica_accounts(started.replica_urls)
    return outcomes, fleet.delta(after, before), deferred, accounts


def run(out: Path, reps: int, seed: int) -> list[dict[str, Any]]:
    regime = REGIMES["decode-bound"]
    cpus = cpu_split()
    log_dir = out.resolve() / "logs" / "replicas"
    rows: list[dict[str, Any]] = []
    for rep in range(reps):
        workloads = {w.name: w for w in regime.workloads(seed + rep) if w.name in WORKLOADS}
        for name in WORKLOADS:
            workload = workloads[name]
            spec = regime.spec_for(name)
            for setup in SETUPS:
                if ONLY and setup.key not in ONLY:
                    continue
                where = log_dir / f"{name}--{setup.key}--rep{rep}"
                fl = fleet.start_fleet(spec, where, "fleet", cpus[0])
                t = time.monotonic()
                try:
                    started = start(setup, fl.urls, where, cpus[1])
                    try:
                        deadline = workload.span_s / spec.time_scale + 40.0
                        outcomes, counters, deferred, accounts = asyncio.run(
                            _measure(started, workload, fl, deadline)
                        )
                    finally:
                        started.stop()
                finally:
                    fl.stop()
                result = metrics.summarize(
                    name, setup.key, setup.label, outcomes, counters, list(spec.slots), None
                )
                trips = [a for a in accounts if a.get("round_trip_ms_mean") is not None]
                row = {
                    "workload": name,
                    "setup": setup.key,
                    "label": setup.label,
                    "rep": rep,
                    "seed": seed + rep,
                    "requests": result.requests,
                    "completed": result.completed,
                    "failed": result.failed + result.rejected + result.unfinished,
                    "hit_rate": result.hit_rate,
                    "ttft_p50_ms": result.ttft_ms.get("p50"),
                    "ttft_p99_ms": result.ttft_ms.get("p99"),
                    "deferred_max": deferred,
                    "served_per_replica": [a["served"] for a in accounts],
                    "queue_wait_p95_ms_per_replica": [a["queue_wait_p95_ms"] for a in accounts],
                    "round_trip_ms_mean": statistics.fmean(a["round_trip_ms_mean"] for a in trips)
                    if trips
                    else None,
                    "round_trip_ms_max": max((a["round_trip_ms_max"] for a in trips), default=None),
                    "claims": sum(a.get("claims", 0) for a in accounts),
                    "claims_refused": sum(a.get("claims_refused", 0) for a in accounts),
                    "claims_deferred": sum(a.get("claims_deferred", 0) for a in accounts),
                }
                rows.append(row)
                print(
                    f"replicas: {name} rep {rep} {setup.label:<20} hit {_pct(row['hit_rate'])} "
                    f"ttft {_ms(row['ttft_p50_ms'])}/{_ms(row['ttft_p99_ms'])} ms "
                    f"deferred {row['deferred_max']} rtt {row['round_trip_ms_mean']} ms "
                    f"refused {row['claims_refused']}/{row['claims']} "
                    f"deferred {row['claims_deferred']} served {row['served_per_replica']} "
                    f"wait p95 {row['queue_wait_p95_ms_per_replica']} "
                    f"[{time.monotonic() - t:.0f} s]",
                    flush=True,
                )
    return rows


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _median_range(values: list[float], fmt: Any) -> str:
    if not values:
        return "-"
    mid = fmt(statistics.median(values))
    lo, hi = fmt(min(values)), fmt(max(values))
    return mid if lo == hi else f"{mid} [{lo}-{hi}]"


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| workload | setup | runs | hit rate | vs 1 replica | TTFT p50 ms | TTFT p99 ms | "
        "deferred max | Redis round trip ms, mean / max | claims refused | "
        "queue wait p95, slowest / fastest replica | failed |",
        "|---|---|:-:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for name in WORKLOADS:
        base = {
            r["rep"]: r["hit_rate"] for r in rows if r["workload"] == name and r["setup"] == "one"
        }
        for setup in SETUPS:
            mine = [r for r in rows if r["workload"] == name and r["setup"] == setup.key]
            if not mine:
                continue
            ratios = [
                r["hit_rate"] / base[r["rep"]]
                for r in mine
                if r["hit_rate"] is not None and base.get(r["rep"])
            ]
            rtt = [r["round_trip_ms_mean"] for r in mine if r["round_trip_ms_mean"] is not None]
            rtt_max = [r["round_trip_ms_max"] for r in mine if r["round_trip_ms_max"] is not None]
            spread = [
                max(waits) / min(waits)
                for r in mine
                if len(waits := r["queue_wait_p95_ms_per_replica"]) > 1 and min(waits) > 0
            ]
            refused = sum(r["claims_refused"] for r in mine)
            claims = sum(r["claims"] for r in mine)

            def column(key: str, mine: list[dict[str, Any]] = mine) -> list[float]:
                return [r[key] for r in mine if r[key] is not None]

            lines.append(
                f"| `{name}` | {setup.label} | {len(mine)} | "
                f"{_median_range(column('hit_rate'), _pct)} | "
                f"{_median_range(ratios, lambda v: f'{v:.3f}')} | "
                f"{_median_range(column('ttft_p50_ms'), _ms)} | "
                f"{_median_range(column('ttft_p99_ms'), _ms)} | "
                f"{max((r['deferred_max'] or 0) for r in mine)} | "
                + (
                    f"{_median_range(rtt, lambda v: f'{v:.2f}')} / {max(rtt_max):.1f} | "
                    if rtt
                    else "- | "
                )
                + f"{refused} of {claims} | {_median_range(spread, lambda v: f'{v:.2f}')} | "
                + f"{sum(r['failed'] for r in mine)} |"
            )
    return "\n".join(lines)


def write(
    out: Path,
    rows: list[dict[str, Any]],
    runtime_s: float,
    reps: int,
    seed: int,
    generated: float | None = None,
) -> None:
    generated = time.time() if generated is None else generated
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "rows": rows,
        "runtime_s": runtime_s,
        "reps": reps,
        "seed": seed,
        "generated": generated,
    }
    (out / "replicas.json").write_text(json.dumps(summary, indent=1))
    regime = REGIMES["decode-bound"]
    text = f"""# Replicas: 1 against 3, behind an L4 balancer

Generated by `bench/replicas.py` (part of `make bench`; alone: `make bench-replicas`) on
{time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(generated))} in {runtime_s / 60:.1f} minutes.
Do not edit: rerun it.

- Fleet: {regime.spec.describe()} (`llamacpp-ha-sim`, a fresh fleet per run), the
  `decode-bound` regime of `RESULTS.md`, its `chat-medium` and `chat-saturated` workloads,
  {reps} repetitions (seeds {seed}-{seed + reps - 1}).
- In front: HAProxy in TCP mode, round robin over connections; behind it one or three
  llamacpp-ha processes (default policy), all on the balancer's CPU, with redis-server.
- hit rate: prompt tokens served from the backends' caches (their own counters); vs 1 replica:
  over the single replica's on the same repetition. deferred max: the most requests one backend
  held waiting for a slot (sampled every 200 ms). Redis round trip: each replica's own account
  of its claims and refreshes (`/monitor/data` `replicas`). claims refused: Redis said another
  replica had just taken the slot; the request waited again, first in its replica's queue.
  queue wait p95, slowest / fastest replica: each replica's 95th percentile of queue wait (its
  `/monitor/data`), the slowest over the fastest: how evenly the replicas' clients wait (1.00:
  exactly). The fleet-wide order (README, "Fairness") is what keeps it near 1.

{table(rows)}
"""
    (out / "REPLICAS.md").write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--reps", type=int, default=REPS)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument(
        "--rewrite", action="store_true", help="only write OUT/REPLICAS.md again from its json"
    )
    args = parser.parse_args(argv)
    if args.rewrite:
        saved = json.loads((args.out / "replicas.json").read_text())
        write(
            args.out,
            saved["rows"],
            saved["runtime_s"],
            saved["reps"],
            saved["seed"],
            saved["generated"],
        )
        return 0
    cpus = cpu_split()
    if cpus[0] is not None:
        os.sched_setaffinity(0, {int(c) for c in cpus[0].split(",")})
    t = time.monotonic()
    rows = run(args.out, args.reps, args.seed)
    write(args.out, rows, time.monotonic() - t, args.reps, args.seed)
    print(table(rows))
    print(f"replicas: wrote {args.out / 'REPLICAS.md'}")
    return 0 if rows and all(r["failed"] == 0 for r in rows) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        procs.stop_all()
