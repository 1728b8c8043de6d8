"""The fleet's models, computed from the backends' states: which names exist, who serves what.

llama-server ignores a request's `model` field, so a fleet where every backend serves one and
the same model accepts any name; a mixed fleet routes each name to the backends that list it
(as an id or an alias) in `/v1/models`. A router-mode llama-server lists every model it can
load; each one loaded is a model instance of its own (`registry.py`), which serves that model.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from .probe import Health, client_entry

if TYPE_CHECKING:
    from .registry import BackendState


def single_model(backends: Iterable[BackendState]) -> bool:
    """True when every backend we know serves one and the same model (never with a
    router-mode server: it needs the request's `model` to route it)."""
    known = set()
    for backend in backends:
        if backend.router is not None:
            return False
        if backend.model_ids:
            known.add(backend.model_ids)
    return len(known) <= 1


def knows_model(backends: Iterable[BackendState], model: str) -> bool:
    return any(model in b.model_names for b in backends)


def serving(backends: Sequence[BackendState], model: str | None) -> list[BackendState]:
    """The backends that may take a request for `model` (None: any model will do): the fleet
    is looked at once, not once per backend (a drain asks this for every request)."""
    if model is None or single_model(backends):
        return list(backends)
    return [b for b in backends if model in b.model_names]


def model_list(backends: Iterable[BackendState]) -> list[dict[str, Any]]:
    """The union of the ready backends' models, in OpenAI's `/v1/models` format, each with
    `loaded_on`: the backends where it is loaded now (a router-mode server lists models it
    can load on demand; they have a `status` and may be loaded nowhere)."""
    merged: dict[str, dict[str, Any]] = {}
    for backend in backends:
        if backend.health is not Health.READY or backend.parent is not None:
            continue  # a model instance is listed by its router
        router = backend.router
        for raw in backend.model_entries:
            entry = client_entry(raw)
            model_id = str(entry.get("id"))
            here = router is None or (model_id in router.models and router.models[model_id].loaded)
            if model_id not in merged:
                merged[model_id] = {**entry, "loaded_on": [backend.name] if here else []}
                continue
            if here:
                merged[model_id]["loaded_on"].append(backend.name)
            aliases = list(merged[model_id].get("aliases") or [])
            for alias in entry.get("aliases") or []:
                if alias not in aliases:
                    aliases.append(alias)
            merged[model_id]["aliases"] = aliases
    return list(merged.values())
