"""What every request leaves behind: the monitor's stats, the Prometheus metrics, the access line.

`Recorder` is told when an exchange starts and when it has been released (with its
`ExchangeResult`), and about requests answered before they became exchanges (bad input, auth,
limits). It keeps no request state of its own beyond the counters it feeds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import logs
from .exchange_result import ExchangeResult
from .metrics import Metrics
from .monitor import ProxyStats
from .registry import Registry

CAPACITY_CODES = frozenset({"queue_full", "queue_timeout", "no_healthy_backend", "shutting_down"})


class Recorder:
    """Stats, metrics and the access log of one app."""

    def __init__(self, stats: ProxyStats, metrics: Metrics, registry: Registry) -> None:
        self.stats = stats
        self.metrics = metrics
        self._registry = registry
        self.endpoints: frozenset[str] = frozenset()  # the app's routes, set by create_app

    def started(self) -> None:
        self.stats.in_flight += 1

    def finished(self, result: ExchangeResult) -> None:
        self.stats.in_flight -= 1
        self.stats.record(result)
        self.metrics.observe(result, self._model_of)
        if result.error_code in CAPACITY_CODES:
            self.metrics.rejected(result.error_code)
        if not logs.access_enabled():
            return
        usage = result.usage
        outcome = "disconnected" if result.client_disconnected else result.status
        logs.access(
            f"POST {result.endpoint} {outcome}",
            {
                "request_id": result.request_id,
                "endpoint": result.endpoint,
                "model": result.model,
                "backend": result.backend,
                "status": result.status,
                "key_id": result.key_id,
                "attempts": result.attempts,
                "queue_wait_ms": round(result.queue_wait_s * 1000, 1),
                "ttfb_ms": None if result.ttfb_s is None else round(result.ttfb_s * 1000, 1),
                "duration_ms": round(result.total_s * 1000, 1),
                "prompt_tokens": usage.prompt_tokens,
                "cached_tokens": usage.cached_tokens,
                "completion_tokens": usage.completion_tokens,
                "cache_hit": None
                if usage.cache_hit_ratio is None
                else round(usage.cache_hit_ratio, 3),
                "client_disconnected": result.client_disconnected or None,
                "mid_stream": result.mid_stream or None,
                "resumed": result.resumed or None,
                "resume_refused": result.resume_refused,
                "error": result.error,
            },
        )

    def answered_early(
        self, endpoint: str, status: int, code: str | None, context: Mapping[str, Any]
    ) -> None:
        """A request refused before it became an exchange: bad input, auth, limits."""
        # Unknown paths share one label: clients must not be able to grow the metrics.
        label = endpoint if endpoint in self.endpoints else "other"
        self.stats.count_answered_early(status, code)
        self.metrics.requests.labels(label, "", "none", str(status)).inc()
        key = context.get("client_key")
        if key is not None:
            self.metrics.key_requests.labels(key.id, str(status)).inc()
        if code in CAPACITY_CODES:
            self.metrics.rejected(code)
        logs.access(
            f"{context.get('method', '-')} {endpoint} {status}",
            {
                "request_id": context.get("request_id"),
                "endpoint": endpoint,
                "status": status,
                "code": code,
                "key_id": key.id if key is not None else None,
            },
        )

    def _model_of(self, backend_name: str) -> str:
        for backend in self._registry.backends:
            if backend.name == backend_name and backend.model_ids:
                return backend.model_ids[0]
        return ""
