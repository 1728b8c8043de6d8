"""The exchange's one timer: a deadline that moved later does not fire, one that passed does."""

from __future__ import annotations

import asyncio
import unittest

from llamacpp_ha.watchdog import Watchdog


class WatchdogTest(unittest.IsolatedAsyncioTestCase):
    async def test_a_deadline_that_passes_runs_its_action_once(self) -> None:
        watchdog = Watchdog()
        fired = asyncio.Event()
        watchdog.start("idle", watchdog.now() + 0.02, fired.set)
        await asyncio.wait_for(fired.wait(), 5)
        self.assertEqual(watchdog.expired, "idle")

    async def test_a_deadline_moved_later_fires_at_the_later_time(self) -> None:
        watchdog = Watchdog()
        calls: list[float] = []
        later = watchdog.now() + 0.2
        watchdog.start("idle", watchdog.now() + 0.01, lambda: calls.append(watchdog.now()))
        # Moved on before the first time passes, as every chunk does: the timer armed for the
        # earlier time re-arms instead of firing.
        watchdog.start("idle", later, lambda: calls.append(watchdog.now()))
        done = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_at(later + 0.05, done.set_result, None)
        await done
        self.assertEqual(len(calls), 1)
        self.assertGreaterEqual(calls[0], later)

    async def test_a_deadline_its_owner_moved_later_fires_at_the_later_time(self) -> None:
        watchdog = Watchdog()
        calls: list[float] = []
        deadline = watchdog.start(
            "idle", watchdog.now() + 0.01, lambda: calls.append(watchdog.now())
        )
        later = deadline.when = watchdog.now() + 0.2  # what the idle deadline does every chunk
        done = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_at(later + 0.05, done.set_result, None)
        await done
        self.assertEqual(len(calls), 1)
        self.assertGreaterEqual(calls[0], later)
        self.assertEqual(watchdog.expired, "idle")

    async def test_a_stopped_deadline_never_fires_and_the_other_still_does(self) -> None:
        watchdog = Watchdog()
        fired: list[str] = []
        idle = asyncio.Event()

        def on_idle() -> None:
            fired.append("idle")
            idle.set()

        watchdog.start("write", watchdog.now() + 0.01, lambda: fired.append("write"))
        watchdog.start("idle", watchdog.now() + 0.05, on_idle)
        watchdog.stop("write")
        await asyncio.wait_for(idle.wait(), 5)
        self.assertEqual(fired, ["idle"])
        self.assertEqual(watchdog.expired, "idle")

    async def test_close_cancels_everything(self) -> None:
        watchdog = Watchdog()
        fired: list[str] = []
        watchdog.start("idle", watchdog.now() + 0.01, lambda: fired.append("idle"))
        watchdog.close()
        done = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(0.05, done.set_result, None)
        await done
        self.assertEqual(fired, [])
        self.assertIsNone(watchdog.expired)

    async def test_the_others_still_fire_after_one_has(self) -> None:
        # An idle backend's stream is resumed on another while the request's own deadline
        # keeps running: that it fires must not wait for the next deadline to be set.
        watchdog = Watchdog()
        fired: list[str] = []
        deadline = asyncio.Event()

        def on_deadline() -> None:
            fired.append("deadline")
            deadline.set()

        watchdog.start("deadline", watchdog.now() + 0.1, on_deadline)
        watchdog.start("idle", watchdog.now() + 0.01, lambda: fired.append("idle"))
        await asyncio.wait_for(deadline.wait(), 5)
        self.assertEqual(fired, ["idle", "deadline"])
        self.assertEqual(watchdog.expired, "deadline")
