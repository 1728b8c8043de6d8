"""HTTP plumbing shared by the endpoints: headers, JSON in and out, llama-server errors."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from llamacpp_sim.shapes import dumps, error_body

HEADERS = {"Server": "llama.cpp", "Access-Control-Allow-Origin": ""}
SSE_HEADERS = {**HEADERS, "X-Accel-Buffering": "no", "Content-Type": "text/event-stream"}


class ApiError(Exception):
    """An error answer in llama-server's ``{"error": {code, message, type}}`` shape."""

    def __init__(self, code: int, message: str, err_type: str, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.err_type = err_type
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return error_body(self.code, self.message, self.err_type, **self.extra)


def json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(
        text=dumps(obj),
        status=status,
        content_type="application/json",
        charset="utf-8",
        headers=HEADERS,
    )


def maybe_json(body: bytes) -> Any | None:
    if not body:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request's JSON object, or the 400 llama-server gives for a parse error."""
    raw = await request.read()
    try:
        data = json.loads(raw.decode("utf-8", errors="replace"))
    except json.JSONDecodeError as exc:
        raise ApiError(
            400,
            f"[json.exception.parse_error.101] parse error at line {exc.lineno}, column "
            f"{exc.colno}: syntax error while parsing value - {exc.msg}",
            "invalid_request_error",
        ) from exc
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", "invalid_request_error")
    return data
