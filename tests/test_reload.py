"""Reload: a changed backend keeps its state; every setting applies live or is reported."""

from __future__ import annotations

import asyncio
import logging
import time
import unittest
from typing import Any

import httpx

from llamacpp_ha.config import build_config
from llamacpp_ha.proxy import create_app
from llamacpp_ha.registry import Health
from llamacpp_ha.sim import SimBackend, SimConfig
from serving import Served, balancer_for, serve_app, sims, wait_until


def chat(content: str = "hi", **extra: object) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 3, **extra}


def generations(sim: SimBackend) -> int:
    return len([r for r in sim.requests if r.path == "/v1/chat/completions"])


def reload(lb: Served, **changes: Any) -> list[str]:
    return lb.balancer.reload(lb.balancer.config.model_copy(update=changes))


class ChangedBackendTest(unittest.IsolatedAsyncioTestCase):
    async def test_a_changed_backend_keeps_its_state_and_its_requests_in_flight(self) -> None:
        async with (
            sims(
                SimConfig(slots=1, profile="cpu-1b", time_scale=4),
                SimConfig(slots=2, profile="test"),
            ) as (old, new),
            balancer_for(
                [old], backends=[{"url": old.url, "name": "gpu"}], poll_interval_s=30
            ) as lb,
            httpx.AsyncClient(timeout=10) as http,
        ):
            registry, stats = lb.balancer.registry, lb.balancer.stats
            await http.post(lb.url + "/v1/chat/completions", json=chat("before"))
            backend = registry.get("gpu")
            await wait_until(lambda: stats.backend("gpu").served == 1)
            registry.report_failure(backend, "a failure on live traffic")

            async def stream() -> bytes:
                body = chat("long", max_tokens=200, stream=True)
                async with http.stream("POST", lb.url + "/v1/chat/completions", json=body) as r:
                    self.assertEqual(r.status_code, 200)
                    return b"".join([c async for c in r.aiter_bytes()])

            streaming = asyncio.create_task(stream())
            await wait_until(lambda: old.processing == 1)
            config = lb.balancer.config
            moved = [
                b.model_copy(update={"url": new.url, "api_key": "new-key"}) for b in config.backends
            ]
            self.assertEqual(lb.balancer.reload(config.model_copy(update={"backends": moved})), [])
            self.assertIs(registry.get("gpu"), backend)
            self.assertEqual([b.name for b in registry.backends], ["gpu"])
            self.assertEqual(backend.slots.in_flight, 1)
            self.assertEqual(backend.ejection.consecutive_failures, 1)
            self.assertFalse(backend.draining)
            # Polled at once (the interval is 30 s): the new server's two slots.
            await wait_until(lambda: backend.slots.total == 2, within_s=2)
            response = await http.post(lb.url + "/v1/chat/completions", json=chat("after"))
            self.assertEqual(response.status_code, 200)
            self.assertEqual(generations(new), 1)
            seen = next(r for r in new.requests if r.path == "/v1/chat/completions")
            self.assertEqual(seen.headers.get("Authorization"), "Bearer new-key")
            body = await asyncio.wait_for(streaming, 10)
            self.assertTrue(body.rstrip().endswith(b"data: [DONE]"))
            self.assertEqual(generations(old), 2)  # the stream finished where it started
            await wait_until(lambda: stats.backend("gpu").served == 3)  # one history throughout


class OnceIgnoredSettingsTest(unittest.IsolatedAsyncioTestCase):
    """trusted_proxies, max_header_size, log_level and shutdown_grace_s used to be read once."""

    async def asyncSetUp(self) -> None:
        self.http = httpx.AsyncClient(timeout=10)
        self.addAsyncCleanup(self.http.aclose)

    async def test_trusted_proxies(self) -> None:
        async with sims(SimConfig(slots=1, profile="test")) as (sim,), balancer_for([sim]) as lb:

            async def forwarded_for() -> str:
                before = len(sim.requests)
                await self.http.post(
                    lb.url + "/v1/chat/completions",
                    json=chat(),
                    headers={"X-Forwarded-For": "203.0.113.9"},
                )
                seen = next(r for r in sim.requests[before:] if r.path == "/v1/chat/completions")
                return {k.lower(): v for k, v in seen.headers.items()}["x-forwarded-for"]

            self.assertEqual(await forwarded_for(), "127.0.0.1")
            self.assertEqual(reload(lb, trusted_proxies=["127.0.0.0/8"]), [])
            self.assertEqual(await forwarded_for(), "203.0.113.9, 127.0.0.1")
            reload(lb, trusted_proxies=[])
            self.assertEqual(await forwarded_for(), "127.0.0.1")

    async def test_max_header_size(self) -> None:
        async with sims(SimConfig(slots=1, profile="test")) as (sim,), balancer_for([sim]) as lb:

            async def status() -> int:
                response = await self.http.post(
                    lb.url + "/v1/chat/completions", json=chat(), headers={"X-Big": "y" * 5000}
                )
                return response.status_code

            self.assertEqual(await status(), 200)
            self.assertEqual(reload(lb, max_header_size=4096), [])
            self.assertEqual(await status(), 431)
            reload(lb, max_header_size=8192)
            self.assertEqual(await status(), 200)

    async def test_log_level(self) -> None:
        loggers = [logging.getLogger(n) for n in ("", "uvicorn.error", "uvicorn.access")]
        for logger, level in [(x, x.level) for x in loggers]:
            self.addCleanup(logger.setLevel, level)
        async with sims(SimConfig(slots=1, profile="test")) as (sim,), balancer_for([sim]) as lb:
            self.assertEqual(reload(lb, log_level="error"), [])
            self.assertEqual([x.level for x in loggers], [logging.ERROR] * 3)
            self.assertFalse(
                logging.getLogger("llamacpp_ha.registry").isEnabledFor(logging.WARNING)
            )
            reload(lb, log_level="debug")
            self.assertEqual([x.level for x in loggers], [logging.DEBUG] * 3)

    async def test_shutdown_grace(self) -> None:
        async with sims(SimConfig(slots=1, profile="cpu-1b")) as (sim,):
            config = build_config(
                {"backends": [sim.url], "poll_interval_s": 0.1, "shutdown_grace_s": 30}
            )
            async with serve_app(create_app(config)) as lb:
                registry = lb.balancer.registry
                await wait_until(lambda: registry.backends[0].health is Health.READY)
                body = chat("long", max_tokens=1000, stream=True)  # about 25 s

                async def stream() -> bytes:
                    url = lb.url + "/v1/chat/completions"
                    async with self.http.stream("POST", url, json=body) as response:
                        return b"".join([c async for c in response.aiter_bytes()])

                streaming = asyncio.create_task(stream())
                await wait_until(lambda: sim.processing == 1)
                self.assertEqual(reload(lb, shutdown_grace_s=0.2), [])
                started = time.monotonic()
            # Leaving serve_app shut the server down: within the new grace, not the old 30 s.
            received = await asyncio.wait_for(streaming, 5)
            self.assertLess(time.monotonic() - started, 3)
            last = [line for line in received.splitlines() if line.startswith(b"data: ")][-1]
            self.assertIn(b"shutting_down", last)
