"""``--mode ticker``: a minimal llama-server stand-in that streams timestamps, for overhead runs.

Each streamed chunk carries, as its text, the ``time.monotonic_ns()`` at which it was written
(CLOCK_MONOTONIC is one clock for every process on Linux), so a client measures the delay a
balancer adds to every chunk. No model time at all: the first chunk leaves at once, and the last
user message ``tick <ms>`` sets the gap between chunks, so one process serves every phase of a
benchmark. Without ``stream`` it answers one JSON completion at once, as llama-server would.
It answers just enough of llama-server's API (``/health``, ``/v1/models``, ``/slots``,
``/props``) for every balancer to accept it as a backend with ``slots`` idle slots,
and nothing of the simulator's engine runs: no tokenizer, no slots, no queue, no faults.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web

from llamacpp_sim import shapes
from llamacpp_sim.config import SimConfig

_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
# Hundreds of clients connect at once in a relay ramp; the default backlog of 128 drops some.
_BACKLOG = 4096


def _interval_s(body: dict[str, Any]) -> float:
    messages = body.get("messages")
    text = ""
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
        text = str(messages[-1].get("content", ""))
    elif isinstance(body.get("prompt"), str):
        text = body["prompt"]
    parts = text.split()
    if len(parts) >= 2 and parts[0] == "tick":
        try:
            return max(float(parts[1]), 0.0) / 1000.0
        except ValueError:
            return 0.0
    return 0.0


def _event(model: str, choices: list[dict[str, Any]], **extra: Any) -> bytes:
    # llama-server's bytes: its fields in its order, compact JSON (shapes.dumps).
    event = {
        "choices": choices,
        "created": int(time.time()),
        "id": "chatcmpl-ticker",
        "model": model,
        "system_fingerprint": shapes.BUILD_INFO,
        "object": "chat.completion.chunk",
        **extra,
    }
    return b"data: " + shapes.dumps(event).encode() + b"\n\n"


def _chunk(model: str, content: str | None, finish: str | None = None) -> bytes:
    delta: dict[str, Any] = {} if content is None else {"content": content}
    return _event(model, [{"finish_reason": finish, "index": 0, "delta": delta}])


class TickerBackend:
    """The ticker on a real socket: ``await start()``, use ``url``, ``await aclose()``."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self._runner: web.AppRunner | None = None
        self._port = config.port

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def url(self) -> str:
        host = self.config.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self._port}"

    async def start(self) -> None:
        runner = web.AppRunner(self._app(), access_log=None, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, self.config.host, self.config.port, backlog=_BACKLOG)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        for address in runner.addresses:
            if isinstance(address, tuple):
                self._port = int(address[1])
                break

    async def aclose(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _app(self) -> web.Application:
        slots, model, n_ctx = self.config.slots, self.config.model, self.config.n_ctx
        slot_list = [{"id": i, "n_ctx": n_ctx, "is_processing": False} for i in range(slots)]
        models = {
            "object": "list",
            "data": [{"id": model, "object": "model", "owned_by": "llamacpp", "created": 0}],
        }

        async def health(_: web.Request) -> web.Response:
            return web.json_response({"status": "ok"})

        async def list_models(_: web.Request) -> web.Response:
            return web.json_response(models)

        async def slots_view(_: web.Request) -> web.Response:
            return web.json_response(slot_list)

        async def props(_: web.Request) -> web.Response:
            return web.json_response({"total_slots": slots, "model_path": "ticker.gguf"})

        app = web.Application()
        app.add_routes(
            [
                web.get("/health", health),
                web.get("/v1/models", list_models),
                web.get("/models", list_models),
                web.get("/slots", slots_view),
                web.get("/props", props),
                web.post("/v1/chat/completions", self._chat),
                web.post("/chat/completions", self._chat),
            ]
        )
        return app

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        model = self.config.model
        body = await request.json()
        # SGLang's router forwards max_tokens as max_completion_tokens.
        n = int(body.get("max_completion_tokens") or body.get("max_tokens") or 16)
        interval = _interval_s(body)
        usage = {"prompt_tokens": 4, "completion_tokens": n, "total_tokens": n + 4}
        # As llama-server sends them, so a balancer does the accounting it does for a real one.
        timings = {"cache_n": 0, "prompt_n": 4, "prompt_ms": 0.1, "predicted_n": n}
        if not body.get("stream"):
            return web.json_response(
                {
                    "id": "chatcmpl-ticker",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": str(time.monotonic_ns())},
                            "finish_reason": "length",
                        }
                    ],
                    "usage": usage,
                    "timings": timings,
                }
            )
        resp = web.StreamResponse(headers=_HEADERS)
        await resp.prepare(request)
        role = {"role": "assistant"}
        await resp.write(_event(model, [{"finish_reason": None, "index": 0, "delta": role}]))
        for i in range(n):
            if i and interval:
                await asyncio.sleep(interval)
            await resp.write(_chunk(model, str(time.monotonic_ns())))
        await resp.write(_chunk(model, None, "length"))
        await resp.write(_event(model, [], usage=usage, timings=timings) + b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
