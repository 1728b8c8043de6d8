"""The `cost` policy's contract, over candidate snapshots."""

from __future__ import annotations

import random
import unittest

from llamacpp_ha.policies import (
    BackendCandidate,
    CostPolicy,
    LeastBusyPolicy,
    Policy,
    RoutingRequest,
)
from test_policies import PolicyContract

# --- the policy's contract, over snapshots ------------------------------------------------


def backend(
    name: str,
    *,
    free: int = 2,
    total: int = 2,
    cached: int = 0,
    prompt: int = 2000,
    tps: float = 1000.0,
    wait_s: float = 0.0,
) -> BackendCandidate:
    return BackendCandidate(
        name=name,
        free_slots=free,
        total_slots=total,
        prefix_match=1 if cached else 0,
        cached_tokens=cached,
        prompt_tokens=prompt,
        prefill_tps=tps,
        wait_s=0.0 if free else wait_s,
    )


REQUEST = RoutingRequest(model="m")


class CostPolicyContractTest(PolicyContract, unittest.TestCase):
    def make(self) -> Policy:
        return CostPolicy(max_cache_wait_s=1.0)


class CostPolicyTest(unittest.TestCase):
    def test_waits_for_a_busy_holder_that_starts_sooner_than_a_recompute(self) -> None:
        # Elsewhere: 2,000 tokens at 1,000/s, 2 s. The holder frees a slot in 0.3 s.
        fleet = [
            backend("a-free"),
            backend("b-holder", free=0, cached=1900, wait_s=0.3),
        ]
        self.assertIsNone(CostPolicy(max_cache_wait_s=1.0)(fleet, REQUEST))

    def test_a_free_holder_is_taken_at_once(self) -> None:
        fleet = [backend("a-free"), backend("b-holder", free=1, cached=1900)]
        self.assertEqual(CostPolicy(max_cache_wait_s=1.0)(fleet, REQUEST), "b-holder")

    def test_does_not_wait_beyond_max_cache_wait_s(self) -> None:
        fleet = [backend("a-free"), backend("b-holder", free=0, cached=1900, wait_s=1.5)]
        self.assertEqual(CostPolicy(max_cache_wait_s=1.0)(fleet, REQUEST), "a-free")
        # Allowed to wait that long, it waits: the holder starts sooner than 2 s of prefill.
        self.assertIsNone(CostPolicy(max_cache_wait_s=2.0)(fleet, REQUEST))

    def test_time_already_waited_counts_against_max_cache_wait_s(self) -> None:
        fleet = [backend("a-free"), backend("b-holder", free=0, cached=1900, wait_s=0.3)]
        policy = CostPolicy(max_cache_wait_s=1.0)
        self.assertIsNone(policy(fleet, RoutingRequest(model="m", waited_s=0.5)))
        # 0.8 s waited: 0.2 s left, and the holder needs 0.3 s more.
        self.assertEqual(policy(fleet, RoutingRequest(model="m", waited_s=0.8)), "a-free")

    def test_does_not_wait_for_a_holder_that_starts_later_than_a_recompute(self) -> None:
        # 200 uncached tokens elsewhere take 0.2 s; the holder needs 0.5 s to free a slot.
        fleet = [
            backend("a-free", prompt=200),
            backend("b-holder", free=0, prompt=200, cached=190, wait_s=0.5),
        ]
        self.assertEqual(CostPolicy(max_cache_wait_s=1.0)(fleet, REQUEST), "a-free")

    def test_equal_starts_go_to_the_least_busy(self) -> None:
        # The whole prompt is cached on both: nothing to compute, equal starts.
        fleet = [
            backend("a-busier", free=1, total=4, cached=2000),
            backend("b-idle", free=4, total=4, cached=2000),
        ]
        policy = CostPolicy()
        self.assertEqual([policy(fleet, REQUEST) for _ in range(3)], ["b-idle"] * 3)

    def test_nothing_cached_behaves_like_least_busy(self) -> None:
        cost, least_busy = CostPolicy(), LeastBusyPolicy()
        rng = random.Random(7)
        for _ in range(200):
            fleet = [
                backend(f"b{i}", free=rng.randint(0, 4), total=4, wait_s=rng.uniform(0, 1))
                for i in range(3)
            ]
            self.assertEqual(cost(fleet, REQUEST), least_busy(fleet, REQUEST), fleet)

    def test_a_long_cached_prefix_ranks_above_a_short_one(self) -> None:
        fleet = [
            backend("a-short", cached=200),
            backend("b-none"),
            backend("c-long", cached=1500),
        ]
        policy = CostPolicy()
        costs = policy.costs(fleet, REQUEST)
        self.assertLess(costs[2], costs[0])
        self.assertLess(costs[0], costs[1])
        self.assertEqual(policy(fleet, REQUEST), "c-long")
