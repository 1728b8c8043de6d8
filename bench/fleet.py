"""The simulated llama-server fleet: one ``llamacpp-ha-sim`` child process per run.

A fresh fleet is started for every (contender, workload) run, so no contender inherits another's
warm prompt caches. What each backend did is read from its own counters (``/metrics`` and the
task ids in ``/slots``) before and after a run: the balancers do not tell us where a request
went, and LiteLLM drops the ``timings`` object from the stream, so the backends are the one
source that is the same for every contender.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from bench import procs
from llamacpp_sim import SimConfig, SpawnError, spawn


@dataclass(frozen=True)
class FleetSpec:
    """Shape of the simulated fleet; one entry per backend."""

    slots: tuple[int, ...]
    profiles: tuple[str, ...]
    time_scale: float
    n_ctx: int = 8192
    # llama-server keeps slot states in host memory (--cache-ram, 8192 MiB by default in the
    # pinned build): about 65k tokens of an 8B model's KV cache at 128 KiB per token. Every
    # other cache setting is llama-server's default too (explicit -np: KV split per slot, idle
    # slots saved at each new task, --slot-prompt-similarity 0.1).
    cache_ram_mib: int = 8192

    @property
    def total_slots(self) -> int:
        return sum(self.slots)

    def configs(self) -> list[SimConfig]:
        """Each backend as ``start_fleet`` starts it (for the offline capacity ceiling)."""
        return [
            SimConfig(
                slots=s,
                profile=p,
                time_scale=self.time_scale,
                n_ctx=self.n_ctx,
                cache_ram_mib=self.cache_ram_mib,
            )
            for s, p in zip(self.slots, self.profiles, strict=True)
        ]

    def describe(self) -> str:
        parts = [f"{p}x{s}" for p, s in zip(self.profiles, self.slots, strict=True)]
        return (
            f"{len(self.slots)} backends ({', '.join(parts)} slots), n_ctx {self.n_ctx} per slot, "
            f"host prompt cache {self.cache_ram_mib} MiB each (--cache-ram), "
            f"time scale {self.time_scale:g}"
        )


@dataclass(frozen=True)
class BackendCounters:
    """One backend's cumulative counters at an instant."""

    tasks: int
    prompt_tokens: int
    cached_tokens: int
    predicted_tokens: int


@dataclass
class Fleet:
    spec: FleetSpec
    child: procs.Child
    urls: list[str]

    def stop(self) -> None:
        self.child.stop()


def start_fleet(spec: FleetSpec, log_dir: Path, name: str, cpu_list: str | None) -> Fleet:
    log_path = log_dir / f"{name}.log"
    try:
        sim = spawn(
            slots=spec.slots,
            profile=spec.profiles,
            time_scale=spec.time_scale,
            n_ctx=spec.n_ctx,
            cache_ram_mib=spec.cache_ram_mib,
            log_path=log_path,
            wrapper=procs.pinned([], cpu_list),
            new_session=True,
        )
    except SpawnError as exc:
        raise RuntimeError(f"simulated fleet did not start: {exc}") from None
    return Fleet(spec, procs.adopt(name, sim.popen, log_path), sim.urls)


_METRIC = re.compile(r"^llamacpp:(\w+) ([0-9.e+-]+)$", re.M)


async def read_counters(session: aiohttp.ClientSession, url: str) -> BackendCounters:
    async with session.get(url + "/metrics") as resp:
        metrics = {m.group(1): float(m.group(2)) for m in _METRIC.finditer(await resp.text())}
    async with session.get(url + "/slots") as resp:
        slots = await resp.json()
    # The simulator numbers its tasks from 0 in submission order, so the highest id seen in
    # /slots (+1) counts the requests this backend has taken once it is idle.
    ids = [s.get("id_task", -1) for s in slots if isinstance(s, dict)]
    return BackendCounters(
        tasks=max(ids, default=-1) + 1,
        prompt_tokens=int(metrics.get("prompt_tokens_total", 0)),
        cached_tokens=int(metrics.get("prompt_tokens_cached_total", 0)),
        predicted_tokens=int(metrics.get("tokens_predicted_total", 0)),
    )


async def snapshot(session: aiohttp.ClientSession, urls: list[str]) -> list[BackendCounters]:
    return list(await asyncio.gather(*(read_counters(session, u) for u in urls)))


def delta(after: list[BackendCounters], before: list[BackendCounters]) -> list[BackendCounters]:
    return [
        BackendCounters(
            tasks=a.tasks - b.tasks,
            prompt_tokens=a.prompt_tokens - b.prompt_tokens,
            cached_tokens=a.cached_tokens - b.cached_tokens,
            predicted_tokens=a.predicted_tokens - b.predicted_tokens,
        )
        for a, b in zip(after, before, strict=True)
    ]


async def read_deferred(session: aiohttp.ClientSession, url: str) -> int | None:
    """llama-server's ``llamacpp:requests_deferred`` gauge: requests waiting for a free slot."""
    async with session.get(url + "/metrics") as resp:
        for m in _METRIC.finditer(await resp.text()):
            if m.group(1) == "requests_deferred":
                return int(float(m.group(2)))
    return None


async def watch_deferred(urls: list[str], stop: asyncio.Event, period_s: float = 0.2) -> int | None:
    """The most requests any one backend held deferred, sampled every ``period_s`` until
    ``stop`` is set (None when no backend reports the gauge)."""
    peak: int | None = None
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        while True:
            values = await asyncio.gather(
                *(read_deferred(http, u) for u in urls), return_exceptions=True
            )
            for v in values:
                if isinstance(v, int):
                    peak = v if peak is None else max(peak, v)
            if stop.is_set():
                return peak
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), period_s)
