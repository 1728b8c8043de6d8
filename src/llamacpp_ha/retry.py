"""When a failed attempt may go to another backend: one rule, in one function.

Only while nothing has reached the client, never to a backend already tried, within
`max_attempts`, and within a retry budget: each request earns `ratio` of a retry (plus a small
reserve for quiet periods), so when the whole fleet fails, retries add at most that share of
load instead of multiplying it.
"""

from __future__ import annotations

# llama-server answers 503 while it loads a model, and a proxy in front of it 502: both mean
# "not this backend, not now", which another backend may well serve.
RETRYABLE_STATUSES = frozenset({502, 503})


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


def may_retry(
    *,
    bytes_sent: int,
    attempts: int,
    max_attempts: int,
    another_backend: bool,
    budget: RetryBudget,
) -> bool:
    """The one retry rule; the caller has already decided the failure was the backend's."""
    if bytes_sent or attempts >= max_attempts or not another_backend:
        return False
    return budget.try_spend()
