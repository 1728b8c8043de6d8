from __future__ import annotations

import asyncio
import unittest
from collections.abc import Callable, Sequence
from dataclasses import replace

from fleet import make_registry, set_ready
from llamacpp_ha.errors import NoHealthyBackend, QueueFull, QueueTimeout
from llamacpp_ha.policies import (
    BackendCandidate,
    Policy,
    RoundRobinPolicy,
    RoutingRequest,
    RoutingSettings,
    build_policy,
)
from llamacpp_ha.prefix_index import CacheIndex, PrefixIndex, PromptKeys, prompt_keys
from llamacpp_ha.queue import RequestQueue
from llamacpp_ha.registry import Health, Registry
from llamacpp_ha.scheduler import Lease, RoutingView, Scheduler
from sim_support import wait_until


class SchedulerFixture(unittest.IsolatedAsyncioTestCase):
    def build(
        self,
        *specs: tuple[str, int, tuple[str, ...]],
        max_queue: int = 100,
        policy: str | Policy = "round-robin",
        index: PrefixIndex | None = None,
    ) -> tuple[Scheduler, Registry, RequestQueue]:
        queue = RequestQueue()
        registry = make_registry(*specs, on_change=queue.wakeup.set)
        self.sessions = CacheIndex(ttl_s=60, max_entries=100)
        scheduler = Scheduler(
            queue,
            registry,
            build_policy(policy) if isinstance(policy, str) else policy,
            index or self.sessions,
            max_queue=max_queue,
        )
        scheduler.start()
        self.addAsyncCleanup(scheduler.aclose)
        return scheduler, registry, queue

    async def acquire(
        self, scheduler: Scheduler, model: str | None = None, within_s: float = 5.0
    ) -> Lease:
        return await scheduler.acquire(RoutingRequest(model=model), timeout_s=within_s)


class SchedulerTest(SchedulerFixture):
    async def test_free_slot_is_granted_without_queueing(self) -> None:
        scheduler, registry, queue = self.build(("a", 1, ("m",)))
        lease = await asyncio.wait_for(self.acquire(scheduler), 1)
        self.assertEqual(lease.backend.name, "a")
        self.assertEqual(registry.get("a").slots.in_flight, 1)
        self.assertEqual(len(queue), 0)

    async def test_never_more_in_flight_than_slots(self) -> None:
        scheduler, registry, queue = self.build(("a", 2, ("m",)), ("b", 1, ("m",)))
        leases = [await self.acquire(scheduler) for _ in range(3)]
        self.assertEqual(sorted(lease.backend.name for lease in leases), ["a", "a", "b"])
        waiter = asyncio.create_task(self.acquire(scheduler))
        await wait_until(lambda: len(queue) == 1)
        self.assertFalse(waiter.done())
        on_b = next(lease for lease in leases if lease.backend.name == "b")
        await on_b.release()
        lease = await asyncio.wait_for(waiter, 1)
        self.assertEqual(lease.backend.name, "b")
        for backend in registry.backends:
            self.assertLessEqual(backend.slots.in_flight, backend.slots.total)

    async def test_fifo_order_under_contention(self) -> None:
        scheduler, _, queue = self.build(("a", 1, ("m",)))
        first = await self.acquire(scheduler)
        order: list[int] = []

        async def wait(i: int) -> None:
            lease = await self.acquire(scheduler)
            order.append(i)
            await asyncio.sleep(0)
            await lease.release()

        waiters = []
        for i in range(5):
            waiters.append(asyncio.create_task(wait(i)))

            def enqueued(n: int = i + 1) -> bool:
                return len(queue) == n

            await wait_until(enqueued)  # enqueued in this order
        await first.release()
        await asyncio.wait_for(asyncio.gather(*waiters), 2)
        self.assertEqual(order, [0, 1, 2, 3, 4])

    async def test_other_model_is_not_held_behind(self) -> None:
        scheduler, _, queue = self.build(("a", 1, ("ma",)), ("b", 1, ("mb",)))
        held = await self.acquire(scheduler, "ma")
        blocked = asyncio.create_task(self.acquire(scheduler, "ma"))
        await wait_until(lambda: len(queue) == 1)
        lease = await asyncio.wait_for(self.acquire(scheduler, "mb"), 1)
        self.assertEqual(lease.backend.name, "b")
        self.assertFalse(blocked.done())
        await held.release()
        self.assertEqual((await asyncio.wait_for(blocked, 1)).backend.name, "a")

    async def test_queue_full_rejects_at_once(self) -> None:
        scheduler, _, queue = self.build(("a", 1, ("m",)), max_queue=2)
        await self.acquire(scheduler)
        waiters = [asyncio.create_task(self.acquire(scheduler)) for _ in range(2)]
        await wait_until(lambda: len(queue) == 2)
        with self.assertRaises(QueueFull) as caught:
            await asyncio.wait_for(self.acquire(scheduler), 1)
        self.assertEqual(caught.exception.status, 503)
        self.assertIn("Retry-After", caught.exception.headers())
        self.assertEqual(len(queue), 2)
        for waiter in waiters:
            waiter.cancel()

    async def test_max_queue_zero_still_serves_free_slots(self) -> None:
        scheduler, _, _ = self.build(("a", 1, ("m",)), max_queue=0)
        await self.acquire(scheduler)
        with self.assertRaises(QueueFull):
            await self.acquire(scheduler)

    async def test_queue_timeout(self) -> None:
        scheduler, _, queue = self.build(("a", 1, ("m",)))
        await self.acquire(scheduler)
        with self.assertRaises(QueueTimeout) as caught:
            await self.acquire(scheduler, within_s=0.05)
        self.assertEqual(caught.exception.status, 503)
        self.assertEqual(len(queue), 0)

    async def test_cancelled_waiter_leaves_queue_and_is_never_dispatched(self) -> None:
        scheduler, registry, queue = self.build(("a", 1, ("m",)))
        held = await self.acquire(scheduler)
        waiter = asyncio.create_task(self.acquire(scheduler))
        await wait_until(lambda: len(queue) == 1)
        waiter.cancel()
        with self.assertRaises(asyncio.CancelledError):
            await waiter
        self.assertEqual(len(queue), 0)
        await held.release()
        await wait_until(lambda: not queue.wakeup.is_set())  # the drain has run since
        self.assertEqual(registry.get("a").slots.in_flight, 0)

    async def test_release_wakes_the_next_waiter(self) -> None:
        scheduler, _, queue = self.build(("a", 1, ("m",)))
        held = await self.acquire(scheduler)
        waiter = asyncio.create_task(self.acquire(scheduler))
        await wait_until(lambda: len(queue) == 1)
        await held.release()
        await asyncio.wait_for(waiter, 1)

    async def test_lease_release_is_idempotent(self) -> None:
        scheduler, registry, _ = self.build(("a", 2, ("m",)))
        lease = await self.acquire(scheduler)
        await self.acquire(scheduler)
        await lease.release()
        await lease.release()
        self.assertEqual(registry.get("a").slots.in_flight, 1)

    async def test_no_ready_backend_fails_fast(self) -> None:
        scheduler, registry, _ = self.build(("a", 1, ("m",)))
        registry.get("a").health = Health.DEAD
        with self.assertRaises(NoHealthyBackend):
            await asyncio.wait_for(self.acquire(scheduler), 1)

    async def test_backend_coming_back_drains_queue(self) -> None:
        scheduler, registry, queue = self.build(("a", 1, ("m",)), ("b", 1, ("m",)))
        await self.acquire(scheduler)
        await self.acquire(scheduler)
        waiter = asyncio.create_task(self.acquire(scheduler))
        await wait_until(lambda: len(queue) == 1)
        registry.get("a").health = Health.DEAD
        registry.get("b").health = Health.DEAD
        set_ready(registry.get("a"), 2)  # back, restarted with two slots
        queue.wakeup.set()  # what the registry's poll does on a change
        self.assertEqual((await asyncio.wait_for(waiter, 1)).backend.name, "a")

    async def test_excluded_backend_is_skipped(self) -> None:
        scheduler, _, _ = self.build(("a", 1, ("m",)), ("b", 1, ("m",)))
        lease = await scheduler.acquire(
            RoutingRequest(model=None, exclude=frozenset({"a"})), timeout_s=1
        )
        self.assertEqual(lease.backend.name, "b")

    async def test_retry_goes_to_the_front(self) -> None:
        scheduler, _, queue = self.build(("a", 1, ("m",)))
        held = await self.acquire(scheduler)
        normal = asyncio.create_task(self.acquire(scheduler))
        await wait_until(lambda: len(queue) == 1)
        retry = asyncio.create_task(
            scheduler.acquire(RoutingRequest(model=None), timeout_s=5, retry=True)
        )
        await wait_until(lambda: len(queue) == 2)
        await held.release()
        await asyncio.wait_for(retry, 1)
        self.assertFalse(normal.done())
        normal.cancel()

    async def test_affinity_uses_session_store(self) -> None:
        scheduler, _, _ = self.build(("a", 2, ("m",)), ("b", 2, ("m",)), policy="affinity")
        self.sessions.record("b", ("k1",), 10)
        for _ in range(2):
            lease = await scheduler.acquire(
                RoutingRequest(model=None, prompt=PromptKeys(("k0", "k1"), (256, 512), 600)),
                timeout_s=1,
            )
            self.assertEqual(lease.backend.name, "b")
        lease = await scheduler.acquire(
            RoutingRequest(model=None, prompt=PromptKeys(("k0", "k1"), (256, 512), 600)),
            timeout_s=1,
        )
        self.assertEqual(lease.backend.name, "a")  # b is full: fall back rather than wait

    async def test_round_robin_spreads(self) -> None:
        scheduler, _, _ = self.build(("a", 4, ("m",)), ("b", 4, ("m",)))
        names = [(await self.acquire(scheduler)).backend.name for _ in range(4)]
        self.assertEqual(names, ["a", "b", "a", "b"])

    async def test_start_is_plain_function(self) -> None:
        queue = RequestQueue()
        scheduler = Scheduler(
            queue, make_registry(("a", 1, ("m",))), RoundRobinPolicy(), CacheIndex(1, 1), 1
        )
        # Typed as returning anything, so the test can see what a call really returns.
        start: Callable[[], object] = scheduler.start
        self.assertIsNone(start())
        await scheduler.aclose()


def raising(candidates: Sequence[BackendCandidate], request: RoutingRequest) -> str | None:
    raise ZeroDivisionError


def naming(name: str) -> Policy:
    return lambda candidates, request: name


class FailingIndex:
    """A prefix index whose first `failures` lookups raise, as a broken shared store might."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.store = CacheIndex(ttl_s=60, max_entries=100)

    def match(self, keys: Sequence[str]) -> dict[str, int]:
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("index unavailable")
        return self.store.match(keys)

    def record(self, backend: str, keys: Sequence[str], tokens: int) -> None:
        self.store.record(backend, keys, tokens)

    def correct(self, backend: str, keys: Sequence[str], predicted: int, found: int) -> None:
        self.store.correct(backend, keys, predicted, found)

    def set_capacity(self, backend: str, tokens: int) -> None:
        self.store.set_capacity(backend, tokens)

    def forget_backend(self, backend: str) -> None:
        self.store.forget_backend(backend)

    def configure(self, ttl_s: float, max_entries: int) -> None:
        self.store.configure(ttl_s, max_entries)


class BrokenPolicyTest(SchedulerFixture):
    """A policy or index that fails must not stall the queue or leak a slot."""

    async def test_a_policy_that_raises_is_overruled_by_least_busy(self) -> None:
        scheduler, registry, queue = self.build(("a", 1, ("m",)), ("b", 2, ("m",)), policy=raising)
        with self.assertLogs("llamacpp_ha.scheduler", "ERROR") as logged:
            lease = await asyncio.wait_for(self.acquire(scheduler), 1)
        self.assertIn(lease.backend.name, {"a", "b"})
        self.assertIn("ZeroDivisionError", logged.output[0])
        self.assertEqual(len(queue), 0)
        await lease.release()
        self.assertEqual([b.slots.in_flight for b in registry.backends], [0, 0])

    async def test_a_policy_naming_an_unknown_backend_is_overruled(self) -> None:
        scheduler, _, _ = self.build(("a", 1, ("m",)), policy=naming("gone"))
        with self.assertLogs("llamacpp_ha.scheduler", "ERROR"):
            lease = await asyncio.wait_for(self.acquire(scheduler), 1)
        self.assertEqual(lease.backend.name, "a")

    async def test_a_policy_naming_a_full_backend_never_overfills_it(self) -> None:
        scheduler, registry, _ = self.build(("a", 1, ("m",)), ("b", 1, ("m",)), policy=naming("a"))
        first = await asyncio.wait_for(self.acquire(scheduler), 1)
        self.assertEqual(first.backend.name, "a")
        with self.assertLogs("llamacpp_ha.scheduler", "ERROR"):
            second = await asyncio.wait_for(self.acquire(scheduler), 1)
        self.assertEqual(second.backend.name, "b")
        for backend in registry.backends:
            self.assertLessEqual(backend.slots.in_flight, backend.slots.total)

    async def test_a_failing_drain_is_logged_and_runs_again(self) -> None:
        index = FailingIndex(failures=1)
        scheduler, _, queue = self.build(("a", 1, ("m",)), index=index)
        with self.assertLogs("llamacpp_ha.scheduler", "ERROR") as logged:
            lease = await asyncio.wait_for(
                scheduler.acquire(
                    RoutingRequest(model=None, prompt=PromptKeys(("k",), (256,), 300)), timeout_s=5
                ),
                2,
            )
        self.assertIn("ConnectionError", logged.output[0])
        self.assertEqual(lease.backend.name, "a")
        self.assertEqual((index.failures, len(queue)), (0, 0))


class ContextFitTest(SchedulerFixture):
    """Never a backend whose slots cannot hold the request while another's can."""

    def fleet(self) -> tuple[Scheduler, Registry, RequestQueue]:
        built = self.build(("small", 2, ("m",)), ("large", 1, ("m",)), policy="round-robin")
        built[1].get("small").n_ctx = 1000
        built[1].get("large").n_ctx = 8000
        return built

    async def test_a_long_request_goes_where_it_fits_and_waits_for_it(self) -> None:
        scheduler, _, queue = self.fleet()
        long = RoutingRequest(model=None, prompt_tokens=3000, max_tokens=500)
        first = await asyncio.wait_for(scheduler.acquire(long, timeout_s=1), 1)
        self.assertEqual(first.backend.name, "large")
        waiter = asyncio.create_task(scheduler.acquire(long, timeout_s=5))
        await wait_until(lambda: len(queue) == 1)  # "small" is free, but too small
        await first.release()
        self.assertEqual((await asyncio.wait_for(waiter, 1)).backend.name, "large")

    async def test_short_requests_use_every_backend(self) -> None:
        scheduler, _, _ = self.fleet()
        short = RoutingRequest(model=None, prompt_tokens=100, max_tokens=100)
        names = {(await scheduler.acquire(short, timeout_s=1)).backend.name for _ in range(3)}
        self.assertEqual(names, {"small", "large"})

    async def test_when_none_fits_the_largest_answers(self) -> None:
        scheduler, _, _ = self.fleet()
        huge = RoutingRequest(model=None, prompt_tokens=20_000)
        lease = await asyncio.wait_for(scheduler.acquire(huge, timeout_s=1), 1)
        self.assertEqual(lease.backend.name, "large")


def conversation(name: str, turns: int = 1, system_bytes: int = 16_000) -> RoutingRequest:
    """A chat request with a long system prompt of its own and `turns` user messages."""
    messages = [{"role": "system", "content": name * (system_bytes // len(name))}]
    messages += [{"role": "user", "content": f"question {t}"} for t in range(turns)]
    prompt = prompt_keys({"model": "m", "messages": messages})
    return RoutingRequest(model=None, prompt=prompt, prompt_tokens=prompt.size // 4, pinnable=True)


class CostSchedulingTest(SchedulerFixture):
    """The cost policy's scheduling: reordering, waiting for a cached backend, pinning."""

    async def test_no_pin_unless_asked(self) -> None:
        scheduler, _, _ = self.build_cost(("a", 2, ("m",)))
        await self.served(scheduler, conversation("x"))
        lease = await scheduler.acquire(conversation("x", 2), timeout_s=1)
        self.assertIsNone(lease.claim.slot_id)
        await lease.release()

    def cost(self, **settings: float | bool) -> Policy:
        self.settings = RoutingSettings(**settings)  # type: ignore[arg-type]
        return build_policy("cost", self.settings)

    def build_cost(
        self, *specs: tuple[str, int, tuple[str, ...]], **settings: float | bool
    ) -> tuple[Scheduler, Registry, RequestQueue]:
        scheduler, registry, queue = self.build(*specs, policy=self.cost(**settings))
        scheduler.settings = self.settings
        return scheduler, registry, queue

    async def served(self, scheduler: Scheduler, routing: RoutingRequest) -> Lease:
        """One request through the scheduler, recorded as computed where it ran."""
        lease = await scheduler.acquire(routing, timeout_s=5)
        self.sessions.record(lease.backend_name, routing.prompt.keys, routing.prompt_tokens)
        await lease.release()
        return lease

    async def test_when_a_slot_frees_follows_what_the_backend_is_learned_to_do(self) -> None:
        # Claimed while "a" was not yet measured: the stand-in figures (an answer of 256
        # tokens at 50 a second) put its end seconds away. Once "a" is measured at 2,000
        # tokens a second and 64-token answers, the same claim should end within a tenth of one.
        scheduler, registry, _ = self.build_cost(("a", 1, ("m",)))
        lease = await scheduler.acquire(conversation("x"), timeout_s=1)
        (a,) = registry.backends
        view = RoutingView(registry.backends, self.sessions)
        before = view.candidates(registry.backends, conversation("y"))[0].wait_s
        a.speeds = replace(
            a.speeds,
            decode_tps=2000.0,
            completion_tokens=64.0,
            prefill_tps=100_000.0,
            measured={"decode_tps", "completion_tokens", "prefill_tps"},
        )
        view = RoutingView(registry.backends, self.sessions)
        after = view.candidates(registry.backends, conversation("y"))[0].wait_s
        self.assertGreater(before, 2.0)
        self.assertLess(after, 0.1)
        await lease.release()

    async def test_a_freed_slot_goes_to_the_request_behind_that_gains_more(self) -> None:
        scheduler, _, queue = self.build_cost(
            ("a", 1, ("m",)), ("b", 1, ("m",)), reorder_window_s=5, reorder_max=4
        )
        x_first = await self.served(scheduler, conversation("x"))
        held = {b: await self.acquire(scheduler) for b in ("a", "b")}
        assert {lease.backend_name for lease in held.values()} == {"a", "b"}
        head = asyncio.create_task(scheduler.acquire(conversation("h"), timeout_s=5))
        behind = asyncio.create_task(scheduler.acquire(conversation("x", 2), timeout_s=5))
        await wait_until(lambda: len(queue) == 2)
        holder = next(
            lease for lease in held.values() if lease.backend_name == x_first.backend_name
        )
        await holder.release()
        lease = await asyncio.wait_for(behind, 2)
        self.assertEqual(lease.backend_name, x_first.backend_name)  # where its prompt is
        self.assertFalse(head.done())  # passed over once, for the next slot
        self.assertEqual(scheduler.stats.reordered, 1)
        for other in held.values():
            await other.release()
        self.assertNotEqual((await asyncio.wait_for(head, 2)).backend_name, lease.backend_name)
        self.assertGreater(scheduler.stats.max_reorder_delay_s, 0)
        self.assertLess(scheduler.stats.max_reorder_delay_s, 5)

    async def test_strict_order_when_the_window_is_closed(self) -> None:
        scheduler, _, queue = self.build_cost(("a", 1, ("m",)), ("b", 1, ("m",)), reorder_max=0)
        x_first = await self.served(scheduler, conversation("x"))
        held = [await self.acquire(scheduler) for _ in range(2)]
        head = asyncio.create_task(scheduler.acquire(conversation("h"), timeout_s=5))
        behind = asyncio.create_task(scheduler.acquire(conversation("x", 2), timeout_s=5))
        await wait_until(lambda: len(queue) == 2)
        await next(h for h in held if h.backend_name == x_first.backend_name).release()
        await asyncio.wait_for(head, 2)
        self.assertFalse(behind.done())
        self.assertEqual(scheduler.stats.reordered, 0)
        for lease in held:
            await lease.release()
        await asyncio.wait_for(behind, 2)

    async def test_a_long_cached_prompt_waits_for_its_busy_backend(self) -> None:
        scheduler, registry, queue = self.build_cost(
            ("a", 1, ("m",)), ("b", 1, ("m",)), max_cache_wait_s=30
        )
        for backend in registry.backends:  # slow prefill, quick answers: a miss costs most
            backend.speeds.prefill_tps, backend.speeds.decode_tps = 100.0, 1e6
        home = (await self.served(scheduler, conversation("x"))).backend_name
        # A short request (it should end at once) occupies its home; the other stays free.
        busy = await self.acquire(scheduler)
        if busy.backend_name != home:
            blocker = await self.acquire(scheduler)
            await busy.release()
            busy = blocker
        self.assertEqual(busy.backend_name, home)
        follow_up = asyncio.create_task(scheduler.acquire(conversation("x", 2), timeout_s=5))
        await wait_until(lambda: len(queue) == 1)
        self.assertEqual(registry.get("b" if home == "a" else "a").slots.free, 1)
        self.assertFalse(follow_up.done())  # it waits although another backend is free
        await busy.release()
        self.assertEqual((await asyncio.wait_for(follow_up, 2)).backend_name, home)
        self.assertEqual(scheduler.stats.cache_waits, 1)

    async def test_it_waits_no_longer_than_max_cache_wait(self) -> None:
        scheduler, registry, _ = self.build_cost(
            ("a", 1, ("m",)), ("b", 1, ("m",)), max_cache_wait_s=0.2
        )
        for backend in registry.backends:
            backend.speeds.prefill_tps, backend.speeds.decode_tps = 100.0, 1e6
        home = (await self.served(scheduler, conversation("x"))).backend_name
        busy = await self.acquire(scheduler)
        if busy.backend_name != home:
            blocker = await self.acquire(scheduler)
            await busy.release()
            busy = blocker
        lease = await asyncio.wait_for(scheduler.acquire(conversation("x", 2), timeout_s=5), 3)
        self.assertNotEqual(lease.backend_name, home)  # it gave up waiting: the free one
        self.assertGreaterEqual(scheduler.stats.max_cache_wait_s, 0.2)
        await busy.release()

    async def test_a_follow_up_is_pinned_to_the_idle_slot_that_holds_it(self) -> None:
        scheduler, _, _ = self.build_cost(("a", 2, ("m",)), pin_slots=True)
        first = await self.served(scheduler, conversation("x"))
        self.assertIsNone(first.claim.slot_id)  # nothing known yet: llama-server chooses
        other = await self.served(scheduler, conversation("y"))
        lease = await scheduler.acquire(conversation("x", 2), timeout_s=1)
        self.assertEqual(lease.claim.slot_id, first.claim.lands_on)
        self.assertNotEqual(lease.claim.slot_id, other.claim.lands_on)
        self.assertEqual(scheduler.stats.pinned, 1)
        await lease.release()

    async def test_never_pinned_to_a_busy_slot_or_beside_outside_traffic(self) -> None:
        scheduler, registry, _ = self.build_cost(("a", 2, ("m",)), pin_slots=True)
        first = await self.served(scheduler, conversation("x"))
        holder = await scheduler.acquire(conversation("x", 2), timeout_s=1)  # pinned, busy
        self.assertEqual(holder.claim.slot_id, first.claim.lands_on)
        lease = await scheduler.acquire(conversation("x", 3), timeout_s=1)
        self.assertIsNone(lease.claim.slot_id)  # its slot is busy: llama-server chooses
        await lease.release()
        await holder.release()
        backend = registry.get("a")
        backend.slots.observe(total=2, busy_on_backend=1)  # a request that went around us
        lease = await scheduler.acquire(conversation("x", 4), timeout_s=1)
        self.assertIsNone(lease.claim.slot_id)
        await lease.release()
        self.assertEqual(scheduler.stats.pinned, 1)
