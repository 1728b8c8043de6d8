"""Benchmark llamacpp-ha against direct access and the balancers people use instead.

    bench/.venv/bin/python bench/run.py --out bench/results        (make bench)
    .venv/bin/python bench/run.py --smoke --out test-output/bench-smoke   (make bench-smoke)

For every workload and every contender: a fresh simulated fleet (cold caches), the contender
started in front of it, the workload replayed open-loop, the backends' counters read before and
after. Then the overhead measurements against a timestamping stand-in backend. Results go to
``OUT/RESULTS.md``, ``OUT/results.json`` and, in the full run, PNG plots. The smoke run (direct
and llamacpp-ha, tiny workloads) exits non-zero on any failure so the harness cannot rot.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp

from bench import ceiling, fleet, loadgen, metrics, overhead, procs, report
from bench import workloads as wl
from bench.contenders import Contender, Running, ha_default_policy, roster

SEED = 20251127
FULL_TIME_SCALE = 4.0
SMOKE_TIME_SCALE = 20.0
# llamacpp-ha runs with its default policy (ha-<default>) in the smoke and overhead runs.
SMOKE_CONTENDERS = ("direct", "ha-default")
OVERHEAD_CONTENDERS = ("direct", "ha-default", "nginx-lc", "haproxy", "sglang-ca", "litellm")


def full_workloads(seed: int) -> list[wl.Workload]:
    # Sized for 15 minutes on 2 cores at time scale 4: about 12 s of wall time per run.
    # The fleet serves ~6 chat requests per model second (12 slots, ~2 s a 150-token reply):
    # chat-medium offers about half of that, chat-saturated a little more than all of it.
    return [
        wl.chat(seed, "chat-medium", sessions_per_s=0.8, span_s=24),
        wl.chat(seed, "chat-saturated", sessions_per_s=2.2, span_s=22),
        wl.mooncake(seed, "mooncake", wl.TraceScale(conversations=40, span_s=30)),
        wl.random_prompts(seed, "random", rate_per_s=3.0, span_s=30),
        wl.burst(seed, "burst", per_burst=36, n_bursts=2, gap_s=14),
    ]


def smoke_workloads(seed: int) -> list[wl.Workload]:
    out = [
        wl.chat(seed, "chat-smoke", sessions_per_s=1.5, span_s=3, system_tokens=200, turns=(2, 3)),
        wl.random_prompts(seed, "random-smoke", rate_per_s=2.0, span_s=3, prompt_tokens=500),
        wl.burst(seed, "burst-smoke", per_burst=8, n_bursts=1),
    ]
    if (wl.TRACE / wl.TRACE_FILE).exists():
        out.append(wl.mooncake(seed, "mooncake-smoke", wl.TraceScale(conversations=3, span_s=3)))
    return out


def cpu_split() -> tuple[str | None, str | None]:
    """(CPUs for the fleet and the load generator, CPU for the balancer)."""
    available = procs.cpus()
    if len(available) < 2:
        return None, None
    # The balancer gets a core of its own; backends and client share the other(s). Its CPU
    # time is read per process anyway, but pinning keeps it from stealing the client's core.
    return ",".join(str(c) for c in available[:-1]), str(available[-1])


async def _wait_idle(urls: list[str], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        while time.monotonic() < deadline:
            busy = 0
            for url in urls:
                async with http.get(url + "/slots") as resp:
                    busy += sum(1 for s in await resp.json() if s.get("is_processing"))
            if not busy:
                return
            await asyncio.sleep(0.1)


async def _measure(
    running: Running, workload: wl.Workload, fl: fleet.Fleet, deadline_s: float
) -> tuple[list[Any], list[fleet.BackendCounters], float | None]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        before = await fleet.snapshot(http, fl.urls)
    pid = running.child.pid if running.child is not None else None
    cpu0 = procs.cpu_seconds(pid) if pid else None
    outcomes, _ = await loadgen.replay(running, workload, fl.spec.time_scale, deadline_s)
    cpu1 = procs.cpu_seconds(pid) if pid else None
    await _wait_idle(fl.urls)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        after = await fleet.snapshot(http, fl.urls)
    cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
    return outcomes, fleet.delta(after, before), cpu


def run_one(
    contender: Contender,
    workload: wl.Workload,
    spec: fleet.FleetSpec,
    log_dir: Path,
    cpus: tuple[str | None, str | None],
) -> tuple[metrics.RunResult | None, list[Any], str | None]:
    run_dir = log_dir / f"{workload.name}--{contender.key}"
    fl = fleet.start_fleet(spec, run_dir, "fleet", cpus[0])
    try:
        try:
            running = contender.start(fl.urls, list(spec.slots), run_dir, cpus[1])
        except (RuntimeError, OSError) as exc:
            return None, [], f"could not start: {exc}"
        try:
            # A generous end: the schedule, then time for the slowest contender's queue to drain.
            deadline = workload.span_s / spec.time_scale + 40.0
            outcomes, counters, cpu = asyncio.run(_measure(running, workload, fl, deadline))
        finally:
            running.stop()
        result = metrics.summarize(
            workload.name,
            contender.key,
            contender.label,
            outcomes,
            counters,
            list(spec.slots),
            cpu,
        )
        return result, outcomes, None
    finally:
        fl.stop()


def run_overhead(
    contenders: list[Contender], plan: overhead.OverheadPlan, log_dir: Path, cpus: Any
) -> tuple[list[overhead.OverheadResult], dict[str, str]]:
    results: list[overhead.OverheadResult] = []
    problems: dict[str, str] = {}
    baseline: dict[int, dict[str, float | None]] | None = None
    for contender in contenders:
        run_dir = log_dir / f"overhead--{contender.key}"
        ticker, url = overhead.start_ticker(run_dir, cpus[0])
        try:
            try:
                running = contender.start([url], [overhead.TICKER_SLOTS], run_dir, cpus[1])
            except (RuntimeError, OSError) as exc:
                problems[contender.key] = f"could not start: {exc}"
                continue
            try:
                result = asyncio.run(overhead.measure(running, contender, plan, baseline))
            finally:
                running.stop()
            if contender.key == "direct":
                baseline = result.relay_ms
            results.append(result)
            print(f"  overhead {contender.key}: {report.overhead_line(result)}", flush=True)
        finally:
            ticker.stop()
    return results, problems


def machine_info() -> dict[str, str]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": f"{model}, {os.cpu_count()} logical CPUs",
        "memory": f"{mem_gb:.1f} GiB",
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny run: direct and llamacpp-ha")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--time-scale", type=float, default=None)
    parser.add_argument("--contenders", default=None, help="comma-separated keys (default all)")
    parser.add_argument("--workloads", default=None, help="comma-separated names (default all)")
    parser.add_argument("--no-overhead", action="store_true", help="skip the overhead section")
    parser.add_argument(
        "--rewrite-report",
        action="store_true",
        help="only write OUT/RESULTS.md again from OUT/results.json (no measurement)",
    )
    args = parser.parse_args(argv)
    if args.rewrite_report:
        report.rewrite(args.out)
        return 0
    started = time.monotonic()
    busy0, own0 = procs.machine_busy_seconds(), procs.own_seconds()
    cpus = cpu_split()
    if cpus[0] is not None:
        # The load generator shares the fleet's core(s), never the balancer's.
        os.sched_setaffinity(0, {int(c) for c in cpus[0].split(",")})

    scale = args.time_scale or (SMOKE_TIME_SCALE if args.smoke else FULL_TIME_SCALE)
    spec = (
        fleet.FleetSpec((2, 2), ("gpu-8b", "gpu-8b"), scale)
        if args.smoke
        else fleet.FleetSpec((4, 4, 2, 2), ("gpu-8b",) * 4, scale)
    )
    workloads = smoke_workloads(args.seed) if args.smoke else full_workloads(args.seed)
    if args.workloads:
        wanted = set(args.workloads.split(","))
        workloads = [w for w in workloads if w.name in wanted]
    everyone = roster()
    default_ha = f"ha-{ha_default_policy()}"
    keys = SMOKE_CONTENDERS if args.smoke else tuple(c.key for c in everyone)
    keys = tuple(default_ha if k == "ha-default" else k for k in keys)
    if args.contenders:
        keys = tuple(k for k in keys if k in args.contenders.split(","))
    contenders = [c for c in everyone if c.key in keys]
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    log_dir = out.resolve() / "logs"

    unavailable = {c.key: r for c in contenders if (r := c.unavailable_reason()) is not None}
    usable = [c for c in contenders if c.key not in unavailable]
    for key, reason in unavailable.items():
        print(f"bench: {key} unavailable: {reason}", flush=True)
    versions = {c.key: c.version() if c.key not in unavailable else "-" for c in contenders}

    ceilings = {w.name: ceiling.hit_rate_ceiling(w) for w in workloads}
    capacity = {w.name: ceiling.capacity_ceiling(w, spec.configs()) for w in workloads}
    capacity_ceilings = {name: c.hit_rate for name, c in capacity.items()}
    for name, c in capacity.items():
        print(
            f"bench: {name}: hit-rate ceiling {ceilings[name]:.1%} with infinite caches, "
            f"{c.hit_rate:.1%} with the fleet's ({c.router}, speed x{c.speed:g})",
            flush=True,
        )
    results: list[metrics.RunResult] = []
    raw: dict[str, dict[str, list[Any]]] = {}
    failures: dict[str, str] = {}
    for workload in workloads:
        print(f"bench: {workload.name}: {workload.description}", flush=True)
        for contender in usable:
            t = time.monotonic()
            result, outcomes, problem = run_one(contender, workload, spec, log_dir, cpus)
            if problem is not None or result is None:
                failures[f"{workload.name}/{contender.key}"] = problem or "no result"
                print(f"  {contender.key}: {problem}", flush=True)
                continue
            results.append(result)
            raw.setdefault(workload.name, {})[contender.key] = outcomes
            print(
                f"  {contender.key:<22} {report.run_line(result)} [{time.monotonic() - t:.1f} s]",
                flush=True,
            )

    plan = overhead.OverheadPlan()
    if args.smoke:
        plan = overhead.OverheadPlan(
            low_requests=10,
            high_concurrency=8,
            high_s=0.6,
            cpu_requests_s=0.3,
            cpu_streams=4,
            cpu_stream_chunks=20,
            cpu_streams_s=0.3,
            open_streams=16,
            ramp=(4, 16),
            ramp_chunks=5,
            ramp_tick_ms=20.0,
        )
    over: list[overhead.OverheadResult] = []
    if not args.no_overhead:
        print("bench: overhead against the timestamping backend", flush=True)
        wanted = {default_ha if k == "ha-default" else k for k in OVERHEAD_CONTENDERS}
        chosen = [c for c in usable if c.key in wanted]
        over, problems = run_overhead(chosen, plan, log_dir, cpus)
        failures.update({f"overhead/{k}": v for k, v in problems.items()})

    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    context = {
        "smoke": args.smoke,
        "seed": args.seed,
        "command": command,
        "make_target": "make bench-smoke" if args.smoke else "make bench",
        "fleet": spec.describe(),
        "time_scale": scale,
        "machine": machine_info(),
        "cpus": {"fleet_and_client": cpus[0], "balancer": cpus[1]},
        "versions": versions,
        "unavailable": unavailable,
        "failures": failures,
        "workloads": [
            {
                "name": w.name,
                "title": w.title,
                "description": w.description,
                "requests": w.n_requests,
            }
            for w in workloads
        ],
        "ceilings": ceilings,
        "capacity_ceilings": capacity_ceilings,
        "capacity_ceilings_by": {n: f"{c.router}, speed x{c.speed:g}" for n, c in capacity.items()},
        "labels": {c.key: c.label for c in contenders},
        "ha_policies": [c.key.removeprefix("ha-") for c in contenders if c.family == "llamacpp-ha"],
        "runtime_s": 0.0,
        "open_streams": plan.open_streams,
    }
    if not args.smoke:
        try:
            from bench import plots

            context["plots"] = plots.draw(out, results, raw, over, context)
        except Exception as exc:  # a broken plot must not lose the tables
            context["plots"] = []
            print(f"bench: no plots ({type(exc).__name__}: {exc})", flush=True)
    context["runtime_s"] = time.monotonic() - started
    procs.stop_all()
    # Other people's work on a shared machine skews every figure; measure it, never hide it.
    others = (procs.machine_busy_seconds() - busy0) - (procs.own_seconds() - own0)
    context["background_cores"] = max(others, 0.0) / context["runtime_s"]
    report.write(out, results, over, context)
    print(f"bench: wrote {out / 'RESULTS.md'} in {context['runtime_s']:.0f} s", flush=True)
    return _verdict(args.smoke, results, over, failures, len(workloads) * len(usable))


def _verdict(
    smoke: bool,
    results: list[metrics.RunResult],
    over: list[overhead.OverheadResult],
    failures: dict[str, str],
    expected_runs: int,
) -> int:
    if not smoke:
        return 0 if results else 1
    problems = list(failures.values())
    if len(results) != expected_runs:
        problems.append(f"{len(results)} of {expected_runs} runs produced results")
    for r in results:
        if r.completed != r.requests or r.completed == 0:
            problems.append(f"{r.workload}/{r.contender}: {r.completed}/{r.requests} ({r.errors})")
        if r.hit_rate is None:
            problems.append(f"{r.workload}/{r.contender}: no backend counters")
    if not over:
        problems.append("no overhead results")
    for o in over:
        if o.failures or o.ttft_low_ms.get("p50") is None:
            problems.append(f"overhead/{o.contender}: {o.failures} failed requests")
    for p in problems:
        print(f"bench-smoke: FAIL {p}", file=sys.stderr, flush=True)
    if not problems:
        print("bench-smoke: all runs completed", flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        procs.stop_all()
