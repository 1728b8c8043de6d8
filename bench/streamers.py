"""Many concurrent streams for the overhead section: several client processes, one result.

One aiohttp process tops out at a few hundred streams of its own before its event loop, not the
balancer, sets the relay delay. `StreamPool` spreads the streams over several worker processes
(spawned, each with its own event loop and aiohttp session, driven over a pipe) and merges what
they saw. A step is the same in every worker:

1. the streams start at a fixed rate (stream i at ``t0 + i / start_rate``, whoever runs it), so
   admitting them is not a burst that says more about accepting connections than relaying;
2. once every stream in every worker has its first chunk (the parent waits for all of them),
   the parent names a window, which starts a moment later and lasts ``window_s``: every stream
   is open during all of it, so exactly ``n`` streams flow;
3. only chunks the backend stamped inside the window count (their relay delay: when the client
   read it minus when the ticker wrote it, ``CLOCK_MONOTONIC`` for every process), and at its
   end every stream is cancelled.

A stream that fails (an HTTP error, a broken connection) is a failure; one that ended before
the window did means the step never had ``n`` streams open at once (``short``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

# Past this (plus the planned start of the last stream), a step that has not opened all its
# streams is given up: the balancer admits streams too slowly to hold that many.
OPEN_TIMEOUT_S = 4.0


@dataclass(frozen=True)
class StepJob:
    """One worker's share of a step: its streams' global indices and what they send."""

    url: str
    headers: dict[str, str]
    body: dict[str, Any]
    indices: tuple[int, ...]
    t0: float
    start_rate: float
    open_timeout_s: float = OPEN_TIMEOUT_S


@dataclass
class StepResult:
    """A step's streams, merged over the workers."""

    streams: int
    opened: int = 0  # streams that had their first chunk
    failures: int = 0
    short: int = 0  # ended before the window did
    delays_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # the first few
    all_open: bool = False  # every stream had its first chunk before the open timeout
    window_s: float = 0.0

    @property
    def held(self) -> bool:
        """True when all ``streams`` were open together for the whole window."""
        return self.all_open and not self.failures and not self.short


class StreamPool:
    """Worker processes for `step()`; ``start()`` once, ``close()`` at the end."""

    def __init__(self, processes: int) -> None:
        self.processes = max(1, processes)
        self._workers: list[tuple[subprocess.Popen[bytes], Connection]] = []

    def start(self) -> None:
        # Fresh interpreters (`python -m bench.streamers FD`), not fork: the parent runs an event
        # loop and has children of its own; nor multiprocessing's spawn, which imports the
        # caller's main module again. They inherit the parent's CPU affinity.
        root = str(Path(__file__).resolve().parent.parent)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
        }
        for _ in range(self.processes):
            mine, theirs = socket.socketpair()
            fd = theirs.fileno()
            proc = subprocess.Popen(
                [sys.executable, "-m", "bench.streamers", str(fd)],
                pass_fds=(fd,),
                env=env,
                stdin=subprocess.DEVNULL,
            )
            theirs.close()
            self._workers.append((proc, Connection(mine.detach())))

    def close(self) -> None:
        for proc, conn in self._workers:
            with contextlib.suppress(OSError):
                conn.send(("stop", None))
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
            conn.close()
        self._workers = []

    def __enter__(self) -> StreamPool:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def step(
        self,
        url: str,
        headers: dict[str, str],
        body: dict[str, Any],
        streams: int,
        start_rate: float,
        settle_s: float,
        window_s: float,
        during: Callable[[], None] | None = None,
    ) -> StepResult:
        """``streams`` streams of ``body``, held open together for ``window_s`` after all have
        opened and ``settle_s`` more; ``during`` is called in the middle of the window."""
        if not self._workers:
            raise RuntimeError("StreamPool.step() before start()")
        t0 = time.monotonic() + 0.05
        shares = [tuple(range(i, streams, len(self._workers))) for i in range(len(self._workers))]
        busy = [(w, s) for w, s in zip(self._workers, shares, strict=True) if s]
        for (_, conn), share in busy:
            conn.send(("step", StepJob(url, headers, body, share, t0, start_rate)))
        opened = [await _recv(conn) for (_, conn), _ in busy]
        result = StepResult(streams)
        result.all_open = all(o[1] is not None for o in opened)
        last_open = max((o[1] for o in opened if o[1] is not None), default=time.monotonic())
        start = max(last_open, time.monotonic()) + settle_s if result.all_open else 0.0
        window = (start, start + window_s) if result.all_open else (0.0, 0.0)
        for (_, conn), _ in busy:
            conn.send(("window", window))
        if during is not None and result.all_open:
            await asyncio.sleep(max(0.0, start + window_s / 2 - time.monotonic()))
            during()
        for (_, conn), _ in busy:
            part = await _recv(conn)
            result.opened += part["opened"]
            result.failures += part["failures"]
            result.short += part["short"]
            result.delays_ms.extend(part["delays_ms"])
            result.errors.extend(part["errors"][: max(0, 5 - len(result.errors))])
        result.window_s = window_s if result.all_open else 0.0
        return result


async def _read(conn: Connection) -> Any:
    """The next message, waited for on the event loop (a thread blocked in ``recv()`` would
    keep ``asyncio.run()`` from returning when the run is interrupted)."""
    if not conn.poll():
        loop = asyncio.get_running_loop()
        ready = loop.create_future()

        def readable() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(conn.fileno(), readable)
        try:
            await ready
        finally:
            loop.remove_reader(conn.fileno())
    return conn.recv()


async def _recv(conn: Connection) -> Any:
    try:
        reply = await _read(conn)
    except (EOFError, OSError) as exc:
        raise RuntimeError(f"a stream worker exited ({type(exc).__name__})") from None
    if isinstance(reply, tuple) and reply and reply[0] == "crashed":
        raise RuntimeError(f"a stream worker failed: {reply[1]}")
    return reply


# -- the worker process ------------------------------------------------------------------------


def _worker(conn: Connection) -> None:
    """A worker's whole life: commands from the pipe until ``stop`` or the pipe closes."""
    try:
        asyncio.run(_serve(conn))
    except Exception as exc:  # the parent must hear of it, not wait forever
        with contextlib.suppress(OSError):
            conn.send(("crashed", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


async def _serve(conn: Connection) -> None:
    import aiohttp

    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=120),
    )
    try:
        while True:
            try:
                command, arg = await _read(conn)
            except EOFError:
                return  # the parent is gone
            if command == "stop":
                return
            if command == "step":
                await _step(session, conn, arg)
    finally:
        await session.close()


@dataclass
class _Stream:
    first_at: float | None = None
    ended_at: float | None = None
    error: str | None = None
    stamps: list[float] = field(default_factory=list)  # backend send times, s
    delays: list[float] = field(default_factory=list)  # relay delays, s


async def _step(session: Any, conn: Connection, job: StepJob) -> None:
    rng = random.Random(job.indices[0] if job.indices else 0)
    streams = [_Stream() for _ in job.indices]
    all_open = asyncio.Event()
    pending = len(streams)

    def opened() -> None:
        nonlocal pending
        pending -= 1
        if pending <= 0:
            all_open.set()

    async def one(i: int, s: _Stream) -> None:
        # Jitter within one start interval, so that workers do not start streams in lockstep.
        at = job.t0 + (i + rng.random()) / job.start_rate
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        await _stream(session, job, s, opened)

    tasks = [asyncio.create_task(one(i, s)) for i, s in zip(job.indices, streams, strict=True)]
    if not streams:
        all_open.set()
    try:
        await asyncio.wait_for(all_open.wait(), job.open_timeout_s + len(streams) / job.start_rate)
        conn.send(("open", max((s.first_at or 0.0) for s in streams) if streams else 0.0))
    except TimeoutError:
        conn.send(("open", None))
    command, window = await _read(conn)
    assert command == "window"
    lo, hi = window
    await asyncio.sleep(max(0.0, hi - time.monotonic()))
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    delays: list[float] = []
    for s in streams:
        delays.extend(d * 1000 for t, d in zip(s.stamps, s.delays, strict=True) if lo <= t <= hi)
    errors = [s.error for s in streams if s.error]
    conn.send(
        {
            "opened": sum(1 for s in streams if s.first_at is not None),
            "failures": len(errors),
            "short": sum(1 for s in streams if s.ended_at is not None and s.ended_at < hi),
            "delays_ms": delays,
            "errors": errors[:5],
        }
    )


async def _stream(session: Any, job: StepJob, s: _Stream, opened: Callable[[], None]) -> None:
    """One stamped stream; its first chunk calls ``opened`` (so does a failure to open)."""
    import aiohttp

    payload = {**job.body, "stream": True, "stream_options": {"include_usage": True}}
    told = False
    try:
        async with session.post(job.url, json=payload, headers=job.headers) as resp:
            if resp.status != 200:
                detail = (await resp.read())[:200].decode("utf-8", "replace")
                s.error = f"HTTP {resp.status}: {detail}"
                return
            async for raw in resp.content:
                if not raw.startswith(b"data:"):
                    continue
                now = time.monotonic()
                data = raw[5:].strip()
                if data == b"[DONE]":
                    s.ended_at = now
                    continue
                stamp = _stamp(json.loads(data))
                if stamp is None:
                    continue
                if s.first_at is None:
                    s.first_at = now
                    told = True
                    opened()
                s.stamps.append(stamp)
                s.delays.append(now - stamp)
            if s.ended_at is None:
                s.ended_at = time.monotonic()
    except asyncio.CancelledError:
        raise  # the window's end: not a failure
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        s.error = f"{type(exc).__name__}: {exc}"[:200]
    finally:
        if not told:
            opened()


def _stamp(event: Any) -> float | None:
    """The ticker's send time (s) carried as a chunk's text, or None for other events."""
    choices = event.get("choices") if isinstance(event, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None
    delta = choices[0].get("delta")
    text = delta.get("content") if isinstance(delta, dict) else choices[0].get("text")
    if not isinstance(text, str) or not text.isdigit():
        return None
    return int(text) / 1e9


if __name__ == "__main__":
    _worker(Connection(int(sys.argv[1])))
