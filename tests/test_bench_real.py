"""How `make bench-real` sizes its llama-servers, its ceiling and its verdict (bench/real.py)."""

from __future__ import annotations

import sys
import unittest
from pathlib import Path

# bench/ is a package at the repository's root, not an installed one
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.real import (
    MIB,
    ModelShape,
    cache_ram_mib,
    infinite_cache_ceiling,
    model_shape,
    ranking,
    slot_ctx,
    states_held,
    unsettled,
    verdict,
)


class SizingTest(unittest.TestCase):
    def test_kv_bytes_of_the_tiny_model(self) -> None:
        # 2 layers x 4 KV heads x 16 dims x (K and V) x 2 bytes (f16): the figure the cache
        # fidelity test states for the same model.
        shape = model_shape("tiny")
        self.assertEqual(shape.kv_bytes_per_token, 512)
        self.assertEqual(shape.n_ctx_train, 4096)
        # a saved state: 12 bytes of cell metadata per token beside its K and V rows
        state = shape.state_size()
        self.assertEqual(state.of(101) - state.of(100), 524)

    def test_grouped_query_heads_count_kv_heads_only(self) -> None:
        shape = ModelShape(n_embd=512, n_layer=8, n_head=8, n_head_kv=2, n_ctx_train=4096)
        self.assertEqual(shape.kv_bytes_per_token, 8 * 2 * 64 * 2 * 2)

    def test_cache_ram_holds_the_asked_number_of_mean_prompts(self) -> None:
        state = model_shape("tiny").state_size()
        lengths = [500, 1500, 1000]  # mean 1000 tokens: 524,000 bytes and a header per state
        mib = cache_ram_mib(state, lengths, 4)
        self.assertEqual(mib, 2)  # 4 states are 2.0 MB, just under 2 MiB
        self.assertGreaterEqual(states_held(state, mib, 1000), 4)
        self.assertLess(states_held(state, mib - 1, 1000), 4)
        self.assertEqual(cache_ram_mib(state, lengths, 5), 3)  # 2.5 MB: rounded up

    def test_cache_ram_is_never_zero(self) -> None:
        # 0 would turn llama-server's host cache off altogether
        state = model_shape("tiny").state_size()
        self.assertEqual(cache_ram_mib(state, [10, 20], 1), 1)
        self.assertEqual(states_held(state, 1, 10), MIB // state.of(10))

    def test_slot_context_holds_the_longest_request_and_one_more_token(self) -> None:
        self.assertEqual(slot_ctx(3437, 4096), 3584)
        self.assertEqual(slot_ctx(255, 4096), 256)
        self.assertEqual(slot_ctx(256, 4096), 512)
        self.assertEqual(slot_ctx(4000, 4096), 4096)

    def test_slot_context_refuses_more_than_the_model_was_trained_on(self) -> None:
        with self.assertRaises(ValueError):
            slot_ctx(4096, 4096)


class CeilingTest(unittest.TestCase):
    def test_repeated_prefixes_count_once_and_the_last_token_is_computed(self) -> None:
        prompts = [
            [1, 2, 3, 4],  # cold: 0 of 4
            [1, 2, 3, 4, 5, 6],  # extends the first: 4 of 6
            [1, 2, 3, 4],  # seen whole: 3 of 4 (the last token is always computed)
            [9, 9],  # cold: 0 of 2
        ]
        self.assertAlmostEqual(infinite_cache_ceiling(prompts), 7 / 16)

    def test_no_prompts(self) -> None:
        self.assertEqual(infinite_cache_ceiling([]), 0.0)


class VerdictTest(unittest.TestCase):
    def test_ranking_is_by_hit_rate(self) -> None:
        self.assertEqual(ranking({"a": 0.2, "b": 0.5, "c": 0.3}), ["b", "c", "a"])

    def test_same_order_matches(self) -> None:
        same, text = verdict(["b", "c", "a"], ["b", "c", "a"])
        self.assertTrue(same)
        self.assertIn("**matches**", text)

    def test_only_contenders_in_both_are_compared(self) -> None:
        same, _ = verdict(["b", "x", "c", "a"], ["b", "c", "a", "y"])
        self.assertTrue(same)

    def test_a_swapped_pair_is_named(self) -> None:
        same, text = verdict(["b", "c", "a"], ["c", "b", "a"])
        self.assertFalse(same)
        self.assertIn("b / c", text)
        self.assertNotIn("c / a", text)

    def test_overlapping_ranges_leave_an_order_unsettled(self) -> None:
        ranges = {"a": (0.46, 0.36, 0.47), "b": (0.43, 0.38, 0.46), "c": (0.22, 0.21, 0.25)}
        self.assertEqual(unsettled(["a", "b", "c"], ranges), ["a / b"])
        self.assertEqual(unsettled(["a", "c"], ranges), [])
