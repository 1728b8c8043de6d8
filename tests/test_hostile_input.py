"""Bodies that are JSON to a lenient parser and trouble to everyone else: refused with 400 before
they cost a queue place, and nothing admitted is left held."""

from __future__ import annotations

import asyncio
import unittest

import httpx

from hostile import HostileBackend, Script, chat_chunks, sse
from llamacpp_ha.errors import ShuttingDown
from llamacpp_sim import SimConfig
from serving import balancer_for, sims
from sim_support import wait_until
from test_security import traffic

JSON = {"Content-Type": "application/json"}


class HostileBodyTest(unittest.IsolatedAsyncioTestCase):
    async def asyncSetUp(self) -> None:
        self.http = httpx.AsyncClient(timeout=10)
        self.addAsyncCleanup(self.http.aclose)

    async def test_odd_bodies_are_400_and_release_everything(self) -> None:
        keys = [{"id": "small", "key": "k-small", "max_concurrent": 2}]
        async with (
            sims(SimConfig(slots=2, profile="test")) as (sim,),
            balancer_for([sim], api_keys=keys) as lb,
        ):
            url = lb.url + "/v1/chat/completions"
            auth = {"Authorization": "Bearer k-small", **JSON}
            chat = '{"messages": [{"role": "user", "content": %s}], "max_tokens": 2}'
            bodies = {
                "lone surrogate": (chat % '"\\ud800"').encode(),
                "lone low surrogate": (chat % '"x\\udc00y"').encode(),
                "5,000-digit integer": (chat % ("1" * 5000)).encode(),
                "UTF-16": (chat % '"hi"').encode("utf-16"),
                "byte order mark": b"\xef\xbb\xbf" + (chat % '"hi"').encode(),
                "NaN": (chat % "NaN").encode(),
            }
            for name, body in bodies.items():
                for _ in range(3):  # more than the key's max_concurrent
                    response = await self.http.post(url, content=body, headers=auth)
                    self.assertEqual(response.status_code, 400, name)
                    error = response.json()["error"]
                    self.assertEqual(error["type"], "invalid_request_error", name)
            surrogate = await self.http.post(url, content=bodies["lone surrogate"], headers=auth)
            self.assertIn("surrogate", surrogate.json()["error"]["message"])
            utf16 = await self.http.post(url, content=bodies["UTF-16"], headers=auth)
            self.assertIn("UTF-8", utf16.json()["error"]["message"])
            self.assertEqual(traffic(sim), [])  # the backend saw none of them
            balancer = lb.balancer
            self.assertEqual(balancer.stats.in_flight, 0)
            self.assertEqual(balancer.key_limits.in_flight("small"), 0)
            ok = await self.http.post(url, content=(chat % '"hi"').encode(), headers=auth)
            self.assertEqual(ok.status_code, 200)


class SmallLeaksTest(unittest.IsolatedAsyncioTestCase):
    async def asyncSetUp(self) -> None:
        self.http = httpx.AsyncClient(timeout=10)
        self.addAsyncCleanup(self.http.aclose)

    async def test_only_the_listed_headers_reach_a_backend(self) -> None:
        async with (
            sims(SimConfig(slots=1, profile="test")) as (sim,),
            balancer_for([sim]) as lb,
        ):
            response = await self.http.post(
                lb.url + "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
                headers={"Accept-Encoding": "br", "User-Agent": "evil/1.0"},
            )
            self.assertEqual(response.status_code, 200)
            request = next(r for r in sim.requests if r.path == "/v1/chat/completions")
            names = {k.lower() for k in request.headers}
        listed = {"content-type", "accept", "x-request-id", "x-forwarded-for"}
        self.assertEqual(names - {"host", "content-length"}, listed)

    async def test_an_admin_url_is_never_echoed_with_its_credentials(self) -> None:
        async with (
            sims(SimConfig(slots=1, profile="test")) as (sim,),
            balancer_for([sim], admin_keys=["root"]) as lb,
        ):
            for url in ("ftp://user:hunter2@gpu-x:8080", "http://user:hunter2@gpu-x:8080"):
                response = await self.http.post(
                    lb.url + "/admin/backends",
                    json={"url": url},
                    headers={"Authorization": "Bearer root"},
                )
                self.assertEqual(response.status_code, 400, url)
                self.assertNotIn("hunter2", response.text)
                self.assertNotIn("user:", response.text)

    async def test_refusals_log_their_method(self) -> None:
        async with (
            sims(SimConfig(slots=1, profile="test")) as (sim,),
            balancer_for([sim], api_keys=["k"]) as lb,
        ):
            with self.assertLogs("llamacpp_ha.access", "INFO") as logged:
                response = await self.http.post(lb.url + "/v1/chat/completions", json={})
            self.assertEqual(response.status_code, 401)
        self.assertIn("POST /v1/chat/completions 401", logged.output[-1])

    async def test_a_request_refused_at_shutdown_logs_its_queue_wait(self) -> None:
        stall = Script(sse(*chat_chunks(1, finish=False), done=False), stop_at=10, stop="stall")
        async with (
            HostileBackend([stall], slots=1) as backend,
            balancer_for([], backends=[backend.url]) as lb,
        ):
            body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
            holder = asyncio.create_task(self.http.post(lb.url + "/v1/chat/completions", json=body))
            await wait_until(lambda: backend.served)
            with self.assertLogs("llamacpp_ha.access", "INFO") as logged:
                waiter = asyncio.create_task(
                    self.http.post(lb.url + "/v1/chat/completions", json=body)
                )
                await wait_until(lambda: len(lb.balancer.queue) == 1)
                lb.balancer.scheduler.reject_all(ShuttingDown("shutting down"))
                self.assertEqual((await waiter).status_code, 503)
                await wait_until(lambda: logged.records)  # logged once it is released
            holder.cancel()
            # logging puts a call's `extra` (here {"fields": ...}) in the record's __dict__
            fields = vars(logged.records[-1])["fields"]
            self.assertEqual(fields["status"], 503)
            self.assertGreater(fields["queue_wait_ms"], 0)

    async def test_health_is_not_ready_when_no_backend_has_a_slot(self) -> None:
        async with (
            HostileBackend(slots=0) as backend,
            balancer_for([], backends=[backend.url]) as lb,
        ):
            response = await self.http.get(lb.url + "/health")
            self.assertEqual(response.status_code, 503)
            self.assertEqual(response.json()["error"]["code"], 503)
