"""What the relay costs llamacpp-ha in instructions, under callgrind: a figure that repeats.

    bench/.venv/bin/python bench/instructions.py                    (make bench-instructions)
    bench/.venv/bin/python bench/instructions.py --src /tmp/old/src --src src

CPU time on this machine swings by a quarter from one minute to the next (the overhead section
shows it: the compiled peers' figures move as much as ours), which hides a change of 10 %.
The instructions a process executes in user space do not: under valgrind's callgrind the same
requests cost the same count within a fraction of a percent, run after run. So each source
tree given (`--src`, a `src` directory holding `llamacpp_ha`; several trees are run one after
the other, to compare) serves the overhead section's stand-in backend (the ticker) under
callgrind, and for each of three phases the count is zeroed, the phase run, and the count
dumped:

- *per request*: small chat requests with `stream: false`, 4 at a time;
- *per one-token stream*: the same with `stream: true`;
- *per chunk*: streams of 100 chunks, a chunk every 20 ms, less their one-token part.

Kernel time (the system calls of the sockets) is not counted: this measures our code and the
libraries it runs on, which is what a change to it changes. Instrumentation starts after
start-up and a warm-up, so imports and the first requests' caches are not counted either. It
needs valgrind (Debian's `valgrind`; bench/setup.sh installs it) and takes about 45 s a tree.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import procs
from bench.client import new_session
from bench.contenders import Running
from bench.overhead import _body, _closed_loop, start_ticker

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Phase:
    name: str
    requests: int
    body: dict[str, Any]
    stream: bool


PHASES = (
    Phase("request", 600, _body(1), stream=False),
    Phase("one-token stream", 600, _body(1), stream=True),
    Phase("chunks", 40, _body(100, 20), stream=True),
)


@dataclass
class Count:
    src: str
    revision: str
    per_request: float  # instructions
    per_stream1: float
    per_chunk: float
    failures: int


def _revision(src: Path) -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(src), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "-"
    return out.stdout.strip()


def _control(*args: str) -> None:
    subprocess.run(
        ["callgrind_control", *args],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _dumped(prefix: str, seen: set[str]) -> tuple[int, set[str]]:
    """The instruction total of the newest dump, and the dumps now on disk."""
    deadline = time.monotonic() + 30
    while True:
        now = set(glob.glob(prefix + "*"))
        new = sorted(now - seen, key=os.path.getmtime)
        if new:
            with open(new[-1], encoding="utf-8") as dump:
                for line in dump:
                    if line.startswith(("totals:", "summary:")):
                        return int(line.split()[1]), now
        if time.monotonic() > deadline:
            raise RuntimeError(f"callgrind wrote no dump under {prefix}")
        time.sleep(0.05)  # the dump is written by the measured process, asynchronously


async def _ready(base: str, child: subprocess.Popen[bytes]) -> None:
    async with new_session() as http:
        for _ in range(1200):  # start-up under valgrind takes a few seconds
            if child.poll() is not None:
                raise RuntimeError("llamacpp-ha exited under valgrind")
            try:
                async with http.get(base + "/monitor/data") as response:
                    backends = (await response.json()).get("backends", [])
                if backends and all(b.get("state") == "ready" for b in backends):
                    return
            except (OSError, ValueError):
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError("llamacpp-ha did not become ready under valgrind")


def _start(src: Path, url: str, log_dir: Path) -> tuple[subprocess.Popen[bytes], int, Any]:
    """llamacpp-ha from `src` under callgrind, instrumenting nothing yet."""
    port = procs.free_port()
    command = ["valgrind", "--tool=callgrind", "--instr-atstart=no"]
    command += [f"--callgrind-out-file={log_dir}/callgrind-{port}.%p", sys.executable]
    command += ["-m", "llamacpp_ha", "--host", "127.0.0.1", "--port", str(port)]
    # Polls once a minute: what a phase counts is the requests' work, not the poller's.
    command += ["--log-level", "warning", "--backend", url, "--poll-interval", "60"]
    env = dict(os.environ, PYTHONPATH=str(src), PYTHONHASHSEED="0")
    log = open(log_dir / f"llamacpp-ha-{port}.log", "wb")  # noqa: SIM115 - closed by measure()
    child = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    return child, port, log


async def measure(src: Path, log_dir: Path) -> Count:
    ticker, url = start_ticker(log_dir, None, 600)
    child, port, log = _start(src, url, log_dir)
    prefix = str(log_dir / f"callgrind-{port}")
    base = f"http://127.0.0.1:{port}"
    counts: dict[str, tuple[int, int, int]] = {}
    failures = 0
    try:
        await _ready(base, child)
        running = Running(base_url=base)
        pid = str(child.pid)
        seen: set[str] = set()
        async with new_session() as http:
            await _closed_loop(http, running, 4, 100, _body(1))
            await _closed_loop(http, running, 4, 100, _body(1), stream=False)
            _control("-i", "on", pid)
            await _closed_loop(http, running, 4, 50, _body(1), stream=False)
            for phase in PHASES:
                _control("-z", pid)
                outcomes = await _closed_loop(
                    http, running, 4, phase.requests, phase.body, stream=phase.stream
                )
                _control("-d", pid)
                total, seen = await asyncio.to_thread(_dumped, prefix, seen)
                tokens = sum(o.output_tokens for o in outcomes)
                counts[phase.name] = (total, len(outcomes), tokens)
                failures += sum(1 for o in outcomes if not o.ok)
    finally:
        child.terminate()
        child.wait()
        log.close()
        ticker.stop()
    request, stream1, chunks = (counts[p.name] for p in PHASES)
    per_stream1 = stream1[0] / stream1[1]
    return Count(
        src=str(src),
        revision=_revision(src),
        per_request=request[0] / request[1],
        per_stream1=per_stream1,
        per_chunk=(chunks[0] - per_stream1 * chunks[1]) / max(chunks[2], 1),
        failures=failures,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--src",
        action="append",
        type=Path,
        help="a tree's src directory (holding llamacpp_ha); several to compare (default: ./src)",
    )
    parser.add_argument("--out", type=Path, help="also write the counts to this JSON file")
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("bench/instructions.py: needs valgrind (apt-get install valgrind)", file=sys.stderr)
        return 2
    sources = [s.resolve() for s in (args.src or [ROOT / "src"])]
    log_dir = ROOT / "test-output" / "instructions"
    log_dir.mkdir(parents=True, exist_ok=True)
    counts = [asyncio.run(measure(src, log_dir)) for src in sources]
    print("| tree | per request | per one-token stream | per chunk | failed |")
    print("|---|--:|--:|--:|--:|")
    for c in counts:
        print(
            f"| {c.revision} | {c.per_request / 1e3:,.0f} k | {c.per_stream1 / 1e3:,.0f} k "
            f"| {c.per_chunk / 1e3:,.1f} k | {c.failures} |"
        )
    if args.out is not None:
        args.out.write_text(json.dumps([asdict(c) for c in counts], indent=2) + "\n")
    return 1 if any(c.failures for c in counts) else 0


if __name__ == "__main__":
    sys.exit(main())
