"""The simulator's prompt cache, held to the real llama-server request by request.

One seeded workload of token-id prompts (``/completion`` with ``"prompt": [ids...]``, so no
tokenizer stands between the two) goes to a real llama-server (``-np 2``, ``-np 4``, and
``-np 4 --kv-unified``, a small ``--cache-ram``, every other cache flag at its default) and then
to the simulator with the same settings and the model's KV size. The prompts are families of
shared prefixes that grow, branch and come back after the slots have forgotten them, so that
every rule is exercised: choice by similarity and by LRU, saves when a slot would lose half its
tokens, restores refused under 25 % kept, restores that move a state out, eviction from the host
cache, idle slots saved (and, unified, cleared) at each new task. The report counts how often the
simulator applied each rule, and the one-at-a-time cases fail if one never applied.

Two orders: one request at a time (the tiny model), and a seeded concurrent one (the large
model, slow enough to hold a slot): waves of 2 to 2 x slots requests, each sent once the server
holds every request sent before it (its own /metrics: processing + deferred) and, on the real
server, which runs second and slower, once those that had finished in the simulator when it was
sent there have finished (the same order of events on a busy machine), the k-th of a wave
generating 40 + 24 k tokens, so that completions follow the order of starts by a wide margin and
a wave larger than the slots has requests wait. ``id_slot`` and ``timings.cache_n`` are compared
request by request: at least 95 % identical, and each difference explained in the output (and in
``test-output/e2e/<test>/fidelity.txt``): by what had finished when the request was sent, by a
completion racing it, or as a consequence of an earlier difference. An unexplained difference
fails the test.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
import unittest
from dataclasses import dataclass

import httpx
import pytest
from e2e_harness import Fleet, LlamaServer, fleet

from llamacpp_sim import SimBackend, SimConfig
from llamacpp_sim.profiles import Profile

pytestmark = pytest.mark.e2e


@dataclass(frozen=True)
class Setup:
    """A model of scripts/make-tiny-model.py, its profile for the simulator, the workload."""

    model_size: str
    profile: Profile
    cache_ram_mib: int
    prompt_scale: float
    n_requests: int


# "tiny": 2 layers, 4 KV heads of 16, f16 K and V (llama-server's default cache type):
# 2 * 64 * 2 * 2 = 512 bytes of KV per token; 1 MiB of host cache holds about 2,000 tokens.
# So fast (about 5,000 tokens/s) that only one request at a time is deterministic.
SEQUENTIAL = Setup(
    "tiny",
    Profile("e2e-tiny", 100_000.0, 5_000.0, n_batch=2048, kv_bytes_per_token=512, n_layer=2),
    cache_ram_mib=1,
    prompt_scale=1.0,
    n_requests=120,
)
# "large": 8 layers of 8 KV heads of 64: 16 KiB per token; 32 MiB hold about 2,000 tokens. About
# 500 tokens/s here, so a request holds its slot long enough for a concurrent order to hold.
# The simulator runs faster: only the order of events matters, and that by a margin.
CONCURRENT = Setup(
    "large",
    Profile("e2e-large", 4_000.0, 1_000.0, n_batch=2048, kv_bytes_per_token=16384, n_layer=8),
    cache_ram_mib=32,
    prompt_scale=0.5,
    n_requests=60,
)
N_CTX_SLOT = 2048
# Byte tokens the tiny model never generates: it samples printable ASCII only (32-126), so a
# reply cannot by chance continue a later prompt, which it would on the real server and not in
# the simulator (whose replies are its own).
VOCAB = (127, 256)
MIN_MATCH = 0.95


@dataclass(frozen=True)
class Req:
    index: int
    prompt: list[int]
    n_predict: int


@dataclass
class Outcome:
    slot: int
    cache_n: int
    n_prompt: int
    sent: float
    first: float
    done: float


def workload(seed: int, n: int, scale: float = 1.0) -> list[Req]:
    """Families of shared prefixes: turns that extend a family's last prompt, branches that keep
    part of its base, and cold prompts; the families outnumber the slots of either server."""
    rng = random.Random(seed)

    def ids(k: int) -> list[int]:
        return [rng.randrange(*VOCAB) for _ in range(max(1, round(k * scale)))]

    bases = [ids(rng.randint(60, 260)) for _ in range(7)]
    last: list[list[int]] = [list(b) for b in bases]
    out: list[Req] = []
    for i in range(n):
        roll = rng.random()
        f = rng.randrange(len(bases))
        if roll < 0.45:
            prompt = last[f] + ids(rng.randint(8, 60))
            if len(prompt) > 700 * scale:
                prompt = bases[f] + ids(rng.randint(8, 60))
            last[f] = prompt
        elif roll < 0.85:
            cut = round(len(bases[f]) * rng.uniform(0.1, 1.0))
            prompt = bases[f][:cut] + ids(rng.randint(5, 120))
        else:
            prompt = ids(rng.randint(20, 200))
        out.append(Req(i, prompt, rng.randint(1, 6)))
    return out


def waves(seed: int, reqs: list[Req], n_slots: int) -> list[list[Req]]:
    """The same requests in waves of 2 to 2 * slots; the k-th of a wave generates 40 + 24 k
    tokens, so each completes well after the one sent before it."""
    rng = random.Random(seed)
    out: list[list[Req]] = []
    i = 0
    while i < len(reqs):
        w = rng.randint(max(2, n_slots - 1), 2 * n_slots)
        wave = reqs[i : i + w]
        out.append([Req(r.index, r.prompt, 40 + 24 * k) for k, r in enumerate(wave)])
        i += w
    return out


class Driver:
    """The same client discipline against either server."""

    def __init__(self, url: str) -> None:
        timeout = httpx.Timeout(30.0, connect=5.0)
        # A connection of its own for every request: no request meets a kept-alive connection
        # the server is closing (llama-server's HTTP library caps requests per connection).
        self.http = httpx.AsyncClient(
            base_url=url, timeout=timeout, limits=httpx.Limits(max_keepalive_connections=0)
        )
        self.polls = httpx.AsyncClient(base_url=url, timeout=timeout)

    async def aclose(self) -> None:
        await self.http.aclose()
        await self.polls.aclose()

    def _body(self, req: Req, stream: bool) -> dict[str, object]:
        return {"prompt": req.prompt, "n_predict": req.n_predict, "stream": stream}

    async def one(self, req: Req) -> Outcome:
        sent = time.monotonic()
        response = await self.http.post("/completion", json=self._body(req, False))
        response.raise_for_status()
        body = response.json()
        now = time.monotonic()
        return Outcome(
            body["id_slot"], body["timings"]["cache_n"], body["tokens_evaluated"], sent, now, now
        )

    async def streamed(self, req: Req) -> Outcome:
        sent = time.monotonic()
        first = 0.0
        final: dict[str, object] = {}
        async with self.http.stream("POST", "/completion", json=self._body(req, True)) as resp:
            resp.raise_for_status()
            pending = b""
            # Lines end at LF only: httpx's aiter_lines() would also break inside a JSON
            # string at the U+0085 a detokenized byte token can be.
            async for data in resp.aiter_bytes():
                *lines, pending = (pending + data).split(b"\n")
                for line in lines:
                    if not line.startswith(b"data: "):
                        continue
                    if not first:
                        first = time.monotonic()
                    chunk = json.loads(line[len(b"data: ") :])
                    if chunk.get("stop"):
                        final = chunk
        timings = final["timings"]
        assert isinstance(timings, dict)
        slot, n_prompt = final["id_slot"], final["tokens_evaluated"]
        assert isinstance(slot, int)
        assert isinstance(n_prompt, int)
        return Outcome(slot, int(timings["cache_n"]), n_prompt, sent, first, time.monotonic())

    async def held(self) -> int:
        """Requests the server holds: in a slot, or deferred (its own /metrics)."""
        try:
            text = (await self.polls.get("/metrics")).text
        except httpx.RemoteProtocolError:  # a kept-alive connection closed under us: once more
            text = (await self.polls.get("/metrics")).text
        total = 0
        for name in ("requests_processing", "requests_deferred"):
            found = re.search(rf"^llamacpp:{name}\s+(\S+)$", text, re.MULTILINE)
            assert found is not None, name
            total += int(float(found.group(1)))
        return total

    async def run_sequential(self, reqs: list[Req]) -> dict[int, Outcome]:
        return {req.index: await self.one(req) for req in reqs}

    async def run_concurrent(
        self, plan: list[list[Req]], follow: dict[int, Outcome] | None = None
    ) -> dict[int, Outcome]:
        """`follow`: the other server's outcomes. Each request is then sent only once those of
        its wave that had finished there when it was sent have finished here too: the same
        order of events, whatever the load on the machine did to either server's speed."""
        out: dict[int, Outcome] = {}
        for wave in plan:
            tasks: list[asyncio.Task[Outcome]] = []
            sent: dict[int, asyncio.Task[Outcome]] = {}
            for req in wave:
                if follow is not None:
                    when = follow[req.index].sent
                    ahead = [t for j, t in sent.items() if follow[j].done <= when]
                    if ahead:
                        await asyncio.wait(ahead)
                task = sent[req.index] = asyncio.create_task(self.streamed(req))
                tasks.append(task)
                await self._until_taken(tasks)
            results = await asyncio.gather(*tasks)
            out.update({req.index: r for req, r in zip(wave, results, strict=True)})
        return out

    async def _until_taken(self, tasks: list[asyncio.Task[Outcome]]) -> None:
        """Until the server holds every request sent and not yet answered: the last one has a
        slot or waits for one. (A slot is released before its answer is sent, so one that has
        just finished is waited for until its answer is in.)"""
        async with asyncio.timeout(20.0):
            while True:
                running = [t for t in tasks if not t.done()]
                if await self.held() >= len(running):
                    return
                # Woken by an answer, or poll the server's counts again shortly.
                await asyncio.wait(running, timeout=0.002)


@dataclass(frozen=True)
class Difference:
    index: int
    real: Outcome
    sim: Outcome
    why: str | None


def compare(
    reqs: list[Req],
    plan: list[list[Req]] | None,
    real: dict[int, Outcome],
    sim: dict[int, Outcome],
) -> tuple[int, list[Difference]]:
    wave_of = {r.index: w for w in (plan or [[r] for r in reqs]) for r in w}
    matches = 0
    diffs: list[Difference] = []
    for req in reqs:
        a, b = real[req.index], sim[req.index]
        assert a.n_prompt == b.n_prompt == len(req.prompt), req.index
        if (a.slot, a.cache_n) == (b.slot, b.cache_n):
            matches += 1
            continue
        diffs.append(Difference(req.index, a, b, _explain(req, wave_of, real, sim, diffs)))
    return matches, diffs


def _explain(
    req: Req,
    wave_of: dict[int, list[Req]],
    real: dict[int, Outcome],
    sim: dict[int, Outcome],
    earlier: list[Difference],
) -> str | None:
    i = req.index
    before = [r.index for r in wave_of[i] if r.index < i]

    def finished(run: dict[int, Outcome]) -> list[int]:
        return [j for j in before if run[j].done <= run[i].sent]

    def racing(run: dict[int, Outcome]) -> list[int]:
        # Finished between this request's send and its first token: its slot may or may not
        # have been free when the server took this one.
        return [j for j in before if run[i].sent < run[j].done <= run[i].first]

    if finished(real) != finished(sim):
        return (
            f"timing: when #{i} was sent, #{finished(real)} had finished on the real server "
            f"and #{finished(sim)} in the simulator"
        )
    races = racing(real) + racing(sim)
    if races:
        return f"race: #{sorted(set(races))} finished while #{i} was being taken"
    if earlier:
        first = earlier[0]
        return f"the caches differ since #{first.index} ({first.why or 'unexplained'})"
    return None


def report(title: str, n: int, matches: int, diffs: list[Difference]) -> str:
    lines = [f"{title}: {matches}/{n} requests with the same slot and cache_n"]
    for d in diffs:
        lines.append(
            f"  #{d.index}: real slot {d.real.slot} cache_n {d.real.cache_n}, "
            f"sim slot {d.sim.slot} cache_n {d.sim.cache_n}: {d.why or 'UNEXPLAINED'}"
        )
    return "\n".join(lines)


class CacheFidelityTest(unittest.IsolatedAsyncioTestCase):
    """Each case: a fresh real llama-server and a fresh simulator, the same requests."""

    SEED = 20251219

    def real_server(self, group: Fleet, setup: Setup, n_slots: int, unified: bool) -> LlamaServer:
        # Unified, the slots share one context of -c cells, and each may use all of it.
        server = group.add_backend(
            f"llama-np{n_slots}",
            slots=n_slots,
            ctx=N_CTX_SLOT if unified else N_CTX_SLOT * n_slots,
            extra_args=[
                "--cache-ram",
                str(setup.cache_ram_mib),
                *(["--kv-unified"] if unified else []),
            ],
        )
        server.start()
        server.wait_ready()
        return server

    def sim_config(self, setup: Setup, n_slots: int, unified: bool) -> SimConfig:
        # As llama-server with -np N (explicit): the KV split per slot unless --kv-unified,
        # idle slots saved (--cache-idle-slots), --slot-prompt-similarity 0.1.
        return SimConfig(
            slots=n_slots,
            profile=setup.profile,
            n_ctx=N_CTX_SLOT,
            cache_ram_mib=setup.cache_ram_mib,
            cache_idle_slots=True,
            kv_unified=unified,
            similarity=0.1,
        )

    async def check(self, n_slots: int, concurrent: bool, unified: bool = False) -> None:
        # Concurrent, every difference explained by timing but too many of them: the machine's
        # load moved a completion across a send (the waves leave a wide margin, not an
        # infinite one) and the caches went apart from there. That is the environment, not
        # the simulator's rules: run once more, from fresh servers. A rule that differs shows
        # as an unexplained difference, which fails at once, or fails twice.
        attempts = 2 if concurrent else 1
        for attempt in range(1, attempts + 1):
            matches, n, text, unexplained = await self.compare_once(
                n_slots, concurrent, unified, attempt
            )
            self.assertEqual(unexplained, [], text)
            if matches >= MIN_MATCH * n or attempt == attempts:
                break
            print(f"{text}\n  (every difference is timing: comparing again)")
        self.assertGreaterEqual(matches, MIN_MATCH * n, text)

    async def compare_once(
        self, n_slots: int, concurrent: bool, unified: bool, attempt: int
    ) -> tuple[int, int, str, list[Difference]]:
        mode = ("concurrent" if concurrent else "sequential") + (", unified KV" if unified else "")
        setup = CONCURRENT if concurrent else SEQUENTIAL
        name = f"{type(self).__name__}-np{n_slots}-{mode.replace(', unified KV', '-kvu')}"
        if attempt > 1:
            name += f"-attempt{attempt}"  # the first attempt's logs are kept
        reqs = workload(self.SEED + n_slots, setup.n_requests, setup.prompt_scale)
        plan = waves(self.SEED, reqs, n_slots) if concurrent else None
        with fleet(name, model_size=setup.model_size) as group:
            async with SimBackend(self.sim_config(setup, n_slots, unified)) as sim:
                simulated = await self.drive(sim.url, reqs, plan)
                counters = sim.engine.caches.counters()
            # The real server (the slower of the two, the more so on a busy machine) follows the
            # simulator's order of events: it can wait for a completion, not hasten one.
            server = self.real_server(group, setup, n_slots, unified)
            real = await self.drive(server.url, reqs, plan, follow=simulated)
            server.stop()
            matches, diffs = compare(reqs, plan, real, simulated)
            text = report(f"-np {n_slots}, {mode}", len(reqs), matches, diffs)
            text += "\n  in the simulator: " + ", ".join(f"{k} {v}" for k, v in counters.items())
            await asyncio.to_thread((group.log_dir / "fidelity.txt").write_text, text + "\n")
        print(text)
        if not concurrent:
            # The workload is meant to exercise every rule; a change that stops it doing so
            # would make this test prove less than it says.
            self.assertEqual([k for k, v in counters.items() if not v], [], text)
        return matches, len(reqs), text, [d for d in diffs if d.why is None]

    async def drive(
        self,
        url: str,
        reqs: list[Req],
        plan: list[list[Req]] | None,
        follow: dict[int, Outcome] | None = None,
    ) -> dict[int, Outcome]:
        driver = Driver(url)
        try:
            if plan is None:
                return await driver.run_sequential(reqs)
            return await driver.run_concurrent(plan, follow)
        finally:
            await driver.aclose()

    async def test_two_slots_one_at_a_time(self) -> None:
        await self.check(2, concurrent=False)

    async def test_two_slots_concurrent(self) -> None:
        await self.check(2, concurrent=True)

    async def test_four_slots_one_at_a_time(self) -> None:
        await self.check(4, concurrent=False)

    async def test_four_slots_concurrent(self) -> None:
        await self.check(4, concurrent=True)

    async def test_four_slots_unified_kv_one_at_a_time(self) -> None:
        # llama-server's default with -np auto: idle slots saved to host memory and cleared.
        await self.check(4, concurrent=False, unified=True)
