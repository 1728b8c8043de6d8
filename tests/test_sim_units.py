"""Pure parts of the simulator: tokenizer, template, replies, prefixes, fault parsing."""

from __future__ import annotations

import random
import unittest

from llamacpp_sim import PROFILES, Fault, SimConfig
from llamacpp_sim.generator import reply_pieces
from llamacpp_sim.prompt_cache import common_prefix_len
from llamacpp_sim.template import render_chat
from llamacpp_sim.tokenizer import BOS_ID, Tokenizer


class TokenizerTest(unittest.TestCase):
    def setUp(self) -> None:
        self.tok = Tokenizer()

    def test_round_trip_and_stability(self) -> None:
        text = "Hello there, general Kenobi!\n  12 apples\tand émigrés"
        tokens = self.tok.tokenize(text)
        self.assertEqual(self.tok.detokenize(tokens), text)
        self.assertEqual(Tokenizer().tokenize(text), tokens)

    def test_about_one_token_per_word(self) -> None:
        text = "the quick brown fox jumps over the lazy dog " * 10
        self.assertLess(len(self.tok.tokenize(text)), len(text.split()) * 1.5)

    def test_concatenation_at_message_boundaries(self) -> None:
        pairs = [
            ("user: hello there\n", "assistant: "),
            ("assistant: ", "alpha beta"),
            ("alpha beta", "\nuser: next"),
            ("ends with space ", "starts with letters"),
        ]
        for a, b in pairs:
            with self.subTest(a=a, b=b):
                self.assertEqual(
                    self.tok.tokenize(a + b), self.tok.tokenize(a) + self.tok.tokenize(b)
                )

    def test_next_turn_extends_prompt_and_reply(self) -> None:
        turn1 = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
        prompt1 = self.tok.tokenize(render_chat(turn1), add_bos=True)
        self.assertEqual(prompt1[0], BOS_ID)
        pieces = reply_pieces(prompt1, 12)
        reply_ids = [self.tok.piece_id(p) for p in pieces]
        reply = "".join(pieces)
        self.assertEqual(self.tok.tokenize(reply), reply_ids)
        turn2 = [
            *turn1,
            {"role": "assistant", "content": reply},
            {"role": "user", "content": "more"},
        ]
        prompt2 = self.tok.tokenize(render_chat(turn2), add_bos=True)
        self.assertEqual(prompt2[: len(prompt1) + len(reply_ids)], prompt1 + reply_ids)

    def test_replies_are_deterministic(self) -> None:
        prompt = self.tok.tokenize("user: hi\nassistant: ")
        self.assertEqual(reply_pieces(prompt, 20), reply_pieces(list(prompt), 20))
        self.assertNotEqual(reply_pieces(prompt, 20), reply_pieces([*prompt, 5], 20))
        self.assertEqual(len(reply_pieces(prompt, 7)), 7)


class CommonPrefixTest(unittest.TestCase):
    def test_common_prefix_len(self) -> None:
        self.assertEqual(common_prefix_len([1, 2, 3, 4], [1, 2, 9]), 2)
        self.assertEqual(common_prefix_len([1, 2], [1, 2, 3]), 2)
        self.assertEqual(common_prefix_len([], [1]), 0)
        long = list(range(5000))
        self.assertEqual(common_prefix_len(long, [*long[:4321], -1]), 4321)

    def test_agrees_with_a_plain_loop(self) -> None:
        rng = random.Random(7)
        for _ in range(300):
            a = [rng.randrange(3) for _ in range(rng.randrange(0, 400))]
            b = a[: rng.randrange(0, len(a) + 1)] + [rng.randrange(3) for _ in range(50)]
            expected = next(
                (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                min(len(a), len(b)),
            )
            self.assertEqual(common_prefix_len(a, b), expected)


class FaultAndConfigTest(unittest.TestCase):
    def test_fault_from_json(self) -> None:
        self.assertIsNone(Fault.from_json({}))
        self.assertIsNone(Fault.from_json(None))
        fault = Fault.from_json({"crash_after_chunks": 2, "crash_mode": "reset"})
        self.assertEqual(fault, Fault(crash_after_chunks=2, crash_mode="reset"))
        bad: object
        for bad in ({"nope": 1}, {"hang": 1}, {"crash_mode": "explode"}, {"loading_s": -1}, []):
            with self.subTest(bad=bad), self.assertRaises(ValueError):
                Fault.from_json(bad)

    def test_profiles_and_config(self) -> None:
        self.assertTrue({"cpu-1b", "gpu-8b", "gpu-70b", "test"} <= set(PROFILES))
        self.assertGreater(PROFILES["gpu-8b"].prompt_tps, PROFILES["cpu-1b"].prompt_tps)
        one = PROFILES["gpu-8b"].step_s(1, 0)
        self.assertGreater(PROFILES["gpu-8b"].step_s(4, 0), one)
        with self.assertRaises(ValueError):
            SimConfig(profile="nope")
        with self.assertRaises(ValueError):
            SimConfig(slots=0)
