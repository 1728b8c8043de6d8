from __future__ import annotations

import asyncio
import time
import unittest

from llamacpp_ha.loop_lag import LoopLag
from sim_support import wait_until


class LoopLagTest(unittest.IsolatedAsyncioTestCase):
    async def test_a_held_loop_is_measured_and_an_idle_one_is_not(self) -> None:
        lag = LoopLag(tick_s=0.01)
        lag.start()
        self.addAsyncCleanup(lag.aclose)
        since = time.monotonic()
        await asyncio.sleep(0.05)
        idle = lag.stalled_s(since)
        held_from = time.monotonic()
        time.sleep(0.3)  # noqa: ASYNC251 - holding the loop is what is measured
        await wait_until(lambda: lag.stalled_s(held_from) > 0)
        self.assertLess(idle, 0.05)
        self.assertGreater(lag.stalled_s(held_from), 0.25)
        self.assertLess(lag.stalled_s(time.monotonic()), 0.01)  # nothing since now
