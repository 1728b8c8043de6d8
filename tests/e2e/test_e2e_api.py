"""The clients people use, through the balancer, against real llama-servers.

Fleet: two chat backends (alias tiny-llama, 2 slots each) and one embedding backend
(alias tiny-embed, `--embeddings --pooling mean`), behind a balancer that requires an API key.
The model never samples end-of-generation, so a request always runs to its token limit.
"""

from __future__ import annotations

import json
import unittest
from typing import ClassVar

import anthropic
import httpx
import openai
import pytest
from e2e_harness import CHAT_ALIAS, EMBED_ALIAS, Fleet, fleet, wait_idle

pytestmark = pytest.mark.e2e

API_KEY = "e2e-secret-key"
N_TOKENS = 8


# The fleet serves two models, so llama-server's native endpoints name one as well (the balancer
# routes by it; llama-server ignores it).


class ClientsThroughBalancerTest(unittest.IsolatedAsyncioTestCase):
    fleet: ClassVar[Fleet]

    @classmethod
    def setUpClass(cls) -> None:
        context = fleet(cls.__name__)
        cls.fleet = context.__enter__()
        cls.addClassCleanup(context.__exit__, None, None, None)
        cls.fleet.add_backend("chat-a")
        cls.fleet.add_backend("chat-b")
        cls.fleet.add_backend(
            "embed", alias=EMBED_ALIAS, extra_args=["--embeddings", "--pooling", "mean"]
        )
        cls.fleet.start(balancer_args=["--api-key", API_KEY])

    async def asyncSetUp(self) -> None:
        self.url = self.fleet.url
        self.http = httpx.AsyncClient(timeout=20.0, headers={"Authorization": f"Bearer {API_KEY}"})
        self.openai = openai.AsyncOpenAI(
            base_url=f"{self.url}/v1", api_key=API_KEY, max_retries=0, timeout=20.0
        )

    async def asyncTearDown(self) -> None:
        await self.openai.close()
        try:
            await wait_idle(self.http, self.fleet.backends, 2.0)
        finally:
            await self.http.aclose()

    async def test_chat_completion(self) -> None:
        reply = await self.openai.chat.completions.create(
            model=CHAT_ALIAS,
            messages=[{"role": "user", "content": "Say something."}],
            max_tokens=N_TOKENS,
        )
        self.assertEqual(reply.object, "chat.completion")
        self.assertEqual(reply.choices[0].message.role, "assistant")
        self.assertIsInstance(reply.choices[0].message.content, str)
        self.assertEqual(reply.choices[0].finish_reason, "length")
        assert reply.usage is not None
        self.assertEqual(reply.usage.completion_tokens, N_TOKENS)
        self.assertGreater(reply.usage.prompt_tokens, 0)

    async def test_chat_completion_streaming(self) -> None:
        stream = await self.openai.chat.completions.create(
            model=CHAT_ALIAS,
            messages=[{"role": "user", "content": "Stream something."}],
            max_tokens=N_TOKENS,
            stream=True,
        )
        pieces: list[str] = []
        finish: list[str] = []
        async for chunk in stream:
            self.assertEqual(chunk.object, "chat.completion.chunk")
            self.assertIsNone(chunk.usage)
            for choice in chunk.choices:
                pieces.append(choice.delta.content or "")
                if choice.finish_reason:
                    finish.append(choice.finish_reason)
        self.assertEqual(finish, ["length"])
        self.assertTrue("".join(pieces))

    async def test_chat_streaming_include_usage(self) -> None:
        stream = await self.openai.chat.completions.create(
            model=CHAT_ALIAS,
            messages=[{"role": "user", "content": "Count your tokens."}],
            max_tokens=N_TOKENS,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        last = chunks[-1]
        self.assertEqual(last.choices, [])
        assert last.usage is not None
        self.assertEqual(last.usage.completion_tokens, N_TOKENS)
        self.assertGreater(last.usage.prompt_tokens, 0)
        self.assertTrue(all(chunk.usage is None for chunk in chunks[:-1]))

    async def test_completions(self) -> None:
        reply = await self.openai.completions.create(
            model=CHAT_ALIAS, prompt="Once upon a time", max_tokens=N_TOKENS
        )
        self.assertEqual(reply.object, "text_completion")
        self.assertIsInstance(reply.choices[0].text, str)
        self.assertEqual(reply.choices[0].finish_reason, "length")
        assert reply.usage is not None
        self.assertEqual(reply.usage.completion_tokens, N_TOKENS)

    async def test_completions_streaming(self) -> None:
        stream = await self.openai.completions.create(
            model=CHAT_ALIAS, prompt="Once upon a time", max_tokens=N_TOKENS, stream=True
        )
        texts = [chunk.choices[0].text async for chunk in stream if chunk.choices]
        self.assertTrue("".join(texts))

    async def test_embeddings(self) -> None:
        reply = await self.openai.embeddings.create(
            model=EMBED_ALIAS, input=["hello world", "the cat sat"]
        )
        self.assertEqual([item.index for item in reply.data], [0, 1])
        for item in reply.data:
            self.assertEqual(len(item.embedding), 64)
            self.assertTrue(all(isinstance(x, float) for x in item.embedding))
        self.assertNotEqual(reply.data[0].embedding, reply.data[1].embedding)

    async def test_models_list_is_the_union_with_aliases(self) -> None:
        models = await self.openai.models.list()
        ids = sorted(model.id for model in models.data)
        self.assertEqual(ids, sorted([CHAT_ALIAS, EMBED_ALIAS]))
        for model in models.data:
            extra = model.model_extra or {}
            self.assertIn(model.id, extra.get("aliases", [model.id]))

    async def test_anthropic_messages(self) -> None:
        client = anthropic.AsyncAnthropic(
            base_url=self.url, api_key=API_KEY, max_retries=0, timeout=20.0
        )
        try:
            message = await client.messages.create(
                model=CHAT_ALIAS,
                max_tokens=N_TOKENS,
                messages=[{"role": "user", "content": "Hello, Claude-shaped API."}],
            )
            self.assertEqual(message.type, "message")
            self.assertEqual(message.role, "assistant")
            self.assertEqual(message.content[0].type, "text")
            self.assertEqual(message.stop_reason, "max_tokens")
            self.assertEqual(message.usage.output_tokens, N_TOKENS)

            async with client.messages.stream(
                model=CHAT_ALIAS,
                max_tokens=N_TOKENS,
                messages=[{"role": "user", "content": "Now stream it."}],
            ) as stream:
                text = await stream.get_final_text()
                final = await stream.get_final_message()
            self.assertTrue(text)
            self.assertEqual(final.stop_reason, "max_tokens")
        finally:
            await client.close()

    async def test_tokenize_and_detokenize(self) -> None:
        response = await self.http.post(
            f"{self.url}/tokenize", json={"content": "the cat sat", "model": CHAT_ALIAS}
        )
        self.assertEqual(response.status_code, 200, response.text)
        tokens = response.json()["tokens"]
        self.assertTrue(tokens)
        self.assertTrue(all(isinstance(t, int) for t in tokens))
        response = await self.http.post(
            f"{self.url}/detokenize", json={"tokens": tokens, "model": CHAT_ALIAS}
        )
        self.assertEqual(response.status_code, 200, response.text)
        self.assertEqual(response.json()["content"], "the cat sat")

    async def test_native_completion(self) -> None:
        response = await self.http.post(
            f"{self.url}/completion",
            json={"prompt": "Hello", "n_predict": N_TOKENS, "model": CHAT_ALIAS},
        )
        self.assertEqual(response.status_code, 200, response.text)
        body = response.json()
        self.assertIsInstance(body["content"], str)
        self.assertEqual(body["tokens_predicted"], N_TOKENS)
        self.assertIn("cache_n", body["timings"])

    async def test_native_completion_streaming(self) -> None:
        events: list[dict[str, object]] = []
        async with self.http.stream(
            "POST",
            f"{self.url}/completion",
            json={"prompt": "Hello", "n_predict": N_TOKENS, "stream": True, "model": CHAT_ALIAS},
        ) as response:
            self.assertEqual(response.status_code, 200)
            self.assertTrue(response.headers["content-type"].startswith("text/event-stream"))
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line.removeprefix("data: ")))
        self.assertTrue(events)
        self.assertIs(events[-1]["stop"], True)
        self.assertEqual(events[-1]["tokens_predicted"], N_TOKENS)

    async def test_wrong_api_key_is_refused(self) -> None:
        client = openai.AsyncOpenAI(
            base_url=f"{self.url}/v1", api_key="wrong", max_retries=0, timeout=10.0
        )
        try:
            with self.assertRaises(openai.AuthenticationError):
                await client.models.list()
        finally:
            await client.close()

    async def test_prompt_longer_than_the_slot_context_gets_llama_servers_400(self) -> None:
        # Each slot has 2048 / 2 = 1024 tokens of context; this prompt is ~4,500 tokens.
        body = {
            "model": CHAT_ALIAS,
            "messages": [{"role": "user", "content": "abc " * 1125}],
            "max_tokens": N_TOKENS,
        }
        through = await self.http.post(f"{self.url}/v1/chat/completions", json=body)
        direct = await self.http.post(
            f"{self.fleet.backends[0].url}/v1/chat/completions", json=body
        )
        self.assertEqual(direct.status_code, 400, direct.text)
        self.assertEqual(through.status_code, 400, through.text)
        self.assertEqual(through.json(), direct.json())
        self.assertEqual(through.json()["error"]["type"], "exceed_context_size_error")

        with self.assertRaises(openai.BadRequestError) as caught:
            await self.openai.chat.completions.create(
                model=CHAT_ALIAS,
                messages=[{"role": "user", "content": "abc " * 1125}],
                max_tokens=N_TOKENS,
            )
        self.assertIn("exceeds the available context size", str(caught.exception))
