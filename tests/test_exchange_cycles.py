"""An exchange is freed by reference counting when it ends, not left for the cyclic collector.

Every object of a request (the exchange, its relay, answer, lease, watchdog, transcript, the
stream's generator) used to be cyclic garbage: about 86 objects per request that only the
collector's full passes freed, the passes whose pauses were the tail of time to first token.
"""

from __future__ import annotations

import gc
import unittest
from collections import Counter

import httpx

from llamacpp_sim import SimConfig
from serving import balancer_for, sims
from sim_support import wait_until


class ExchangeCyclesTest(unittest.IsolatedAsyncioTestCase):
    async def test_requests_leave_no_cyclic_garbage_of_ours(self) -> None:
        async with (
            sims(SimConfig(slots=8, profile="test")) as (sim,),
            balancer_for([sim]) as lb,
            httpx.AsyncClient(timeout=30) as client,
        ):
            stream = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

            async def requests() -> None:
                for streamed in (True, False) * 10:
                    body = {**stream, "stream": streamed}
                    async with client.stream(
                        "POST", lb.url + "/v1/chat/completions", json=body
                    ) as response:
                        self.assertEqual(response.status_code, 200)
                        async for _ in response.aiter_bytes():
                            pass
                # A request refused before it is admitted takes another path.
                refused = await client.post(lb.url + "/v1/chat/completions", content=b"{")
                self.assertEqual(refused.status_code, 400)
                await wait_until(lambda: lb.balancer.stats.in_flight == 0)

            await requests()  # warm: connections, caches, lazily built things
            gc.collect()
            gc.set_debug(gc.DEBUG_SAVEALL)
            try:
                await requests()
                gc.collect()
                ours = Counter(
                    type(o).__qualname__
                    for o in gc.garbage
                    if type(o).__module__.startswith("llamacpp_ha")
                )
            finally:
                gc.set_debug(0)
                gc.garbage.clear()
            self.assertEqual(ours, Counter())
