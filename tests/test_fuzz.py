"""Random requests against a real balancer in front of a simulated llama-server.

Whatever the body, headers or path, the balancer itself never answers 5xx, every answer is an
OpenAI-style JSON error, a JSON answer or a stream whose every event parses, and nothing it
admitted stays held. Bounded: a fixed number of examples, one shared balancer.
"""

from __future__ import annotations

import asyncio
import json
import threading
import unittest
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamacpp_ha.proxied import PROXIED_PATHS
from llamacpp_sim import SimConfig
from serving import Served, assert_no_leaks, balancer_for, sims

KEYS = ["messages", "prompt", "content", "model", "max_tokens", "n_predict", "stream",
        "temperature", "top_p", "n", "system", "input", "documents", "query", "tokens"]  # fmt: skip

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
    # lone surrogates survive json.dumps as escapes ("\ud800"), as a hostile client sends them
    | st.text(alphabet=st.characters(categories=["Cs", "Ll"]), max_size=4),
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=20,
)
messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "system", "assistant", "tool", ""]),
            "content": json_values,
        }
    ),
    max_size=4,
)
# Weighted towards requests that get past the first checks: that is where the admission is.
chat_bodies = st.fixed_dictionaries(
    {"messages": messages, "max_tokens": st.integers(-3, 40), "stream": st.booleans()},
    optional={"model": json_values, "n": st.integers(-1, 3)},
)
bodies = st.one_of(
    chat_bodies,
    chat_bodies,
    st.fixed_dictionaries({"prompt": json_values, "stream": st.booleans()}),
    st.dictionaries(st.sampled_from(KEYS), json_values, max_size=6),
)
raw_bodies = st.one_of(
    bodies.map(lambda b: json.dumps(b).encode()),
    bodies.map(lambda b: json.dumps(b).encode()),
    bodies.map(lambda b: json.dumps(b).encode()),
    st.binary(max_size=200),
    st.text(max_size=100).map(lambda t: t.encode("utf-16")),
)
paths = st.one_of(
    st.sampled_from(["/v1/chat/completions", "/v1/messages", "/completion"]),
    st.sampled_from(PROXIED_PATHS),
    st.sampled_from(["/slots", "/props", "/v1/models", "/health", "/metrics", "/admin/reload"]),
    st.text(
        alphabet=st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="?#"),
        max_size=20,
    ).map(lambda p: "/" + p),
)
# What an HTTP client lets through (httpx refuses the rest); malformed HTTP is tested apart.
header_values = st.text(
    alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=30
)
headers = st.fixed_dictionaries(
    {},
    optional={
        "Content-Type": st.sampled_from(
            ["application/json", "text/plain", "application/json; charset=utf-16", ""]
        ),
        "Authorization": header_values.map(lambda v: "Bearer " + v),
        "X-Request-Id": header_values,
        "Accept": header_values,
        "X-Forwarded-For": header_values,
    },
)


@contextmanager
def balancer_in_a_thread() -> Iterator[tuple[Served, asyncio.AbstractEventLoop]]:
    """A balancer and its backend on an event loop of their own, for hypothesis's sync tests."""
    loop = asyncio.new_event_loop()
    ready: Future[Served] = Future()
    stop = asyncio.Event()

    async def run() -> None:
        try:
            async with (
                sims(SimConfig(slots=2, profile="test", default_max_tokens=4)) as fleet,
                balancer_for(
                    fleet,
                    api_keys=[{"id": "fuzz", "key": "k", "max_concurrent": 4}],
                    max_tokens_cap=64,
                ) as served,
            ):
                ready.set_result(served)
                await stop.wait()
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc)
            raise

    thread = threading.Thread(target=loop.run_until_complete, args=(run(),), daemon=True)
    thread.start()
    try:
        yield ready.result(timeout=20), loop
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=20)
        loop.close()


class FuzzTest(unittest.TestCase):
    _context: AbstractContextManager[tuple[Served, asyncio.AbstractEventLoop]]
    served: Served
    loop: asyncio.AbstractEventLoop
    http: httpx.Client

    @classmethod
    def setUpClass(cls) -> None:
        cls._context = balancer_in_a_thread()
        cls.served, cls.loop = cls._context.__enter__()
        cls.http = httpx.Client(base_url=cls.served.url, timeout=20)

    @classmethod
    def tearDownClass(cls) -> None:
        cls.http.close()
        cls._context.__exit__(None, None, None)

    def check(self, response: httpx.Response) -> None:
        status, media = response.status_code, response.headers.get("content-type", "")
        if media.startswith("text/event-stream"):
            self.assertEqual(status, 200)
            for line in response.content.splitlines():
                if line.startswith(b"data:") and line[5:].strip() != b"[DONE]":
                    json.loads(line[5:])
            return
        if media.startswith("text/html"):  # the monitor page
            self.assertEqual((status, response.request.url.path), (200, "/monitor"))
            return
        if response.request.url.path == "/metrics" and status == 200:
            return
        if status == 204:  # favicon
            return
        body: Any = response.json()
        if status >= 400:
            error = body["error"]
            self.assertTrue(error["message"])
            self.assertIn("type", error)
            # Ours are the 502/503/504 of a backend or of capacity; a 500 only relays one.
            self.assertNotEqual(error.get("code"), "internal_error", error)

    @settings(
        max_examples=300,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
    @given(path=paths, body=raw_bodies, headers=headers, key=st.booleans())
    def test_any_request(self, path: str, body: bytes, headers: dict[str, str], key: bool) -> None:
        if key:
            headers = {**headers, "Authorization": "Bearer k"}
        response = self.http.post(path, content=body, headers=headers)
        self.check(response)

    def test_zz_nothing_is_left_held(self) -> None:
        # Runs after the fuzzing (alphabetical order): every admission was released.
        balancer = self.served.balancer
        future = asyncio.run_coroutine_threadsafe(assert_no_leaks(balancer), self.loop)
        future.result(timeout=10)
        self.assertEqual(balancer.key_limits.in_flight("fuzz"), 0)
