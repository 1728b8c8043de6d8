"""Slots, as the real backends see them: accounting, affinity, and a disconnect freeing a slot.

Fleet: two llama-servers with 2 slots each, serving the larger random model (so a request is in
flight long enough to observe), behind a balancer. The truth is read from the backends
themselves: their `/slots`, their `/metrics`, their `timings.cache_n`.
"""

from __future__ import annotations

import asyncio
import time
import unittest
from typing import Any, ClassVar

import httpx
import pytest
from e2e_harness import (
    CHAT_ALIAS,
    Fleet,
    await_monitor,
    busy_slots,
    fleet,
    metric,
    wait_idle,
)

pytestmark = pytest.mark.e2e


class SlotsOnRealBackendsTest(unittest.IsolatedAsyncioTestCase):
    fleet: ClassVar[Fleet]

    @classmethod
    def setUpClass(cls) -> None:
        context = fleet(cls.__name__, model_size="large")
        cls.fleet = context.__enter__()
        cls.addClassCleanup(context.__exit__, None, None, None)
        # 4096 tokens of context per slot: room for a generation long enough to outlast a test.
        cls.fleet.add_backend("a", ctx=8192)
        cls.fleet.add_backend("b", ctx=8192)
        cls.fleet.start()

    async def asyncSetUp(self) -> None:
        self.url = self.fleet.url
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(60.0, connect=5.0))

    async def asyncTearDown(self) -> None:
        try:
            await wait_idle(self.http, self.fleet.backends, 5.0)
        finally:
            await self.http.aclose()

    async def _chat(self, content: str, max_tokens: int, **extra: Any) -> httpx.Response:
        return await self.http.post(
            f"{self.url}/v1/chat/completions",
            json={
                "model": CHAT_ALIAS,
                "messages": [{"role": "user", "content": content}],
                "max_tokens": max_tokens,
                **extra,
            },
        )

    @pytest.mark.timeout(120)
    async def test_never_more_busy_than_slots_and_nothing_deferred(self) -> None:
        total_slots = sum(s.slots for s in self.fleet.backends)
        n_requests = 3 * total_slots
        observed_busy: dict[str, int] = {s.name: 0 for s in self.fleet.backends}
        observed_deferred: dict[str, float] = {s.name: 0.0 for s in self.fleet.backends}
        observed_queue_depth = 0
        done = asyncio.Event()

        async def watch() -> None:
            nonlocal observed_queue_depth
            async with httpx.AsyncClient(timeout=5.0) as watcher:
                while not done.is_set():
                    for server in self.fleet.backends:
                        busy = await busy_slots(watcher, server)
                        deferred = await metric(watcher, server, "requests_deferred")
                        observed_busy[server.name] = max(observed_busy[server.name], busy)
                        observed_deferred[server.name] = max(
                            observed_deferred[server.name], deferred
                        )
                    monitor = (await watcher.get(f"{self.url}/monitor/data")).json()
                    observed_queue_depth = max(observed_queue_depth, monitor["queue"]["depth"])
                    await asyncio.sleep(0.02)

        watcher = asyncio.create_task(watch())
        try:
            async with asyncio.timeout(90):
                replies = await asyncio.gather(
                    *(self._chat(f"request {i}: tell a story", 64) for i in range(n_requests))
                )
        finally:
            done.set()
            await watcher

        self.assertEqual([r.status_code for r in replies], [200] * n_requests)
        self.assertTrue(all(r.json()["usage"]["completion_tokens"] == 64 for r in replies))
        for server in self.fleet.backends:
            self.assertLessEqual(observed_busy[server.name], server.slots, observed_busy)
            self.assertGreater(observed_busy[server.name], 0, f"{server.name} never used")
        self.assertEqual(observed_deferred, {s.name: 0.0 for s in self.fleet.backends})
        self.assertGreater(observed_queue_depth, 0, "the excess never waited in our queue")
        for server in self.fleet.backends:
            self.assertEqual(await metric(self.http, server, "requests_deferred"), 0.0)

    @pytest.mark.timeout(90)
    async def test_second_turn_reuses_the_cache_of_the_backend_that_served_the_first(
        self,
    ) -> None:
        # Several conversations, their second turns in another order than their first, so that
        # round-robin alone would send some second turns to the other backend (checked: with
        # `--routing round-robin` this test fails). Each first message is long and unique: a
        # second turn on the wrong backend could only reuse the few tokens of "<bos>user: ".
        conversations: list[list[dict[str, str]]] = [
            [
                {
                    "role": "user",
                    "content": f"Conversation {i}. " + f"Topic {i} is interesting. " * 12,
                }
            ]
            for i in range(5)
        ]
        first_prompt_tokens: list[int] = []
        for messages in conversations:
            reply = await self._chat_messages(messages, 8)
            first_prompt_tokens.append(reply["usage"]["prompt_tokens"])
            messages.append(
                {"role": "assistant", "content": reply["choices"][0]["message"]["content"]}
            )
            messages.append({"role": "user", "content": "And then?"})
        for i in (3, 0, 4, 2, 1):
            messages, first_tokens = conversations[i], first_prompt_tokens[i]
            reply = await self._chat_messages(messages, 8)
            cache_n = reply["timings"]["cache_n"]
            self.assertGreater(cache_n, 0, reply["timings"])
            self.assertGreaterEqual(cache_n, first_tokens - 1, (first_tokens, reply["timings"]))
            self.assertEqual(
                reply["usage"]["prompt_tokens_details"]["cached_tokens"], cache_n, reply["usage"]
            )

    async def _chat_messages(
        self, messages: list[dict[str, str]], max_tokens: int
    ) -> dict[str, Any]:
        response = await self.http.post(
            f"{self.url}/v1/chat/completions",
            json={"model": CHAT_ALIAS, "messages": messages, "max_tokens": max_tokens},
        )
        self.assertEqual(response.status_code, 200, response.text)
        body: dict[str, Any] = response.json()
        return body

    @pytest.mark.timeout(60)
    async def test_client_disconnect_mid_stream_frees_the_real_slot_within_a_second(
        self,
    ) -> None:
        # 3000 tokens take this model several seconds: if the slot frees within a second of the
        # client leaving, the backend stopped generating because the balancer hung up.
        body = {
            "model": CHAT_ALIAS,
            "messages": [{"role": "user", "content": "Write a very long essay."}],
            "max_tokens": 3000,
            "stream": True,
        }
        async with (
            asyncio.timeout(20),
            httpx.AsyncClient(timeout=20.0) as client,
            client.stream("POST", f"{self.url}/v1/chat/completions", json=body) as response,
        ):
            self.assertEqual(response.status_code, 200)
            # Not `break` out of `aiter_lines()`: finalizing that generator already closes the
            # connection, and the slot must be seen busy while the client is still connected.
            lines = response.aiter_lines()
            chunks = 0
            while chunks < 5:
                if (await anext(lines)).startswith("data: "):
                    chunks += 1
            busy = {s.name: await busy_slots(self.http, s) for s in self.fleet.backends}
            self.assertEqual(sum(busy.values()), 1, busy)
            await response.aclose()
        # The client's connection is closed, mid-stream.
        left_at = time.monotonic()
        while True:
            busy = {s.name: await busy_slots(self.http, s) for s in self.fleet.backends}
            if not any(busy.values()):
                break
            self.assertLess(
                time.monotonic() - left_at, 1.0, f"slot still busy 1 s after disconnect: {busy}"
            )
            await asyncio.sleep(0.02)
        await await_monitor(
            self.http,
            self.url,
            lambda data: sum(b["in_flight"] for b in data["backends"]) == 0,
            timeout_s=1.0,
            what="the balancer to release the slot as well",
        )
