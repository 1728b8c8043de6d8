"""Models loaded on demand: which router-mode backend loads a model that is loaded nowhere.

A request for a model that no ready backend has loaded, but that some router-mode
llama-server lists, waits in the queue (its queue timeout counts) while one server loads it:

- **one** server, however many requests want the model: the first asks, the others wait for
  the same load;
- the one where loading costs least: a server with room under its `--models-max` first (the
  fewest models loaded), else one whose least recently used model is idle (no request of ours
  in flight), evicting the least recently used of those; llama-server itself evicts only idle
  models, so where every model is busy the load waits for one to finish;
- it is asked with `POST /models/load`; the server's next poll shows the model loaded, its
  instance becomes a backend, and the queued requests go there.

A load that fails (the server says so in `/models`: `failed`, with the exit code) fails the
requests waiting for it with `503` and the reason, and is remembered for a while, so that
requests do not retry a broken model in a loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson

from .errors import UpstreamError
from .probe import Health
from .registry import BackendState, Registry
from .transport import Transport, reason

log = logging.getLogger("llamacpp_ha.model_loads")

# A failed load is reported to requests for this long before the model is tried again.
FAILURE_MEMORY_S = 30.0
# A server at its --models-max with every model busy is asked again after this long.
RETRY_S = 0.5
# A load the server never reports done (it hung) is asked again after this long.
LOAD_TIMEOUT_S = 600.0


@dataclass
class _Load:
    backend: str
    # The model instance expected to make room (no new request goes there meanwhile, or the
    # server would evict a model we are sending requests to).
    victim: BackendState | None = None
    started_at: float = field(default_factory=time.monotonic)
    # When the server answered our POST /models/load: only a poll begun after it tells
    # whether the load failed (a model that failed before still says so until then).
    asked_at: float | None = None


@dataclass
class LoadCounts:
    """Per (model, backend): loads asked, done, failed, and the time the done ones took."""

    started: dict[tuple[str, str], int] = field(default_factory=dict)
    done: dict[tuple[str, str], int] = field(default_factory=dict)
    failed: dict[tuple[str, str], int] = field(default_factory=dict)
    seconds: dict[tuple[str, str], float] = field(default_factory=dict)


class ModelLoads:
    def __init__(
        self,
        registry: Registry,
        transport: Callable[[], Transport],
        on_change: Callable[[], None],
    ) -> None:
        self._registry = registry
        self._transport = transport
        self._on_change = on_change
        self._loading: dict[str, _Load] = {}
        self._failed: dict[str, tuple[str, float]] = {}  # model -> (reason, when)
        self._retry_at: dict[str, float] = {}  # a server said "not now": when to ask again
        self._wanted: set[str | None] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.counts = LoadCounts()

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def loading(self) -> dict[str, str]:
        """Model -> the backend loading it now."""
        return {model: load.backend for model, load in self._loading.items()}

    def loadable(self, model: str | None) -> bool:
        """Some ready router-mode backend can serve `model`, loaded there or not."""
        return model is not None and bool(self._routers_for(model))

    def waiting_for(self, model: str) -> str | None:
        """None while a request for `model` should wait for its load; the reason it cannot."""
        self._settle(model)
        failed = self._failed.get(model)
        if failed is not None:
            if time.monotonic() - failed[1] < FAILURE_MEMORY_S:
                return failed[0]
            del self._failed[model]
        if model not in self._loading and time.monotonic() >= self._retry_at.get(model, 0.0):
            self._start(model)
        return None

    def _routers_for(self, model: str) -> list[BackendState]:
        found = []
        for backend in self._registry.routers:
            router = backend.router
            if router is None or backend.health is not Health.READY or backend.draining:
                continue
            if any(model in m.names for m in router.models.values()):
                found.append(backend)
        return found

    def settle(self, wanted: set[str | None]) -> None:
        """Every load under way that the last poll says has ended (each drain asks), and the
        models queued requests want: those are not idle, whatever is in flight."""
        self._wanted = wanted
        for model in list(self._loading):
            self._settle(model)

    def _settle(self, model: str) -> None:
        """A load under way that the last poll says has ended, loaded or failed."""
        load = self._loading.get(model)
        if load is None:
            return
        backend = next((b for b in self._registry.routers if b.name == load.backend), None)
        router = backend.router if backend is not None else None
        entry = (
            next((m for m in router.models.values() if model in m.names), None)
            if router is not None
            else None
        )
        key = (model, load.backend)
        took_s = time.monotonic() - load.started_at
        if entry is not None and entry.loaded:
            self._end(model)
            self.counts.done[key] = self.counts.done.get(key, 0) + 1
            self.counts.seconds[key] = self.counts.seconds.get(key, 0.0) + took_s
            log.warning("model %s: loaded on %s in %.1f s", model, load.backend, took_s)
        elif entry is None:
            self._fail(model, load, f"model {model!r} is no longer listed by {load.backend}")
        elif (
            load.asked_at is not None
            and router is not None
            and router.models_polled_at > load.asked_at
            and entry.status == "unloaded"
        ):
            # The server has answered, and a poll that started since has answered too: loading
            # would say so. (Not the poll under way: until it answers, what is known is from
            # the poll before, which may have asked before the load.)
            if entry.failed:
                code = f" (exit code {entry.exit_code})" if entry.exit_code is not None else ""
                self._fail(model, load, f"model {model!r} failed to load on {load.backend}{code}")
            else:
                # It took the request and did not load (its --models-max was reached in
                # between): ask again a little later.
                self._not_now(model, load.backend)
        elif took_s > LOAD_TIMEOUT_S:
            self._fail(model, load, f"model {model!r} did not load on {load.backend} in time")

    def _not_now(self, model: str, backend: str) -> None:
        log.info("model %s: %s has no idle model to give up yet", model, backend)
        self._end(model)
        self._retry_at[model] = time.monotonic() + RETRY_S
        asyncio.get_running_loop().call_later(RETRY_S, self._on_change)

    def _end(self, model: str) -> None:
        load = self._loading.pop(model, None)
        if load is not None and load.victim is not None:
            load.victim.evicting = False  # unloaded now, or it stays: either way, usable
            self._on_change()

    def _fail(self, model: str, load: _Load, why: str) -> None:
        self._end(model)
        key = (model, load.backend)
        self.counts.failed[key] = self.counts.failed.get(key, 0) + 1
        self._failed[model] = (why, time.monotonic())
        log.error("%s", why)
        self._on_change()

    def _start(self, model: str) -> None:
        chosen = self._choose(model)
        if chosen is None:
            return  # every server that has it is full of busy models: the next drain looks again
        backend, victim = chosen
        assert backend.router is not None
        entry = next(m for m in backend.router.models.values() if model in m.names)
        if entry.loaded:
            return  # its instance is ready at the end of this poll
        load = self._loading[model] = _Load(backend.name, victim)
        if victim is not None:
            victim.evicting = True
        if entry.status == "loading":
            load.asked_at = time.monotonic()  # loading already (another replica, a client)
            return
        key = (model, backend.name)
        self.counts.started[key] = self.counts.started.get(key, 0) + 1
        log.warning("model %s: loading it on %s", model, backend.name)
        task = asyncio.get_running_loop().create_task(self._ask(backend, model, entry.id, load))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _choose(self, model: str) -> tuple[BackendState, BackendState | None] | None:
        """Where loading `model` costs least, and the instance it evicts: where it is loaded or
        loading already; else room under --models-max (fewest loaded); else the idle least
        recently used model, the longest unused first."""
        routers = self._routers_for(model)
        best: tuple[float, BackendState, BackendState | None] | None = None
        for backend in routers:
            router = backend.router
            assert router is not None
            entry = next(m for m in router.models.values() if model in m.names)
            if entry.loaded or entry.status == "loading":
                return backend, None
            victim = None
            # Our own loads under way there hold a place before any poll shows them.
            pending = sum(1 for load in self._loading.values() if load.backend == backend.name)
            taken = len(router.loaded()) + pending
            if not router.max_loaded or taken < router.max_loaded:
                score = -1e12 + taken
            else:
                idle = [
                    instance
                    for name, instance in router.instances.items()
                    if instance.slots.in_flight == 0
                    and not instance.evicting
                    and name not in self._loading
                    and instance.model_names.isdisjoint(self._wanted)
                    and router.models.get(name) is not None
                    and router.models[name].loaded
                ]
                if not idle:
                    continue
                victim = min(idle, key=lambda i: i.last_used_at)
                score = victim.last_used_at  # the longer unused, the better
            if best is None or score < best[0]:
                best = (score, backend, victim)
        return (best[1], best[2]) if best is not None else None

    async def _ask(self, backend: BackendState, model: str, model_id: str, load: _Load) -> None:
        headers = {}
        if backend.config.api_key:
            headers["Authorization"] = f"Bearer {backend.config.api_key}"
        try:
            status, body = await self._transport().fetch(
                backend.name,
                backend.url + "/models/load",
                headers,
                tls=backend.ssl,
                json_body=orjson.dumps({"model": model_id}),
            )
        except UpstreamError as exc:
            self._fail(model, load, f"model {model_id!r}: {backend.name} {reason(exc)}")
            return
        load.asked_at = time.monotonic()
        # "model is already running" (400) is a load someone else asked for: as good.
        if status == 200 or b"already running" in body:
            return
        if b"limit reached" in body:
            # At --models-max with no idle model to give up (by its own count): not a failure;
            # the requests wait on, and the load is asked again a little later.
            self._not_now(model, backend.name)
            return
        message = body[:200].decode("utf-8", "replace")
        self._fail(
            model,
            load,
            f"model {model_id!r}: {backend.name} refused to load it ({status} {message})",
        )
