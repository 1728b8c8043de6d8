"""The app through Starlette's TestClient (runs the lifespan): answers that need no backend."""

from __future__ import annotations

import unittest
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

from fastapi import FastAPI
from fastapi.testclient import TestClient

from llamacpp_ha.config import build_config
from llamacpp_ha.proxied import PROXIED_PATHS
from llamacpp_ha.proxy import create_app

# Port 9 (discard) on loopback refuses connections: the backend is dead from the first poll.
DEAD_BACKEND = "http://127.0.0.1:9"


class Answer(Protocol):
    """What the tests read of a TestClient response (httpx2's, or httpx's without httpx2)."""

    status_code: int

    @property
    def text(self) -> str: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    def json(self) -> Any: ...


def app_with(**overrides: object) -> FastAPI:
    settings: dict[str, object] = {"backends": [DEAD_BACKEND], "poll_interval_s": 0.05}
    settings.update(overrides)
    return create_app(build_config(settings))


class ErrorShapeTest(unittest.TestCase):
    def setUp(self) -> None:
        # The context manager form runs the app's lifespan (scheduler, poller, client session).
        self.client = self.enterContext(TestClient(app_with(max_body_size=1000)))

    def assertError(self, response: Answer, status: int, code: str | None = None) -> None:
        self.assertEqual(response.status_code, status, response.text)
        self.assertEqual(response.headers["content-type"], "application/json")
        error = response.json()["error"]
        self.assertEqual(set(error), {"message", "type", "code"})
        self.assertTrue(error["message"])
        if code is not None:
            self.assertEqual(error["code"], code)

    def test_invalid_json(self) -> None:
        self.assertError(
            self.client.post("/v1/chat/completions", content=b"{nope"), 400, "invalid_request"
        )

    def test_invalid_utf8(self) -> None:
        self.assertError(self.client.post("/v1/chat/completions", content=b'{"a": "\xff"}'), 400)

    def test_body_not_an_object(self) -> None:
        for body in (b"[]", b"3", b'"text"', b"null"):
            self.assertError(self.client.post("/v1/completions", content=body), 400)

    def test_empty_body(self) -> None:
        self.assertError(self.client.post("/v1/completions", content=b""), 400)

    def test_deeply_nested_json(self) -> None:
        self.assertError(self.client.post("/v1/completions", content=b"[" * 500 + b"]" * 500), 400)

    def test_model_not_a_string(self) -> None:
        self.assertError(self.client.post("/v1/chat/completions", json={"model": 3}), 400)

    def test_oversized_body_by_declared_length(self) -> None:
        self.assertError(
            self.client.post("/v1/completions", content=b" " * 2000), 413, "request_too_large"
        )

    def test_oversized_body_without_length(self) -> None:
        def chunks() -> Iterator[bytes]:
            for _ in range(10):
                yield b" " * 200

        self.assertError(self.client.post("/v1/completions", content=chunks()), 413)

    def test_unknown_path_is_404(self) -> None:
        self.assertError(self.client.get("/nope"), 404, "not_found")

    def test_backend_admin_paths_are_not_reachable(self) -> None:
        hidden = [("GET", "/slots"), ("POST", "/slots/0?action=erase"), ("POST", "/slots/0"),
                  ("POST", "/props"), ("GET", "/props"), ("POST", "/metrics")]  # fmt: skip
        for method, path in hidden:
            response = self.client.request(method, path)
            self.assertIn(response.status_code, (404, 405), path)
            self.assertIn("error", response.json())
        # GET /metrics is the balancer's own, not a backend's.
        metrics = self.client.get("/metrics")
        self.assertIn("llamacpp_ha_queue_depth", metrics.text)
        self.assertNotIn("llamacpp:", metrics.text)

    def test_wrong_method_is_405_json(self) -> None:
        self.assertError(self.client.get("/v1/chat/completions"), 405)

    def test_no_ready_backend_is_503_with_retry_after(self) -> None:
        response = self.client.post("/v1/chat/completions", json={"messages": []})
        self.assertError(response, 503, "no_healthy_backend")
        self.assertIn("retry-after", response.headers)

    def test_health_is_503_without_backends(self) -> None:
        self.assertEqual(self.client.get("/health").status_code, 503)

    def test_models_empty_without_ready_backends(self) -> None:
        self.assertEqual(self.client.get("/v1/models").json(), {"object": "list", "data": []})

    def test_every_proxied_path_is_routed(self) -> None:
        for path in PROXIED_PATHS:
            self.assertError(self.client.post(path, content=b"{bad"), 400)

    def test_monitor_page_and_data(self) -> None:
        page = self.client.get("/monitor")
        self.assertEqual(page.status_code, 200)
        self.assertIn("monitor/data", page.text)
        data = self.client.get("/monitor/data").json()
        self.assertEqual(data["backends"][0]["state"], "dead")
        self.assertEqual(data["queue"]["depth"], 0)


class AuthTest(unittest.TestCase):
    def setUp(self) -> None:
        self.client = self.enterContext(TestClient(app_with(api_keys=["key-one", "key-two"])))

    def post(self, headers: dict[str, str]) -> Answer:
        return self.client.post("/v1/chat/completions", content=b"{bad", headers=headers)

    def assert401(self, response: Answer) -> None:
        self.assertEqual(response.status_code, 401)
        self.assertEqual(response.json()["error"]["type"], "authentication_error")
        self.assertEqual(response.headers["www-authenticate"], "Bearer")

    def test_missing_key(self) -> None:
        self.assert401(self.post({}))

    def test_wrong_key(self) -> None:
        self.assert401(self.post({"Authorization": "Bearer key-three"}))

    def test_prefix_of_a_key(self) -> None:
        self.assert401(self.post({"Authorization": "Bearer key-on"}))

    def test_malformed_scheme(self) -> None:
        self.assert401(self.post({"Authorization": "Basic a2V5LW9uZQ=="}))
        self.assert401(self.post({"Authorization": "key-one"}))

    def test_valid_keys_pass_auth(self) -> None:
        # Past auth, the bad body is what the client hears about.
        self.assertEqual(self.post({"Authorization": "Bearer key-one"}).status_code, 400)
        self.assertEqual(self.post({"Authorization": "bearer key-two"}).status_code, 400)

    def test_anthropic_style_header(self) -> None:
        self.assertEqual(self.post({"x-api-key": "key-two"}).status_code, 400)
        self.assert401(self.post({"x-api-key": "nope"}))

    def test_two_credentials_are_refused(self) -> None:
        response = self.client.post(
            "/v1/chat/completions",
            content=b"{}",
            headers=[("Authorization", "Bearer key-one"), ("Authorization", "Bearer key-two")],
        )
        self.assert401(response)

    def test_exempt_paths(self) -> None:
        self.assertEqual(self.client.get("/monitor").status_code, 200)
        self.assertEqual(self.client.get("/monitor/data").status_code, 200)
        self.assertEqual(self.client.get("/health").status_code, 503)  # no backend, but no 401

    def test_models_needs_a_key(self) -> None:
        self.assertEqual(self.client.get("/v1/models").status_code, 401)
        response = self.client.get("/v1/models", headers={"Authorization": "Bearer key-one"})
        self.assertEqual(response.status_code, 200)

    def test_key_is_not_echoed(self) -> None:
        response = self.post({"Authorization": "Bearer secret-wrong-key"})
        self.assertNotIn("secret-wrong-key", response.text)


class AppIsolationTest(unittest.TestCase):
    def test_stats_are_per_app(self) -> None:
        first, second = app_with(), app_with()
        with TestClient(first) as one:
            one.post("/v1/completions", content=b"{bad")
        self.assertIsNot(first.state.balancer.stats, second.state.balancer.stats)
        self.assertEqual(first.state.balancer.stats.client_errors, 1)
        self.assertEqual(second.state.balancer.stats.client_errors, 0)

    def test_routers_are_not_shared(self) -> None:
        from llamacpp_ha.monitor import ProxyStats, build_router

        stats = ProxyStats()
        self.assertIsNot(build_router(stats, dict), build_router(stats, dict))
