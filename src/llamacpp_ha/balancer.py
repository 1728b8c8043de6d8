"""`Balancer`: every component of one app, its lifecycle, and how a new configuration applies.

The lifespan starts the components in order and closes them in reverse. As `ExchangeHooks` it
gives each exchange the components it uses, and hears back about backends' failures and
successes; what requests leave behind (stats, metrics, logs) is the `Recorder`'s. `reload()`
applies a new configuration without a restart, as `reload.plan_reload` plans it: backends
join, leave after draining, or change in place; every setting that lives in a component is
updated in place.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from . import logs
from .attempts import RetryBudget
from .config import BackendConfig, ConfigError, ProxyConfig
from .ejection import EjectionPolicy
from .errors import ShuttingDown, UpstreamError
from .exchange import ExchangeLimits, LiveExchanges
from .feedback import Feedback
from .keyring import Keyring
from .limits import FleetKeyLimits, KeyLimits
from .loop_lag import LoopLag
from .metrics import Metrics
from .middleware import HeaderRules
from .model_loads import ModelLoads
from .monitor import HistorySampler, ProxyStats
from .policies import RoutingRequest, RoutingSettings, build_policy
from .prefix_index import CacheIndex
from .queue import Lease, RequestQueue
from .recorder import Recorder
from .registry import BackendState, Registry
from .reload import plan_reload
from .replicas import MIN_FAIR_GRACE_MS, Replicas, default_replica_id
from .scheduler import Scheduler
from .state_store import StateStore
from .transport import Timeouts, Transport
from .usage import Usage

log = logging.getLogger("llamacpp_ha")


def _ejection_policy(config: ProxyConfig) -> EjectionPolicy:
    return EjectionPolicy(
        failures_to_eject=config.eject_after_failures,
        base_s=config.eject_base_s,
        max_s=config.eject_max_s,
        good_polls=config.readmit_after_polls,
        max_fraction=config.max_ejected_fraction,
    )


def _timeouts(config: ProxyConfig) -> Timeouts:
    return Timeouts(
        connect_s=config.connect_timeout_s,
        first_byte_s=config.first_byte_timeout_s,
        idle_s=config.idle_timeout_s,
    )


def _limits(config: ProxyConfig) -> ExchangeLimits:
    return ExchangeLimits(
        queue_timeout_s=config.queue_timeout_s,
        request_timeout_s=config.request_timeout_s,
        write_timeout_s=config.write_timeout_s,
        max_attempts=config.max_attempts,
        max_resumes=config.max_resumes if config.resume_streams else 0,
    )


def _routing_settings(config: ProxyConfig) -> RoutingSettings:
    return RoutingSettings(
        max_cache_wait_s=config.max_cache_wait_s,
        reorder_window_s=config.reorder_window_s,
        reorder_max=config.reorder_max,
        pin_slots=config.pin_slots,
    )


def _fair_grace_ms(config: ProxyConfig) -> int:
    """Across replicas, a request gives way only to one that arrived this much earlier: the
    half reordering window one replica already allows its own queue (or the clocks' margin)."""
    return max(MIN_FAIR_GRACE_MS, round(config.reorder_window_s * 1000 / 2))


class Balancer:
    """Every component of one app, started in order by the lifespan and closed in reverse."""

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.stats = ProxyStats()
        self.keyring = Keyring(config)
        self.header_rules = HeaderRules(config)
        self.key_limits: KeyLimits = KeyLimits()
        self.queue = RequestQueue()
        self.index = CacheIndex(config.session_ttl_s, config.max_sessions)
        self.lag = LoopLag()
        self.registry = Registry(
            config.backends,
            config.poll_interval_s,
            on_change=self.queue.wakeup.set,
            ejection=_ejection_policy(config),
            poll_timeout_s=config.poll_timeout_s,
            unhealthy_after_polls=config.unhealthy_after_polls,
            healthy_after_polls=config.healthy_after_polls,
            lag=self.lag,
        )
        self.scheduler = Scheduler(
            self.queue,
            self.registry,
            build_policy(config.routing, _routing_settings(config)),
            self.index,
            max_queue=config.max_queue,
            settings=_routing_settings(config),
        )
        self.feedback = Feedback(self.index)
        self.transport = Transport()
        self.model_loads = ModelLoads(
            self.registry, lambda: self.transport, on_change=self.queue.wakeup.set
        )
        self.scheduler.loads = self.model_loads
        self.timeouts = _timeouts(config)
        self.limits = _limits(config)
        self.retry_budget = RetryBudget(ratio=config.retry_budget_ratio)
        self.live = LiveExchanges()
        # Several replicas: slots, routing, key limits and operations shared through Redis.
        self.replicas: Replicas | None = None
        if config.state_url is not None:
            self.replicas = Replicas(
                StateStore(config.state_url),
                config.replica_id or default_replica_id(),
                config.lease_ttl_s,
                self.registry,
                self.index,
                self.queue,
                self.scheduler.unconfirmed,
                wakeup=self.queue.wakeup.set,
                apply_op=self._apply_op,
            )
            self.replicas.fair_grace_ms = _fair_grace_ms(config)
            self.scheduler.confirm = self.replicas.confirm
            self.scheduler.queue_changed = self.replicas.queue_changed
            self.key_limits = FleetKeyLimits(self.replicas)
        self.metrics = Metrics(
            self.registry, self.queue, self.scheduler.stats, self.replicas, self.model_loads
        )
        self.recorder = Recorder(self.stats, self.metrics, self.registry)
        self.sampler = HistorySampler(self.stats, self.registry, self.queue)
        self.admitting = True
        self._removals: set[asyncio.Task[None]] = set()
        # Where reload reads the configuration again; set by the command line.
        self.config_source: Callable[[], ProxyConfig] | None = None

    async def start(self) -> None:
        await self.transport.start()
        self.lag.start()
        self.registry.start(self.transport)
        self.scheduler.start()
        if self.replicas is not None:
            await self.replicas.start()
        self.sampler.start()

    async def aclose(self) -> None:
        await self.sampler.aclose()
        for task in self._removals:
            task.cancel()
        await asyncio.gather(*self._removals, return_exceptions=True)
        await self.scheduler.aclose()
        await self.model_loads.aclose()
        if self.replicas is not None:
            await self.replicas.aclose()
        await self.registry.aclose()
        await self.lag.aclose()
        await self.transport.aclose()

    async def drain(self, grace_s: float) -> None:
        """Shutdown: stop admitting, fail the queue, let exchanges finish, then cut them."""
        self.admitting = False
        rejected = self.scheduler.reject_all(ShuttingDown("llamacpp-ha is shutting down"))
        log.warning(
            "shutting down: %d queued requests answered 503, %d in flight get %g s to finish",
            rejected,
            len(self.live),
            grace_s,
        )
        try:
            await asyncio.wait_for(self.live.wait_idle(), grace_s)
        except TimeoutError:
            log.warning("shutting down: cutting %d requests still in flight", len(self.live))
            for exchange in self.live:
                exchange.abort(ShuttingDown("llamacpp-ha shut down before the response ended"))
            await self.live.wait_idle()

    # Changing the fleet ----------------------------------------------------------------

    def add_backend(self, config: BackendConfig, *, announce: bool = True) -> BackendState:
        backend = self.registry.add(config)
        self._set_backends([*self.config.backends, config])
        if announce:
            self._announce("add", config.model_dump(mode="json"))
        return backend

    def remove_backend(self, name: str, *, announce: bool = True) -> None:
        """Start draining `name`; it leaves once its requests in flight have finished."""
        self._drain_and_remove(name)
        self._set_backends([b for b in self.config.backends if b.name != name])
        if announce:
            self._announce("remove", name)

    def set_draining(self, name: str, draining: bool, *, announce: bool = True) -> BackendState:
        backend = self.registry.get(name)
        self.registry.set_draining(backend, draining)
        if announce:
            self._announce("drain" if draining else "undrain", name)
        return backend

    def _announce(self, op: str, arg: object) -> None:
        if self.replicas is not None:
            self.replicas.announce(op, arg)

    def _apply_op(self, op: str, arg: Any) -> None:
        """An operation another replica applied (replicas.py): the same here, not announced."""
        try:
            if op == "add":
                config = BackendConfig.model_validate(arg)
                if all(b.name != config.name for b in self.registry.backends):
                    self.add_backend(config, announce=False)
            elif op == "remove":
                self.remove_backend(str(arg), announce=False)
            elif op in ("drain", "undrain"):
                self.set_draining(str(arg), op == "drain", announce=False)
            elif op == "reload":
                self.reload_from_source(announce=False)
            else:
                return
        except (KeyError, ValueError, ConfigError) as exc:
            log.warning("another replica's %s (%s) does not apply here: %s", op, arg, exc)
            return
        log.warning("applied another replica's %s %s", op, "" if arg is None else arg)

    def _set_backends(self, backends: list[BackendConfig]) -> None:
        # The configuration in force includes the fleet's changes through /admin/, so that a
        # reload compares the new configuration with what runs.
        self.config = self.config.model_copy(update={"backends": backends})

    def _drain_and_remove(self, name: str) -> None:
        # KeyError for an unknown name, before anything changes. Draining at once, not when
        # the removal task first runs: no request may be placed on it in between.
        self.registry.set_draining(self.registry.get(name), True)
        task = asyncio.get_running_loop().create_task(self.registry.remove(name))
        self._removals.add(task)
        task.add_done_callback(self._removals.discard)
        self.feedback.forget_backend(name)

    def reload_from_source(self, *, announce: bool = True) -> list[str]:
        """Read the configuration again (file, environment, flags) and apply it.

        Raises ConfigError, leaving everything as it was, when the new configuration is invalid.
        """
        if self.config_source is None:
            raise ConfigError("there is no configuration file to read again")
        try:
            new = self.config_source()
        except ConfigError as exc:
            log.error("reload rejected, keeping the running configuration: %s", exc)
            raise
        restart_needed = self.reload(new)
        if announce:
            self._announce("reload", None)
        log.warning(
            "configuration reloaded: %d backends%s",
            len(new.backends),
            f"; restart needed for {', '.join(restart_needed)}" if restart_needed else "",
        )
        return restart_needed

    def reload(self, new: ProxyConfig) -> list[str]:
        """Apply `new`; returns the settings that still need a restart to change."""
        plan = plan_reload(self.config, new)
        self.config = new
        for name in plan.backends.removed:
            self._drain_and_remove(name)
        for backend in plan.backends.changed:
            self.registry.update(backend)  # same name: it keeps its state
        for backend in plan.backends.added:
            self.registry.add(backend)
        # The components that hold a setting take the new value; the others (body and JSON
        # limits, the receive timeout, the shutdown grace) read self.config when they need it.
        self.keyring.update(new)
        self.header_rules.update(new)
        self.index.configure(new.session_ttl_s, new.max_sessions)
        self.scheduler.settings = _routing_settings(new)
        if self.replicas is not None:
            self.replicas.fair_grace_ms = _fair_grace_ms(new)
        self.registry.set_poll_interval(new.poll_interval_s)
        self.registry.set_poll_rules(
            new.poll_timeout_s, new.unhealthy_after_polls, new.healthy_after_polls
        )
        self.registry.ejection_policy = _ejection_policy(new)
        self.scheduler.max_queue = new.max_queue
        self.timeouts = _timeouts(new)
        self.limits = _limits(new)
        # These hold state of their own (a rotation, tokens) or act on the whole process:
        # only a new value replaces them.
        if {"routing", "max_cache_wait_s"} & set(plan.live):
            self.scheduler.policy = build_policy(new.routing, _routing_settings(new))
        if "retry_budget_ratio" in plan.live:
            self.retry_budget = RetryBudget(ratio=new.retry_budget_ratio)
        if "log_level" in plan.live:
            logs.set_level(new.log_level)
        self.queue.wakeup.set()
        return list(plan.restart)

    # ExchangeHooks ---------------------------------------------------------------------

    def backend_failed(self, backend: BackendState, error: UpstreamError) -> None:
        if error.unreachable:
            self.registry.report_unreachable(backend, error.message)
        elif self.registry.report_failure(backend, error.message):
            self.metrics.ejections.labels(backend.name).inc()

    def backend_loading(self, backend: BackendState) -> None:
        self.registry.report_loading(backend)

    def upstream_succeeded(
        self, backend: BackendState, routing: RoutingRequest, lease: Lease, usage: Usage | None
    ) -> None:
        self.registry.report_success(backend)
        if usage is None:
            return
        outcome = self.feedback.answered(backend, routing, lease, usage)
        if self.replicas is not None:
            tokens = usage.prompt_tokens or round(
                routing.prompt.size * backend.speeds.tokens_per_byte
            )
            self.replicas.answered(lease, routing.prompt.keys, tokens, usage.completion_tokens or 0)
        if outcome is not None:
            self.metrics.prediction(backend.name, outcome).inc()
