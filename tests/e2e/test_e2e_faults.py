"""Faults on real processes: a backend killed, stopped, or still loading while clients send.

Each test has its own fleet (it breaks it). Backends serve the larger random model so that
requests are in flight long enough for a fault to land in the middle of them.
"""

from __future__ import annotations

import asyncio
import signal
import time
import unittest
from typing import Any

import httpx
import pytest
from e2e_harness import (
    CHAT_ALIAS,
    Fleet,
    LlamaServer,
    await_monitor,
    backend_entry,
    busy_slots,
    fleet,
    free_port,
    metric,
    wait_idle,
)
from e2e_recorder import Recorder

pytestmark = pytest.mark.e2e


def chat_body(i: int, max_tokens: int) -> dict[str, Any]:
    return {
        "model": CHAT_ALIAS,
        "messages": [{"role": "user", "content": f"Request {i}: say something."}],
        "max_tokens": max_tokens,
    }


def is_openai_error(response: httpx.Response) -> bool:
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(error, dict) and "message" in error and "type" in error


class FaultsTest(unittest.IsolatedAsyncioTestCase):
    _group: Fleet | None = None

    def _fleet(self, model_size: str = "large") -> Fleet:
        context = fleet(self.id().rsplit(".", 1)[-1], model_size=model_size)
        group = context.__enter__()
        self.addCleanup(context.__exit__, None, None, None)
        self._group = group
        return group

    async def asyncSetUp(self) -> None:
        self._group = None
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(60.0, connect=5.0))

    async def asyncTearDown(self) -> None:
        try:
            if self._group is not None:
                await wait_idle(self.http, self._group.backends, 10.0)
        finally:
            await self.http.aclose()

    async def _timed_chat(self, url: str, i: int, max_tokens: int) -> tuple[httpx.Response, float]:
        started = time.monotonic()
        response = await self.http.post(f"{url}/v1/chat/completions", json=chat_body(i, max_tokens))
        return response, time.monotonic() - started

    async def _wait_busy(self, server: LlamaServer, at_least: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while await busy_slots(self.http, server) < at_least:
            self.assertLess(time.monotonic(), deadline, f"{server.name} never got busy")
            await asyncio.sleep(0.02)

    @pytest.mark.timeout(120)
    async def test_sigkill_a_backend_while_requests_flow(self) -> None:
        group = self._fleet()
        victim = group.add_backend("victim")
        group.add_backend("survivor")
        group.start()
        url = group.url

        n_requests = 10
        tasks = [asyncio.create_task(self._timed_chat(url, i, 200)) for i in range(n_requests)]
        await self._wait_busy(victim, victim.slots, 20)
        await await_monitor(
            self.http, url, lambda d: d["queue"]["depth"] > 0, timeout_s=10, what="a queue"
        )
        victim.kill()
        async with asyncio.timeout(60):
            results = await asyncio.gather(*tasks)

        statuses = [r.status_code for r, _ in results]
        failed = [r for r, _ in results if r.status_code != 200]
        # Only the requests in flight on the victim may fail; every queued one must succeed.
        self.assertLessEqual(len(failed), victim.slots, statuses)
        for response in failed:
            self.assertIn(response.status_code, (502, 503, 504), response.text)
            self.assertTrue(is_openai_error(response), response.text)

        await await_monitor(
            self.http,
            url,
            lambda d: backend_entry(d, victim)["state"] == "dead",
            timeout_s=3,
            what="the killed backend marked dead",
        )
        while_dead = await asyncio.gather(*(self._timed_chat(url, i, 8) for i in range(4)))
        self.assertEqual([r.status_code for r, _ in while_dead], [200] * 4)

        victim.start()  # same port
        victim.wait_ready()
        await await_monitor(
            self.http,
            url,
            lambda d: backend_entry(d, victim)["state"] == "ready",
            timeout_s=5,
            what="the restarted backend ready again",
        )
        # More concurrent requests than the survivor has slots: the victim must take some.
        again = await asyncio.gather(*(self._timed_chat(url, i, 32) for i in range(4)))
        self.assertEqual([r.status_code for r, _ in again], [200] * 4)
        self.assertGreater(await metric(self.http, victim, "tokens_predicted_total"), 0)

    @pytest.mark.timeout(120)
    async def test_sigstop_a_backend_nothing_hangs_past_the_timeouts(self) -> None:
        request_timeout_s = 12.0
        group = self._fleet()
        frozen = group.add_backend("frozen")
        group.add_backend("healthy")
        group.start(
            balancer_args=[
                "--connect-timeout",
                "1",
                "--first-byte-timeout",
                "3",
                "--idle-timeout",
                "3",
                "--queue-timeout",
                "8",
                "--request-timeout",
                str(request_timeout_s),
            ]
        )
        url = group.url

        first = [asyncio.create_task(self._timed_chat(url, i, 200)) for i in range(4)]
        await self._wait_busy(frozen, 1, 20)
        frozen.signal(signal.SIGSTOP)
        later: list[asyncio.Task[tuple[httpx.Response, float]]] = []
        slowest_control_s = 0.0
        try:
            for i in range(8):
                later.append(asyncio.create_task(self._timed_chat(url, 100 + i, 8)))
                started = time.monotonic()
                health = await self.http.get(f"{url}/health", timeout=2.0)
                await self.http.get(f"{url}/monitor/data", timeout=2.0)
                slowest_control_s = max(slowest_control_s, time.monotonic() - started)
                self.assertEqual(health.status_code, 200, health.text)
                await asyncio.sleep(0.5)
            async with asyncio.timeout(request_timeout_s + 5):
                results = await asyncio.gather(*first, *later)
        finally:
            frozen.signal(signal.SIGCONT)

        self.assertLess(slowest_control_s, 1.0, "/health or /monitor/data stalled")
        report = [(r.status_code, round(d, 2)) for r, d in results]
        for response, duration in results:
            self.assertLessEqual(duration, request_timeout_s + 2.0, report)
            self.assertIn(response.status_code, (200, 502, 503, 504), report)
            if response.status_code != 200:
                self.assertTrue(is_openai_error(response), response.text)
        # The requests in flight on the frozen backend (at most its slots) may fail; the rest
        # are served by the healthy one.
        self.assertLessEqual(
            sum(1 for r, _ in results if r.status_code != 200), frozen.slots, report
        )

        await await_monitor(
            self.http,
            url,
            lambda d: backend_entry(d, frozen)["state"] == "ready",
            timeout_s=10,
            what="the thawed backend ready again",
        )
        # Once it has dropped the work the balancer gave up on, the thawed backend is used again.
        deadline = time.monotonic() + 10
        while await busy_slots(self.http, frozen):
            self.assertLess(time.monotonic(), deadline, "the thawed backend stayed busy")
            await asyncio.sleep(0.05)
        before = await metric(self.http, frozen, "tokens_predicted_total")
        again = await asyncio.gather(*(self._timed_chat(url, 200 + i, 64) for i in range(4)))
        self.assertEqual([r.status_code for r, _ in again], [200] * 4)
        self.assertGreater(await metric(self.http, frozen, "tokens_predicted_total"), before)

    @pytest.mark.timeout(120)
    async def test_a_loading_backend_receives_nothing_until_ready(self) -> None:
        group = self._fleet()
        group.add_backend("steady")
        # A large KV cache to allocate and clear makes the load take a visible while.
        late = group.add_backend("late", ctx=LOADING_CTX)
        recorder = Recorder(free_port(), late.port)
        late.balancer_url = recorder.url
        # Until the recorder listens, the balancer finds nothing at the late backend's address.
        group.start(not_yet=[late])
        await await_monitor(
            self.http,
            group.url,
            lambda d: backend_entry(d, late)["state"] == "dead",
            timeout_s=5,
            what="the not-yet-started backend dead",
        )
        await recorder.start()
        try:
            await self._loading_backend_scenario(group, late, recorder)
        finally:
            await recorder.aclose()

    async def _loading_backend_scenario(
        self, group: Fleet, late: LlamaServer, recorder: Recorder
    ) -> None:
        url = group.url
        client_statuses: list[int] = []
        stop = asyncio.Event()

        async def client(worker: int) -> None:
            i = 0
            while not stop.is_set():
                response, _ = await self._timed_chat(url, worker * 1000 + i, 4)
                client_statuses.append(response.status_code)
                i += 1

        workers = [asyncio.create_task(client(w)) for w in range(4)]
        health_seen: list[tuple[float, int]] = []
        try:
            await asyncio.sleep(0.5)
            late.start()
            async with asyncio.timeout(30):
                while True:
                    try:
                        health = await self.http.get(f"{late.url}/health", timeout=1.0)
                        health_seen.append((time.monotonic(), health.status_code))
                    except httpx.HTTPError:
                        pass
                    served = [
                        e for e in recorder.exchanges if e.method == "POST" and e.status == 200
                    ]
                    if len(served) >= 4:
                        break
                    await asyncio.sleep(0.01)
        finally:
            stop.set()
            async with asyncio.timeout(30):
                await asyncio.gather(*workers)

        statuses = sorted(set(client_statuses))
        self.assertEqual(statuses, [200], f"clients got {statuses}")
        self.assertIn(503, [status for _, status in health_seen], "no loading window was seen")
        posts = [e for e in recorder.exchanges if e.method == "POST"]
        self.assertTrue(posts)
        self.assertEqual(
            [e for e in posts if e.status != 200], [], "the late backend got work while loading"
        )
        first_ready = min(t for t, status in health_seen if status == 200)
        last_loading = max(t for t, status in health_seen if status == 503)
        self.assertLess(last_loading, first_ready)


LOADING_CTX = 65536
