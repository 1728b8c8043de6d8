"""Reading a poll's answers: real llama-server captures, then every hostile shape we know of."""

from __future__ import annotations

import json
import unittest
from typing import Any

from fake_llama import captured
from llamacpp_ha.probe import (
    Health,
    Models,
    Slots,
    Unavailable,
    parse_health,
    parse_models,
    parse_props,
    parse_slots,
)

# llama-server's answer on every endpoint while it loads a model (its README and its source).
LOADING = b'{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}'


def as_json(value: Any) -> bytes:
    return json.dumps(value).encode()


def models(*entries: Any) -> bytes:
    return as_json({"object": "list", "data": list(entries)})


class CapturedAnswersTest(unittest.TestCase):
    def test_health(self) -> None:
        self.assertIsNone(parse_health(*captured("health.txt")))
        self.assertEqual(parse_health(503, LOADING), Unavailable(Health.LOADING, "loading model"))

    def test_health_answering_an_error(self) -> None:
        # A real llama-server error body (here from a bad request) where /health should be.
        unavailable = parse_health(*captured("bad-json.txt"))
        assert unavailable is not None
        self.assertIs(unavailable.health, Health.DEAD)
        self.assertTrue(unavailable.reason.startswith("/health answered 400 [json.exception"))

    def test_models(self) -> None:
        result = parse_models(*captured("models.txt"))
        assert isinstance(result, Models)
        self.assertEqual(result.ids, ("tiny-llama",))
        self.assertEqual(result.names, frozenset({"tiny-llama"}))
        self.assertEqual([e["id"] for e in result.entries], ["tiny-llama"])
        self.assertEqual(result.entries[0]["aliases"], ["tiny-llama"])
        self.assertEqual(result.entries[0]["owned_by"], "llamacpp")  # passed on as it came

    def test_slots(self) -> None:
        idle = Slots(total=2, busy=0, n_ctx=1024)
        self.assertEqual(parse_slots(*captured("slots-idle.txt")), idle)
        self.assertEqual(parse_slots(*captured("slots-busy.txt")), Slots(2, 1, n_ctx=1024))
        self.assertEqual(parse_slots(*captured("slots-fail-on-no-slot.txt")), idle)

    def test_props(self) -> None:
        self.assertEqual(parse_props(*captured("props.txt")), Slots(total=2, busy=0))

    def test_no_slots_endpoint_sends_the_poll_to_props(self) -> None:
        # llama-server started with --no-slots answers an error rather than a slot list.
        self.assertIsNone(parse_slots(501, as_json({"error": {"code": 501, "message": "off"}})))


class HostileAnswersTest(unittest.TestCase):
    def test_health(self) -> None:
        for body in (b"", b"not json", b"\xff\xfe", b"[" * 100_000, as_json([1]), as_json("x")):
            unavailable = parse_health(500, body)
            self.assertEqual(unavailable, Unavailable(Health.DEAD, "/health answered 500"), body)
        self.assertEqual(
            parse_health(503, as_json({"error": "Loading model"})),
            Unavailable(Health.DEAD, "/health answered 503"),
        )
        long = parse_health(500, as_json({"error": {"message": "x" * 100_000}}))
        assert long is not None
        self.assertLess(len(long.reason), 300)

    def test_models_whose_aliases_are_not_a_list_of_strings(self) -> None:
        for aliases, kept in ((5, []), ("abc", []), ([1, None, "a", ["b"], {}], ["a"]), (None, [])):
            result = parse_models(200, models({"id": "m", "aliases": aliases}))
            assert isinstance(result, Models), aliases
            self.assertEqual(result.names, frozenset({"m", *kept}), aliases)
            self.assertEqual(result.entries, ({"id": "m", "aliases": kept},), aliases)

    def test_models_entries_that_are_not_objects_with_a_string_id(self) -> None:
        result = parse_models(
            200, models(5, "m", None, [], {"aliases": ["a"]}, {"id": 7}, {"id": None}, {"id": "ok"})
        )
        assert isinstance(result, Models)
        self.assertEqual(result.entries, ({"id": "ok"},))
        self.assertEqual(result.ids, ("ok",))
        self.assertEqual(result.names, frozenset({"ok"}))

    def test_models_answers_that_are_no_model_list(self) -> None:
        for status, body in (
            (200, b"[" * 100_000),
            (200, b"{"),
            (200, as_json([])),
            (200, as_json({"data": {"id": "m"}})),
            (200, as_json({"models": []})),
            (404, models({"id": "m"})),
        ):
            result = parse_models(status, body)
            self.assertEqual(result, Unavailable(Health.DEAD, f"/v1/models answered {status}"))

    def test_slots_that_cannot_be_read_count_as_busy(self) -> None:
        body = as_json(
            [
                {"id": 0, "is_processing": False},
                {"id": 1, "is_processing": True},
                {"id": 2, "is_processing": "no"},
                {"id": 3, "is_processing": 0},
                {"id": 4, "is_processing": None},
                {"id": 5},  # no is_processing at all: idle
                7,
                None,
            ]
        )
        self.assertEqual(parse_slots(200, body), Slots(total=8, busy=6))

    def test_slots_answers_that_are_no_slot_list(self) -> None:
        for status, body in ((200, as_json({"slots": []})), (200, b"[" * 100_000), (503, b"[]")):
            self.assertIsNone(parse_slots(status, body), body[:20])

    def test_props_without_a_usable_slot_count(self) -> None:
        for total in (True, False, -1, 2.0, "2", None, [2]):
            result = parse_props(200, as_json({"total_slots": total}))
            self.assertIsInstance(result, Unavailable, total)
        for status, body in ((200, as_json([2])), (200, b"{"), (500, as_json({"total_slots": 2}))):
            self.assertIsInstance(parse_props(status, body), Unavailable, body)
        self.assertEqual(parse_props(200, as_json({"total_slots": 0})), Slots(total=0, busy=0))
