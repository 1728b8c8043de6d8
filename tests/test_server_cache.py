"""The shadow of llama-server's prompt caches follows llama-server's own rules.

Each case is one the pinned sources decide (server-context.cpp get_available_slot(),
server-task.cpp server_prompt_cache): the simulator's prompt_cache.py models the same rules on
tokens, and the last test replays a random sequence through both and compares what they reuse.
"""

from __future__ import annotations

import copy
import random
import unittest

from llamacpp_ha.server_cache import CachedPrompt, Prediction, ServerCaches
from llamacpp_sim.prompt_cache import HostCache, PromptCaches, StateSize

BLOCK = 10  # tokens per key in these prompts


def prompt(*blocks: str, extra: int = 0) -> CachedPrompt:
    """A prompt of one key per block, each BLOCK tokens, keys cumulative like PromptKeys."""
    keys = tuple("/".join(blocks[: i + 1]) for i in range(len(blocks)))
    ends = tuple(BLOCK * (i + 1) for i in range(len(blocks)))
    return CachedPrompt(keys, ends, BLOCK * len(blocks) + extra)


class SharedTest(unittest.TestCase):
    def test_common_prefix_in_tokens(self) -> None:
        self.assertEqual(prompt("s", "a", "b").shared(prompt("s", "a", "c")), 20)
        self.assertEqual(prompt("s").shared(prompt("t")), 0)
        self.assertEqual(prompt("s", "a").shared(prompt("s", "a", "b", "c")), 20)


class ServerCachesTest(unittest.TestCase):
    def setUp(self) -> None:
        self.caches = ServerCaches(n_slots=2, host_tokens=1000)
        self.now = 0.0

    def run_task(self, p: CachedPrompt, id_slot: int | None = None) -> tuple[int, int]:
        launched = self.caches.launch(p, id_slot)
        assert launched is not None
        self.now += 1
        self.caches.release(launched.slot, self.now)
        return launched.slot, launched.reused

    def test_a_follow_up_finds_its_slot(self) -> None:
        slot, _ = self.run_task(prompt("s", "a"))
        self.run_task(prompt("t", "b"))
        self.assertEqual(self.run_task(prompt("s", "a", "x")), (slot, 20))

    def test_a_prediction_asked_again_follows_every_change(self) -> None:
        # A prediction is kept while the shadow is unchanged (a request asks it when weighed,
        # placed and launched): after each change below, with no other prompt asked in
        # between, the same prompt's next ask must say what a shadow that kept nothing says.
        follow_up = prompt("s", "a", "x")

        def asked_again() -> Prediction | None:
            again = self.caches.predict(follow_up)
            fresh = copy.deepcopy(self.caches)
            fresh._planned = None
            self.assertEqual(again, fresh.predict(follow_up))
            return again

        first = self.caches.launch(prompt("s", "a"))
        assert first is not None
        self.assertEqual(asked_again(), (1 - first.slot, 0, None))  # its slot is busy
        self.caches.release(first.slot, 1.0)
        self.assertEqual(asked_again(), (first.slot, 20, None))
        self.caches.track(1.0)
        self.caches.track(2.0)  # the backend counts twice the tokens per byte: rescaled
        asked_again()
        self.run_task(prompt("t", "b"))
        self.run_task(prompt("u", "c"))  # the conversation's slot is given to another
        restored = asked_again()
        assert restored is not None
        self.assertIsNotNone(restored.restores)  # from the host cache
        self.caches.saved = []  # the host cache let it go
        self.assertEqual(asked_again(), (restored.slot, 0, None))
        self.caches.host_tokens = 10
        asked_again()

    def test_the_last_token_is_always_computed(self) -> None:
        self.run_task(prompt("s", "a"))
        self.assertEqual(self.run_task(prompt("s", "a"))[1], 19)

    def test_a_similar_slot_hides_the_host_cache(self) -> None:
        # Conversation A idles in the host cache; B, with the same long system prompt, idles in
        # a slot: A's next turn is given B's slot by similarity, which keeps more than half of
        # itself, so the host cache is not consulted and only the system prompt is reused.
        caches = ServerCaches(n_slots=1, host_tokens=1000)
        first = caches.launch(prompt("s", "s2", "s3", "a"))
        assert first is not None
        caches.release(first.slot, 1)
        second = caches.launch(prompt("s", "s2", "s3", "b"))  # A is saved to the host cache
        assert second is not None
        caches.release(second.slot, 2)
        turn = caches.predict(prompt("s", "s2", "s3", "a", "a2"))
        assert turn is not None
        self.assertEqual(turn.reused, 30)
        self.assertIsNone(turn.restores)

    def test_a_least_recently_used_slot_restores_from_the_host_cache(self) -> None:
        caches = ServerCaches(n_slots=1, host_tokens=1000)
        for i, p in enumerate((prompt("a", "a2", "a3"), prompt("b", "b2", "b3"))):
            launched = caches.launch(p)
            assert launched is not None
            caches.release(launched.slot, i)
        # Nothing in the slot is similar: picked as least recently used, the host is asked.
        turn = caches.predict(prompt("a", "a2", "a3", "a4"))
        assert turn is not None
        self.assertEqual(turn.reused, 30)
        self.assertIsNotNone(turn.restores)
        launched = caches.launch(prompt("a", "a2", "a3", "a4"))
        assert launched is not None
        self.assertNotIn(prompt("a", "a2", "a3"), caches.saved)  # moved, not copied

    def test_a_state_that_keeps_under_a_quarter_is_not_restored(self) -> None:
        caches = ServerCaches(n_slots=1, host_tokens=1000)
        long = prompt("s", *[f"a{i}" for i in range(9)])  # 100 tokens sharing 10 with the next
        for i, p in enumerate((long, prompt("t"))):
            launched = caches.launch(p)
            assert launched is not None
            caches.release(launched.slot, i)
        turn = caches.predict(prompt("s", "q"))
        assert turn is not None
        self.assertEqual(turn.reused, 0)

    def test_no_idle_slot_no_prediction(self) -> None:
        self.caches.launch(prompt("a"))
        self.caches.launch(prompt("b"))
        self.assertIsNone(self.caches.predict(prompt("a", "x")))
        self.assertGreater(self.caches.best_held(prompt("a", "x")), 0)

    def test_a_named_slot_is_used_and_a_busy_one_refused(self) -> None:
        self.run_task(prompt("a"))
        other = self.caches.launch(prompt("b"), id_slot=1)
        assert other is not None
        self.assertEqual(other.slot, 1)
        self.assertIsNone(self.caches.predict(prompt("b", "x"), id_slot=1))

    def test_the_host_cache_keeps_its_size(self) -> None:
        caches = ServerCaches(n_slots=1, host_tokens=50)
        for i in range(10):
            launched = caches.launch(prompt(f"p{i}", "x"))
            assert launched is not None
            caches.release(launched.slot, i)
        self.assertLessEqual(sum(s.length for s in caches.saved), 50)
        self.assertEqual(caches.saved[-1], prompt("p8", "x"))  # the newest kept

    def test_a_restore_that_did_not_happen_shrinks_the_host_cache(self) -> None:
        caches = ServerCaches(n_slots=1, host_tokens=1000)
        for i in range(5):
            launched = caches.launch(prompt(f"p{i}", "x"))
            assert launched is not None
            caches.release(launched.slot, i)
        caches.lost(prompt("p1", "x"), floor=10)
        # The two saved after it are what the real one holds at most.
        self.assertEqual(caches.host_tokens, 40)
        self.assertEqual(caches.saved, [prompt("p2", "x"), prompt("p3", "x")])

    def test_the_answer_grows_the_slot(self) -> None:
        p = prompt("a", "b")
        launched = self.caches.launch(p)
        assert launched is not None
        self.caches.release(launched.slot, 1)
        self.caches.answered(launched.slot, p, 30)
        self.assertEqual(self.caches.slots[launched.slot].prompt.length, 50)

    def test_it_agrees_with_the_simulators_model_of_llama_server(self) -> None:
        for seed in range(5):
            with self.subTest(seed=seed):
                self.replay_both(seed)

    def test_the_least_recently_used_of_thousands_of_slots(self) -> None:
        # A prompt like no slot's goes to the least recently used idle slot, the highest id
        # among equals (llama-server's `<=`): kept in a heap, checked against a plain scan.
        rng = random.Random(3)
        caches = ServerCaches(n_slots=2048, host_tokens=0)
        busy: set[int] = set()
        for step in range(3000):
            if busy and rng.random() < 0.45:
                slot = rng.choice(sorted(busy))
                busy.discard(slot)
                caches.release(slot, float(rng.randrange(step + 1)))  # ties, out of order
                continue
            idle = [s for s in caches.slots if not s.busy]
            expected = max(idle, key=lambda s: (-s.last_used, s.id)).id
            launched = caches.launch(prompt(f"new{step}"))
            assert launched is not None
            self.assertEqual(launched.slot, expected, step)
            busy.add(launched.slot)

    def test_it_agrees_with_many_slots_holding_the_same_prompts(self) -> None:
        # Many slots, prompts often sent again unchanged (an idle fleet, a shared document):
        # idle slots with equal content are grouped, and the slot picked must still be the one
        # llama-server picks (the lowest id among the most similar), task by task.
        for seed in range(3):
            with self.subTest(seed=seed):
                self.replay_both(seed, n_slots=16, repeat=0.4)

    def replay_both(self, seed: int, n_slots: int = 3, repeat: float = 0.0) -> None:
        # The same tasks through both models: what each says is reused, task by task.
        rng = random.Random(seed)
        shadow = ServerCaches(n_slots=n_slots, host_tokens=400)
        model = PromptCaches(
            n_slots,
            similarity=0.1,
            # 1,000 bytes a token (and 24 a state): the limit holds 400 tokens, as the shadow's.
            host=HostCache(
                limit_bytes=400 * 1000 + 24 * 10, limit_tokens=0, state_size=StateSize(988, 0)
            ),
            cache_idle_slots=True,
            kv_unified=False,
        )
        conversations = {c: [f"sys{c % 2}", f"c{c}"] for c in range(6)}
        busy: list[tuple[int, int]] = []
        agreed = launched = 0
        for step in range(300):
            if busy and (len(busy) == n_slots or rng.random() < 0.5):
                slot_a, slot_b = busy.pop(rng.randrange(len(busy)))
                shadow.release(slot_a, step)
                model.release(slot_b, step)
                continue
            c = rng.randrange(6)
            if rng.random() >= repeat:
                conversations[c].append(f"t{step}")
            p = prompt(*conversations[c])
            tokens = [hash(k) % 100_000 for k in p.keys for _ in range(BLOCK)]
            # What a busy backend may offer, found through the slot groups: as every slot says.
            self.assertEqual(shadow.best_held(p), _held_by_every_slot(shadow, p), step)
            ours, theirs = shadow.launch(p), model.launch(tokens)
            assert ours is not None
            assert theirs is not None
            model.slots[theirs.slot_id].tokens = list(tokens)  # the engine's part: the prompt
            busy.append((ours.slot, theirs.slot_id))
            launched += 1
            agreed += ours.reused == theirs.cache_n and ours.slot == theirs.slot_id
        self.assertGreater(launched, 100)
        self.assertEqual(agreed, launched)


def _held_by_every_slot(shadow: ServerCaches, p: CachedPrompt) -> int:
    """`best_held()` by its definition: every slot, busy or idle, and every saved state that
    would be restored."""
    held = max((s.prompt.shared(p) for s in shadow.slots), default=0)
    for state in shadow.saved:
        shared = state.shared(p)
        if shared >= 0.25 * state.length:
            held = max(held, shared)
    return min(held, max(p.length - 1, 0))


if __name__ == "__main__":
    unittest.main()


class RescaledToNothingTest(unittest.TestCase):
    """A tiny saved prompt that a new tokens-per-byte ratio rounds to no tokens (the request
    fuzz test found it: every drain then failed on a division by its length)."""

    def test_a_state_rescaled_to_no_tokens_is_dropped(self) -> None:
        caches = ServerCaches(2, 1000)
        caches.track(1.0)
        caches.saved = [CachedPrompt(("a",), (1,), 1), CachedPrompt(("b",), (40,), 40)]
        caches.track(0.2)
        self.assertEqual([s.length for s in caches.saved], [8])

    def test_a_saved_state_of_no_tokens_is_never_restored(self) -> None:
        caches = ServerCaches(1, 1000)
        caches.saved = [CachedPrompt(("a",), (0,), 0)]
        prediction = caches.predict(CachedPrompt(("a", "b"), (0, 30), 30))
        assert prediction is not None
        self.assertIsNone(prediction.restores)
