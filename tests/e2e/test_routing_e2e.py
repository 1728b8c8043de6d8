"""Routing `cost` on real llama-servers: where a pinned `id_slot` lands, and what turn 2 reuses.

Pinning (pinning.py) sends a request with `id_slot` only to a slot that is idle by our count and
whose recorded content shares the request's prefix; what a slot holds is known from pinned
requests and from answers that name their slot (`/completion`'s `id_slot`). These tests hold
that to a real llama-server: the answer's `id_slot`, the backend's own `/slots` while and after
the request runs, and `timings.cache_n`, what it really reused.

Observed on the pinned build (`-np 2`): the first request on an empty server goes to slot 1
(llama-server's LRU ties go to the last slot); `/slots` shows a slot's `id_task` and
`n_prompt_tokens` once it has served a task, and `n_prompt_tokens` is then what the slot holds:
the prompt and every generated token but the last (the answer's `tokens_cached`); a request
named to a slot does not consult the host cache, so it reuses only what that slot holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import unittest
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, ClassVar

import httpx
import openai
import pytest
from e2e_harness import (
    CHAT_ALIAS,
    Fleet,
    LlamaServer,
    await_monitor,
    backend_entry,
    fleet,
    wait_idle,
)

pytestmark = pytest.mark.e2e

# A prompt of this many bytes is about 600 tokens of the test models' byte-level vocabulary,
# three of the prefix index's 256-byte blocks: a reuse of it cannot be the few tokens two
# unrelated prompts share.
PREFIX_BYTES = 800
# Long enough to hold a slot of the large model (a few hundred tokens a second) for seconds.
HOLD_TOKENS = 3000


def text(topic: str, n_bytes: int) -> str:
    """Deterministic English-ish text about `topic`, `n_bytes` long, unlike any other topic's
    from its first word."""
    sentence = f"{topic} is what this part is about, and {topic} it stays. "
    return (sentence * (n_bytes // len(sentence) + 1))[:n_bytes]


async def backend_slots(http: httpx.AsyncClient, server: LlamaServer) -> dict[int, dict[str, Any]]:
    """The backend's own `/slots`, by slot id."""
    response = await http.get(f"{server.url}/slots")
    response.raise_for_status()
    return {int(slot["id"]): slot for slot in response.json()}


def slot_state(slot: dict[str, Any]) -> tuple[Any, ...]:
    """What says a slot served no new task: its last task and what it holds."""
    return (slot["is_processing"], slot.get("id_task"), slot.get("n_prompt_tokens"))


class PinningOnARealBackendTest(unittest.IsolatedAsyncioTestCase):
    """One llama-server (large model, `-np 2`, 4096 tokens a slot) behind `--routing cost`."""

    fleet: ClassVar[Fleet]
    server: ClassVar[LlamaServer]

    @classmethod
    def setUpClass(cls) -> None:
        context = fleet(cls.__name__, model_size="large")
        cls.fleet = context.__enter__()
        cls.addClassCleanup(context.__exit__, None, None, None)
        cls.server = cls.fleet.add_backend("a", slots=2, ctx=8192)
        cls.fleet.start(balancer_args=["--routing", "cost", "--pin-slots", "true"])

    async def asyncSetUp(self) -> None:
        self.url = self.fleet.url
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(60.0, connect=5.0))

    async def asyncTearDown(self) -> None:
        try:
            await wait_idle(self.http, self.fleet.backends, 10.0)
        finally:
            await self.http.aclose()

    async def complete(self, url: str, prompt: str, n_predict: int = 8, **extra: Any) -> Any:
        response = await self.http.post(
            f"{url}/completion", json={"prompt": prompt, "n_predict": n_predict, **extra}
        )
        self.assertEqual(response.status_code, 200, response.text)
        return response.json()

    async def monitor(self) -> dict[str, Any]:
        data: dict[str, Any] = (await self.http.get(f"{self.url}/monitor/data")).json()
        return data

    async def pinned(self) -> int:
        return int((await self.monitor())["routing"]["pinned"])

    async def settled(self, external_busy: int = 0) -> None:
        """Until the balancer holds nothing on the backend and sees `external_busy` slots
        busy there that are not ours (its polls of `/slots` have caught up)."""

        def quiet(data: dict[str, Any]) -> bool:
            entry = backend_entry(data, self.server)
            return bool(entry["in_flight"] == 0 and entry["external_busy"] == external_busy)

        await await_monitor(
            self.http,
            self.url,
            quiet,
            timeout_s=10.0,
            what=f"no request of ours in flight and {external_busy} external busy slot(s)",
        )

    @contextlib.asynccontextmanager
    async def holding(self, url: str, prompt: str, **extra: Any) -> AsyncIterator[None]:
        """A streaming `/completion` of HOLD_TOKENS tokens, open (and its slot busy) inside
        the block; closed, mid-stream, on leaving it."""
        body = {"prompt": prompt, "n_predict": HOLD_TOKENS, "stream": True, **extra}
        async with self.http.stream("POST", f"{url}/completion", json=body) as response:
            self.assertEqual(response.status_code, 200)
            lines = response.aiter_lines()
            chunks = 0
            while chunks < 3:  # generating: its prompt is computed, its slot taken
                if (await anext(lines)).startswith("data: "):
                    chunks += 1
            yield
            await response.aclose()

    async def start_on_some_slot(self, prompt: str) -> tuple[int, int, dict[int, Any]]:
        """Send `prompt` unpinned; its slot and prompt tokens, and `/slots` once idle again."""
        first = await self.complete(self.url, prompt)
        await self.settled()
        return (
            first["id_slot"],
            first["tokens_evaluated"],
            await backend_slots(self.http, self.server),
        )

    @pytest.mark.timeout(120)
    async def test_an_extension_is_pinned_to_the_slot_that_computed_its_prefix(self) -> None:
        prefix = text("Pinning", PREFIX_BYTES)
        slot, prefix_tokens, before = await self.start_on_some_slot(prefix)
        self.assertIn(slot, before)
        pinned = await self.pinned()

        second = await self.complete(self.url, prefix + text(" Then more", 300))

        self.assertEqual(await self.pinned(), pinned + 1, "the extension was not pinned")
        self.assertEqual(second["id_slot"], slot, second)
        self.assertGreaterEqual(second["timings"]["cache_n"], prefix_tokens - 1, second["timings"])
        after = await backend_slots(self.http, self.server)
        # The slot that served it holds its prompt and generation; the other served nothing.
        self.assertNotEqual(after[slot]["id_task"], before[slot]["id_task"])
        self.assertEqual(after[slot]["n_prompt_tokens"], second["tokens_cached"], after[slot])
        self.assertEqual(
            second["tokens_cached"], second["tokens_evaluated"] + second["tokens_predicted"] - 1
        )
        for other in set(after) - {slot}:
            self.assertEqual(slot_state(after[other]), slot_state(before[other]), after)
        print(
            f"prefix: slot {slot}, {prefix_tokens} tokens; pinned extension: slot "
            f"{second['id_slot']}, {second['tokens_evaluated']} tokens, cache_n "
            f"{second['timings']['cache_n']}; /slots after: {slot_state(after[slot])}"
        )

    @pytest.mark.timeout(120)
    async def test_slots_a_client_names_are_known_and_the_best_is_pinned(self) -> None:
        # The client names slot 0 for prefix + more and slot 1 for the prefix alone; neither is
        # re-pinned by us, and the shadow of the backend's caches puts each where the client
        # said. Then prefix + more + other is pinned to slot 0, which holds most of it.
        prefix, more = text("Overruling", PREFIX_BYTES), text(" Further", 400)
        long_slot = 0
        pinned = await self.pinned()
        long_answer = await self.complete(self.url, prefix + more, id_slot=long_slot)
        self.assertEqual(long_answer["id_slot"], long_slot)
        short_slot = 1 - long_slot
        short_answer = await self.complete(self.url, prefix, id_slot=short_slot)
        self.assertEqual(short_answer["id_slot"], short_slot)
        self.assertEqual(await self.pinned(), pinned)  # a client that names its slot keeps it
        await self.settled()

        third = await self.complete(self.url, prefix + more + text(" Other", 200))

        self.assertEqual(await self.pinned(), pinned + 1)
        self.assertEqual(third["id_slot"], long_slot, third)
        reused = third["timings"]["cache_n"]
        self.assertGreaterEqual(reused, long_answer["tokens_evaluated"] - 1, third["timings"])
        print(
            f"slot {long_slot}: {long_answer['tokens_evaluated']} tokens, slot {short_slot}: "
            f"{short_answer['tokens_evaluated']}; pinned: slot {third['id_slot']}, cache_n {reused}"
        )

    @pytest.mark.timeout(120)
    async def test_never_pinned_to_a_slot_busy_with_traffic_around_the_balancer(self) -> None:
        prefix = text("External", PREFIX_BYTES)
        slot, _, _ = await self.start_on_some_slot(prefix)
        # Someone talks to the backend directly and takes that very slot.
        async with self.holding(self.server.url, text("Elsewhere", 100), id_slot=slot):
            busy = await backend_slots(self.http, self.server)
            self.assertTrue(busy[slot]["is_processing"], busy)
            await self.settled(external_busy=1)
            pinned = await self.pinned()

            async with asyncio.timeout(30):
                second = await self.complete(self.url, prefix + text(" Then more", 300))

            self.assertEqual(await self.pinned(), pinned, "pinned to a slot busy elsewhere")
            self.assertNotEqual(second["id_slot"], slot, second)
            # It did not wait for the held slot: that request is still generating.
            still = await backend_slots(self.http, self.server)
            self.assertTrue(still[slot]["is_processing"], still)
        print(
            f"slot {slot} held around the balancer; the extension: slot {second['id_slot']}, "
            f"cache_n {second['timings']['cache_n']} of {second['tokens_evaluated']}"
        )

    @pytest.mark.timeout(120)
    async def test_never_pinned_to_a_slot_busy_with_our_own_request(self) -> None:
        prefix = text("Ours", PREFIX_BYTES)
        slot, _, before = await self.start_on_some_slot(prefix)
        pinned = await self.pinned()
        # A long extension, pinned to the slot that holds the prefix, holds it.
        async with self.holding(self.url, prefix + text(" Long", 300)):
            self.assertEqual(await self.pinned(), pinned + 1)
            busy = await backend_slots(self.http, self.server)
            self.assertTrue(busy[slot]["is_processing"], busy)
            self.assertNotEqual(busy[slot]["id_task"], before[slot]["id_task"], busy)
            self.assertEqual(
                [s for s, state in busy.items() if state["is_processing"]], [slot], busy
            )

            async with asyncio.timeout(30):
                second = await self.complete(self.url, prefix + text(" Short", 300))

            self.assertEqual(await self.pinned(), pinned + 1, "pinned to our own busy slot")
            self.assertNotEqual(second["id_slot"], slot, second)
            still = await backend_slots(self.http, self.server)
            self.assertTrue(still[slot]["is_processing"], still)
        print(
            f"slot {slot} held by our pinned extension (task {busy[slot]['id_task']}); the next: "
            f"slot {second['id_slot']}, cache_n {second['timings']['cache_n']} of "
            f"{second['tokens_evaluated']}"
        )


@dataclass
class Turns:
    """One conversation's two turns, as the client saw them."""

    first_prompt: int
    second_prompt: int
    second_cached: int
    second_cache_n: int

    @property
    def hit(self) -> bool:
        # Turn 1's prompt but for the token or two at its end that the reply's first characters
        # may merge with ("assistant: " then "t..." tokenizes as "Ġt").
        return self.second_cached >= self.first_prompt - TOKENS_AT_THE_SEAM


TOKENS_AT_THE_SEAM = 4
CONVERSATIONS = 6
# Short answers, so that the cache is clearly worth waiting for. The tiny model computes some
# 40,000 prompt tokens a second here but generates only 500 to 1,300 (fewer with both slots
# busy): one generated token takes as long as 30 to 80 prompt tokens. With 16-token answers, a
# backend holding a conversation frees a slot no sooner than the other one computes the whole
# 1,200-token second turn cold (30 ms), and `cost` rightly starts it there (measured with 16-token
# answers: 1 to 3 misses in 21 of 65 runs, 2 or 3 in 6); with 4-token answers, 0 misses in 61
# of 64 runs and 1 in 3 (16 of them with two `yes` hogging both cores: no miss). The same
# test, 4 runs each: round-robin 0 to 5 hits, least-busy 0 to 4, affinity 0 to 6.
ANSWER_TOKENS = 4
HITS_AT_LEAST = 5


class SecondTurnsUnderConcurrencyTest(unittest.IsolatedAsyncioTestCase):
    """Two llama-servers (tiny model, `-np 2`, 4096 tokens a slot, `--cache-ram 32`) behind
    `--routing cost`; more conversations at once than the fleet has slots.

    32 MiB of host cache is 65,536 tokens of the tiny model (512 bytes of KV a token): what the
    balancer assumes a backend's host cache holds unless told (`host_cache_tokens`), and many
    times this test's conversations, as a production cache is to its working set. It matters:
    a conversation whose slot was taken by a queued first turn is restored from it.
    """

    fleet: ClassVar[Fleet]

    @classmethod
    def setUpClass(cls) -> None:
        context = fleet(cls.__name__)
        cls.fleet = context.__enter__()
        cls.addClassCleanup(context.__exit__, None, None, None)
        for name in ("a", "b"):
            cls.fleet.add_backend(name, slots=2, ctx=8192, extra_args=["--cache-ram", "32"])
        # The deadline on a wait is what bounds a wrong estimate, not what this test is about:
        # on a loaded CI machine a 4-token answer has taken over 0.5 s (the default), and two
        # second turns that routing had rightly kept for their cache went cold elsewhere.
        cls.fleet.start(balancer_args=["--routing", "cost", "--max-cache-wait", "5"])

    async def asyncSetUp(self) -> None:
        self.url = self.fleet.url
        self.http = httpx.AsyncClient(timeout=20.0)
        self.openai = openai.AsyncOpenAI(
            base_url=f"{self.url}/v1", api_key="none", max_retries=0, timeout=60.0
        )

    async def asyncTearDown(self) -> None:
        await self.openai.close()
        try:
            await wait_idle(self.http, self.fleet.backends, 10.0)
        finally:
            await self.http.aclose()

    async def conversation(self, i: int) -> Turns:
        # About 1,100 tokens, unlike every other conversation's from its first word.
        messages: list[Any] = [
            {"role": "user", "content": text(f"Conversation {i} on topic {i * 7919}", 3200)}
        ]
        first = await self.openai.chat.completions.create(
            model=CHAT_ALIAS, messages=messages, max_tokens=ANSWER_TOKENS
        )
        assert first.usage is not None
        messages.append({"role": "assistant", "content": first.choices[0].message.content})
        messages.append({"role": "user", "content": text(f"And then, {i}?", 120)})
        second = await self.openai.chat.completions.create(
            model=CHAT_ALIAS, messages=messages, max_tokens=ANSWER_TOKENS
        )
        usage = second.usage
        assert usage is not None
        assert usage.prompt_tokens_details is not None
        timings = (second.model_extra or {})["timings"]
        return Turns(
            first_prompt=first.usage.prompt_tokens,
            second_prompt=usage.prompt_tokens,
            second_cached=usage.prompt_tokens_details.cached_tokens or 0,
            second_cache_n=timings["cache_n"],
        )

    @pytest.mark.timeout(120)
    async def test_second_turns_reuse_the_first_turns_prompt(self) -> None:
        started = time.monotonic()
        async with asyncio.timeout(90):
            turns = await asyncio.gather(*(self.conversation(i) for i in range(CONVERSATIONS)))
        elapsed = time.monotonic() - started
        monitor = (await self.http.get(f"{self.url}/monitor/data")).json()
        report = "\n".join(
            f"conversation {i}: turn 1 {t.first_prompt} tokens, turn 2 {t.second_prompt} "
            f"tokens of which {t.second_cached} cached (cache_n {t.second_cache_n})"
            + ("" if t.hit else "  MISS")
            for i, t in enumerate(turns)
        )
        over = {b["name"]: b["predicted_over"] for b in monitor["backends"]}
        report += (
            f"\nin {elapsed:.2f} s; predicted_over {over}; routing {json.dumps(monitor['routing'])}"
        )
        await asyncio.to_thread((self.fleet.log_dir / "turns.txt").write_text, report + "\n")
        print(report)
        for t in turns:
            self.assertGreater(t.first_prompt, 1000, report)  # a hit is no accident
            self.assertEqual(t.second_cached, t.second_cache_n, report)
        # Wherever routing counted on a backend's cache, the real server had it: a second turn
        # sent to the backend that served its first was restored there, from a slot or from
        # the host cache, even when queued first turns had taken both its slots since.
        self.assertEqual(over, {name: 0 for name in over}, report)
        self.assertGreaterEqual(sum(t.hit for t in turns), HITS_AT_LEAST, report)


class NothingCachedTest(unittest.IsolatedAsyncioTestCase):
    """Two llama-servers (tiny model, `-np 2`) behind `--routing cost`, and prompts no backend
    holds: `cost` is then least busy, even while one backend has been measured and the other
    has not (a stand-in figure against a measured one once decided by their difference).
    """

    fleet: ClassVar[Fleet]

    @classmethod
    def setUpClass(cls) -> None:
        context = fleet(cls.__name__)
        cls.fleet = context.__enter__()
        cls.addClassCleanup(context.__exit__, None, None, None)
        for name in ("a", "b"):
            cls.fleet.add_backend(name, slots=2, ctx=8192)
        cls.fleet.start(balancer_args=["--routing", "cost"])

    async def asyncSetUp(self) -> None:
        self.url = self.fleet.url
        self.http = httpx.AsyncClient(timeout=20.0)

    async def asyncTearDown(self) -> None:
        try:
            await wait_idle(self.http, self.fleet.backends, 10.0)
        finally:
            await self.http.aclose()

    async def chat(self, topic: str) -> None:
        response = await self.http.post(
            f"{self.url}/v1/chat/completions",
            json={
                "model": CHAT_ALIAS,
                "messages": [{"role": "user", "content": text(topic, 1400)}],
                "max_tokens": ANSWER_TOKENS,
            },
        )
        self.assertEqual(response.status_code, 200, response.text)

    async def served(self) -> tuple[dict[str, int], dict[str, Any]]:
        monitor = (await self.http.get(f"{self.url}/monitor/data")).json()
        return {b["name"]: b["served"] for b in monitor["backends"]}, monitor

    @pytest.mark.timeout(60)
    async def test_with_nothing_cached_no_request_waits_while_a_backend_idles(self) -> None:
        await self.chat("The first request")  # one backend has answered, the other not yet
        before, _ = await self.served()

        async with asyncio.timeout(30):
            await asyncio.gather(*(self.chat(f"Unrelated request {i}") for i in range(4)))

        # An exchange is counted once released, a moment after its last bytes left.
        async with asyncio.timeout(10):
            while True:
                after, monitor = await self.served()
                took = {name: after[name] - before[name] for name in after}
                if sum(took.values()) == 4:
                    break
                await asyncio.sleep(0.02)
        figures = {b["name"]: (b["prefill_tps"], b["served"]) for b in monitor["backends"]} | {
            "routing": monitor["routing"]
        }
        # Four requests, four idle slots: least busy puts two on each backend.
        self.assertEqual(sorted(took.values()), [2, 2], figures)
        self.assertEqual(monitor["routing"]["cache_waits"], 0, figures)
