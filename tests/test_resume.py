"""A stream whose backend dies goes on from another backend, unseen by the client.

Two simulated llama-servers; the first is told to crash after some chunks of a stream. The
client is the official `openai` client, streaming; it must get one uninterrupted answer.
"""

from __future__ import annotations

import unittest
from typing import Any

import httpx
from openai import AsyncOpenAI

from llamacpp_sim import Fault, SimConfig
from serving import Served, balancer_for, sims
from sim_support import json_body, wait_until

ADMIN = {"Authorization": "Bearer admin-secret"}


def _chats(sim: Any) -> list[Any]:
    paths = ("/v1/chat/completions", "/v1/completions")
    return [json_body(r) for r in sim.requests if r.path in paths]


class ResumeTest(unittest.IsolatedAsyncioTestCase):
    async def start_on_first(self, lb: Served, http: httpx.AsyncClient, second: str) -> None:
        """The second backend drained, so that the stream starts on the first."""
        response = await http.post(f"{lb.url}/admin/backends/{second}/drain", headers=ADMIN)
        self.assertEqual(response.status_code, 200)

    async def test_a_chat_stream_goes_on_from_another_backend(self) -> None:
        configs = [SimConfig(slots=2, profile="gpu-8b") for _ in range(2)]
        async with (
            sims(*configs) as (first, second),
            balancer_for([first, second], admin_keys=["admin-secret"]) as lb,
            httpx.AsyncClient(timeout=10) as http,
        ):
            second_name = lb.balancer.registry.backends[1].name
            await self.start_on_first(lb, http, second_name)
            first.set_fault(Fault(crash_after_chunks=20))
            client = AsyncOpenAI(base_url=lb.url + "/v1", api_key="none")
            self.addAsyncCleanup(client.close)
            stream = await client.chat.completions.create(
                model="any",
                messages=[{"role": "user", "content": "Tell me a long story."}],
                max_tokens=40,
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = []
            async for chunk in stream:
                chunks.append(chunk)
                if len(chunks) == 1:  # under way on the first: the second may take over
                    await http.post(f"{lb.url}/admin/backends/{second_name}/undrain", headers=ADMIN)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [
                c.choices[0].finish_reason
                for c in chunks
                if c.choices and c.choices[0].finish_reason
            ]
            usage = chunks[-1].usage
        self.assertEqual(len({c.id for c in chunks}), 1)
        self.assertEqual(finish, ["length"])
        assert usage is not None
        self.assertEqual(usage.completion_tokens, 40)
        # The second backend continued the first's answer: the delivered text as a final
        # assistant message, and the rest of the token budget.
        continued = _chats(second)
        self.assertEqual(len(continued), 1)
        last = continued[0]["messages"][-1]
        self.assertEqual(last["role"], "assistant")
        self.assertTrue(text.startswith(last["content"]))
        self.assertGreater(len(last["content"]), 0)
        self.assertGreater(continued[0]["max_tokens"], 0)
        self.assertLess(continued[0]["max_tokens"], 40)
        self.assertEqual(lb.balancer.stats.resumed, 1)
        await wait_until(lambda: all(b.slots.in_flight == 0 for b in lb.balancer.registry.backends))

    async def test_a_completions_stream_goes_on_with_the_prompt_extended(self) -> None:
        configs = [SimConfig(slots=2, profile="gpu-8b") for _ in range(2)]
        for path, field in (("/v1/completions", "max_tokens"), ("/completion", "n_predict")):
            async with (
                sims(*configs) as (first, second),
                balancer_for([first, second], admin_keys=["admin-secret"]) as lb,
                httpx.AsyncClient(timeout=10) as http,
            ):
                second_name = lb.balancer.registry.backends[1].name
                await self.start_on_first(lb, http, second_name)
                first.set_fault(Fault(crash_after_chunks=20))
                body = {"prompt": "Once upon a time", field: 40, "stream": True}
                events = []
                async with http.stream("POST", lb.url + path, json=body) as response:
                    async for line in response.aiter_lines():
                        if line.startswith("data: "):
                            events.append(line[6:])
                            if len(events) == 1:
                                await http.post(
                                    f"{lb.url}/admin/backends/{second_name}/undrain", headers=ADMIN
                                )
                continued = [json_body(r) for r in second.requests if r.path == path]
            with self.subTest(path=path):
                self.assertNotIn('"error"', "".join(events))
                if path == "/v1/completions":
                    self.assertEqual(events[-1], "[DONE]")
                self.assertEqual(len(continued), 1)
                self.assertTrue(continued[0]["prompt"].startswith("Once upon a time"))
                self.assertGreater(len(continued[0]["prompt"]), len("Once upon a time"))
                self.assertLess(continued[0][field], 40)

    async def test_a_resume_that_also_fails_ends_with_the_error_event(self) -> None:
        configs = [SimConfig(slots=2, profile="gpu-8b") for _ in range(2)]
        async with (
            sims(*configs) as (first, second),
            balancer_for([first, second], admin_keys=["admin-secret"]) as lb,
            httpx.AsyncClient(timeout=10) as http,
        ):
            second_name = lb.balancer.registry.backends[1].name
            await self.start_on_first(lb, http, second_name)
            first.set_fault(Fault(crash_after_chunks=20))
            second.set_fault(Fault(crash_after_chunks=4))
            body = {
                "messages": [{"role": "user", "content": "Tell me a long story."}],
                "max_tokens": 40,
                "stream": True,
            }
            events = []
            async with http.stream("POST", lb.url + "/v1/chat/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        if len(events) == 1:
                            await http.post(
                                f"{lb.url}/admin/backends/{second_name}/undrain", headers=ADMIN
                            )
        self.assertNotIn("[DONE]", events)
        self.assertIn('"error"', events[-1])
        self.assertEqual(len(_chats(second)), 1)  # resumed once, not twice
        self.assertEqual(lb.balancer.stats.resumed, 1)

    async def test_no_resume_when_it_is_off(self) -> None:
        configs = [SimConfig(slots=2, profile="gpu-8b") for _ in range(2)]
        async with (
            sims(*configs) as (first, second),
            balancer_for([first, second], admin_keys=["admin-secret"], resume_streams=False) as lb,
            httpx.AsyncClient(timeout=10) as http,
        ):
            second_name = lb.balancer.registry.backends[1].name
            await self.start_on_first(lb, http, second_name)
            await http.post(f"{lb.url}/admin/backends/{second_name}/undrain", headers=ADMIN)
            await self.start_on_first(lb, http, second_name)
            first.set_fault(Fault(crash_after_chunks=6))
            body = {
                "messages": [{"role": "user", "content": "x"}],
                "max_tokens": 40,
                "stream": True,
            }
            async with http.stream("POST", lb.url + "/v1/chat/completions", json=body) as response:
                lines = [line async for line in response.aiter_lines()]
        self.assertIn('"error"', [x for x in lines if x.startswith("data: ")][-1])
        self.assertEqual(_chats(second), [])


if __name__ == "__main__":
    unittest.main()
