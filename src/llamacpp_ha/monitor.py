"""What is happening: `ProxyStats` (per app), its `History`, the `/monitor` page and its JSON.

`History` is what the page's charts draw: every `HISTORY_INTERVAL_S` the `HistorySampler` (a
task the balancer owns) turns the counters' growth since the last sample into rates, and reads
the queue and each backend's busy slots; the last `HISTORY_WINDOW_S` of samples are kept, so
a page opened now shows the last 15 minutes. A request costs O(1) (counters, one append);
a sample costs O(backends).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import statistics
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from . import logs
from .exchange_result import ExchangeResult
from .feedback import Feedback, PredictionCounts
from .queue import RequestQueue
from .registry import Registry
from .replicas import Replicas
from .scheduler import RoutingStats

_WINDOW = 1024
_BACKEND_WINDOW = 100
_ERROR_WINDOW_S = 300.0
HISTORY_INTERVAL_S = 5.0
HISTORY_WINDOW_S = 900.0

log = logging.getLogger("llamacpp_ha")


@dataclass(frozen=True, slots=True)
class Sample:
    """One point of the monitor's charts: the fleet over one sampling interval."""

    at_s: float  # time.monotonic(), for the window; never shown
    at_unix_s: float  # the server's clock, for the page's time axis
    interval_s: float  # measured, not nominal: a late sample's rates are still right
    requests_per_s: float
    errors_per_s: float
    ttft_ms_p50: float | None  # None: no request finished with a first token in the interval
    ttft_ms_p95: float | None
    queue_depth: int
    cache_hit_rate: float | None  # None: no prompt tokens in the interval
    slots_busy: dict[str, int]

    def as_json(self) -> dict[str, Any]:
        return {
            "t_unix_s": round(self.at_unix_s, 3),
            "interval_s": round(self.interval_s, 3),
            "requests_per_s": round(self.requests_per_s, 3),
            "errors_per_s": round(self.errors_per_s, 3),
            "ttft_ms_p50": self.ttft_ms_p50,
            "ttft_ms_p95": self.ttft_ms_p95,
            "queue_depth": self.queue_depth,
            "cache_hit_rate": self.cache_hit_rate,
            "slots_busy": dict(self.slots_busy),
        }


@dataclass(frozen=True, slots=True)
class _Totals:
    """The cumulative counters a sample is the growth of."""

    at_s: float
    answered: int
    errors: int
    prompt_tokens: int
    cached_tokens: int


class History:
    """The last `window_s` of samples, one every `interval_s`; filled by `HistorySampler`."""

    def __init__(
        self, interval_s: float = HISTORY_INTERVAL_S, window_s: float = HISTORY_WINDOW_S
    ) -> None:
        if interval_s <= 0 or window_s < interval_s:
            raise ValueError("a history needs 0 < interval_s <= window_s")
        self.interval_s = interval_s
        self.window_s = window_s
        self.samples: deque[Sample] = deque(maxlen=math.ceil(window_s / interval_s))
        self._last: _Totals | None = None

    def take(
        self,
        stats: ProxyStats,
        registry: Registry,
        queue: RequestQueue,
        now: float | None = None,
        now_unix_s: float | None = None,
    ) -> Sample | None:
        """Sample the interval since the last call; the first call only sets the baseline."""
        now = time.monotonic() if now is None else now
        totals = _Totals(
            at_s=now,
            answered=stats.answered(),
            errors=stats.failed + stats.rejected,
            prompt_tokens=stats.prompt_tokens,
            cached_tokens=stats.cached_tokens,
        )
        last, self._last = self._last, totals
        ttft = list(stats.interval_ttft_ms)
        stats.interval_ttft_ms.clear()
        if last is None or now <= last.at_s:
            return None
        elapsed = now - last.at_s
        prompt = totals.prompt_tokens - last.prompt_tokens
        cuts = _percentiles(ttft)
        sample = Sample(
            at_s=now,
            at_unix_s=time.time() if now_unix_s is None else now_unix_s,
            interval_s=elapsed,
            requests_per_s=(totals.answered - last.answered) / elapsed,
            errors_per_s=(totals.errors - last.errors) / elapsed,
            ttft_ms_p50=cuts["p50"],
            ttft_ms_p95=cuts["p95"],
            queue_depth=len(queue),
            cache_hit_rate=round((totals.cached_tokens - last.cached_tokens) / prompt, 3)
            if prompt > 0
            else None,
            slots_busy={b.name: b.slots.busy for b in registry.backends},
        )
        self.samples.append(sample)
        # The count bound holds when samples come on time; this one when they come late.
        while self.samples[0].at_s < now - self.window_s:
            self.samples.popleft()
        return sample

    def describe(self) -> dict[str, Any]:
        return {
            "interval_s": self.interval_s,
            "window_s": self.window_s,
            "now_unix_s": round(time.time(), 3),
            "samples": [s.as_json() for s in self.samples],
        }


class HistorySampler:
    """The task that fills `stats.history`: started and closed by the balancer."""

    def __init__(self, stats: ProxyStats, registry: Registry, queue: RequestQueue) -> None:
        self._stats = stats
        self._registry = registry
        self._queue = queue
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._take()  # the baseline: the first interval starts now
        self._task = asyncio.get_running_loop().create_task(self._run(), name="monitor history")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _take(self) -> None:
        self._stats.history.take(self._stats, self._registry, self._queue)

    async def _run(self) -> None:
        # Supervised: a sample that raises (a bug of ours) is logged and sampling goes on;
        # the first of a run of failures at one place is an error, the repeats are debug.
        failing_at: str | None = None
        while True:
            # Read each time: `stats.history` is the one in place now (a test sets a shorter one).
            await asyncio.sleep(self._stats.history.interval_s)
            try:
                self._take()
                failing_at = None
            except Exception as exc:
                where = logs.location(exc)
                log.log(
                    logging.DEBUG if where == failing_at else logging.ERROR,
                    "monitor history: a sample failed with %s%s; sampling goes on",
                    type(exc).__name__,
                    where,
                )
                failing_at = where


@dataclass
class BackendStats:
    served: int = 0
    failed: int = 0
    ttfb_ms: deque[float] = field(default_factory=lambda: deque(maxlen=_BACKEND_WINDOW))
    # (prompt tokens, cached prompt tokens) of recent requests, for a recent cache hit rate.
    prompts: deque[tuple[int, int]] = field(default_factory=lambda: deque(maxlen=_BACKEND_WINDOW))

    def cache_hit_rate(self) -> float | None:
        total = sum(p for p, _ in self.prompts)
        return round(sum(c for _, c in self.prompts) / total, 3) if total else None


@dataclass
class ProxyStats:
    """Counters and recent latencies of one app; never module-level."""

    started_at: float = field(default_factory=time.monotonic)
    in_flight: int = 0
    succeeded: int = 0
    client_errors: int = 0
    failed: int = 0
    rejected: int = 0
    disconnected: int = 0
    retries: int = 0
    resumed: int = 0  # streams continued from another backend
    resume_failed: int = 0  # broken streams that could not be
    backends: dict[str, BackendStats] = field(default_factory=dict)
    ttfb_ms: deque[float] = field(default_factory=lambda: deque(maxlen=_WINDOW))
    total_ms: deque[float] = field(default_factory=lambda: deque(maxlen=_WINDOW))
    queue_wait_ms: deque[float] = field(default_factory=lambda: deque(maxlen=_WINDOW))
    errors: deque[tuple[float, str]] = field(default_factory=lambda: deque(maxlen=_WINDOW))
    # For the history's cache hit rate (token-weighted) and TTFT of each interval; above
    # 1,024 answers in one interval (200/s at 5 s) its percentiles are of the last 1,024.
    prompt_tokens: int = 0
    cached_tokens: int = 0
    interval_ttft_ms: deque[float] = field(default_factory=lambda: deque(maxlen=_WINDOW))
    history: History = field(default_factory=History)

    def answered(self) -> int:
        """Requests answered since start, whatever the answer."""
        return self.succeeded + self.client_errors + self.failed + self.rejected + self.disconnected

    def backend(self, name: str) -> BackendStats:
        stats = self.backends.get(name)  # not setdefault: it would build one on every call
        if stats is None:
            stats = self.backends[name] = BackendStats()
        return stats

    def count_answered_early(self, status: int, code: str | None = None) -> None:
        """A request answered before it reached the queue (bad input, auth, no backend)."""
        if status == 503:
            self.rejected += 1
        elif status < 500:
            self.client_errors += 1
        else:
            self.failed += 1
        if code:
            self.errors.append((time.monotonic(), code))

    def record(self, result: ExchangeResult) -> None:
        self.retries += max(0, result.attempts - 1)
        self.resumed += result.resumed
        if result.mid_stream and result.resume_refused is not None:
            self.resume_failed += 1
        status, backend = result.status, result.backend
        if result.client_disconnected:
            self.disconnected += 1
        elif status == 503 and backend is None:
            self.rejected += 1
        elif 200 <= status < 400:
            self.succeeded += 1
        elif 400 <= status < 500:
            self.client_errors += 1
        else:
            self.failed += 1
        if result.error_code and not result.client_disconnected:
            self.errors.append((time.monotonic(), result.error_code))
        ok = status == 200 and not result.client_disconnected
        if backend is not None:
            entry = self.backend(backend)
            if status >= 500 and not result.client_disconnected:
                entry.failed += 1
            elif status:
                entry.served += 1
            if ok and result.ttfb_s is not None:
                entry.ttfb_ms.append(result.ttfb_s * 1000)
            usage = result.usage
            if ok and usage.prompt_tokens:
                entry.prompts.append((usage.prompt_tokens, usage.cached_tokens or 0))
                self.prompt_tokens += usage.prompt_tokens
                self.cached_tokens += usage.cached_tokens or 0
        if ok:
            self.queue_wait_ms.append(result.queue_wait_s * 1000)
            if result.ttfb_s is not None:
                self.ttfb_ms.append(result.ttfb_s * 1000)
                self.interval_ttft_ms.append(result.ttfb_s * 1000)
            self.total_ms.append(result.total_s * 1000)

    def recent_errors(self) -> dict[str, int]:
        since = time.monotonic() - _ERROR_WINDOW_S
        return dict(Counter(code for at, code in self.errors if at >= since))


def _percentiles(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None}
    if len(values) == 1:
        return {"p50": round(values[0], 1), "p95": round(values[0], 1)}
    cuts = statistics.quantiles(values, n=20, method="inclusive")
    return {"p50": round(cuts[9], 1), "p95": round(cuts[18], 1)}


def snapshot(
    stats: ProxyStats,
    registry: Registry,
    queue: RequestQueue,
    routing: RoutingStats | None = None,
    feedback: Feedback | None = None,
    replicas: Replicas | None = None,
) -> dict[str, Any]:
    """The monitor's data: no prompt, no key, no raw `/slots` payload."""
    counts = feedback.counts if feedback is not None else {}

    def cache_of(name: str) -> dict[str, Any]:
        held, estimate = feedback.index.capacity(name) if feedback is not None else (0, 0)
        predictions = counts.get(name)
        return {
            "prediction_accuracy": predictions.accuracy if predictions else None,
            "predictions": predictions.total if predictions else 0,
            "predicted_over": predictions.over if predictions else 0,
            "predicted_under": predictions.under if predictions else 0,
            "indexed_tokens": held,
            "capacity_tokens": estimate,
        }

    return {
        "uptime_s": round(time.monotonic() - stats.started_at, 1),
        "backends": [
            {
                "name": b.name,
                "url": b.url,
                "state": b.state,
                # A router-mode server: each model it can serve with its state ("tiny-a
                # (loaded)"); a model instance: its model.
                "models": [f"{m.id} ({m.status})" for m in b.router.models.values()]
                if b.router is not None
                else list(b.model_ids),
                "slots_busy": b.slots.busy,
                "slots_total": b.slots.total,
                "in_flight": b.slots.in_flight,
                "external_busy": b.slots.external_busy,
                "held_elsewhere": b.slots.elsewhere,
                "served": stats.backend(b.name).served,
                "failed": stats.backend(b.name).failed,
                "ttfb_ms_p50": _percentiles(stats.backend(b.name).ttfb_ms)["p50"],
                "cache_hit_rate": stats.backend(b.name).cache_hit_rate(),
                "prefill_tps": round(b.speeds.prefill_tps),
                "decode_tps": round(b.speeds.decode_tps, 1),
                **cache_of(b.name),
                "last_error": b.last_error,
            }
            for b in registry.backends
        ],
        "queue": {"depth": len(queue), "oldest_wait_s": round(queue.oldest_wait_s(), 3)},
        "routing": _routing(routing, counts),
        # Which replica this is, and what it shares (null: a single balancer, nothing shared).
        "replicas": replicas.describe() if replicas is not None else None,
        "recent_errors": stats.recent_errors(),
        "requests": {
            "in_flight": stats.in_flight,
            "succeeded": stats.succeeded,
            "client_errors": stats.client_errors,
            "failed": stats.failed,
            "rejected": stats.rejected,
            "disconnected": stats.disconnected,
            "retries": stats.retries,
            "resumed": stats.resumed,
            "resume_failed": stats.resume_failed,
        },
        "latency_ms": {
            "ttfb": _percentiles(stats.ttfb_ms),
            "total": _percentiles(stats.total_ms),
            "queue_wait": _percentiles(stats.queue_wait_ms),
        },
        # The charts: see History and Sample (README, Monitor, has the schema).
        "history": stats.history.describe(),
    }


def _routing(routing: RoutingStats | None, counts: dict[str, PredictionCounts]) -> dict[str, Any]:
    agree = sum(c.agree for c in counts.values())
    total = sum(c.total for c in counts.values())
    r = routing or RoutingStats()
    return {
        "prediction_accuracy": round(agree / total, 3) if total else None,
        "predictions": total,
        "reordered": r.reordered,
        "max_reorder_delay_s": round(r.max_reorder_delay_s, 3),
        "cache_waits": r.cache_waits,
        "max_cache_wait_s": round(r.max_cache_wait_s, 3),
        "pinned": r.pinned,
    }


def build_router(
    stats: ProxyStats,
    data: Callable[[], dict[str, Any]],
    metrics: CollectorRegistry | None = None,
) -> APIRouter:
    """A new router per call, so no route state is shared between apps (or tests)."""
    router = APIRouter()

    if metrics is not None:

        @router.get("/metrics")
        async def prometheus() -> Response:
            return Response(generate_latest(metrics), media_type=CONTENT_TYPE_LATEST)

    @router.get("/monitor/data")
    async def monitor_data() -> JSONResponse:
        return JSONResponse(data(), headers={"Cache-Control": "no-store"})

    page = (resources.files(__package__) / "static" / "monitor.html").read_text("utf-8")

    @router.get("/monitor")
    async def monitor_page() -> HTMLResponse:
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    return router
