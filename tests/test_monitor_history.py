"""The monitor's history (`/monitor/data` "history"): what its charts draw.

Rates are checked against a known number of requests sent through a real balancer on
simulated backends; the bound of 15 minutes with the sampler's own clock readings; the
sampling task over sockets, with a short interval given to `History`'s constructor.
"""

from __future__ import annotations

import asyncio
import math
import unittest
from typing import Any

import aiohttp

from llamacpp_ha.config import build_config
from llamacpp_ha.monitor import (
    HISTORY_INTERVAL_S,
    HISTORY_WINDOW_S,
    History,
    ProxyStats,
)
from llamacpp_ha.proxy import create_app
from llamacpp_ha.queue import RequestQueue
from llamacpp_ha.registry import Health, Registry
from llamacpp_ha.usage import from_answer
from llamacpp_sim import SimConfig
from serving import Served, assert_no_leaks, serve_app, sims
from sim_support import wait_until

SYSTEM = "You answer questions about the monitor's history, briefly. " * 12


def chat(user: str, **extra: Any) -> dict[str, Any]:
    return {
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
        "max_tokens": 8,
        **extra,
    }


class HistoryBoundTest(unittest.TestCase):
    """The ring without a balancer: explicit clock readings, nothing sent."""

    def setUp(self) -> None:
        self.stats = ProxyStats()
        self.registry = Registry([], 0.1, on_change=lambda: None)
        self.queue = RequestQueue()

    def test_fifteen_minutes_of_five_second_samples(self) -> None:
        history = History()
        self.assertEqual((history.interval_s, history.window_s), (5.0, 900.0))
        self.assertEqual((HISTORY_INTERVAL_S, HISTORY_WINDOW_S), (5.0, 900.0))
        self.assertIsNone(history.take(self.stats, self.registry, self.queue, now=1000.0))
        for i in range(1, 301):
            history.take(self.stats, self.registry, self.queue, now=1000.0 + 5 * i)
        self.assertEqual(len(history.samples), 180)
        self.assertEqual(history.samples[-1].at_s - history.samples[0].at_s, 895.0)

    def test_late_samples_are_bounded_by_time(self) -> None:
        # A stalled loop samples less often: the count bound alone would keep more than 15 min.
        history = History()
        for i in range(400):
            history.take(self.stats, self.registry, self.queue, now=12.0 * i)
        span = history.samples[-1].at_s - history.samples[0].at_s
        self.assertLessEqual(span, 900.0)
        self.assertEqual(len(history.samples), math.floor(900 / 12) + 1)

    def test_a_gap_gives_the_rate_over_the_gap(self) -> None:
        # Five minutes without a sample, then three answers: 3 per 300 s, not 3 per 5 s.
        history = History()
        history.take(self.stats, self.registry, self.queue, now=0.0)
        self.stats.succeeded, self.stats.failed, self.stats.rejected = 1, 1, 1
        sample = history.take(self.stats, self.registry, self.queue, now=300.0)
        assert sample is not None
        self.assertAlmostEqual(sample.requests_per_s, 3 / 300)
        self.assertAlmostEqual(sample.errors_per_s, 2 / 300)
        self.assertIsNone(sample.ttft_ms_p50)
        self.assertIsNone(sample.cache_hit_rate)

    def test_an_interval_shorter_than_nothing_is_refused(self) -> None:
        with self.assertRaises(ValueError):
            History(interval_s=0)
        with self.assertRaises(ValueError):
            History(interval_s=10, window_s=5)


class HistoryThroughBalancerTest(unittest.IsolatedAsyncioTestCase):
    async def asyncSetUp(self) -> None:
        self.fleet = await self.enterAsyncContext(
            sims(
                SimConfig(slots=2, profile="test", name="a"),
                SimConfig(slots=1, profile="test", name="b", time_scale=0.05),
            )
        )
        self.http = await self.enterAsyncContext(
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        )

    async def serve(self, history: History) -> Served:
        config = build_config(
            {
                "backends": [
                    {"name": name, "url": sim.url}
                    for name, sim in zip(("a", "b"), self.fleet, strict=True)
                ],
                "poll_interval_s": 0.1,
                "shutdown_grace_s": 2,
                "queue_timeout_s": 20,
            }
        )
        app = create_app(config)
        # Before the lifespan starts the sampler, which reads its interval from here.
        app.state.balancer.stats.history = history
        lb = await self.enterAsyncContext(serve_app(app))
        await wait_until(
            lambda: all(b.health is Health.READY for b in lb.balancer.registry.backends)
        )
        return lb

    async def post(self, lb: Served, path: str, body: Any) -> tuple[int, Any]:
        async with self.http.post(lb.url + path, json=body) as response:
            return response.status, await response.json(content_type=None)

    async def test_rates_of_a_known_number_of_requests(self) -> None:
        # An hour between samples: only the test's own take() samples, at moments it chooses
        # (and room for ten of them).
        history = History(interval_s=3600, window_s=36000)
        lb = await self.serve(history)
        balancer = lb.balancer

        def take() -> Any:
            return history.take(balancer.stats, balancer.registry, balancer.queue)

        # Pinned to backend a (b is the slow one): the same system prompt each time, so later
        # answers take most of their prompt from llama-server's cache.
        answers = []
        for i in range(6):
            status, answer = await self.post(lb, "/v1/chat/completions", chat(f"q{i}", id_slot=0))
            self.assertEqual(status, 200)
            answers.append(answer)
        for _ in range(2):  # answered too, with a 400: counted in requests, not in errors
            status, _ = await self.post(lb, "/v1/chat/completions", {"messages": "no"})
            self.assertEqual(status, 400)
        first = take()
        self.assertIsNotNone(first)
        self.assertAlmostEqual(first.requests_per_s * first.interval_s, 8, places=6)
        self.assertEqual(first.errors_per_s, 0)
        usages = [from_answer(a) for a in answers]
        prompt = sum(u.prompt_tokens or 0 for u in usages)
        cached = sum(u.cached_tokens or 0 for u in usages)
        self.assertGreater(cached, 0, "the shared system prompt was reused")
        self.assertEqual(first.cache_hit_rate, round(cached / prompt, 3))
        assert first.ttft_ms_p50 is not None
        assert first.ttft_ms_p95 is not None
        self.assertLessEqual(first.ttft_ms_p50, first.ttft_ms_p95)
        self.assertEqual(first.queue_depth, 0)
        self.assertEqual(first.slots_busy, {"a": 0, "b": 0})

        # Nothing sent: a zero rate and no latency, not the last interval's figures again.
        idle = take()
        self.assertEqual((idle.requests_per_s, idle.errors_per_s), (0, 0))
        self.assertIsNone(idle.ttft_ms_p50)
        self.assertIsNone(idle.cache_hit_rate)

        # While slots are busy and requests wait: a sample sees the queue and the slots.
        backend_a = balancer.registry.get("a")
        balancer.registry.set_draining(backend_a, True)
        slow = [
            asyncio.create_task(self.post(lb, "/v1/chat/completions", chat(f"s{i}", max_tokens=64)))
            for i in range(3)
        ]
        await wait_until(lambda: len(balancer.queue) == 2, within_s=10)
        busy = take()
        self.assertEqual(busy.queue_depth, 2)
        self.assertEqual(busy.slots_busy, {"a": 0, "b": 1})
        balancer.registry.set_draining(backend_a, False)
        async with asyncio.timeout(30):
            results = await asyncio.gather(*slow)
        self.assertEqual([status for status, _ in results], [200, 200, 200])
        after = take()
        self.assertAlmostEqual(after.requests_per_s * after.interval_s, 3, places=6)

        data = await (await self.http.get(lb.url + "/monitor/data")).json()
        shown = data["history"]
        self.assertEqual((shown["interval_s"], shown["window_s"]), (3600, 36000))
        self.assertEqual(len(shown["samples"]), 4)
        self.assertEqual(
            set(shown["samples"][0]),
            {
                "t_unix_s",
                "interval_s",
                "requests_per_s",
                "errors_per_s",
                "ttft_ms_p50",
                "ttft_ms_p95",
                "queue_depth",
                "cache_hit_rate",
                "slots_busy",
            },
        )
        self.assertEqual(shown["samples"][2]["queue_depth"], 2)
        times = [s["t_unix_s"] for s in shown["samples"]]
        self.assertEqual(times, sorted(times))
        self.assertLessEqual(times[-1], shown["now_unix_s"])
        await assert_no_leaks(balancer)

    async def test_the_sampler_fills_a_bounded_history(self) -> None:
        # Five samples in the window: the sixth pushes the first out.
        history = History(interval_s=0.2, window_s=1.0)
        lb = await self.serve(history)

        async def samples() -> list[dict[str, Any]]:
            async with self.http.get(lb.url + "/monitor/data") as response:
                data: dict[str, Any] = await response.json()
            shown: list[dict[str, Any]] = data["history"]["samples"]
            return shown

        sent = 0
        async with asyncio.timeout(30):
            while len(shown := await samples()) < 5:
                status, _ = await self.post(lb, "/v1/chat/completions", chat(f"q{sent}"))
                self.assertEqual(status, 200)
                sent += 1
            oldest = shown[0]["t_unix_s"]
            while (await samples())[0]["t_unix_s"] == oldest:  # noqa: ASYNC110 - no event to await over HTTP
                await asyncio.sleep(0.05)
        shown = await samples()
        self.assertLessEqual(len(shown), 5)
        for sample in shown:
            # Each measured interval is about the nominal one (generously: a busy machine).
            self.assertGreater(sample["interval_s"], 0.15)
            self.assertLess(sample["interval_s"], 2.0)
            self.assertEqual(set(sample["slots_busy"]), {"a", "b"})
        await assert_no_leaks(lb.balancer)


if __name__ == "__main__":
    unittest.main()
