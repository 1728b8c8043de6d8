"""What a balancer costs, measured against the simulator's ticker mode (no model time at all).

Every contender fronts one ticker backend (``llamacpp-ha-sim --mode ticker``) with a slot for
every stream the section opens, so nothing queues and every difference from ``direct`` is the
balancer's own: added time to first token at low and at high concurrency, CPU time per
non-streamed request, per one-token stream and per streamed chunk (from ``/proc`` for the
balancer's process tree only), resident memory per open stream (2,000 of them), and the most
concurrent streams it relays before the delay it adds to a chunk exceeds 20 ms at the 99th
percentile. The many-stream phases run on `bench.streamers` (several client processes); the
others on one aiohttp session of the harness. ``run.py`` repeats the whole measurement per
contender (``--overhead-reps``), every contender once per repetition, direct first."""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench import procs
from bench.client import Outcome, complete_request, new_session, stream_request
from bench.contenders import Contender, Running
from bench.metrics import percentile
from bench.streamers import StreamPool
from llamacpp_sim import SpawnError, spawn

RELAY_LIMIT_MS = 20.0
# Slots the ticker reports beyond the most streams a phase opens: a slot is released a moment
# after its client has read the end of the stream.
SLOT_MARGIN = 64


@dataclass(frozen=True)
class OverheadPlan:
    """Sizes of each phase; the smoke run shrinks them."""

    low_requests: int = 200
    # Probes for time to first token while this many other streams flow (a token every
    # high_tick_ms each), which is what a busy fleet's balancer relays.
    high_concurrency: int = 64
    high_tick_ms: float = 30.0
    high_s: float = 2.0
    # CPU phases run for a fixed time, not a fixed count: /proc counts CPU in 10 ms ticks, so
    # a fast balancer needs thousands of requests to register, a slow one would take minutes.
    # 2 s of a busy balancer is 200 ticks: the tick's rounding is under 1 %.
    cpu_concurrency: int = 16
    cpu_requests_s: float = 2.0  # small non-streamed chat requests
    cpu_stream1_s: float = 2.0  # one-token streams
    cpu_streams: int = 64
    cpu_stream_chunks: int = 100
    cpu_stream_tick_ms: float = 10.0
    cpu_streams_s: float = 2.5
    # The many-stream phases (bench.streamers): new streams per second, the pause once all are
    # open, and how long they are held open together.
    open_streams: int = 2000
    ramp: tuple[int, ...] = (128, 512, 1024, 1536, 2048)
    ramp_tick_ms: float = 500.0
    start_rate: float = 2000.0
    settle_s: float = 0.2
    ramp_window_s: float = 1.0
    memory_window_s: float = 0.4
    clients: int = 2  # load generator processes

    @property
    def ticker_slots(self) -> int:
        return max(max(self.ramp, default=0), self.open_streams) + SLOT_MARGIN

    def ramp_chunks(self, streams: int) -> int:
        """Chunks enough for a stream started first to outlast the window even if admitting
        the others takes twice the planned time (it is cancelled at the window's end)."""
        needed_s = 2 * streams / self.start_rate + 2.0 + self.settle_s + self.ramp_window_s
        return math.ceil(needed_s * 1000 / self.ramp_tick_ms) + 1


@dataclass
class OverheadResult:
    """One contender's overhead figures from one repetition."""

    contender: str
    label: str
    rep: int = 0
    ttft_low_ms: dict[str, float | None] = field(default_factory=dict)
    ttft_high_ms: dict[str, float | None] = field(default_factory=dict)
    cpu_ms_per_request: float | None = None  # a small non-streamed request
    cpu_ms_per_stream1: float | None = None  # a one-token stream
    cpu_us_per_chunk: float | None = None
    rss_idle_mb: float | None = None
    rss_kb_per_stream: float | None = None
    open_streams: int | None = None  # opened together in the memory phase
    # By concurrent streams: relay delay p50/p99 (ms) of the chunks written while all of them
    # were open; p99 None when they could not all be held open together.
    relay_ms: dict[int, dict[str, float | None]] = field(default_factory=dict)
    failures: int = 0
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def start_ticker(log_dir: Path, cpu: str | None, slots: int) -> tuple[procs.Child, str]:
    log_path = log_dir / "ticker.log"
    try:
        sim = spawn(
            mode="ticker",
            slots=slots,
            log_path=log_path,
            wrapper=procs.pinned([], cpu),
            new_session=True,
        )
    except SpawnError as exc:
        raise RuntimeError(f"ticker did not start: {exc}") from None
    return procs.adopt("ticker", sim.popen, log_path), sim.url


def _body(max_tokens: int, tick_ms: float = 0.0) -> dict[str, Any]:
    return {
        "model": "sim-model",
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": f"tick {tick_ms:g}"}],
    }


async def _closed_loop(
    http: aiohttp.ClientSession,
    running: Running,
    concurrency: int,
    total: int,
    body: dict[str, Any],
    duration_s: float | None = None,
    stream: bool = True,
) -> list[Outcome]:
    """``total`` requests, or as many as start within ``duration_s``, ``concurrency`` at once;
    streamed (stamped) or not."""
    url = running.url_for("overhead") + "/v1/chat/completions"
    outcomes: list[Outcome] = []
    remaining = total
    stop_at = None if duration_s is None else time.monotonic() + duration_s

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0 and (stop_at is None or time.monotonic() < stop_at):
            remaining -= 1
            o = Outcome("overhead", time.monotonic())
            outcomes.append(o)
            if stream:
                await stream_request(http, url, body, o, headers=running.headers, stamped=True)
            else:
                await complete_request(http, url, body, o, headers=running.headers)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcomes


async def _ttft_under_load(
    http: aiohttp.ClientSession, running: Running, plan: OverheadPlan
) -> list[Outcome]:
    chunks = max(1, int(plan.high_s * 1000 / plan.high_tick_ms))
    background = asyncio.create_task(
        _closed_loop(
            http,
            running,
            plan.high_concurrency,
            10**9,
            _body(chunks, plan.high_tick_ms),
            plan.high_s,
        )
    )
    await asyncio.sleep(min(0.5, plan.high_s / 4))  # let the streams ramp up
    url = running.url_for("overhead") + "/v1/chat/completions"
    probes: list[Outcome] = []
    stop_at = time.monotonic() + plan.high_s * 0.75
    while time.monotonic() < stop_at:
        o = Outcome("probe", time.monotonic())
        probes.append(o)
        await stream_request(http, url, _body(1), o, headers=running.headers, stamped=True)
        await asyncio.sleep(0.02)
    streams = await background
    return probes + [o for o in streams if not o.ok]


def _ttft(outcomes: list[Outcome]) -> dict[str, float | None]:
    values = [o.ttft_s * 1000 for o in outcomes if o.ok and o.ttft_s is not None]
    return {f"p{q}": percentile(values, q) for q in (50, 99)}


async def _relay_step(
    pool: StreamPool, running: Running, n: int, plan: OverheadPlan
) -> tuple[dict[str, float | None], int]:
    url = running.url_for("overhead") + "/v1/chat/completions"
    body = _body(plan.ramp_chunks(n), plan.ramp_tick_ms)
    step = await pool.step(
        url, running.headers, body, n, plan.start_rate, plan.settle_s, plan.ramp_window_s
    )
    stats = {f"p{q}": percentile(step.delays_ms, q) for q in (50, 99)}
    if not step.held:
        stats["p99"] = None  # never n streams open together: not a measurement of n
    return stats, step.failures


async def _memory(
    pool: StreamPool, running: Running, pid: int, plan: OverheadPlan, rss_before: int
) -> tuple[float | None, int, int]:
    """(KiB per open stream over ``rss_before``, streams opened together, failures)."""
    url = running.url_for("overhead") + "/v1/chat/completions"
    rss_open: list[int] = []
    # Streams that send one chunk at once and then stay silent: open, idle. Cancelled once
    # the resident set has been read with all of them open (the second chunk, 10 s later,
    # tells a balancer that still holds the backend's side that the client has gone).
    body = _body(2, 10_000)
    step = await pool.step(
        url,
        running.headers,
        body,
        plan.open_streams,
        plan.start_rate,
        plan.settle_s,
        plan.memory_window_s,
        during=lambda: rss_open.append(procs.rss_bytes(pid)),
    )
    per_stream = None
    if rss_open and step.opened:
        per_stream = (rss_open[0] - rss_before) / 1024 / step.opened
    opened = step.opened if step.all_open else min(step.opened, plan.open_streams)
    return per_stream, opened, step.failures + step.short


async def measure(
    running: Running,
    contender: Contender,
    plan: OverheadPlan,
    baseline_relay: dict[int, dict[str, float | None]] | None,
    pool: StreamPool,
    rep: int = 0,
) -> OverheadResult:
    result = OverheadResult(contender.key, contender.label, rep)
    pid = running.child.pid if running.child is not None else None
    async with new_session() as http:
        await _closed_loop(http, running, 4, 40, _body(1))  # warm-up: connections, caches
        await _closed_loop(http, running, 4, 40, _body(1), stream=False)
        low = await _closed_loop(http, running, 1, plan.low_requests, _body(1))
        result.ttft_low_ms = _ttft(low)
        high = await _ttft_under_load(http, running, plan)
        result.ttft_high_ms = _ttft(high)
        result.failures += sum(1 for o in low + high if not o.ok)
        if pid is not None:
            n = plan.cpu_concurrency
            cpu0 = procs.cpu_seconds(pid)
            reqs = await _closed_loop(
                http, running, n, 10**9, _body(1), plan.cpu_requests_s, stream=False
            )
            cpu1 = procs.cpu_seconds(pid)
            ones = await _closed_loop(http, running, n, 10**9, _body(1), plan.cpu_stream1_s)
            cpu2 = procs.cpu_seconds(pid)
            # Spaced chunks (a token every 10 ms, like a GPU) so each is relayed on its own,
            # as in real streaming, instead of being coalesced with its neighbours in one read.
            streams = await _closed_loop(
                http,
                running,
                plan.cpu_streams,
                10**9,
                _body(plan.cpu_stream_chunks, plan.cpu_stream_tick_ms),
                plan.cpu_streams_s,
            )
            cpu3 = procs.cpu_seconds(pid)
            per_stream1 = (cpu2 - cpu1) / max(len(ones), 1)
            chunks = sum(o.output_tokens for o in streams)
            stream_cpu = (cpu3 - cpu2) - per_stream1 * len(streams)
            result.cpu_ms_per_request = (cpu1 - cpu0) / max(len(reqs), 1) * 1000
            result.cpu_ms_per_stream1 = per_stream1 * 1000
            result.cpu_us_per_chunk = max(stream_cpu, 0.0) / max(chunks, 1) * 1e6
            result.failures += sum(1 for o in reqs + ones + streams if not o.ok)
    # Before the many-stream phases: an allocator keeps what the ramp grew, so the resident
    # set with the memory phase's streams open is taken against this one.
    rss_idle = procs.rss_bytes(pid) if pid is not None else 0
    result.rss_idle_mb = rss_idle / 2**20 if pid is not None else None
    for n in plan.ramp:
        stats, failures = await _relay_step(pool, running, n, plan)
        base = (baseline_relay or {}).get(n) or stats
        if _over(stats, base):
            # One hiccup of a shared 2-core machine must not end the ramp: a step over the
            # limit is run again and the better p99 kept; a real limit fails twice.
            again, failures_again = await _relay_step(pool, running, n, plan)
            failures += failures_again
            if (again.get("p99") or math.inf) < (stats.get("p99") or math.inf):
                stats = again
        result.relay_ms[n] = stats
        result.failures += failures
        if baseline_relay is not None and _over(stats, base):
            break
    # Last: a balancer may keep the backend's side of a cancelled idle stream until the
    # backend next writes (HAProxy without `option abortonclose`), holding its slots.
    if pid is not None:
        per_stream, opened, failures = await _memory(pool, running, pid, plan, rss_idle)
        result.rss_kb_per_stream = per_stream
        result.open_streams = opened
        result.failures += failures
    return result


def _over(stats: dict[str, float | None], base: dict[str, float | None]) -> bool:
    """True when this step adds more than the limit over direct (or, for direct, exceeds it)."""
    if stats.get("p99") is None:
        return True  # the streams were never all open together
    if stats is base:
        return float(stats["p99"] or 0.0) > RELAY_LIMIT_MS
    added = _added(stats, base)
    return added is not None and added > RELAY_LIMIT_MS


def _added(stats: dict[str, float | None], base: dict[str, float | None]) -> float | None:
    mine, theirs = stats.get("p99"), base.get("p99")
    if mine is None or theirs is None:
        return None
    return float(mine) - float(theirs)


def generator_limit(baseline: dict[int, dict[str, float | None]]) -> int | None:
    """Most streams the load generator itself relays (direct) under the limit."""
    best: int | None = None
    for n in sorted(baseline):
        if (baseline[n].get("p99") or math.inf) > RELAY_LIMIT_MS:
            break
        best = n
    return best


def carried_streams(
    result: OverheadResult, baseline: dict[int, dict[str, float | None]]
) -> tuple[int | None, str]:
    """Most streams with added p99 relay delay <= 20 ms, and why the count stops there.

    The reason is ``limit`` (the next step broke it), ``generator`` (direct itself broke it at
    the next step, so nothing above can be measured here) or ``max`` (the ramp ended).
    """
    best: int | None = None
    ceiling = generator_limit(baseline)
    for n in sorted(result.relay_ms):
        if ceiling is None or n > ceiling:
            return best, "generator"
        added = _added(result.relay_ms[n], baseline.get(n, {}))
        if added is None or added > RELAY_LIMIT_MS:
            return best, "limit"
        best = n
    return best, "max"
