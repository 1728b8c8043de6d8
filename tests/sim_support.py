"""Helpers tests share (no tests here): bounded waits, samples, SSE parsing, a simulator case."""

from __future__ import annotations

import asyncio
import json
import os
import unittest
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from llamacpp_sim import RecordedRequest, SimBackend, SimConfig

# Captured exchanges of a real llama-server, kept beside the tests; LLAMACPP_HA_SAMPLES names
# another directory of them.
_SAMPLES_DIR = Path(
    os.environ.get("LLAMACPP_HA_SAMPLES")
    or Path(__file__).resolve().parent / "llama-server-samples"
)
SAMPLES = _SAMPLES_DIR if (_SAMPLES_DIR / "chat.txt").is_file() else None
STEP_TIMEOUT_S = 5.0


def sample(name: str) -> tuple[int, dict[str, str], str]:
    """(status, headers, body) of a captured exchange."""
    if SAMPLES is None:
        raise unittest.SkipTest("llama-server samples not found (set LLAMACPP_HA_SAMPLES)")
    text = (SAMPLES / name).read_text(encoding="utf-8", errors="replace")
    head, _, body = text.partition("\n\n")
    lines = head.splitlines()
    status = int(lines[1].split()[1])
    headers = {}
    for line in lines[2:]:
        key, _, value = line.partition(":")
        headers[key.strip()] = value.strip()
    return status, headers, body


def sample_json(name: str) -> Any:
    return json.loads(sample(name)[2])


def json_body(record: RecordedRequest) -> Any:
    """The JSON body the simulator recorded; the test fails if the request sent none."""
    assert record.json is not None, f"{record.method} {record.path} had no JSON body"
    return record.json


def sse_payloads(body: str) -> list[str]:
    return [line[len("data: ") :] for line in body.splitlines() if line.startswith("data: ")]


def key_shape(value: Any) -> Any:
    """The structure of a JSON value: dict keys recursively, first element of lists."""
    if isinstance(value, dict):
        return {k: key_shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [key_shape(value[0])] if value else []
    return type(value).__name__ if value is None else "value"


def missing_keys(expected: Any, actual: Any, path: str = "$") -> list[str]:
    """Keys present in the sample's shape but absent from ours."""
    out: list[str] = []
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [f"{path}: not an object"]
        for key, sub in expected.items():
            if key not in actual:
                out.append(f"{path}.{key}")
            else:
                out.extend(missing_keys(sub, actual[key], f"{path}.{key}"))
    elif isinstance(expected, list) and expected:
        if not isinstance(actual, list):
            return [f"{path}: not an array"]
        if actual:
            out.extend(missing_keys(expected[0], actual[0], f"{path}[0]"))
    return out


async def wait_until(predicate: Callable[[], object], within_s: float = STEP_TIMEOUT_S) -> None:
    """Poll a condition on state that no event announces (a backend's counters, say)."""
    try:
        async with asyncio.timeout(within_s):
            while not predicate():  # noqa: ASYNC110 - arbitrary predicates have no event to await
                await asyncio.sleep(0.002)
    except TimeoutError:
        raise TimeoutError(f"condition not met within {within_s:g} s") from None


async def read_frames(resp: aiohttp.ClientResponse, n: int) -> list[str]:
    """The first ``n`` SSE data payloads of a streamed response."""
    frames: list[str] = []
    async with asyncio.timeout(STEP_TIMEOUT_S):
        while len(frames) < n:
            line = await resp.content.readline()
            if not line:
                break
            text = line.decode("utf-8").rstrip("\n")
            if text.startswith("data: "):
                frames.append(text[len("data: ") :])
    return frames


def chat_body(messages: list[dict[str, str]], **extra: Any) -> dict[str, Any]:
    return {"model": "sim-model", "messages": messages, **extra}


class SimTestCase(unittest.IsolatedAsyncioTestCase):
    config = SimConfig(slots=2, profile="test", time_scale=1.0)

    async def asyncSetUp(self) -> None:
        self.sim = SimBackend(self.config)
        await self.sim.start()
        self.http = aiohttp.ClientSession(
            base_url=self.sim.url, timeout=aiohttp.ClientTimeout(total=STEP_TIMEOUT_S)
        )

    async def asyncTearDown(self) -> None:
        await self.http.close()
        try:
            # Leak check: every request ended and every slot is free again.
            async with asyncio.timeout(STEP_TIMEOUT_S):
                for rec in self.sim.requests:
                    await rec.done.wait()
            self.assertEqual(self.sim.processing, 0)
            self.assertEqual(self.sim.deferred, 0)
        finally:
            await self.sim.aclose()

    async def get_json(self, path: str, status: int = 200) -> Any:
        async with self.http.get(path) as resp:
            self.assertEqual(resp.status, status, path)
            self.assertEqual(resp.headers["Server"], "llama.cpp")
            return await resp.json(content_type=None)

    async def post(self, path: str, body: Any) -> tuple[int, str, aiohttp.ClientResponse]:
        async with self.http.post(path, json=body) as resp:
            return resp.status, await resp.text(), resp
