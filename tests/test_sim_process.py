"""The simulator as a child process (SIGKILL, SIGSTOP/SIGCONT, SIGTERM), spawn() and its CLI."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import signal
import sys
import tempfile
import time
import unittest
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

from llamacpp_sim import Fault, SpawnError, spawn
from llamacpp_sim.__main__ import build_configs, build_parser, main
from sim_support import STEP_TIMEOUT_S


class ChildProcessTest(unittest.IsolatedAsyncioTestCase):
    async def asyncSetUp(self) -> None:
        self.sim = await asyncio.to_thread(
            spawn, 2, slots=(2, 1), profile="test", time_scale=10, timeout_s=15
        )
        self.urls = {b.name: b.url for b in self.sim.backends}
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=STEP_TIMEOUT_S))

    async def asyncTearDown(self) -> None:
        await self.http.close()
        self.sim.kill()

    async def health(self, name: str, timeout_s: float = STEP_TIMEOUT_S) -> int:
        async with (
            asyncio.timeout(timeout_s),
            self.http.get(self.urls[name] + "/health") as resp,
        ):
            return resp.status

    async def test_serves_stops_continues_and_terminates(self) -> None:
        self.assertEqual(await self.health("sim-0"), 200)
        async with self.http.get(self.urls["sim-1"] + "/props") as resp:
            self.assertEqual((await resp.json())["total_slots"], 1)
        self.sim.send_signal(signal.SIGSTOP)
        with self.assertRaises(TimeoutError):
            await self.health("sim-0", timeout_s=0.3)
        self.sim.send_signal(signal.SIGCONT)
        self.assertEqual(await self.health("sim-0"), 200)
        self.sim.send_signal(signal.SIGTERM)
        self.assertEqual(await asyncio.to_thread(self.sim.wait, STEP_TIMEOUT_S), 0)

    async def test_sigkill_mid_stream(self) -> None:
        body = {"prompt": "go", "n_predict": 3000, "stream": True}
        resp = await self.http.post(self.urls["sim-0"] + "/completion", json=body)
        async with asyncio.timeout(STEP_TIMEOUT_S):
            self.assertTrue((await resp.content.readline()).startswith(b"data: "))
        self.sim.send_signal(signal.SIGKILL)
        with self.assertRaises((aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError)):
            async with asyncio.timeout(STEP_TIMEOUT_S):
                await resp.read()
        resp.close()
        await asyncio.to_thread(self.sim.wait, STEP_TIMEOUT_S)
        with self.assertRaises(aiohttp.ClientConnectionError):
            await self.health("sim-0")


def get_json(url: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=STEP_TIMEOUT_S) as response:
        return json.loads(response.read())


def sse_data(url: str, body: Any) -> list[str]:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=STEP_TIMEOUT_S) as response:
        text = response.read().decode()
    return [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]


class SpawnTest(unittest.TestCase):
    def test_names_urls_and_a_clean_stop(self) -> None:
        with spawn(names=("gpu-a", "cpu-b"), slots=(3, 1), profile="test") as sim:
            self.assertEqual([b.name for b in sim.backends], ["gpu-a", "cpu-b"])
            self.assertEqual(get_json(sim.url_of("gpu-a") + "/props")["total_slots"], 3)
            self.assertEqual(get_json(sim.url_of("cpu-b") + "/props")["total_slots"], 1)
            self.assertEqual(get_json(sim.url_of("cpu-b") + "/sim/control")["name"], "cpu-b")
            with self.assertRaises(ValueError):
                sim.url  # noqa: B018 - two backends: there is no one URL
        self.assertEqual(sim.popen.returncode, 0)  # SIGTERM: a clean exit

    def test_flags_reach_the_child(self) -> None:
        fault = Fault(error_500=True)
        with spawn(fault=fault, model="m", aliases=("a1",), n_ctx=64, slots_endpoint=False) as sim:
            self.assertEqual(get_json(sim.url + "/sim/control")["fault"]["error_500"], True)
            models = get_json(sim.url + "/v1/models")
            self.assertEqual(models["data"][0]["id"], "m")
            self.assertEqual(models["data"][0]["aliases"], ["m", "a1"])
            self.assertEqual(
                get_json(sim.url + "/props")["default_generation_settings"]["n_ctx"], 64
            )
            with self.assertRaises(urllib.error.HTTPError) as caught:
                get_json(sim.url + "/slots")
            self.assertEqual(caught.exception.code, 501)

    def test_exit_before_listening_raises_with_the_status(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            log = Path(tmp) / "logs" / "sim.log"
            with self.assertRaises(SpawnError) as caught:
                spawn(count=3, slots=(1, 2), log_path=log)
        self.assertEqual(caught.exception.returncode, 2)
        self.assertIn("exited with status 2", str(caught.exception))
        self.assertIn("--slots", str(caught.exception))  # the child's stderr, from the log

    def test_a_child_that_never_listens_is_killed_at_the_deadline(self) -> None:
        started = time.monotonic()
        sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
        with self.assertRaises(SpawnError) as caught:
            spawn(wrapper=sleeper, timeout_s=0.3)
        self.assertIsNone(caught.exception.returncode)
        self.assertLess(time.monotonic() - started, STEP_TIMEOUT_S)

    def test_stop_ends_a_stopped_child(self) -> None:
        sim = spawn(profile="test")
        sim.send_signal(signal.SIGSTOP)
        self.assertEqual(sim.stop(grace_s=STEP_TIMEOUT_S), 0)
        self.assertEqual(sim.kill(), 0)  # idempotent

    def test_log_holds_stdout(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            log = Path(tmp) / "sim.log"
            with spawn(profile="test", log_path=log) as sim:
                pass
            self.assertIn(f"backend sim-0 listening on {sim.url}", log.read_text())

    def test_ticker_mode_streams_timestamps(self) -> None:
        with spawn(mode="ticker", slots=5) as sim:
            self.assertEqual(get_json(sim.url + "/props")["total_slots"], 5)
            self.assertEqual(len(get_json(sim.url + "/slots")), 5)
            before = time.monotonic_ns()
            body = {
                "max_tokens": 3,
                "stream": True,
                "messages": [{"role": "user", "content": "tick 1"}],
            }
            events = sse_data(sim.url + "/v1/chat/completions", body)
            answer = get_json(sim.url + "/v1/chat/completions", {**body, "stream": False})
        self.assertEqual(events[-1], "[DONE]")
        chunks = [json.loads(e) for e in events[:-1]]
        self.assertEqual(chunks[0]["choices"][0]["delta"], {"role": "assistant"})
        stamps = [int(c["choices"][0]["delta"]["content"]) for c in chunks[1:4]]
        self.assertTrue(before < stamps[0] < stamps[1] < stamps[2] < time.monotonic_ns())
        self.assertEqual(chunks[4]["choices"][0]["finish_reason"], "length")
        self.assertEqual(chunks[5]["usage"]["completion_tokens"], 3)
        self.assertEqual(chunks[5]["timings"]["predicted_n"], 3)
        # Without stream: one completion, as llama-server answers it.
        self.assertEqual(answer["object"], "chat.completion")
        self.assertEqual(answer["choices"][0]["finish_reason"], "length")
        self.assertEqual(answer["usage"]["completion_tokens"], 3)


class CliTest(unittest.TestCase):
    def run_main(self, *argv: str) -> tuple[int, str]:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), self.assertRaises(SystemExit) as exit_info:
            main(list(argv))
        return int(exit_info.exception.code or 0), err.getvalue()

    def test_bad_input_exits_2_with_one_line_naming_the_flag(self) -> None:
        cases = [
            (("--slots", "x"), "--slots"),
            (("--profile", "nope"), "--profile"),
            (("--count", "3", "--slots", "1,2"), "--slots"),
            (("--time-scale", "0"), "--time-scale"),
            (("--fault", '{"hang": 1}'), "--fault"),
            (("--bogus",), "--bogus"),
        ]
        for argv, flag in cases:
            with self.subTest(argv=argv):
                code, err = self.run_main(*argv)
                self.assertEqual(code, 2)
                self.assertEqual(len(err.strip().splitlines()), 1, err)
                self.assertIn(flag, err)

    def test_per_backend_values(self) -> None:
        args = build_parser().parse_args(
            ["--port", "9000", "--slots", "4,2,1", "--profile", "gpu-8b,gpu-8b,cpu-1b"]
        )
        configs = build_configs(args)
        self.assertEqual([c.port for c in configs], [9000, 9001, 9002])
        self.assertEqual([c.slots for c in configs], [4, 2, 1])
        self.assertEqual([c.profile for c in configs], ["gpu-8b", "gpu-8b", "cpu-1b"])
        self.assertEqual([c.name for c in configs], ["sim-0", "sim-1", "sim-2"])
        args = build_parser().parse_args(["--count", "2", "--port", "0"])
        self.assertEqual([c.port for c in build_configs(args)], [0, 0])

    def test_cache_flags_follow_llama_server(self) -> None:
        default = build_configs(build_parser().parse_args([]))[0]
        self.assertEqual(
            (default.cache_ram_mib, default.cache_idle_slots, default.kv_unified),
            (8192, True, False),
        )
        self.assertEqual((default.similarity, default.cache_ram_tokens), (0.1, None))
        auto = build_configs(build_parser().parse_args(["--slots", "auto"]))[0]
        self.assertEqual((auto.slots, auto.kv_unified), (4, True))
        args = build_parser().parse_args(
            [
                "--slots", "auto,2", "--no-kv-unified", "--no-cache-idle-slots",
                "--cache-ram", "64,-1", "-sps", "0.5",
            ]
        )  # fmt: skip
        configs = build_configs(args)
        self.assertEqual([(c.slots, c.kv_unified) for c in configs], [(4, False), (2, False)])
        self.assertEqual([c.cache_ram_mib for c in configs], [64, -1])
        self.assertEqual({(c.similarity, c.cache_idle_slots) for c in configs}, {(0.5, False)})
        # The older spellings still work: --similarity, and the cache bounded in tokens.
        old = build_parser().parse_args(["--similarity", "0.3", "--cache-ram-tokens", "1000"])
        self.assertEqual(
            [(c.similarity, c.cache_ram_tokens) for c in build_configs(old)], [(0.3, 1000)]
        )

    def test_names(self) -> None:
        args = build_parser().parse_args(["--name", "gpu-a,gpu-b", "--slots", "4"])
        self.assertEqual([c.name for c in build_configs(args)], ["gpu-a", "gpu-b"])
        for argv in (("--name", "a", "--count", "2"), ("--name", "a,a"), ("--name", "a b")):
            with self.subTest(argv=argv):
                code, err = self.run_main(*argv)
                self.assertEqual(code, 2)
                self.assertIn("--name", err)
