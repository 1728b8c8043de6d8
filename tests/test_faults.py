"""Fault injection: dying, hanging, lying and garbage-speaking backends, and rude clients.

Each test asserts what the client received and what the backends saw. Backends that must be
killed or stopped run as child processes; the others run in the test's loop.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import socket
import time
import unittest
from typing import Any

import httpx

from hostile import HostileBackend, Script, chat_chunks, sse
from llamacpp_ha.slot_ledger import SlotLedger
from llamacpp_sim import Fault, RecordedRequest, SimBackend, SimConfig, SimProcess, spawn
from serving import balancer_for, sims
from sim_support import wait_until

GENERATION = ("/v1/chat/completions", "/v1/completions", "/completion")


def generations(sim: SimBackend) -> list[RecordedRequest]:
    return [r for r in sim.requests if r.path.split("?")[0] in GENERATION]


def chat(content: str, max_tokens: int = 4, **extra: object) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, **extra}


def sse_events(body: bytes) -> list[bytes]:
    return [line[6:] for line in body.splitlines() if line.startswith(b"data: ")]


class FaultTest(unittest.IsolatedAsyncioTestCase):
    async def asyncSetUp(self) -> None:
        self.http = httpx.AsyncClient(timeout=20)
        self.addAsyncCleanup(self.http.aclose)

    async def post(self, url: str, body: dict[str, object]) -> httpx.Response:
        return await self.http.post(url + "/v1/chat/completions", json=body)

    async def stream(self, url: str, body: dict[str, object]) -> tuple[int, bytes]:
        async with self.http.stream(
            "POST", url + "/v1/chat/completions", json={**body, "stream": True}
        ) as response:
            return response.status_code, b"".join([c async for c in response.aiter_bytes()])

    async def child(self, **flags: Any) -> SimProcess:
        sim = await asyncio.to_thread(spawn, **{"profile": "test", "timeout_s": 10, **flags})
        self.addCleanup(sim.kill)
        return sim

    # Processes -----------------------------------------------------------------------

    async def test_sigkill_of_an_idle_backend(self) -> None:
        a, b = await self.child(), await self.child()
        async with balancer_for([a, b], poll_interval_s=5) as lb:
            a.kill()
            started = time.monotonic()
            responses = [await self.post(lb.url, chat(f"k{i}")) for i in range(4)]
            self.assertEqual([r.status_code for r in responses], [200] * 4)
            self.assertLess(time.monotonic() - started, 3)
            self.assertEqual(lb.balancer.registry.backends[0].state, "dead")  # before any poll

    async def test_sigkill_under_load(self) -> None:
        a = await self.child(profile="cpu-1b", slots=2, time_scale=4)
        b = await self.child(profile="cpu-1b", slots=2, time_scale=4)
        async with balancer_for([a, b], poll_interval_s=0.2) as lb:
            tasks = [
                asyncio.create_task(self.stream(lb.url, chat(f"load {i}", 60))) for i in range(10)
            ]
            await wait_until(lambda: lb.balancer.registry.backends[0].slots.in_flight == 2)
            a.send_signal(signal.SIGKILL)
            results = await asyncio.wait_for(asyncio.gather(*tasks), 30)
            for status, body in results:
                events = sse_events(body)
                if status == 200 and events and events[-1] == b"[DONE]":
                    continue  # completed (on b, or on a before the kill)
                # Cut mid-stream: bytes so far, then an error event, and never [DONE].
                self.assertEqual(status, 200)
                self.assertIn(b'"error"', events[-1])
                self.assertNotIn(b"[DONE]", events)
            completed = sum(1 for _, body in results if sse_events(body)[-1] == b"[DONE]")
            self.assertGreaterEqual(completed, 8)  # at most the 2 running on a were lost
            self.assertEqual(lb.balancer.registry.backends[0].state, "dead")

    async def test_sigstop_then_sigcont(self) -> None:
        a = await self.child()
        b = await self.child()
        async with balancer_for(
            [a, b], poll_interval_s=0.2, poll_timeout_s=0.5, first_byte_timeout_s=0.5
        ) as lb:
            a.send_signal(signal.SIGSTOP)
            try:
                started = time.monotonic()
                responses = await asyncio.wait_for(
                    asyncio.gather(*(self.post(lb.url, chat(f"s{i}")) for i in range(6))), 10
                )
                self.assertEqual([r.status_code for r in responses], [200] * 6)
                # Nothing waited much longer than one first-byte timeout.
                self.assertLess(time.monotonic() - started, 3)
                await wait_until(
                    lambda: lb.balancer.registry.backends[0].state == "dead", within_s=3
                )
            finally:
                a.send_signal(signal.SIGCONT)
            await wait_until(lambda: lb.balancer.registry.backends[0].state == "ready", within_s=5)

    # Hangs and timeouts -------------------------------------------------------------

    async def test_accept_and_never_answer_is_retried_elsewhere(self) -> None:
        async with (
            sims(
                SimConfig(slots=2, profile="test", fault=Fault(hang=True)),
                SimConfig(slots=2, profile="test"),
            ) as (hung, good),
            # 1 s: the good backend's first byte, on a loaded machine, must come well within it.
            balancer_for([hung, good], first_byte_timeout_s=1.0, routing="round-robin") as lb,
        ):
            responses = [await self.post(lb.url, chat(f"h{i}")) for i in range(4)]
            self.assertEqual([r.status_code for r in responses], [200] * 4)
            self.assertEqual(len(generations(good)), 4)
            await wait_until(
                lambda: all(r.outcome is not None for r in generations(hung)), within_s=2
            )

    async def test_only_backend_hangs_gives_504(self) -> None:
        async with (
            sims(SimConfig(slots=1, profile="test", fault=Fault(hang=True))) as (hung,),
            balancer_for([hung], first_byte_timeout_s=0.3) as lb,
        ):
            started = time.monotonic()
            response = await self.post(lb.url, chat("nobody home"))
            self.assertEqual(response.status_code, 504)
            self.assertEqual(response.json()["error"]["code"], "backend_timeout")
            self.assertLess(time.monotonic() - started, 2)

    async def test_overall_deadline(self) -> None:
        async with (
            sims(SimConfig(slots=1, profile="cpu-1b")) as fleet,
            balancer_for(fleet, request_timeout_s=0.5) as lb,
        ):
            started = time.monotonic()
            status, body = await self.stream(lb.url, chat("long", 400))
            self.assertLess(time.monotonic() - started, 2)
            self.assertEqual(status, 200)
            self.assertIn(b"longer than", sse_events(body)[-1])
            self.assertNotIn(b"[DONE]", body)

    async def test_stall_with_keepalives_still_times_out(self) -> None:
        stall = Fault(stall_after_chunks=3, stall_keepalive=True)
        async with (
            sims(SimConfig(slots=1, profile="test", time_scale=10, fault=stall)) as (sim,),
            balancer_for([sim], idle_timeout_s=0.5) as lb,
        ):
            started = time.monotonic()
            status, body = await self.stream(lb.url, chat("stall", 50))
            elapsed = time.monotonic() - started
            self.assertEqual(status, 200)
            events = sse_events(body)
            self.assertEqual(len(events), 4)  # three frames, then the error
            self.assertIn(b"backend_timeout", events[-1])
            self.assertLess(elapsed, 3)
            self.assertIn(b": keep-alive", body)  # the comments were relayed, and did not count
            await asyncio.wait_for(generations(sim)[0].done.wait(), 2)

    # Mid-stream failures ------------------------------------------------------------

    async def test_close_and_reset_mid_stream(self) -> None:
        for mode in ("close", "reset"):
            with self.subTest(mode=mode):
                fault = Fault(crash_after_chunks=3, crash_mode=mode)
                async with (
                    sims(SimConfig(slots=1, profile="test", fault=fault)) as (sim,),
                    balancer_for([sim]) as lb,
                ):
                    status, body = await self.stream(lb.url, chat("crash", 20))
                    events = sse_events(body)
                    self.assertEqual(status, 200)
                    self.assertEqual(len(events), 4)
                    self.assertIn(b'"bad_gateway"', events[-1])
                    self.assertNotIn(b"[DONE]", body)
                    # Counted as what it was: a failure of that backend, not a success.
                    await wait_until(lambda: lb.balancer.stats.in_flight == 0)
                    self.assertEqual(
                        (lb.balancer.stats.failed, lb.balancer.stats.succeeded), (1, 0)
                    )
                    self.assertEqual(
                        lb.balancer.stats.backend(lb.balancer.registry.backends[0].name).failed, 1
                    )
                    # Non-streaming: the whole answer or a clean 502, never half a body.
                    response = await self.post(lb.url, chat("crash"))
                    self.assertEqual(response.status_code, 502)
                    self.assertEqual(response.json()["error"]["code"], "bad_gateway")

    async def test_crash_before_first_chunk_is_retried(self) -> None:
        fault = Fault(crash_after_chunks=0, crash_mode="reset")
        async with (
            sims(
                SimConfig(slots=1, profile="test", fault=fault), SimConfig(slots=1, profile="test")
            ) as (bad, good),
            balancer_for([bad, good], routing="round-robin") as lb,
        ):
            for i in range(3):
                status, body = await self.stream(lb.url, chat(f"c{i}"))
                self.assertEqual(status, 200)
                self.assertTrue(body.rstrip().endswith(b"data: [DONE]"))
            self.assertEqual(len(generations(good)), 3)

    # Garbage ------------------------------------------------------------------------

    async def test_garbage_status_line(self) -> None:
        async with (
            sims(SimConfig(slots=1, profile="test", fault=Fault(garbage_status_line=True))) as (
                sim,
            ),
            balancer_for([sim]) as lb,
        ):
            response = await self.post(lb.url, chat("hello"))
            self.assertEqual(response.status_code, 502)
            self.assertIn("invalid HTTP response", response.json()["error"]["message"])

    async def test_garbage_instead_of_sse_or_json(self) -> None:
        async with (
            sims(SimConfig(slots=1, profile="test", fault=Fault(garbage=True))) as (sim,),
            balancer_for([sim]) as lb,
        ):
            status, body = await self.stream(lb.url, chat("hello"))
            self.assertEqual(status, 502)
            self.assertIn(b"not server-sent events", body)
            response = await self.post(lb.url, chat("hello"))
            self.assertEqual(response.status_code, 502)
            self.assertIn("invalid JSON", response.json()["error"]["message"])

    async def test_garbage_is_retried_on_a_good_backend(self) -> None:
        async with (
            sims(
                SimConfig(slots=1, profile="test", fault=Fault(garbage=True)),
                SimConfig(slots=1, profile="test"),
            ) as (bad, good),
            balancer_for([bad, good], routing="round-robin") as lb,
        ):
            responses = [await self.post(lb.url, chat(f"g{i}")) for i in range(4)]
            self.assertEqual([r.status_code for r in responses], [200] * 4)
            json.dumps([r.json() for r in responses])

    # Health that lies, loading, ejection ---------------------------------------------

    async def test_health_ok_while_completions_fail_ejects(self) -> None:
        async with (
            sims(
                SimConfig(slots=2, profile="test", fault=Fault(error_500=True)),
                SimConfig(slots=2, profile="test"),
            ) as (bad, good),
            balancer_for(
                [bad, good], routing="round-robin", eject_after_failures=2, eject_base_s=30
            ) as lb,
        ):
            statuses = [(await self.post(lb.url, chat(f"e{i}"))).status_code for i in range(10)]
            # A backend's 500 is its answer to that request, but after two in a row it is out.
            self.assertEqual(statuses.count(500), 2)
            self.assertEqual(len(generations(bad)), 2)
            self.assertEqual(lb.balancer.registry.backends[0].state, "ejected")
            data = (await self.http.get(lb.url + "/monitor/data")).json()
            self.assertEqual(data["backends"][0]["state"], "ejected")

    async def test_ejected_backend_is_readmitted_after_good_polls(self) -> None:
        async with (
            sims(
                SimConfig(slots=2, profile="test", fault=Fault(error_500=True)),
                SimConfig(slots=2, profile="test"),
            ) as (bad, good),
            balancer_for(
                [bad, good],
                routing="round-robin",
                eject_after_failures=1,
                eject_base_s=0.3,
                readmit_after_polls=2,
                poll_interval_s=0.05,
            ) as lb,
        ):
            await self.post(lb.url, chat("x"))
            await self.post(lb.url, chat("y"))
            self.assertEqual(lb.balancer.registry.backends[0].state, "ejected")
            bad.set_fault(None)
            await wait_until(lambda: lb.balancer.registry.backends[0].state == "ready", within_s=3)
            for i in range(4):
                await self.post(lb.url, chat(f"z{i}"))
            self.assertGreater(len([r for r in generations(bad) if r.status == 200]), 0)

    async def test_ejection_cap_keeps_the_last_backend(self) -> None:
        async with (
            sims(SimConfig(slots=1, profile="test", fault=Fault(error_500=True))) as (bad,),
            balancer_for([bad], eject_after_failures=1) as lb,
        ):
            for i in range(3):
                self.assertEqual((await self.post(lb.url, chat(f"c{i}"))).status_code, 500)
            self.assertEqual(lb.balancer.registry.backends[0].state, "ready")

    async def test_loading_backend_is_skipped(self) -> None:
        async with (
            sims(SimConfig(slots=2, profile="test"), SimConfig(slots=2, profile="test")) as (
                loading,
                good,
            ),
            balancer_for([loading, good], poll_interval_s=10, routing="round-robin") as lb,
        ):
            loading.set_fault(Fault(loading_s=30))  # restarted behind our back; no poll yet
            responses = [await self.post(lb.url, chat(f"l{i}")) for i in range(4)]
            self.assertEqual([r.status_code for r in responses], [200] * 4)
            self.assertEqual(lb.balancer.registry.backends[0].state, "loading")
            self.assertEqual(len([r for r in generations(loading) if r.status == 200]), 0)

    async def test_own_overload_never_counts_against_a_backend(self) -> None:
        async with (
            sims(SimConfig(slots=1, profile="cpu-1b")) as (sim,),
            balancer_for([sim], max_queue=1, eject_after_failures=1) as lb,
        ):
            blocker = asyncio.create_task(self.post(lb.url, chat("long", 100)))
            await wait_until(lambda: sim.processing == 1)
            async with httpx.AsyncClient() as leaving:
                gone = asyncio.create_task(
                    leaving.post(lb.url + "/v1/chat/completions", json=chat("gone"))
                )
                await wait_until(lambda: len(lb.balancer.queue) == 1)
                for _ in range(3):  # the queue is full
                    self.assertEqual((await self.post(lb.url, chat("rejected"))).status_code, 503)
                gone.cancel()
                await wait_until(lambda: lb.balancer.stats.disconnected == 1)
            blocker.cancel()
            self.assertEqual(lb.balancer.registry.backends[0].ejection.consecutive_failures, 0)
            self.assertEqual(lb.balancer.registry.backends[0].state, "ready")

    async def test_slots_that_lie_cannot_overfill(self) -> None:
        async with (
            sims(
                SimConfig(slots=2, profile="test", time_scale=0.5, fault=Fault(slots_lie=True))
            ) as (sim,),
            balancer_for([sim]) as lb,
        ):
            results = await asyncio.gather(
                *(self.post(lb.url, chat(f"q{i}", 16)) for i in range(8))
            )
            self.assertEqual([r.status_code for r in results], [200] * 8)
            self.assertEqual(sim.max_concurrent, 2)
            self.assertEqual(len(generations(sim)), 8)
            self.assertEqual(max(r.json()["usage"]["completion_tokens"] for r in results), 16)

    # Whole fleet down ----------------------------------------------------------------

    async def test_all_down_fails_fast_then_first_back_is_used(self) -> None:
        a, b = await self.child(), await self.child()
        async with balancer_for([a, b], poll_interval_s=0.1) as lb:
            port = a.port
            for sim in (a, b):
                sim.kill()
            await wait_until(lambda: all(x.state == "dead" for x in lb.balancer.registry.backends))
            started = time.monotonic()
            response = await self.post(lb.url, chat("anyone?"))
            self.assertLess(time.monotonic() - started, 0.5)
            self.assertEqual(response.status_code, 503)
            self.assertEqual(response.json()["error"]["code"], "no_healthy_backend")
            self.assertIn("retry-after", response.headers)
            await self.child(port=port)
            await wait_until(lambda: lb.balancer.registry.backends[0].state == "ready", within_s=3)
            self.assertEqual((await self.post(lb.url, chat("back"))).status_code, 200)

    async def test_queued_requests_fail_fast_when_the_fleet_dies(self) -> None:
        a = await self.child(profile="cpu-1b", slots=1)
        async with balancer_for([a], poll_interval_s=0.1) as lb:
            running = asyncio.create_task(self.post(lb.url, chat("running", 300)))
            await wait_until(lambda: lb.balancer.registry.backends[0].slots.in_flight == 1)
            queued = asyncio.create_task(self.post(lb.url, chat("queued")))
            await wait_until(lambda: len(lb.balancer.queue) == 1)
            a.kill()
            response = await asyncio.wait_for(queued, 3)
            # 503 when it was still queued as the death was seen; 502 when it was handed to the
            # dying backend first (a pooled connection reset). Either way: fast and clean.
            self.assertIn(response.status_code, (502, 503))
            self.assertIn("error", response.json())
            self.assertEqual((await asyncio.wait_for(running, 3)).status_code, 502)

    # Clients -------------------------------------------------------------------------

    async def test_200_clients_leaving_at_random_moments(self) -> None:
        rng = random.Random(7)
        fleet_configs = (SimConfig(slots=4, profile="gpu-8b", time_scale=4) for _ in range(2))
        async with sims(*fleet_configs) as fleet, balancer_for(fleet) as lb:
            host, port = lb.url.removeprefix("http://").split(":")

            async def impatient(i: int) -> None:
                # The whole request is sent, then the client hangs up at a random moment:
                # while queued, while waiting for the first token, or mid-stream.
                body = json.dumps(
                    chat(f"impatient {i}", rng.randint(5, 60), stream=rng.random() < 0.7)
                ).encode()
                _, writer = await asyncio.open_connection(host, int(port))
                writer.write(
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                    + b"Content-Type: application/json\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
                await asyncio.sleep(rng.uniform(0, 1.0))
                writer.close()

            await asyncio.wait_for(asyncio.gather(*(impatient(i) for i in range(200))), 40)
            await wait_until(lambda: lb.balancer.stats.in_flight == 0, within_s=10)
            stats = lb.balancer.stats
            # Every request either finished before its client left or was seen leaving.
            self.assertEqual(stats.disconnected + stats.succeeded, 200, stats)
            self.assertGreater(stats.disconnected, 100)
            self.assertEqual((stats.failed, stats.rejected, stats.client_errors), (0, 0, 0))
            # Every request that reached a backend ended there too, and nothing waits inside.
            await wait_until(lambda: all(s.processing == 0 and s.deferred == 0 for s in fleet))
            self.assertTrue(all(r.done.is_set() for s in fleet for r in generations(s)))
            self.assertLessEqual(max(s.max_concurrent for s in fleet), 4)
            # Slots are back to full capacity: eight more requests run at once.
            responses = await asyncio.gather(
                *(self.post(lb.url, chat(f"after {i}")) for i in range(8))
            )
            self.assertEqual([r.status_code for r in responses], [200] * 8)

    async def test_slow_reader_is_cut_and_its_slot_freed(self) -> None:
        # Far more than every socket buffer on the way can hold, so the stream must block;
        # the balancer's send buffer is small, so that happens within a few kilobytes on any
        # machine, however slowly the backend produces them.
        big = SimConfig(slots=1, profile="test", time_scale=50, n_ctx=3_000_000)
        async with (
            sims(big) as (sim,),
            balancer_for([sim], write_timeout_s=0.5, send_buffer=4096) as lb,
        ):
            host, port = lb.url.removeprefix("http://").split(":")
            # A tiny receive window, set before connecting so that it is what we advertise.
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
            _, writer = await asyncio.open_connection(sock=sock)
            body = json.dumps(chat("x " * 10, 2_000_000, stream=True)).encode()
            writer.write(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                + b"Content-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()
            # Never read. The balancer must give up on us and free the slot.
            await wait_until(lambda: lb.balancer.registry.backends[0].slots.in_flight == 1)
            await wait_until(
                lambda: (
                    lb.balancer.registry.backends[0].slots.in_flight == 0
                    and lb.balancer.stats.in_flight == 0
                ),
                within_s=10,
            )
            self.assertEqual(lb.balancer.stats.disconnected, 1, lb.balancer.stats)
            writer.close()
            self.assertEqual((await self.post(lb.url, chat("next"))).status_code, 200)

    async def test_slow_sender_gets_408(self) -> None:
        async with (
            sims(SimConfig(slots=1, profile="test")) as (sim,),
            balancer_for([sim], receive_timeout_s=0.3) as lb,
        ):
            host, port = lb.url.removeprefix("http://").split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"
            )
            await writer.drain()
            status_line = await asyncio.wait_for(reader.readline(), 3)
            self.assertIn(b" 408 ", status_line)
            writer.close()
            self.assertEqual(generations(sim), [])


class HostileStreamTest(unittest.IsolatedAsyncioTestCase):
    """Faults the simulator cannot make: a stall or a cut at any byte of a stream."""

    async def test_a_stall_at_any_byte_ends_with_whole_events_and_frees_the_slot(self) -> None:
        body = sse(*chat_chunks(3))
        async with httpx.AsyncClient(timeout=10) as http:
            for stop_at in range(40, len(body), 97):
                async with (
                    HostileBackend([Script(body, stop_at=stop_at, stop="stall")], slots=1) as fake,
                    balancer_for([], backends=[fake.url], idle_timeout_s=0.3) as lb,
                ):
                    response = await http.post(
                        lb.url + "/v1/chat/completions",
                        json={"messages": [{"role": "user", "content": "x"}], "stream": True},
                    )
                    events = [
                        json.loads(line[5:])
                        for line in response.content.splitlines()
                        if line.startswith(b"data:")
                    ]
                    if response.status_code == 200:
                        self.assertEqual(events[-1]["error"]["code"], "backend_timeout", stop_at)
                    else:  # stalled before the first whole event: nothing was sent yet
                        self.assertEqual(response.status_code, 504, stop_at)
                    slots = lb.balancer.registry.backends[0].slots

                    def freed(slots: SlotLedger = slots) -> bool:
                        return slots.in_flight == 0

                    await wait_until(freed)
