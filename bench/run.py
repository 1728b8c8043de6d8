"""Benchmark llamacpp-ha against direct access and the balancers people use instead.

    bench/.venv/bin/python bench/run.py --out bench/results        (make bench)
    bench/.venv/bin/python bench/run.py --quick --out test-output/bench-quick   (make bench-quick)
    .venv/bin/python bench/run.py --smoke --out test-output/bench-smoke   (make bench-smoke)

Two regimes (``bench/regimes.py``): decode-bound (an 8B model's fleet) and prefill-bound (a
70B model's, prompts at close to real sizes). For every regime, workload, repetition and
contender: a fresh simulated fleet (cold caches), the contender started in front of it, the
workload replayed open-loop, the backends' counters read before and after and their deferred
requests sampled during the run. The routing contenders (every llamacpp-ha policy, SGLang's
cache_aware router, HAProxy) run ``--reps`` times in every regime, each repetition with its own
seed (seed + rep, so its own sample of the workload) and a fresh fleet; the other peers run
once, decode-bound only. Then the overhead measurements against a timestamping stand-in
backend (``--overhead-reps`` times, every contender once per repetition), and the cost of one
routing decision with a full prefix index, in process (``bench/decision.py``). Results go to
``OUT/RESULTS.md``, ``OUT/results.json`` and, in the full run, PNG plots. The smoke run (direct
and llamacpp-ha, tiny workloads) exits non-zero on any failure so the harness cannot rot.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp

from bench import ceiling, decision, fleet, loadgen, metrics, overhead, procs, report
from bench import contenders as contenders_mod
from bench import workloads as wl
from bench.contenders import Contender, Running, ha_default_policy, roster
from bench.regimes import REGIMES, Regime, smoke_regime
from bench.streamers import StreamPool

SEED = 20251127
REPS = 3
OVERHEAD_REPS = 3
# llamacpp-ha runs with its default policy (ha-<default>) in the smoke and overhead runs.
SMOKE_CONTENDERS = ("direct", "ha-default")
OVERHEAD_CONTENDERS = ("direct", "ha-default", "nginx-lc", "haproxy", "sglang-ca", "litellm")
# Besides every llamacpp-ha policy: the peers that route (by cache, by load) and are repeated
# in every regime. The others (direct, nginx, SGLang's round robin, LiteLLM) run once,
# decode-bound only.
ROUTING_PEERS = ("sglang-ca", "haproxy")


def is_routing(contender: Contender) -> bool:
    return contender.family == "llamacpp-ha" or contender.key in ROUTING_PEERS


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


@dataclass
class Measured:
    outcomes: list[Any]
    counters: list[fleet.BackendCounters]
    cpu_s: float | None
    deferred_max: int | None
    routing: dict[str, float | None]


async def _routing_stats(base_url: str) -> dict[str, float | None]:
    """llamacpp-ha's largest reordering delay and cache wait (``routing.max_reorder_delay_s``,
    ``routing.max_cache_wait_s``) from its ``/stats``, else its ``/monitor/data``, when the
    running version reports them; absent keys are absent from the result."""
    found: dict[str, float | None] = {}
    for path in ("/stats", "/monitor/data"):
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http,
                http.get(base_url + path) as resp,
            ):
                if resp.status != 200:
                    continue
                data = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        routing = data.get("routing")
        routing = routing if isinstance(routing, dict) else {}
        for key in ("max_reorder_delay_s", "max_cache_wait_s"):
            value = routing.get(key, data.get(f"routing.{key}"))
            if isinstance(value, int | float) and not isinstance(value, bool):
                found[key] = float(value)
        if found:
            return found
    return found


async def _measure(
    running: Running,
    workload: wl.Workload,
    fl: fleet.Fleet,
    deadline_s: float,
    ha: bool,
) -> Measured:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        before = await fleet.snapshot(http, fl.urls)
    pid = running.child.pid if running.child is not None else None
    cpu0 = procs.cpu_seconds(pid) if pid else None
    stop = asyncio.Event()
    watcher = asyncio.create_task(fleet.watch_deferred(fl.urls, stop))
    try:
        outcomes, _ = await loadgen.replay(running, workload, fl.spec.time_scale, deadline_s)
    finally:
        stop.set()
        deferred = await watcher
    cpu1 = procs.cpu_seconds(pid) if pid else None
    await _wait_idle(fl.urls)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        after = await fleet.snapshot(http, fl.urls)
    routing = await _routing_stats(running.base_url) if ha and running.base_url else {}
    cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
    return Measured(outcomes, fleet.delta(after, before), cpu, deferred, routing)


@dataclass(frozen=True)
class Planned:
    """One run: a contender on one repetition of a workload of a regime."""

    regime: Regime
    workload: wl.Workload
    rep: int
    seed: int
    contender: Contender


def run_one(
    run: Planned, log_dir: Path, cpus: tuple[str | None, str | None]
) -> tuple[metrics.RunResult | None, list[Any], str | None]:
    workload, contender = run.workload, run.contender
    spec = run.regime.spec_for(workload.name)
    run_dir = log_dir / run.regime.name / f"{workload.name}--{contender.key}--rep{run.rep}"
    fl = fleet.start_fleet(spec, run_dir, "fleet", cpus[0])
    try:
        try:
            running = contender.start(fl.urls, list(spec.slots), run_dir, cpus[1])
        except (RuntimeError, OSError) as exc:
            return None, [], f"could not start: {exc}"
        try:
            # A generous end: the schedule, then time for the slowest contender's queue to drain.
            deadline = workload.span_s / spec.time_scale + 40.0
            ha = contender.family == "llamacpp-ha"
            got = asyncio.run(_measure(running, workload, fl, deadline, ha))
        finally:
            running.stop()
        result = metrics.summarize(
            workload.name,
            contender.key,
            contender.label,
            got.outcomes,
            got.counters,
            list(spec.slots),
            got.cpu_s,
        )
        result.regime, result.rep, result.seed = run.regime.name, run.rep, run.seed
        result.requests_deferred_max = got.deferred_max
        result.max_reorder_delay_s = got.routing.get("max_reorder_delay_s")
        result.max_cache_wait_s = got.routing.get("max_cache_wait_s")
        return result, got.outcomes, None
    finally:
        fl.stop()


def plan(
    regimes: list[Regime],
    contenders: list[Contender],
    reps: int,
    seed: int,
    wanted_workloads: set[str] | None,
) -> tuple[list[Planned], dict[str, dict[int, list[wl.Workload]]]]:
    """Every run in the order they are made: regime, workload, repetition, contender; and each
    regime's workloads by repetition."""
    runs: list[Planned] = []
    by_rep: dict[str, dict[int, list[wl.Workload]]] = {}
    for regime in regimes:
        mine = [c for c in contenders if is_routing(c) or regime.peers_once]
        samples = {}
        for rep in range(reps):
            chosen = regime.workloads(seed + rep)
            if wanted_workloads is not None:
                chosen = [w for w in chosen if w.name in wanted_workloads]
            samples[rep] = chosen
        by_rep[regime.name] = samples
        for i in range(len(samples[0])):
            for rep in range(reps):
                for contender in mine:
                    # The peers that do not route run once (the first repetition).
                    if rep > 0 and not is_routing(contender):
                        continue
                    runs.append(Planned(regime, samples[rep][i], rep, seed + rep, contender))
    return runs, by_rep


def run_overhead(
    contenders: list[Contender],
    plan: overhead.OverheadPlan,
    log_dir: Path,
    cpus: Any,
    reps: int,
) -> tuple[list[overhead.OverheadResult], dict[str, str]]:
    """Every contender ``reps`` times, one after the other in each repetition (direct first,
    its relay ramp the baseline of the others' in the same repetition), each time with a fresh
    ticker and a freshly started contender; the stream workers live for the whole section."""
    results: list[overhead.OverheadResult] = []
    problems: dict[str, str] = {}
    with StreamPool(plan.clients) as pool:
        for rep in range(reps):
            baseline: dict[int, dict[str, float | None]] | None = None
            for contender in contenders:
                run_dir = log_dir / f"overhead--{contender.key}--rep{rep}"
                ticker, url = overhead.start_ticker(run_dir, cpus[0], plan.ticker_slots)
                try:
                    try:
                        running = contender.start([url], [plan.ticker_slots], run_dir, cpus[1])
                    except (RuntimeError, OSError) as exc:
                        problems[f"{contender.key}/rep{rep}"] = f"could not start: {exc}"
                        continue
                    t = time.monotonic()
                    try:
                        result = asyncio.run(
                            overhead.measure(running, contender, plan, baseline, pool, rep)
                        )
                    finally:
                        running.stop()
                    if contender.key == "direct":
                        baseline = result.relay_ms
                    results.append(result)
                    print(
                        f"  overhead {contender.key} rep {rep}: {report.overhead_line(result)} "
                        f"[{time.monotonic() - t:.1f} s]",
                        flush=True,
                    )
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


def _regime_context(
    regime: Regime, samples: dict[int, list[wl.Workload]], reps: int, seed: int
) -> dict[str, Any]:
    """The regime's fleet and workloads, with each repetition's request count and ceilings
    (the capacity ceiling is the regime's fleet's: its profile, slots and host caches)."""
    workloads: list[dict[str, Any]] = []
    ceilings: dict[str, list[float]] = {}
    capacity: dict[str, list[float]] = {}
    capacity_by: dict[str, list[str]] = {}
    for i, first in enumerate(samples[0]):
        per_rep = [samples[rep][i] for rep in range(reps)]
        spec = regime.spec_for(first.name)
        workloads.append(
            {
                "name": first.name,
                "title": first.title,
                "description": first.description,
                "requests": [w.n_requests for w in per_rep],
                "span_s": first.span_s,
                "time_scale": spec.time_scale,
                "wall_s": first.span_s / spec.time_scale,
            }
        )
        for w in per_rep:
            cap = ceiling.capacity_ceiling(w, spec.configs())
            ceilings.setdefault(w.name, []).append(ceiling.hit_rate_ceiling(w))
            capacity.setdefault(w.name, []).append(cap.hit_rate)
            capacity_by.setdefault(w.name, []).append(f"{cap.router}, speed x{cap.speed:g}")
        print(
            f"bench: {regime.name}/{first.name}: {[w.n_requests for w in per_rep]} requests; "
            f"hit-rate ceiling {'/'.join(f'{c:.1%}' for c in ceilings[first.name])} with "
            f"infinite caches, {'/'.join(f'{c:.1%}' for c in capacity[first.name])} with the "
            f"fleet's ({'; '.join(capacity_by[first.name])})",
            flush=True,
        )
    return {
        "name": regime.name,
        "title": regime.title,
        "description": regime.description,
        "fleet": regime.spec.describe(),
        "time_scale": regime.spec.time_scale,
        "reps": reps,
        "seeds": f"{seed}-{seed + reps - 1}" if reps > 1 else str(seed),
        "peers_once": regime.peers_once,
        "workloads": workloads,
        "ceilings": ceilings,
        "capacity_ceilings": capacity,
        "capacity_ceilings_by": capacity_by,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny run: direct and llamacpp-ha")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1 repetition, routing contenders only, no overhead section (make bench-quick)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument(
        "--reps",
        type=int,
        default=None,
        help=f"repetitions of every routing contender (default {REPS}; --quick and --smoke 1)",
    )
    parser.add_argument(
        "--regimes",
        default=None,
        help=f"comma-separated regimes (default all: {','.join(REGIMES)})",
    )
    parser.add_argument(
        "--time-scale", type=float, default=None, help="override every regime's time scale"
    )
    parser.add_argument("--contenders", default=None, help="comma-separated keys (default all)")
    parser.add_argument("--workloads", default=None, help="comma-separated names (default all)")
    parser.add_argument("--no-overhead", action="store_true", help="skip the overhead section")
    parser.add_argument(
        "--no-decision", action="store_true", help="skip the routing-decision section"
    )
    parser.add_argument(
        "--overhead-reps",
        type=int,
        default=None,
        help=f"repetitions of the overhead section (default {OVERHEAD_REPS}; --smoke 1)",
    )
    parser.add_argument(
        "--overhead-clients",
        type=int,
        default=None,
        help="load generator processes of the many-stream phases (default "
        f"{overhead.OverheadPlan.clients})",
    )
    parser.add_argument(
        "--ha-args",
        default="",
        help="more llamacpp-ha options for its contenders, e.g. '--max-cache-wait 2' (what a "
        "setting changes, on the same workloads)",
    )
    parser.add_argument(
        "--rewrite-report",
        action="store_true",
        help="only write OUT/RESULTS.md again from OUT/results.json (no measurement)",
    )
    args = parser.parse_args(argv)
    if args.rewrite_report:
        report.rewrite(args.out)
        return 0
    contenders_mod.HA_ARGS[:] = shlex.split(args.ha_args)
    started = time.monotonic()
    busy0, own0 = procs.machine_busy_seconds(), procs.own_seconds()
    cpus = cpu_split()
    if cpus[0] is not None:
        # The load generator shares the fleet's core(s), never the balancer's.
        os.sched_setaffinity(0, {int(c) for c in cpus[0].split(",")})

    reps = args.reps if args.reps is not None else (1 if args.smoke or args.quick else REPS)
    if reps < 1:
        parser.error("--reps must be at least 1")
    over_reps = args.overhead_reps or (1 if args.smoke else OVERHEAD_REPS)
    if over_reps < 1:
        parser.error("--overhead-reps must be at least 1")
    if args.smoke:
        regimes = [smoke_regime()]
    else:
        names = args.regimes.split(",") if args.regimes else list(REGIMES)
        unknown = [n for n in names if n not in REGIMES]
        if unknown:
            parser.error(f"unknown regimes {unknown}; known: {', '.join(REGIMES)}")
        regimes = [REGIMES[n] for n in names]
    if args.time_scale:
        regimes = [r.with_time_scale(args.time_scale) for r in regimes]
    everyone = roster()
    default_ha = f"ha-{ha_default_policy()}"
    keys: tuple[str, ...]
    if args.smoke:
        keys = SMOKE_CONTENDERS
    elif args.quick:
        keys = tuple(c.key for c in everyone if is_routing(c))
    else:
        keys = tuple(c.key for c in everyone)
    keys = tuple(default_ha if k == "ha-default" else k for k in keys)
    if args.contenders:
        # "ha-default" names whichever policy is llamacpp-ha's default.
        asked = {default_ha if k == "ha-default" else k for k in args.contenders.split(",")}
        keys = tuple(k for k in keys if k in asked)
    contenders = [c for c in everyone if c.key in keys]
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    log_dir = out.resolve() / "logs"

    unavailable = {c.key: r for c in contenders if (r := c.unavailable_reason()) is not None}
    usable = [c for c in contenders if c.key not in unavailable]
    for key, reason in unavailable.items():
        print(f"bench: {key} unavailable: {reason}", flush=True)
    versions = {c.key: c.version() if c.key not in unavailable else "-" for c in contenders}

    wanted = set(args.workloads.split(",")) if args.workloads else None
    runs, samples = plan(regimes, usable, reps, args.seed, wanted)
    regime_contexts = [_regime_context(r, samples[r.name], reps, args.seed) for r in regimes]
    print(f"bench: {len(runs)} runs", flush=True)

    results: list[metrics.RunResult] = []
    # Outcomes of the first repetition, for the plots: regime -> workload -> contender.
    raw: dict[str, dict[str, dict[str, list[Any]]]] = {}
    failures: dict[str, str] = {}
    current = None
    for i, run in enumerate(runs):
        here = (run.regime.name, run.workload.name, run.rep)
        if here != current:
            current = here
            print(
                f"bench: {run.regime.name}/{run.workload.name} rep {run.rep} (seed {run.seed}): "
                f"{run.workload.description}",
                flush=True,
            )
        t = time.monotonic()
        result, outcomes, problem = run_one(run, log_dir, cpus)
        where = f"{run.regime.name}/{run.workload.name}/{run.contender.key}/rep{run.rep}"
        if problem is not None or result is None:
            failures[where] = problem or "no result"
            print(f"  {run.contender.key}: {problem}", flush=True)
            continue
        results.append(result)
        if run.rep == 0:
            raw.setdefault(run.regime.name, {}).setdefault(run.workload.name, {})[
                run.contender.key
            ] = outcomes
        print(
            f"  {run.contender.key:<22} {report.run_line(result)} "
            f"[{time.monotonic() - t:.1f} s, {i + 1}/{len(runs)}, "
            f"{(time.monotonic() - started) / 60:.1f} min]",
            flush=True,
        )

    over_plan = overhead.OverheadPlan()
    if args.smoke:
        over_plan = overhead.OverheadPlan(
            low_requests=10,
            high_concurrency=8,
            high_s=0.6,
            cpu_concurrency=4,
            cpu_requests_s=0.3,
            cpu_stream1_s=0.3,
            cpu_streams=4,
            cpu_stream_chunks=20,
            cpu_streams_s=0.3,
            open_streams=16,
            ramp=(4, 16),
            ramp_tick_ms=50.0,
            ramp_window_s=0.3,
            memory_window_s=0.1,
        )
    if args.overhead_clients:
        over_plan = dataclasses.replace(over_plan, clients=args.overhead_clients)
    over: list[overhead.OverheadResult] = []
    if not args.no_overhead and not args.quick:
        print("bench: overhead against the timestamping backend", flush=True)
        chosen_keys = {default_ha if k == "ha-default" else k for k in OVERHEAD_CONTENDERS}
        chosen = [c for c in usable if c.key in chosen_keys]
        over, problems = run_overhead(chosen, over_plan, log_dir, cpus, over_reps)
        failures.update({f"overhead/{k}": v for k, v in problems.items()})

    decision_plan = decision.DecisionPlan()
    if args.smoke:
        decision_plan = decision.DecisionPlan(prefixes=2000, timed=200, reps=1)
    decisions: list[decision.DecisionRun] = []
    if not args.no_decision and not args.quick:
        print("bench: routing decision with a full prefix index (in process)", flush=True)
        try:
            decisions = decision.run(decision_plan)
        except Exception as exc:  # llamacpp-ha's internals changed: say so, keep the rest
            failures["decision"] = f"{type(exc).__name__}: {exc}"
            print(f"  decision: {failures['decision']}", flush=True)

    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    target = "make bench"
    if args.smoke or args.quick:
        target = "make bench-smoke" if args.smoke else "make bench-quick"
    context = {
        "smoke": args.smoke,
        "quick": args.quick,
        "seed": args.seed,
        "reps": reps,
        "command": command,
        "make_target": target,
        "regimes": regime_contexts,
        "machine": machine_info(),
        "cpus": {"fleet_and_client": cpus[0], "balancer": cpus[1]},
        "versions": versions,
        "unavailable": unavailable,
        "failures": failures,
        "labels": {c.key: c.label for c in contenders},
        "routing": [c.key for c in contenders if is_routing(c)],
        "default": default_ha,
        "ha_policies": [c.key.removeprefix("ha-") for c in contenders if c.family == "llamacpp-ha"],
        "runtime_s": 0.0,
        "open_streams": over_plan.open_streams,
        "overhead_reps": over_reps,
        "overhead_plan": dataclasses.asdict(over_plan),
        "decision_plan": dataclasses.asdict(decision_plan),
        "decision": [dataclasses.asdict(d) for d in decisions],
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
    return _verdict(args.smoke, results, over, failures, len(runs), bool(decisions))


def _verdict(
    smoke: bool,
    results: list[metrics.RunResult],
    over: list[overhead.OverheadResult],
    failures: dict[str, str],
    expected_runs: int,
    context_decisions: bool,
) -> int:
    if not smoke:
        return 0 if results or over else 1
    problems = list(failures.values())
    if len(results) != expected_runs:
        problems.append(f"{len(results)} of {expected_runs} runs produced results")
    for r in results:
        if r.completed != r.requests or r.completed == 0:
            problems.append(f"{r.workload}/{r.contender}: {r.completed}/{r.requests} ({r.errors})")
        if r.hit_rate is None:
            problems.append(f"{r.workload}/{r.contender}: no backend counters")
        if r.requests_deferred_max is None:
            problems.append(f"{r.workload}/{r.contender}: no requests_deferred from the backends")
    if not over:
        problems.append("no overhead results")
    if not context_decisions:
        problems.append("no routing-decision results")
    for o in over:
        if o.failures or o.ttft_low_ms.get("p50") is None:
            problems.append(f"overhead/{o.contender}: {o.failures} failed requests")
        if not o.relay_ms or any(v.get("p99") is None for v in o.relay_ms.values()):
            problems.append(f"overhead/{o.contender}: a relay step never had its streams open")
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
