"""Operating it: admin endpoints, reload (endpoint and SIGHUP), metrics and logs."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import tempfile
import unittest
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from llamacpp_ha.config import build_config
from llamacpp_ha.logs import JsonFormatter
from llamacpp_sim import Fault, SimBackend, SimConfig
from serving import balancer_for, free_port, sims
from sim_support import wait_until

ADMIN = {"Authorization": "Bearer admin-secret"}


def chat(content: str = "hi", **extra: object) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 3, **extra}


def generations(sim: SimBackend) -> int:
    return len([r for r in sim.requests if r.path == "/v1/chat/completions"])


class AdminTest(unittest.IsolatedAsyncioTestCase):
    async def asyncSetUp(self) -> None:
        self.http = httpx.AsyncClient(timeout=10)
        self.addAsyncCleanup(self.http.aclose)

    async def test_drain_and_undrain(self) -> None:
        async with (
            sims(
                SimConfig(slots=1, profile="cpu-1b", time_scale=4),
                SimConfig(slots=1, profile="test"),
            ) as (a, b),
            balancer_for(
                [a, b],
                backends=[{"url": a.url, "name": "a"}, {"url": b.url, "name": "b"}],
                admin_keys=["admin-secret"],
                routing="round-robin",
            ) as lb,
        ):
            name = "a"  # round robin goes in name order: the first request lands on a
            streaming = asyncio.create_task(
                self.http.post(lb.url + "/v1/chat/completions", json=chat(max_tokens=60))
            )
            await wait_until(lambda: a.processing == 1)
            response = await self.http.post(f"{lb.url}/admin/backends/{name}/drain", headers=ADMIN)
            self.assertEqual(response.json()["state"], "draining")
            for i in range(4):
                self.assertEqual(
                    (
                        await self.http.post(lb.url + "/v1/chat/completions", json=chat(f"d{i}"))
                    ).status_code,
                    200,
                )
            self.assertEqual(generations(a), 1)  # only the one in flight, which finishes
            self.assertEqual((await streaming).status_code, 200)
            await self.http.post(f"{lb.url}/admin/backends/{name}/undrain", headers=ADMIN)
            for i in range(4):
                await self.http.post(lb.url + "/v1/chat/completions", json=chat(f"u{i}"))
            self.assertGreater(generations(a), 1)
            self.assertEqual(
                (
                    await self.http.post(f"{lb.url}/admin/backends/nope/drain", headers=ADMIN)
                ).status_code,
                404,
            )

    async def test_add_and_remove_backends_at_run_time(self) -> None:
        async with (
            sims(SimConfig(slots=1, profile="test"), SimConfig(slots=1, profile="test")) as (a, b),
            balancer_for([a], admin_keys=["admin-secret"]) as lb,
        ):
            bad = [
                {"url": "ftp://x:1"},
                {"url": "http://user:pw@x:1"},
                {"url": "http://x:1", "bogus": 1},
                {"name": "no-url"},
            ]
            for body in bad:
                response = await self.http.post(
                    lb.url + "/admin/backends", json=body, headers=ADMIN
                )
                self.assertEqual(response.status_code, 400, body)
            response = await self.http.post(
                lb.url + "/admin/backends", json={"url": b.url, "name": "added"}, headers=ADMIN
            )
            self.assertEqual(response.status_code, 201)
            self.assertEqual(
                (
                    await self.http.post(
                        lb.url + "/admin/backends", json={"url": b.url}, headers=ADMIN
                    )
                ).status_code,
                409,
            )
            await wait_until(lambda: lb.balancer.registry.get("added").routable)
            for i in range(4):
                await self.http.post(lb.url + "/v1/chat/completions", json=chat(f"a{i}"))
            self.assertGreater(generations(b), 0)
            response = await self.http.delete(lb.url + "/admin/backends/added", headers=ADMIN)
            self.assertEqual(response.status_code, 202)
            await wait_until(lambda: len(lb.balancer.registry.backends) == 1)
            before = generations(b)
            for i in range(4):
                await self.http.post(lb.url + "/v1/chat/completions", json=chat(f"r{i}"))
            self.assertEqual(generations(b), before)
            listing = (await self.http.get(lb.url + "/admin/backends", headers=ADMIN)).json()
            self.assertEqual(len(listing["backends"]), 1)

    async def test_reload_applies_and_rejects(self) -> None:
        async with sims(SimConfig(slots=1, profile="test"), SimConfig(slots=1, profile="test")) as (
            a,
            b,
        ):
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "config.json"
                path.write_text(
                    json.dumps(
                        {
                            "backends": [{"url": a.url, "name": "a"}],
                            "admin_keys": ["admin-secret"],
                            "max_queue": 5,
                        }
                    )
                )
                async with balancer_for(
                    [a], backends=[{"url": a.url, "name": "a"}], admin_keys=["admin-secret"]
                ) as lb:
                    lb.balancer.config_source = lambda: build_config(config_file=path)
                    path.write_text(
                        json.dumps(
                            {
                                "backends": [
                                    {"url": a.url, "name": "a"},
                                    {"url": b.url, "name": "b"},
                                ],
                                "admin_keys": ["admin-secret"],
                                "max_queue": 7,
                                "port": 1234,
                            }
                        )
                    )
                    response = await self.http.post(lb.url + "/admin/reload", headers=ADMIN)
                    self.assertEqual(response.status_code, 200)
                    self.assertEqual(response.json()["backends"], ["a", "b"])
                    self.assertEqual(response.json()["restart_needed_for"], ["port"])
                    self.assertEqual(lb.balancer.scheduler.max_queue, 7)
                    await wait_until(lambda: lb.balancer.registry.get("b").routable)
                    path.write_text('{"backends": [{"url": "ftp://nope"}]}')
                    with self.assertLogs("llamacpp_ha", logging.ERROR):
                        response = await self.http.post(lb.url + "/admin/reload", headers=ADMIN)
                    self.assertEqual(response.status_code, 400)
                    self.assertIn("backends.0.url", response.json()["error"]["message"])
                    self.assertEqual([x.name for x in lb.balancer.registry.backends], ["a", "b"])
                    path.write_text(
                        json.dumps(
                            {
                                "backends": [{"url": b.url, "name": "b"}],
                                "admin_keys": ["admin-secret"],
                            }
                        )
                    )
                    await self.http.post(lb.url + "/admin/reload", headers=ADMIN)
                    await wait_until(
                        lambda: [x.name for x in lb.balancer.registry.backends] == ["b"]
                    )

    async def test_sighup_reloads_a_running_process(self) -> None:
        async with sims(SimConfig(slots=1, profile="test"), SimConfig(slots=1, profile="test")) as (
            a,
            b,
        ):
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "config.json"
                port = free_port()
                path.write_text(
                    json.dumps({"port": port, "backends": [a.url], "poll_interval_s": 0.1})
                )
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "llamacpp_ha",
                    "--config",
                    str(path),
                    "--log-level",
                    "warning",
                    stderr=asyncio.subprocess.PIPE,
                )
                try:
                    url = f"http://127.0.0.1:{port}"

                    async def backends() -> int:
                        try:
                            return len(
                                (await self.http.get(url + "/monitor/data")).json()["backends"]
                            )
                        except httpx.TransportError:
                            return 0

                    async with asyncio.timeout(15):
                        while await backends() != 1:  # noqa: ASYNC110 - polling another process
                            await asyncio.sleep(0.05)
                    path.write_text(
                        json.dumps(
                            {"port": port, "backends": [a.url, b.url], "poll_interval_s": 0.1}
                        )
                    )
                    proc.send_signal(signal.SIGHUP)
                    async with asyncio.timeout(5):
                        while await backends() != 2:  # noqa: ASYNC110
                            await asyncio.sleep(0.05)
                    path.write_text("{not json")
                    proc.send_signal(signal.SIGHUP)
                    assert proc.stderr is not None
                    async with asyncio.timeout(5):  # until the balancer has read it
                        while b"reload rejected" not in await proc.stderr.readline():
                            pass
                    self.assertEqual(
                        await backends(), 2
                    )  # the bad file is refused, the old config kept
                    self.assertIsNone(proc.returncode)
                finally:
                    proc.send_signal(signal.SIGTERM)
                    await asyncio.wait_for(proc.communicate(), 10)
                self.assertEqual(proc.returncode, 0)


class MetricsTest(unittest.IsolatedAsyncioTestCase):
    async def test_metrics_after_traffic(self) -> None:
        async with (
            sims(
                SimConfig(slots=1, profile="test"),
                SimConfig(slots=1, profile="test", fault=Fault(error_500=True)),
            ) as (good, bad),
            balancer_for([good, bad], api_keys=["metric-key"], routing="round-robin") as lb,
            httpx.AsyncClient(timeout=10) as http,
        ):
            headers = {"Authorization": "Bearer metric-key"}
            messages = [{"role": "user", "content": "same conversation"}]
            for _ in range(4):
                await http.post(
                    lb.url + "/v1/chat/completions",
                    json={"messages": messages, "max_tokens": 3},
                    headers=headers,
                )
            await http.post(lb.url + "/v1/chat/completions", content=b"{", headers=headers)
            text = (await http.get(lb.url + "/metrics")).text
            self.assertNotIn("metric-key", text)
            families = {f.name: f for f in text_string_to_metric_families(text)}
            samples = {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for f in families.values()
                for s in f.samples
            }

            def value(name: str, **labels: str) -> float:
                return samples.get((name, tuple(sorted(labels.items()))), 0.0)

            good_name, bad_name = (x.name for x in lb.balancer.registry.backends)
            self.assertEqual(
                value(
                    "llamacpp_ha_requests_total",
                    endpoint="/v1/chat/completions",
                    model="sim-model",
                    backend=bad_name,
                    status="500",
                ),
                2,  # round robin: half of the four
            )
            self.assertGreaterEqual(
                value(
                    "llamacpp_ha_requests_total",
                    endpoint="/v1/chat/completions",
                    model="sim-model",
                    backend=good_name,
                    status="200",
                ),
                1,
            )
            self.assertEqual(
                value(
                    "llamacpp_ha_requests_total",
                    endpoint="/v1/chat/completions",
                    model="",
                    backend="none",
                    status="400",
                ),
                1,
            )
            self.assertEqual(value("llamacpp_ha_backend_slots_total", backend=good_name), 1)
            self.assertEqual(
                value("llamacpp_ha_backend_state", backend=good_name, state="ready"), 1
            )
            self.assertEqual(value("llamacpp_ha_queue_depth"), 0)
            self.assertGreater(
                value("llamacpp_ha_prompt_tokens_total", backend=good_name, model="sim-model"), 0
            )
            self.assertGreater(
                value(
                    "llamacpp_ha_prompt_tokens_cached_total", backend=good_name, model="sim-model"
                ),
                0,
            )
            self.assertGreater(
                value("llamacpp_ha_completion_tokens_total", backend=good_name, model="sim-model"),
                0,
            )
            self.assertGreater(
                value(
                    "llamacpp_ha_time_to_first_token_seconds_count",
                    endpoint="/v1/chat/completions",
                    backend=good_name,
                ),
                0,
            )


class LogTest(unittest.IsolatedAsyncioTestCase):
    async def test_access_lines_say_what_happened_and_nothing_secret(self) -> None:
        canary_key, canary_prompt = "sk-CANARY-KEY-7731", "CANARY-PROMPT-5521"
        wrong_key = "sk-CANARY-WRONG-9902"
        async with (
            sims(SimConfig(slots=1, profile="test")) as fleet,
            balancer_for(
                fleet, api_keys=[{"id": "team-x", "key": canary_key}], admin_keys=["CANARY-ADMIN-1"]
            ) as lb,
            httpx.AsyncClient(timeout=10) as http,
        ):
            with self.assertLogs(level=logging.DEBUG) as captured:
                headers = {"Authorization": f"Bearer {canary_key}"}
                await http.post(
                    lb.url + "/v1/chat/completions", json=chat(canary_prompt), headers=headers
                )
                await http.post(
                    lb.url + "/v1/chat/completions",
                    json=chat(canary_prompt, stream=True),
                    headers=headers,
                )
                await http.post(
                    lb.url + "/v1/chat/completions",
                    json=chat(canary_prompt),
                    headers={"Authorization": f"Bearer {wrong_key}"},
                )
                await http.post(
                    lb.url + "/v1/chat/completions",
                    content=f'{{"messages": "{canary_prompt}'.encode(),
                    headers=headers,
                )
                await http.post(
                    lb.url + "/v1/chat/completions",
                    json={"messages": canary_prompt},
                    headers=headers,
                )
                await http.post(
                    lb.url + "/v1/completions",
                    json={"prompt": canary_prompt * 100, "max_tokens": 2},
                    headers=headers,
                )
                await http.post(
                    lb.url + "/v1/chat/completions",
                    json=chat(canary_prompt, max_tokens=10**30),
                    headers=headers,
                )
                fleet[0].set_fault(Fault(error_500=True))
                await http.post(
                    lb.url + "/v1/chat/completions", json=chat(canary_prompt), headers=headers
                )
                fleet[0].set_fault(Fault(crash_after_chunks=1))
                await http.post(
                    lb.url + "/v1/chat/completions",
                    json=chat(canary_prompt, stream=True),
                    headers=headers,
                )
                fleet[0].set_fault(None)
                await http.get(
                    lb.url + "/admin/backends", headers={"Authorization": "Bearer CANARY-ADMIN-1"}
                )
                monitor = (await http.get(lb.url + "/monitor/data")).text
                metrics = (await http.get(lb.url + "/metrics")).text
            lines = [JsonFormatter().format(record) for record in captured.records]
            everything = "\n".join(lines) + monitor + metrics
            for canary in (canary_key, canary_prompt, wrong_key, "CANARY-ADMIN-1", "CANARY"):
                self.assertEqual(everything.count(canary), 0, canary)
            access = [json.loads(line) for line in lines if '"llamacpp_ha.access"' in line]
            ok = next(a for a in access if a.get("status") == 200 and a.get("completion_tokens"))
            for field in (
                "request_id",
                "endpoint",
                "backend",
                "key_id",
                "queue_wait_ms",
                "ttfb_ms",
                "duration_ms",
                "prompt_tokens",
            ):
                self.assertIsNotNone(ok.get(field), field)
            self.assertEqual(ok["key_id"], "team-x")
            self.assertTrue(any(a.get("status") == 401 for a in access))
            self.assertTrue(any(a.get("status") == 400 for a in access))
            self.assertTrue(any(a.get("status") == 500 for a in access), access)
