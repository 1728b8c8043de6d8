"""Each fault of the simulator does what it says, set in code or through /sim/control."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any

import aiohttp

from llamacpp_sim import Fault, SimBackend, SimConfig
from llamacpp_sim.faults import CrashMode
from llamacpp_sim.server import is_loopback
from sim_support import STEP_TIMEOUT_S, SimTestCase, chat_body, read_frames, wait_until

STREAM = chat_body(
    [{"role": "user", "content": "stream please"}],
    max_tokens=50,
    stream=True,
    stream_options={"include_usage": True},
)


class FaultTestCase(SimTestCase):
    config = SimConfig(slots=2, profile="test", time_scale=10.0)

    async def control(self, fault: dict[str, Any]) -> dict[str, Any]:
        async with self.http.post("/sim/control", json=fault) as resp:
            self.assertEqual(resp.status, 200)
            state: dict[str, Any] = await resp.json()
            return state

    async def assert_healthy_after_clearing(self) -> None:
        self.sim.set_fault(None)
        async with self.http.post("/v1/chat/completions", json={**STREAM, "stream": False}) as r:
            self.assertEqual(r.status, 200)


class ControlEndpointTest(FaultTestCase):
    async def test_control_sets_shows_and_clears(self) -> None:
        state = await self.control({"error_500": True, "crash_after_chunks": 3})
        self.assertTrue(state["fault"]["error_500"])
        self.assertEqual(self.sim.fault, Fault(error_500=True, crash_after_chunks=3))
        async with self.http.get("/sim/control") as resp:
            self.assertEqual((await resp.json())["fault"]["crash_after_chunks"], 3)
        async with self.http.post("/sim/control", json={"bogus": 1}) as resp:
            self.assertEqual(resp.status, 400)
        state = await self.control({})
        self.assertIsNone(state["fault"])
        self.assertIsNone(self.sim.fault)

    async def test_control_refuses_non_loopback_peers(self) -> None:
        self.assertTrue(is_loopback("127.0.0.1"))
        self.assertTrue(is_loopback("::1"))
        self.assertFalse(is_loopback("10.1.2.3"))
        self.assertFalse(is_loopback(None))
        address = _non_loopback_address()
        if address is None:
            self.skipTest("no non-loopback address on this machine")
        sim = SimBackend(SimConfig(host="0.0.0.0", slots=1))
        await sim.start()
        try:
            async with (
                aiohttp.ClientSession() as http,
                http.post(f"http://{address}:{sim.port}/sim/control", json={"hang": True}) as r,
            ):
                self.assertEqual(r.status, 403)
            self.assertIsNone(sim.fault)
        finally:
            await sim.aclose()


class ErrorFaultsTest(FaultTestCase):
    async def test_loading_for_n_seconds(self) -> None:
        await self.control({"loading_s": 3.0})  # model seconds: 0.3 s at time_scale 10
        async with self.http.get("/health") as resp:
            self.assertEqual(resp.status, 503)
            self.assertEqual((await resp.json())["error"]["message"], "Loading model")
        await wait_until(lambda: not self.sim.is_loading())
        async with self.http.get("/health") as resp:
            self.assertEqual(resp.status, 200)

    async def test_error_500(self) -> None:
        self.sim.set_fault(Fault(error_500=True))
        async with self.http.post("/v1/chat/completions", json=STREAM) as resp:
            self.assertEqual(resp.status, 500)
            error = (await resp.json())["error"]
        self.assertEqual((error["code"], error["type"]), (500, "server_error"))
        self.assertEqual(self.sim.requests[-1].outcome, "fault")
        async with self.http.get("/health") as resp:
            self.assertEqual(resp.status, 200)
        await self.assert_healthy_after_clearing()

    async def test_garbage(self) -> None:
        self.sim.set_fault(Fault(garbage=True))
        async with self.http.post("/v1/chat/completions", json=STREAM) as resp:
            self.assertEqual(resp.status, 200)
            body = await resp.read()
        self.assertNotIn(b"data: ", body)
        with self.assertRaises(ValueError):
            json.loads(body)
        self.assertEqual(self.sim.requests[-1].outcome, "fault")

    async def test_garbage_status_line(self) -> None:
        self.sim.set_fault(Fault(garbage_status_line=True))
        reader, writer = await asyncio.open_connection(self.sim.config.host, self.sim.port)
        try:
            body = b'{"messages":[{"role":"user","content":"x"}]}'
            writer.write(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            async with asyncio.timeout(STEP_TIMEOUT_S):
                raw = await reader.read()
        finally:
            writer.close()
        self.assertTrue(raw.startswith(b"HTTP/1.1 2OO"))
        with self.assertRaises(aiohttp.ClientError):
            async with self.http.post("/v1/chat/completions", json=STREAM) as resp:
                await resp.read()

    async def test_slow_health(self) -> None:
        self.sim.set_fault(Fault(health_delay_s=2.0))  # 0.2 s at time_scale 10
        started = time.monotonic()
        async with self.http.get("/health") as resp:
            self.assertEqual(resp.status, 200)
        self.assertGreaterEqual(time.monotonic() - started, 0.19)

    async def test_slots_lie(self) -> None:
        self.sim.set_fault(Fault(slots_lie=True))
        body = {**STREAM, "max_tokens": 3000}
        resp = await self.http.post("/v1/chat/completions", json=body)
        try:
            await read_frames(resp, 1)
            self.assertEqual(self.sim.processing, 1)
            async with self.http.get("/slots?fail_on_no_slot=1") as slots:
                self.assertEqual(slots.status, 200)
                self.assertFalse(any(s["is_processing"] for s in await slots.json()))
            async with self.http.get("/metrics") as metrics:
                self.assertIn("llamacpp:requests_processing 0\n", await metrics.text())
        finally:
            resp.close()


class ConnectionFaultsTest(FaultTestCase):
    async def crash(self, mode: CrashMode) -> None:
        self.sim.set_fault(Fault(crash_after_chunks=2, crash_mode=mode))
        resp = await self.http.post("/v1/chat/completions", json=STREAM)
        self.assertEqual(resp.status, 200)
        frames: list[str] = []
        with self.assertRaises(
            (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, ConnectionError)
        ):
            async with asyncio.timeout(STEP_TIMEOUT_S):
                async for line in resp.content:
                    if line.startswith(b"data: "):
                        frames.append(line.decode())
        resp.close()
        self.assertEqual(len(frames), 2)
        rec = self.sim.requests[-1]
        async with asyncio.timeout(STEP_TIMEOUT_S):
            await rec.done.wait()
        self.assertEqual(rec.outcome, "fault")
        self.assertEqual(self.sim.processing, 0)

    async def test_crash_close_after_chunks(self) -> None:
        await self.crash("close")

    async def test_crash_reset_after_chunks(self) -> None:
        await self.crash("reset")

    async def test_crash_before_any_byte(self) -> None:
        self.sim.set_fault(Fault(crash_after_chunks=0, crash_mode="reset"))
        with self.assertRaises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
            async with self.http.post("/v1/chat/completions", json={**STREAM, "stream": False}):
                pass

    async def test_stall_after_chunks(self) -> None:
        self.sim.set_fault(Fault(stall_after_chunks=3))
        resp = await self.http.post("/v1/chat/completions", json=STREAM)
        self.assertEqual(len(await read_frames(resp, 3)), 3)
        with self.assertRaises(TimeoutError):
            async with asyncio.timeout(0.3):
                while True:
                    self.assertFalse((await resp.content.readline()).startswith(b"data: "))
        # A stalled generation keeps its slot until the client gives up.
        self.assertEqual(self.sim.processing, 1)
        rec = self.sim.requests[-1]
        resp.close()
        async with asyncio.timeout(STEP_TIMEOUT_S):
            await rec.done.wait()
        self.assertEqual(rec.outcome, "fault")
        await wait_until(lambda: self.sim.processing == 0, 0.2)

    async def test_stall_with_keepalive_comments(self) -> None:
        self.sim.set_fault(Fault(stall_after_chunks=1, stall_keepalive=True))
        resp = await self.http.post("/v1/chat/completions", json=STREAM)
        await read_frames(resp, 1)
        comments = 0
        async with asyncio.timeout(STEP_TIMEOUT_S):
            while comments < 3:
                line = await resp.content.readline()
                self.assertFalse(line.startswith(b"data: "))
                comments += line == b": keep-alive\n"
        resp.close()

    async def test_hang(self) -> None:
        self.sim.set_fault(Fault(hang=True))
        with self.assertRaises(TimeoutError):
            async with asyncio.timeout(0.3):
                await self.http.post("/v1/chat/completions", json=STREAM)
        async with self.http.get("/health") as resp:
            self.assertEqual(resp.status, 200)
        self.sim.set_fault(Fault(hang_health=True))
        with self.assertRaises(TimeoutError):
            async with asyncio.timeout(0.3):
                await self.http.get("/health")
        await wait_until(lambda: all(r.done.is_set() for r in self.sim.requests))
        self.assertEqual([r.outcome for r in self.sim.requests], ["fault", "completed", "fault"])
        self.assertEqual(self.sim.max_concurrent, 0)

    async def test_fault_at_start_through_config(self) -> None:
        sim = SimBackend(SimConfig(slots=1, fault=Fault(error_500=True)))
        await sim.start()
        try:
            async with self.http.post(sim.url + "/completion", json={"prompt": "x"}) as resp:
                self.assertEqual(resp.status, 500)
        finally:
            await sim.aclose()


def _non_loopback_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))
            address = str(probe.getsockname()[0])
        except OSError:
            return None
    return None if is_loopback(address) else address
