"""Reload: a changed backend keeps its state; every setting applies live or is reported."""

from __future__ import annotations

import asyncio
import logging
import time
import unittest
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from llamacpp_ha.balancer import Balancer
from llamacpp_ha.config import BackendConfig, ClientKey, ProxyConfig, build_config
from llamacpp_ha.policies import build_policy
from llamacpp_ha.proxy import create_app
from llamacpp_ha.registry import Health
from llamacpp_ha.reload import BackendChanges, plan_reload, reload_mode
from llamacpp_sim import SimBackend, SimConfig
from serving import Served, balancer_for, serve_app, sims
from sim_support import wait_until


def chat(content: str = "hi", **extra: object) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 3, **extra}


def generations(sim: SimBackend) -> int:
    return len([r for r in sim.requests if r.path == "/v1/chat/completions"])


def reload(lb: Served, **changes: Any) -> list[str]:
    return lb.balancer.reload(lb.balancer.config.model_copy(update=changes))


A = BackendConfig(url="http://a.invalid:8080", name="a")
C = BackendConfig(url="http://c.invalid:8080", name="c")
A_CHANGED = BackendConfig(url="http://a2.invalid:8080", name="a", api_key="k")
B = BackendConfig(url="http://b.invalid:8080", name="b")


def old_config() -> ProxyConfig:
    return build_config({"backends": [A.model_dump(), C.model_dump()]})


def spent_budget_refills(balancer: Balancer) -> bool:
    """Whether one request earns a whole retry back once the budget is empty."""
    while balancer.retry_budget.try_spend():
        pass
    balancer.retry_budget.on_request()
    return balancer.retry_budget.try_spend()


def session_outlives_a_record(balancer: Balancer) -> bool:
    balancer.index.record("a", ["key"], 10)
    balancer.index.record("a", ["other"], 10)  # prunes what has expired since
    return balancer.index.match(["key"]) == {"a": 1}


def sessions_kept(balancer: Balancer) -> int:
    for key in ("k1", "k2", "k3"):
        balancer.index.record("a", [key], 10)
    return len(balancer.index)


@dataclass(frozen=True)
class Live:
    """A live field's new value, what the running component uses after reload, and what that
    should be (the new value unless said)."""

    new: Any
    in_use: Callable[[Balancer], Any]
    expected: Any = None

    def want(self) -> Any:
        return self.new if self.expected is None else self.expected


# Read from balancer.config on every request (proxy endpoint) or at shutdown (server.py).
def _config(field: str) -> Callable[[Balancer], Any]:
    return lambda b: getattr(b.config, field)


LIVE = {
    "backends": Live(
        [A_CHANGED, B], lambda b: [x.config for x in b.registry.backends if not x.draining]
    ),
    "api_keys": Live([ClientKey(key="k1")], lambda b: b.keyring.client),
    "admin_keys": Live([ClientKey(key="k2")], lambda b: b.keyring.admin),
    "monitor_requires_admin": Live(True, lambda b: b.keyring.monitor_requires_admin),
    "trusted_proxies": Live(["10.0.0.0/8"], lambda b: [str(n) for n in b.header_rules.trusted]),
    "max_header_size": Live(4096, lambda b: b.header_rules.max_header_size),
    "max_json_depth": Live(8, _config("max_json_depth")),
    "max_tokens_cap": Live(100, _config("max_tokens_cap")),
    "routing": Live(
        "round-robin", lambda b: type(b.scheduler.policy), type(build_policy("round-robin"))
    ),
    "poll_interval_s": Live(0.5, lambda b: b.registry.poll_interval_s),
    "poll_timeout_s": Live(0.7, lambda b: b.registry.poll_rules[0]),
    "unhealthy_after_polls": Live(4, lambda b: b.registry.poll_rules[1]),
    "healthy_after_polls": Live(2, lambda b: b.registry.poll_rules[2]),
    "queue_timeout_s": Live(5.0, lambda b: b.limits.queue_timeout_s),
    "max_queue": Live(3, lambda b: b.scheduler.max_queue),
    "session_ttl_s": Live(1e-9, session_outlives_a_record, False),
    "max_sessions": Live(1, sessions_kept),
    "max_cache_wait_s": Live(0.25, lambda b: b.scheduler.settings.max_cache_wait_s),
    "reorder_window_s": Live(0.125, lambda b: b.scheduler.settings.reorder_window_s),
    "reorder_max": Live(2, lambda b: b.scheduler.settings.reorder_max),
    "pin_slots": Live(True, lambda b: b.scheduler.settings.pin_slots),
    "connect_timeout_s": Live(1.5, lambda b: b.timeouts.connect_s),
    "first_byte_timeout_s": Live(7.0, lambda b: b.timeouts.first_byte_s),
    "idle_timeout_s": Live(8.0, lambda b: b.timeouts.idle_s),
    "request_timeout_s": Live(9.0, lambda b: b.limits.request_timeout_s),
    "write_timeout_s": Live(4.0, lambda b: b.limits.write_timeout_s),
    "receive_timeout_s": Live(6.0, _config("receive_timeout_s")),
    "shutdown_grace_s": Live(0.5, _config("shutdown_grace_s")),
    "max_attempts": Live(1, lambda b: b.limits.max_attempts),
    "resume_streams": Live(False, lambda b: b.limits.max_resumes, 0),
    "max_resumes": Live(3, lambda b: b.limits.max_resumes),
    "retry_budget_ratio": Live(1.0, spent_budget_refills, True),
    "eject_after_failures": Live(7, lambda b: b.registry.ejection_policy.failures_to_eject),
    "eject_base_s": Live(1.5, lambda b: b.registry.ejection_policy.base_s),
    "eject_max_s": Live(60.0, lambda b: b.registry.ejection_policy.max_s),
    "readmit_after_polls": Live(5, lambda b: b.registry.ejection_policy.good_polls),
    "max_ejected_fraction": Live(0.25, lambda b: b.registry.ejection_policy.max_fraction),
    "max_body_size": Live(1000, _config("max_body_size")),
    "log_level": Live("error", lambda b: logging.getLogger().level, logging.ERROR),
}

# Read once at start (server.py, connections.py, proxy.create_app, logs.configure): a reload
# reports them.
RESTART = {
    "host": "0.0.0.0",
    "port": 9000,
    "cors_origins": ["https://app.example"],
    "tls_certfile": Path("/etc/llamacpp-ha/cert.pem"),
    "tls_keyfile": Path("/etc/llamacpp-ha/key.pem"),
    "log_format": "json",
    "max_connections": 100,
    "header_timeout_s": 3.0,
    "keepalive_timeout_s": 60.0,
    "state_url": "redis://10.0.0.5:6379/0",
    "lease_ttl_s": 30.0,
    "replica_id": "host-a",
    "workers": 4,
}


class EveryFieldTest(unittest.IsolatedAsyncioTestCase):
    """Each field of ProxyConfig changed alone: planned as its metadata says, then applied."""

    def setUp(self) -> None:
        for logger in [logging.getLogger(n) for n in ("", "uvicorn.error", "uvicorn.access")]:
            self.addCleanup(logger.setLevel, logger.level)

    async def test_every_field(self) -> None:
        for field in ProxyConfig.model_fields:
            with self.subTest(field=field):
                mode = reload_mode(field)  # LookupError: a field without reload metadata
                cases = LIVE if mode == "live" else RESTART
                self.assertTrue(field in cases, f"{field} ({mode}): add a case for it here")
                await self.check(field, mode)

    async def check(self, field: str, mode: str) -> None:
        old = old_config()
        new_value = LIVE[field].new if mode == "live" else RESTART[field]
        self.assertNotEqual(getattr(old, field), new_value)
        new = old.model_copy(update={field: new_value})
        plan = plan_reload(old, new)
        self.assertEqual(plan.changed, (field,))
        self.assertEqual(
            (plan.live, plan.restart), ((field,), ()) if mode == "live" else ((), (field,))
        )
        balancer = Balancer(old)
        try:
            restart_needed = balancer.reload(new)
            if mode == "live":
                self.assertEqual(restart_needed, [])
                self.assertEqual(LIVE[field].in_use(balancer), LIVE[field].want())
            else:
                self.assertEqual(restart_needed, [field])
        finally:
            await balancer.aclose()

    def test_what_needs_a_restart_is_what_the_readme_says(self) -> None:
        # "`host`, `port`, TLS, CORS, the log format, `max_connections`, `header_timeout_s` and
        # `keepalive_timeout_s` are read at start"
        self.assertEqual(
            {f for f in ProxyConfig.model_fields if reload_mode(f) == "restart"}, set(RESTART)
        )


class PlanTest(unittest.TestCase):
    def test_backends_by_name(self) -> None:
        old = old_config()
        plan = plan_reload(old, old.model_copy(update={"backends": [A_CHANGED, B]}))
        self.assertEqual(
            plan.backends, BackendChanges(added=(B,), removed=("c",), changed=(A_CHANGED,))
        )
        self.assertEqual(plan_reload(old, old).backends, BackendChanges())
        self.assertEqual(plan_reload(old, old).changed, ())

    def test_several_fields(self) -> None:
        old = old_config()
        plan = plan_reload(old, old.model_copy(update={"port": 1, "max_queue": 2, "host": "::"}))
        self.assertEqual(plan.changed, ("host", "port", "max_queue"))
        self.assertEqual(plan.live, ("max_queue",))
        self.assertEqual(plan.restart, ("host", "port"))


class FleetThroughAdminTest(unittest.IsolatedAsyncioTestCase):
    """A reload compares the new configuration with what runs, admin changes included."""

    async def test_admin_changes_and_reload(self) -> None:
        old = old_config()
        balancer = Balancer(old)
        self.addAsyncCleanup(balancer.aclose)
        balancer.registry.set_draining(balancer.registry.get("c"), True)  # drained, not removed
        balancer.add_backend(B)  # not in the file: a reload removes it, as it always did
        self.assertEqual(balancer.reload(old.model_copy(update={"max_queue": 9})), [])
        self.assertEqual([b.name for b in balancer.config.backends], ["a", "c"])
        await wait_until(lambda: [b.name for b in balancer.registry.backends] == ["a", "c"])
        self.assertTrue(balancer.registry.get("c").draining)
        self.assertFalse(balancer.registry.get("a").draining)


class ChangedBackendTest(unittest.IsolatedAsyncioTestCase):
    async def test_a_changed_backend_keeps_its_state_and_its_requests_in_flight(self) -> None:
        async with (
            sims(
                SimConfig(slots=1, profile="cpu-1b", time_scale=4),
                SimConfig(slots=2, profile="test"),
            ) as (old, new),
            balancer_for(
                [old], backends=[{"url": old.url, "name": "gpu"}], poll_interval_s=30
            ) as lb,
            httpx.AsyncClient(timeout=10) as http,
        ):
            registry, stats = lb.balancer.registry, lb.balancer.stats
            await http.post(lb.url + "/v1/chat/completions", json=chat("before"))
            backend = registry.get("gpu")
            await wait_until(lambda: stats.backend("gpu").served == 1)
            registry.report_failure(backend, "a failure on live traffic")

            async def stream() -> bytes:
                body = chat("long", max_tokens=200, stream=True)
                async with http.stream("POST", lb.url + "/v1/chat/completions", json=body) as r:
                    self.assertEqual(r.status_code, 200)
                    return b"".join([c async for c in r.aiter_bytes()])

            streaming = asyncio.create_task(stream())
            await wait_until(lambda: old.processing == 1)
            config = lb.balancer.config
            moved = [
                b.model_copy(update={"url": new.url, "api_key": "new-key"}) for b in config.backends
            ]
            self.assertEqual(lb.balancer.reload(config.model_copy(update={"backends": moved})), [])
            self.assertIs(registry.get("gpu"), backend)
            self.assertEqual([b.name for b in registry.backends], ["gpu"])
            self.assertEqual(backend.slots.in_flight, 1)
            self.assertEqual(backend.ejection.consecutive_failures, 1)
            self.assertFalse(backend.draining)
            # Polled at once (the interval is 30 s): the new server's two slots.
            await wait_until(lambda: backend.slots.total == 2, within_s=2)
            response = await http.post(lb.url + "/v1/chat/completions", json=chat("after"))
            self.assertEqual(response.status_code, 200)
            self.assertEqual(generations(new), 1)
            seen = next(r for r in new.requests if r.path == "/v1/chat/completions")
            self.assertEqual(seen.headers.get("Authorization"), "Bearer new-key")
            body = await asyncio.wait_for(streaming, 10)
            self.assertTrue(body.rstrip().endswith(b"data: [DONE]"))
            self.assertEqual(generations(old), 2)  # the stream finished where it started
            await wait_until(lambda: stats.backend("gpu").served == 3)  # one history throughout


class OnceIgnoredSettingsTest(unittest.IsolatedAsyncioTestCase):
    """trusted_proxies, max_header_size, log_level and shutdown_grace_s used to be read once."""

    async def asyncSetUp(self) -> None:
        self.http = httpx.AsyncClient(timeout=10)
        self.addAsyncCleanup(self.http.aclose)

    async def test_trusted_proxies(self) -> None:
        async with sims(SimConfig(slots=1, profile="test")) as (sim,), balancer_for([sim]) as lb:

            async def forwarded_for() -> str:
                before = len(sim.requests)
                await self.http.post(
                    lb.url + "/v1/chat/completions",
                    json=chat(),
                    headers={"X-Forwarded-For": "203.0.113.9"},
                )
                seen = next(r for r in sim.requests[before:] if r.path == "/v1/chat/completions")
                return {k.lower(): v for k, v in seen.headers.items()}["x-forwarded-for"]

            self.assertEqual(await forwarded_for(), "127.0.0.1")
            self.assertEqual(reload(lb, trusted_proxies=["127.0.0.0/8"]), [])
            self.assertEqual(await forwarded_for(), "203.0.113.9, 127.0.0.1")
            reload(lb, trusted_proxies=[])
            self.assertEqual(await forwarded_for(), "127.0.0.1")

    async def test_max_header_size(self) -> None:
        async with sims(SimConfig(slots=1, profile="test")) as (sim,), balancer_for([sim]) as lb:

            async def status() -> int:
                response = await self.http.post(
                    lb.url + "/v1/chat/completions", json=chat(), headers={"X-Big": "y" * 5000}
                )
                return response.status_code

            self.assertEqual(await status(), 200)
            self.assertEqual(reload(lb, max_header_size=4096), [])
            self.assertEqual(await status(), 431)
            reload(lb, max_header_size=8192)
            self.assertEqual(await status(), 200)

    async def test_log_level(self) -> None:
        loggers = [logging.getLogger(n) for n in ("", "uvicorn.error", "uvicorn.access")]
        for logger, level in [(x, x.level) for x in loggers]:
            self.addCleanup(logger.setLevel, level)
        async with sims(SimConfig(slots=1, profile="test")) as (sim,), balancer_for([sim]) as lb:
            self.assertEqual(reload(lb, log_level="error"), [])
            self.assertEqual([x.level for x in loggers], [logging.ERROR] * 3)
            self.assertFalse(
                logging.getLogger("llamacpp_ha.registry").isEnabledFor(logging.WARNING)
            )
            reload(lb, log_level="debug")
            self.assertEqual([x.level for x in loggers], [logging.DEBUG] * 3)

    async def test_shutdown_grace(self) -> None:
        async with sims(SimConfig(slots=1, profile="cpu-1b")) as (sim,):
            config = build_config(
                {"backends": [sim.url], "poll_interval_s": 0.1, "shutdown_grace_s": 30}
            )
            async with serve_app(create_app(config)) as lb:
                registry = lb.balancer.registry
                await wait_until(lambda: registry.backends[0].health is Health.READY)
                body = chat("long", max_tokens=1000, stream=True)  # about 25 s

                async def stream() -> bytes:
                    url = lb.url + "/v1/chat/completions"
                    async with self.http.stream("POST", url, json=body) as response:
                        return b"".join([c async for c in response.aiter_bytes()])

                streaming = asyncio.create_task(stream())
                await wait_until(lambda: sim.processing == 1)
                self.assertEqual(reload(lb, shutdown_grace_s=0.2), [])
                started = time.monotonic()
            # Leaving serve_app shut the server down: within the new grace, not the old 30 s.
            received = await asyncio.wait_for(streaming, 5)
            self.assertLess(time.monotonic() - started, 3)
            last = [line for line in received.splitlines() if line.startswith(b"data: ")][-1]
            self.assertIn(b"shutting_down", last)


class ReadPerRequestTest(unittest.IsolatedAsyncioTestCase):
    """The request limits that live in balancer.config apply to the next request."""

    async def test_request_limits(self) -> None:
        async with (
            sims(SimConfig(slots=1, profile="test")) as (sim,),
            balancer_for([sim]) as lb,
            httpx.AsyncClient(timeout=10) as http,
        ):
            url = lb.url + "/v1/chat/completions"
            cases = [
                ({"max_body_size": 1000}, chat("x" * 2000), 413),
                ({"max_json_depth": 8}, chat(extra=[[[[[[[[[[1]]]]]]]]]]), 400),
                ({"max_tokens_cap": 10}, chat(max_tokens=11), 400),
            ]
            for changes, body, status in cases:
                self.assertEqual((await http.post(url, json=body)).status_code, 200, changes)
                reload(lb, **changes)
                self.assertEqual((await http.post(url, json=body)).status_code, status, changes)
