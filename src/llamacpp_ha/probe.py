"""What a llama-server's answers to a poll say: pure functions of (status, body), no I/O.

A poll asks `/health`, then `/v1/models`, then `/slots` (or `/props` for the slot count where
llama-server runs with `--no-slots`). Each answer is read here into a small result of ours;
the registry does the asking and applies the results. An answer of any shape, however
hostile, gives a result or `Unavailable`, never an exception: a backend must not be able to
break its own poll.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson

# A backend's error message goes into logs and `/admin/backends`: enough to say what happened.
_MAX_MESSAGE = 200


class Health(StrEnum):
    READY = "ready"
    LOADING = "loading"
    DEAD = "dead"


@dataclass(frozen=True)
class Unavailable:
    """The backend cannot take requests (it is loading or dead), and why, for operators."""

    health: Health
    reason: str


@dataclass(frozen=True)
class Models:
    """What `/v1/models` lists: its entries as clients get them, their ids, ids and aliases."""

    entries: tuple[dict[str, Any], ...]
    ids: tuple[str, ...]
    names: frozenset[str]


@dataclass(frozen=True)
class RouterModel:
    """One model a router-mode llama-server can serve, and where it stands (`status.value`:
    loaded, loading, unloaded, sleeping, downloading; `failed` after a load that failed)."""

    id: str
    names: frozenset[str]
    status: str
    failed: bool = False
    exit_code: int | None = None

    @property
    def loaded(self) -> bool:
        # Sleeping: loaded, its weights put away; a request wakes it.
        return self.status in ("loaded", "sleeping")


@dataclass(frozen=True)
class Slots:
    """A backend's slot count, and how many of them it says are busy."""

    total: int
    busy: int
    n_ctx: int | None = None  # the smallest slot's context size, when /slots says it


def parse_health(status: int, body: bytes) -> Unavailable | None:
    """None when `/health` says the backend is up."""
    if status == 200:
        return None
    message = _error_message(_json(body))
    if status == 503 and message == "Loading model":
        return Unavailable(Health.LOADING, "loading model")
    return Unavailable(Health.DEAD, f"/health answered {status} {message}".strip())


def parse_models(status: int, body: bytes) -> Models | Unavailable:
    data = _json(body)
    if status != 200 or not isinstance(data, dict) or not isinstance(data.get("data"), list):
        return Unavailable(Health.DEAD, f"/v1/models answered {status}")
    entries = []
    names: set[str] = set()
    for entry in data["data"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            continue
        if "aliases" in entry:
            # The entries reach clients as they are (`GET /v1/models`): aliases are strings.
            aliases = entry["aliases"]
            kept = [a for a in aliases if isinstance(a, str)] if isinstance(aliases, list) else []
            if kept != aliases:
                entry = {**entry, "aliases": kept}
            names.update(kept)
        names.add(entry["id"])
        entries.append(entry)
    return Models(
        entries=tuple(entries),
        ids=tuple(sorted(e["id"] for e in entries)),
        names=frozenset(names),
    )


def router_models(models: Models) -> tuple[RouterModel, ...] | None:
    """The models of a router-mode llama-server (started with `--models-dir` or a preset and
    no model: each `/v1/models` entry has a `status`), or None for a single-model server."""
    found = []
    for entry in models.entries:
        status = entry.get("status")
        if not isinstance(status, dict) or not isinstance(status.get("value"), str):
            continue
        aliases = entry.get("aliases") or []
        exit_code = status.get("exit_code")
        found.append(
            RouterModel(
                id=entry["id"],
                names=frozenset([entry["id"], *aliases]),
                status=status["value"][:_MAX_MESSAGE],
                failed=status.get("failed") is True,
                exit_code=exit_code if type(exit_code) is int else None,
            )
        )
    return tuple(found) if found else None


def client_entry(entry: dict[str, Any]) -> dict[str, Any]:
    """A `/v1/models` entry as clients get it: a router's entries carry the command line and
    preset of each model instance (local paths); only the status's value stays."""
    status = entry.get("status")
    if not isinstance(status, dict):
        return entry
    kept = {k: v for k, v in status.items() if k in ("value", "failed", "exit_code")}
    return {**{k: v for k, v in entry.items() if k != "status"}, "status": kept}


def parse_router_props(status: int, body: bytes) -> int | None:
    """How many models a router-mode server keeps loaded at once (`--models-max`; 0: no
    limit), from its own `/props`; None when it does not say."""
    data = _json(body)
    if status != 200 or not isinstance(data, dict) or data.get("role") != "router":
        return None
    value = data.get("max_instances")
    return value if type(value) is int and value >= 0 else None


def parse_slots(status: int, body: bytes) -> Slots | None:
    """None when the answer lists no slots (llama-server with `--no-slots`): ask `/props`."""
    data = _json(body)
    if status != 200 or not isinstance(data, list):
        return None
    sizes = [
        slot["n_ctx"]
        for slot in data
        if isinstance(slot, dict) and type(slot.get("n_ctx")) is int and slot["n_ctx"] > 0
    ]
    busy = sum(1 for slot in data if _busy(slot))
    return Slots(total=len(data), busy=busy, n_ctx=min(sizes) if sizes else None)


def parse_props(status: int, body: bytes) -> Slots | Unavailable:
    """The slot count from `/props` `total_slots`; none of them is known to be busy."""
    data = _json(body)
    total = data.get("total_slots") if isinstance(data, dict) else None
    # bool is an int to Python, and `true` slots is no count.
    if status != 200 or not isinstance(total, int) or isinstance(total, bool) or total < 0:
        return Unavailable(Health.DEAD, "neither /slots nor /props gave a slot count")
    return Slots(total=total, busy=0)


def _busy(slot: Any) -> bool:
    # A slot we cannot read counts as busy: what we do not understand never turns into spare
    # capacity. A slot without `is_processing` at all is idle, as it always was here.
    if not isinstance(slot, dict):
        return True
    processing = slot.get("is_processing", False)
    return processing is not False


def _json(body: bytes) -> Any:
    try:
        # orjson: a /slots of many slots is parsed several times faster than by json.
        return orjson.loads(body)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested beyond the parser
        return None


def _error_message(body: Any) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message", ""))[:_MAX_MESSAGE]
    return ""
