"""A fake llama-server on a real socket for the poll: captured answers, or what a test sets."""

from __future__ import annotations

import json
from collections import Counter
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
    length = next(int(v) for k, _, v in (x.partition(": ") for x in lines) if k == "Content-Length")
    assert len(body) == length, f"{name}: the body is not the whole capture"
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
        self.authorization: dict[str, str | None] = {}  # the last one each path was sent
        self._runner: web.AppRunner | None = None
        self.url = ""

    def answer(self, path: str, status: int, body: Any) -> None:
        """From now on `path` answers `status` with `body` (bytes as they are, else as JSON)."""
        self.answers[path] = (
            status,
            body if isinstance(body, bytes) else json.dumps(body).encode(),
        )

    async def _handle(self, request: web.Request) -> web.Response:
        self.hits[request.path] += 1
        self.authorization[request.path] = request.headers.get("Authorization")
        status, body = self.answers.get(request.path, (404, b'{"error": {"message": "no"}}'))
        return web.Response(status=status, body=body, content_type="application/json")

    async def __aenter__(self) -> FakeLlamaServer:
        app = web.Application()
        app.router.add_route("GET", "/{path:.*}", self._handle)
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
