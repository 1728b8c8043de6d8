from __future__ import annotations

import unittest

from llamacpp_ha.prefix_index import BLOCK_BYTES, SessionStore, prefix_keys


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


class SessionStoreTest(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.store = SessionStore(ttl_s=60, max_entries=100, clock=self.clock)

    def test_follow_up_finds_backend_of_previous_turn(self) -> None:
        self.store.record(prefix_keys(chat("sys", "hi")), "gpu-a")
        self.assertEqual(self.store.lookup(prefix_keys(chat("sys", "hi", "r", "again"))), "gpu-a")

    def test_unrelated_conversation_finds_nothing(self) -> None:
        self.store.record(prefix_keys(chat("sys", "hi")), "gpu-a")
        self.assertIsNone(self.store.lookup(prefix_keys(chat("other sys", "hi"))))

    def test_shared_system_prompt_finds_where_it_was_computed(self) -> None:
        self.store.record(prefix_keys(chat("sys", "hi")), "gpu-a")
        self.assertEqual(self.store.lookup(prefix_keys(chat("sys", "another question"))), "gpu-a")

    def test_shared_document_prefix_in_plain_prompts(self) -> None:
        document = "d" * (4 * BLOCK_BYTES)
        self.store.record(prefix_keys({"prompt": document + "question one"}), "gpu-b")
        self.assertEqual(
            self.store.lookup(prefix_keys({"prompt": document + "question two"})), "gpu-b"
        )

    def test_longest_match_wins(self) -> None:
        self.store.record(prefix_keys(chat("sys", "hi")), "gpu-a")
        self.store.record(prefix_keys(chat("sys", "hi", "r", "again")), "gpu-b")
        self.assertEqual(
            self.store.lookup(prefix_keys(chat("sys", "hi", "r", "again", "r2", "x"))), "gpu-b"
        )

    def test_entries_expire(self) -> None:
        self.store.record(prefix_keys(chat("sys", "hi")), "gpu-a")
        self.clock.now += 61
        self.assertIsNone(self.store.lookup(prefix_keys(chat("sys", "hi", "r", "x"))))
        self.assertEqual(len(self.store), 0)

    def test_recording_again_refreshes(self) -> None:
        keys = prefix_keys(chat("sys", "hi"))
        self.store.record(keys, "gpu-a")
        self.clock.now += 50
        self.store.record(keys, "gpu-b")
        self.clock.now += 50
        self.assertEqual(self.store.lookup(keys), "gpu-b")

    def test_bounded_size_evicts_oldest(self) -> None:
        store = SessionStore(ttl_s=60, max_entries=3, clock=self.clock)
        for i in range(5):
            store.record(prefix_keys(chat(f"conv {i}")), f"b{i}")
        self.assertEqual(len(store), 3)
        self.assertIsNone(store.lookup(prefix_keys(chat("conv 0"))))
        self.assertEqual(store.lookup(prefix_keys(chat("conv 4"))), "b4")

    def test_empty_keys_are_not_recorded(self) -> None:
        self.store.record((), "gpu-a")
        self.assertEqual(len(self.store), 0)

    def test_forget_backend(self) -> None:
        self.store.record(prefix_keys(chat("a")), "gpu-a")
        self.store.record(prefix_keys(chat("b")), "gpu-b")
        self.store.forget_backend("gpu-a")
        self.assertIsNone(self.store.lookup(prefix_keys(chat("a"))))
        self.assertEqual(self.store.lookup(prefix_keys(chat("b"))), "gpu-b")
