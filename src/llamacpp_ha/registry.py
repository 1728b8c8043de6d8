"""The fleet: each backend's live state, kept current by polling it.

Every backend has its own poll task, so a slow or hung backend never delays what we learn
about the others. A poll reads `/health`, then `/v1/models` and `/slots` (or `/props` for the
slot count where llama-server runs with `--no-slots`); `probe.py` reads the answers, and the
registry applies what they say.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from . import catalogue, logs
from .config import BackendConfig
from .ejection import EjectionPolicy, EjectionState
from .errors import UpstreamError
from .loop_lag import LoopLag
from .probe import (
    Health,
    RouterModel,
    Slots,
    Unavailable,
    parse_health,
    parse_models,
    parse_props,
    parse_router_props,
    parse_slots,
    router_models,
)
from .server_cache import ServerCaches
from .slot_ledger import SlotLedger, SlotTracker
from .speeds import Speeds
from .transport import Transport, reason

__all__ = ["BackendState", "Health", "Registry"]

log = logging.getLogger("llamacpp_ha.registry")

# Read for every backend a request might go to: a member lookup on an Enum class costs several
# times a global's before Python 3.12.
_READY = Health.READY


@dataclass
class BackendState:
    """What we know of one backend right now."""

    config: BackendConfig
    slots: SlotLedger
    health: Health = Health.DEAD
    model_ids: tuple[str, ...] = ()
    model_names: frozenset[str] = frozenset()
    model_entries: tuple[dict[str, Any], ...] = ()
    n_ctx: int | None = None  # one slot's context size, from /slots
    failed_polls: int = 0  # in a row
    good_polls: int = 0  # in a row
    ejection: EjectionState = field(default_factory=EjectionState)
    draining: bool = False
    last_error: str | None = None
    last_poll_at: float | None = None
    poll_started_at: float = 0.0
    ssl: ssl.SSLContext | bool = True
    changed_at: float = field(default_factory=time.monotonic)
    speeds: Speeds = field(default_factory=Speeds)
    # Router mode (llama-server with --models-dir and no model): the models it can serve, and
    # a state of its own for each loaded model instance, routed like a backend.
    router: RouterState | None = None
    parent: BackendState | None = None  # a model instance's router
    last_used_at: float = 0.0  # when a request last went there (a model instance's LRU)
    evicting: bool = False  # a model instance given up for another model's load
    _caches: ServerCaches | None = None

    @property
    def caches(self) -> ServerCaches:
        """The shadow of its prompt caches, new whenever its number of slots changes."""
        caches = self._caches
        if caches is None or len(caches.slots) != self.slots.total:
            caches = self._caches = ServerCaches(self.slots.total, self.config.host_cache_tokens)
        return caches

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def url(self) -> str:
        return self.config.url

    @property
    def routable(self) -> bool:
        parent = self.parent
        return (
            self.health is _READY
            and not self.ejection.ejected
            and not self.draining
            and not self.evicting
            and self.slots.total > 0
            and (parent is None or (parent.health is _READY and not parent.draining))
        )

    @property
    def state(self) -> str:
        """ready, loading, dead, ejected or draining: what an operator needs to know."""
        if self.draining:
            return "draining"
        if self.ejection.ejected and self.health is Health.READY:
            return "ejected"
        return self.health.value


@dataclass
class RouterState:
    """What a router-mode llama-server serves: every model it lists, how many it keeps loaded
    at once (`--models-max`, 0: no limit), and one BackendState per loaded model instance."""

    models: dict[str, RouterModel] = field(default_factory=dict)
    max_loaded: int | None = None
    instances: dict[str, BackendState] = field(default_factory=dict)
    # When the poll whose /v1/models answer `models` is started: what the server said after
    # some moment is known only from a poll that started after it, and has answered (the one
    # under way may not have).
    models_polled_at: float = 0.0

    def loaded(self) -> list[str]:
        """The models that hold a place under `--models-max`: loaded, sleeping or loading."""
        return [m.id for m in self.models.values() if m.loaded or m.status == "loading"]

    def has_room(self) -> bool:
        return not self.max_loaded or len(self.loaded()) < self.max_loaded


class _PollFailed(Exception):
    """A poll request got no answer at all; `refused` when not even a connection was made."""

    def __init__(self, reason: str, *, refused: bool = False) -> None:
        super().__init__(reason)
        self.unavailable = Unavailable(Health.DEAD, reason)
        self.refused = refused


class Registry:
    """Owns the backends' states and the tasks that poll them."""

    def __init__(
        self,
        configs: Iterable[BackendConfig],
        poll_interval_s: float,
        on_change: Callable[[], None],
        ejection: EjectionPolicy | None = None,
        *,
        poll_timeout_s: float = 1.0,
        unhealthy_after_polls: int = 2,
        healthy_after_polls: int = 1,
        lag: LoopLag | None = None,
        transport: Transport | None = None,
    ) -> None:
        self._transport = transport
        self.set_poll_interval(poll_interval_s)
        self.set_poll_rules(poll_timeout_s, unhealthy_after_polls, healthy_after_polls)
        self._lag = lag
        self._on_change = on_change
        self.ejection_policy = ejection or EjectionPolicy(
            failures_to_eject=3, base_s=5.0, max_s=300.0, good_polls=3, max_fraction=0.5
        )
        self._backends: dict[str, BackendState] = {
            c.name: BackendState(
                config=c, slots=SlotTracker(c.name, on_release=on_change), ssl=c.ssl_context()
            )
            for c in configs
        }
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._stopping: set[asyncio.Task[None]] = set()  # cancelled, not yet finished

    def set_poll_interval(self, poll_interval_s: float) -> None:
        self._poll_interval_s = poll_interval_s

    @property
    def poll_rules(self) -> tuple[float, int, int]:
        """The poll timeout, failed polls before dead, good polls before ready."""
        return self._poll_timeout_s, self._unhealthy_after, self._healthy_after

    def set_poll_rules(
        self, timeout_s: float, unhealthy_after_polls: int, healthy_after_polls: int
    ) -> None:
        """Active health (Caddy's `timeout`, `fails`, `passes`): a poll unanswered within
        `timeout_s` of our own time fails; so many failed polls in a row make a backend dead (a
        refused connection or a "loading" answer at once), so many good ones make it ready."""
        self._poll_timeout_s = timeout_s
        self._unhealthy_after = unhealthy_after_polls
        self._healthy_after = healthy_after_polls

    @property
    def poll_interval_s(self) -> float:
        return self._poll_interval_s

    @property
    def backends(self) -> list[BackendState]:
        """Every backend, a router-mode one followed by its model instances."""
        out = []
        for backend in self._backends.values():
            out.append(backend)
            if backend.router is not None:
                out.extend(backend.router.instances.values())
        return out

    @property
    def routers(self) -> list[BackendState]:
        return [b for b in self._backends.values() if b.router is not None]

    def get(self, name: str) -> BackendState:
        found = self._backends.get(name)
        if found is not None:
            return found
        for backend in self.routers:
            assert backend.router is not None
            for instance in backend.router.instances.values():
                if instance.name == name:
                    return instance
        raise KeyError(name)

    def start(self, transport: Transport) -> None:
        self._transport = transport
        for backend in self._backends.values():
            self._start_polling(backend)

    async def aclose(self) -> None:
        tasks = [*self._tasks.values(), *self._stopping]
        self._tasks = {}
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def add(self, config: BackendConfig) -> BackendState:
        """A new backend, polled at once and used as soon as it is ready."""
        if config.name in self._backends:
            raise ValueError(f"a backend named {config.name!r} exists already")
        if any(b.url == config.url for b in self._backends.values()):
            raise ValueError(f"a backend with URL {config.url} exists already")
        backend = BackendState(
            config=config,
            slots=SlotTracker(config.name, on_release=self._on_change),
            ssl=config.ssl_context(),
        )
        self._backends[config.name] = backend
        if self._transport is not None:
            self._start_polling(backend)
        log.warning("backend %s: added (%s)", config.name, config.url)
        return backend

    async def remove(self, name: str) -> None:
        """Drain the backend (no new requests; those in flight finish), then forget it."""
        backend = self._backends[name]
        self.set_draining(backend, True)
        await backend.slots.wait_idle()
        task = self._tasks.pop(name, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._backends.pop(name, None)
        log.warning("backend %s: removed", name)
        self._on_change()

    def update(self, config: BackendConfig) -> BackendState:
        """The backend named `config.name` takes a new configuration (URL, key, TLS) in place.

        What we know of it stays: ejection history, slot counts, requests in flight (they
        finish on their own connections). It is polled at once with the new configuration.
        The caller has checked that the URL is not another backend's (ProxyConfig does).
        """
        backend = self._backends[config.name]
        backend.config, backend.ssl = config, config.ssl_context()
        if self._transport is not None:
            self._start_polling(backend)
        log.warning("backend %s: configuration changed (%s)", config.name, config.url)
        return backend

    def _start_polling(self, backend: BackendState) -> None:
        previous = self._tasks.get(backend.name)
        if previous is not None:
            # A poll under way asks the old address: its answers must not land on the new one.
            previous.cancel()
            self._stopping.add(previous)
            previous.add_done_callback(self._stopping.discard)
        self._tasks[backend.name] = asyncio.get_running_loop().create_task(
            self._poll_loop(backend), name=f"poll {backend.name}"
        )

    # Model names: the catalogue's, kept here for the callers that ask the registry -------

    def single_model(self) -> bool:
        return catalogue.single_model(self._backends.values())

    def knows_model(self, model: str) -> bool:
        return catalogue.knows_model(self._backends.values(), model)

    def serving(self, model: str | None) -> list[BackendState]:
        return catalogue.serving(self.backends, model)

    def model_list(self) -> list[dict[str, Any]]:
        return catalogue.model_list(self._backends.values())

    # Reports from live traffic ------------------------------------------------------------

    def report_unreachable(self, backend: BackendState, reason: str) -> None:
        """A request could not reach the backend: stop routing to it until a poll succeeds."""
        self._set_health(backend, Health.DEAD, reason)

    def report_loading(self, backend: BackendState) -> None:
        """A request got llama-server's 503 "Loading model": it restarted behind our back."""
        self._set_health(backend, Health.LOADING, "loading model")

    def report_failure(self, backend: BackendState, reason: str) -> bool:
        """Live traffic failed on the backend (never the client's own doing); True if that
        ejected it."""
        ejected_now = sum(1 for b in self._backends.values() if b.ejection.ejected)
        if not self.ejection_policy.on_failure(backend.ejection, ejected_now, len(self._backends)):
            return False
        log.warning(
            "backend %s: ejected for %.0f s after %d consecutive failures (%s)",
            backend.name,
            backend.ejection.ejected_until - time.monotonic(),
            backend.ejection.consecutive_failures,
            reason,
        )
        backend.changed_at = time.monotonic()
        self._on_change()
        return True

    def report_success(self, backend: BackendState) -> None:
        self.ejection_policy.on_success(backend.ejection)

    def set_draining(self, backend: BackendState, draining: bool) -> None:
        if backend.draining != draining:
            backend.draining = draining
            log.warning("backend %s: %s", backend.name, "draining" if draining else "undrained")
            self._on_change()

    # Polling -----------------------------------------------------------------------------

    async def _poll_loop(self, backend: BackendState) -> None:
        # Supervised: a poll that raises (a bug of ours; no answer can make it raise) is logged
        # and the loop goes on, so a backend is never left unpolled. The first of a run of
        # failures at one place is an error, the repeats are debug.
        failing_at: str | None = None
        while True:
            started = time.monotonic()
            try:
                await self.poll(backend)
                failing_at = None
            except Exception as exc:
                where = logs.location(exc)
                # Its type and where, never its message: that may quote a backend's answer.
                log.log(
                    logging.DEBUG if where == failing_at else logging.ERROR,
                    "backend %s: poll failed with %s%s; polling goes on",
                    backend.name,
                    type(exc).__name__,
                    where,
                )
                failing_at = where
                self._poll_broke(backend, type(exc).__name__)
            elapsed = time.monotonic() - started
            await asyncio.sleep(max(0.0, self._poll_interval_s - elapsed))

    def _poll_broke(self, backend: BackendState, error: str) -> None:
        """A poll that broke shows nothing about the backend: not ready until one works."""
        backend.last_error = f"poll failed ({error})"
        if backend.health is not Health.DEAD:
            # Not through _set_health: its on_change may be what raised. Less capacity needs
            # no wake-up; the scheduler checks each backend when it next places a request.
            backend.health, backend.changed_at = Health.DEAD, time.monotonic()

    async def poll(self, backend: BackendState) -> None:
        refused = False
        backend.poll_started_at = time.monotonic()
        try:
            unavailable = await self._probe(backend)
        except _PollFailed as failed:
            unavailable, refused = failed.unavailable, failed.refused
        finally:
            backend.last_poll_at = time.monotonic()
        if unavailable is None:
            backend.failed_polls, backend.good_polls = 0, backend.good_polls + 1
            if backend.health is Health.READY or backend.good_polls >= self._healthy_after:
                self._set_health(backend, Health.READY, None)
        else:
            backend.failed_polls, backend.good_polls = backend.failed_polls + 1, 0
            # One slow or failed poll is not a dead server; a refused connection or llama-
            # server saying it is loading is a fact, and a backend not ready stays not ready.
            known = refused or unavailable.health is Health.LOADING
            if (
                known
                or backend.health is not Health.READY
                or (backend.failed_polls >= self._unhealthy_after)
            ):
                self._set_health(backend, unavailable.health, unavailable.reason)
            else:
                backend.last_error = (
                    f"{unavailable.reason} (poll {backend.failed_polls} of "
                    f"{self._unhealthy_after} before it counts as {unavailable.health.value})"
                )
                log.info("backend %s: %s", backend.name, backend.last_error)
        healthy = backend.health is Health.READY
        if self.ejection_policy.on_poll(backend.ejection, healthy):
            log.warning("backend %s: readmitted after an ejection", backend.name)
            self._on_change()

    async def _probe(self, backend: BackendState) -> Unavailable | None:
        """Ask, and apply what the answers say; None when the backend is ready."""
        unavailable = parse_health(*await self._get(backend, "/health"))
        if unavailable is not None:
            return unavailable
        models = parse_models(*await self._get(backend, "/v1/models"))
        if isinstance(models, Unavailable):
            return models
        backend.model_entries = models.entries
        backend.model_ids = models.ids
        backend.model_names = models.names
        served = router_models(models)
        if served is not None:
            await self._probe_router(backend, served)
            return None
        backend.router = None
        freed = backend.slots.freed
        slots = await self._read_slots(backend)
        if isinstance(slots, Unavailable):
            return slots
        if slots is not None:
            backend.n_ctx = slots.n_ctx if slots.n_ctx is not None else backend.n_ctx
            if backend.slots.observe(slots.total, slots.busy, freed_when_asked=freed):
                self._on_change()
        return None

    async def _probe_router(self, backend: BackendState, served: tuple[RouterModel, ...]) -> None:
        """A router-mode server: it takes no request itself (no slots of its own); each loaded
        model is an instance with its slots (`/slots?model=`, never autoloading a model)."""
        state = backend.router = backend.router or RouterState()
        state.models = {m.id: m for m in served}
        state.models_polled_at = backend.poll_started_at
        state.max_loaded = parse_router_props(*await self._get(backend, "/props"))
        backend.slots.observe(total=0, busy_on_backend=0)
        backend.n_ctx = None
        entries = {str(e.get("id")): e for e in backend.model_entries}
        for model in served:
            instance = state.instances.get(model.id)
            if model.loaded:
                if instance is None:
                    instance = state.instances[model.id] = self._instance(backend, model)
                instance.model_entries = (entries.get(model.id, {"id": model.id}),)
                query = f"model={quote(model.id, safe='')}&autoload=false"
                freed = instance.slots.freed
                slots = parse_slots(*await self._get(backend, f"/slots?{query}"))
                if slots is None:  # --no-slots, or it unloaded since /v1/models
                    props = parse_props(*await self._get(backend, f"/props?{query}"))
                    if isinstance(props, Unavailable):
                        self._set_health(instance, Health.LOADING, f"model {model.status}")
                        continue
                    slots = props
                instance.n_ctx = slots.n_ctx if slots.n_ctx is not None else instance.n_ctx
                if instance.slots.observe(slots.total, slots.busy, freed_when_asked=freed):
                    self._on_change()
                self._set_health(instance, Health.READY, None)
            elif instance is not None:
                health = Health.LOADING if model.status == "loading" else Health.DEAD
                self._set_health(instance, health, f"model {model.status}")
        for name, instance in list(state.instances.items()):
            gone = name not in state.models or not state.models[name].loaded
            if gone and instance.slots.in_flight == 0:
                del state.instances[name]
        # A model loaded, unloaded or failed, or this poll is the first to answer since a load
        # was asked (and so may settle it, though it says what the one before said): queued
        # requests look again. A wake-up with nothing queued costs nothing.
        self._on_change()

    def _instance(self, router: BackendState, model: RouterModel) -> BackendState:
        config = router.config.model_copy(update={"name": f"{router.name}/{model.id}"})
        instance = BackendState(
            config=config,
            slots=SlotTracker(config.name, on_release=self._on_change),
            ssl=router.ssl,
            parent=router,
            model_ids=(model.id,),
            model_names=model.names,
        )
        log.warning("backend %s: model %s loaded", router.name, model.id)
        return instance

    async def _read_slots(self, backend: BackendState) -> Slots | Unavailable | None:
        try:
            status, body = await self._get(backend, "/slots")
        except _PollFailed:
            # llama-server answers /slots from its main loop, which a long batch can delay.
            # Healthy otherwise, the backend keeps its last known slot count and foreign
            # traffic: stale data never turns into spare capacity.
            if backend.slots.total > 0:
                return None
            raise
        slots = parse_slots(status, body)
        if slots is None:
            # --no-slots: the count comes from /props and we rely on our own accounting; a
            # server with neither (a swapper) takes the configured number.
            props = parse_props(*await self._get(backend, "/props"))
            if isinstance(props, Unavailable) and backend.config.slots is not None:
                return Slots(total=backend.config.slots, busy=0)
            return props
        return slots

    async def _get(self, backend: BackendState, path: str) -> tuple[int, bytes]:
        transport = self._transport
        assert transport is not None, "Registry.start() was not called"
        headers = {}
        if backend.config.api_key:
            headers["Authorization"] = f"Bearer {backend.config.api_key}"
        request = asyncio.ensure_future(
            transport.fetch(backend.name, backend.url + path, headers, tls=backend.ssl)
        )
        started = time.monotonic()
        try:
            while True:
                # The timeout counts the backend's time, not ours: time our own loop spent
                # stalled (a loaded machine, a burst of work) is added back before we give up.
                stalled = self._lag.stalled_s(started) if self._lag is not None else 0.0
                left = started + self._poll_timeout_s + stalled - time.monotonic()
                if left <= 0:
                    raise _PollFailed(f"GET {path} timed out")
                done, _ = await asyncio.wait({request}, timeout=left)
                if done:
                    return request.result()
        except UpstreamError as exc:
            raise _PollFailed(f"GET {path}: {reason(exc)}", refused=exc.unreachable) from None
        finally:
            request.cancel()

    def _set_health(self, backend: BackendState, health: Health, reason: str | None) -> None:
        backend.last_error = reason
        if backend.health is health:
            return
        previous, backend.health = backend.health, health
        backend.changed_at = time.monotonic()
        log.warning(
            "backend %s: %s -> %s%s",
            backend.name,
            previous.value,
            health.value,
            f" ({reason})" if reason else "",
        )
        self._on_change()
