"""The proxied endpoints (`/v1/chat/completions` and the rest) as a plain ASGI app.

They are the hot path: every request and every streamed chunk goes through them. A framework's
router, its exception middleware and its request objects cost more per request than the rest of
the balancer's own work, and two extra `send` wrappers per chunk, so these paths are served here,
in front of FastAPI, which keeps every other route (`/monitor`, `/admin/`, `/v1/models`, ...).
Our own middleware (request id, client keys, CORS) runs before both.

Here a request is read (its body within the size and time limits), checked, turned into a
`ProxiedRequest` and handed to an `Exchange`, whose `RelayResponse` admits, relays and releases
it. Whatever is refused here is answered as an OpenAI-style JSON error, as FastAPI's handlers
answer the other routes.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .balancer import Balancer
from .config import ClientKey
from .errors import (
    InvalidRequest,
    MethodNotAllowed,
    ModelNotFound,
    PayloadTooLarge,
    ProxyError,
    RequestTimeout,
    ShuttingDown,
    UnsupportedMediaType,
    send_error,
)
from .exchange import Exchange, ProxiedRequest
from .middleware import state
from .pinning import PINNABLE_PATHS
from .policies import RoutingRequest
from .prefix_index import prompt_keys
from .registry import Registry
from .relay import RelayResponse
from .validation import check_body

log = logging.getLogger("llamacpp_ha")

# A rough figure for English text and JSON under llama.cpp's usual tokenizers; routing only
# weighs requests against each other with it.
_BYTES_PER_TOKEN = 4

# Everything of a backend that a client may reach. Not /slots (it holds other users'
# prompts and takes actions), not POST /props, not a backend's /metrics (ours is ours).
PROXIED_PATHS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/messages",
    "/completion",
    "/completions",
    "/infill",
    "/embedding",
    "/embeddings",
    "/rerank",
    "/reranking",
    "/v1/rerank",
    "/tokenize",
    "/detokenize",
    "/apply-template",
)
_PROXIED = frozenset(PROXIED_PATHS)


class _ClientGone(Exception):
    """The client left before its body arrived."""


class ProxiedEndpoints:
    """Serves `PROXIED_PATHS`; hands every other request (and the lifespan) to `app`."""

    def __init__(self, app: ASGIApp, balancer: Balancer) -> None:
        self.app = app
        self._balancer = balancer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path")
        if scope["type"] != "http" or path not in _PROXIED:
            await self.app(scope, receive, send)
            return
        relay: RelayResponse | None = None
        try:
            if scope["method"] != "POST":
                raise MethodNotAllowed("this endpoint takes POST")
            relay = await self._exchange(scope, receive, path)
            if relay is None:
                return  # the client left before its body arrived: no one to answer
            await relay(scope, receive, send)
        except ProxyError as error:  # refused before anything was admitted
            self._refused(scope, path, error)
            await send_error(send, error)
        except Exception as exc:
            # The exception's type and place only: its message may quote a prompt or a key.
            where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
            location = f" at {where.filename}:{where.lineno}" if where else ""
            log.error("unhandled %s on %s%s", type(exc).__name__, path, location)
            if relay is None or not relay.started:
                internal = ProxyError("internal error in llamacpp-ha")
                self._refused(scope, path, internal)
                await send_error(send, internal)

    def _refused(self, scope: Scope, path: str, error: ProxyError) -> None:
        self._balancer.recorder.answered_early(path, error.status, error.code, state(scope))

    async def _exchange(self, scope: Scope, receive: Receive, path: str) -> RelayResponse | None:
        started_at = time.monotonic()
        balancer = self._balancer
        config = balancer.config
        if not balancer.admitting:
            raise ShuttingDown("llamacpp-ha is shutting down")
        headers = _Headers(scope["headers"])
        content_type = headers.get(b"content-type", "application/json")
        if content_type.split(";")[0].strip().lower() != "application/json":
            raise UnsupportedMediaType("send the body as Content-Type: application/json")
        try:
            body = await _read_body(
                receive,
                headers.get(b"content-length"),
                config.max_body_size,
                config.receive_timeout_s,
            )
        except _ClientGone:
            # Gone before its body arrived: counted, and nothing to answer (nginx logs 499).
            balancer.stats.disconnected += 1
            return None
        payload = parse_json(body)
        if not isinstance(payload, dict):
            raise InvalidRequest("request body must be a JSON object")
        check_body(
            path, payload, max_depth=config.max_json_depth, max_tokens_cap=config.max_tokens_cap
        )
        model = _requested_model(balancer.registry, payload)
        context = state(scope)
        key: ClientKey | None = context.get("client_key")
        pinnable_path = path in PINNABLE_PATHS
        routing = RoutingRequest(
            model=model,
            prompt=prompt_keys(payload),
            prompt_tokens=len(body) // _BYTES_PER_TOKEN,
            max_tokens=_asked_tokens(payload),
            # A client that names a slot itself keeps it: we pin only where we chose.
            pinnable=pinnable_path and "id_slot" not in payload,
            client_slot=_client_slot(payload) if pinnable_path else None,
        )
        proxied = ProxiedRequest(
            method="POST",
            path=path,  # one of ours: the upstream path is never the client's spelling of it
            body=body,
            headers={
                "Content-Type": "application/json",
                "Accept": headers.get(b"accept", "*/*"),
                "X-Request-Id": context["request_id"],
                "X-Forwarded-For": context["forwarded_for"],
            },
            payload=payload,
            routing=routing,
            started_at=started_at,
            client_key=key,
            request_id=context["request_id"],
        )
        # Admitted (the key's limits, the count in flight) by the response itself, inside the
        # try/finally that releases it: nothing here holds anything yet.
        return RelayResponse(Exchange(proxied, balancer))


class _Headers:
    """The first value of a request header, by its lower-case name (as ASGI gives them)."""

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self._raw = raw

    def get(self, name: bytes, default: str | None = None) -> Any:
        for key, value in self._raw:
            if key == name:
                return value.decode("latin-1")
        return default


async def _read_body(
    receive: Receive, declared: str | None, max_size: int, receive_timeout_s: float
) -> bytes:
    if declared is not None and declared.isdigit() and int(declared) > max_size:
        raise PayloadTooLarge(f"request body is larger than {max_size} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        # A slow sender (slowloris) would otherwise hold a connection and its buffers forever.
        async with asyncio.timeout(receive_timeout_s):
            while True:
                message: Message = await receive()
                if message["type"] == "http.disconnect":
                    raise _ClientGone
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > max_size:
                    raise PayloadTooLarge(f"request body is larger than {max_size} bytes")
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
    except TimeoutError:
        raise RequestTimeout(f"request body not received within {receive_timeout_s:g} s") from None
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _client_slot(payload: dict[str, Any]) -> int | None:
    slot = payload.get("id_slot")
    return slot if isinstance(slot, int) and not isinstance(slot, bool) and slot >= 0 else None


def _asked_tokens(payload: dict[str, Any]) -> int:
    """The tokens a request asks to generate (validated already), 0 when it does not say."""
    for name in ("max_tokens", "max_completion_tokens", "n_predict"):
        value = payload.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return 0


def parse_json(body: bytes) -> Any:
    """The body as JSON, strictly: UTF-8 without a byte order mark, no lone surrogate, no number
    beyond a double, no NaN, at most 1,024 levels deep. Anything else is a 400 here rather than
    a surprise later (a string we cannot encode, a body the backend reads another way)."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        # The position, not the text: error messages must not echo a prompt back into logs.
        if "UTF-8" in exc.msg or "byte order mark" in exc.msg:
            raise InvalidRequest(
                "request body is not valid UTF-8 (JSON must be UTF-8, with no byte order mark)"
            ) from None
        if "surrogate" in exc.msg:
            raise InvalidRequest(
                f"request body has an invalid Unicode escape (a lone surrogate) at {exc.pos}"
            ) from None
        raise InvalidRequest(f"request body is not valid JSON ({exc.msg} at {exc.pos})") from None


def _requested_model(registry: Registry, payload: dict[str, Any]) -> str | None:
    """The model to route on; None when any backend will do."""
    model = payload.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidRequest("'model' must be a string")
    if registry.single_model():
        # llama-server ignores the name, so any name is fine; routing on it would only let
        # clients grow per-model state with made-up names.
        return None
    if model is None:
        raise InvalidRequest("'model' is required: the backends serve different models")
    if not registry.knows_model(model):
        raise ModelNotFound("the requested model does not exist")
    return model
