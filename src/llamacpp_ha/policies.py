"""Routing policies: given the backends that may take a request, pick one.

A policy is synchronous and pure with respect to the fleet: it sees frozen snapshots
(`BackendCandidate`) and a small `RoutingRequest`, never awaits and never changes a backend.

- `RoundRobinPolicy`: per model, the next backend in name order after the last one picked,
  skipping backends with no free slot. Spreads load evenly; ignores caches.
- `LeastBusyPolicy`: the backend with the smallest share of its slots busy (ties in name order
  after the last pick). Suits fleets of unequal size and keeps every backend's batch small, which
  is when llama-server decodes fastest.
- `AffinityPolicy`: the backend that last computed the longest known prefix of this prompt
  (resolved by the scheduler from the session store), if it has a free slot and is not much
  busier than the least busy candidate (its share of busy slots at most `max_imbalance` above
  theirs); otherwise the fallback policy. A follow-up turn then lands where its prompt is
  cached, and a new conversation where its system prompt is, unless that would pile work on one
  backend while others idle.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol


@dataclass(frozen=True)
class BackendCandidate:
    """A backend that serves the request's model and is ready, as seen at one instant."""

    name: str
    free_slots: int
    total_slots: int


@dataclass(frozen=True)
class RoutingRequest:
    """What routing may know of a request."""

    model: str | None
    prefix_keys: tuple[str, ...] = ()
    preferred_backend: str | None = None
    exclude: frozenset[str] = frozenset()

    def excluding(self, backend: str) -> RoutingRequest:
        return replace(self, exclude=self.exclude | {backend})


class Policy(Protocol):
    def select(self, candidates: Sequence[BackendCandidate], request: RoutingRequest) -> str | None:
        """The name of a candidate with a free slot, or None to leave the request queued."""
        ...


class RoundRobinPolicy:
    def __init__(self) -> None:
        self._last: dict[str | None, str] = {}

    def select(self, candidates: Sequence[BackendCandidate], request: RoutingRequest) -> str | None:
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

    def select(self, candidates: Sequence[BackendCandidate], request: RoutingRequest) -> str | None:
        free = [c for c in candidates if c.free_slots > 0]
        if not free:
            return None
        least = min(_busy_share(c) for c in free)
        return self._rotation.select([c for c in free if _busy_share(c) == least], request)


def _busy_share(candidate: BackendCandidate) -> float:
    return 1 - candidate.free_slots / candidate.total_slots if candidate.total_slots else 1.0


class AffinityPolicy:
    def __init__(self, fallback: Policy, max_imbalance: float = 0.5) -> None:
        self._fallback = fallback
        self._max_imbalance = max_imbalance

    def select(self, candidates: Sequence[BackendCandidate], request: RoutingRequest) -> str | None:
        free = [c for c in candidates if c.free_slots > 0]
        preferred = next((c for c in free if c.name == request.preferred_backend), None)
        if preferred is not None:
            least = min(_busy_share(c) for c in free)
            if _busy_share(preferred) - least <= self._max_imbalance:
                return preferred.name
        return self._fallback.select(candidates, request)


def build_policy(name: str) -> Policy:
    if name == "round-robin":
        return RoundRobinPolicy()
    if name == "least-busy":
        return LeastBusyPolicy()
    if name == "affinity":
        return AffinityPolicy(fallback=RoundRobinPolicy())
    if name == "affinity-least-busy":
        return AffinityPolicy(fallback=LeastBusyPolicy())
    raise ValueError(f"unknown routing policy {name!r}")
