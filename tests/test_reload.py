"""Reload: a changed backend keeps its state; every setting applies live or is reported."""

from __future__ import annotations

import asyncio
import unittest

import httpx

from llamacpp_ha.sim import SimBackend, SimConfig
from serving import balancer_for, sims, wait_until


def chat(content: str = "hi", **extra: object) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 3, **extra}


def generations(sim: SimBackend) -> int:
    return len([r for r in sim.requests if r.path == "/v1/chat/completions"])


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
