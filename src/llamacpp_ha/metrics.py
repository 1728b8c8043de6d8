"""Prometheus metrics, one registry per app (never the process-wide default one).

Counters and histograms are updated as requests end; what describes the fleet right now
(slots, states, queue depth) is read at scrape time by `FleetCollector`, so it cannot drift.
Labels are bounded: endpoint (a fixed list), backend (configured), model (served ids), status,
key id (configured ids). Never a key or a prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .exchange_result import ExchangeResult
from .model_loads import ModelLoads
from .queue import RequestQueue
from .registry import Registry
from .replicas import Replicas
from .scheduler import RoutingStats

PREFIX = "llamacpp_ha"
STATES = ("ready", "loading", "dead", "ejected", "draining")
# From a cached short prompt to a long generation on a CPU.
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class FleetCollector(Collector):
    def __init__(self, registry: Registry, queue: RequestQueue) -> None:
        self._registry = registry
        self._queue = queue

    def collect(self) -> Iterator[Metric]:
        busy = GaugeMetricFamily(f"{PREFIX}_backend_slots_busy", "Slots busy", labels=["backend"])
        total = GaugeMetricFamily(
            f"{PREFIX}_backend_slots_total", "Slots the backend has", labels=["backend"]
        )
        in_flight = GaugeMetricFamily(
            f"{PREFIX}_backend_in_flight", "Our requests in flight", labels=["backend"]
        )
        state = GaugeMetricFamily(
            f"{PREFIX}_backend_state",
            "1 for the backend's current state",
            labels=["backend", "state"],
        )
        for backend in self._registry.backends:
            busy.add_metric([backend.name], backend.slots.busy)
            total.add_metric([backend.name], backend.slots.total)
            in_flight.add_metric([backend.name], backend.slots.in_flight)
            for name in STATES:
                state.add_metric([backend.name, name], 1.0 if backend.state == name else 0.0)
        yield from (busy, total, in_flight, state)
        yield GaugeMetricFamily(f"{PREFIX}_queue_depth", "Requests waiting", value=len(self._queue))
        yield GaugeMetricFamily(
            f"{PREFIX}_queue_oldest_wait_seconds",
            "How long the oldest queued request has waited",
            value=self._queue.oldest_wait_s(),
        )


class RoutingCollector(Collector):
    """What the scheduler's reordering and cache waits did, read from its own counts."""

    def __init__(self, stats: RoutingStats) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self._stats
        yield CounterMetricFamily(
            f"{PREFIX}_reorders", "Slots given to a later request that gained more", s.reordered
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_reorder_delay_max_seconds",
            "The longest a request waited after a later one first took its slot",
            value=s.max_reorder_delay_s,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_cache_waits",
            "Requests that waited for a busy backend holding their prompt",
            s.cache_waits,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_cache_wait_max_seconds",
            "The longest such wait",
            value=s.max_cache_wait_s,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_pinned_requests", "Requests sent with id_slot", s.pinned
        )


class ModelCollector(Collector):
    """Models loaded on demand (router-mode servers), and what waits for each model."""

    def __init__(self, loads: ModelLoads, queue: RequestQueue) -> None:
        self._loads = loads
        self._queue = queue

    def collect(self) -> Iterator[Metric]:
        counts = self._loads.counts
        loads = CounterMetricFamily(
            f"{PREFIX}_model_loads",
            "Model loads asked of a router-mode server, by outcome: started, done, failed",
            labels=["model", "backend", "outcome"],
        )
        for outcome, table in (
            ("started", counts.started),
            ("done", counts.done),
            ("failed", counts.failed),
        ):
            for (model, backend), n in sorted(table.items()):
                loads.add_metric([model, backend, outcome], n)
        yield loads
        seconds = CounterMetricFamily(
            f"{PREFIX}_model_load_seconds",
            "Time the done loads took (divide by model_loads_total{outcome=done})",
            labels=["model", "backend"],
        )
        for (model, backend), s in sorted(counts.seconds.items()):
            seconds.add_metric([model, backend], s)
        yield seconds
        loading = GaugeMetricFamily(
            f"{PREFIX}_model_loading", "1 while the model loads there", labels=["model", "backend"]
        )
        for model, backend in sorted(self._loads.loading().items()):
            loading.add_metric([model, backend], 1)
        yield loading
        depth = GaugeMetricFamily(
            f"{PREFIX}_queue_depth_by_model",
            "Requests waiting, by the model they asked for (none: any model)",
            labels=["model"],
        )
        waiting: dict[str, int] = {}
        for entry in self._queue:
            name = entry.routing.model or ""
            waiting[name] = waiting.get(name, 0) + 1
        for name, n in sorted(waiting.items()):
            depth.add_metric([name], n)
        yield depth


class ReplicaCollector(Collector):
    """Which replica this is and what sharing its state costs; every series has `replica`."""

    def __init__(self, replicas: Replicas) -> None:
        self._replicas = replicas

    def collect(self) -> Iterator[Metric]:
        r = self._replicas
        me = [r.id]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=["replica"])
            family.add_metric(me, value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=["replica"])
            family.add_metric(me, value)
            return family

        s = r.stats
        yield gauge("replica_info", "1, labelled with this replica's id", 1)
        yield gauge("shared_state_up", "1 while Redis answers and state is shared", float(r.up))
        yield gauge("replicas_live", "Replicas whose heartbeat shared state holds", len(r.live))
        yield counter("shared_state_outages", "Times Redis went away", s.outages)
        yield counter("shared_claims", "Slot claims taken in shared state", s.claims)
        yield counter(
            "shared_claims_refused", "Claims refused: another replica had the slot", s.refused
        )
        yield counter("shared_round_trips", "Round trips to Redis on the hot path", s.round_trips)
        yield counter(
            "shared_round_trip_seconds", "Their time, summed (divide by the count)", s.round_trip_s
        )
        elsewhere = GaugeMetricFamily(
            f"{PREFIX}_backend_slots_elsewhere",
            "Slots other replicas hold on the backend",
            labels=["replica", "backend"],
        )
        for name, held in r.describe()["held_elsewhere"].items():
            elsewhere.add_metric([r.id, name], held)
        yield elsewhere


_Instrument = TypeVar("_Instrument", Counter, Histogram)


class _Children(Generic[_Instrument]):
    """A labelled instrument's children by their label values, kept once made: prometheus'
    `labels()` takes a lock and builds its key anew on every call, six times a request."""

    __slots__ = ("_children", "_instrument")

    def __init__(self, instrument: _Instrument) -> None:
        self._instrument: _Instrument = instrument
        self._children: dict[tuple[str, ...], _Instrument] = {}

    def __call__(self, *values: str) -> _Instrument:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._instrument.labels(*values)
        return child


class Metrics:
    """The app's registry and the instruments that requests update."""

    def __init__(
        self,
        registry: Registry,
        queue: RequestQueue,
        routing: RoutingStats | None = None,
        replicas: Replicas | None = None,
        loads: ModelLoads | None = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests", "Requests answered", ["endpoint", "model", "backend", "status"],
            registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds", "Until the first byte of the answer",
            ["endpoint", "backend"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.duration = Histogram(
            f"{PREFIX}_request_duration_seconds", "Whole request, queue included",
            ["endpoint", "backend"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_wait = Histogram(
            f"{PREFIX}_queue_wait_seconds", "Time spent waiting for a slot",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.rejections = Counter(
            f"{PREFIX}_queue_rejections", "Requests refused for capacity", ["reason"], registry=r
        )
        self.retries = Counter(f"{PREFIX}_retries", "Attempts on another backend", registry=r)
        self.resumes = Counter(
            f"{PREFIX}_stream_resumes",
            "Streams whose backend broke, by outcome: resumed (went on from another backend), "
            "failed (ended with the error event)",
            ["outcome"],
            registry=r,
        )
        self.ejections = Counter(
            f"{PREFIX}_ejections", "Backends ejected after failures", ["backend"], registry=r
        )
        self.key_requests = Counter(
            f"{PREFIX}_key_requests", "Requests by client key id (configured ids, never keys)",
            ["key_id", "status"], registry=r,
        )  # fmt: skip
        self.disconnects = Counter(
            f"{PREFIX}_client_disconnects", "Clients that left before the end", registry=r
        )
        tokens = ["backend", "model"]
        self.prompt_tokens = Counter(
            f"{PREFIX}_prompt_tokens", "Prompt tokens, cached or not", tokens, registry=r
        )
        self.cached_tokens = Counter(
            f"{PREFIX}_prompt_tokens_cached", "Prompt tokens llama-server took from its cache",
            tokens, registry=r,
        )  # fmt: skip
        self.completion_tokens = Counter(
            f"{PREFIX}_completion_tokens", "Tokens generated", tokens, registry=r
        )
        r.register(FleetCollector(registry, queue))
        r.register(RoutingCollector(routing or RoutingStats()))
        if replicas is not None:
            r.register(ReplicaCollector(replicas))
        if loads is not None:
            r.register(ModelCollector(loads, queue))

        self.cache_predictions = Counter(
            f"{PREFIX}_cache_predictions",
            "Predictions of reused prompt tokens against timings.cache_n, by outcome: agree, "
            "over (the backend had lost it), under",
            ["backend", "outcome"],
            registry=r,
        )

        # What every request updates, by label values (`_Children`).
        self._requests = _Children(self.requests)
        self._ttft = _Children(self.ttft)
        self._duration = _Children(self.duration)
        self._prompt_tokens = _Children(self.prompt_tokens)
        self._cached_tokens = _Children(self.cached_tokens)
        self._completion_tokens = _Children(self.completion_tokens)
        self.prediction = _Children(self.cache_predictions)

    def observe(self, result: ExchangeResult, model_of: Callable[[str], str]) -> None:
        backend = result.backend or "none"
        model = result.model or (model_of(result.backend) if result.backend else "")
        if result.client_disconnected:
            self.disconnects.inc()
        status = "disconnected" if result.client_disconnected else str(result.status)
        self._requests(result.endpoint, model, backend, status).inc()
        if result.key_id is not None:
            self.key_requests.labels(result.key_id, status).inc()
        if result.attempts > 1:
            self.retries.inc(result.attempts - 1)
        if result.resumed:
            self.resumes.labels("resumed").inc(result.resumed)
        if result.mid_stream and result.resume_refused is not None:
            self.resumes.labels("failed").inc()
        if result.status == 200 and not result.client_disconnected:
            if result.ttfb_s is not None:
                self._ttft(result.endpoint, backend).observe(result.ttfb_s)
            self._duration(result.endpoint, backend).observe(result.total_s)
            self.queue_wait.observe(result.queue_wait_s)
        usage = result.usage
        if result.backend is not None:
            if usage.prompt_tokens:
                self._prompt_tokens(backend, model).inc(usage.prompt_tokens)
            if usage.cached_tokens:
                self._cached_tokens(backend, model).inc(usage.cached_tokens)
            if usage.completion_tokens:
                self._completion_tokens(backend, model).inc(usage.completion_tokens)

    def rejected(self, code: str) -> None:
        self.rejections.labels(code).inc()
