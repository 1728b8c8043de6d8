"""The fleet: each backend's live state, kept current by polling it.

Every backend has its own poll task, so a slow or hung backend never delays what we learn
about the others. A poll reads `/health`, then `/v1/models` and `/slots` (or `/props` for the
slot count where llama-server runs with `--no-slots`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import aiohttp

from .config import BackendConfig
from .ejection import EjectionPolicy, EjectionState
from .slot_ledger import SlotLedger, SlotTracker

log = logging.getLogger("llamacpp_ha.registry")


class Health(StrEnum):
    READY = "ready"
    LOADING = "loading"
    DEAD = "dead"


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
    ejection: EjectionState = field(default_factory=EjectionState)
    draining: bool = False
    last_error: str | None = None
    last_poll_at: float | None = None
    ssl: ssl.SSLContext | bool = True
    changed_at: float = field(default_factory=time.monotonic)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def url(self) -> str:
        return self.config.url

    @property
    def routable(self) -> bool:
        return (
            self.health is Health.READY
            and not self.ejection.ejected
            and not self.draining
            and self.slots.total > 0
        )

    @property
    def state(self) -> str:
        """ready, loading, dead, ejected or draining: what an operator needs to know."""
        if self.draining:
            return "draining"
        if self.ejection.ejected and self.health is Health.READY:
            return "ejected"
        return self.health.value


class _PollFailed(Exception):
    def __init__(self, health: Health, reason: str) -> None:
        super().__init__(reason)
        self.health = health
        self.reason = reason


class Registry:
    """Owns the backends' states and the tasks that poll them."""

    def __init__(
        self,
        configs: Iterable[BackendConfig],
        poll_interval_s: float,
        on_change: Callable[[], None],
        session: aiohttp.ClientSession | None = None,
        ejection: EjectionPolicy | None = None,
    ) -> None:
        self._session = session
        self.set_poll_interval(poll_interval_s)
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

    def set_poll_interval(self, poll_interval_s: float) -> None:
        self._poll_interval_s = poll_interval_s
        # A poll must end before the next one is due, so a hung backend is seen within one
        # interval; a floor keeps a busy-but-healthy llama-server from looking dead.
        self._poll_timeout = aiohttp.ClientTimeout(total=max(poll_interval_s, 1.0))

    @property
    def backends(self) -> list[BackendState]:
        return list(self._backends.values())

    def get(self, name: str) -> BackendState:
        return self._backends[name]

    def start(self, session: aiohttp.ClientSession) -> None:
        self._session = session
        for backend in self._backends.values():
            self._start_polling(backend)

    async def aclose(self) -> None:
        tasks = list(self._tasks.values())
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
        if self._session is not None:
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

    def rename(self, name: str, new_name: str) -> str:
        """Give a backend another name (to retire it while a new one takes its name)."""
        while new_name in self._backends:
            new_name += "~"
        backend = self._backends.pop(name)
        backend.config = backend.config.model_copy(update={"name": new_name})
        self._backends[new_name] = backend
        task = self._tasks.pop(name, None)
        if task is not None:
            self._tasks[new_name] = task
        return new_name

    def _start_polling(self, backend: BackendState) -> None:
        self._tasks[backend.name] = asyncio.get_running_loop().create_task(
            self._poll_loop(backend), name=f"poll {backend.name}"
        )

    # Model names -------------------------------------------------------------------------

    def single_model(self) -> bool:
        """True when every backend we know serves one and the same model.

        llama-server ignores the `model` field, so such a fleet accepts any name.
        """
        known = {b.model_ids for b in self._backends.values() if b.model_ids}
        return len(known) <= 1

    def knows_model(self, model: str) -> bool:
        return any(model in b.model_names for b in self._backends.values())

    def serves(self, backend: BackendState, model: str | None) -> bool:
        if model is None or self.single_model():
            return True
        return model in backend.model_names

    def model_list(self) -> list[dict[str, Any]]:
        """The union of the ready backends' models, in OpenAI's `/v1/models` format."""
        merged: dict[str, dict[str, Any]] = {}
        for backend in self._backends.values():
            if backend.health is not Health.READY:
                continue
            for entry in backend.model_entries:
                model_id = str(entry.get("id"))
                if model_id not in merged:
                    merged[model_id] = dict(entry)
                    continue
                aliases = list(merged[model_id].get("aliases") or [])
                for alias in entry.get("aliases") or []:
                    if alias not in aliases:
                        aliases.append(alias)
                merged[model_id]["aliases"] = aliases
        return list(merged.values())

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
        while True:
            started = time.monotonic()
            await self.poll(backend)
            elapsed = time.monotonic() - started
            await asyncio.sleep(max(0.0, self._poll_interval_s - elapsed))

    async def poll(self, backend: BackendState) -> None:
        try:
            await self._check_health(backend)
            await self._read_models(backend)
            await self._read_slots(backend)
        except _PollFailed as failure:
            self._set_health(backend, failure.health, failure.reason)
        else:
            self._set_health(backend, Health.READY, None)
        finally:
            backend.last_poll_at = time.monotonic()
        healthy = backend.health is Health.READY
        if self.ejection_policy.on_poll(backend.ejection, healthy):
            log.warning("backend %s: readmitted after an ejection", backend.name)
            self._on_change()

    async def _get(self, backend: BackendState, path: str) -> tuple[int, Any]:
        assert self._session is not None, "Registry.start() was not called"
        headers = {}
        if backend.config.api_key:
            headers["Authorization"] = f"Bearer {backend.config.api_key}"
        try:
            async with self._session.get(
                backend.url + path, headers=headers, timeout=self._poll_timeout, ssl=backend.ssl
            ) as resp:
                try:
                    body = await resp.json(content_type=None)
                except ValueError:
                    body = None
                return resp.status, body
        except TimeoutError:
            raise _PollFailed(Health.DEAD, f"GET {path} timed out") from None
        except aiohttp.ClientError as exc:
            raise _PollFailed(Health.DEAD, f"GET {path}: {_describe(exc)}") from None

    async def _check_health(self, backend: BackendState) -> None:
        status, body = await self._get(backend, "/health")
        if status == 200:
            return
        message = _error_message(body)
        if status == 503 and message == "Loading model":
            raise _PollFailed(Health.LOADING, "loading model")
        raise _PollFailed(Health.DEAD, f"/health answered {status} {message}".strip())

    async def _read_models(self, backend: BackendState) -> None:
        status, body = await self._get(backend, "/v1/models")
        if status != 200 or not isinstance(body, dict) or not isinstance(body.get("data"), list):
            raise _PollFailed(Health.DEAD, f"/v1/models answered {status}")
        entries = tuple(e for e in body["data"] if isinstance(e, dict) and "id" in e)
        names = set()
        for entry in entries:
            names.add(str(entry["id"]))
            names.update(str(a) for a in entry.get("aliases") or [])
        backend.model_entries = entries
        backend.model_ids = tuple(sorted(str(e["id"]) for e in entries))
        backend.model_names = frozenset(names)

    async def _read_slots(self, backend: BackendState) -> None:
        try:
            status, body = await self._get(backend, "/slots")
        except _PollFailed:
            # llama-server answers /slots from its main loop, which a long batch can delay.
            # Healthy otherwise, the backend keeps its last known slot count and foreign
            # traffic: stale data never turns into spare capacity.
            if backend.slots.total > 0:
                return
            raise
        if status == 200 and isinstance(body, list):
            busy = sum(1 for s in body if isinstance(s, dict) and s.get("is_processing"))
            changed = backend.slots.observe(total=len(body), busy_on_backend=busy)
        else:
            # --no-slots: the count comes from /props and we rely on our own accounting.
            status, props = await self._get(backend, "/props")
            total = props.get("total_slots") if isinstance(props, dict) else None
            if status != 200 or not isinstance(total, int):
                raise _PollFailed(Health.DEAD, "neither /slots nor /props gave a slot count")
            changed = backend.slots.observe(total=total, busy_on_backend=0)
        if changed:
            self._on_change()

    def _set_health(self, backend: BackendState, health: Health, reason: str | None) -> None:
        backend.last_error = reason
        if backend.health is health:
            return
        previous, backend.health = backend.health, health
        backend.changed_at = time.monotonic()
        level = logging.INFO if health is Health.READY else logging.WARNING
        log.log(
            level,
            "backend %s: %s -> %s%s",
            backend.name,
            previous.value,
            health.value,
            f" ({reason})" if reason else "",
        )
        self._on_change()


def _error_message(body: Any) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message", ""))
    return ""


def _describe(exc: aiohttp.ClientError) -> str:
    """In words, for operators: aiohttp's class names stay inside this module."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError):
        return "TLS handshake failed"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "connection refused"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "connection closed without an answer"
    if isinstance(exc, aiohttp.ClientResponseError):
        return "invalid HTTP response"
    if isinstance(exc, aiohttp.ClientOSError):
        return "connection reset"
    return "request failed"
