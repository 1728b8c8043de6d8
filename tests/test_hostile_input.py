"""Bodies that are JSON to a lenient parser and trouble to everyone else: refused with 400 before
they cost a queue place, and nothing admitted is left held."""

from __future__ import annotations

import unittest

import httpx

from llamacpp_ha.sim import SimConfig
from serving import balancer_for, sims
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
