"""The Mooncake sample against three real llama-server processes (``make bench-real``).

    bench/.venv/bin/python bench/real.py --out bench/results-real

The simulator's benchmark (``bench/run.py``) ranks balancers by the prompt-cache hit rate they
get from simulated backends. This one checks that ranking on the real thing: three
``llama-server`` processes of the pinned llama.cpp (``scripts/build-llama-server.sh``), each
serving the e2e suite's tiny random model (``scripts/make-tiny-model.py``) with ``-np 2``, a
context that holds the longest prompt and its output, and a host prompt cache (``--cache-ram``)
that holds only a handful of the workload's prompts, so that what a balancer sends where decides
what is computed again. Each contender (llamacpp-ha with its default policy, ``cost`` and
``affinity`` when they exist, SGLang's ``cache_aware`` router, round robin) gets a fresh set of
servers (cold caches) for each of its repetitions, and the same Mooncake sample replayed
open-loop. What is reported comes from llama-server itself: its ``/metrics`` counters
(``prompt_tokens_total`` counts the prompt tokens it computed, ``prompt_tokens_cached_total``
those it took from a cache) and the ``timings`` of each response (``prompt_n``, ``cache_n``).
The tiny model is fast, so latency says little here; the figures are hit rate and prompt tokens
computed. Then the simulator's harness runs the same contenders on its own Mooncake workload,
and the two rankings are compared.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import dataclasses
import importlib.util
import itertools
import json
import math
import os
import platform
import re
import selectors
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp

from bench import procs
from bench import workloads as wl
from bench.contenders import Contender, Running, roster
from bench.run import SEED, machine_info
from llamacpp_sim import SimConfig
from llamacpp_sim.profiles import Profile
from llamacpp_sim.prompt_cache import StateSize, common_prefix_len
from llamacpp_sim.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO / "scripts" / "build-llama-server.sh"
MODEL_SCRIPT = REPO / "scripts" / "make-tiny-model.py"
BINARY_ENV = "LLAMACPP_HA_LLAMA_SERVER"
MODEL_SIZE = "tiny"
ALIAS = "tiny-llama"
MIB = 1024 * 1024

N_SERVERS = 3
SLOTS = 2
REPETITIONS = 3
# llama-server's default KV cache type (--cache-type-k/-v f16): 2 bytes per element.
KV_ELEMENT_BYTES = 2
# The host cache holds about this many prompts of the workload's mean length, per server.
HOST_CACHE_PROMPTS = 4
CTX_STEP = 256
METRICS_POLL_S = 0.25
DRAIN_S = 90.0
# The mirror (the simulator shaped like this fleet) runs this much faster than the real servers.
MIRROR_TIME_SCALE = 2.0
MIRROR_REPETITIONS = 3

# 50 conversations of the trace (157 requests; bench/run.py's 40 are among them: the same seed,
# name and sampler). The tiny model's tokenizer is byte-level (about 4.8 tokens for one of the
# workload's words), so a 512-token block of the trace becomes 10 words, about 48 tokens, and a
# prompt at most 700 words, about 3,400 tokens; outputs are cut more than the simulator's (/ 8)
# because decoding, not prefill, is what takes the tiny model's time. The trace's hour becomes
# 15 s, which brings more requests at once than the fleet has slots.
SCALE = wl.TraceScale(
    conversations=50, span_s=15.0, token_divisor=48, output_divisor=8, max_prompt_tokens=700
)


# -- sizing (pure; tests/test_bench_real.py) -------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """What sizes the KV cache of a model written by scripts/make-tiny-model.py."""

    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ctx_train: int

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers: n_layer * n_head_kv * head_dim * 2 * 2."""
        head_dim = self.n_embd // self.n_head
        return self.n_layer * self.n_head_kv * head_dim * 2 * KV_ELEMENT_BYTES

    def state_size(self) -> StateSize:
        """A saved slot state's bytes, as llama-server counts them against --cache-ram."""
        return StateSize(self.kv_bytes_per_token, self.n_layer)


def slot_ctx(longest: int, n_ctx_train: int, step: int = CTX_STEP) -> int:
    """Each slot's context: ``longest`` (a prompt plus its output) and one more token, rounded
    up to ``step``; refused past the model's training context."""
    need = math.ceil((longest + 1) / step) * step
    if longest + 1 > n_ctx_train:
        raise ValueError(
            f"a request needs {longest + 1} tokens of context, more than the model's "
            f"{n_ctx_train}: shrink the workload's prompts"
        )
    return min(need, n_ctx_train)


def cache_ram_mib(state: StateSize, prompt_tokens: Sequence[int], prompts: int) -> int:
    """Whole MiB of --cache-ram that hold ``prompts`` saved states of the mean prompt length
    (at least 1: 0 would disable the host cache)."""
    mean = round(statistics.fmean(prompt_tokens))
    return max(1, math.ceil(prompts * state.of(mean) / MIB))


def states_held(state: StateSize, mib: int, n_tokens: int) -> int:
    """How many saved states of ``n_tokens`` tokens ``mib`` MiB hold."""
    return (mib * MIB) // state.of(n_tokens)


def infinite_cache_ceiling(prompts: Sequence[Sequence[int]]) -> float:
    """The hit rate of one server that kept every prompt forever: each prompt's longest common
    prefix with any earlier one, one token short when that is the whole prompt (llama-server
    always computes the last token), over all prompt tokens."""
    seen: list[list[int]] = []
    hits = total = 0
    for prompt in prompts:
        tokens = list(prompt)
        best = max((common_prefix_len(tokens, s) for s in seen), default=0)
        hits += min(best, len(tokens) - 1)
        total += len(tokens)
        seen.append(tokens)
    return hits / total if total else 0.0


def median_range(values: Sequence[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def ranking(hit_rates: dict[str, float]) -> list[str]:
    """Keys from the highest hit rate to the lowest."""
    return sorted(hit_rates, key=lambda k: -hit_rates[k])


def unsettled(order: Sequence[str], ranges: dict[str, tuple[float, float, float]]) -> list[str]:
    """Neighbours in ``order`` whose (median, min, max) ranges overlap: the repetitions do not
    settle which of the two is ahead."""
    return [
        f"{a} / {b}"
        for a, b in itertools.pairwise(order)
        if ranges[a][1] <= ranges[b][2] and ranges[b][1] <= ranges[a][2]
    ]


# -- the binary and the model ----------------------------------------------------------------


def llama_server_binary() -> Path:
    """The binary scripts/build-llama-server.sh prints (it builds once, then finds the cache)."""
    named = os.environ.get(BINARY_ENV)
    if named:
        return Path(named)
    done = subprocess.run(
        ["bash", str(BUILD_SCRIPT)], capture_output=True, text=True, check=False, timeout=1800
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stderr)
        raise SystemExit("bench-real: scripts/build-llama-server.sh failed")
    return Path(lines[-1])


def _load_model_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_tiny_model", MODEL_SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def model_shape(size: str = MODEL_SIZE) -> ModelShape:
    shape = _load_model_script().SHAPES[size]
    return ModelShape(
        n_embd=shape.n_embd,
        n_layer=shape.n_layer,
        n_head=shape.n_head,
        n_head_kv=shape.n_head_kv,
        n_ctx_train=shape.n_ctx_train,
    )


def tiny_model(size: str = MODEL_SIZE) -> Path:
    """The cached model, written by scripts/make-tiny-model.py with a Python that has gguf (the
    project's .venv, where `make venv` installs it; bench/.venv does not)."""
    cached = _load_model_script().default_path(size)
    if isinstance(cached, Path) and cached.is_file() and cached.stat().st_size > 0:
        return cached
    for python in (REPO / ".venv" / "bin" / "python", Path(sys.executable)):
        if not python.exists():
            continue
        done = subprocess.run(
            [str(python), str(MODEL_SCRIPT), "--size", size],
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
        )
        if done.returncode == 0 and done.stdout.strip():
            return Path(done.stdout.strip().splitlines()[-1])
    raise SystemExit("bench-real: scripts/make-tiny-model.py failed (run `make venv` first)")


# -- llama-server processes ------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:
    # Between fork and exec: a harness killed outright takes its servers with it.
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass(frozen=True)
class ServerSpec:
    binary: Path
    model: Path
    slots: int
    ctx_per_slot: int
    cache_ram_mib: int

    def flags(self) -> list[str]:
        """Everything on the command line but the binary and the port."""
        return [
            "--model",
            str(self.model),
            "--host",
            "127.0.0.1",
            "-np",
            str(self.slots),
            "-c",
            str(self.slots * self.ctx_per_slot),
            "--cache-ram",
            str(self.cache_ram_mib),
            "--metrics",
            "--threads",
            "1",
            "--alias",
            ALIAS,
        ]

    def argv(self, port: int) -> list[str]:
        return [str(self.binary), *self.flags(), "--port", str(port)]


@dataclass(frozen=True)
class Server:
    child: procs.Child
    url: str

    def stop(self) -> None:
        self.child.stop()


def start_servers(spec: ServerSpec, n: int, log_dir: Path, prefix: str) -> list[Server]:
    log_dir.mkdir(parents=True, exist_ok=True)
    servers: list[Server] = []
    try:
        for i in range(n):
            port = procs.free_port()
            log_path = log_dir / f"{prefix}{i}.log"
            with open(log_path, "wb") as log:
                popen = subprocess.Popen(
                    spec.argv(port),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                    preexec_fn=_die_with_parent,
                )
            child = procs.adopt(f"{prefix}{i}", popen, log_path)
            servers.append(Server(child, f"http://127.0.0.1:{port}"))
        asyncio.run(_wait_healthy(servers))
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers


async def _wait_healthy(servers: list[Server], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        for server in servers:
            child = server.child
            while True:
                if not child.alive():
                    raise RuntimeError(f"{child.name} exited:\n{child.log_tail()}")
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with http.get(server.url + "/health") as resp:
                        if resp.status == 200:
                            break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{child.name} not healthy:\n{child.log_tail()}")
                await asyncio.sleep(0.05)


async def tokenize(url: str, texts: Sequence[str]) -> list[list[int]]:
    """The prompts in the model's own tokens, as a completion sees them (with its BOS)."""
    out: list[list[int]] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        for text in texts:
            body = {"content": text, "add_special": True}
            async with http.post(url + "/tokenize", json=body) as resp:
                resp.raise_for_status()
                out.append([int(t) for t in (await resp.json())["tokens"]])
    return out


_METRIC = re.compile(r"^llamacpp:(\w+) ([0-9.e+-]+)$", re.M)


async def read_metrics(http: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with http.get(url + "/metrics") as resp:
        text = await resp.text()
    return {m.group(1): float(m.group(2)) for m in _METRIC.finditer(text)}


# -- the replay ------------------------------------------------------------------------------


@dataclass
class Reply:
    """One request as the client saw it, with llama-server's own accounting of its prompt."""

    index: int
    key: str
    max_tokens: int
    ok: bool = False
    error: str | None = None
    prompt_tokens: int | None = None  # usage.prompt_tokens: the whole prompt
    cache_n: int | None = None  # timings.cache_n: taken from a cache
    prompt_n: int | None = None  # timings.prompt_n: computed
    output_tokens: int = 0
    sent_at: float = 0.0
    done_at: float = 0.0


async def _one(
    http: aiohttp.ClientSession, running: Running, turn: wl.Turn, reply: Reply, live: list[int]
) -> None:
    body = {
        "model": ALIAS,
        "prompt": turn.content,
        "max_tokens": turn.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    reply.sent_at = time.monotonic()
    live[0] += 1
    live[1] = max(live[1], live[0])
    try:
        url = running.url_for(reply.key) + "/v1/completions"
        async with http.post(url, json=body, headers=running.headers) as resp:
            if resp.status != 200:
                detail = (await resp.read())[:200].decode("utf-8", "replace")
                reply.error = f"HTTP {resp.status}: {detail}"
                return
            async for raw in resp.content:
                if not raw.startswith(b"data:"):
                    continue
                data = raw[5:].strip()
                if data == b"[DONE]":
                    reply.ok = True
                    continue
                event = json.loads(data)
                usage = event.get("usage")
                if isinstance(usage, dict):
                    reply.prompt_tokens = usage.get("prompt_tokens")
                    reply.output_tokens = int(usage.get("completion_tokens") or 0)
                timings = event.get("timings")
                if isinstance(timings, dict):
                    reply.cache_n = timings.get("cache_n")
                    reply.prompt_n = timings.get("prompt_n")
            if not reply.ok:
                reply.error = "the stream ended without [DONE]"
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        reply.error = f"{type(exc).__name__}: {exc}"[:200]
    finally:
        live[0] -= 1
        reply.done_at = time.monotonic()


async def _poll_metrics(
    http: aiohttp.ClientSession, urls: list[str], peaks: dict[str, list[float]], stop: asyncio.Event
) -> None:
    """The highest requests_deferred and requests_processing each server reported."""
    while not stop.is_set():
        for i, url in enumerate(urls):
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                m = await read_metrics(http, url)
                peaks["deferred"][i] = max(peaks["deferred"][i], m.get("requests_deferred", 0))
                peaks["processing"][i] = max(
                    peaks["processing"][i], m.get("requests_processing", 0)
                )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), METRICS_POLL_S)


async def replay(
    running: Running, workload: wl.Workload, urls: list[str], time_scale: float = 1.0
) -> tuple[list[Reply], dict[str, Any]]:
    replies: list[Reply] = []
    live = [0, 0]  # in flight now, the most at once
    peaks: dict[str, list[float]] = {"deferred": [0.0] * len(urls), "processing": [0.0] * len(urls)}
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=120)
    async with (
        aiohttp.ClientSession(connector=connector, timeout=timeout) as http,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as polls,
    ):
        before = [await read_metrics(polls, u) for u in urls]
        stop = asyncio.Event()
        poller = asyncio.create_task(_poll_metrics(polls, urls, peaks, stop))
        t0 = time.monotonic() + 0.1

        async def session(first: int, s: wl.Session) -> None:
            await asyncio.sleep(max(0.0, t0 + s.start_s / time_scale - time.monotonic()))
            for i, turn in enumerate(s.turns):
                reply = Reply(first + i, s.key, turn.max_tokens)
                replies.append(reply)
                await _one(http, running, turn, reply, live)

        firsts = [0]
        for s in workload.sessions:
            firsts.append(firsts[-1] + len(s.turns))
        tasks = [
            asyncio.create_task(session(first, s))
            for first, s in zip(firsts, workload.sessions, strict=False)
        ]
        _, pending = await asyncio.wait(tasks, timeout=workload.span_s / time_scale + DRAIN_S)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        wall = time.monotonic() - t0
        stop.set()
        await poller
        after = [await read_metrics(polls, u) for u in urls]
    for r in replies:
        if not r.ok and r.error is None:
            r.error = "unfinished at the end of the run"
    counters = {
        name: [a.get(name, 0.0) - b.get(name, 0.0) for a, b in zip(after, before, strict=True)]
        for name in (
            "prompt_tokens_total",
            "prompt_tokens_cached_total",
            "tokens_predicted_total",
            "prompt_seconds_total",
            "tokens_predicted_seconds_total",
        )
    }
    return replies, {"wall_s": wall, "max_in_flight": live[1], "peaks": peaks, **counters}


@dataclass
class RunFigures:
    contender: str
    repetition: int
    requests: int
    completed: int
    failed: int
    errors: list[str]
    # the servers' /metrics, summed over the three
    computed: int
    cached: int
    hit_rate: float | None
    # the responses' timings, summed over the completed requests
    client_prompt_n: int
    client_cache_n: int
    client_prompt_tokens: int
    client_hit_rate: float | None
    timings_seen: int
    usage_is_whole_prompt: int
    metrics_match_timings: bool
    predicted_per_server: list[int]
    deferred_max: int
    deferred_max_per_server: list[int]
    processing_max_per_server: list[int]
    max_in_flight: int
    wall_s: float
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def figures(
    contender: str,
    repetition: int,
    replies: list[Reply],
    counters: dict[str, Any],
    lengths: Sequence[int],
) -> RunFigures:
    ok = [r for r in replies if r.ok]
    with_timings = [r for r in ok if r.cache_n is not None and r.prompt_n is not None]
    # usage.prompt_tokens is the whole prompt: what /tokenize said, and cache_n + prompt_n.
    whole = sum(
        1
        for r in with_timings
        if r.prompt_tokens == lengths[r.index] == (r.cache_n or 0) + (r.prompt_n or 0)
    )
    computed = round(sum(counters["prompt_tokens_total"]))
    cached = round(sum(counters["prompt_tokens_cached_total"]))
    c_prompt_n = sum(r.prompt_n or 0 for r in with_timings)
    c_cache_n = sum(r.cache_n or 0 for r in with_timings)
    errors: list[str] = []
    for r in replies:
        if r.error and r.error not in errors and len(errors) < 4:
            errors.append(r.error)
    deferred = [round(v) for v in counters["peaks"]["deferred"]]
    return RunFigures(
        contender=contender,
        repetition=repetition,
        requests=len(replies),
        completed=len(ok),
        failed=len(replies) - len(ok),
        errors=errors,
        computed=computed,
        cached=cached,
        hit_rate=cached / (cached + computed) if cached + computed else None,
        client_prompt_n=c_prompt_n,
        client_cache_n=c_cache_n,
        client_prompt_tokens=sum(r.prompt_tokens or 0 for r in ok),
        client_hit_rate=(
            c_cache_n / (c_cache_n + c_prompt_n)
            if with_timings and len(with_timings) == len(ok)
            else None
        ),
        timings_seen=len(with_timings),
        usage_is_whole_prompt=whole,
        metrics_match_timings=(
            len(with_timings) == len(replies) and (c_prompt_n, c_cache_n) == (computed, cached)
        ),
        predicted_per_server=[round(v) for v in counters["tokens_predicted_total"]],
        deferred_max=max(deferred, default=0),
        deferred_max_per_server=deferred,
        processing_max_per_server=[round(v) for v in counters["peaks"]["processing"]],
        max_in_flight=int(counters["max_in_flight"]),
        wall_s=round(float(counters["wall_s"]), 2),
    )


def run_one(
    contender: Contender,
    repetition: int,
    spec: ServerSpec | Mirror,
    workload: wl.Workload,
    lengths: Sequence[int],
    log_dir: Path,
) -> RunFigures | str:
    started = time.monotonic()
    try:
        if isinstance(spec, Mirror):
            run_dir = log_dir / f"mirror--{contender.key}--{repetition}"
            child, urls = start_mirror(spec, run_dir)
            children = [child]
            time_scale = spec.time_scale
        else:
            run_dir = log_dir / f"{contender.key}--{repetition}"
            servers = start_servers(spec, N_SERVERS, run_dir, "llama-server-")
            children = [s.child for s in servers]
            urls = [s.url for s in servers]
            time_scale = 1.0
    except (RuntimeError, OSError) as exc:
        return f"the backends did not start: {exc}"
    try:
        try:
            running = contender.start(urls, [SLOTS] * len(urls), run_dir, None)
        except (RuntimeError, OSError) as exc:
            return f"could not start: {exc}"
        try:
            replies, counters = asyncio.run(replay(running, workload, urls, time_scale))
        finally:
            running.stop()
    finally:
        for c in children:
            c.stop()
    result = figures(contender.key, repetition, replies, counters, lengths)
    result.extra = {
        k: round(sum(counters[k]), 3)
        for k in ("prompt_seconds_total", "tokens_predicted_seconds_total")
    }
    result.seconds = round(time.monotonic() - started, 1)
    return result


# -- the simulator, configured like this fleet -----------------------------------------------


@dataclass(frozen=True)
class Mirror:
    """Simulated backends shaped like the real fleet: as many, with as many slots, a host cache
    that holds as many of the workload's states, the tiny model's speeds on this machine. The
    simulator's tokens are words (about ``tokens_per_word`` of the tiny model's tokens each), so
    its lengths, speeds and cache are converted by that ratio."""

    profile: Profile
    ctx_per_slot: int
    cache_ram_tokens: int
    time_scale: float
    tokens_per_word: float
    calibration: dict[str, float]

    def configs(self) -> list[dict[str, Any]]:
        return [
            {
                "slots": SLOTS,
                "n_ctx": self.ctx_per_slot,
                "cache_ram_tokens": self.cache_ram_tokens,
                "time_scale": self.time_scale,
                "model": ALIAS,
                "name": f"mirror-{i}",
            }
            for i in range(N_SERVERS)
        ]


def mirror_of(
    spec: ServerSpec,
    state: StateSize,
    real_lengths: Sequence[int],
    sim_lengths: Sequence[int],
    outputs: Sequence[int],
    calibration: dict[str, float],
) -> Mirror:
    per_word = sum(real_lengths) / sum(sim_lengths)
    # A finished request's state is its prompt and its output: the same number of them fit.
    real_state = statistics.fmean(real_lengths) + statistics.fmean(outputs)
    sim_state = statistics.fmean(sim_lengths) + statistics.fmean(outputs)
    real_tokens = spec.cache_ram_mib * MIB / (state.of(2) - state.of(1))
    longest = max(n + o for n, o in zip(sim_lengths, outputs, strict=True))
    profile = Profile(
        "tiny-mirror",
        prompt_tps=calibration["prompt_per_second"] / per_word,
        decode_tps=calibration["predicted_per_second"],
        n_batch=max(64, round(2048 / per_word)),
        kv_bytes_per_token=round((state.of(2) - state.of(1)) * per_word) - 12,
        n_layer=state.n_layer,
    )
    return Mirror(
        profile=profile,
        ctx_per_slot=slot_ctx(longest, 1 << 20),
        cache_ram_tokens=round(real_tokens * sim_state / real_state),
        time_scale=MIRROR_TIME_SCALE,
        tokens_per_word=per_word,
        calibration=calibration,
    )


def measured_speeds(runs: Sequence[RunFigures]) -> dict[str, float]:
    """The tiny model's speeds on this machine under this benchmark's load: the real servers'
    own prompt and generation counters over all the runs (tokens per second of a request)."""
    prompt_s = sum(r.extra["prompt_seconds_total"] for r in runs)
    predicted_s = sum(r.extra["tokens_predicted_seconds_total"] for r in runs)
    return {
        "prompt_per_second": sum(r.computed for r in runs) / prompt_s,
        "predicted_per_second": sum(sum(r.predicted_per_server) for r in runs) / predicted_s,
    }


_LISTENING = re.compile(r"backend (\S+) listening on (\S+)")


def start_mirror(mirror: Mirror, log_dir: Path) -> tuple[procs.Child, list[str]]:
    """The mirror's backends in a child process (this script with --serve-mirror)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / "mirror.log"
    payload = json.dumps({"profile": asdict(mirror.profile), "configs": mirror.configs()})
    command = [sys.executable, str(Path(__file__).resolve()), "--serve-mirror", payload]
    with open(log_path, "wb") as log:
        popen = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            bufsize=0,  # unbuffered: a readline() never takes more than its line from the pipe
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    child = procs.adopt("mirror", popen, log_path)
    assert popen.stdout is not None
    urls: list[str] = []
    deadline = time.monotonic() + 30.0
    with selectors.DefaultSelector() as selector:
        selector.register(popen.stdout, selectors.EVENT_READ)
        while len(urls) < N_SERVERS:
            if time.monotonic() > deadline or not selector.select(deadline - time.monotonic()):
                child.stop()
                raise RuntimeError(f"the mirror did not listen:\n{child.log_tail()}")
            line = popen.stdout.readline().decode("utf-8", "replace")
            if not line:
                child.stop()
                raise RuntimeError(f"the mirror exited:\n{child.log_tail()}")
            found = _LISTENING.search(line)
            if found:
                urls.append(found.group(2))
    return child, urls


def serve_mirror(payload: str) -> int:
    from llamacpp_sim.__main__ import serve

    data = json.loads(payload)
    profile = Profile(**data["profile"])
    configs = [SimConfig(profile=profile, **c) for c in data["configs"]]
    return asyncio.run(serve(configs))


# -- the simulator's ranking -----------------------------------------------------------------


def simulator_hit_rates(keys: list[str], out: Path) -> tuple[dict[str, float], str]:
    """bench/run.py (the simulated fleet) on its own mooncake workload, for ``keys``."""
    command = [sys.executable, str(REPO / "bench" / "run.py"), "--out", str(out)]
    command += ["--workloads", "mooncake", "--contenders", ",".join(keys), "--no-overhead"]
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=900)
    (out / "run.log").parent.mkdir(parents=True, exist_ok=True)
    (out / "run.log").write_text(done.stdout + done.stderr)
    data = json.loads((out / "results.json").read_text())
    rates = {
        r["contender"]: float(r["hit_rate"])
        for r in data["runs"]
        if r["workload"] == "mooncake" and r.get("hit_rate") is not None
    }
    return rates, " ".join(shlex.quote(a) for a in command)


# -- the report ------------------------------------------------------------------------------


def _pct(v: float) -> str:
    return f"{v * 100:.1f}%"


def summarize(runs: list[RunFigures], keys: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key in keys:
        mine = [r for r in runs if r.contender == key]
        if not mine:
            continue
        rates = [r.hit_rate for r in mine if r.hit_rate is not None]
        client = [r.client_hit_rate for r in mine if r.client_hit_rate is not None]
        out[key] = {
            "repetitions": len(mine),
            "hit_rate": median_range(rates) if rates else None,
            "client_hit_rate": median_range(client) if len(client) == len(mine) else None,
            "computed": median_range([r.computed for r in mine]),
            "completed": median_range([r.completed for r in mine]),
            "failed": median_range([r.failed for r in mine]),
            "deferred_max": median_range([r.deferred_max for r in mine]),
            "max_in_flight": median_range([r.max_in_flight for r in mine]),
            "metrics_match_timings": all(r.metrics_match_timings for r in mine),
        }
    return out


def _mr(t: tuple[float, float, float] | None, fmt: str) -> str:
    if t is None:
        return "n/a"
    med, lo, hi = t
    if fmt == "pct":
        return f"{_pct(med)} [{_pct(lo)}-{_pct(hi)}]"
    return f"{med:,.0f} [{lo:,.0f}-{hi:,.0f}]"


def verdict(real: list[str], sim: list[str], what: str = "the simulator's") -> tuple[bool, str]:
    both = [k for k in real if k in sim]
    real_order = [k for k in real if k in both]
    sim_order = [k for k in sim if k in both]
    same = real_order == sim_order
    flips = [
        f"{a} / {b}"
        for i, a in enumerate(real_order)
        for b in real_order[i + 1 :]
        if sim_order.index(a) > sim_order.index(b)
    ]
    if same:
        text = (
            f"The hit-rate ranking on the real servers **matches** {what}: "
            + " > ".join(real_order)
            + "."
        )
    else:
        text = (
            f"The hit-rate ranking on the real servers **does not match** {what}: "
            f"real {' > '.join(real_order)}; simulator {' > '.join(sim_order)} "
            f"(pairs in the other order: {', '.join(flips)})."
        )
    return same, text


def _run_rows(runs: list[RunFigures]) -> list[str]:
    lines = [
        "| contender | rep | hit rate | timings | computed | cached | completed | failed "
        "| deferred max (per server) | output tokens per server | in flight max | s |",
        "|---|--:|--:|--:|--:|--:|--:|--:|:-:|:-:|--:|--:|",
    ]
    for r in runs:
        lines.append(
            f"| {r.contender} | {r.repetition} | "
            f"{_pct(r.hit_rate) if r.hit_rate is not None else 'n/a'} | "
            f"{_pct(r.client_hit_rate) if r.client_hit_rate is not None else 'n/a'} | "
            f"{r.computed:,} | {r.cached:,} | {r.completed} | {r.failed} | "
            f"{'/'.join(map(str, r.deferred_max_per_server))} | "
            f"{'/'.join(map(str, r.predicted_per_server))} | {r.max_in_flight} | {r.seconds:g} |"
        )
    return lines


def write_report(
    out: Path, context: dict[str, Any], runs: list[RunFigures], mirror_runs: list[RunFigures]
) -> None:
    keys: list[str] = context["contenders"]
    labels: dict[str, str] = context["labels"]
    summary = summarize(runs, keys)
    real_rates = {k: v["hit_rate"][0] for k, v in summary.items() if v["hit_rate"] is not None}
    real_rank = ranking(real_rates)
    comparisons: dict[str, dict[str, Any]] = context.get("comparisons", {})
    sentences: dict[str, str] = {}
    for name, comp in comparisons.items():
        rank = ranking(comp["hit_rates"])
        what = "the simulator's" if name != "mirror" else "that of the simulator shaped like it"
        comp["ranking"] = rank
        comp["matches"], sentences[name] = verdict(real_rank, rank, what)
    context["ranking"] = real_rank
    context["summary"] = summary
    (out / "results.json").write_text(
        json.dumps(
            {
                "context": context,
                "runs": [asdict(r) for r in runs],
                "mirror_runs": [asdict(r) for r in mirror_runs],
            },
            indent=2,
        )
        + "\n"
    )
    w = context["workload"]
    s = context["servers"]
    lines = [
        "# Real llama-server: hit rate and prompt tokens computed",
        "",
        f"`{context['make_target']}` (`{context['command']}`), "
        f"{context['finished']}, {context['runtime_s']:.0f} s in all.",
        "",
        f"Machine: {context['machine']['cpu']}, {context['machine']['memory']}, "
        f"{context['machine']['os']}, Python {context['machine']['python']}. Other processes "
        f"used {context['background_cores']:.2f} cores on average during the run (the machine's "
        "busy time less this run's own processes).",
        "",
        "## Setup",
        "",
        f"- **Servers**: {N_SERVERS} `llama-server` processes ({s['version']}), a fresh set for "
        "every (contender, repetition), so every run starts with cold caches. Each: "
        f"`llama-server {' '.join(s['flags'])} --port <free port>`.",
        f"- **Model**: the e2e suite's tiny random Llama (`{s['model']}`: {s['shape']}); "
        f"{s['kv_bytes_per_token']} bytes of f16 KV per token, "
        f"{s['state_bytes_per_token']} per token of a saved slot state.",
        f"- **Context**: `-c {SLOTS * s['ctx_per_slot']}` with `-np {SLOTS}`, so "
        f"{s['ctx_per_slot']} tokens per slot: the longest request is {w['longest_request']} "
        f"tokens (prompt and output), the model's training context {s['n_ctx_train']}.",
        f"- **Host prompt cache**: `--cache-ram {s['cache_ram_mib']}` (MiB) per server: "
        f"{s['states_mean']} saved states of the workload's mean prompt ({w['prompt_tokens_mean']} "
        f"tokens), {s['states_p90']} of its p90 ({w['prompt_tokens_p90']}); with the slots' "
        f"own KV, the fleet holds about {s['states_fleet']} of the sample's "
        f"{w['conversations']} conversations at a time.",
        f"- **Workload**: {w['description']} (the lengths in that sentence are in the "
        "simulator's tokens, one word each). In the tiny model's tokens (its own `/tokenize`): "
        f"{w['prompt_tokens_total']:,} prompt tokens, {w['output_tokens_total']:,} output tokens; "
        f"prompts p10/p50/p90/max {w['prompt_tokens_p10']}/{w['prompt_tokens_p50']}/"
        f"{w['prompt_tokens_p90']}/{w['prompt_tokens_max']}. Hit-rate ceiling with infinite "
        f"caches (every earlier prompt kept forever, in the model's tokens): "
        f"**{_pct(w['ceiling'])}**.",
        "- **Contenders**: "
        + "; ".join(f"`{k}`: {labels[k]} ({context['versions'][k]})" for k in keys)
        + ". Each is started by `bench/contenders.py` as in `make bench` (not pinned to a core "
        "here: the three servers need both).",
        f"- **Repetitions**: {context['repetitions']}, interleaved (every contender once, then "
        "again).",
        "",
        "## Results",
        "",
        f"Median [range] over {context['repetitions']} repetitions.",
        "",
        "| contender | hit rate (/metrics) | hit rate (timings) | prompt tokens computed "
        "| completed / failed | requests_deferred max | in flight max |",
        "|---|--:|--:|--:|:-:|--:|--:|",
    ]
    for key in real_rank + [k for k in keys if k in summary and k not in real_rank]:
        v = summary[key]
        lines.append(
            f"| {labels[key]} | {_mr(v['hit_rate'], 'pct')} | {_mr(v['client_hit_rate'], 'pct')} "
            f"| {_mr(v['computed'], 'n')} | {v['completed'][0]:.0f} / {v['failed'][0]:.0f} "
            f"| {_mr(v['deferred_max'], 'n')} | {_mr(v['max_in_flight'], 'n')} |"
        )
    agree = sum(1 for r in runs if r.metrics_match_timings)
    whole = sum(r.usage_is_whole_prompt for r in runs)
    answered = sum(r.timings_seen for r in runs)
    lines += [
        "",
        "*hit rate (/metrics)*: `prompt_tokens_cached_total / (prompt_tokens_cached_total + "
        "prompt_tokens_total)`, the servers' counters summed over the three (read before and "
        "after the run). *hit rate (timings)*: `sum(cache_n) / sum(cache_n + prompt_n)` of the "
        "responses' `timings`. *prompt tokens computed*: the servers' `prompt_tokens_total`. "
        "*requests_deferred max*: the highest value any of the servers reported, sampled every "
        f"{METRICS_POLL_S:g} s (requests waiting in a server for a slot; a balancer that queues "
        "requests itself keeps it at 0). *in flight max*: the most requests the client had open "
        f"at once (the fleet has {N_SERVERS * SLOTS} slots).",
        "",
        f"What the counters count, checked on every run: `prompt_tokens_total` is the sum of the "
        f"responses' `timings.prompt_n` (the tokens computed, not the prompt's length) and "
        f"`prompt_tokens_cached_total` the sum of `timings.cache_n`, exactly, in {agree} of "
        f"{len(runs)} runs. `usage.prompt_tokens` is the whole prompt: equal to `cache_n + "
        f"prompt_n` and to the prompt's length by `/tokenize` in {whole:,} of {answered:,} "
        "responses.",
        "",
    ]
    if comparisons:
        lines += [
            "## Against the simulator",
            "",
            "Hit rates (the backends' counters) of the same contenders:",
            "",
        ]
        lines += [f"- *{c['title']}*: {c['source']}." for c in comparisons.values()]
        lines += [
            "",
            "| contender | real (median) | "
            + " | ".join(c["title"] for c in comparisons.values())
            + " |",
            "|---|--:|" + "--:|" * len(comparisons),
        ]
        for key in real_rank:
            cells = [
                _pct(c["hit_rates"][key]) if key in c["hit_rates"] else "n/a"
                for c in comparisons.values()
            ]
            lines.append(f"| {labels[key]} | {_pct(real_rates[key])} | {' | '.join(cells)} |")
        lines += [""]
        for name, comp in comparisons.items():
            lines += [f"Against the {comp['title']}: {sentences[name]}", ""]
        close = unsettled(
            real_rank, {k: v["hit_rate"] for k, v in summary.items() if v["hit_rate"]}
        )
        context["unsettled"] = close
        if close:
            lines += [
                "On the real servers, the hit-rate ranges of these neighbours in the ranking "
                f"overlap, so {context['repetitions']} repetitions do not settle their order: "
                + ", ".join(close)
                + ".",
                "",
            ]
    lines += ["## Every run", "", *_run_rows(runs)]
    if mirror_runs:
        m = context["mirror"]
        p = m["profile"]
        lines += [
            "",
            "### The simulator shaped like this fleet",
            "",
            f"Profile `{p['name']}`: {p['prompt_tps']:,.0f} words/s prefill and "
            f"{p['decode_tps']:,.0f} tokens/s decode (the tiny model's "
            f"{m['calibration']['prompt_per_second']:,.0f} and "
            f"{m['calibration']['predicted_per_second']:,.0f} tokens/s per request in the real "
            "runs, by the servers' own counters, at "
            f"{m['tokens_per_word']:.2f} tokens per word), batch {p['n_batch']}; per backend: "
            + ", ".join(f"{k} {v}" for k, v in m["configs"][0].items() if k != "name")
            + ". Each backend's other settings are llama-server's defaults, as in `make bench`.",
            "",
            *_run_rows(mirror_runs),
        ]
    errors = sorted({" ".join(e.split()) for r in [*runs, *mirror_runs] for e in r.errors})
    if errors or context["failures"] or context["unavailable"]:
        lines += ["", "Errors:", ""]
        lines += [f"- {k}: unavailable: {v}" for k, v in context["unavailable"].items()]
        lines += [f"- {k}: {' '.join(v.split())}" for k, v in context["failures"].items()]
        lines += [f"- {e}" for e in errors]
    lines += ["", "Raw numbers: `results.json` beside this file; logs under `logs/`.", ""]
    (out / "RESULTS.md").write_text("\n".join(lines))


# -- main ------------------------------------------------------------------------------------


def contender_keys() -> list[str]:
    """llamacpp-ha's default policy, ``cost`` and ``affinity`` when they exist, SGLang's
    cache-aware router, round robin: read from the installed llamacpp-ha each time."""
    from llamacpp_ha.policies import DEFAULT_POLICY, POLICIES

    keys = [f"ha-{DEFAULT_POLICY}"]
    keys += [f"ha-{p}" for p in ("cost", "affinity") if p in POLICIES]
    keys += ["sglang-ca", "ha-round-robin", "nginx-rr"]
    return list(dict.fromkeys(keys))


def _line(r: RunFigures) -> str:
    return (
        f"hit {_pct(r.hit_rate or 0)} (timings {_pct(r.client_hit_rate or 0)}), "
        f"computed {r.computed:,}, {r.completed}/{r.requests} ok, deferred max "
        f"{r.deferred_max}, in flight max {r.max_in_flight} [{r.seconds:g} s]"
    )


def _quantile(values: Sequence[int], q: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=Path("bench/results-real"))
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--repetitions", type=int, default=REPETITIONS)
    parser.add_argument("--span", type=float, default=SCALE.span_s, help="replay span, s")
    parser.add_argument(
        "--mirror-repetitions",
        type=int,
        default=MIRROR_REPETITIONS,
        help="runs of each contender on the simulator shaped like this fleet (0: none)",
    )
    parser.add_argument("--serve-mirror", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--contenders", default=None, help="comma-separated keys")
    parser.add_argument(
        "--simulator",
        choices=("run", "committed", "none"),
        default="run",
        help="the ranking to compare with: bench/run.py now (default), or bench/results/",
    )
    args = parser.parse_args(argv)
    if args.serve_mirror is not None:
        return serve_mirror(args.serve_mirror)
    started = time.monotonic()
    busy0, own0 = procs.machine_busy_seconds(), procs.own_seconds()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    log_dir = out.resolve() / "logs"
    (out / ".gitignore").write_text("logs/\nsim/logs/\nsim/*.png\n")

    keys = args.contenders.split(",") if args.contenders else contender_keys()
    everyone = {c.key: c for c in roster()}
    contenders = [everyone[k] for k in keys]
    unavailable = {c.key: r for c in contenders if (r := c.unavailable_reason()) is not None}
    for key, reason in unavailable.items():
        print(f"bench-real: {key} unavailable: {reason}", flush=True)
    usable = [c for c in contenders if c.key not in unavailable]

    binary = llama_server_binary()
    model = tiny_model()
    shape = model_shape()
    scale = dataclasses.replace(SCALE, span_s=args.span)
    workload = wl.mooncake(args.seed, "mooncake", scale)
    texts = [t.content for s in workload.sessions for t in s.turns]
    outputs = [t.max_tokens for s in workload.sessions for t in s.turns]

    # The prompts in the model's tokens, from a server of its own, before the fleet is sized.
    probe_spec = ServerSpec(binary, model, 1, CTX_STEP, 0)
    probe = start_servers(probe_spec, 1, log_dir, "tokenizer-")
    try:
        tokens = asyncio.run(tokenize(probe[0].url, texts))
    finally:
        probe[0].stop()
    lengths = [len(t) for t in tokens]
    longest = max(n + o for n, o in zip(lengths, outputs, strict=True))
    state = shape.state_size()
    spec = ServerSpec(
        binary,
        model,
        SLOTS,
        slot_ctx(longest, shape.n_ctx_train),
        cache_ram_mib(state, lengths, HOST_CACHE_PROMPTS),
    )
    mean = round(statistics.fmean(lengths))
    p90 = _quantile(lengths, 0.9)
    held = states_held(state, spec.cache_ram_mib, mean)
    version = subprocess.run(
        [str(binary), "--version"], capture_output=True, text=True, check=False
    ).stderr.strip()
    context: dict[str, Any] = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "make_target": "make bench-real",
        "seed": args.seed,
        "machine": machine_info(),
        "python": platform.python_version(),
        "repetitions": args.repetitions,
        "contenders": [c.key for c in usable],
        "labels": {c.key: c.label for c in contenders},
        "versions": {c.key: c.version() for c in usable},
        "unavailable": unavailable,
        "failures": {},
        "servers": {
            "count": N_SERVERS,
            "binary": str(binary),
            "version": " ".join(version.splitlines()[:1]),
            "flags": [
                a if a != str(model) else f"~/.cache/llamacpp-ha/models/{model.name}"
                for a in spec.flags()
            ],
            "model": model.name,
            "shape": ", ".join(f"{k} {v}" for k, v in asdict(shape).items()),
            "n_ctx_train": shape.n_ctx_train,
            "kv_bytes_per_token": shape.kv_bytes_per_token,
            "state_bytes_per_token": state.of(2) - state.of(1),
            "ctx_per_slot": spec.ctx_per_slot,
            "cache_ram_mib": spec.cache_ram_mib,
            "states_mean": held,
            "states_p90": states_held(state, spec.cache_ram_mib, p90),
            "states_fleet": N_SERVERS * (held + SLOTS),
        },
        "workload": {
            "description": workload.description,
            "requests": workload.n_requests,
            "conversations": scale.conversations,
            "scale": asdict(scale),
            "prompt_tokens_total": sum(lengths),
            "output_tokens_total": sum(outputs),
            "prompt_tokens_mean": mean,
            "prompt_tokens_p10": _quantile(lengths, 0.1),
            "prompt_tokens_p50": _quantile(lengths, 0.5),
            "prompt_tokens_p90": p90,
            "prompt_tokens_max": max(lengths),
            "longest_request": longest,
            "ceiling": infinite_cache_ceiling(tokens),
        },
    }
    print(
        f"bench-real: {workload.n_requests} requests, {sum(lengths):,} prompt tokens "
        f"(max {max(lengths)}), -c {SLOTS * spec.ctx_per_slot} -np {SLOTS}, "
        f"--cache-ram {spec.cache_ram_mib} (~{held} prompts of {mean} tokens), "
        f"ceiling {_pct(context['workload']['ceiling'])}",
        flush=True,
    )

    runs: list[RunFigures] = []
    for rep in range(1, args.repetitions + 1):
        for contender in usable:
            result = run_one(contender, rep, spec, workload, lengths, log_dir)
            if isinstance(result, str):
                context["failures"][f"{contender.key}/{rep}"] = result
                print(f"  {contender.key} #{rep}: {result}", flush=True)
                continue
            runs.append(result)
            print(f"  {contender.key:<16} #{rep} {_line(result)}", flush=True)

    mirror_runs: list[RunFigures] = []
    if args.mirror_repetitions > 0 and runs:
        calibration = measured_speeds(runs)
        tok = Tokenizer()
        sim_lengths = [len(tok.tokenize(t, add_bos=True)) for t in texts]
        mirror = mirror_of(spec, state, lengths, sim_lengths, outputs, calibration)
        context["mirror"] = {
            "profile": asdict(mirror.profile),
            "configs": mirror.configs(),
            "tokens_per_word": mirror.tokens_per_word,
            "calibration": calibration,
            "repetitions": args.mirror_repetitions,
        }
        print(
            f"bench-real: the simulator shaped like this fleet ({mirror.tokens_per_word:.2f} "
            f"tokens per word; {mirror.profile.prompt_tps:,.0f} words/s prefill, "
            f"{mirror.profile.decode_tps:,.0f} tokens/s decode, host cache "
            f"{mirror.cache_ram_tokens:,} words, time scale {mirror.time_scale:g})",
            flush=True,
        )
        for rep in range(1, args.mirror_repetitions + 1):
            for contender in usable:
                result = run_one(contender, rep, mirror, workload, sim_lengths, log_dir)
                if isinstance(result, str):
                    context["failures"][f"mirror/{contender.key}/{rep}"] = result
                    print(f"  mirror {contender.key} #{rep}: {result}", flush=True)
                    continue
                mirror_runs.append(result)
                print(f"  mirror {contender.key:<16} #{rep} {_line(result)}", flush=True)

    sim_keys = [c.key for c in usable]
    comparisons: dict[str, dict[str, Any]] = {}
    if args.simulator == "run":
        print("bench-real: the simulator's harness on its mooncake workload", flush=True)
        rates, command = simulator_hit_rates(sim_keys, out / "sim")
        comparisons["harness"] = {
            "title": "simulator, `make bench`'s harness (run now)",
            "hit_rates": rates,
            "command": command,
            "source": (
                "`bench/run.py` run now for the same contenders on its own `mooncake` workload "
                "and simulated fleet (those of `make bench`: 40 of these 50 conversations, "
                "4 backends of 4, 4, 2 and 2 slots of the `gpu-8b` profile, 8 GiB of host "
                f"cache each; one run each; its report is `sim/RESULTS.md`): `{command}`"
            ),
        }
    committed = REPO / "bench" / "results" / "results.json"
    if committed.exists():
        data = json.loads(committed.read_text())
        comparisons["committed"] = {
            "title": "simulator, committed `bench/results/`",
            "hit_rates": {
                r["contender"]: float(r["hit_rate"])
                for r in data["runs"]
                if r["workload"] == "mooncake" and r["contender"] in sim_keys and r.get("hit_rate")
            },
            "source": "the `mooncake` rows of the committed `bench/results/results.json` "
            "(`make bench`, the same harness as above at the commit that wrote it)",
        }
    if mirror_runs:
        comparisons["mirror"] = {
            "title": "simulator shaped like this fleet",
            "hit_rates": {
                k: v["hit_rate"][0]
                for k, v in summarize(mirror_runs, sim_keys).items()
                if v["hit_rate"] is not None
            },
            "source": (
                "the simulator (`llamacpp_sim`) shaped like the real fleet, the same 157 "
                f"requests: {N_SERVERS} backends of {SLOTS} slots, a host cache that holds as "
                "many of the workload's states as `--cache-ram` does here, the tiny model's "
                "speeds in the real runs (the servers' own `prompt_seconds_total` and "
                "`tokens_predicted_seconds_total`), its tokens the "
                f"workload's words (1 word = {mirror.tokens_per_word:.2f} of the tiny model's "
                f"tokens); {args.mirror_repetitions} run(s) each, median"
            ),
        }
    context["comparisons"] = comparisons
    context["runtime_s"] = time.monotonic() - started
    context["finished"] = time.strftime("%Y-%m-%d %H:%M %Z")
    procs.stop_all()
    # Other work on this machine shifts the timings, and so the hit rates: measured, not hidden.
    others = (procs.machine_busy_seconds() - busy0) - (procs.own_seconds() - own0)
    context["background_cores"] = max(others, 0.0) / context["runtime_s"]
    write_report(out, context, runs, mirror_runs)
    print(f"bench-real: wrote {out / 'RESULTS.md'} in {context['runtime_s']:.0f} s", flush=True)
    return 0 if runs and not context["failures"] else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        procs.stop_all()
