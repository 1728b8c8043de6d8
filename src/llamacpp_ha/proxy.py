"""`create_app()`: wires the components into a FastAPI app, with its routes and lifespan."""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect

from .admin import build_admin_router
from .balancer import Balancer
from .config import ClientKey, ProxyConfig
from .errors import (
    InvalidRequest,
    ModelNotFound,
    NotFound,
    PayloadTooLarge,
    ProxyError,
    RequestTimeout,
    ShuttingDown,
    UnsupportedMediaType,
)
from .exchange import Exchange, ProxiedRequest
from .middleware import ApiKeyMiddleware, RequestContextMiddleware, state
from .monitor import build_router, snapshot
from .pinning import PINNABLE_PATHS
from .policies import RoutingRequest
from .prefix_index import prompt_keys
from .registry import BackendState, Health, Registry
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


def create_app(config: ProxyConfig) -> FastAPI:
    balancer = Balancer(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await balancer.start()
        try:
            yield
        finally:
            await balancer.aclose()

    app = FastAPI(
        title="llamacpp-ha",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        redirect_slashes=False,  # every path is exactly one of ours or 404
    )
    app.state.balancer = balancer
    # Added innermost first: a request passes context, then CORS, then auth.
    app.add_middleware(
        ApiKeyMiddleware, keyring=balancer.keyring, on_reject=balancer.recorder.answered_early
    )
    if config.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=config.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-Id", "x-api-key"],
            expose_headers=["X-Request-Id", "Retry-After"],
        )
    app.add_middleware(RequestContextMiddleware, rules=balancer.header_rules)
    _add_error_handlers(app, balancer)
    app.include_router(
        build_router(
            balancer.stats,
            lambda: snapshot(
                balancer.stats,
                balancer.registry,
                balancer.queue,
                balancer.scheduler.stats,
                balancer.feedback,
                balancer.replicas,
            ),
            balancer.metrics.registry,
        )
    )
    app.include_router(build_admin_router(balancer))

    for path in PROXIED_PATHS:
        app.add_api_route(
            path, _proxy_endpoint(balancer, path), methods=["POST"], include_in_schema=False
        )

    balancer.recorder.endpoints = frozenset(getattr(route, "path", "") for route in app.routes)

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        return Response(status_code=204)  # browsers on /monitor ask; not a client error

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": balancer.registry.model_list()})

    @app.get("/health")
    async def health() -> JSONResponse:
        # Ready means able to take a request now or once a slot frees (or a model loads, on a
        # router-mode server): a backend that is up but reports no slots, is ejected or is
        # draining cannot.
        ready = sum(1 for b in balancer.registry.backends if b.routable or _can_load(b))
        if ready:
            return JSONResponse({"status": "ok", "backends_ready": ready})
        message = "no backend can take a request"
        return JSONResponse(
            {"error": {"message": message, "type": "server_error", "code": 503}},
            status_code=503,
        )

    balancer.recorder.endpoints |= {"/v1/models", "/health"}
    return app


def _can_load(backend: BackendState) -> bool:
    return backend.router is not None and backend.health is Health.READY and not backend.draining


def _proxy_endpoint(balancer: Balancer, path: str) -> Any:
    # The upstream path is this route's own constant, never the client's spelling of it.
    async def proxy(request: Request) -> Response:
        started_at = time.monotonic()
        config = balancer.config
        if not balancer.admitting:
            raise ShuttingDown("llamacpp-ha is shutting down")
        content_type = request.headers.get("content-type", "application/json")
        if content_type.split(";")[0].strip().lower() != "application/json":
            raise UnsupportedMediaType("send the body as Content-Type: application/json")
        try:
            payload, body = await _read_json_object(
                request, config.max_body_size, config.receive_timeout_s
            )
        except ClientDisconnect:
            # Gone before its body arrived: no one to answer (499 is nginx's name for it).
            balancer.stats.disconnected += 1
            return Response(status_code=499)
        check_body(
            path, payload, max_depth=config.max_json_depth, max_tokens_cap=config.max_tokens_cap
        )
        model = _requested_model(balancer.registry, payload)
        context = state(request.scope)
        key: ClientKey | None = context.get("client_key")
        routing = RoutingRequest(
            model=model,
            prompt=prompt_keys(payload),
            prompt_tokens=len(body) // _BYTES_PER_TOKEN,
            max_tokens=_asked_tokens(payload),
            # A client that names a slot itself keeps it: we pin only where we chose.
            pinnable=path in PINNABLE_PATHS and "id_slot" not in payload,
            client_slot=_client_slot(payload) if path in PINNABLE_PATHS else None,
        )
        proxied = ProxiedRequest(
            method="POST",
            path=path,
            body=body,
            headers={
                "Content-Type": "application/json",
                "Accept": request.headers.get("accept", "*/*"),
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

    return proxy


def _client_slot(payload: dict[str, Any]) -> int | None:
    slot = payload.get("id_slot")
    return slot if isinstance(slot, int) and not isinstance(slot, bool) and slot >= 0 else None


async def _read_json_object(
    request: Request, max_size: int, receive_timeout_s: float
) -> tuple[dict[str, Any], bytes]:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_size:
        raise PayloadTooLarge(f"request body is larger than {max_size} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        # A slow sender (slowloris) would otherwise hold a connection and its buffers forever.
        async with asyncio.timeout(receive_timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_size:
                    raise PayloadTooLarge(f"request body is larger than {max_size} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout(f"request body not received within {receive_timeout_s:g} s") from None
    body = b"".join(chunks)
    payload = parse_json(body)
    if not isinstance(payload, dict):
        raise InvalidRequest("request body must be a JSON object")
    return payload, body


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


def _add_error_handlers(app: FastAPI, balancer: Balancer) -> None:
    def as_response(request: Request, error: ProxyError) -> JSONResponse:
        balancer.recorder.answered_early(
            request.url.path, error.status, error.code, state(request.scope)
        )
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers())

    async def proxy_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ProxyError)
        return as_response(request, exc)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 404:
            return as_response(request, NotFound("no such endpoint"))
        balancer.recorder.answered_early("other", exc.status_code, None, state(request.scope))
        return JSONResponse(
            {"error": {"message": str(exc.detail), "type": "invalid_request_error", "code": None}},
            status_code=exc.status_code,
            headers=dict(exc.headers or {}),
        )

    async def unexpected(request: Request, exc: Exception) -> Response:
        # The exception's type only: its message or a traceback may quote a prompt or a key.
        where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
        location = f" at {where.filename}:{where.lineno}" if where else ""
        log.error("unhandled %s on %s%s", type(exc).__name__, request.url.path, location)
        return as_response(request, ProxyError("internal error in llamacpp-ha"))

    app.add_exception_handler(ProxyError, proxy_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
