"""Trying backends until one starts a good answer: the one retry rule, in one place.

`first_good_answer(acquire, open, rule)` claims a backend, opens the request there, and on an
`UpstreamError` asks `rule` whether to try another one (Caddy's `tryAgain`): never a backend
already tried, within `max_attempts`, while another backend could serve the request, and within
a retry budget. Each request earns `ratio` of a retry (plus a small reserve for quiet periods),
so when the whole fleet fails, retries add at most that share of load instead of multiplying
it. Nothing here is retried once a byte has reached the client: `open` returns before the
relay sends anything.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from .errors import NoHealthyBackend, UpstreamError

log = logging.getLogger("llamacpp_ha.attempts")

# llama-server answers 503 while it loads a model, and a proxy in front of it 502: both mean
# "not this backend, not now", which another backend may well serve.
RETRYABLE_STATUSES = frozenset({502, 503})


class Closable(Protocol):
    async def aclose(self) -> None: ...


AnswerT = TypeVar("AnswerT", bound=Closable)


class ClaimedBackend(Protocol):
    @property
    def backend_name(self) -> str: ...


ClaimT = TypeVar("ClaimT", bound=ClaimedBackend)


class RetryableAnswer(UpstreamError, Generic[AnswerT]):
    """The backend answered with a status another backend may do better than (502, 503).

    If no retry is allowed, its answer is the client's: it is relayed as it came.
    """

    def __init__(self, message: str, answer: AnswerT) -> None:
        super().__init__(message)
        self.answer = answer


class RetryBudget:
    """A token bucket filled by requests and drained by retries."""

    def __init__(self, ratio: float, reserve: float = 3.0, cap: float = 10.0) -> None:
        self._ratio = ratio
        self._cap = max(cap, reserve)
        self._tokens = reserve

    def on_request(self) -> None:
        self._tokens = min(self._cap, self._tokens + self._ratio)

    def try_spend(self) -> bool:
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


@dataclass(frozen=True)
class RetryRule:
    """When a failed attempt may go to another backend."""

    max_attempts: int
    budget: RetryBudget
    # Whether some backend not in the given set could still take the request.
    can_serve: Callable[[frozenset[str]], bool]

    def try_again(self, error: UpstreamError, attempts: int, tried: frozenset[str]) -> bool:
        # Every UpstreamError is the backend's doing (the client's own faults and our capacity
        # never reach here), and none of them has sent a byte to the client yet.
        del error
        if attempts >= self.max_attempts or not self.can_serve(tried):
            return False
        return self.budget.try_spend()


async def first_good_answer(
    acquire: Callable[[frozenset[str]], Awaitable[ClaimT]],
    open: Callable[[ClaimT], Awaitable[AnswerT]],
    rule: RetryRule,
) -> AnswerT:
    """The first answer worth relaying, trying backends as `rule` allows.

    `acquire(tried)` claims a backend not in `tried` (it may queue, and raise `NoCapacity`);
    `open(claim)` returns an answer, or raises an `UpstreamError` having released the claim
    (a `RetryableAnswer` keeps it, with its answer, until we know whether it is relayed).
    """
    rule.budget.on_request()
    tried: frozenset[str] = frozenset()
    attempts = 0
    while True:
        attempts += 1
        claim = await acquire(tried)
        try:
            return await open(claim)
        except UpstreamError as error:
            failure = error
        tried |= {claim.backend_name}
        if rule.try_again(failure, attempts, tried):
            if isinstance(failure, RetryableAnswer):
                await failure.answer.aclose()
            log.info("retrying on another backend: %s", failure.message)
            continue
        if isinstance(failure, RetryableAnswer):
            return failure.answer  # type: ignore[no-any-return]
        if failure.unreachable and not rule.can_serve(tried):
            # Nothing reached any backend and none is left to try: the client may simply try
            # again later, which is what 503 + Retry-After says.
            raise NoHealthyBackend(failure.message) from None
        raise failure
