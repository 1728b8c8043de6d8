from __future__ import annotations

import unittest
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from llamacpp_ha.prefix_index import BLOCK_BYTES, MIN_CAPACITY_TOKENS, CacheIndex, prompt_keys


def prefix_keys(body: dict[str, Any]) -> tuple[str, ...]:
    return prompt_keys(body).keys


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def chat(*contents: str, model: str = "m") -> dict[str, object]:
    roles = ["system", "user", "assistant"]
    return {
        "model": model,
        "messages": [
            {"role": roles[min(i, 1) if i < 2 else 1 + i % 2], "content": c}
            for i, c in enumerate(contents)
        ],
    }


class PrefixKeysTest(unittest.TestCase):
    def test_one_key_per_message(self) -> None:
        self.assertEqual(len(prefix_keys(chat("sys", "hi", "hello", "more"))), 4)

    def test_next_turn_extends_previous_keys(self) -> None:
        turn1 = prefix_keys(chat("sys", "hi"))
        turn2 = prefix_keys(chat("sys", "hi", "reply", "again"))
        self.assertEqual(turn2[: len(turn1)], turn1)

    def test_different_content_differs(self) -> None:
        self.assertNotEqual(prefix_keys(chat("sys", "hi"))[-1], prefix_keys(chat("sys", "ho"))[-1])

    def test_model_is_part_of_the_key(self) -> None:
        self.assertNotEqual(prefix_keys(chat("a", model="x")), prefix_keys(chat("a", model="y")))

    def test_anthropic_system_is_included(self) -> None:
        body = {"model": "m", "system": "be brief", "messages": [{"role": "user", "content": "hi"}]}
        other = dict(body, system="be long")
        self.assertEqual(len(prefix_keys(body)), 2)
        self.assertNotEqual(prefix_keys(body)[0], prefix_keys(other)[0])

    def test_a_long_message_has_block_keys_inside(self) -> None:
        document = "d" * (4 * BLOCK_BYTES)
        one = prompt_keys(chat("sys", document + " first question"))
        two = prompt_keys(chat("sys", document + " another one"))
        shared = [k for k, other in zip(one.keys, two.keys, strict=False) if k == other]
        # The system message, then the document's whole blocks, all inside one user message.
        self.assertGreaterEqual(len(shared), 4)
        self.assertGreaterEqual(one.ends[len(shared) - 1], 4 * BLOCK_BYTES)

    def test_ends_count_the_text_covered(self) -> None:
        keys = prompt_keys(chat("s" * 10, "u" * (BLOCK_BYTES + 20)))
        self.assertEqual(len(keys.keys), len(keys.ends))
        self.assertEqual(list(keys.ends), sorted(keys.ends))
        self.assertEqual(keys.ends[-1], keys.size)
        self.assertGreater(keys.size, 10 + BLOCK_BYTES + 20)  # roles are part of the text

    def test_message_boundaries_matter(self) -> None:
        self.assertNotEqual(prefix_keys(chat("ab", "c"))[-1], prefix_keys(chat("a", "bc"))[-1])

    def test_content_parts_hash_their_text(self) -> None:
        parts = {
            "model": "m",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        }
        plain = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        self.assertEqual(prefix_keys(parts), prefix_keys(plain))

    def test_tool_calls_are_part_of_the_message(self) -> None:
        call = {"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]}
        other = {"role": "assistant", "content": "", "tool_calls": [{"id": "2"}]}
        self.assertNotEqual(prefix_keys({"messages": [call]}), prefix_keys({"messages": [other]}))

    def test_plain_prompt_in_whole_blocks(self) -> None:
        short = prefix_keys({"prompt": "x" * (BLOCK_BYTES - 1)})
        self.assertEqual(short, ())
        two = prefix_keys({"prompt": "x" * (2 * BLOCK_BYTES + 5)})
        self.assertEqual(len(two), 2)
        longer = prefix_keys({"prompt": "x" * (3 * BLOCK_BYTES)})
        self.assertEqual(longer[:2], two)

    def test_native_content_field(self) -> None:
        self.assertEqual(len(prefix_keys({"content": "y" * BLOCK_BYTES})), 1)

    def test_no_prompt_no_keys(self) -> None:
        self.assertEqual(prefix_keys({"input": ["embed me"]}), ())
        self.assertEqual(prefix_keys({"messages": "not a list"}), ())


def keys_of(*contents: str) -> tuple[str, ...]:
    return prefix_keys(chat(*contents))


class CacheIndexTest(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.index = CacheIndex(ttl_s=600, max_entries=10_000, clock=self.clock)

    def test_follow_up_finds_backend_of_previous_turn(self) -> None:
        self.index.record("gpu-a", keys_of("sys", "hi"), 100)
        turn2 = keys_of("sys", "hi", "r", "again")
        self.assertEqual(self.index.match(turn2), {"gpu-a": 2})

    def test_unrelated_conversation_finds_nothing(self) -> None:
        self.index.record("gpu-a", keys_of("sys", "hi"), 100)
        self.assertEqual(self.index.match(keys_of("other sys", "hi")), {})

    def test_a_key_maps_to_every_backend_that_computed_it(self) -> None:
        self.index.record("gpu-a", keys_of("sys", "hi"), 100)
        self.index.record("gpu-b", keys_of("sys", "hello"), 100)
        self.assertEqual(self.index.match(keys_of("sys", "hi", "r", "x")), {"gpu-a": 2, "gpu-b": 1})

    def test_shared_document_prefix_in_plain_prompts(self) -> None:
        document = "d" * (4 * BLOCK_BYTES)
        self.index.record("gpu-b", prefix_keys({"prompt": document + "question one"}), 300)
        found = self.index.match(prefix_keys({"prompt": document + "question two"}))
        self.assertEqual(found, {"gpu-b": 4})

    def test_capacity_evicts_least_recently_used_per_backend(self) -> None:
        self.index.set_capacity("gpu-a", 1000)
        self.index.record("gpu-a", keys_of("one"), 400)
        self.index.record("gpu-a", keys_of("two"), 400)
        self.index.record("gpu-b", keys_of("elsewhere"), 5000)  # another backend's budget
        self.index.record("gpu-a", keys_of("one"), 400)  # used again: now the newest
        self.index.record("gpu-a", keys_of("three"), 400)
        self.assertEqual(self.index.match(keys_of("two")), {})
        self.assertEqual(self.index.match(keys_of("one")), {"gpu-a": 1})
        self.assertEqual(self.index.match(keys_of("three")), {"gpu-a": 1})
        self.assertEqual(self.index.match(keys_of("elsewhere")), {"gpu-b": 1})
        self.assertEqual(self.index.capacity("gpu-a"), (800, 1000))

    def test_a_turn_that_extends_a_prompt_replaces_it(self) -> None:
        # llama-server extends the prompt in its slot; it does not keep both.
        self.index.record("gpu-a", keys_of("sys", "hi"), 400)
        self.index.record("gpu-a", keys_of("sys", "hi", "r", "more"), 500)
        self.assertEqual(self.index.capacity("gpu-a")[0], 500)

    def test_shared_prefix_stays_while_one_prompt_holds_it(self) -> None:
        self.index.set_capacity("gpu-a", 1000)
        self.index.record("gpu-a", keys_of("sys", "first"), 600)
        self.index.record("gpu-a", keys_of("sys", "second"), 300)
        self.index.record("gpu-a", keys_of("x"), 300)  # evicts "first"
        self.assertEqual(self.index.match(keys_of("sys", "first")), {"gpu-a": 1})

    def test_over_prediction_of_an_old_prompt_shrinks_the_estimate(self) -> None:
        self.index.set_capacity("gpu-a", 100_000)
        old = keys_of("old conversation")
        self.index.record("gpu-a", old, 2000)
        for i in range(40):
            self.index.record("gpu-a", keys_of(f"conversation {i}"), 2000)
        self.index.correct("gpu-a", old, predicted=len(old), found=0)
        used, estimate = self.index.capacity("gpu-a")
        self.assertEqual(estimate, 80_000)  # what was computed after it
        self.assertEqual(self.index.match(old), {})
        self.assertLessEqual(used, estimate)
        # Predictions that fall short let it grow back towards the configured capacity.
        for _ in range(10):
            self.index.regain("gpu-a")
        self.assertEqual(self.index.capacity("gpu-a")[1], 100_000)

    def test_over_prediction_of_a_recent_prompt_only_drops_it(self) -> None:
        self.index.set_capacity("gpu-a", 100_000)
        recent = keys_of("recent")
        self.index.record("gpu-a", keys_of("older"), 2000)
        self.index.record("gpu-a", recent, 2000)
        self.index.correct("gpu-a", recent, predicted=len(recent), found=0)
        self.assertEqual(self.index.capacity("gpu-a"), (2000, 100_000))
        self.assertEqual(self.index.match(recent), {})
        self.assertEqual(self.index.match(keys_of("older")), {"gpu-a": 1})

    def test_the_estimate_never_shrinks_below_the_floor(self) -> None:
        self.index.set_capacity("gpu-a", 6000)
        old = keys_of("old")
        self.index.record("gpu-a", old, 10)
        self.index.record("gpu-a", keys_of("new"), 3000)
        self.index.correct("gpu-a", old, predicted=1, found=0)
        self.assertEqual(self.index.capacity("gpu-a"), (3000, MIN_CAPACITY_TOKENS))

    def test_a_correct_prediction_changes_nothing(self) -> None:
        keys = keys_of("sys", "hi")
        self.index.record("gpu-a", keys, 100)
        self.index.correct("gpu-a", keys, predicted=2, found=2)
        self.assertEqual(self.index.match(keys), {"gpu-a": 2})

    def test_entries_expire(self) -> None:
        self.index.record("gpu-a", keys_of("sys", "hi"), 100)
        self.clock.now += 601
        self.index.record("gpu-a", keys_of("other"), 100)
        self.assertEqual(self.index.match(keys_of("sys", "hi", "r", "x")), {})

    def test_bounded_number_of_keys(self) -> None:
        index = CacheIndex(ttl_s=600, max_entries=3, clock=self.clock)
        for i in range(5):
            index.record("gpu-a", keys_of(f"conv {i}"), 10)
        self.assertEqual(len(index), 3)
        self.assertEqual(index.match(keys_of("conv 0")), {})
        self.assertEqual(index.match(keys_of("conv 4")), {"gpu-a": 1})

    def test_empty_keys_are_not_recorded(self) -> None:
        self.index.record("gpu-a", (), 10)
        self.assertEqual(len(self.index), 0)

    def test_forget_backend(self) -> None:
        self.index.record("gpu-a", keys_of("a"), 10)
        self.index.record("gpu-b", keys_of("a"), 10)
        self.index.record("gpu-b", keys_of("b"), 10)
        self.index.forget_backend("gpu-a")
        self.assertEqual(self.index.match(keys_of("a")), {"gpu-b": 1})
        self.index.forget_backend("gpu-b")
        self.assertEqual(len(self.index), 0)


if __name__ == "__main__":
    unittest.main()


def walk_every_key(index: CacheIndex, keys: tuple[str, ...]) -> dict[str, int]:
    """What `match` must say, found the slow way: each backend's deepest key that it holds."""
    held: dict[str, int] = {}
    for depth in range(len(keys), 0, -1):
        for backend in index._holders.get(keys[depth - 1], ()):
            held.setdefault(backend, depth)
    return held


# Conversations as paths in a small tree of texts: prompts that share their first turns share
# their first keys, as a fleet's traffic does (system prompts, a conversation's turns).
_TEXTS = st.sampled_from(["sys", "other", "hi", "a" * 600, "b", "c" * 300, "d"])
_PROMPTS = st.lists(_TEXTS, min_size=1, max_size=6)
_OPS = st.lists(
    st.tuples(
        st.sampled_from(["record", "record", "record", "correct", "forget"]),
        st.sampled_from(["gpu-a", "gpu-b", "gpu-c", "gpu-d"]),
        _PROMPTS,
        st.integers(min_value=50, max_value=3000),
    ),
    max_size=40,
)


class MatchByDepthsTest(unittest.TestCase):
    """`match` looks only at the depths where the holders change (a binary search): it must
    say what a walk over every key says, whatever was recorded, evicted, corrected or forgotten."""

    @settings(max_examples=300, deadline=None)
    @given(ops=_OPS, probes=st.lists(_PROMPTS, min_size=1, max_size=5))
    def test_it_agrees_with_a_walk_over_every_key(
        self, ops: list[tuple[str, str, list[str], int]], probes: list[list[str]]
    ) -> None:
        index = CacheIndex(ttl_s=600, max_entries=60)
        for backend in ("gpu-a", "gpu-b", "gpu-c", "gpu-d"):
            index.set_capacity(backend, MIN_CAPACITY_TOKENS)  # small: evictions happen
        for op, backend, texts, tokens in ops:
            keys = keys_of(*texts)
            if op == "record":
                index.record(backend, keys, tokens)
            elif op == "correct":
                held = index.match(keys).get(backend, 0)
                index.correct(backend, keys, held, held // 2)
            else:
                index.forget_backend(backend)
            for probe in [texts, *probes]:
                probe_keys = keys_of(*probe)
                self.assertEqual(index.match(probe_keys), walk_every_key(index, probe_keys))
