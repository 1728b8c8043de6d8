"""Keys, limits, paths, headers and hostile input, over real sockets.

Each test checks what the client got and that the simulated backend saw nothing it should
not have (it records every request line and header).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import unittest
from typing import TypedDict, Unpack

import httpx

from llamacpp_sim import SimBackend, SimConfig
from serving import balancer_for, sims
from sim_support import json_body, wait_until

POLL_PATHS = {("GET", "/health"), ("GET", "/v1/models"), ("GET", "/slots"), ("GET", "/props")}


def traffic(sim: SimBackend) -> list[tuple[str, str]]:
    """Requests other than the balancer's own polls."""
    return [
        (r.method, r.path)
        for r in sim.requests
        if (r.method, r.path.split("?")[0]) not in POLL_PATHS
    ]


def chat(content: str = "hi", **extra: object) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 2, **extra}


class PostParts(TypedDict, total=False):
    """What one size-and-shape case sends (httpx's keywords)."""

    json: object
    content: bytes | str
    headers: dict[str, str]


class SecurityTest(unittest.IsolatedAsyncioTestCase):
    async def asyncSetUp(self) -> None:
        self.http = httpx.AsyncClient(timeout=10)
        self.addAsyncCleanup(self.http.aclose)

    def bearer(self, key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    async def test_auth_cases(self) -> None:
        keys = [
            {"id": "team-a", "key": "alpha-secret"},
            {"id": "team-b", "sha256": hashlib.sha256(b"beta-secret").hexdigest()},
        ]
        async with (
            sims(SimConfig(slots=2, profile="test")) as (sim,),
            balancer_for([sim], api_keys=keys) as lb,
        ):
            url = lb.url + "/v1/chat/completions"
            cases = {
                "missing": {},
                "malformed": {"Authorization": "alpha-secret"},
                "basic": {"Authorization": "Basic YWxwaGEtc2VjcmV0"},
                "empty bearer": {"Authorization": "Bearer"},
                "wrong": self.bearer("alpha-secreT"),
            }
            for name, headers in cases.items():
                response = await self.http.post(url, json=chat(), headers=headers)
                self.assertEqual(response.status_code, 401, name)
                self.assertEqual(response.json()["error"]["type"], "authentication_error")
            two = [
                ("Authorization", "Bearer alpha-secret"),
                ("Authorization", "Bearer beta-secret"),
            ]
            self.assertEqual((await self.http.post(url, json=chat(), headers=two)).status_code, 401)
            self.assertEqual(traffic(sim), [])
            # A key given in clear and a key given as its hash both work.
            for key in ("alpha-secret", "beta-secret"):
                self.assertEqual(
                    (await self.http.post(url, json=chat(), headers=self.bearer(key))).status_code,
                    200,
                )
            self.assertEqual(
                (
                    await self.http.post(url, json=chat(), headers={"x-api-key": "beta-secret"})
                ).status_code,
                200,
            )

    async def test_revoked_key_after_reload(self) -> None:
        async with (
            sims(SimConfig(slots=2, profile="test")) as (sim,),
            balancer_for([sim], api_keys=["old-key", "kept-key"]) as lb,
        ):
            url = lb.url + "/v1/chat/completions"
            self.assertEqual(
                (
                    await self.http.post(url, json=chat(), headers=self.bearer("old-key"))
                ).status_code,
                200,
            )
            new = lb.balancer.config.model_copy(
                update={
                    "api_keys": [
                        k
                        for k in lb.balancer.config.api_keys
                        if k.sha256 == hashlib.sha256(b"kept-key").hexdigest()
                    ]
                }
            )
            lb.balancer.reload(new)
            self.assertEqual(
                (
                    await self.http.post(url, json=chat(), headers=self.bearer("old-key"))
                ).status_code,
                401,
            )
            self.assertEqual(
                (
                    await self.http.post(url, json=chat(), headers=self.bearer("kept-key"))
                ).status_code,
                200,
            )

    async def test_per_key_concurrency_limit_leaves_other_keys_alone(self) -> None:
        keys = [
            {"id": "small", "key": "k-small", "max_concurrent": 1},
            {"id": "big", "key": "k-big"},
        ]
        async with (
            sims(SimConfig(slots=4, profile="cpu-1b")) as (sim,),
            balancer_for([sim], api_keys=keys) as lb,
        ):
            url = lb.url + "/v1/chat/completions"
            first = asyncio.create_task(
                self.http.post(url, json=chat(max_tokens=100), headers=self.bearer("k-small"))
            )
            await wait_until(lambda: sim.processing == 1)
            second = await self.http.post(url, json=chat(), headers=self.bearer("k-small"))
            self.assertEqual(second.status_code, 429)
            self.assertEqual(second.json()["error"]["code"], "rate_limit_exceeded")
            self.assertIn("retry-after", second.headers)
            other = await self.http.post(url, json=chat(), headers=self.bearer("k-big"))
            self.assertEqual(other.status_code, 200)
            self.assertEqual((await first).status_code, 200)
            self.assertEqual(
                (
                    await self.http.post(url, json=chat(), headers=self.bearer("k-small"))
                ).status_code,
                200,
            )

    async def test_per_key_rate_limit(self) -> None:
        keys = [
            {"id": "slow", "key": "k-slow", "requests_per_minute": 3},
            {"id": "fast", "key": "k-fast"},
        ]
        async with (
            sims(SimConfig(slots=4, profile="test")) as (sim,),
            balancer_for([sim], api_keys=keys) as lb,
        ):
            url = lb.url + "/v1/chat/completions"
            statuses = [
                (await self.http.post(url, json=chat(), headers=self.bearer("k-slow"))).status_code
                for _ in range(5)
            ]
            self.assertEqual(statuses, [200, 200, 200, 429, 429])
            limited = await self.http.post(url, json=chat(), headers=self.bearer("k-slow"))
            self.assertGreater(int(limited.headers["retry-after"]), 1)
            for _ in range(5):
                self.assertEqual(
                    (
                        await self.http.post(url, json=chat(), headers=self.bearer("k-fast"))
                    ).status_code,
                    200,
                )
            self.assertEqual(len(traffic(sim)), 8)

    async def test_priority_key_jumps_the_queue(self) -> None:
        keys = [{"id": "low", "key": "k-low"}, {"id": "vip", "key": "k-vip", "priority": 10}]
        async with (
            sims(SimConfig(slots=1, profile="cpu-1b", time_scale=4)) as (sim,),
            balancer_for([sim], api_keys=keys) as lb,
        ):
            url = lb.url + "/v1/chat/completions"
            blocker = asyncio.create_task(
                self.http.post(
                    url, json=chat("blocker", max_tokens=40), headers=self.bearer("k-low")
                )
            )
            await wait_until(lambda: sim.processing == 1)
            low = asyncio.create_task(
                self.http.post(url, json=chat("low"), headers=self.bearer("k-low"))
            )
            await wait_until(lambda: len(lb.balancer.queue) == 1)
            vip = asyncio.create_task(
                self.http.post(url, json=chat("vip"), headers=self.bearer("k-vip"))
            )
            await wait_until(lambda: len(lb.balancer.queue) == 2)
            await asyncio.gather(blocker, low, vip)
            order = [
                json_body(r)["messages"][0]["content"]
                for r in sim.requests
                if r.path == "/v1/chat/completions"
            ]
            self.assertEqual(order, ["blocker", "vip", "low"])

    async def test_admin_key_is_separate(self) -> None:
        async with (
            sims(SimConfig(slots=1, profile="test")) as (sim,),
            balancer_for([sim], api_keys=["client"], admin_keys=["root"]) as lb,
        ):
            url = lb.url + "/admin/backends"
            self.assertEqual((await self.http.get(url)).status_code, 401)
            self.assertEqual(
                (await self.http.get(url, headers=self.bearer("client"))).status_code, 403
            )
            response = await self.http.get(url, headers=self.bearer("root"))
            self.assertEqual(response.status_code, 200)
            self.assertEqual(response.json()["backends"][0]["state"], "ready")
            # The admin key is not a client key.
            self.assertEqual(
                (
                    await self.http.post(
                        lb.url + "/v1/chat/completions", json=chat(), headers=self.bearer("root")
                    )
                ).status_code,
                401,
            )
            # The monitor stays open by default.
            self.assertEqual((await self.http.get(lb.url + "/monitor/data")).status_code, 200)

    async def test_admin_disabled_without_admin_key_and_monitor_lockable(self) -> None:
        async with (
            sims(SimConfig(slots=1, profile="test")) as (sim,),
            balancer_for([sim], api_keys=["client"]) as lb,
        ):
            response = await self.http.get(
                lb.url + "/admin/backends", headers=self.bearer("client")
            )
            self.assertEqual(response.status_code, 403)
            self.assertIn("disabled", response.json()["error"]["message"])
        async with (
            sims(SimConfig(slots=1, profile="test")) as (sim,),
            balancer_for([sim], admin_keys=["root"], monitor_requires_admin=True) as lb,
        ):
            basic = {"Authorization": "Basic " + base64.b64encode(b"ops:root").decode()}
            page = await self.http.get(lb.url + "/monitor")
            self.assertEqual(page.headers["www-authenticate"], 'Basic realm="llamacpp-ha monitor"')
            self.assertEqual(
                (await self.http.get(lb.url + "/monitor", headers=basic)).status_code, 200
            )
            wrong = {"Authorization": "Basic " + base64.b64encode(b"ops:nope").decode()}
            self.assertEqual(
                (await self.http.get(lb.url + "/monitor", headers=wrong)).status_code, 401
            )
            # Basic is for the browser on the monitor only, not for the admin API.
            self.assertEqual(
                (await self.http.get(lb.url + "/admin/backends", headers=basic)).status_code, 401
            )
            for path in ("/monitor", "/monitor/data", "/metrics"):
                self.assertEqual((await self.http.get(lb.url + path)).status_code, 401, path)
                self.assertEqual(
                    (await self.http.get(lb.url + path, headers=self.bearer("root"))).status_code,
                    200,
                    path,
                )

    async def test_path_variants_never_reach_a_backend(self) -> None:
        async with sims(SimConfig(slots=1, profile="test")) as (sim,), balancer_for([sim]) as lb:
            variants = [
                "/slots", "/slots/0?action=erase", "/%2e%2e/slots", "//slots", "/v1/..%2fslots",
                "/v1/../slots", "/v1\\..\\slots", "/./slots", "/SLOTS",
                "/v1/chat/completions/../../slots",
                "/props", "/metrics/../slots", "/v1/chat/completions%00", "/v1/chat/completions/",
            ]  # fmt: skip
            for path in variants:
                for method in ("GET", "POST"):
                    request = self.http.build_request(method, lb.url, json={"messages": []})
                    request.url = request.url.copy_with(raw_path=path.encode())
                    response = await self.http.send(request)
                    self.assertIn(response.status_code, (404, 405, 400), f"{method} {path}")
                    self.assertIn("error", response.json())
            await asyncio.sleep(0.05)
            self.assertEqual(traffic(sim), [])

    async def test_headers_to_the_backend(self) -> None:
        backend = SimConfig(slots=1, profile="test")
        async with (
            sims(backend) as (sim,),
            balancer_for(
                [sim],
                api_keys=["client-key"],
                backends=[{"url": sim.url, "api_key": "backend-key"}],
            ) as lb,
        ):
            response = await self.http.post(
                lb.url + "/v1/chat/completions",
                json=chat(),
                headers={
                    "Authorization": "Bearer client-key",
                    "Connection": "keep-alive, X-Secret-Hop",
                    "X-Secret-Hop": "hop",
                    "Keep-Alive": "timeout=5",
                    "TE": "trailers",
                    "Upgrade": "websocket",
                    "Proxy-Authorization": "Basic c2VjcmV0",
                    "X-Forwarded-For": "6.6.6.6",
                    "X-Request-Id": "my-request-42",
                    "Cookie": "session=abc",
                },
            )
            self.assertEqual(response.status_code, 200)
            self.assertEqual(response.headers["x-request-id"], "my-request-42")
            seen = {
                k.lower(): v
                for k, v in next(
                    r for r in sim.requests if r.path == "/v1/chat/completions"
                ).headers.items()
            }
            for name in (
                "x-secret-hop",
                "keep-alive",
                "te",
                "upgrade",
                "proxy-authorization",
                "cookie",
            ):
                self.assertNotIn(name, seen)
            self.assertEqual(seen["authorization"], "Bearer backend-key")
            self.assertEqual(
                seen["x-forwarded-for"], "127.0.0.1"
            )  # the client's claim is not trusted
            self.assertEqual(seen["x-request-id"], "my-request-42")
            bad_id = await self.http.post(
                lb.url + "/v1/chat/completions",
                json=chat(),
                headers={"Authorization": "Bearer client-key", "X-Request-Id": "<script>"},
            )
            self.assertRegex(bad_id.headers["x-request-id"], r"^[0-9a-f]{32}$")

    async def test_forwarded_for_from_a_trusted_proxy(self) -> None:
        async with (
            sims(SimConfig(slots=1, profile="test")) as (sim,),
            balancer_for([sim], trusted_proxies=["127.0.0.0/8"]) as lb,
        ):
            await self.http.post(
                lb.url + "/v1/chat/completions",
                json=chat(),
                headers={"X-Forwarded-For": "203.0.113.9"},
            )
            seen = next(r for r in sim.requests if r.path == "/v1/chat/completions").headers
            self.assertEqual(
                {k.lower(): v for k, v in seen.items()}["x-forwarded-for"], "203.0.113.9, 127.0.0.1"
            )

    async def test_size_and_shape_limits(self) -> None:
        async with (
            sims(SimConfig(slots=1, profile="test")) as (sim,),
            balancer_for(
                [sim],
                max_body_size=10_000,
                max_header_size=4096,
                max_json_depth=8,
                max_tokens_cap=100,
            ) as lb,
        ):
            url = lb.url + "/v1/chat/completions"
            cases: list[tuple[str, httpx.Response, int]] = []

            async def post(name: str, status: int, **kwargs: Unpack[PostParts]) -> None:
                cases.append((name, await self.http.post(url, **kwargs), status))

            await post("body too large", 413, json=chat("x" * 20_000))
            await post("headers too large", 431, json=chat(), headers={"X-Big": "y" * 5000})
            await post("nested too deep", 400, json=chat(extra=[[[[[[[[[[1]]]]]]]]]]))
            await post("max_tokens over the cap", 400, json=chat(max_tokens=101))
            await post("n_predict -1 with a cap", 400, json={"prompt": "p", "n_predict": -1})
            await post(
                "wrong content type",
                415,
                content=json.dumps(chat()),
                headers={"Content-Type": "text/plain"},
            )
            await post(
                "invalid JSON", 400, content=b"{", headers={"Content-Type": "application/json"}
            )
            await post(
                "invalid UTF-8",
                400,
                content=b'{"messages": "\xff"}',
                headers={"Content-Type": "application/json"},
            )
            await post("not an object", 400, json=[1, 2])
            await post("messages missing", 400, json={"max_tokens": 2})
            await post("messages not a list", 400, json={"messages": "hello"})
            await post("message without role", 400, json={"messages": [{"content": "x"}]})
            await post("stream not a boolean", 400, json=chat(stream="yes"))
            await post("negative max_tokens", 400, json=chat(max_tokens=-5))
            await post("absurd max_tokens", 400, json=chat(max_tokens=10**20))
            await post("max_tokens not an integer", 400, json=chat(max_tokens="3"))
            await post("temperature negative", 400, json=chat(temperature=-1))
            await post("top_p above 1", 400, json=chat(top_p=2))
            for name, response, status in cases:
                self.assertEqual(response.status_code, status, name)
                error = response.json()["error"]
                self.assertTrue(error["message"] and error["type"], name)
            self.assertEqual(traffic(sim), [])
            self.assertEqual((await self.http.post(url, json=chat())).status_code, 200)

    async def test_body_too_large_is_refused_before_it_is_sent(self) -> None:
        async with (
            sims(SimConfig(slots=1, profile="test")) as (sim,),
            balancer_for([sim], max_body_size=1000) as lb,
        ):
            host, port = lb.url.removeprefix("http://").split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n"
            )
            await writer.drain()
            self.assertIn(b" 413 ", await asyncio.wait_for(reader.readline(), 3))
            writer.close()

    async def test_cors_off_by_default_and_allowlisted_when_on(self) -> None:
        async with sims(SimConfig(slots=1, profile="test")) as (sim,):
            async with balancer_for([sim]) as lb:
                response = await self.http.post(
                    lb.url + "/v1/chat/completions",
                    json=chat(),
                    headers={"Origin": "https://evil.example"},
                )
                self.assertNotIn("access-control-allow-origin", response.headers)
            async with balancer_for([sim], cors_origins=["https://app.example"]) as lb:
                preflight = {
                    "Origin": "https://app.example",
                    "Access-Control-Request-Method": "POST",
                }
                response = await self.http.options(
                    lb.url + "/v1/chat/completions", headers=preflight
                )
                self.assertEqual(
                    response.headers["access-control-allow-origin"], "https://app.example"
                )
                response = await self.http.post(
                    lb.url + "/v1/chat/completions",
                    json=chat(),
                    headers={"Origin": "https://evil.example"},
                )
                self.assertNotIn("access-control-allow-origin", response.headers)
