"""The fleet's models, computed from the backends' states: which names exist, who serves what.

llama-server ignores a request's `model` field, so a fleet where every backend serves one and
the same model accepts any name; a mixed fleet routes each name to the backends that list it
(as an id or an alias) in `/v1/models`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from .probe import Health

if TYPE_CHECKING:
    from .registry import BackendState


def single_model(backends: Iterable[BackendState]) -> bool:
    """True when every backend we know serves one and the same model."""
    known = {b.model_ids for b in backends if b.model_ids}
    return len(known) <= 1


def knows_model(backends: Iterable[BackendState], model: str) -> bool:
    return any(model in b.model_names for b in backends)


def serves(backends: Iterable[BackendState], backend: BackendState, model: str | None) -> bool:
    """Whether `backend` may take a request for `model` (None: any model will do)."""
    if model is None or single_model(backends):
        return True
    return model in backend.model_names


def model_list(backends: Iterable[BackendState]) -> list[dict[str, Any]]:
    """The union of the ready backends' models, in OpenAI's `/v1/models` format."""
    merged: dict[str, dict[str, Any]] = {}
    for backend in backends:
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
