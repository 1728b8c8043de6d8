"""`llamacpp-ha demo` as a user runs it: a real process in a session of its own (a terminal's
foreground job), Ctrl-C sent to its whole process group, the example's default load."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import unittest
from collections.abc import Callable
from pathlib import Path
from typing import IO

import httpx
import pytest

from serving import free_port

# A demo's start and its drain each get their own generous deadline below; together they may
# outlast the suite's 60 s per test.
pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parent.parent
# Generous: the suite runs on 2 busy cores, and the demo starts four Python processes' worth of
# imports before it is healthy.
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 60.0
POLL_S = 0.05


def wait_for(condition: Callable[[], object], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:g} s")
        time.sleep(POLL_S)


def alive(pid: int) -> bool:
    """Running, stopped or sleeping; a zombie has exited and only waits to be reaped (by
    whichever init adopted it, which may never do it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def simulators_of(pid: int) -> list[int]:
    """The demo's children running the simulator (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid and b"llamacpp_sim" in cmdline:
            found.append(int(entry.name))
    return found


class DemoProcess:
    """`llamacpp-ha demo` on a free port, its output in a file (a pipe nobody reads could fill
    up and stall it), leading a process group of its own as a shell's foreground job does."""

    def __init__(self) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self._output: IO[str] = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed in close()
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "llamacpp_ha", "demo", "--port", str(self.port)],
            stdin=subprocess.DEVNULL,
            stdout=self._output,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.simulators: list[int] = []

    def wait_healthy(self) -> None:
        def healthy() -> bool:
            if self.popen.poll() is not None:
                raise AssertionError(f"the demo exited: {self.output()}")
            try:
                return httpx.get(self.base + "/health", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, START_TIMEOUT_S, "the demo is healthy")
        self.simulators = simulators_of(self.popen.pid)

    def output(self) -> str:
        self._output.seek(0)
        return self._output.read()

    def close(self) -> None:
        """Whatever a failed test left: the demo's group, and the simulators in theirs."""
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()
        for pid in self.simulators:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        self._output.close()


class DemoTest(unittest.TestCase):
    def start_demo(self) -> DemoProcess:
        demo = DemoProcess()
        self.addCleanup(demo.close)
        demo.wait_healthy()
        # One child process serves the three simulated backends.
        self.assertEqual(len(demo.simulators), 1, demo.simulators)
        return demo

    def assert_simulators_gone(self, demo: DemoProcess) -> None:
        wait_for(
            lambda: not any(alive(pid) for pid in demo.simulators),
            # It stops at once when told; an orphan looks for its parent twice a second.
            30,
            "the simulator processes have exited",
        )

    def test_demo_serves_and_cleans_up(self) -> None:
        demo = self.start_demo()
        body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
        reply = httpx.post(demo.base + "/v1/chat/completions", json=body, timeout=30)
        self.assertEqual(reply.status_code, 200, reply.text)
        self.assertEqual(reply.json()["usage"]["completion_tokens"], 4)
        data = httpx.get(demo.base + "/monitor/data", timeout=10).json()
        self.assertEqual([b["name"] for b in data["backends"]], ["gpu-a", "gpu-b", "cpu-c"])
        self.assertEqual([b["slots_total"] for b in data["backends"]], [4, 2, 2])
        os.killpg(demo.popen.pid, signal.SIGINT)
        self.assertEqual(demo.popen.wait(STOP_TIMEOUT_S), 0, demo.output())
        output = demo.output()
        self.assertIn(f"{demo.base}/monitor", output)
        self.assertIn("curl", output)
        self.assertNotIn("Traceback", output)
        self.assert_simulators_gone(demo)

    def test_ctrl_c_lets_a_stream_in_flight_finish_then_stops_the_simulators(self) -> None:
        demo = self.start_demo()
        body = {
            "messages": [{"role": "user", "content": "Tell me a long story"}],
            # Seconds of decoding on any of the three (90 or 40 tokens/s): well under way when
            # Ctrl-C arrives, far from done.
            "max_tokens": 300,
            "stream": True,
        }
        events: list[str] = []
        interrupted = False
        with httpx.stream(
            "POST", demo.base + "/v1/chat/completions", json=body, timeout=60
        ) as response:
            self.assertEqual(response.status_code, 200)
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line.removeprefix("data: "))
                if not interrupted:
                    # What a terminal's Ctrl-C does: SIGINT to every process of the foreground
                    # group (the demo's; the old demo's simulators were in it too).
                    os.killpg(demo.popen.pid, signal.SIGINT)
                    interrupted = True
        self.assertTrue(interrupted, "no event arrived")
        self.assertEqual(events[-1], "[DONE]", events[-3:])
        chunks = [json.loads(event) for event in events[:-1]]
        self.assertFalse([c for c in chunks if "error" in c], "the stream ended with an error")
        self.assertEqual(chunks[-1]["choices"][0]["finish_reason"], "length")
        self.assertEqual(demo.popen.wait(STOP_TIMEOUT_S), 0, demo.output())
        self.assert_simulators_gone(demo)
        self.assertNotIn("Traceback", demo.output())

    def test_a_killed_demo_leaves_no_simulator_behind(self) -> None:
        demo = self.start_demo()
        # SIGKILL to the demo alone: it cannot stop its child, which must notice by itself.
        os.kill(demo.popen.pid, signal.SIGKILL)
        demo.popen.wait(STOP_TIMEOUT_S)
        self.assert_simulators_gone(demo)


def metric_sum(text: str, name: str, labels: str = "") -> float:
    """The sum of every sample of `name` (whose labels contain `labels`) in /metrics."""
    total = 0.0
    for line in text.splitlines():
        found = re.match(rf"{name}(?:{{([^}}]*)}})? (\S+)$", line)
        if found and labels in (found[1] or ""):
            total += float(found[2])
    return total


class ExampleLoadTest(unittest.TestCase):
    """examples/conversations.py with its default load (fewer turns, to stay short) against the
    demo's 8 slots: the slots fill, requests queue, follow-up turns hit the cache."""

    def test_default_load_fills_the_slots_queues_and_hits_the_cache(self) -> None:
        demo = DemoProcess()
        self.addCleanup(demo.close)
        demo.wait_healthy()
        output = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed by addCleanup
        self.addCleanup(output.close)
        script = str(ROOT / "examples" / "conversations.py")
        example = subprocess.Popen(
            [sys.executable, script, "--base-url", demo.base + "/v1", "--turns", "2"],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.addCleanup(example.wait)
        self.addCleanup(example.kill)  # a no-op once it has exited
        # Watched as the monitor page does, by polling /monitor/data until the example ends.
        depths, busy = [0], [0]
        deadline = time.monotonic() + 120
        while example.poll() is None:
            self.assertLess(time.monotonic(), deadline, "the example did not finish")
            with contextlib.suppress(httpx.HTTPError):
                data = httpx.get(demo.base + "/monitor/data", timeout=5).json()
                depths.append(data["queue"]["depth"])
                busy.append(sum(b["in_flight"] for b in data["backends"]))
            time.sleep(POLL_S)
        output.seek(0)
        printed = output.read()
        self.assertEqual(example.returncode, 0, printed)
        self.assertEqual(max(busy), 8, "the 8 slots were never all busy")
        self.assertGreater(max(depths), 0, "no queue was seen")
        metrics = httpx.get(demo.base + "/metrics", timeout=10).text
        # Requests that waited for a slot longer than the smallest bucket: they queued.
        waited = metric_sum(metrics, "llamacpp_ha_queue_wait_seconds_count") - metric_sum(
            metrics, "llamacpp_ha_queue_wait_seconds_bucket", 'le="0.01"'
        )
        self.assertGreater(waited, 0, metrics)
        self.assertGreater(metric_sum(metrics, "llamacpp_ha_prompt_tokens_cached_total"), 0)
        # The example's own lines: a follow-up turn reports cached prompt tokens.
        follow_ups = re.findall(r"turn 2: .*cached_tokens (\d+)", printed)
        conversations = len(re.findall(r"turn 1: ", printed))
        self.assertGreaterEqual(conversations, 16, printed)
        self.assertEqual(len(follow_ups), conversations, printed)
        self.assertTrue([n for n in follow_ups if int(n) > 0], printed)
