"""`create_app()`: wires the components into a FastAPI app, with its routes and lifespan."""

from __future__ import annotations

import logging
import traceback
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from .admin import build_admin_router
from .balancer import Balancer
from .config import ProxyConfig
from .errors import (
    NotFound,
    ProxyError,
)
from .middleware import ApiKeyMiddleware, RequestContextMiddleware, state
from .monitor import build_router, snapshot
from .proxied import PROXIED_PATHS, ProxiedEndpoints
from .registry import BackendState, Health

log = logging.getLogger("llamacpp_ha")


def create_app(config: ProxyConfig) -> FastAPI:
    balancer = Balancer(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await balancer.start()
        try:
            yield
        finally:
            await balancer.aclose()

    app = _App(
        balancer,
        title="llamacpp-ha",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        redirect_slashes=False,  # every path is exactly one of ours or 404
    )
    app.state.balancer = balancer
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

    balancer.recorder.endpoints = frozenset(PROXIED_PATHS) | {
        getattr(route, "path", "") for route in app.routes
    }

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


class _App(FastAPI):
    """FastAPI with our own ASGI in front: a request passes its context (id, client address),
    then CORS, then authentication; the proxied endpoints are then served by
    `ProxiedEndpoints`, everything else by FastAPI's routes."""

    def __init__(self, balancer: Balancer, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._balancer = balancer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)  # the lifespan, as FastAPI runs it
            return
        # Starlette's own dispatch: FastAPI's asks OpenTelemetry on every request whether to
        # trace it (an environment and a tracer lookup); we do not trace the hot path.
        scope["app"] = self
        if self.middleware_stack is None:
            self.middleware_stack = self.build_middleware_stack()
        await self.middleware_stack(scope, receive, send)

    def build_middleware_stack(self) -> ASGIApp:
        balancer, config = self._balancer, self._balancer.config
        app: ASGIApp = ProxiedEndpoints(super().build_middleware_stack(), balancer)
        app = ApiKeyMiddleware(
            app, keyring=balancer.keyring, on_reject=balancer.recorder.answered_early
        )
        if config.cors_origins:
            app = CORSMiddleware(
                app,
                allow_origins=config.cors_origins,
                allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "Content-Type", "X-Request-Id", "x-api-key"],
                expose_headers=["X-Request-Id", "Retry-After"],
            )
        return RequestContextMiddleware(app, rules=balancer.header_rules)


def _can_load(backend: BackendState) -> bool:
    return backend.router is not None and backend.health is Health.READY and not backend.draining


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
