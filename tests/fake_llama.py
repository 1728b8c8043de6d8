"""A fake llama-server on a real socket for the poll: captured answers, or what a test sets."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from aiohttp import web

SAMPLES = Path(__file__).resolve().parent / "llama-server-samples"


def captured(name: str) -> tuple[int, bytes]:
    """(status, body) of a real llama-server answer captured in tests/llama-server-samples/."""
    raw = (SAMPLES / name).read_bytes()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().splitlines()  # the first line is the request that produced it
    status = int(lines[1].split()[1])
    length = next(
        (int(v) for k, _, v in (x.partition(": ") for x in lines) if k == "Content-Length"), None
    )
    # Without a Content-Length the answer was chunked (a router relays its model instance's
    # that way) and curl wrote the body whole.
    assert length is None or len(body) == length, f"{name}: the body is not the whole capture"
    return status, body


class FakeLlamaServer:
    """Answers llama-server's poll paths with real captures; `answer()` replaces one."""

    def __init__(self) -> None:
        self.answers: dict[str, tuple[int, bytes]] = {
            "/health": captured("health.txt"),
            "/v1/models": captured("models.txt"),
            "/slots": captured("slots-idle.txt"),
            "/props": captured("props.txt"),
        }
        self.hits: Counter[str] = Counter()
        self.posted: list[tuple[str, Any]] = []  # (path, JSON body) of every POST
        # Called with each POST's path and JSON body before it is answered: a test changes
        # other answers there, as a real server changes state on a request.
        self.on_post: Callable[[str, Any], None] | None = None
        self.authorization: dict[str, str | None] = {}  # the last one each path was sent
        # Called with each request's path before it is answered: an event to answer it only
        # once set (a server that is slow to answer a poll), or None.
        self.hold: Callable[[str], asyncio.Event | None] | None = None
        self._runner: web.AppRunner | None = None
        self.url = ""

    def answer(self, path: str, status: int, body: Any) -> None:
        """From now on `path` answers `status` with `body` (bytes as they are, else as JSON);
        a path with a query string answers that query only."""
        self.answers[path] = (
            status,
            body if isinstance(body, bytes) else json.dumps(body).encode(),
        )

    async def _handle(self, request: web.Request) -> web.Response:
        self.hits[request.path] += 1
        if request.query_string:
            self.hits[request.path_qs] += 1
        self.authorization[request.path] = request.headers.get("Authorization")
        if request.method == "POST":
            self.posted.append((request.path, await request.json()))
            if self.on_post is not None:
                self.on_post(*self.posted[-1])
        gate = self.hold(request.path) if self.hold is not None else None
        if gate is not None:
            await gate.wait()
        found = self.answers.get(request.path_qs) or self.answers.get(request.path)
        status, body = found or (404, b'{"error": {"message": "no"}}')
        return web.Response(status=status, body=body, content_type="application/json")

    async def __aenter__(self) -> FakeLlamaServer:
        app = web.Application()
        app.router.add_route("GET", "/{path:.*}", self._handle)
        app.router.add_route("POST", "/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


# A router-mode llama-server (two tiny models, --models-max 1), as captured.
SLOTS_A = "/slots?model=tiny-a&autoload=false"
SLOTS_B = "/slots?model=tiny-b&autoload=false"


def models_with(statuses: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The captured router-mode /v1/models with each model's status replaced."""
    data: dict[str, Any] = json.loads(captured("router-v1-models-unloaded.txt")[1])
    for entry in data["data"]:
        entry["status"] = {**entry["status"], **statuses.get(entry["id"], {})}
    return data


def router_fake() -> FakeLlamaServer:
    """A router-mode server with tiny-a loaded and tiny-b not (a test moves it on)."""
    fake = FakeLlamaServer()
    fake.answer("/v1/models", 200, models_with({"tiny-a": {"value": "loaded"}}))
    fake.answer("/props", *captured("router-props-no-model.txt"))
    fake.answer("/slots", *captured("router-slots-no-model.txt"))
    fake.answer(SLOTS_A, *captured("router-slots-model.txt"))
    fake.answer("/models/load", *captured("router-load.txt"))
    fake.answer("/v1/chat/completions", *captured("router-chat.txt"))
    return fake
