"""What a balancer costs, measured against the simulator's ticker mode (no model time at all).

Every contender fronts one ticker backend (``llamacpp-ha-sim --mode ticker``) with plenty of
slots, so nothing queues and every difference from ``direct`` is the balancer's own: added time
to first token at low and at high concurrency, CPU time per request and per streamed chunk (from
``/proc`` for the balancer's process tree only), resident memory per open stream, and the most
concurrent streams it relays before the delay it adds to a chunk exceeds 20 ms at the 99th
percentile."""

from __future__ import annotations

import asyncio
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench import procs
from bench.client import Outcome, new_session, stream_request
from bench.contenders import Contender, Running
from bench.metrics import percentile
from llamacpp_sim import SpawnError, spawn

TICKER_SLOTS = 1024
RELAY_LIMIT_MS = 20.0


@dataclass(frozen=True)
class OverheadPlan:
    """Sizes of each phase; the smoke run shrinks them."""

    low_requests: int = 60
    # Probes for time to first token while this many other streams flow (a token every
    # high_tick_ms each), which is what a busy fleet's balancer relays.
    high_concurrency: int = 64
    high_tick_ms: float = 30.0
    high_s: float = 3.0
    # CPU phases run for a fixed time, not a fixed count: /proc counts CPU in 10 ms ticks, so
    # a fast balancer needs thousands of requests to register, a slow one would take minutes.
    cpu_requests_s: float = 2.0
    cpu_streams: int = 64
    cpu_stream_chunks: int = 100
    cpu_stream_tick_ms: float = 10.0
    cpu_streams_s: float = 3.0
    open_streams: int = 256
    ramp: tuple[int, ...] = (16, 32, 64, 128, 192, 256, 384, 512)
    ramp_chunks: int = 15
    ramp_tick_ms: float = 100.0


@dataclass
class OverheadResult:
    contender: str
    label: str
    ttft_low_ms: dict[str, float | None] = field(default_factory=dict)
    ttft_high_ms: dict[str, float | None] = field(default_factory=dict)
    cpu_ms_per_request: float | None = None
    cpu_us_per_chunk: float | None = None
    rss_idle_mb: float | None = None
    rss_kb_per_stream: float | None = None
    relay_ms: dict[int, dict[str, float | None]] = field(default_factory=dict)
    failures: int = 0
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def start_ticker(log_dir: Path, cpu: str | None) -> tuple[procs.Child, str]:
    log_path = log_dir / "ticker.log"
    try:
        sim = spawn(
            mode="ticker",
            slots=TICKER_SLOTS,
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
) -> list[Outcome]:
    """``total`` requests, or as many as start within ``duration_s``, ``concurrency`` at once."""
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
            await stream_request(http, url, body, o, headers=running.headers, stamped=True)

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
    http: aiohttp.ClientSession, running: Running, n: int, plan: OverheadPlan
) -> tuple[dict[str, float | None], int]:
    url = running.url_for("overhead") + "/v1/chat/completions"
    body = _body(plan.ramp_chunks, plan.ramp_tick_ms)
    rng = random.Random(n)
    outcomes = [Outcome("relay", time.monotonic()) for _ in range(n)]

    async def one(o: Outcome) -> None:
        # Spread the starts over one tick so chunks arrive as a steady flow, not in lockstep.
        await asyncio.sleep(rng.uniform(0, plan.ramp_tick_ms / 1000))
        await stream_request(http, url, body, o, headers=running.headers, stamped=True)

    await asyncio.gather(*(one(o) for o in outcomes))
    delays = [d * 1000 for o in outcomes for d in o.chunk_delays_s]
    failures = sum(1 for o in outcomes if not o.ok)
    return {f"p{q}": percentile(delays, q) for q in (50, 99)}, failures


async def _memory(
    http: aiohttp.ClientSession, running: Running, pid: int, plan: OverheadPlan
) -> tuple[float, float]:
    url = running.url_for("overhead") + "/v1/chat/completions"
    rss_before = procs.rss_bytes(pid)
    # Streams that send one chunk at once and then stay silent for seconds: open, idle-ish.
    body = _body(3, 4000)
    outcomes = [Outcome("memory", time.monotonic()) for _ in range(plan.open_streams)]
    tasks = [
        asyncio.create_task(stream_request(http, url, body, o, headers=running.headers))
        for o in outcomes
    ]
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if all(o.first_token_at is not None or o.error for o in outcomes):
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    rss_open = procs.rss_bytes(pid)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    opened = sum(1 for o in outcomes if o.first_token_at is not None)
    return rss_before / 2**20, (rss_open - rss_before) / 1024 / max(opened, 1)


async def measure(
    running: Running,
    contender: Contender,
    plan: OverheadPlan,
    baseline_relay: dict[int, dict[str, float | None]] | None,
) -> OverheadResult:
    result = OverheadResult(contender.key, contender.label)
    pid = running.child.pid if running.child is not None else None
    async with new_session() as http:
        await _closed_loop(http, running, 4, 40, _body(1))  # warm-up: connections, caches
        low = await _closed_loop(http, running, 1, plan.low_requests, _body(1))
        result.ttft_low_ms = _ttft(low)
        high = await _ttft_under_load(http, running, plan)
        result.ttft_high_ms = _ttft(high)
        result.failures += sum(1 for o in low + high if not o.ok)
        if pid is not None:
            cpu0 = procs.cpu_seconds(pid)
            reqs = await _closed_loop(http, running, 16, 10**9, _body(1), plan.cpu_requests_s)
            cpu1 = procs.cpu_seconds(pid)
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
            cpu2 = procs.cpu_seconds(pid)
            per_request = (cpu1 - cpu0) / max(len(reqs), 1)
            chunks = sum(o.output_tokens for o in streams)
            stream_cpu = (cpu2 - cpu1) - per_request * len(streams)
            result.cpu_ms_per_request = per_request * 1000
            result.cpu_us_per_chunk = max(stream_cpu, 0.0) / max(chunks, 1) * 1e6
            result.failures += sum(1 for o in reqs + streams if not o.ok)
            result.rss_idle_mb, result.rss_kb_per_stream = await _memory(http, running, pid, plan)
        for n in plan.ramp:
            stats, failures = await _relay_step(http, running, n, plan)
            base = (baseline_relay or {}).get(n) or stats
            if _over(stats, base):
                # One hiccup of a shared 2-core machine must not end the ramp: a step over the
                # limit is run again and the better p99 kept; a real limit fails twice.
                again, failures_again = await _relay_step(http, running, n, plan)
                failures += failures_again
                if (again.get("p99") or math.inf) < (stats.get("p99") or math.inf):
                    stats = again
            result.relay_ms[n] = stats
            result.failures += failures
            if baseline_relay is not None and _over(stats, base):
                break
    return result


def _over(stats: dict[str, float | None], base: dict[str, float | None]) -> bool:
    """True when this step adds more than the limit over direct (or, for direct, exceeds it)."""
    if stats is base:
        return (stats.get("p99") or 0.0) > RELAY_LIMIT_MS
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
