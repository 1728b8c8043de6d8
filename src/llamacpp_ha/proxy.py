"""`create_app()`: wires the components into a FastAPI app and owns their lifecycle."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .config import ProxyConfig
from .ejection import EjectionPolicy
from .errors import (
    InvalidRequest,
    ModelNotFound,
    NotFound,
    PayloadTooLarge,
    ProxyError,
    RequestTimeout,
    ShuttingDown,
    UpstreamError,
)
from .forwarder import ExchangeLimits, Forwarder, RelayResponse, Timeouts
from .middleware import ApiKeyMiddleware
from .monitor import ProxyStats, build_router, snapshot
from .policies import RoutingRequest, build_policy
from .queue import RequestQueue
from .registry import BackendState, Health, Registry
from .retry import RetryBudget
from .scheduler import Scheduler
from .session_store import SessionStore, prefix_keys

log = logging.getLogger("llamacpp_ha")

# Everything of a backend that a client may reach. Not /slots (it holds other users'
# prompts and takes actions), not POST /props, not /metrics.
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
_FORWARDED_REQUEST_HEADERS = ("content-type", "accept")


class Balancer:
    """Every component of one app, started in order by the lifespan and closed in reverse."""

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.stats = ProxyStats()
        self.queue = RequestQueue()
        self.sessions = SessionStore(config.session_ttl_s, config.max_sessions)
        self.registry = Registry(
            config.backends,
            config.poll_interval_s,
            on_change=self.queue.wakeup.set,
            ejection=EjectionPolicy(
                failures_to_eject=config.eject_after_failures,
                base_s=config.eject_base_s,
                max_s=config.eject_max_s,
                good_polls=config.readmit_after_polls,
                max_fraction=config.max_ejected_fraction,
            ),
        )
        self.scheduler = Scheduler(
            self.queue,
            self.registry,
            build_policy(config.routing),
            self.sessions,
            max_queue=config.max_queue,
        )
        self.forwarder = Forwarder(
            Timeouts(
                connect_s=config.connect_timeout_s,
                first_byte_s=config.first_byte_timeout_s,
                idle_s=config.idle_timeout_s,
            )
        )
        self.limits = ExchangeLimits(
            queue_timeout_s=config.queue_timeout_s,
            request_timeout_s=config.request_timeout_s,
            write_timeout_s=config.write_timeout_s,
            max_attempts=config.max_attempts,
        )
        self.retry_budget = RetryBudget(ratio=config.retry_budget_ratio)
        self.exchanges: set[RelayResponse] = set()
        self.admitting = True
        self._idle = asyncio.Event()
        self._idle.set()
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        # No connection limit: the slot accounting already bounds concurrency per backend,
        # and aiohttp's default of 100 would be a hidden second queue in front of it.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=0),
            timeout=aiohttp.ClientTimeout(total=None),
            skip_auto_headers=("User-Agent",),
        )
        self.forwarder.start(self._session)
        self.registry.start(self._session)
        self.scheduler.start()

    async def aclose(self) -> None:
        await self.scheduler.aclose()
        await self.registry.aclose()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def drain(self, grace_s: float) -> None:
        """Shutdown: stop admitting, fail the queue, let exchanges finish, then cut them."""
        self.admitting = False
        rejected = self.scheduler.reject_all(ShuttingDown("llamacpp-ha is shutting down"))
        log.warning(
            "shutting down: %d queued requests answered 503, %d in flight get %g s to finish",
            rejected,
            len(self.exchanges),
            grace_s,
        )
        try:
            await asyncio.wait_for(self._idle.wait(), grace_s)
        except TimeoutError:
            log.warning("shutting down: cutting %d requests still in flight", len(self.exchanges))
            for exchange in list(self.exchanges):
                exchange.abort(ShuttingDown("llamacpp-ha shut down before the response ended"))
            await self._idle.wait()

    # ExchangeHooks ---------------------------------------------------------------------

    def backend_failed(self, backend: BackendState, error: UpstreamError) -> None:
        if error.unreachable:
            self.registry.report_unreachable(backend, error.message)
        else:
            self.registry.report_failure(backend, error.message)

    def backend_loading(self, backend: BackendState) -> None:
        self.registry.report_loading(backend)

    def upstream_succeeded(self, backend: BackendState, routing: RoutingRequest) -> None:
        self.registry.report_success(backend)
        self.sessions.record(routing.prefix_keys, backend.name)

    def exchange_started(self, exchange: RelayResponse) -> None:
        self.exchanges.add(exchange)
        self._idle.clear()

    def exchange_finished(self, exchange: RelayResponse) -> None:
        self.exchanges.discard(exchange)
        if not self.exchanges:
            self._idle.set()
        result = exchange.result
        self.stats.in_flight -= 1
        self.stats.record(
            backend=result.backend,
            status=result.status,
            disconnected=result.client_disconnected,
            attempts=result.attempts,
            queue_wait_s=result.queue_wait_s,
            ttfb_s=result.ttfb_s,
            total_s=result.total_s,
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
    )
    app.state.balancer = balancer
    app.add_middleware(ApiKeyMiddleware, keys=config.api_keys)
    _add_error_handlers(app, balancer.stats)
    app.include_router(
        build_router(
            balancer.stats,
            lambda: snapshot(balancer.stats, balancer.registry, balancer.queue),
        )
    )

    async def proxy(request: Request) -> Response:
        started_at = time.monotonic()
        if not balancer.admitting:
            raise ShuttingDown("llamacpp-ha is shutting down")
        try:
            payload, body = await _read_json_object(
                request, config.max_body_size, config.receive_timeout_s
            )
        except ClientDisconnect:
            # Gone before its body arrived: no one to answer (499 is nginx's name for it).
            balancer.stats.disconnected += 1
            return Response(status_code=499)
        model = _requested_model(balancer.registry, payload)
        routing = RoutingRequest(model=model, prefix_keys=prefix_keys(payload))
        balancer.stats.in_flight += 1
        return RelayResponse(
            scheduler=balancer.scheduler,
            forwarder=balancer.forwarder,
            routing=routing,
            method="POST",
            path=request.url.path,
            body=body,
            headers={
                name: request.headers[name]
                for name in _FORWARDED_REQUEST_HEADERS
                if name in request.headers
            },
            limits=balancer.limits,
            hooks=balancer,
            started_at=started_at,
        )

    for path in PROXIED_PATHS:
        app.add_api_route(path, proxy, methods=["POST"], include_in_schema=False)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": balancer.registry.model_list()})

    @app.get("/health")
    async def health() -> JSONResponse:
        ready = sum(1 for b in balancer.registry.backends if b.health is Health.READY)
        if ready:
            return JSONResponse({"status": "ok", "backends_ready": ready})
        return JSONResponse(
            {"error": {"message": "no backend is ready", "type": "server_error", "code": 503}},
            status_code=503,
        )

    return app


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
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidRequest("request body is nested too deeply") from None
    if not isinstance(payload, dict):
        raise InvalidRequest("request body must be a JSON object")
    return payload, body


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
        raise ModelNotFound(f"the model {model!r} does not exist")
    return model


def _add_error_handlers(app: FastAPI, stats: ProxyStats) -> None:
    def as_response(error: ProxyError) -> JSONResponse:
        stats.count_answered_early(error.status)
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers())

    async def proxy_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ProxyError)
        return as_response(exc)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 404:
            return as_response(NotFound(f"no such endpoint: {request.url.path}"))
        error = ProxyError(str(exc.detail))
        stats.count_answered_early(exc.status_code)
        return JSONResponse(
            {"error": {"message": str(exc.detail), "type": "invalid_request_error", "code": None}},
            status_code=exc.status_code,
            headers=dict(exc.headers or {}) | error.headers(),
        )

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return as_response(ProxyError("internal error in llamacpp-ha"))

    app.add_exception_handler(ProxyError, proxy_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
