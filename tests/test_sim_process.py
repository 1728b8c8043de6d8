"""The simulator as a child process (SIGKILL, SIGSTOP/SIGCONT, SIGTERM) and its CLI."""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
import signal
import sys
import unittest

import aiohttp

from llamacpp_sim.__main__ import build_configs, build_parser, main
from test_sim_support import STEP_TIMEOUT_S

_LISTENING = re.compile(r"backend (sim-\d+) listening on (http://\S+)")


class ChildProcessTest(unittest.IsolatedAsyncioTestCase):
    async def asyncSetUp(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "llamacpp_sim",
            "--port",
            "0",
            "--count",
            "2",
            "--slots",
            "2,1",
            "--profile",
            "test",
            "--time-scale",
            "10",
            stdout=asyncio.subprocess.PIPE,
        )
        self.urls: dict[str, str] = {}
        assert self.proc.stdout is not None
        async with asyncio.timeout(15):
            while len(self.urls) < 2:
                line = (await self.proc.stdout.readline()).decode()
                self.assertTrue(line, "the simulator exited before listening")
                match = _LISTENING.search(line)
                if match:
                    self.urls[match[1]] = match[2]
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=STEP_TIMEOUT_S))

    async def asyncTearDown(self) -> None:
        await self.http.close()
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGCONT)
                self.proc.kill()
            await self.proc.wait()

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
        self.proc.send_signal(signal.SIGSTOP)
        with self.assertRaises(TimeoutError):
            await self.health("sim-0", timeout_s=0.3)
        self.proc.send_signal(signal.SIGCONT)
        self.assertEqual(await self.health("sim-0"), 200)
        self.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(STEP_TIMEOUT_S):
            self.assertEqual(await self.proc.wait(), 0)

    async def test_sigkill_mid_stream(self) -> None:
        body = {"prompt": "go", "n_predict": 3000, "stream": True}
        resp = await self.http.post(self.urls["sim-0"] + "/completion", json=body)
        async with asyncio.timeout(STEP_TIMEOUT_S):
            self.assertTrue((await resp.content.readline()).startswith(b"data: "))
        self.proc.kill()
        with self.assertRaises((aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError)):
            async with asyncio.timeout(STEP_TIMEOUT_S):
                await resp.read()
        resp.close()
        await self.proc.wait()
        with self.assertRaises(aiohttp.ClientConnectionError):
            await self.health("sim-0")


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
