"""Soak: rotate backend faults under load for a few minutes and count what became of every
request. Run with `make soak` (not part of CI). Prints, and exits 1 if anything was lost.

A request ends one of three ways:
- succeeded: 200 with a complete answer (a JSON body, or a stream ending in `data: [DONE]`);
- failed cleanly: an OpenAI-style error body, or a stream ending in an error event;
- lost: anything else (no answer within the deadline, a stream cut without an error event,
  a connection dropped without a status). Must be 0.
Clients that leave on purpose (random disconnects) are counted apart.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

from llamacpp_sim import SimProcess, spawn

FAULTS: list[dict[str, object]] = [
    {"crash_after_chunks": 3, "crash_mode": "reset"},
    {"crash_after_chunks": 5, "crash_mode": "close"},
    {"stall_after_chunks": 2, "stall_keepalive": True},
    {"garbage": True},
    {"error_500": True},
    {"hang": True},
    {"loading_s": 3},
    {"garbage_status_line": True},
    {"slots_lie": True},
]
PROCESS_FAULTS = ("sigkill", "sigstop")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


@dataclass
class Tally:
    outcomes: Counter[str] = field(default_factory=Counter)
    lost_examples: list[str] = field(default_factory=list)

    def add(self, outcome: str, detail: str = "") -> None:
        self.outcomes[outcome] += 1
        if outcome == "lost" and len(self.lost_examples) < 10:
            self.lost_examples.append(detail)


class Fleet:
    def __init__(self, count: int) -> None:
        self.count = count
        self.procs: list[SimProcess | None] = [None] * count
        self.ports = [free_port() for _ in range(count)]

    async def start(self, index: int) -> None:
        self.procs[index] = await asyncio.to_thread(
            spawn, port=self.ports[index], slots=4, profile="gpu-8b", time_scale=4, timeout_s=10
        )

    async def stop(self) -> None:
        for proc in self.procs:
            if proc is not None:
                proc.kill()

    def url(self, index: int) -> str:
        return f"http://127.0.0.1:{self.ports[index]}"


async def one_request(
    client: httpx.AsyncClient, url: str, rng: random.Random, tally: Tally
) -> None:
    stream = rng.random() < 0.7
    body = {
        "messages": [{"role": "user", "content": f"soak {rng.random()}"}],
        "max_tokens": rng.randint(4, 80),
        "stream": stream,
    }
    leave_after = rng.uniform(0.05, 1.0) if rng.random() < 0.1 else None
    try:
        async with asyncio.timeout(leave_after):
            await _exchange(client, url, body, stream, tally)
    except TimeoutError:
        tally.add("client left")


async def _exchange(
    client: httpx.AsyncClient, url: str, body: dict[str, object], stream: bool, tally: Tally
) -> None:
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
            data = b"".join([chunk async for chunk in response.aiter_bytes()])
    except httpx.TimeoutException:
        tally.add("lost", "no answer within the client deadline")
        return
    except httpx.HTTPError as exc:
        tally.add("lost", f"transport error {type(exc).__name__}")
        return
    if response.status_code == 200 and not stream:
        try:
            json.loads(data)["choices"]
            tally.add("succeeded")
        except (ValueError, KeyError, TypeError):
            tally.add("lost", f"200 with a body that is not an answer: {data[:80]!r}")
        return
    if response.status_code == 200:
        events = [line[6:] for line in data.splitlines() if line.startswith(b"data: ")]
        if events and events[-1] == b"[DONE]":
            tally.add("succeeded")
        elif events and b'"error"' in events[-1]:
            tally.add("failed cleanly")
        else:
            tally.add("lost", f"stream cut without an error event: {data[-80:]!r}")
        return
    try:
        json.loads(data)["error"]["message"]
        tally.add("failed cleanly")
    except (ValueError, KeyError, TypeError):
        tally.add("lost", f"{response.status_code} without an error body: {data[:80]!r}")


async def rotate_faults(
    fleet: Fleet, stop: asyncio.Event, rng: random.Random, log: list[str]
) -> None:
    async with httpx.AsyncClient(timeout=5) as control:
        while not stop.is_set():
            index = rng.randrange(fleet.count)
            kind = rng.choice([*PROCESS_FAULTS, *(json.dumps(f) for f in FAULTS)])
            log.append(f"backend {index}: {kind}")
            proc = fleet.procs[index]
            assert proc is not None
            if kind == "sigkill":
                proc.kill()
                await asyncio.sleep(2)
                await fleet.start(index)
            elif kind == "sigstop":
                proc.send_signal(signal.SIGSTOP)
                await asyncio.sleep(3)
                proc.send_signal(signal.SIGCONT)
            else:
                await control.post(fleet.url(index) + "/sim/control", content=kind)
                await asyncio.sleep(4)
                await control.post(fleet.url(index) + "/sim/control", content="{}")
            await asyncio.sleep(1)


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--backends", type=int, default=3)
    parser.add_argument("--rate", type=float, default=15.0, help="requests per second")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)

    fleet = Fleet(args.backends)
    for index in range(args.backends):
        await fleet.start(index)
    port = free_port()
    backend_flags = [flag for i in range(args.backends) for flag in ("--backend", fleet.url(i))]
    balancer = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llamacpp_ha", *backend_flags, "--port", str(port),
        "--poll-interval", "0.5", "--first-byte-timeout", "5", "--idle-timeout", "5",
        "--request-timeout", "30", "--queue-timeout", "20", "--log-level", "error",
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    tally, fault_log = Tally(), []
    try:
        async with httpx.AsyncClient(
            timeout=60, limits=httpx.Limits(max_connections=500)
        ) as client:
            for _ in range(100):
                try:
                    if (await client.get(url + "/health")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
            rss_start = rss_kib(balancer.pid)
            stop = asyncio.Event()
            rotator = asyncio.create_task(rotate_faults(fleet, stop, rng, fault_log))
            requests: set[asyncio.Task[None]] = set()
            deadline = time.monotonic() + args.minutes * 60
            while time.monotonic() < deadline:
                task = asyncio.create_task(one_request(client, url, rng, tally))
                requests.add(task)
                task.add_done_callback(requests.discard)
                await asyncio.sleep(rng.expovariate(args.rate))
            stop.set()
            await rotator
            await asyncio.gather(*requests)
            await asyncio.sleep(1)
            monitor = (await client.get(url + "/monitor/data")).json()
            rss_end = rss_kib(balancer.pid)
    finally:
        balancer.send_signal(signal.SIGTERM)
        await balancer.wait()
        await fleet.stop()

    sent = sum(tally.outcomes.values())
    in_flight = sum(b["in_flight"] for b in monitor["backends"])
    kinds = sorted({entry.split(": ", 1)[1] for entry in fault_log})
    print(f"soak: {args.minutes:g} min, {args.backends} backends, {args.rate:g} req/s")
    print(f"seed {args.seed}; {len(fault_log)} faults injected, of {len(kinds)} kinds:")
    for kind in kinds:
        print(f"  {kind}")
    print(f"requests sent: {sent}")
    for outcome in ("succeeded", "failed cleanly", "client left", "lost"):
        print(f"  {outcome}: {tally.outcomes[outcome]}")
    for example in tally.lost_examples:
        print(f"    lost: {example}")
    print(f"afterwards: slots in flight {in_flight}, queue depth {monitor['queue']['depth']}")
    print(f"balancer RSS: {rss_start / 1024:.1f} MiB at start, {rss_end / 1024:.1f} MiB at end")
    print(f"balancer exit status after SIGTERM: {balancer.returncode}")
    ok = tally.outcomes["lost"] == 0 and in_flight == 0 and monitor["queue"]["depth"] == 0
    return 0 if ok and balancer.returncode == 0 else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(asyncio.run(main()))
