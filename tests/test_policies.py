from __future__ import annotations

import unittest
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from llamacpp_ha.__main__ import _serve_parser
from llamacpp_ha.config import ConfigError, build_config
from llamacpp_ha.policies import (
    DEFAULT_POLICY,
    POLICIES,
    AffinityPolicy,
    BackendCandidate,
    LeastBusyPolicy,
    Policy,
    PolicySpec,
    RoundRobinPolicy,
    RoutingRequest,
    build_policy,
)


def candidates(*free: int, holder: str | None = None) -> list[BackendCandidate]:
    """Backends b0, b1, ... with these free slots out of 4; `holder` holds the prompt's prefix."""
    return [
        BackendCandidate(
            name=f"b{i}", free_slots=f, total_slots=4, prefix_match=2 if f"b{i}" == holder else 0
        )
        for i, f in enumerate(free)
    ]


if TYPE_CHECKING:
    # The contract is always mixed into a TestCase; at run time it must not be one itself, or
    # unittest would collect it and run it with no policy to build.
    _ContractBase = unittest.TestCase
else:
    _ContractBase = object


class PolicyContract(_ContractBase):
    """Every policy passes these; subclasses say how to build theirs."""

    def make(self) -> Policy:
        raise NotImplementedError

    def test_no_candidates_gives_none(self) -> None:
        self.assertIsNone(self.make()([], RoutingRequest(model="m")))

    def test_all_full_gives_none(self) -> None:
        self.assertIsNone(self.make()(candidates(0, 0, 0), RoutingRequest(model="m")))

    def test_only_free_candidates_are_chosen(self) -> None:
        policy = self.make()
        for _ in range(20):
            self.assertEqual(policy(candidates(0, 2, 0), RoutingRequest(model="m")), "b1")

    def test_does_not_modify_candidates(self) -> None:
        given = candidates(1, 1)
        before = list(given)
        self.make()(given, RoutingRequest(model="m"))
        self.assertEqual(given, before)

    def test_a_full_prefix_holder_is_not_chosen(self) -> None:
        choice = self.make()(candidates(1, 1, 0, holder="b2"), RoutingRequest(model="m"))
        self.assertIn(choice, {"b0", "b1"})

    def test_uses_every_backend_under_steady_load(self) -> None:
        policy = self.make()
        picks = Counter(policy(candidates(1, 1, 1), RoutingRequest(model="m")) for _ in range(30))
        self.assertEqual(set(picks), {"b0", "b1", "b2"})


class RoundRobinTest(PolicyContract, unittest.TestCase):
    def make(self) -> Policy:
        return RoundRobinPolicy()

    def test_rotates_in_order(self) -> None:
        policy = self.make()
        picks = [policy(candidates(1, 1, 1), RoutingRequest(model="m")) for _ in range(6)]
        self.assertEqual(picks, ["b0", "b1", "b2", "b0", "b1", "b2"])

    def test_skips_full_backends_and_keeps_rotating(self) -> None:
        policy = self.make()
        self.assertEqual(policy(candidates(1, 0, 1), RoutingRequest(model="m")), "b0")
        self.assertEqual(policy(candidates(1, 0, 1), RoutingRequest(model="m")), "b2")
        self.assertEqual(policy(candidates(1, 0, 1), RoutingRequest(model="m")), "b0")

    def test_counter_is_per_model(self) -> None:
        policy = self.make()
        self.assertEqual(policy(candidates(1, 1), RoutingRequest(model="a")), "b0")
        self.assertEqual(policy(candidates(1, 1), RoutingRequest(model="b")), "b0")
        self.assertEqual(policy(candidates(1, 1), RoutingRequest(model="a")), "b1")

    def test_stable_when_a_backend_leaves(self) -> None:
        policy = self.make()
        policy(candidates(1, 1, 1), RoutingRequest(model="m"))  # b0
        policy(candidates(1, 1, 1), RoutingRequest(model="m"))  # b1
        fewer = [c for c in candidates(1, 1, 1) if c.name != "b1"]
        self.assertEqual(policy(fewer, RoutingRequest(model="m")), "b2")


class LeastBusyTest(PolicyContract, unittest.TestCase):
    def make(self) -> Policy:
        return LeastBusyPolicy()

    def test_prefers_the_emptiest_share(self) -> None:
        fleet = [
            BackendCandidate(name="big", free_slots=2, total_slots=4),  # half busy
            BackendCandidate(name="small", free_slots=1, total_slots=1),  # idle
        ]
        self.assertEqual(self.make()(fleet, RoutingRequest(model="m")), "small")

    def test_rotates_among_equals(self) -> None:
        policy = self.make()
        picks = [policy(candidates(4, 4), RoutingRequest(model="m")) for _ in range(4)]
        self.assertEqual(picks, ["b0", "b1", "b0", "b1"])


class AffinityLeastBusyTest(PolicyContract, unittest.TestCase):
    def make(self) -> Policy:
        return AffinityPolicy(fallback=LeastBusyPolicy())

    def test_much_busier_preferred_gives_way_to_the_least_busy(self) -> None:
        fleet = [
            BackendCandidate(name="a-cached", free_slots=1, total_slots=4, prefix_match=3),
            BackendCandidate(name="b-idle", free_slots=4, total_slots=4),
        ]
        request = RoutingRequest(model="m")
        self.assertEqual(self.make()(fleet, request), "b-idle")


class AffinityTest(PolicyContract, unittest.TestCase):
    def make(self) -> Policy:
        return AffinityPolicy(fallback=RoundRobinPolicy())

    def test_prefers_the_backend_holding_the_prefix(self) -> None:
        policy = self.make()
        for _ in range(5):
            choice = policy(candidates(1, 1, 1, holder="b2"), RoutingRequest(model="m"))
            self.assertEqual(choice, "b2")

    def test_does_not_insist_on_a_much_busier_backend(self) -> None:
        fleet = [
            BackendCandidate(name="idle", free_slots=4, total_slots=4),
            BackendCandidate(name="z-cached", free_slots=1, total_slots=4, prefix_match=1),
        ]  # z-cached is 3/4 busy
        request = RoutingRequest(model="m")
        self.assertEqual(self.make()(fleet, request), "idle")  # round robin's first
        fleet[0] = BackendCandidate(name="idle", free_slots=2, total_slots=4)  # 1/2 busy
        self.assertEqual(self.make()(fleet, request), "z-cached")

    def test_falls_back_when_preferred_is_full(self) -> None:
        choice = self.make()(candidates(1, 1, 0, holder="b2"), RoutingRequest(model="m"))
        self.assertIn(choice, {"b0", "b1"})

    def test_without_preference_behaves_like_fallback(self) -> None:
        policy, reference = self.make(), RoundRobinPolicy()
        for _ in range(5):
            self.assertEqual(
                policy(candidates(1, 1), RoutingRequest(model="m")),
                reference(candidates(1, 1), RoutingRequest(model="m")),
            )


class BuildPolicyTest(unittest.TestCase):
    def test_names(self) -> None:
        self.assertIsInstance(build_policy("round-robin"), RoundRobinPolicy)
        self.assertIsInstance(build_policy("affinity"), AffinityPolicy)
        self.assertIsInstance(build_policy("least-busy"), LeastBusyPolicy)
        self.assertIsInstance(build_policy("affinity-least-busy"), AffinityPolicy)
        with self.assertRaises(ValueError):
            build_policy("random")

    def test_excluding_adds_to_exclusions(self) -> None:
        request = RoutingRequest(model="m").excluding("a").excluding("b")
        self.assertEqual(request.exclude, frozenset({"a", "b"}))


def first_free(candidates: Sequence[BackendCandidate], request: RoutingRequest) -> str | None:
    return next((c.name for c in candidates if c.free_slots > 0), None)


class PolicyRegistryTest(unittest.TestCase):
    def test_a_new_policy_is_one_function_and_one_entry(self) -> None:
        POLICIES["first-free"] = PolicySpec(
            lambda settings: first_free, "the first backend with room"
        )
        self.addCleanup(POLICIES.pop, "first-free")
        config = build_config({"backends": ["http://a:1"], "routing": "first-free"})
        policy = build_policy(config.routing)
        self.assertEqual(policy(candidates(0, 1, 1), RoutingRequest(model="m")), "b1")
        help_text = " ".join(_serve_parser().format_help().split())  # argparse wraps lines
        self.assertIn("first-free: the first backend with room", help_text)

    def test_unknown_names_are_refused_with_the_known_ones(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            build_config({"backends": ["http://a:1"], "routing": "random"})
        self.assertIn("routing", str(caught.exception))
        for name in POLICIES:
            self.assertIn(name, str(caught.exception))

    def test_the_readme_table_lists_every_policy(self) -> None:
        readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
        row = next(line for line in readme.splitlines() if line.startswith("| `routing` |"))
        self.assertIn(f"`{DEFAULT_POLICY}` |", row)  # the default column
        for name, spec in POLICIES.items():
            self.assertIn(f"`{name}`: {spec.summary}", row)
