"""What one routing decision costs llamacpp-ha, with a full prefix index: in this process.

    bench/.venv/bin/python bench/decision.py --out bench/results     (make bench-decision)

No sockets and no balancer process: the balancer's own routing objects, built as the tests build
them (a `Registry` of ready backends, a `CacheIndex` bounded by the default ``max_sessions``,
the default policy, a `Scheduler`), on an event loop only because leases are released awaited.
The index is filled through the scheduler's own decide-and-place path with conversations of
several turns on a few shared system prompts (each answer recorded as the feedback records
it), until it holds ``prefixes`` prefix keys, with part of the fleet's slots kept busy. Then
new requests of the same mix (first turns and follow-ups) are timed one by one with
``time.perf_counter_ns``:

- *decision*: what one request costs the drain on an idle queue: the backends that may take
  it, the `RoutingView`, and `Scheduler._decide` (candidates from the index and the cache
  shadows, then the policy's choice and costs);
- *index match*: `CacheIndex.match` of the request's keys alone.

Each timed request is then placed and answered like the others, so the index stays at its
bound. ``run.py`` runs it as a section of the report; alone it writes ``OUT/decision.json`` and
``OUT/DECISION.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.metrics import percentile
from bench.summary import Spread


@dataclass(frozen=True)
class DecisionPlan:
    """The fleet, the index's fill and the timed requests; the smoke run shrinks them."""

    backends: int = 8
    slots: int = 4
    n_ctx: int = 32_768
    prefixes: int = 100_000  # prefix keys in the index when timing starts
    system_prompts: int = 16
    conversations_open: int = 256  # conversations in progress at once
    turns: tuple[int, int] = (3, 8)
    busy_slots: int = 20  # of the fleet's slots, held by requests in flight
    timed: int = 3000
    reps: int = 3
    seed: int = 20251127
    policy: str = ""  # empty: llamacpp-ha's default


@dataclass
class DecisionRun:
    """One repetition's figures (µs)."""

    rep: int
    prefixes: int
    requests_to_fill: int
    fill_s: float
    decision_us: dict[str, float | None] = field(default_factory=dict)
    match_us: dict[str, float | None] = field(default_factory=dict)
    hits: float = 0.0  # share of timed requests whose index match found any backend
    waits: int = 0  # timed requests the policy chose to keep queued (a busy holder)


_WORDS = [
    "".join(random.Random(i).choice("abcdefghijklmnopqrstuvwxyz") for _ in range(2 + i % 6))
    for i in range(2000)
]


def _text(rng: random.Random, n_bytes: int) -> str:
    out: list[str] = []
    size = 0
    while size < n_bytes:
        word = rng.choice(_WORDS)
        out.append(word)
        size += len(word) + 1
    return " ".join(out)


class _Conversation:
    def __init__(self, rng: random.Random, system: str) -> None:
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}]
        self.turns_left = 0
        self.rng = rng

    def next_body(self) -> dict[str, Any]:
        self.messages.append(
            {"role": "user", "content": _text(self.rng, self.rng.randint(80, 1500))}
        )
        return {"model": "m", "messages": list(self.messages), "max_tokens": 256}

    def answered(self) -> None:
        reply = _text(self.rng, self.rng.randint(200, 2000))
        self.messages.append({"role": "assistant", "content": reply})
        self.turns_left -= 1


async def _one_run(plan: DecisionPlan, rep: int) -> DecisionRun:
    # Imported here: `bench/run.py --smoke` runs in the project's environment, where
    # llamacpp_ha is installed; nothing else of this module needs it.
    from llamacpp_ha.config import BackendConfig
    from llamacpp_ha.policies import DEFAULT_POLICY, RoutingRequest, RoutingSettings, build_policy
    from llamacpp_ha.prefix_index import CacheIndex, prompt_keys
    from llamacpp_ha.queue import Lease, QueueEntry, RequestQueue
    from llamacpp_ha.registry import Health, Registry
    from llamacpp_ha.scheduler import RoutingView, Scheduler

    rng = random.Random(plan.seed + rep)
    queue = RequestQueue()
    registry = Registry(
        [
            BackendConfig(url=f"http://b{i}.invalid:8080", name=f"b{i}")
            for i in range(plan.backends)
        ],
        poll_interval_s=1.0,
        on_change=lambda: None,
    )
    # Ready, as after a good poll (tests/fleet.py's set_ready).
    for b in registry.backends:
        b.health = Health.READY
        b.model_ids = ("m",)
        b.model_names = frozenset({"m"})
        b.model_entries = ({"id": "m", "aliases": ["m"]},)
        b.n_ctx = plan.n_ctx
        b.slots.observe(total=plan.slots, busy_on_backend=0)
    index = CacheIndex(ttl_s=3600.0, max_entries=plan.prefixes)
    for b in registry.backends:
        # Room for the index's bound: what is timed is a full index, not its eviction by size.
        index.set_capacity(b.name, 1 << 40)
    settings = RoutingSettings()
    scheduler = Scheduler(
        queue,
        registry,
        build_policy(plan.policy or DEFAULT_POLICY, settings),
        index,
        max_queue=1000,
        settings=settings,
    )
    loop = asyncio.get_running_loop()
    systems = [
        _text(random.Random(f"system-{i}"), rng.randint(1000, 6000))
        for i in range(plan.system_prompts)
    ]
    open_convs: list[_Conversation] = []
    in_flight: deque[Lease] = deque()

    def conversation() -> _Conversation:
        c = _Conversation(random.Random(rng.random()), rng.choice(systems))
        c.turns_left = rng.randint(*plan.turns)
        return c

    async def request(timed: bool) -> tuple[int, int, bool, bool]:
        """One request of the mix: (decision ns, match ns, matched anything, waited)."""
        while len(open_convs) < plan.conversations_open:
            open_convs.append(conversation())
        conv = rng.choice(open_convs)
        body = conv.next_body()
        raw = json.dumps(body).encode()
        routing = RoutingRequest(
            model="m", prompt=prompt_keys(body), prompt_tokens=len(raw) // 4, max_tokens=256
        )
        entry = QueueEntry(routing=routing)
        entry.future = loop.create_future()
        waited = False
        decision_ns = match_ns = 0
        matched = False
        while True:
            now = time.monotonic()
            t0 = time.perf_counter_ns()
            eligible = scheduler._eligible(routing)
            view = RoutingView(registry.backends, index, now)
            decision = scheduler._decide(entry, eligible, view, now)
            t1 = time.perf_counter_ns()
            if not decision_ns:
                decision_ns = t1 - t0
                t2 = time.perf_counter_ns()
                matched = bool(index.match(routing.prompt.keys))
                match_ns = time.perf_counter_ns() - t2
            if decision is not None and decision.choice is not None:
                break
            # No room, or it would wait for a busy holder: the oldest request ends.
            waited = waited or decision is not None
            await in_flight.popleft().release()
        scheduler._place(decision, view, now)
        lease = entry.future.result()
        # What Feedback.answered does with a good answer, but the capacity (set above).
        tokens = max(1, routing.prompt_tokens)
        index.record(lease.backend.name, routing.prompt.keys, tokens)
        if lease.claim.lands_on is not None and lease.cached_prompt is not None:
            lease.backend.caches.answered(lease.claim.lands_on, lease.cached_prompt, 256)
        in_flight.append(lease)
        while len(in_flight) > plan.busy_slots:
            await in_flight.popleft().release()
        conv.answered()
        if conv.turns_left <= 0:
            open_convs.remove(conv)
        return decision_ns, match_ns, matched, waited and timed

    started = time.monotonic()
    filled = 0
    while len(index) < plan.prefixes:
        await request(False)
        filled += 1
    fill_s = time.monotonic() - started
    decisions: list[float] = []
    matches: list[float] = []
    hits = waits = 0
    for _ in range(plan.timed):
        d, m, hit, waited = await request(True)
        decisions.append(d / 1000)
        matches.append(m / 1000)
        hits += hit
        waits += waited
    for lease in in_flight:
        await lease.release()
    return DecisionRun(
        rep=rep,
        prefixes=len(index),
        requests_to_fill=filled,
        fill_s=fill_s,
        decision_us={f"p{q}": percentile(decisions, q) for q in (50, 99)},
        match_us={f"p{q}": percentile(matches, q) for q in (50, 99)},
        hits=hits / max(plan.timed, 1),
        waits=waits,
    )


def run(plan: DecisionPlan) -> list[DecisionRun]:
    runs = []
    for rep in range(plan.reps):
        result = asyncio.run(_one_run(plan, rep))
        print(f"  decision rep {rep}: {line(result)}", flush=True)
        runs.append(result)
    return runs


def line(r: DecisionRun) -> str:
    d, m = r.decision_us, r.match_us
    return (
        f"decision p50 {_f(d.get('p50'))} p99 {_f(d.get('p99'))} µs, index match p50 "
        f"{_f(m.get('p50'))} p99 {_f(m.get('p99'))} µs, {r.prefixes:,} prefixes "
        f"({r.requests_to_fill:,} requests to fill, {r.fill_s:.1f} s), {r.hits:.0%} matched"
    )


def _f(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.1f}"


def _cell(values: list[float | None]) -> str:
    spread = Spread.of(values)
    if spread is None:
        return "n/a"
    if spread.n < 2 or _f(spread.lo) == _f(spread.hi):
        return f"{_f(spread.median)} µs"
    return f"{_f(spread.median)} [{_f(spread.lo)}-{_f(spread.hi)}] µs"


def section(runs: list[DecisionRun], plan: dict[str, Any]) -> list[str]:
    """The report's section: one table, medians [range] over the repetitions."""
    if not runs:
        return []
    prefixes = Spread.of([r.prefixes for r in runs])
    return [
        "## Routing decision (in process, a full prefix index)",
        "",
        f"llamacpp-ha's own routing objects in one process (`bench/decision.py`): "
        f"{plan.get('backends')} backends of {plan.get('slots')} slots, the "
        f"`{plan.get('policy') or 'default'}` policy, a `CacheIndex` filled through the "
        f"scheduler's own decide-and-place path with conversations of {plan.get('turns')} "
        f"turns on {plan.get('system_prompts')} shared system prompts until it holds "
        f"{_f(prefixes.median if prefixes else None).removesuffix('.0')} prefix keys (its "
        f"bound), {plan.get('busy_slots')} slots kept busy. Then {plan.get('timed'):,} new "
        "requests of the same mix, each timed with `time.perf_counter_ns`: *decision* = the "
        "eligible backends + a `RoutingView` + `Scheduler._decide` (candidates from the index "
        "and the cache shadows, the policy's choice and costs), what one request costs an "
        "idle queue's drain; *index match* = `CacheIndex.match` alone. Median [range] over "
        f"{len(runs)} repetition(s), each with its own seed.",
        "",
        "| figure | p50 | p99 |",
        "|---|--:|--:|",
        f"| decision | {_cell([r.decision_us.get('p50') for r in runs])} "
        f"| {_cell([r.decision_us.get('p99') for r in runs])} |",
        f"| index match | {_cell([r.match_us.get('p50') for r in runs])} "
        f"| {_cell([r.match_us.get('p99') for r in runs])} |",
        "",
        "Timed requests whose index match found a backend: "
        + ", ".join(f"{r.hits:.0%}" for r in runs)
        + "; that the policy chose to keep queued for a busy holder: "
        + ", ".join(str(r.waits) for r in runs)
        + ".",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--reps", type=int, default=DecisionPlan.reps)
    parser.add_argument("--prefixes", type=int, default=DecisionPlan.prefixes)
    parser.add_argument("--timed", type=int, default=DecisionPlan.timed)
    parser.add_argument("--policy", default="", help="a llamacpp-ha policy (default its default)")
    args = parser.parse_args(argv)
    plan = DecisionPlan(
        reps=args.reps, prefixes=args.prefixes, timed=args.timed, policy=args.policy
    )
    runs = run(plan)
    args.out.mkdir(parents=True, exist_ok=True)
    data = {"plan": asdict(plan), "runs": [asdict(r) for r in runs]}
    (args.out / "decision.json").write_text(json.dumps(data, indent=1))
    lines = ["# llamacpp-ha routing decision benchmark", "", *section(runs, asdict(plan))]
    (args.out / "DECISION.md").write_text("\n".join(lines) + "\n")
    print(f"decision: wrote {args.out / 'DECISION.md'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
