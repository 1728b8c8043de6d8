"""The registry polling simulated llama-servers on real sockets."""

from __future__ import annotations

import asyncio
import logging
import time
import unittest
from typing import Any

import aiohttp

from fake_llama import FakeLlamaServer, captured
from llamacpp_ha.config import BackendConfig
from llamacpp_ha.loop_lag import LoopLag
from llamacpp_ha.registry import Health, Registry
from llamacpp_ha.transport import Transport
from llamacpp_sim import Fault, SimBackend, SimConfig, spawn
from serving import sims
from sim_support import wait_until


class RegistryTest(unittest.IsolatedAsyncioTestCase):
    async def asyncSetUp(self) -> None:
        self.session = aiohttp.ClientSession()  # the tests' own client, for side traffic
        self.addAsyncCleanup(self.session.close)
        self.transport = Transport()
        await self.transport.start()
        self.addAsyncCleanup(self.transport.aclose)
        self.changes = 0

    def registry_for(self, *backends: SimBackend, poll_interval_s: float = 0.05) -> Registry:
        def changed() -> None:
            self.changes += 1

        registry = Registry(
            [BackendConfig(url=b.url, name=f"b{i}") for i, b in enumerate(backends)],
            poll_interval_s=poll_interval_s,
            on_change=changed,
            transport=self.transport,
        )
        return registry

    async def test_ready_backend_reports_slots_and_models(self) -> None:
        async with sims(SimConfig(slots=3, model="alpha", aliases=("a",))) as (sim,):
            registry = self.registry_for(sim)
            await registry.poll(registry.get("b0"))
            backend = registry.get("b0")
            self.assertIs(backend.health, Health.READY)
            self.assertEqual(backend.slots.total, 3)
            self.assertEqual(backend.model_ids, ("alpha",))
            self.assertEqual(backend.model_names, frozenset({"alpha", "a"}))
            self.assertTrue(backend.routable)
            self.assertGreater(self.changes, 0)

    async def test_loading_backend(self) -> None:
        async with sims(SimConfig(slots=1, load_time_s=30)) as (sim,):
            registry = self.registry_for(sim)
            await registry.poll(registry.get("b0"))
            self.assertIs(registry.get("b0").health, Health.LOADING)
            self.assertFalse(registry.get("b0").routable)

    async def test_refused_connection_is_dead(self) -> None:
        registry = Registry(
            [BackendConfig(url="http://127.0.0.1:9", name="b0")],
            0.05,
            lambda: None,
            transport=self.transport,
        )
        await registry.poll(registry.get("b0"))
        self.assertIs(registry.get("b0").health, Health.DEAD)
        self.assertIn("/health", registry.get("b0").last_error or "")

    async def test_hung_backend_is_dead_within_the_poll_timeout(self) -> None:
        async with sims(SimConfig(slots=1, fault=Fault(hang_health=True))) as (sim,):
            registry = self.registry_for(sim, poll_interval_s=0.2)
            await asyncio.wait_for(registry.poll(registry.get("b0")), 2)
            self.assertIs(registry.get("b0").health, Health.DEAD)

    async def test_slot_count_from_props_when_slots_endpoint_is_off(self) -> None:
        async with sims(SimConfig(slots=4, slots_endpoint=False)) as (sim,):
            registry = self.registry_for(sim)
            await registry.poll(registry.get("b0"))
            self.assertIs(registry.get("b0").health, Health.READY)
            self.assertEqual(registry.get("b0").slots.total, 4)

    async def test_traffic_around_us_counts_as_busy(self) -> None:
        async with sims(SimConfig(slots=2, profile="cpu-1b")) as (sim,):
            registry = self.registry_for(sim)
            body = {"messages": [{"role": "user", "content": "direct"}], "max_tokens": 200}
            direct = asyncio.create_task(
                self.session.post(sim.url + "/v1/chat/completions", json=body)
            )
            await wait_until(lambda: sim.processing == 1)
            await registry.poll(registry.get("b0"))
            self.assertEqual(registry.get("b0").slots.external_busy, 1)
            self.assertEqual(registry.get("b0").slots.free, 1)
            direct.cancel()

    async def test_transitions_are_logged_and_recovery_is_seen(self) -> None:
        async with sims(SimConfig(slots=1)) as (sim,):
            registry = self.registry_for(sim)
            registry.start(self.transport)
            self.addAsyncCleanup(registry.aclose)
            await wait_until(lambda: registry.get("b0").health is Health.READY)
            with self.assertLogs("llamacpp_ha.registry", logging.WARNING) as logs:
                sim.set_fault(Fault(loading_s=0.3))
                await wait_until(lambda: registry.get("b0").health is Health.LOADING)
            self.assertIn("ready -> loading", logs.output[0])
            await wait_until(lambda: registry.get("b0").health is Health.READY)

    async def test_report_unreachable_takes_a_backend_out_until_a_poll_succeeds(self) -> None:
        async with sims(SimConfig(slots=1)) as (sim,):
            registry = self.registry_for(sim, poll_interval_s=0.05)
            registry.start(self.transport)
            self.addAsyncCleanup(registry.aclose)
            await wait_until(lambda: registry.get("b0").routable)
            registry.report_unreachable(registry.get("b0"), "refused")
            self.assertFalse(registry.get("b0").routable)
            await wait_until(lambda: registry.get("b0").routable)

    async def test_one_slow_backend_does_not_delay_the_others(self) -> None:
        async with sims(
            SimConfig(slots=1, fault=Fault(health_delay_s=5)), SimConfig(slots=1)
        ) as fleet:
            registry = self.registry_for(*fleet, poll_interval_s=0.05)
            registry.start(self.transport)
            self.addAsyncCleanup(registry.aclose)
            await wait_until(lambda: registry.get("b1").health is Health.READY, within_s=1)
            self.assertIsNot(registry.get("b0").health, Health.READY)

    async def test_model_union_merges_aliases(self) -> None:
        async with sims(
            SimConfig(slots=1, model="m", aliases=("x",)),
            SimConfig(slots=1, model="m", aliases=("y",)),
        ) as fleet:
            registry = self.registry_for(*fleet)
            for backend in registry.backends:
                await registry.poll(backend)
            models = registry.model_list()
            self.assertEqual([m["id"] for m in models], ["m"])
            self.assertEqual(set(models[0]["aliases"]), {"m", "x", "y"})
            self.assertTrue(registry.single_model())

    async def test_mixed_fleet_is_not_single_model(self) -> None:
        async with sims(SimConfig(slots=1, model="a"), SimConfig(slots=1, model="b")) as fleet:
            registry = self.registry_for(*fleet)
            for backend in registry.backends:
                await registry.poll(backend)
            self.assertFalse(registry.single_model())
            self.assertEqual(registry.serving("a"), [registry.get("b0")])
            self.assertEqual(registry.serving("b"), [registry.get("b1")])
            self.assertTrue(registry.knows_model("b"))
            self.assertFalse(registry.knows_model("c"))

    async def test_a_hostile_models_answer_does_not_stop_the_poll(self) -> None:
        async with FakeLlamaServer() as fake:
            fake.answer("/v1/models", 200, {"data": [{"id": "m", "aliases": 5}]})
            registry = Registry(
                [BackendConfig(url=fake.url, name="b0")],
                0.05,
                lambda: None,
                transport=self.transport,
            )
            registry.start(self.transport)
            self.addAsyncCleanup(registry.aclose)
            await wait_until(lambda: registry.get("b0").health is Health.READY)
            self.assertEqual(registry.get("b0").model_names, frozenset({"m"}))
            self.assertEqual(
                registry.model_list(), [{"id": "m", "aliases": [], "loaded_on": ["b0"]}]
            )
            polls = fake.hits["/health"]
            await wait_until(lambda: fake.hits["/health"] >= polls + 2)

    async def test_a_poll_that_breaks_is_logged_and_polling_goes_on(self) -> None:
        calls = 0

        def changed() -> None:  # the first call breaks the poll in the middle of applying it
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("CANARY-BODY-4417")

        async with FakeLlamaServer() as fake:
            registry = Registry([BackendConfig(url=fake.url, name="b0")], 0.05, changed)
            with self.assertLogs("llamacpp_ha.registry", logging.ERROR) as captured:
                registry.start(self.transport)
                self.addAsyncCleanup(registry.aclose)
                await wait_until(lambda: calls >= 1)
            await wait_until(lambda: registry.get("b0").health is Health.READY)
            polls = fake.hits["/health"]
            await wait_until(lambda: fake.hits["/health"] >= polls + 2)
            [line] = captured.output
            self.assertIn("backend b0: poll failed with RuntimeError at ", line)
            self.assertIn("test_registry.py:", line)
            self.assertNotIn("CANARY", line)

    async def test_a_poll_that_keeps_breaking_is_logged_once_and_keeps_the_backend_out(
        self,
    ) -> None:
        def changed() -> None:
            raise RuntimeError("CANARY-BODY-4418")

        async with FakeLlamaServer() as fake:
            registry = Registry([BackendConfig(url=fake.url, name="b0")], 0.05, changed)
            with self.assertLogs("llamacpp_ha.registry", logging.DEBUG) as captured:
                registry.start(self.transport)
                self.addAsyncCleanup(registry.aclose)
                await wait_until(lambda: fake.hits["/health"] >= 4)
            broke = [r for r in captured.records if "poll failed" in r.getMessage()]
            self.assertGreaterEqual(len(broke), 3)
            self.assertEqual([r.levelno for r in broke][:1], [logging.ERROR])
            self.assertEqual({r.levelno for r in broke[1:]}, {logging.DEBUG})
            self.assertIs(registry.get("b0").health, Health.DEAD)
            self.assertFalse(registry.get("b0").routable)
            self.assertEqual(registry.get("b0").last_error, "poll failed (RuntimeError)")

    async def test_a_changed_backend_keeps_its_state_and_is_polled_at_once(self) -> None:
        async with FakeLlamaServer() as old, FakeLlamaServer() as new:
            new.answer("/slots", 200, [{"id": i, "is_processing": False} for i in range(5)])
            registry = Registry(
                [BackendConfig(url=old.url, name="b0")], 30, lambda: None, transport=self.transport
            )
            registry.start(self.transport)
            self.addAsyncCleanup(registry.aclose)
            backend = registry.get("b0")
            await wait_until(lambda: backend.health is Health.READY)
            self.assertEqual(backend.slots.total, 2)
            registry.report_failure(backend, "a failure on live traffic")
            claim = backend.slots.try_claim()  # a request in flight
            assert claim is not None
            updated = registry.update(BackendConfig(url=new.url, name="b0", api_key="k2"))
            self.assertIs(updated, backend)
            self.assertIs(registry.get("b0"), backend)
            self.assertEqual(backend.url, new.url)
            await wait_until(lambda: backend.slots.total == 5, within_s=2)  # not in 30 s
            self.assertEqual(new.authorization["/health"], "Bearer k2")
            self.assertEqual(backend.ejection.consecutive_failures, 1)
            self.assertEqual(backend.slots.in_flight, 1)
            self.assertEqual([b.name for b in registry.backends], ["b0"])
            polled_old = old.hits["/health"]
            await registry.poll(backend)
            self.assertEqual(old.hits["/health"], polled_old)
            await backend.slots.release(claim)


class ActiveHealthTest(unittest.IsolatedAsyncioTestCase):
    """Several strikes before a ready backend counts as dead, and never for our own lag."""

    async def asyncSetUp(self) -> None:
        self.transport = Transport()
        await self.transport.start()
        self.addAsyncCleanup(self.transport.aclose)

    def registry_for(self, url: str, lag: LoopLag | None = None, **rules: Any) -> Registry:
        return Registry(
            [BackendConfig(url=url, name="b0")],
            poll_interval_s=0.05,
            on_change=lambda: None,
            transport=self.transport,
            lag=lag,
            **rules,
        )

    async def test_one_failed_poll_is_not_a_dead_server(self) -> None:
        async with FakeLlamaServer() as fake:
            registry = self.registry_for(fake.url, unhealthy_after_polls=2)
            backend = registry.get("b0")
            await registry.poll(backend)
            self.assertIs(backend.health, Health.READY)
            fake.answer("/health", 500, {"error": {"message": "boom"}})
            await registry.poll(backend)
            self.assertIs(backend.health, Health.READY)  # one strike
            self.assertIn("poll 1 of 2", backend.last_error or "")
            await registry.poll(backend)
            self.assertIs(backend.health, Health.DEAD)  # two
            fake.answer("/health", *captured("health.txt"))
            await registry.poll(backend)
            self.assertIs(backend.health, Health.READY)

    async def test_a_refused_connection_counts_at_once(self) -> None:
        async with FakeLlamaServer() as fake:
            registry = self.registry_for(fake.url, unhealthy_after_polls=5)
            await registry.poll(registry.get("b0"))
            self.assertIs(registry.get("b0").health, Health.READY)
        await registry.poll(registry.get("b0"))  # the fake is gone: nothing listens
        self.assertIs(registry.get("b0").health, Health.DEAD)

    async def test_our_own_stalled_loop_is_not_the_backends_timeout(self) -> None:
        # The backend runs in another process, so it answers while this loop is held.
        sim = await asyncio.to_thread(spawn, slots=1, profile="test", timeout_s=15)
        self.addCleanup(sim.stop)
        outcomes = {}
        for name, lag in (("measured", LoopLag(tick_s=0.02)), ("unmeasured", None)):
            if lag is not None:
                lag.start()
                self.addAsyncCleanup(lag.aclose)
            registry = self.registry_for(sim.url, lag=lag, poll_timeout_s=0.3)
            backend = registry.get("b0")
            await registry.poll(backend)  # ready, with a connection kept alive
            self.assertIs(backend.health, Health.READY)
            poll = asyncio.create_task(registry.poll(backend))
            await asyncio.sleep(0)  # one step: the poll's clock runs, its request is out
            time.sleep(0.8)  # noqa: ASYNC251 - holding our own loop is the point
            await poll
            outcomes[name] = (backend.health, backend.failed_polls)
        self.assertEqual(outcomes["measured"], (Health.READY, 0))
        # The control: without the measurement the same stall is a failed poll (one strike).
        self.assertEqual(outcomes["unmeasured"], (Health.READY, 1))
