"""Several balancer replicas sharing state through a real redis-server.

The replicas are real balancers on real sockets (three apps in this process, and a separate
process where one must die by SIGKILL); the backends are simulated llama-servers; Redis is
Debian's redis-server on a free port, stopped and started again where it goes away.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import unittest
from contextlib import AsyncExitStack
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from llamacpp_ha.balancer import Balancer
from llamacpp_ha.replicas import Replicas
from llamacpp_ha.state_store import ClaimAnswer, ClaimRequest, Head, StateStore
from llamacpp_sim import SimBackend, SimConfig
from redis_server import redis_server
from serving import Served, balancer_for, free_port, sims
from sim_support import chat_body, json_body, wait_until

ADMIN = {"Authorization": "Bearer admin-secret"}
SYSTEM = "You are a careful assistant who answers in full sentences. " * 40  # ~2,400 bytes


def shared(balancer: Balancer) -> Replicas:
    assert balancer.replicas is not None, "the balancer was started without state_url"
    return balancer.replicas


async def replicas_of(
    stack: AsyncExitStack, fleet: list[SimBackend], url: str, count: int, **settings: Any
) -> list[Served]:
    """`count` balancers in front of `fleet`, sharing state at `url`, once each sees all."""
    served = [
        await stack.enter_async_context(
            balancer_for(fleet, state_url=url, replica_id=f"r{i}", lease_ttl_s=3, **settings)
        )
        for i in range(count)
    ]
    await wait_until(lambda: all(len(shared(s.balancer).live) == count for s in served))
    return served


async def chat(
    session: aiohttp.ClientSession,
    base: str,
    messages: list[dict[str, str]],
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> tuple[int, dict[str, Any]]:
    async with session.post(
        base + "/v1/chat/completions", json=chat_body(messages, **extra), headers=headers
    ) as response:
        return response.status, await response.json()


async def until_healthy(session: aiohttp.ClientSession, base: str) -> None:
    """Until a balancer in another process listens and can take a request."""
    async with asyncio.timeout(20):
        while True:
            try:
                async with session.get(base + "/health") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.05)


class SharedSlotsTest(unittest.IsolatedAsyncioTestCase):
    async def test_three_replicas_never_overfill_a_backend_under_a_burst(self) -> None:
        configs = [SimConfig(slots=2, profile="test", default_max_tokens=300) for _ in range(2)]
        async with redis_server() as redis, sims(*configs) as fleet, AsyncExitStack() as stack:
            lbs = await replicas_of(stack, fleet, redis.url, 3)
            async with aiohttp.ClientSession() as session:
                answers = await asyncio.gather(
                    *(
                        chat(session, lbs[i % 3].url, [{"role": "user", "content": f"q{i}"}])
                        for i in range(36)
                    )
                )
            self.assertEqual([status for status, _ in answers], [200] * 36)
            # The burst was three times the slots per replica: each replica queued, and no
            # backend ever had a request waiting inside it. That holds while Redis answers
            # within the store's timeout (0.5 s): on a machine so loaded that a replica's loop
            # stalls past it, that replica serves on local accounting, its share of each
            # backend (RedisAwayTest), and a backend may hold one request waiting.
            outages = sum(shared(lb.balancer).stats.outages for lb in lbs)
            deferred = [sim.max_deferred for sim in fleet]
            self.assertLessEqual(max(deferred), 0 if outages == 0 else 1, (deferred, outages))
            self.assertEqual([sim.max_concurrent for sim in fleet], [2, 2])
            refused = sum(shared(lb.balancer).stats.refused for lb in lbs)
            claims = sum(shared(lb.balancer).stats.claims for lb in lbs)
            self.assertGreaterEqual(claims, 36)
            self.assertLess(refused, claims)

    async def test_a_slot_freed_on_one_replica_wakes_a_request_queued_on_another(self) -> None:
        config = SimConfig(slots=1, profile="test", default_max_tokens=16)
        async with redis_server() as redis, sims(config) as fleet, AsyncExitStack() as stack:
            a, b = await replicas_of(stack, fleet, redis.url, 2, poll_interval_s=30)
            async with aiohttp.ClientSession() as session:
                # A long stream through `a` holds the only slot; `b` queues its request.
                async with session.post(
                    a.url + "/v1/chat/completions",
                    json=chat_body(
                        [{"role": "user", "content": "long"}], max_tokens=400, stream=True
                    ),
                ) as long:
                    self.assertEqual(long.status, 200)
                    await wait_until(lambda: fleet[0].processing == 1)
                    await wait_until(lambda: b.balancer.registry.backends[0].slots.free == 0)
                    queued = asyncio.create_task(
                        chat(session, b.url, [{"role": "user", "content": "short"}])
                    )
                    await wait_until(lambda: len(b.balancer.queue) == 1)
                    await long.read()
                status, _ = await asyncio.wait_for(queued, 5)
            # /slots is polled every 30 s here: only the release event can have woken `b`.
            self.assertEqual(status, 200)
            self.assertEqual(fleet[0].max_deferred, 0)

    async def test_a_freed_slot_goes_to_the_request_that_has_waited_longest_anywhere(self) -> None:
        config = SimConfig(slots=1, profile="test", default_max_tokens=16)
        async with redis_server() as redis, sims(config) as (sim,), AsyncExitStack() as stack:
            holder, early, late = await replicas_of(stack, [sim], redis.url, 3)
            # One host, one clock: no margin for clocks that differ (the requests here arrive
            # a few milliseconds apart).
            for lb in (holder, early, late):
                shared(lb.balancer).fair_grace_ms = 0
            long_body = chat_body(
                [{"role": "user", "content": "hold"}], max_tokens=400, stream=True
            )
            async with aiohttp.ClientSession() as session:
                for round_ in range(4):
                    async with session.post(
                        holder.url + "/v1/chat/completions", json=long_body
                    ) as long:
                        self.assertEqual(long.status, 200)
                        await wait_until(lambda: sim.processing == 1)
                        first = asyncio.create_task(
                            chat(
                                session, early.url, [{"role": "user", "content": f"early{round_}"}]
                            )
                        )
                        # Queued at `early`, and shared state knows it is waiting there.
                        await wait_until(
                            lambda: (
                                len(early.balancer.queue) == 1
                                and shared(early.balancer).pending == 0
                            )
                        )
                        second = asyncio.create_task(
                            chat(session, late.url, [{"role": "user", "content": f"late{round_}"}])
                        )
                        await wait_until(lambda: len(late.balancer.queue) == 1)
                        await long.read()
                    results = await asyncio.gather(first, second)
                    self.assertEqual([status for status, _ in results], [200, 200])
                    served = [
                        json_body(r)["messages"][0]["content"]
                        for r in sim.requests
                        if r.path == "/v1/chat/completions"
                    ]
                    self.assertEqual(served[-2:], [f"early{round_}", f"late{round_}"])
            self.assertEqual(sim.max_deferred, 0)


class RoundTripsTest(unittest.IsolatedAsyncioTestCase):
    async def test_a_request_served_at_once_costs_two_scripts_in_redis(self) -> None:
        config = SimConfig(slots=2, profile="test", default_max_tokens=4)
        async with redis_server() as redis, sims(config) as fleet, AsyncExitStack() as stack:
            (served,) = await replicas_of(stack, fleet, redis.url, 1)
            client = aioredis.from_url(redis.url)
            stack.push_async_callback(client.aclose)
            async with aiohttp.ClientSession() as session:
                await client.config_resetstat()
                for turn in range(40):
                    status, _ = await chat(
                        session, served.url, [{"role": "user", "content": f"q{turn}"}]
                    )
                    self.assertEqual(status, 200)
                await wait_until(lambda: shared(served.balancer).pending == 0)
            stats = await client.info("commandstats")
            scripts = stats["cmdstat_evalsha"]["calls"]
            # Its claim and its release; a few refreshes beside them (one a second).
            self.assertGreaterEqual(scripts, 80)
            self.assertLessEqual(scripts, 80 + 10)


class TwoModelsTest(unittest.IsolatedAsyncioTestCase):
    async def test_a_request_waiting_for_another_model_holds_up_no_one(self) -> None:
        configs = [
            SimConfig(slots=1, profile="test", default_max_tokens=16, model=model)
            for model in ("model-a", "model-b")
        ]
        async with (
            redis_server() as redis,
            sims(*configs) as (sim_a, sim_b),
            AsyncExitStack() as stack,
        ):
            x, y = await replicas_of(stack, [sim_a, sim_b], redis.url, 2)
            for lb in (x, y):
                shared(lb.balancer).fair_grace_ms = 0
            hold = chat_body([{"role": "user", "content": "hold"}], max_tokens=400, stream=True)
            async with aiohttp.ClientSession() as session:
                # model-b's only slot is held; x queues another request for it.
                async with session.post(
                    x.url + "/v1/chat/completions", json={**hold, "model": "model-b"}
                ) as long:
                    self.assertEqual(long.status, 200)
                    await wait_until(lambda: sim_b.processing == 1)
                    waiting = asyncio.create_task(
                        chat(session, x.url, [{"role": "user", "content": "b"}], model="model-b")
                    )
                    await wait_until(
                        lambda: len(x.balancer.queue) == 1 and shared(x.balancer).pending == 0
                    )
                    # y's younger request for model-a takes model-a's free slot at once.
                    for turn in range(3):
                        status, _ = await chat(
                            session, y.url, [{"role": "user", "content": f"a{turn}"}],
                            model="model-a",
                        )  # fmt: skip
                        self.assertEqual(status, 200)
                    self.assertEqual(shared(y.balancer).stats.deferred, 0)
                    self.assertFalse(waiting.done())
                    await long.read()
                status, _ = await waiting
            self.assertEqual(status, 200)


class HeadOrderTest(unittest.IsolatedAsyncioTestCase):
    """A replica's writes of its oldest waiting request reach Redis in any order (claims and
    updates travel on different connections): the one it made last must stand."""

    async def asyncSetUp(self) -> None:
        self.redis = await self.enterAsyncContext(redis_server())
        self.store = StateStore(self.redis.url)
        self.addAsyncCleanup(self.store.aclose)
        await self.store.refresh("a", 3000, {"b": []}, {}, head_seq=1, replace=True)
        await self.store.refresh("z", 3000, {"b": []}, {}, head_seq=1, replace=True)

    async def claim_at_z(self, seq: int = 1, model: str = "") -> ClaimAnswer:
        """A request that arrived at `z` at 5,000 ms claims the only slot of `b` (which serves
        models m1 and m2)."""
        claim = ClaimRequest(
            backend="b", replica="z", lease=f"z|{seq}", limit=1, ttl_ms=3000,
            arrived_ms=5000, head=None, head_seq=seq, model=model,
            served=frozenset({"m1", "m2"}),
        )  # fmt: skip
        return await self.store.claim(claim)

    async def test_an_earlier_write_that_lands_last_changes_nothing(self) -> None:
        await self.store.set_head("a", None, seq=3)  # a's request was placed
        await self.store.set_head("a", Head(1000), seq=2)  # made before, landed after
        self.assertEqual(await self.claim_at_z(), ClaimAnswer(True, 1, 0))

    async def test_a_claim_that_lands_after_a_later_write_leaves_that_write(self) -> None:
        await self.store.set_head("a", Head(1000), seq=3)
        limit_one = ClaimRequest(
            backend="b", replica="a", lease="a|1", limit=1, ttl_ms=3000,
            arrived_ms=900, head=None, head_seq=2,
        )  # fmt: skip
        self.assertTrue((await self.store.claim(limit_one)).taken)
        # a still waits with the request of 1,000 ms: z, younger, gives way once the slot frees.
        await self.store.release("b", "a", "a|1")
        self.assertEqual(await self.claim_at_z(), ClaimAnswer(False, 0, 1))

    async def test_a_replica_that_starts_again_numbers_its_writes_afresh(self) -> None:
        await self.store.set_head("a", Head(1000), seq=50)
        await self.store.refresh("a", 3000, {"b": []}, {}, head_seq=1, replace=True)
        self.assertEqual(await self.claim_at_z(), ClaimAnswer(True, 1, 0))
        await self.store.set_head("a", Head(1000), seq=2)
        await self.store.release("b", "z", "z|1")
        self.assertEqual(await self.claim_at_z(2), ClaimAnswer(False, 0, 1))


class HeadModelTest(unittest.IsolatedAsyncioTestCase):
    """An older request waiting at another replica goes first only where it could be served:
    one for a model the backend does not serve must not hold up the backend's own requests."""

    async def asyncSetUp(self) -> None:
        self.redis = await self.enterAsyncContext(redis_server())
        self.store = StateStore(self.redis.url)
        self.addAsyncCleanup(self.store.aclose)
        for replica in ("a", "z"):
            await self.store.refresh(replica, 3000, {"b": []}, {}, head_seq=1, replace=True)

    async def claim_at_z(self, model: str) -> ClaimAnswer:
        claim = ClaimRequest(
            backend="b", replica="z", lease="z|1", limit=1, ttl_ms=3000, arrived_ms=5000,
            head=None, head_seq=2, model=model, served=frozenset({"m1", "m2"}),
        )  # fmt: skip
        return await self.store.claim(claim)

    async def test_an_older_request_for_a_model_the_backend_does_not_serve_waits(self) -> None:
        await self.store.set_head("a", Head(1000, "other"), seq=2)
        self.assertEqual(await self.claim_at_z("m1"), ClaimAnswer(True, 1, 0))

    async def test_an_older_request_for_a_model_the_backend_serves_goes_first(self) -> None:
        await self.store.set_head("a", Head(1000, "m2"), seq=2)
        self.assertEqual(await self.claim_at_z("m1"), ClaimAnswer(False, 0, 1))

    async def test_an_older_request_for_any_model_goes_first(self) -> None:
        await self.store.set_head("a", Head(1000), seq=2)
        self.assertEqual(await self.claim_at_z("m1"), ClaimAnswer(False, 0, 1))

    async def test_a_request_that_gives_way_says_which_model_it_waits_for(self) -> None:
        await self.store.set_head("a", Head(1000, "m2"), seq=2)
        self.assertFalse((await self.claim_at_z("m1")).taken)  # z now waits, since 5,000 ms
        # For a model only z's request could use, a's younger claim gives way to z's.
        claim = ClaimRequest(
            backend="c", replica="a", lease="a|1", limit=1, ttl_ms=3000, arrived_ms=6000,
            head=None, head_seq=3, model="m1", served=frozenset({"m1"}),
        )  # fmt: skip
        self.assertEqual(await self.store.claim(claim), ClaimAnswer(False, 0, 1))
        claim = ClaimRequest(
            backend="d", replica="a", lease="a|2", limit=1, ttl_ms=3000, arrived_ms=6000,
            head=None, head_seq=4, model="m3", served=frozenset({"m3"}),
        )  # fmt: skip
        self.assertEqual(await self.store.claim(claim), ClaimAnswer(True, 1, 0))


class SharedRoutingTest(unittest.IsolatedAsyncioTestCase):
    async def test_a_conversation_stays_on_its_backend_through_every_replica(self) -> None:
        configs = [SimConfig(slots=2, profile="test", default_max_tokens=24) for _ in range(3)]
        async with redis_server() as redis, sims(*configs) as fleet, AsyncExitStack() as stack:
            lbs = await replicas_of(stack, fleet, redis.url, 3)
            async with aiohttp.ClientSession() as session:
                for conversation in range(4):
                    messages = [
                        {"role": "system", "content": f"{conversation}: {SYSTEM}"},
                        {"role": "user", "content": "first question"},
                    ]
                    served_by = []
                    for turn in range(3):
                        before = [len(sim.requests) for sim in fleet]
                        # The last turn has ended everywhere (a person takes longer than
                        # the release takes to reach the other replicas).
                        await wait_until(
                            lambda: all(
                                b.slots.elsewhere == 0
                                for lb in lbs
                                for b in lb.balancer.registry.backends
                            )
                        )
                        status, answer = await chat(session, lbs[turn].url, messages)
                        self.assertEqual(status, 200)
                        served_by.append(
                            next(
                                i
                                for i, sim in enumerate(fleet)
                                if any(
                                    r.path == "/v1/chat/completions"
                                    for r in sim.requests[before[i] :]
                                )
                            )
                        )
                        if turn:
                            # The earlier turns were computed there: this one reused them.
                            self.assertGreater(answer["timings"]["cache_n"], 400)
                        messages += [
                            {
                                "role": "assistant",
                                "content": answer["choices"][0]["message"]["content"],
                            },
                            {"role": "user", "content": f"question {turn + 2}"},
                        ]
                    self.assertEqual(len(set(served_by)), 1, served_by)


class SharedLimitsTest(unittest.IsolatedAsyncioTestCase):
    async def test_a_keys_rate_limit_holds_across_replicas(self) -> None:
        keys = [{"id": "team", "key": "team-secret", "requests_per_minute": 5}]
        async with (
            redis_server() as redis,
            sims(SimConfig(slots=4, profile="test")) as fleet,
            AsyncExitStack() as stack,
        ):
            lbs = await replicas_of(stack, fleet, redis.url, 3, api_keys=keys)
            headers = {"Authorization": "Bearer team-secret"}
            async with aiohttp.ClientSession() as session:
                statuses = [
                    (
                        await chat(
                            session, lbs[i % 3].url, [{"role": "user", "content": "x"}], headers
                        )
                    )[0]
                    for i in range(9)
                ]
            self.assertEqual(sorted(statuses), [200] * 5 + [429] * 4)
            self.assertEqual(statuses[:5], [200] * 5)

    async def test_a_keys_concurrency_holds_across_replicas(self) -> None:
        keys = [{"id": "team", "key": "team-secret", "max_concurrent": 2}]
        async with (
            redis_server() as redis,
            sims(SimConfig(slots=4, profile="test")) as fleet,
            AsyncExitStack() as stack,
        ):
            lbs = await replicas_of(stack, fleet, redis.url, 3, api_keys=keys)
            headers = {"Authorization": "Bearer team-secret"}
            body = chat_body([{"role": "user", "content": "x"}], max_tokens=2000, stream=True)
            async with aiohttp.ClientSession() as session:
                streams = [
                    await session.post(
                        lbs[i].url + "/v1/chat/completions", json=body, headers=headers
                    )
                    for i in range(2)
                ]
                self.assertEqual([s.status for s in streams], [200, 200])
                status, answer = await chat(
                    session, lbs[2].url, [{"role": "user", "content": "y"}], headers
                )
                self.assertEqual(status, 429)
                self.assertIn("2 requests in flight", answer["error"]["message"])
                for stream in streams:
                    stream.close()
                # Released in shared state too: the third replica admits the key again.
                await wait_until(
                    lambda: all(
                        lb.balancer.key_limits.in_flight("team") == 0
                        and shared(lb.balancer).pending == 0
                        for lb in lbs
                    )
                )
                status, _ = await chat(
                    session, lbs[2].url, [{"role": "user", "content": "y"}], headers
                )
                self.assertEqual(status, 200)


class OperationsAcrossReplicasTest(unittest.IsolatedAsyncioTestCase):
    async def test_a_drain_and_an_added_backend_reach_every_replica(self) -> None:
        configs = [SimConfig(slots=2, profile="test"), SimConfig(slots=2, profile="test")]
        async with redis_server() as redis, sims(*configs) as (one, two), AsyncExitStack() as stack:
            lbs = await replicas_of(stack, [one], redis.url, 3, admin_keys=["admin-secret"])
            name = lbs[0].balancer.registry.backends[0].name
            async with aiohttp.ClientSession() as session:
                async with session.post(
                    f"{lbs[0].url}/admin/backends/{name}/drain", headers=ADMIN
                ) as response:
                    self.assertEqual(response.status, 200)
                await wait_until(lambda: all(lb.balancer.registry.get(name).draining for lb in lbs))
                async with session.post(
                    f"{lbs[1].url}/admin/backends",
                    json={"url": two.url, "name": "added"},
                    headers=ADMIN,
                ) as response:
                    self.assertEqual(response.status, 201)
                await wait_until(
                    lambda: all(
                        any(b.name == "added" and b.routable for b in lb.balancer.registry.backends)
                        for lb in lbs
                    )
                )
                status, _ = await chat(session, lbs[2].url, [{"role": "user", "content": "x"}])
                self.assertEqual(status, 200)
            self.assertEqual(len([r for r in two.requests if r.path.startswith("/v1/chat")]), 1)

    async def test_a_reload_and_a_removal_reach_every_replica(self) -> None:
        configs = [SimConfig(slots=2, profile="test"), SimConfig(slots=2, profile="test")]
        async with redis_server() as redis, sims(*configs) as (one, two), AsyncExitStack() as stack:
            lbs = await replicas_of(stack, [one, two], redis.url, 3, admin_keys=["admin-secret"])
            for lb in lbs:
                # What each replica would read again: its own file, here the same change.
                running = lb.balancer.config
                lb.balancer.config_source = lambda c=running: c.model_copy(update={"max_queue": 7})
            name = lbs[0].balancer.registry.backends[1].name
            async with aiohttp.ClientSession() as session:
                async with session.post(f"{lbs[0].url}/admin/reload", headers=ADMIN) as response:
                    self.assertEqual(response.status, 200)
                await wait_until(
                    lambda: all(lb.balancer.scheduler.max_queue == 7 for lb in lbs), within_s=15
                )
                async with session.delete(
                    f"{lbs[1].url}/admin/backends/{name}", headers=ADMIN
                ) as response:
                    self.assertEqual(response.status, 202)
                await wait_until(
                    lambda: all(len(lb.balancer.registry.backends) == 1 for lb in lbs), within_s=15
                )

    async def test_metrics_and_the_monitor_say_which_replica_they_are(self) -> None:
        async with (
            redis_server() as redis,
            sims(SimConfig(slots=2, profile="test")) as fleet,
            AsyncExitStack() as stack,
        ):
            lbs = await replicas_of(stack, fleet, redis.url, 2)
            async with aiohttp.ClientSession() as session:
                async with session.get(lbs[1].url + "/metrics") as response:
                    text = await response.text()
                async with session.get(lbs[1].url + "/monitor/data") as response:
                    data = await response.json()
                self.assertIn('llamacpp_ha_replica_info{replica="r1"} 1.0', text)
                self.assertIn('llamacpp_ha_shared_state_up{replica="r1"} 1.0', text)
                self.assertIn('llamacpp_ha_replicas_live{replica="r1"} 2.0', text)
                self.assertEqual(data["replicas"]["replica"], "r1")
                self.assertEqual(data["replicas"]["replicas"], ["r0", "r1"])
                self.assertTrue(data["replicas"]["shared"])
                await redis.stop()
                await wait_until(lambda: not shared(lbs[1].balancer).up, within_s=10)
                async with session.get(lbs[1].url + "/metrics") as response:
                    self.assertIn(
                        'llamacpp_ha_shared_state_up{replica="r1"} 0.0', await response.text()
                    )
                async with session.get(lbs[1].url + "/monitor/data") as response:
                    self.assertFalse((await response.json())["replicas"]["shared"])


class RedisAwayTest(unittest.IsolatedAsyncioTestCase):
    async def test_redis_killed_mid_load_fails_no_request_and_sharing_resumes(self) -> None:
        configs = [SimConfig(slots=2, profile="test", default_max_tokens=200) for _ in range(2)]
        async with redis_server() as redis, sims(*configs) as fleet, AsyncExitStack() as stack:
            lbs = await replicas_of(stack, fleet, redis.url, 3)
            statuses: list[int] = []

            async def client(n: int) -> None:
                # A connection to a replica can idle past the replica's keep-alive (5 s) while
                # this client talks to the others on a loaded machine; a client must not reuse
                # one the server may be closing (aiohttp's own default is 15 s).
                connector = aiohttp.TCPConnector(keepalive_timeout=2)
                async with aiohttp.ClientSession(connector=connector) as session:
                    for i in range(12):
                        status, _ = await chat(
                            session, lbs[(n + i) % 3].url, [{"role": "user", "content": f"{n}"}]
                        )
                        statuses.append(status)

            clients = [asyncio.create_task(client(n)) for n in range(6)]
            await wait_until(lambda: len(statuses) >= 12, within_s=20)
            await redis.stop()
            await wait_until(lambda: not any(shared(lb.balancer).up for lb in lbs), within_s=10)
            at_outage = len(statuses)
            await wait_until(lambda: len(statuses) >= at_outage + 12, within_s=20)
            await redis.start()
            await wait_until(lambda: all(shared(lb.balancer).up for lb in lbs), within_s=10)
            back_at = len(statuses)
            await asyncio.gather(*clients)
            self.assertEqual(statuses, [200] * 72)
            self.assertLess(at_outage, back_at)
            self.assertLess(back_at, 72, "sharing resumed only after the load had ended")
            # While apart, each replica took at most its share (2 slots / 3, rounded up): a
            # backend held at most 3 requests, one waiting inside it.
            self.assertLessEqual(max(sim.max_deferred for sim in fleet), 1)
            for lb in lbs:
                self.assertEqual(shared(lb.balancer).stats.outages, 1)


class ReplicaLeavesTest(unittest.IsolatedAsyncioTestCase):
    async def test_a_replica_that_stops_cleanly_is_no_longer_counted(self) -> None:
        async with (
            redis_server() as redis,
            sims(SimConfig(slots=2, profile="test")) as fleet,
            balancer_for(fleet, state_url=redis.url, replica_id="stays", lease_ttl_s=30) as stays,
        ):
            async with balancer_for(fleet, state_url=redis.url, replica_id="goes", lease_ttl_s=30):
                await shared(stays.balancer).refresh()
                self.assertEqual(shared(stays.balancer).live, ("goes", "stays"))
            # Long before its heartbeat (30 s) would have expired.
            await shared(stays.balancer).refresh()
            self.assertEqual(shared(stays.balancer).live, ("stays",))


class ReplicaDiesTest(unittest.IsolatedAsyncioTestCase):
    async def test_a_sigkilled_replicas_slots_come_back_within_the_lease_ttl(self) -> None:
        ttl_s = 2.0
        config = SimConfig(slots=2, profile="test", default_max_tokens=16)
        async with (
            redis_server() as redis,
            sims(config) as fleet,
            balancer_for(
                fleet, state_url=redis.url, replica_id="survivor", lease_ttl_s=ttl_s
            ) as survivor,
        ):
            port = free_port()
            doomed = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "llamacpp_ha",
                "--backend",
                fleet[0].url,
                "--port",
                str(port),
                "--state-url",
                redis.url,
                "--replica-id",
                "doomed",
                "--lease-ttl",
                str(ttl_s),
                "--poll-interval",
                "0.1",
                "--log-level",
                "warning",
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            try:
                lb = survivor.balancer
                await wait_until(lambda: len(shared(lb).live) == 2, within_s=20)
                body = chat_body(
                    [{"role": "user", "content": "x"}], max_tokens=100_000, stream=True
                )
                async with aiohttp.ClientSession() as session:
                    await until_healthy(session, f"http://127.0.0.1:{port}")
                    streams = []
                    for _ in range(2):
                        stream = await session.post(
                            f"http://127.0.0.1:{port}/v1/chat/completions", json=body
                        )
                        self.assertEqual(stream.status, 200)
                        streams.append(stream)
                    backend = lb.registry.backends[0]
                    await wait_until(lambda: backend.slots.elsewhere == 2)
                    os.kill(doomed.pid, signal.SIGKILL)
                    killed_at = time.monotonic()
                    await wait_until(lambda: backend.slots.elsewhere == 0, within_s=3 * ttl_s)
                    came_back_s = time.monotonic() - killed_at
                    for stream in streams:
                        stream.close()
                    status, _ = await chat(
                        session, survivor.url, [{"role": "user", "content": "y"}]
                    )
                self.assertEqual(status, 200)
                # Expired, then swept by the survivor's next refresh (every ttl / 3).
                self.assertLess(came_back_s, ttl_s * 4 / 3 + 1)
            finally:
                if doomed.returncode is None:
                    doomed.kill()
                await doomed.wait()


if __name__ == "__main__":
    unittest.main()


class WorkersTest(unittest.IsolatedAsyncioTestCase):
    async def test_workers_share_the_port_and_the_state_and_stop_together(self) -> None:
        config = SimConfig(slots=2, profile="test", default_max_tokens=200)
        async with redis_server() as redis, sims(config) as fleet:
            port = free_port()
            parent = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "llamacpp_ha",
                "--backend",
                fleet[0].url,
                "--port",
                str(port),
                "--state-url",
                redis.url,
                "--workers",
                "2",
                "--poll-interval",
                "0.1",
                "--log-level",
                "warning",
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            base = f"http://127.0.0.1:{port}"
            try:
                seen: set[str] = set()
                async with asyncio.timeout(30):
                    while len(seen) < 2:
                        # A new connection each time: the kernel picks the worker.
                        async with aiohttp.ClientSession() as session:
                            await until_healthy(session, base)
                            async with session.get(base + "/monitor/data") as response:
                                data = await response.json()
                        if len(data["replicas"]["replicas"]) == 2:
                            seen.add(data["replicas"]["replica"])
                answers = await asyncio.gather(*(self.one_request(base, i) for i in range(16)))
                self.assertEqual(answers, [200] * 16)
                self.assertEqual(fleet[0].max_deferred, 0)
                parent.send_signal(signal.SIGTERM)
                self.assertEqual(await asyncio.wait_for(parent.wait(), 15), 0)
            finally:
                if parent.returncode is None:
                    parent.kill()
                    await parent.wait()

    async def one_request(self, base: str, i: int) -> int:
        async with aiohttp.ClientSession() as session:
            status, _ = await chat(session, base, [{"role": "user", "content": f"{i}"}])
            return status
