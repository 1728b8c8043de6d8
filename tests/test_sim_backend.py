"""The simulator alone, over real sockets: shapes, cache, scheduling, disconnects, loading."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import anthropic
import openai

from llamacpp_sim import SimBackend, SimConfig
from sim_support import (
    STEP_TIMEOUT_S,
    SimTestCase,
    chat_body,
    key_shape,
    missing_keys,
    read_frames,
    sample,
    sample_json,
    sse_payloads,
    wait_until,
)


class ShapesTest(SimTestCase):
    def assert_shape(self, sample_value: Any, ours: Any) -> None:
        self.assertEqual(missing_keys(key_shape(sample_value), ours), [])

    async def test_simple_endpoints_match_samples(self) -> None:
        self.assertEqual(await self.get_json("/health"), sample_json("health.txt"))
        props = await self.get_json("/props")
        self.assert_shape(sample_json("props.txt"), props)
        self.assertEqual(props["total_slots"], 2)
        self.assertEqual(props["default_generation_settings"]["n_ctx"], 4096)
        self.assertEqual(
            await self.get_json("/slots"),
            [
                {"id": i, "n_ctx": 4096, "speculative": False, "is_processing": False}
                for i in (0, 1)
            ],
        )
        models = await self.get_json("/v1/models")
        self.assert_shape(sample_json("models.txt"), models)
        self.assertEqual(models["data"][0]["id"], "sim-model")
        tokens = await self.post("/tokenize", {"content": "hello world"})
        self.assert_shape(sample_json("tokenize.txt"), json.loads(tokens[1]))
        async with self.http.get("/metrics") as resp:
            ours = {line.split()[0] for line in (await resp.text()).splitlines() if line[:1] != "#"}
        theirs = {
            line.split()[0] for line in sample("metrics.txt")[2].splitlines() if line[:1] != "#"
        }
        self.assertEqual(theirs - ours, set())

    async def test_generation_endpoints_match_samples(self) -> None:
        messages = [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "hello there"},
        ]
        status, text, resp = await self.post(
            "/v1/chat/completions", chat_body(messages, max_tokens=8)
        )
        self.assertEqual(status, 200)
        self.assertEqual(resp.headers["Content-Type"], "application/json; charset=utf-8")
        chat = json.loads(text)
        self.assert_shape(sample_json("chat.txt"), chat)
        self.assertEqual(chat["usage"]["completion_tokens"], 8)
        self.assertEqual(chat["choices"][0]["finish_reason"], "length")

        body = chat_body(
            messages, max_tokens=4, stream=True, stream_options={"include_usage": True}
        )
        status, text, resp = await self.post("/v1/chat/completions", body)
        self.assertEqual(resp.headers["Content-Type"], "text/event-stream")
        ours = sse_payloads(text)
        theirs = sse_payloads(sample("chat-stream.txt")[2])
        self.assertEqual(len(ours), len(theirs))
        self.assertEqual(ours[-1], "[DONE]")
        for mine, real in zip(ours[:-1], theirs[:-1], strict=True):
            self.assertEqual(key_shape(json.loads(mine)), key_shape(json.loads(real)))
        self.assertEqual(
            json.loads(ours[-2])["usage"]["prompt_tokens_details"]["cached_tokens"],
            chat["usage"]["prompt_tokens"] - 1,
        )

        status, text, _ = await self.post(
            "/completion", {"prompt": "The quick brown fox", "n_predict": 6, "id_slot": 1}
        )
        self.assert_shape(sample_json("completion.txt"), json.loads(text))
        status, text, _ = await self.post(
            "/completion", {"prompt": "The quick brown fox", "n_predict": 3, "stream": True}
        )
        ours = sse_payloads(text)
        theirs = sse_payloads(sample("completion-stream.txt")[2])
        self.assertEqual(len(ours), 4)
        self.assert_shape(json.loads(theirs[0]), json.loads(ours[0]))
        self.assert_shape(json.loads(theirs[-1]), json.loads(ours[-1]))
        status, text, _ = await self.post(
            "/v1/completions", {"prompt": "The quick brown fox", "max_tokens": 5}
        )
        self.assert_shape(sample_json("v1-completions.txt"), json.loads(text))
        status, text, _ = await self.post(
            "/v1/embeddings", {"input": ["hello", "world"], "model": "e"}
        )
        self.assert_shape(sample_json("embeddings.txt"), json.loads(text))
        status, text, _ = await self.post(
            "/v1/messages",
            {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]},
        )
        self.assert_shape(sample_json("messages-anthropic.txt"), json.loads(text))
        self.assertEqual(json.loads(text)["stop_reason"], "max_tokens")

    async def test_errors_match_samples(self) -> None:
        async with self.http.post(
            "/v1/chat/completions", data='{"messages":[{"role":"user"'
        ) as resp:
            self.assertEqual(resp.status, 400)
            self.assert_shape(sample_json("bad-json.txt"), await resp.json())
        long_text = "word " * 5000
        status, text, _ = await self.post(
            "/v1/chat/completions", chat_body([{"role": "user", "content": long_text}])
        )
        self.assertEqual(status, 400)
        error = json.loads(text)["error"]
        self.assertEqual(error["type"], "exceed_context_size_error")
        self.assertEqual(error["n_ctx"], 4096)
        self.assertGreater(error["n_prompt_tokens"], 4096)
        self.assert_shape(sample_json("too-long.txt"), json.loads(text))
        self.assertEqual(self.sim.requests[-1].outcome, "error")

    async def test_slots_after_use_match_busy_sample(self) -> None:
        for slot in (0, 1):
            await self.post("/completion", {"prompt": "hi", "n_predict": 2, "id_slot": slot})
        slots = await self.get_json("/slots")
        self.assert_shape(sample_json("slots-busy.txt"), slots)
        self.assertEqual([s["is_processing"] for s in slots], [False, False])

    async def test_every_request_is_recorded(self) -> None:
        await self.get_json("/health")
        await self.post("/v1/chat/completions", chat_body([{"role": "user", "content": "x"}]))
        health, chat = self.sim.requests
        self.assertEqual(
            (health.method, health.path, health.outcome), ("GET", "/health", "completed")
        )
        assert chat.json is not None
        self.assertEqual(chat.json["messages"][0]["content"], "x")
        # Never-used slots tie on least recently used, and llama-server takes the last of them.
        self.assertEqual(chat.slot_id, 1)
        self.assertIsNotNone(chat.started_at)
        assert chat.started_at is not None
        assert chat.ended_at is not None
        self.assertLessEqual(chat.arrived_at, chat.started_at)
        self.assertLessEqual(chat.started_at, chat.ended_at)
        self.assertIn("Content-Type", chat.headers)


class CacheTimingTest(SimTestCase):
    # A real profile, run 25x faster: a cold 600-token prompt takes 3 model seconds. The
    # prompts below are long enough (a cold one ~0.45 s here) that a loaded machine's delays,
    # tens of milliseconds on a cached turn, do not decide the ratio.
    config = SimConfig(slots=2, profile="cpu-1b", time_scale=25.0)

    async def ttft(self, messages: list[dict[str, str]]) -> tuple[float, str, dict[str, Any]]:
        body = chat_body(
            messages, max_tokens=4, stream=True, stream_options={"include_usage": True}
        )
        started = time.monotonic()
        first: float | None = None
        reply = ""
        async with self.http.post("/v1/chat/completions", json=body) as resp:
            frames = []
            async for line in resp.content:
                text = line.decode().strip()
                if not text.startswith("data: ") or text == "data: [DONE]":
                    continue
                frame = json.loads(text[6:])
                frames.append(frame)
                choices = frame["choices"]
                if choices and choices[0]["delta"].get("content"):
                    first = first or time.monotonic()
                    reply += choices[0]["delta"]["content"]
        assert first is not None
        return first - started, reply, frames[-1]

    async def test_follow_up_turn_hits_cache_and_is_faster(self) -> None:
        system = {"role": "system", "content": "lorem ipsum dolor sit " * 450}
        turn1 = [system, {"role": "user", "content": "first question"}]
        _ttft1, reply, last1 = await self.ttft(turn1)
        turn2 = [
            *turn1,
            {"role": "assistant", "content": reply},
            {"role": "user", "content": "and then"},
        ]
        ttft2, _, last2 = await self.ttft(turn2)
        n_prompt2 = last2["usage"]["prompt_tokens"]
        self.assertEqual(last1["timings"]["cache_n"], 0)
        self.assertGreater(last2["timings"]["cache_n"], last1["usage"]["prompt_tokens"])
        self.assertEqual(
            last2["usage"]["prompt_tokens_details"]["cached_tokens"], last2["timings"]["cache_n"]
        )
        # A cold prompt of the same length as turn 2 pays the whole prefill.
        other = {"role": "system", "content": "magna sed nunc et " * 450}
        cold = [other, *turn2[1:]]
        ttft_cold, _, last_cold = await self.ttft(cold)
        self.assertEqual(last_cold["usage"]["prompt_tokens"], n_prompt2)
        self.assertEqual(last_cold["timings"]["cache_n"], 0)
        self.assertLess(ttft2 * 4, ttft_cold)
        self.assertGreater(ttft_cold, 0.8 * n_prompt2 / 200 / 25)

    async def test_cache_ram_restores_evicted_state(self) -> None:
        await self.sim.aclose()
        self.sim = SimBackend(SimConfig(slots=1, profile="test", cache_ram_tokens=10_000))
        await self.sim.start()
        await self.http.close()
        self.http = aiohttp.ClientSession(base_url=self.sim.url)
        a = [{"role": "user", "content": "alpha " * 100}]
        b = [{"role": "user", "content": "beta " * 100}]
        for messages in (a, b):
            await self.post("/v1/chat/completions", chat_body(messages, max_tokens=2))
        _, text, _ = await self.post("/v1/chat/completions", chat_body(a, max_tokens=2))
        timings = json.loads(text)["timings"]
        self.assertGreater(timings["cache_n"], 90)
        assert self.sim.engine.host_cache is not None
        self.assertEqual(self.sim.engine.host_cache.hits, 1)


class SchedulingTest(SimTestCase):
    async def open_stream(self, path: str, body: dict[str, Any]) -> aiohttp.ClientResponse:
        resp = await self.http.post(path, json={**body, "stream": True})
        self.assertEqual(resp.status, 200)
        return resp

    async def test_extra_request_is_deferred_until_a_slot_frees(self) -> None:
        long = chat_body([{"role": "user", "content": "tell me everything"}], max_tokens=3000)
        first = await self.open_stream("/v1/chat/completions", long)
        second = await self.open_stream("/v1/chat/completions", long)
        self.assertEqual(self.sim.processing, 2)
        third_task = asyncio.create_task(
            self.http.post("/v1/chat/completions", json={**long, "stream": True})
        )
        await wait_until(lambda: self.sim.deferred == 1)
        async with self.http.get("/metrics") as resp:
            metrics = await resp.text()
        self.assertIn("llamacpp:requests_deferred 1\n", metrics)
        self.assertIn("llamacpp:requests_processing 2\n", metrics)
        async with self.http.get("/slots?fail_on_no_slot=1") as resp:
            self.assertEqual(resp.status, 503)
            self.assertEqual((await resp.json())["error"]["message"], "no slot available")
        third_rec = self.sim.requests[2]
        self.assertIsNone(third_rec.started_at)
        # Closing the first client frees its slot at once; the deferred request takes it.
        first_rec = self.sim.requests[0]
        first.close()
        async with asyncio.timeout(STEP_TIMEOUT_S):
            await first_rec.done.wait()
        self.assertEqual(first_rec.outcome, "client_closed")
        await wait_until(lambda: self.sim.deferred == 0 and self.sim.processing == 2, 0.5)
        self.assertEqual(third_rec.slot_id, first_rec.slot_id)
        self.assertEqual(self.sim.max_concurrent, 2)
        async with asyncio.timeout(STEP_TIMEOUT_S):
            third = await third_task
        for resp in (second, third):
            resp.close()
        await wait_until(lambda: self.sim.processing == 0)

    async def test_client_disconnect_mid_stream_frees_slot_promptly(self) -> None:
        body = {"prompt": "go on", "n_predict": 3000}
        resp = await self.open_stream("/completion", body)
        await read_frames(resp, 3)
        rec = self.sim.requests[0]
        self.assertEqual(self.sim.processing, 1)
        closed_at = time.monotonic()
        resp.close()
        async with asyncio.timeout(STEP_TIMEOUT_S):
            await rec.done.wait()
        self.assertEqual(rec.outcome, "client_closed")
        self.assertEqual(self.sim.processing, 0)
        assert rec.ended_at is not None
        self.assertLess(rec.ended_at - closed_at, 0.1)

    async def test_disconnect_while_deferred_leaves_queue(self) -> None:
        await self.sim.aclose()
        self.sim = SimBackend(SimConfig(slots=1, profile="test"))
        await self.sim.start()
        await self.http.close()
        self.http = aiohttp.ClientSession(base_url=self.sim.url)
        busy = await self.open_stream("/completion", {"prompt": "a", "n_predict": 3000})
        waiting = asyncio.create_task(self.http.post("/completion", json={"prompt": "b"}))
        await wait_until(lambda: self.sim.deferred == 1)
        waiting.cancel()
        await wait_until(lambda: self.sim.deferred == 0)
        self.assertEqual(self.sim.requests[1].outcome, "client_closed")
        busy.close()

    async def test_id_slot_is_honoured(self) -> None:
        for slot in (1, 0, 1):
            status, text, _ = await self.post(
                "/completion", {"prompt": "same prompt", "n_predict": 2, "id_slot": slot}
            )
            self.assertEqual(json.loads(text)["id_slot"], slot)
            self.assertEqual(self.sim.requests[-1].slot_id, slot)
        status, _, _ = await self.post("/completion", {"prompt": "x", "id_slot": 7})
        self.assertEqual(status, 400)

    async def test_id_slot_waits_for_its_busy_slot(self) -> None:
        busy = await self.open_stream(
            "/completion", {"prompt": "a", "n_predict": 3000, "id_slot": 0}
        )
        waiting = asyncio.create_task(
            self.post("/completion", {"prompt": "b", "n_predict": 1, "id_slot": 0})
        )
        await wait_until(lambda: self.sim.deferred == 1)
        self.assertEqual(self.sim.processing, 1)
        busy.close()
        async with asyncio.timeout(STEP_TIMEOUT_S):
            _status, text, _ = await waiting
        self.assertEqual(json.loads(text)["id_slot"], 0)

    async def test_slot_selection_prefers_cached_prefix_then_lru(self) -> None:
        a = "shared context " * 30
        await self.post("/completion", {"prompt": a + "one", "n_predict": 1})
        other = "quite another text with many words so BOS alone is under the threshold"
        await self.post("/completion", {"prompt": other, "n_predict": 1})
        # The first goes to the last of the never-used slots, the second to the other one.
        self.assertEqual([r.slot_id for r in self.sim.requests], [1, 0])
        _, text, _ = await self.post("/completion", {"prompt": a + "two", "n_predict": 1})
        self.assertEqual(self.sim.requests[-1].slot_id, 1)
        self.assertGreater(json.loads(text)["timings"]["cache_n"], 50)
        await self.post("/completion", {"prompt": other.upper(), "n_predict": 1})
        self.assertEqual(self.sim.requests[-1].slot_id, 0)


class BatchingTest(SimTestCase):
    # cpu-1b: 40 tokens/s alone, each extra busy slot slows every stream by 35 %.
    config = SimConfig(slots=4, profile="cpu-1b", time_scale=20.0)

    async def decode_speed(self, concurrent: int) -> float:
        body = {"prompt": "count with me", "n_predict": 30}
        results = await asyncio.gather(*(self.post("/completion", body) for _ in range(concurrent)))
        speeds: list[float] = [
            json.loads(text)["timings"]["predicted_per_second"] for _, text, _ in results
        ]
        return sum(speeds) / len(speeds)

    async def test_decode_slows_as_more_slots_work(self) -> None:
        alone = await self.decode_speed(1)
        together = await self.decode_speed(4)
        self.assertEqual(self.sim.max_concurrent, 4)
        # One stream decodes at about 40 tok/s * 20; four at about 40 / 2.05 * 20 each.
        self.assertGreater(alone, 400)
        self.assertLess(together, alone * 0.75)


class LoadingTest(SimTestCase):
    config = SimConfig(slots=1, profile="test", load_time_s=0.3)

    async def test_loading_then_ready(self) -> None:
        for path in ("/health", "/v1/models", "/slots"):
            body = await self.get_json(path, status=503)
            self.assertEqual(
                body,
                {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}},
            )
        status, _text, _ = await self.post(
            "/v1/chat/completions", chat_body([{"role": "user", "content": "x"}])
        )
        self.assertEqual(status, 503)
        async with self.http.get("/sim/control") as resp:
            self.assertTrue((await resp.json())["loading"])
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while True:
            async with self.http.get("/health") as resp:
                if resp.status == 200:
                    break
            self.assertLess(time.monotonic(), deadline)
            await asyncio.sleep(0.05)
        self.assertGreaterEqual(time.monotonic() - self.sim.requests[0].arrived_at, 0.25)
        self.assertEqual(self.sim.requests[0].outcome, "error")


class OfficialClientsTest(SimTestCase):
    async def test_openai_client_multi_turn_with_cache(self) -> None:
        client = openai.AsyncOpenAI(
            base_url=self.sim.url + "/v1", api_key="sk-sim", max_retries=0, timeout=STEP_TIMEOUT_S
        )
        try:
            messages: list[Any] = [
                {"role": "user", "content": "Say something about slots, please."}
            ]
            first = await client.chat.completions.create(
                model="sim-model", messages=messages, max_tokens=10
            )
            assert first.usage is not None
            self.assertEqual(first.usage.completion_tokens, 10)
            messages += [
                {"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "More."},
            ]
            stream = await client.chat.completions.create(
                model="sim-model",
                messages=messages,
                stream=True,
                stream_options={"include_usage": True},
            )
            text, usage = "", None
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    text += chunk.choices[0].delta.content
                usage = chunk.usage or usage
            assert usage is not None
            assert usage.prompt_tokens_details is not None
            assert usage.prompt_tokens_details.cached_tokens is not None
            self.assertEqual(usage.completion_tokens, 16)
            # The prompt and the reply but its last token, which is sampled and never decoded.
            self.assertGreaterEqual(
                usage.prompt_tokens_details.cached_tokens, first.usage.prompt_tokens + 9
            )
            models = await client.models.list()
            self.assertEqual([m.id for m in models.data], ["sim-model"])
            embedding = await client.embeddings.create(model="sim-model", input="hello")
            self.assertEqual(len(embedding.data[0].embedding), 64)
        finally:
            await client.close()

    async def test_anthropic_client(self) -> None:
        client = anthropic.AsyncAnthropic(
            base_url=self.sim.url, api_key="sim", max_retries=0, timeout=STEP_TIMEOUT_S
        )
        try:
            message = await client.messages.create(
                model="sim-model", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
            )
            self.assertEqual(message.usage.output_tokens, 5)
            async with client.messages.stream(
                model="sim-model", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
            ) as stream:
                text = await stream.get_final_text()
            block = message.content[0]
            assert isinstance(block, anthropic.types.TextBlock)
            self.assertEqual(text, block.text)
        finally:
            await client.close()
