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
- `CostPolicy`: the backend where the request should start soonest. For each candidate,
  `start = wait + uncached prompt tokens / prefill rate * (1 + streams decoding there)`: the
  wait for a slot (0 when one is free), then the part of the prompt the backend will not reuse,
  at the rate it has been measured to prefill, a cost borne by the request and by each stream
  it stalls. A busy backend (or a busy slot computing more of the prompt) wins only when it
  holds more of the prompt than every free one, its start beats theirs, and its wait is within
  `max_cache_wait_s`; the request then stays queued for it. With fewer than 32 tokens cached
  anywhere it is least busy (share of slots busy).

Policies register by name in `POLICIES`; the configuration's `routing` values, the CLI help and
the README's table come from it. A new policy is a function (or a class with `__call__`, when
it keeps state such as a rotation) and one entry there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple, Protocol, runtime_checkable

from .prefix_index import PromptKeys


class BackendCandidate(NamedTuple):
    """A backend that serves the request's model and is ready, as seen at one instant.

    A named tuple, not a frozen dataclass: a decision builds one per backend, and a frozen
    dataclass's `__init__` (a guarded `setattr` per field) cost 1.4 µs of it against 0.26."""

    name: str
    free_slots: int
    total_slots: int
    in_flight: int = 0  # our requests on it
    in_flight_tokens: int = 0  # their estimated prompt tokens
    n_ctx: int | None = None  # context size of one slot, when the backend reports it
    # How many of the request's prefix keys the prefix index says this backend holds, and
    # what that is in tokens of this request's prompt here.
    prefix_match: int = 0
    cached_tokens: int = 0
    prompt_tokens: int = 0  # this request's prompt, in this backend's tokens
    prefill_tps: float = 1000.0  # this backend's measured prefill rate
    wait_s: float = 0.0  # until a slot frees here (0 when one is free)
    # A busy slot here that is computing (or holds) more of the prompt than a free slot would
    # reuse: what it will hold, and when it should free.
    later_cached_tokens: int = 0
    later_wait_s: float = 0.0


@dataclass(frozen=True)
class RoutingRequest:
    """What routing may know of a request."""

    model: str | None
    prompt: PromptKeys = field(default_factory=PromptKeys)
    exclude: frozenset[str] = frozenset()
    prompt_tokens: int = 0  # an estimate, from the body's size
    max_tokens: int = 0  # what it asks to generate, when it says
    waited_s: float = 0.0  # how long it has chosen to wait for a busy backend already
    pinnable: bool = False  # its endpoint honours `id_slot`
    client_slot: int | None = None  # the `id_slot` the client named itself

    @property
    def prefix_keys(self) -> tuple[str, ...]:
        return self.prompt.keys

    def excluding(self, backend: str) -> RoutingRequest:
        return replace(self, exclude=self.exclude | {backend})


class Policy(Protocol):
    def __call__(
        self, candidates: Sequence[BackendCandidate], request: RoutingRequest
    ) -> str | None:
        """The name of a candidate with a free slot, or None to leave the request queued."""
        ...


@runtime_checkable
class CostModel(Protocol):
    """A policy that can say when the request would start on each candidate, in seconds; the
    scheduler's bounded reordering compares requests by it."""

    def costs(self, candidates: Sequence[BackendCandidate], request: RoutingRequest) -> list[float]:
        """What the policy weighs: infinity where it would neither send nor wait."""
        ...

    def starts(self, candidates: Sequence[BackendCandidate]) -> list[float]:
        """The expected start on each, a busy one after its wait: what it gains where."""
        ...


class RoundRobinPolicy:
    def __init__(self) -> None:
        self._last: dict[str | None, str] = {}

    def __call__(
        self, candidates: Sequence[BackendCandidate], request: RoutingRequest
    ) -> str | None:
        if len(candidates) == 1:  # most calls, from the other policies' ties
            only = candidates[0]
            if only.free_slots <= 0:
                return None
            self._last[request.model] = only.name
            return only.name
        ordered = sorted(candidates, key=_name)
        last = self._last.get(request.model)
        # Start just after the last pick, wrapping around; names make this stable when
        # backends come and go, unlike an index into a list that changes.
        start = 0
        if last is not None:
            start = next((i for i, c in enumerate(ordered) if c.name > last), len(ordered))
        for candidate in ordered[start:] + ordered[:start]:
            if candidate.free_slots > 0:
                self._last[request.model] = candidate.name
                return candidate.name
        return None


def _name(candidate: BackendCandidate) -> str:
    return candidate.name


class LeastBusyPolicy:
    def __init__(self) -> None:
        self._rotation = RoundRobinPolicy()

    def __call__(
        self, candidates: Sequence[BackendCandidate], request: RoutingRequest
    ) -> str | None:
        shares = [(_busy_share(c), c) for c in candidates if c.free_slots > 0]
        if not shares:
            return None
        least = min(share for share, _ in shares)
        return self._rotation([c for share, c in shares if share == least], request)


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


class CostPolicy:
    """Where the request starts soonest; it may wait for a busy backend that holds its prompt."""

    def __init__(self, max_cache_wait_s: float = 0.5) -> None:
        self._max_cache_wait_s = max_cache_wait_s
        self._least_busy = LeastBusyPolicy()

    def costs(self, candidates: Sequence[BackendCandidate], request: RoutingRequest) -> list[float]:
        """Each candidate's expected start, in seconds. A busy backend counts only while the
        request may still wait, and only if it holds more of the prompt than every free one:
        waiting is for a cache, never for a shorter queue (infinity otherwise)."""
        return self._costs(candidates, request, self.starts(candidates))

    def _costs(
        self, candidates: Sequence[BackendCandidate], request: RoutingRequest, starts: list[float]
    ) -> list[float]:
        left = self._max_cache_wait_s - request.waited_s
        # Only a cache worth having is worth a wait: a few tokens of a tiny prompt (a chat
        # template's, the same short question) never are, however busy the free backend.
        free_best = _WORTH_TOKENS - 1
        for c in candidates:
            if c.free_slots > 0 and c.cached_tokens > free_best:
                free_best = c.cached_tokens
        # Loops, not min()/max() over generators: a decision runs this for every backend,
        # and the builtins' calls were most of its cost.
        costs = []
        for c, start in zip(candidates, starts, strict=True):
            if c.free_slots > 0 or (c.wait_s <= left and c.cached_tokens > free_best):
                cost = start
            else:
                cost = math.inf
            if c.later_cached_tokens > free_best and c.later_wait_s <= left:
                later = later_start_s(c)
                if later < cost:
                    cost = later
            costs.append(cost)
        return costs

    def starts(self, candidates: Sequence[BackendCandidate]) -> list[float]:
        return list(map(start_s, candidates))

    def __call__(
        self, candidates: Sequence[BackendCandidate], request: RoutingRequest
    ) -> str | None:
        starts = self.starts(candidates)  # once: the costs and the free starts share them
        costs = self._costs(candidates, request, starts)
        free = [(start, c) for start, c in zip(starts, candidates, strict=True) if c.free_slots > 0]
        if not free:
            return None
        best_free, most_cached = free[0][0], free[0][1].cached_tokens
        for start, c in free:
            if start < best_free:
                best_free = start
            if c.cached_tokens > most_cached:
                most_cached = c.cached_tokens
        if min(costs) < best_free:
            return None  # a busy slot that holds the prompt will start it sooner: wait
        if most_cached < _WORTH_TOKENS:
            tied = [c for _, c in free]  # nothing worth keeping: only how busy they are counts
        else:
            tied = [c for cost, c in free if cost <= best_free * (1 + _TIE) + _TIE_S]
        # Among equal starts, those that hold a good part of the prompt (a short conversation's own
        # backend), then the least busy of them, in rotation, so equal backends share the work.
        holders = [c for c in tied if c.cached_tokens * 4 >= c.prompt_tokens > 0]
        return self._least_busy(holders or tied, request)


# Fewer cached tokens than this do not make one backend better than another.
_WORTH_TOKENS = 32
# Starts this close are the same start: estimates are not more precise than that.
_TIE = 0.02
_TIE_S = 0.002


def start_s(candidate: BackendCandidate) -> float:
    """Expected seconds until `candidate` sends the request's first token."""
    c = candidate
    uncached = c.prompt_tokens - c.cached_tokens
    # Computing the prompt stalls every stream decoding there as long as it takes: its cost
    # is borne by the request and by each of them (LMetric's prefill tokens x batch size).
    # A busy backend starts it once one of its requests has finished.
    busy = c.total_slots - c.free_slots if c.free_slots > 0 else c.total_slots - 1
    rate = c.prefill_tps
    # Conditionals, not max(): four builtin calls per backend per decision were a third of
    # the policy's cost.
    return c.wait_s + (uncached if uncached > 0 else 0) / (1e-9 if rate < 1e-9 else rate) * (
        1 + (busy if busy > 0 else 0)
    )


def later_start_s(candidate: BackendCandidate) -> float:
    """The start on `candidate` once its busy slot holding more of the prompt has freed."""
    c = candidate
    uncached = max(0, c.prompt_tokens - c.later_cached_tokens)
    busy = max(c.total_slots - max(c.free_slots, 0) - 1, 0)
    return c.later_wait_s + uncached / max(c.prefill_tps, 1e-9) * (1 + busy)


@dataclass(frozen=True)
class RoutingSettings:
    """What the configuration tells policies."""

    max_cache_wait_s: float = 0.5
    reorder_window_s: float = 1.0
    reorder_max: int = 4
    pin_slots: bool = False


@dataclass(frozen=True)
class PolicySpec:
    """A policy as the configuration names it: how to build one, and what it does."""

    build: Callable[[RoutingSettings], Policy]
    summary: str  # for the CLI help and the README's table


POLICIES: dict[str, PolicySpec] = {
    "cost": PolicySpec(
        lambda s: CostPolicy(max_cache_wait_s=s.max_cache_wait_s),
        "where the request should start soonest: the wait for a slot plus the part of its "
        "prompt the backend does not hold, at its measured prefill rate; it may wait for a "
        "busy backend that holds its prompt, up to max_cache_wait_s",
    ),
    "affinity": PolicySpec(
        lambda s: AffinityPolicy(fallback=RoundRobinPolicy()),
        "a conversation's next turn goes to the backend that cached it, when it has a free "
        "slot, else round robin",
    ),
    "affinity-least-busy": PolicySpec(
        lambda s: AffinityPolicy(fallback=LeastBusyPolicy()),
        "the same, else the backend with the smallest share of its slots busy",
    ),
    "round-robin": PolicySpec(lambda s: RoundRobinPolicy(), "each backend in turn"),
    "least-busy": PolicySpec(
        lambda s: LeastBusyPolicy(), "the backend with the smallest share of its slots busy"
    ),
}
DEFAULT_POLICY = "cost"


def build_policy(name: str, settings: RoutingSettings | None = None) -> Policy:
    try:
        return POLICIES[name].build(settings or RoutingSettings())
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}") from None
