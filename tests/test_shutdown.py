"""SIGTERM on a real balancer process: queued requests get 503, streams get their grace."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
import unittest

import httpx

from llamacpp_sim import SimConfig
from serving import free_port, sims
from sim_support import wait_until


class ShutdownTest(unittest.IsolatedAsyncioTestCase):
    async def start_balancer(
        self, backend_url: str, grace_s: float
    ) -> tuple[asyncio.subprocess.Process, str]:
        port = free_port()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "llamacpp_ha", "--backend", backend_url, "--port", str(port),
            "--poll-interval", "0.1", "--shutdown-grace", str(grace_s), "--log-level", "warning",
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        self.addAsyncCleanup(self.kill, proc)
        url = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient() as client:

            async def healthy() -> bool:
                try:
                    return (await client.get(url + "/health")).status_code == 200
                except httpx.TransportError:
                    return False

            async with asyncio.timeout(15):
                while not await healthy():  # noqa: ASYNC110 - polling another process
                    await asyncio.sleep(0.05)
        return proc, url

    async def kill(self, proc: asyncio.subprocess.Process) -> None:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    async def stream(self, client: httpx.AsyncClient, url: str, tokens: int) -> tuple[int, bytes]:
        body = {
            "messages": [{"role": "user", "content": "tell me"}],
            "max_tokens": tokens,
            "stream": True,
        }
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
            return response.status_code, b"".join([c async for c in response.aiter_bytes()])

    async def test_streams_finish_queued_get_503_exit_0(self) -> None:
        async with sims(SimConfig(slots=1, profile="cpu-1b", time_scale=4)) as (sim,):
            proc, url = await self.start_balancer(sim.url, grace_s=10)
            async with httpx.AsyncClient(timeout=20) as client:
                running = asyncio.create_task(self.stream(client, url, 200))  # about 1.2 s
                await wait_until(lambda: sim.processing == 1)
                queued = asyncio.create_task(self.stream(client, url, 4))

                async def queue_depth() -> int:
                    data = (await client.get(url + "/monitor/data")).json()
                    return int(data["queue"]["depth"])

                async with asyncio.timeout(10):
                    while await queue_depth() != 1:  # noqa: ASYNC110 - another process's state
                        await asyncio.sleep(0.02)
                proc.send_signal(signal.SIGTERM)
                status, body = await asyncio.wait_for(running, 10)
                self.assertEqual(status, 200)
                self.assertTrue(body.rstrip().endswith(b"data: [DONE]"))
                status, body = await asyncio.wait_for(queued, 10)
                self.assertEqual(status, 503)
                self.assertIn(b"shutting_down", body)
            self.assertEqual(await asyncio.wait_for(proc.wait(), 10), 0)
            self.assertEqual(len([r for r in sim.requests if r.path == "/v1/chat/completions"]), 1)

    async def test_streams_past_the_grace_are_cut_with_an_error_event(self) -> None:
        async with sims(SimConfig(slots=1, profile="cpu-1b")) as (sim,):
            proc, url = await self.start_balancer(sim.url, grace_s=0.5)
            async with httpx.AsyncClient(timeout=20) as client:
                running = asyncio.create_task(self.stream(client, url, 1000))  # about 25 s
                await wait_until(lambda: sim.processing == 1)
                started = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                status, body = await asyncio.wait_for(running, 10)
                self.assertLess(time.monotonic() - started, 3)
            self.assertEqual(status, 200)
            last = [line for line in body.splitlines() if line.startswith(b"data: ")][-1]
            self.assertIn(b"shutting_down", last)
            self.assertNotIn(b"[DONE]", body)
            self.assertEqual(await asyncio.wait_for(proc.wait(), 10), 0)
            # The backend saw the connection close, so it stopped generating.
            await wait_until(lambda: sim.processing == 0, within_s=2)


def _ignores_sighup(pid: int) -> bool:
    """Whether the process ignores SIGHUP now (its SigIgn mask in /proc)."""
    with open(f"/proc/{pid}/status") as status:
        lines = status.read().splitlines()
    for line in lines:
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGHUP - 1)))
    return False


class EarlySighupTest(unittest.IsolatedAsyncioTestCase):
    async def test_a_reload_asked_for_during_the_start_does_not_kill_it(self) -> None:
        # systemd's ExecReload may come right after a start: SIGHUP sent again and again from
        # the moment the process can hear it (its handler is not installed yet: the app, the
        # server and their imports come after) until it serves.
        async with sims(SimConfig(slots=1, profile="test")) as (sim,):
            port = free_port()
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "llamacpp_ha", "--backend", sim.url, "--port", str(port),
                "--log-level", "warning", stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            try:
                await wait_until(lambda: _ignores_sighup(proc.pid), within_s=15)
                url = f"http://127.0.0.1:{port}/health"
                async with httpx.AsyncClient() as client, asyncio.timeout(30):
                    while True:
                        proc.send_signal(signal.SIGHUP)
                        try:
                            if (await client.get(url)).status_code == 200:
                                break
                        except httpx.TransportError:
                            pass
                        self.assertIsNone(proc.returncode, "SIGHUP killed it")
                        await asyncio.sleep(0.01)
                    proc.send_signal(signal.SIGHUP)  # once serving: a reload, not an exit
                    self.assertEqual((await client.get(url)).status_code, 200)
                self.assertIsNone(proc.returncode)
            finally:
                if proc.returncode is None:
                    proc.terminate()
                    await proc.wait()
