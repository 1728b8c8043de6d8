"""A minimal llama-server stand-in for the overhead measurements: streams timestamps.

Each streamed chunk carries, as its text, the ``time.monotonic_ns()`` at which it was written
(CLOCK_MONOTONIC is one clock for every process on Linux), so the client measures the delay a
balancer adds to every chunk. No model time at all: the first chunk leaves at once, and the
last user message ``tick <ms>`` sets the gap between chunks, so one process serves every phase.
It answers just enough of llama-server's API (``/health``, ``/v1/models``, ``/slots``,
``/props``) for every balancer to accept it as a backend with ``--slots`` idle slots.

Run: ``python bench/ticker.py --port 0 --slots 1024``; prints ``ticker listening on URL``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from aiohttp import web

_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


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


def _chunk(content: str | None, finish: str | None = None) -> bytes:
    delta: dict[str, Any] = {} if content is None else {"content": content}
    event = {
        "id": "chatcmpl-ticker",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": "sim-model",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(event).encode() + b"\n\n"


async def chat(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    # SGLang's router forwards max_tokens as max_completion_tokens.
    n = int(body.get("max_completion_tokens") or body.get("max_tokens") or 16)
    interval = _interval_s(body)
    resp = web.StreamResponse(headers=_HEADERS)
    await resp.prepare(request)
    await resp.write(
        b"data: "
        + json.dumps(
            {
                "id": "chatcmpl-ticker",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": "sim-model",
                "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}],
            }
        ).encode()
        + b"\n\n"
    )
    for i in range(n):
        if i and interval:
            await asyncio.sleep(interval)
        await resp.write(_chunk(str(time.monotonic_ns())))
    await resp.write(_chunk(None, "length"))
    usage = {
        "id": "chatcmpl-ticker",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": "sim-model",
        "choices": [],
        "usage": {"prompt_tokens": 4, "completion_tokens": n, "total_tokens": n + 4},
    }
    await resp.write(b"data: " + json.dumps(usage).encode() + b"\n\ndata: [DONE]\n\n")
    await resp.write_eof()
    return resp


def build_app(slots: int) -> web.Application:
    slot_list = [{"id": i, "n_ctx": 4096, "is_processing": False} for i in range(slots)]
    models = {
        "object": "list",
        "data": [{"id": "sim-model", "object": "model", "owned_by": "llamacpp", "created": 0}],
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
            web.post("/v1/chat/completions", chat),
            web.post("/chat/completions", chat),
        ]
    )
    return app


async def serve(port: int, slots: int) -> None:
    runner = web.AppRunner(build_app(slots), access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=4096)
    await site.start()
    bound = next(a for a in runner.addresses if isinstance(a, tuple))
    print(f"ticker listening on http://127.0.0.1:{bound[1]}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--slots", type=int, default=1024)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.slots))


if __name__ == "__main__":
    main()
