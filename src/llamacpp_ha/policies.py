"""Routing policies: given the backends that may take a request, pick one.

A policy is synchronous and pure with respect to the fleet: it sees frozen snapshots
(`BackendCandidate`) and a small `RoutingRequest`, never awaits and never changes a backend.

- `RoundRobinPolicy`: per model, the next backend in name order after the last one picked,
  skipping backends with no free slot. Spreads load evenly; ignores caches.
- `LeastBusyPolicy`: the backend with the smallest share of its slots busy (ties in name order
  after the last pick). Suits fleets of unequal size and keeps every backend's batch small, which
  is when llama-server decodes fastest.
- `AffinityPolicy`: the backend that holds the longest known prefix of this prompt (the
  candidates carry what the prefix index says each one holds), if it has a free slot and is not
  much busier than the least busy candidate (its share of busy slots at most `max_imbalance`
  above theirs); otherwise the fallback policy. A follow-up turn then lands where its prompt is
  cached, and a new conversation where its system prompt is, unless that would pile work on one
  backend while others idle.

Policies register by name in `POLICIES`; the configuration's `routing` values, the CLI help and
the README's table come from it. A new policy is a function (or a class with `__call__`, when
it keeps state such as a rotation) and one entry there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol


@dataclass(frozen=True)
class BackendCandidate:
    """A backend that serves the request's model and is ready, as seen at one instant."""

    name: str
    free_slots: int
    total_slots: int
    in_flight: int = 0  # our requests on it
    in_flight_tokens: int = 0  # their estimated prompt tokens
    n_ctx: int | None = None  # context size of one slot, when the backend reports it
    # How many of the request's prefix keys the prefix index says this backend holds.
    prefix_match: int = 0


@dataclass(frozen=True)
class RoutingRequest:
    """What routing may know of a request."""

    model: str | None
    prefix_keys: tuple[str, ...] = ()
    exclude: frozenset[str] = frozenset()
    prompt_tokens: int = 0  # an estimate, from the body's size
    max_tokens: int = 0  # what it asks to generate, when it says

    def excluding(self, backend: str) -> RoutingRequest:
        return replace(self, exclude=self.exclude | {backend})


class Policy(Protocol):
    def __call__(
        self, candidates: Sequence[BackendCandidate], request: RoutingRequest
    ) -> str | None:
        """The name of a candidate with a free slot, or None to leave the request queued."""
        ...


class RoundRobinPolicy:
    def __init__(self) -> None:
        self._last: dict[str | None, str] = {}

    def __call__(
        self, candidates: Sequence[BackendCandidate], request: RoutingRequest
    ) -> str | None:
        ordered = sorted(candidates, key=lambda c: c.name)
        last = self._last.get(request.model)
        # Start just after the last pick, wrapping around; names make this stable when
        # backends come and go, unlike an index into a list that changes.
        after = [c for c in ordered if last is not None and c.name > last]
        for candidate in after + [c for c in ordered if c not in after]:
            if candidate.free_slots > 0:
                self._last[request.model] = candidate.name
                return candidate.name
        return None


class LeastBusyPolicy:
    def __init__(self) -> None:
        self._rotation = RoundRobinPolicy()

    def __call__(
        self, candidates: Sequence[BackendCandidate], request: RoutingRequest
    ) -> str | None:
        free = [c for c in candidates if c.free_slots > 0]
        if not free:
            return None
        least = min(_busy_share(c) for c in free)
        return self._rotation([c for c in free if _busy_share(c) == least], request)


def _busy_share(candidate: BackendCandidate) -> float:
    return 1 - candidate.free_slots / candidate.total_slots if candidate.total_slots else 1.0


class AffinityPolicy:
    def __init__(self, fallback: Policy, max_imbalance: float = 0.5) -> None:
        self._fallback = fallback
        self._max_imbalance = max_imbalance

    def __call__(
        self, candidates: Sequence[BackendCandidate], request: RoutingRequest
    ) -> str | None:
        holder = max(candidates, key=lambda c: c.prefix_match, default=None)
        if holder is not None and holder.prefix_match > 0 and holder.free_slots > 0:
            least = min(_busy_share(c) for c in candidates if c.free_slots > 0)
            if _busy_share(holder) - least <= self._max_imbalance:
                return holder.name
        return self._fallback(candidates, request)


@dataclass(frozen=True)
class PolicySpec:
    """A policy as the configuration names it: how to build one, and what it does."""

    build: Callable[[], Policy]
    summary: str  # for the CLI help and the README's table


POLICIES: dict[str, PolicySpec] = {
    "affinity": PolicySpec(
        lambda: AffinityPolicy(fallback=RoundRobinPolicy()),
        "a conversation's next turn goes to the backend that cached it, when it has a free "
        "slot, else round robin",
    ),
    "affinity-least-busy": PolicySpec(
        lambda: AffinityPolicy(fallback=LeastBusyPolicy()),
        "the same, else the backend with the smallest share of its slots busy",
    ),
    "round-robin": PolicySpec(RoundRobinPolicy, "each backend in turn"),
    "least-busy": PolicySpec(
        LeastBusyPolicy, "the backend with the smallest share of its slots busy"
    ),
}
DEFAULT_POLICY = "affinity"


def build_policy(name: str) -> Policy:
    try:
        return POLICIES[name].build()
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}") from None
