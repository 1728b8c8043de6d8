"""The one retry rule, driven with a fake `open` and no sockets."""

from __future__ import annotations

import unittest
from dataclasses import dataclass, field

from llamacpp_ha.attempts import RetryableAnswer, RetryBudget, RetryRule, first_good_answer
from llamacpp_ha.errors import BadGateway, GatewayTimeout, NoHealthyBackend, UpstreamError


@dataclass
class FakeClaim:
    backend_name: str


@dataclass
class FakeAnswer:
    backend: str
    closed: bool = False

    async def aclose(self) -> None:
        self.closed = True


@dataclass
class Fleet:
    """Backends by name, each answering with what `outcomes` says, in turn."""

    backends: list[str]
    outcomes: dict[str, list[UpstreamError | str]]
    acquired: list[frozenset[str]] = field(default_factory=list)
    answers: list[FakeAnswer] = field(default_factory=list)

    async def acquire(self, tried: frozenset[str]) -> FakeClaim:
        self.acquired.append(tried)
        return FakeClaim(next(b for b in self.backends if b not in tried))

    async def open(self, claim: FakeClaim) -> FakeAnswer:
        outcome = self.outcomes[claim.backend_name].pop(0)
        answer = FakeAnswer(claim.backend_name)
        self.answers.append(answer)
        if outcome == "retryable":
            raise RetryableAnswer(f"backend {claim.backend_name} answered 503", answer)
        if isinstance(outcome, UpstreamError):
            raise outcome
        return answer

    def can_serve(self, tried: frozenset[str]) -> bool:
        return any(b not in tried for b in self.backends)


def rule(fleet: Fleet, max_attempts: int = 3, budget: float = 3.0) -> RetryRule:
    return RetryRule(
        max_attempts=max_attempts,
        budget=RetryBudget(ratio=0.0, reserve=budget),
        can_serve=fleet.can_serve,
    )


class FirstGoodAnswerTest(unittest.IsolatedAsyncioTestCase):
    async def test_first_answer_is_taken(self) -> None:
        fleet = Fleet(["a", "b"], {"a": ["ok"]})
        answer = await first_good_answer(fleet.acquire, fleet.open, rule(fleet))
        self.assertEqual(answer.backend, "a")
        self.assertEqual(fleet.acquired, [frozenset()])

    async def test_failure_goes_to_another_backend(self) -> None:
        fleet = Fleet(["a", "b"], {"a": [BadGateway("reset")], "b": ["ok"]})
        answer = await first_good_answer(fleet.acquire, fleet.open, rule(fleet))
        self.assertEqual(answer.backend, "b")
        self.assertEqual(fleet.acquired, [frozenset(), frozenset({"a"})])

    async def test_never_the_same_backend_twice(self) -> None:
        fleet = Fleet(["a", "b"], {"a": [BadGateway("x")], "b": [BadGateway("y")]})
        with self.assertRaises(BadGateway) as caught:
            await first_good_answer(fleet.acquire, fleet.open, rule(fleet, max_attempts=5))
        self.assertEqual(caught.exception.message, "y")
        self.assertEqual(len(fleet.acquired), 2)

    async def test_max_attempts(self) -> None:
        fleet = Fleet(["a", "b", "c"], {b: [GatewayTimeout(b)] for b in "abc"})
        with self.assertRaises(GatewayTimeout):
            await first_good_answer(fleet.acquire, fleet.open, rule(fleet, max_attempts=2))
        self.assertEqual(len(fleet.acquired), 2)

    async def test_budget_bounds_retries(self) -> None:
        fleet = Fleet(["a", "b"], {"a": [BadGateway("x")], "b": ["ok"]})
        with self.assertRaises(BadGateway):
            await first_good_answer(fleet.acquire, fleet.open, rule(fleet, budget=0.0))
        self.assertEqual(len(fleet.acquired), 1)

    async def test_retryable_answer_is_relayed_when_no_retry_is_left(self) -> None:
        fleet = Fleet(["a"], {"a": ["retryable"]})
        answer = await first_good_answer(fleet.acquire, fleet.open, rule(fleet))
        self.assertEqual(answer.backend, "a")
        self.assertFalse(answer.closed)  # the client gets it

    async def test_retryable_answer_is_closed_when_retried(self) -> None:
        fleet = Fleet(["a", "b"], {"a": ["retryable"], "b": ["ok"]})
        answer = await first_good_answer(fleet.acquire, fleet.open, rule(fleet))
        self.assertEqual(answer.backend, "b")
        self.assertTrue(fleet.answers[0].closed)

    async def test_unreachable_everywhere_is_no_healthy_backend(self) -> None:
        refused = [BadGateway("refused", unreachable=True)]
        fleet = Fleet(["a", "b"], {"a": list(refused), "b": list(refused)})
        with self.assertRaises(NoHealthyBackend):
            await first_good_answer(fleet.acquire, fleet.open, rule(fleet))

    async def test_unreachable_with_backends_left_is_the_error_itself(self) -> None:
        fleet = Fleet(["a", "b"], {"a": [BadGateway("refused", unreachable=True)]})
        with self.assertRaises(BadGateway):
            await first_good_answer(fleet.acquire, fleet.open, rule(fleet, max_attempts=1))

    async def test_each_request_earns_budget(self) -> None:
        budget = RetryBudget(ratio=0.5, reserve=0.0)
        fleet = Fleet(["a", "b"], {"a": ["ok", BadGateway("x")], "b": ["ok"]})
        retry_rule = RetryRule(max_attempts=3, budget=budget, can_serve=fleet.can_serve)
        await first_good_answer(fleet.acquire, fleet.open, retry_rule)  # earns 0.5
        answer = await first_good_answer(fleet.acquire, fleet.open, retry_rule)  # 1.0: a retry
        self.assertEqual(answer.backend, "b")
