"""What a client receives when a backend breaks a stream: whole events, then an error event of
its own, and never a truncated stream passed off as complete."""

from __future__ import annotations

import json
import unittest
from typing import Any

import httpx
import openai

from hostile import HostileBackend, Script, chat_chunks, sse
from serving import balancer_for

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10, "stream": True}


def data_lines(body: bytes) -> list[Any]:
    """Every `data:` line's payload, parsed: it fails the test if one is not JSON."""
    return [
        line[5:].strip().decode() if line[5:].strip() == b"[DONE]" else json.loads(line[5:])
        for line in body.splitlines()
        if line.startswith(b"data:")
    ]


class StreamIntegrityTest(unittest.IsolatedAsyncioTestCase):
    async def asyncSetUp(self) -> None:
        self.http = httpx.AsyncClient(timeout=10)
        self.addAsyncCleanup(self.http.aclose)

    async def stream(
        self, backend: HostileBackend, path: str, body: dict[str, object], status: int = 200
    ) -> bytes:
        async with balancer_for([], backends=[backend.url], max_attempts=1) as lb:
            self.lb = lb
            response = await self.http.post(lb.url + path, json=body)
            self.assertEqual(response.status_code, status)
            return response.content

    async def test_a_cut_in_the_middle_of_an_event_never_reaches_the_client(self) -> None:
        body = sse(*chat_chunks(4))
        first = len(sse(*chat_chunks(1, finish=False), done=False))
        for stop_at in (first + 1, first + 20, 2 * first + 30):
            async with HostileBackend([Script(body, stop_at=stop_at)]) as backend:
                received = await self.stream(backend, "/v1/chat/completions", CHAT)
            events = data_lines(received)  # every line parses, whatever the cut
            self.assertIn("error", events[-1], stop_at)
            self.assertNotIn("[DONE]", events)
            self.assertEqual(received.count(b'data: {"error"'), 1)

    async def test_a_cut_before_the_first_whole_event_is_a_clean_502(self) -> None:
        body = sse(*chat_chunks(4))
        async with HostileBackend([Script(body, stop_at=7)]) as backend:
            received = await self.stream(backend, "/v1/chat/completions", CHAT, status=502)
        self.assertEqual(json.loads(received)["error"]["code"], "bad_gateway")

    async def test_the_openai_client_sees_an_api_error_not_broken_json(self) -> None:
        body = sse(*chat_chunks(4))
        async with (
            HostileBackend([Script(body, stop_at=len(body) // 2)]) as backend,
            balancer_for([], backends=[backend.url], max_attempts=1) as lb,
        ):
            client = openai.AsyncOpenAI(base_url=lb.url + "/v1", api_key="x", max_retries=0)
            self.addAsyncCleanup(client.close)
            stream = await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], stream=True
            )
            with self.assertRaises(openai.APIError) as caught:
                async for _ in stream:
                    pass
            self.assertNotIsInstance(caught.exception, openai.APIConnectionError)

    async def test_a_clean_end_without_done_is_a_failure(self) -> None:
        truncated = sse(*chat_chunks(2, finish=False), done=False)
        for framing in ("chunked", "close"):
            async with HostileBackend([Script(truncated, framing=framing)]) as backend:
                received = await self.stream(backend, "/v1/chat/completions", CHAT)
                stats = self.lb.balancer.stats
            events = data_lines(received)
            self.assertEqual(len(events), 3, framing)  # two tokens, then our error
            error = events[-1]["error"]
            self.assertIn("[DONE]", error["message"], framing)
            self.assertEqual((stats.succeeded, stats.failed), (0, 1), framing)

    async def test_a_native_stream_without_stop_is_a_failure(self) -> None:
        events = [{"content": "a", "stop": False}, {"content": "b", "stop": False}]
        async with HostileBackend([Script(sse(*events, done=False))]) as backend:
            received = await self.stream(backend, "/completion", {"prompt": "p", "stream": True})
        self.assertIn("error", data_lines(received)[-1])
        complete = [*events, {"content": "", "stop": True}]
        async with HostileBackend([Script(sse(*complete, done=False))]) as backend:
            received = await self.stream(backend, "/completion", {"prompt": "p", "stream": True})
        self.assertEqual(data_lines(received), complete)

    async def test_an_event_that_is_not_json_is_the_backends_fault(self) -> None:
        chunks = chat_chunks(2)
        body = sse(chunks[0], '{"choices": [', chunks[1])
        async with HostileBackend([Script(body, write_size=4096)]) as backend:
            received = await self.stream(backend, "/v1/chat/completions", CHAT)
            stats = self.lb.balancer.stats
        events = data_lines(received)
        self.assertEqual(events[0], chunks[0])
        self.assertIn("not JSON", events[-1]["error"]["message"])
        self.assertNotIn("[DONE]", events)
        self.assertEqual(stats.failed, 1)

    async def test_a_whole_stream_passes_unchanged(self) -> None:
        body = sse(*chat_chunks(3))
        for size in (1, 7, 4096):
            async with HostileBackend([Script(body, write_size=size)]) as backend:
                received = await self.stream(backend, "/v1/chat/completions", CHAT)
            self.assertEqual(received, body, size)
