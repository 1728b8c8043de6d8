"""The balancer on a real port in front of simulated llama-servers on real ports.

Every claim is checked by what the simulated backends observed, not only by what the
client saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import unittest

import httpx
import openai
from openai.types.chat import ChatCompletionMessageParam
from starlette.types import Message

from llamacpp_sim import RecordedRequest, SimBackend, SimConfig
from serving import balancer_for, sims
from sim_support import json_body, wait_until

GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions", "/completion")


def generations(sim: SimBackend) -> list[RecordedRequest]:
    return [r for r in sim.requests if r.path.split("?")[0] in GENERATION_PATHS]


def chat(content: str, max_tokens: int = 8, **extra: object) -> dict[str, object]:
    return {
        "model": "sim-model",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        **extra,
    }


class ProxySocketTest(unittest.IsolatedAsyncioTestCase):
    async def asyncSetUp(self) -> None:
        self.http = httpx.AsyncClient(timeout=10)
        self.addAsyncCleanup(self.http.aclose)

    async def test_never_more_than_k_in_flight_per_backend(self) -> None:
        async with (
            sims(
                SimConfig(slots=2, profile="test", time_scale=2),
                SimConfig(slots=1, profile="test", time_scale=2),
            ) as fleet,
            balancer_for(fleet) as lb,
        ):
            responses = await asyncio.wait_for(
                asyncio.gather(
                    *(
                        self.http.post(lb.url + "/v1/chat/completions", json=chat(f"q{i}", 32))
                        for i in range(12)
                    )
                ),
                30,
            )
            self.assertEqual([r.status_code for r in responses], [200] * 12)
            self.assertLessEqual(fleet[0].max_concurrent, 2)
            self.assertLessEqual(fleet[1].max_concurrent, 1)
            self.assertEqual(
                fleet[0].max_concurrent + fleet[1].max_concurrent, 3
            )  # and both were full
            self.assertEqual(sum(s.deferred for s in fleet), 0)
            self.assertEqual(len(generations(fleet[0])) + len(generations(fleet[1])), 12)

    async def test_fifo_order_under_contention(self) -> None:
        async with (
            sims(SimConfig(slots=1, profile="cpu-1b", time_scale=4)) as fleet,
            balancer_for(fleet) as lb,
        ):
            # Far longer than enqueueing the others takes on a loaded machine; it leaves once
            # they are all queued, and its slot goes to them in order.
            blocker = asyncio.create_task(
                self.http.post(lb.url + "/v1/chat/completions", json=chat("first", 4000))
            )
            await wait_until(lambda: fleet[0].processing == 1)
            waiters = []
            for i in range(6):
                waiters.append(
                    asyncio.create_task(
                        self.http.post(lb.url + "/v1/chat/completions", json=chat(f"n{i}", 2))
                    )
                )

                def enqueued(n: int = i + 1) -> bool:
                    return len(lb.balancer.queue) == n

                await wait_until(enqueued)
            blocker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await blocker
            await asyncio.wait_for(asyncio.gather(*waiters), 20)
            seen = [json_body(r)["messages"][0]["content"] for r in generations(fleet[0])]
            self.assertEqual(seen, ["first"] + [f"n{i}" for i in range(6)])

    async def test_queue_timeout_answer(self) -> None:
        async with (
            sims(SimConfig(slots=1, profile="cpu-1b", time_scale=1)) as fleet,
            balancer_for(fleet, queue_timeout_s=0.2) as lb,
        ):
            blocker = asyncio.create_task(
                self.http.post(lb.url + "/v1/chat/completions", json=chat("long", 200))
            )
            await wait_until(lambda: fleet[0].processing == 1)
            response = await self.http.post(lb.url + "/v1/chat/completions", json=chat("late"))
            self.assertEqual(response.status_code, 503)
            self.assertEqual(response.json()["error"]["code"], "queue_timeout")
            self.assertIn("retry-after", response.headers)
            self.assertEqual(len(generations(fleet[0])), 1)  # the timed-out one never reached it
            blocker.cancel()

    async def test_queue_full_answer(self) -> None:
        async with (
            sims(SimConfig(slots=1, profile="cpu-1b", time_scale=1)) as fleet,
            balancer_for(fleet, max_queue=1) as lb,
        ):
            blocker = asyncio.create_task(
                self.http.post(lb.url + "/v1/chat/completions", json=chat("long", 200))
            )
            await wait_until(lambda: fleet[0].processing == 1)
            queued = asyncio.create_task(
                self.http.post(lb.url + "/v1/chat/completions", json=chat("queued"))
            )
            await wait_until(lambda: len(lb.balancer.queue) == 1)
            started = time.monotonic()
            response = await self.http.post(lb.url + "/v1/chat/completions", json=chat("rejected"))
            self.assertLess(time.monotonic() - started, 1.0)
            self.assertEqual(response.status_code, 503)
            self.assertEqual(response.json()["error"]["code"], "queue_full")
            self.assertIn("retry-after", response.headers)
            blocker.cancel()
            queued.cancel()

    async def test_client_leaving_the_queue_is_never_dispatched(self) -> None:
        async with (
            sims(SimConfig(slots=1, profile="test", time_scale=0.5)) as fleet,
            balancer_for(fleet) as lb,
        ):
            blocker = asyncio.create_task(
                self.http.post(lb.url + "/v1/chat/completions", json=chat("first", 64))
            )
            await wait_until(lambda: fleet[0].processing == 1)
            async with httpx.AsyncClient(timeout=10) as leaving:
                gone = asyncio.create_task(
                    leaving.post(lb.url + "/v1/chat/completions", json=chat("gone"))
                )
                await wait_until(lambda: len(lb.balancer.queue) == 1)
                gone.cancel()
            await wait_until(lambda: len(lb.balancer.queue) == 0)
            await asyncio.wait_for(blocker, 20)  # its slot was freed with no one queued
            self.assertEqual(
                [json_body(r)["messages"][0]["content"] for r in generations(fleet[0])], ["first"]
            )

    async def test_disconnect_mid_stream_frees_the_slot_fast(self) -> None:
        async with (
            sims(SimConfig(slots=1, profile="cpu-1b", time_scale=1)) as fleet,
            balancer_for(fleet) as lb,
        ):
            async with httpx.AsyncClient(timeout=10) as client:
                async with client.stream(
                    "POST",
                    lb.url + "/v1/chat/completions",
                    json=chat("stream me", 400, stream=True),
                ) as response:
                    async for _ in response.aiter_bytes():
                        break
                    record = generations(fleet[0])[0]
                    self.assertIsNone(record.outcome)
                closed_at = time.monotonic()
            await asyncio.wait_for(record.done.wait(), 2)
            self.assertEqual(record.outcome, "client_closed")
            assert record.ended_at is not None  # set before done is
            self.assertLess(record.ended_at - closed_at, 0.1)
            await wait_until(
                lambda: lb.balancer.registry.backends[0].slots.in_flight == 0, within_s=1
            )
            # The slot is usable again at once.
            response = await self.http.post(lb.url + "/v1/chat/completions", json=chat("next", 2))
            self.assertEqual(response.status_code, 200)

    async def test_under_another_asgi_server_a_client_leaving_mid_stream_frees_the_slot(
        self,
    ) -> None:
        # Our connection protocol tells a relay that its client left by a scope extension;
        # an ASGI server without it says so only as http.disconnect from receive().
        async with (
            sims(SimConfig(slots=1, profile="cpu-1b", time_scale=1)) as fleet,
            balancer_for(fleet) as lb,
        ):
            body = json.dumps(chat("stream me", 400, stream=True)).encode()
            requests = [{"type": "http.request", "body": body, "more_body": False}]
            left, streaming = asyncio.Event(), asyncio.Event()

            async def receive() -> Message:
                if requests:
                    return requests.pop()
                await left.wait()
                return {"type": "http.disconnect"}

            async def send(message: Message) -> None:
                if message["type"] == "http.response.body" and message.get("body"):
                    streaming.set()

            scope = {
                "type": "http",
                "asgi": {"version": "3.0"},
                "http_version": "1.1",
                "method": "POST",
                "scheme": "http",
                "path": "/v1/chat/completions",
                "raw_path": b"/v1/chat/completions",
                "query_string": b"",
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
                "client": ("127.0.0.1", 40000),
                "server": ("127.0.0.1", 80),
            }
            relayed = asyncio.create_task(lb.app(scope, receive, send))
            await asyncio.wait_for(streaming.wait(), 10)
            record = generations(fleet[0])[0]
            self.assertIsNone(record.outcome)
            left.set()
            await asyncio.wait_for(relayed, 5)
            await asyncio.wait_for(record.done.wait(), 5)
            self.assertEqual(record.outcome, "client_closed")
            await wait_until(
                lambda: lb.balancer.registry.backends[0].slots.in_flight == 0, within_s=2
            )

    async def test_first_chunk_arrives_before_the_stream_ends(self) -> None:
        async with (
            sims(SimConfig(slots=1, profile="cpu-1b", time_scale=2)) as fleet,
            balancer_for(fleet) as lb,
        ):
            chunks: list[tuple[float, bytes]] = []
            async with self.http.stream(
                "POST", lb.url + "/v1/chat/completions", json=chat("hello", 40, stream=True)
            ) as response:
                self.assertEqual(
                    response.headers["content-type"].split(";")[0], "text/event-stream"
                )
                async for chunk in response.aiter_bytes():
                    if not chunks:
                        # The backend is still generating when the first bytes reach us.
                        self.assertIsNone(generations(fleet[0])[0].outcome)
                    chunks.append((time.monotonic(), chunk))
            self.assertGreater(len(chunks), 5)
            self.assertGreater(chunks[-1][0] - chunks[0][0], 0.2)
            body = b"".join(c for _, c in chunks)
            self.assertTrue(body.rstrip().endswith(b"data: [DONE]"))

    async def test_follow_up_turns_go_to_the_same_backend(self) -> None:
        configs = [SimConfig(slots=2, profile="test", time_scale=2) for _ in range(3)]
        async with sims(*configs) as fleet, balancer_for(fleet) as lb:
            client = openai.AsyncOpenAI(base_url=lb.url + "/v1", api_key="unused", max_retries=0)
            homes: dict[int, set[int]] = {}

            async def conversation(n: int) -> None:
                # Each conversation opens on its own document, so its home holds far more than
                # the policy's threshold for a cache worth keeping (a prompt of a few tokens may
                # rightly move when its home is full), and llama-server's slot choice by
                # similarity finds the conversation's own slot, not a neighbour's.
                document = " ".join(f"fact {n}.{i} is {n * 7919 + i * 104729}" for i in range(60))
                messages: list[ChatCompletionMessageParam] = [
                    {"role": "system", "content": "You are terse."}
                ]
                for turn in range(4):
                    opening = f": {document}" if turn == 0 else ""
                    messages.append(
                        {"role": "user", "content": f"conversation {n} turn {turn}{opening}"}
                    )
                    reply = await client.chat.completions.create(
                        model="sim-model", messages=messages, max_tokens=6
                    )
                    messages.append(
                        {"role": "assistant", "content": reply.choices[0].message.content or ""}
                    )

            await asyncio.wait_for(asyncio.gather(*(conversation(n) for n in range(6))), 30)
            for index, sim in enumerate(fleet):
                for record in generations(sim):
                    n = int(json_body(record)["messages"][1]["content"].split()[1])
                    homes.setdefault(n, set()).add(index)
            self.assertEqual(len(homes), 6)
            for n, backends in homes.items():
                self.assertEqual(len(backends), 1, f"conversation {n} moved: {backends} {homes}")
            self.assertGreater(
                len({next(iter(b)) for b in homes.values()}), 1
            )  # and it still spreads
            await client.close()

    async def test_dead_backend_is_skipped_then_used_again(self) -> None:
        async with (
            sims(SimConfig(slots=2, profile="test"), SimConfig(slots=2, profile="test")) as fleet,
            balancer_for(fleet, poll_interval_s=0.2) as lb,
        ):
            victim = fleet[1]
            port = victim.port
            await victim.aclose()
            died_at = time.monotonic()
            await wait_until(
                lambda: lb.balancer.registry.backends[1].health.value == "dead", within_s=2
            )
            self.assertLess(time.monotonic() - died_at, 0.2 + 0.15)
            for i in range(6):
                response = await self.http.post(
                    lb.url + "/v1/chat/completions", json=chat(f"while dead {i}")
                )
                self.assertEqual(response.status_code, 200)
            self.assertEqual(len(generations(fleet[0])), 6)
            revived = SimBackend(SimConfig(slots=2, profile="test", port=port))
            await revived.start()
            try:
                await wait_until(
                    lambda: lb.balancer.registry.backends[1].health.value == "ready", within_s=2
                )
                for i in range(6):
                    response = await self.http.post(
                        lb.url + "/v1/chat/completions", json=chat(f"after {i}")
                    )
                    self.assertEqual(response.status_code, 200)
                self.assertGreater(len(generations(revived)), 0)
            finally:
                await revived.aclose()

    async def test_request_racing_a_death_is_retried_elsewhere(self) -> None:
        async with (
            sims(SimConfig(slots=2, profile="test"), SimConfig(slots=2, profile="test")) as fleet,
            balancer_for(fleet, poll_interval_s=5) as lb,
        ):
            await fleet[0].aclose()  # the registry has not noticed yet: the next poll is 5 s away
            for i in range(4):
                response = await self.http.post(lb.url + "/v1/chat/completions", json=chat(f"r{i}"))
                self.assertEqual(response.status_code, 200, response.text)
            self.assertEqual(len(generations(fleet[1])), 4)
            self.assertEqual(lb.balancer.registry.backends[0].health.value, "dead")

    async def test_openai_client_streaming_and_not(self) -> None:
        async with sims(SimConfig(slots=2, profile="test")) as fleet, balancer_for(fleet) as lb:
            client = openai.AsyncOpenAI(base_url=lb.url + "/v1", api_key="unused", max_retries=0)
            reply = await client.chat.completions.create(
                model="any-name", messages=[{"role": "user", "content": "hi"}], max_tokens=5
            )
            assert reply.usage is not None
            self.assertEqual(reply.usage.completion_tokens, 5)
            stream = await client.chat.completions.create(
                model="sim-model",
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=5,
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = [chunk async for chunk in stream]
            assert chunks[-1].usage is not None
            self.assertEqual(chunks[-1].usage.completion_tokens, 5)
            models = await client.models.list()
            self.assertEqual([m.id for m in models.data], ["sim-model"])
            completion = await client.completions.create(
                model="sim-model", prompt="once upon", max_tokens=3
            )
            assert completion.usage is not None
            self.assertEqual(completion.usage.completion_tokens, 3)
            await client.close()

    async def test_unknown_model_in_a_mixed_fleet(self) -> None:
        async with (
            sims(
                SimConfig(slots=1, profile="test", model="alpha"),
                SimConfig(slots=1, profile="test", model="beta", aliases=("b",)),
            ) as fleet,
            balancer_for(fleet) as lb,
        ):
            client = openai.AsyncOpenAI(base_url=lb.url + "/v1", api_key="unused", max_retries=0)
            with self.assertRaises(openai.NotFoundError) as caught:
                await client.chat.completions.create(
                    model="gamma", messages=[{"role": "user", "content": "hi"}]
                )
            self.assertEqual(caught.exception.code, "model_not_found")
            for model, index in (("alpha", 0), ("beta", 1), ("b", 1)):
                await client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": model}], max_tokens=2
                )
                self.assertEqual(json_body(generations(fleet[index])[-1])["model"], model)
            self.assertEqual(len(generations(fleet[0])), 1)
            ids = sorted(m.id for m in (await client.models.list()).data)
            self.assertEqual(ids, ["alpha", "beta"])
            await client.close()

    async def test_bad_json_and_auth_over_sockets(self) -> None:
        async with (
            sims(SimConfig(slots=1, profile="test")) as fleet,
            balancer_for(fleet, api_keys=["sesame"]) as lb,
        ):
            client = openai.AsyncOpenAI(base_url=lb.url + "/v1", api_key="wrong", max_retries=0)
            with self.assertRaises(openai.AuthenticationError):
                await client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "hi"}]
                )
            ok = openai.AsyncOpenAI(base_url=lb.url + "/v1", api_key="sesame", max_retries=0)
            await ok.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=1
            )
            response = await self.http.post(
                lb.url + "/v1/chat/completions",
                content=b"{",
                headers={"Authorization": "Bearer sesame"},
            )
            self.assertEqual(response.status_code, 400)
            self.assertEqual(response.json()["error"]["type"], "invalid_request_error")
            self.assertEqual(len(generations(fleet[0])), 1)
            # The client's key never reaches the backend.
            self.assertNotIn("sesame", json.dumps([r.headers for r in fleet[0].requests]))
            await client.close()
            await ok.close()

    async def test_backend_error_passes_through_unchanged(self) -> None:
        async with (
            sims(SimConfig(slots=1, profile="test", n_ctx=64)) as fleet,
            balancer_for(fleet) as lb,
        ):
            direct = await self.http.post(
                fleet[0].url + "/v1/chat/completions", json=chat("word " * 200)
            )
            proxied = await self.http.post(
                lb.url + "/v1/chat/completions", json=chat("word " * 200)
            )
            self.assertEqual(direct.status_code, 400)
            self.assertEqual(
                (proxied.status_code, proxied.json()), (direct.status_code, direct.json())
            )
            self.assertEqual(proxied.json()["error"]["type"], "exceed_context_size_error")
