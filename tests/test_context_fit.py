"""Context fit over real sockets: /slots reports each backend's n_ctx, and a request that
cannot fit a small one goes to the one it fits."""

from __future__ import annotations

import unittest

import httpx

from llamacpp_sim import SimConfig
from serving import balancer_for, sims
from sim_support import wait_until


class ContextFitSocketTest(unittest.IsolatedAsyncioTestCase):
    async def test_a_long_prompt_goes_to_the_backend_whose_context_fits_it(self) -> None:
        async with (
            sims(
                SimConfig(slots=2, profile="test", n_ctx=512, name="small"),
                SimConfig(slots=2, profile="test", n_ctx=16384, name="large"),
            ) as (small, large),
            balancer_for([small, large], routing="round-robin") as lb,
            httpx.AsyncClient(timeout=10) as http,
        ):
            await wait_until(lambda: all(b.n_ctx for b in lb.balancer.registry.backends))
            long = "word " * 1200  # about 1,500 tokens by the balancer's estimate
            for i in range(4):
                body = {"messages": [{"role": "user", "content": f"{i} {long}"}], "max_tokens": 4}
                response = await http.post(lb.url + "/v1/chat/completions", json=body)
                self.assertEqual(response.status_code, 200, response.text)
            served = [r for r in small.requests if r.path == "/v1/chat/completions"]
            self.assertEqual(served, [])
            self.assertEqual(
                len([r for r in large.requests if r.path == "/v1/chat/completions"]), 4
            )
