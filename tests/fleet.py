"""Test helpers that build real components in a known state, without polling."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypedDict, Unpack

from llamacpp_ha.config import BackendConfig
from llamacpp_ha.policies import RoutingRequest
from llamacpp_ha.queue import QueueEntry
from llamacpp_ha.registry import BackendState, Health, Registry


def make_registry(
    *specs: tuple[str, int, tuple[str, ...]], on_change: Callable[[], None] = lambda: None
) -> Registry:
    """A registry whose backends (name, slots, model ids) are ready, as after a good poll."""
    registry = Registry(
        [BackendConfig(url=f"http://{name}.invalid:8080", name=name) for name, _, _ in specs],
        poll_interval_s=1.0,
        on_change=on_change,
    )
    for name, slots, models in specs:
        set_ready(registry.get(name), slots, models)
    return registry


def set_ready(backend: BackendState, slots: int, models: tuple[str, ...] = ("m",)) -> None:
    backend.health = Health.READY
    backend.model_ids = tuple(sorted(models))
    backend.model_names = frozenset(models)
    backend.model_entries = tuple({"id": m, "aliases": [m]} for m in models)
    backend.slots.observe(total=slots, busy_on_backend=0)


class _EntryFields(TypedDict, total=False):
    priority: int
    enqueued_at: float


def _entry(routing: RoutingRequest | None = None, **fields: Unpack[_EntryFields]) -> QueueEntry:
    if routing is None:
        routing = RoutingRequest(model=None)
    entry = QueueEntry(routing=routing, **fields)
    entry.future = asyncio.get_running_loop().create_future()
    return entry
