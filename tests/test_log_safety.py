"""Log lines cannot be forged: whatever a client sends is escaped and cut, in text and JSON."""

from __future__ import annotations

import json
import logging
import unittest

import httpx

from llamacpp_ha.logs import JsonFormatter, TextFormatter
from llamacpp_ha.logsafe import MAX_FIELD_CHARS, clean
from llamacpp_sim import SimConfig
from serving import balancer_for, sims
from sim_support import wait_until

# What must never reach a log line raw: line breaks, a terminal escape, C1, DEL, separators.
RAW = ("\n", "\r", "\x1b", "\x00", "\x7f", "\x85", "\u2028", "\u2029", "\u202e")
EVIL = "a\nFORGED b\r\x1b[31mred\u2028c"
EVIL_ESCAPED = "a\\x0aFORGED b\\x0d\\x1b[31mred\\u2028c"
EVIL_PATH = "/a%0aFORGED%20b%0d%1b[31mred%E2%80%A8c"  # decodes to "/" + EVIL


def strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings(v)]
    return []


class EscapeTest(unittest.TestCase):
    def test_control_characters_are_escaped(self) -> None:
        cases = {
            "\n": "\\x0a", "\r": "\\x0d", "\t": "\\x09", "\x00": "\\x00", "\x1b[31m": "\\x1b[31m",
            "\x7f": "\\x7f", "\x85": "\\x85", "\x9f": "\\x9f", "\u2028": "\\u2028",
            "\u2029": "\\u2029", "\u202e": "\\u202e", "\ud800": "\\ud800",
            "\\x0a": "\\\\x0a",  # a backslash is doubled: an escape cannot be forged either
            "plain /v1/chat é 漢": "plain /v1/chat é 漢",
        }  # fmt: skip
        for raw, escaped in cases.items():
            self.assertEqual(clean(raw), escaped, repr(raw))

    def test_long_values_are_cut(self) -> None:
        self.assertEqual(clean("p" * 5000), "p" * MAX_FIELD_CHARS + "…")
        self.assertEqual(clean("p" * MAX_FIELD_CHARS), "p" * MAX_FIELD_CHARS)

    def test_every_part_of_a_record(self) -> None:
        logger = logging.getLogger("llamacpp_ha.test")
        with self.assertLogs(logger, logging.INFO) as captured:
            logger.info("unknown path %s", EVIL)
            logger.info(f"an f-string {EVIL}")  # as a careless call site does
            logger.info("fields", extra={"fields": {"endpoint": EVIL, "n": 3, "gone": None}})
            logger.info("%(path)s", {"path": EVIL})
        for record in captured.records:
            text = TextFormatter().format(record)
            entry = json.loads(JsonFormatter().format(record))
            for line in (text, *strings(entry)):
                for char in RAW:
                    self.assertNotIn(char, line, f"{char!r} in {line!r}")
            self.assertIn(EVIL_ESCAPED, text)
            self.assertIn(EVIL_ESCAPED, entry["message"] + str(entry.get("endpoint")))
        fields = captured.records[2]
        self.assertIn(f'endpoint="{EVIL_ESCAPED}" n=3', TextFormatter().format(fields))
        self.assertNotIn("gone", TextFormatter().format(fields))
        self.assertEqual(json.loads(JsonFormatter().format(fields))["n"], 3)


class RequestLogTest(unittest.IsolatedAsyncioTestCase):
    async def test_client_values_are_escaped_in_every_line(self) -> None:
        evil_model = "m\nFORGED\r\x1b[31m\u2028"
        async with (
            sims(
                SimConfig(slots=1, profile="test", model="plain-model"),
                SimConfig(slots=1, profile="test", model=evil_model),
            ) as fleet,
            balancer_for(fleet, api_keys=[{"id": "team", "key": "sk-good"}]) as lb,
            httpx.AsyncClient(timeout=10) as http,
        ):
            good = {"Authorization": "Bearer sk-good"}
            long_path = "/" + "p" * 5000
            with self.assertLogs(level=logging.DEBUG) as captured:
                for path in (EVIL_PATH, "/v1/chat/completions%0aGET /admin%0d%0a", long_path):
                    for headers in ({}, good):  # 401 before routing, then 404 from routing
                        request = http.build_request("POST", lb.url, json={}, headers=headers)
                        request.url = request.url.copy_with(raw_path=path.encode())
                        self.assertIn((await http.send(request)).status_code, (401, 404))
                # An id the middleware does not accept is replaced; httptools refuses an ESC (400).
                raw_good = {name.encode(): value.encode() for name, value in good.items()}
                for request_id in (b"%0aFORGED", "a\u2028b".encode(), b"\x1b[31m"):
                    response = await http.post(
                        lb.url + "/v1/chat/completions",
                        json={
                            "model": "plain-model",
                            "messages": [{"role": "user", "content": "x"}],
                        },
                        headers={**raw_good, b"X-Request-Id": request_id},
                    )
                    self.assertIn(response.status_code, (200, 400))
                response = await http.post(
                    lb.url + "/v1/chat/completions",
                    json={"model": evil_model, "messages": [{"role": "user", "content": "hi"}]},
                    headers=good,
                )
                self.assertEqual(response.status_code, 200)
                # The access line is written once the exchange is released, after the answer.
                await wait_until(lambda: lb.balancer.stats.in_flight == 0)
            texts = [TextFormatter().format(record) for record in captured.records]
            entries = [json.loads(JsonFormatter().format(record)) for record in captured.records]
            for line in texts + [s for entry in entries for s in strings(entry)]:
                for char in RAW:
                    self.assertNotIn(char, line, f"{char!r} in {line!r}")
            access = [e for e in entries if e["logger"] == "llamacpp_ha.access"]
            endpoints = [e.get("endpoint") for e in access]
            self.assertIn("/" + EVIL_ESCAPED, endpoints)
            self.assertIn("/v1/chat/completionsGET /admin", endpoints)  # URL parsing drops them
            self.assertIn("/v1/chat/completions\\x0aGET /admin\\x0d\\x0a", endpoints)
            self.assertIn(long_path[:MAX_FIELD_CHARS] + "…", endpoints)
            self.assertIn("m\\x0aFORGED\\x0d\\x1b[31m\\u2028", [e.get("model") for e in access])
            self.assertTrue(any('endpoint="/' + EVIL_ESCAPED + '"' in t for t in texts))
            self.assertTrue(all(len(t) < 4096 for t in texts))
