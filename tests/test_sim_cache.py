"""The simulator's prompt-cache model against llama-server's rules (pinned tools/server sources).

Each case names the function of server-context.cpp or server-task.cpp it holds the model to.
The end-to-end check against the real binary is tests/e2e/test_e2e_cache_fidelity.py.
"""

from __future__ import annotations

import asyncio
import json
import time
import unittest

from llamacpp_sim import PROFILES, SimConfig
from llamacpp_sim.engine import CONTEXT_EXCEEDED, Engine, GenTask
from llamacpp_sim.profiles import Profile
from llamacpp_sim.prompt_cache import HostCache, PromptCaches, StateSize
from sim_support import STEP_TIMEOUT_S, SimTestCase, wait_until

# The e2e tiny model: 2 layers of 4 KV heads x 16, f16 K and V.
TINY = StateSize(kv_bytes_per_token=512, n_layer=2, n_stream=2)


def seq(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def host(limit_bytes: int = 0, limit_tokens: int = 0) -> HostCache:
    return HostCache(limit_bytes, limit_tokens, TINY)


def caches(
    n_slots: int = 2,
    *,
    host_cache: HostCache | None = None,
    similarity: float = 0.1,
    idle: bool = False,
    unified: bool = False,
) -> PromptCaches:
    return PromptCaches(
        n_slots,
        similarity=similarity,
        host=host_cache,
        cache_idle_slots=idle,
        kv_unified=unified,
    )


def done(pc: PromptCaches, slot_id: int, tokens: list[int], now: float) -> None:
    """The slot finished a request and holds ``tokens``."""
    pc.slots[slot_id].tokens[:] = tokens
    pc.release(slot_id, now)


class StateSizeTest(unittest.TestCase):
    def test_matches_what_llama_server_reports(self) -> None:
        # The pinned llama-server with the tiny model and -np 2 logs "saving prompt with length
        # 106, total state size = 0.053 MiB" (llama-kv-cache.cpp state_write()).
        self.assertAlmostEqual(TINY.of(106) / 2**20, 0.053, places=3)
        self.assertEqual(TINY.of(106), 12 + 8 + 48 + 106 * 524)
        self.assertEqual(TINY.of(0), 12)

    def test_profiles_size_their_states(self) -> None:
        gpu = PROFILES["gpu-8b"]
        self.assertEqual(gpu.kv_bytes_per_token, 128 * 1024)
        config = SimConfig(profile="gpu-8b", slots=4)
        cache = config.host_cache()
        assert cache is not None
        # --cache-ram 8192 (MiB, the default) holds about 65k tokens of an 8B model.
        per_token = config.state_size().of(2) - config.state_size().of(1)
        self.assertEqual(cache.limit_bytes // per_token, 65530)
        self.assertIsNone(SimConfig(cache_ram_mib=0).host_cache())
        self.assertIsNone(SimConfig(cache_ram_tokens=0).host_cache())
        unlimited = SimConfig(cache_ram_mib=-1, slots=2, n_ctx=1000).host_cache()
        assert unlimited is not None
        self.assertEqual((unlimited.limit_bytes, unlimited.limit_tokens), (0, 2000))


class HostCacheTest(unittest.TestCase):
    """server_prompt_cache::alloc(), load(), update() (server-task.cpp)."""

    def test_a_state_contained_in_a_saved_one_is_not_saved_again(self) -> None:
        cache = host()
        self.assertGreater(cache.save(seq(0, 100)), 0)
        self.assertEqual(cache.save(seq(0, 60)), 0)
        self.assertEqual(cache.save(seq(0, 100)), 0)
        self.assertEqual(len(cache), 1)

    def test_saved_states_the_new_one_contains_are_dropped(self) -> None:
        cache = host()
        cache.save(seq(0, 50))
        cache.save(seq(500, 50))
        cache.save(seq(0, 80))
        self.assertEqual(cache.entries(), [seq(500, 50), seq(0, 80)])

    def test_oldest_states_make_room_and_oversized_ones_are_skipped(self) -> None:
        cache = host(limit_bytes=TINY.of(100) * 2 + 10)
        for start in (0, 1000, 2000):
            cache.save(seq(start, 100))
        self.assertEqual(cache.entries(), [seq(1000, 100), seq(2000, 100)])
        self.assertLessEqual(cache.total_bytes, cache.limit_bytes)
        self.assertEqual(cache.save(seq(5000, 300)), 0)
        self.assertEqual(len(cache), 2)

    def test_restore_moves_the_state_out(self) -> None:
        # Issue item 1: load() erases what it restores, so it cannot serve two requests.
        cache = host()
        cache.save(seq(0, 100))
        prompt = [*seq(0, 90), 9999]
        self.assertEqual(cache.load([], prompt), seq(0, 100))
        self.assertEqual(len(cache), 0)
        self.assertIsNone(cache.load([], prompt))

    def test_a_match_keeping_under_a_quarter_of_a_state_is_refused(self) -> None:
        # Issue item 2: "don't trash large prompts" (f_keep < 0.25).
        cache = host()
        cache.save(seq(0, 400))
        self.assertIsNone(cache.load([], [*seq(0, 99), 9999]))  # keeps 99/400
        self.assertEqual(cache.load([], [*seq(0, 100), 9999]), seq(0, 400))  # 100/400

    def test_a_state_must_beat_the_slot_on_both_keep_and_similarity(self) -> None:
        cache = host()
        cache.save(seq(0, 200))
        prompt = [*seq(0, 120), 9999]
        # The slot keeps 60 of its 60 tokens: no saved state can keep more than all of it.
        self.assertIsNone(cache.load(seq(0, 60), prompt))
        # The slot keeps 60 of 240: the saved state keeps 120 of 200 and matches more.
        self.assertEqual(cache.load([*seq(0, 60), *seq(7000, 180)], prompt), seq(0, 200))

    def test_without_a_byte_limit_the_context_bounds_the_tokens(self) -> None:
        cache = host(limit_bytes=0, limit_tokens=250)
        for start in (0, 1000, 2000):
            cache.save(seq(start, 100))
            cache.update()
        self.assertEqual(cache.entries(), [seq(1000, 100), seq(2000, 100)])


class SlotChoiceTest(unittest.TestCase):
    """get_available_slot() and process_single_task() (server-context.cpp)."""

    def test_never_used_slots_tie_and_the_last_one_wins(self) -> None:
        pc = caches(4)
        launch = pc.launch(seq(0, 10))
        assert launch is not None
        self.assertEqual(launch.slot_id, 3)
        launch = pc.launch(seq(100, 10))
        assert launch is not None
        self.assertEqual(launch.slot_id, 2)

    def test_similar_prefix_then_least_recently_used(self) -> None:
        pc = caches(2)
        done(pc, 0, seq(0, 100), now=1.0)
        done(pc, 1, seq(1000, 100), now=2.0)
        launch = pc.launch([*seq(0, 50), 9999])
        assert launch is not None
        self.assertEqual((launch.slot_id, launch.cache_n), (0, 50))
        pc.release(0, 3.0)
        # Nothing similar above 0.1: the least recently used slot, here slot 1.
        launch = pc.launch(seq(5000, 20))
        assert launch is not None
        self.assertEqual((launch.slot_id, launch.cache_n), (1, 0))

    def test_similarity_zero_always_takes_the_lru_slot(self) -> None:
        pc = caches(2, similarity=0.0)
        done(pc, 0, seq(0, 100), now=2.0)
        done(pc, 1, seq(1000, 100), now=1.0)
        launch = pc.launch([*seq(0, 99), 9999])
        assert launch is not None
        self.assertEqual((launch.slot_id, launch.cache_n), (1, 0))

    def test_a_whole_prompt_in_cache_still_evaluates_its_last_token(self) -> None:
        pc = caches(1)
        done(pc, 0, seq(0, 100), now=1.0)
        launch = pc.launch(seq(0, 100))
        assert launch is not None
        self.assertEqual(launch.cache_n, 99)
        self.assertEqual(pc.slots[0].tokens, seq(0, 99))

    def test_no_idle_slot_and_a_busy_named_slot_defer(self) -> None:
        pc = caches(1)
        self.assertIsNotNone(pc.launch(seq(0, 10)))
        self.assertIsNone(pc.launch(seq(0, 10)))
        self.assertIsNone(pc.launch(seq(0, 10), id_slot=0))

    def test_host_cache_only_on_lru_or_when_losing_half(self) -> None:
        # Issue item 3: a slot picked by similarity that keeps >= half its tokens is used as it
        # is, even when a saved state would serve more of the prompt.
        store = host()
        pc = caches(1, host_cache=store)
        store.save(seq(0, 300))
        done(pc, 0, seq(0, 150), now=1.0)
        prompt = [*seq(0, 250), 9999]
        launch = pc.launch(prompt)
        assert launch is not None
        self.assertEqual((launch.cache_n, launch.restored_tokens), (150, 0))
        self.assertEqual(len(store), 1)

        # Keeping under half of the slot: saved first, then the better state restored.
        store = host()
        pc = caches(1, host_cache=store)
        store.save(seq(0, 300))
        done(pc, 0, [*seq(0, 40), *seq(9000, 60)], now=1.0)
        launch = pc.launch(prompt)
        assert launch is not None
        self.assertEqual((launch.cache_n, launch.restored_tokens), (250, 300))
        self.assertEqual(store.entries(), [[*seq(0, 40), *seq(9000, 60)]])
        self.assertEqual(launch.copied_bytes, TINY.of(100) + TINY.of(300))

    def test_lru_pick_saves_the_slot_and_restores(self) -> None:
        store = host()
        pc = caches(1, host_cache=store)
        done(pc, 0, seq(0, 100), now=1.0)
        launch = pc.launch(seq(500, 50))  # nothing similar: LRU, the slot is saved
        assert launch is not None
        self.assertEqual(store.entries(), [seq(0, 100)])
        pc.release(0, 2.0)
        launch = pc.launch([*seq(0, 80), 9999])  # slot 0 holds seq(500, ...): LRU again
        assert launch is not None
        self.assertEqual((launch.cache_n, launch.restored_tokens), (80, 100))

    def test_overlapping_requests_cannot_both_restore_one_state(self) -> None:
        store = host()
        pc = caches(2, host_cache=store)
        store.save(seq(0, 200))
        first = pc.launch([*seq(0, 150), 1])
        second = pc.launch([*seq(0, 150), 2])
        assert first is not None
        assert second is not None
        self.assertEqual((first.cache_n, second.cache_n), (150, 0))

    def test_embeddings_neither_reuse_nor_save(self) -> None:
        store = host()
        pc = caches(1, host_cache=store)
        done(pc, 0, seq(0, 100), now=1.0)
        launch = pc.launch(seq(0, 50), stateless=True)
        assert launch is not None
        self.assertEqual((launch.cache_n, len(store)), (0, 0))

    def test_idle_slots_are_saved_at_each_new_task(self) -> None:
        # Issue item 4: --cache-idle-slots, on by default.
        store = host()
        pc = caches(2, host_cache=store, idle=True)
        done(pc, 0, seq(0, 100), now=1.0)
        launch = pc.launch([*seq(0, 100), 5])
        assert launch is not None
        self.assertEqual(launch.slot_id, 0)
        self.assertEqual(store.entries(), [])  # slot 1 is empty, slot 0 is busy
        pc.release(0, 2.0)
        launch = pc.launch(seq(3000, 10))  # LRU: slot 1
        assert launch is not None
        self.assertEqual(launch.slot_id, 1)
        self.assertEqual(store.entries(), [seq(0, 100)])  # idle slot 0, saved
        self.assertEqual(pc.slots[0].tokens, seq(0, 100))  # ... and kept

    def test_unified_kv_clears_idle_slots_and_purges_them(self) -> None:
        store = host()
        pc = caches(2, host_cache=store, idle=True, unified=True)
        done(pc, 0, seq(0, 100), now=1.0)
        launch = pc.launch(seq(3000, 10))
        assert launch is not None
        self.assertEqual((launch.slot_id, pc.slots[0].tokens), (1, []))
        self.assertEqual(store.entries(), [seq(0, 100)])
        pc.release(1, 2.0)
        # Every slot is empty: LRU, and the saved state comes back from host memory.
        launch = pc.launch([*seq(0, 90), 7])
        assert launch is not None
        self.assertEqual((launch.slot_id, launch.cache_n, launch.restored_tokens), (0, 90, 100))
        pc.release(0, 3.0)
        self.assertEqual(pc.slots[1].tokens, [])  # cleared when slot 0 took its task
        self.assertTrue(pc.purge_idle())
        self.assertFalse(pc.purge_idle())
        self.assertEqual(pc.used_tokens, 0)

    def test_clone_is_independent(self) -> None:
        store = host()
        pc = caches(1, host_cache=store)
        store.save(seq(0, 100))
        twin = pc.clone()
        launch = twin.launch([*seq(0, 90), 3])
        assert launch is not None
        self.assertEqual(launch.cache_n, 90)
        self.assertEqual(store.entries(), [seq(0, 100)])
        self.assertEqual(pc.slots[0].tokens, [])


class CostTest(unittest.TestCase):
    """Issue item 5: attention makes later tokens dearer; restores are copies that take time."""

    def test_later_prompt_tokens_cost_more(self) -> None:
        gpu = PROFILES["gpu-8b"]
        first = gpu.step_s(0, 1000, prompt_positions=1000 * 999 // 2)
        later = gpu.step_s(0, 1000, prompt_positions=1000 * 16000 + 1000 * 999 // 2)
        self.assertGreater(later, 1.9 * first)
        self.assertGreater(gpu.step_s(1, 0, decode_context=100_000), 1.5 * gpu.step_s(1, 0))

    def test_a_long_state_takes_milliseconds_to_copy(self) -> None:
        gpu = PROFILES["gpu-8b"]
        size = StateSize(gpu.kv_bytes_per_token, gpu.n_layer).of(4000)
        self.assertGreater(size, 500 * 2**20)
        self.assertGreater(gpu.copy_s(size), 0.04)
        self.assertEqual(PROFILES["test"].copy_s(size), 0.0)


class EngineCacheTest(unittest.IsolatedAsyncioTestCase):
    async def run_task(self, engine: Engine, prompt: list[int], n_reply: int) -> GenTask:
        task = GenTask(prompt=prompt, reply=seq(50_000, n_reply))
        engine.submit(task)
        async with asyncio.timeout(STEP_TIMEOUT_S):
            while not task.done:
                task.changed.clear()
                await task.changed.wait()
        return task

    async def test_the_last_sampled_token_is_not_cached(self) -> None:
        engine = Engine.from_config(SimConfig(slots=1, profile="test"))
        engine.start()
        try:
            task = await self.run_task(engine, seq(0, 30), 5)
            # tokens_cached of the real server: prompt + generated - 1.
            self.assertEqual(engine.slots[0].cache, [*seq(0, 30), *seq(50_000, 4)])
            self.assertEqual(task.cache_n, 0)
        finally:
            await engine.aclose()

    async def test_a_restore_stalls_the_step_loop(self) -> None:
        slow_copy = Profile("copy", 1e6, 1e5, kv_bytes_per_token=10**6, host_copy_bytes_per_s=1e9)
        engine = Engine.from_config(
            SimConfig(slots=1, profile=slow_copy, cache_ram_mib=-1, n_ctx=2000)
        )
        engine.start()
        try:
            await self.run_task(engine, seq(0, 200), 1)
            await self.run_task(engine, seq(1000, 10), 1)  # LRU: seq(0, 200) saved, 0.2 s
            started = time.monotonic()
            task = await self.run_task(engine, [*seq(0, 150), 7], 1)  # 200 MB back: 0.2 s
            self.assertEqual((task.cache_n, task.restored_n), (150, 200))
            self.assertGreater(time.monotonic() - started, 0.19)
        finally:
            await engine.aclose()

    async def test_unified_kv_full_fails_the_working_slots(self) -> None:
        engine = Engine.from_config(
            SimConfig(slots=2, profile="test", n_ctx=100, kv_unified=True, cache_ram_mib=0)
        )
        engine.start()
        try:
            a = GenTask(prompt=seq(0, 60), reply=seq(50_000, 30))
            b = GenTask(prompt=seq(1000, 60), reply=seq(50_000, 30))
            engine.submit(a)
            engine.submit(b)
            await wait_until(lambda: a.done and b.done)
            self.assertEqual((a.error, b.error), (CONTEXT_EXCEEDED, CONTEXT_EXCEEDED))
            self.assertEqual(engine.caches.used_tokens, 0)
        finally:
            await engine.aclose()


class TokenPromptTest(SimTestCase):
    config = SimConfig(slots=2, profile="test")

    async def test_token_id_prompts_are_taken_as_they_are(self) -> None:
        ids = seq(300, 40)
        status, text, _ = await self.post("/completion", {"prompt": ids, "n_predict": 3})
        self.assertEqual(status, 200)
        body = json.loads(text)
        self.assertEqual((body["tokens_evaluated"], body["tokens_cached"]), (40, 42))
        _, text, _ = await self.post("/completion", {"prompt": [*ids, 5], "n_predict": 3})
        self.assertEqual(json.loads(text)["timings"]["cache_n"], 40)
        _, text, _ = await self.post(
            "/completion", {"prompt": [*ids, 5], "n_predict": 3, "cache_prompt": False}
        )
        self.assertEqual(json.loads(text)["timings"]["cache_n"], 0)
        status, text, _ = await self.post("/completion", {"prompt": [-1], "n_predict": 1})
        self.assertEqual(status, 400)
        self.assertIn("invalid tokens", text)
