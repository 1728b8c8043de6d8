"""`/admin/` endpoints (behind an admin key): the fleet, draining, adding, removing, reload."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from .config import BackendConfig, ConfigError
from .errors import InvalidRequest, NotFound, ProxyError
from .registry import BackendState

if TYPE_CHECKING:
    from .balancer import Balancer

log = logging.getLogger("llamacpp_ha.admin")


class Conflict(ProxyError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


def describe(backend: BackendState) -> dict[str, Any]:
    return {
        "name": backend.name,
        "url": backend.url,
        "state": backend.state,
        "health": backend.health.value,
        "draining": backend.draining,
        "ejected": backend.ejection.ejected,
        "models": list(backend.model_ids),
        "slots_total": backend.slots.total,
        "in_flight": backend.slots.in_flight,
        "last_error": backend.last_error,
    }


def build_admin_router(balancer: Balancer) -> APIRouter:
    router = APIRouter(prefix="/admin")

    def find(name: str) -> BackendState:
        for backend in balancer.registry.backends:
            if backend.name == name:
                return backend
        raise NotFound(f"no backend named {name!r}")

    @router.get("/backends")
    async def list_backends() -> JSONResponse:
        return JSONResponse({"backends": [describe(b) for b in balancer.registry.backends]})

    @router.post("/backends")
    async def add_backend(request: Request) -> JSONResponse:
        try:
            config = BackendConfig.model_validate(await request.json())
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "backend"
            message = first["msg"].removeprefix("Value error, ")
            raise InvalidRequest(f"{field}: {message}") from None
        except ValueError:
            raise InvalidRequest("send a JSON object with 'url' (and 'name', 'api_key')") from None
        try:
            backend = balancer.add_backend(config)
        except ValueError as exc:
            raise Conflict(str(exc)) from None
        log.warning("admin: added backend %s", backend.name)
        return JSONResponse(describe(backend), status_code=201)

    @router.delete("/backends/{name}")
    async def remove_backend(name: str) -> JSONResponse:
        backend = find(name)
        balancer.remove_backend(name)
        log.warning("admin: removing backend %s after it drains", name)
        return JSONResponse(describe(backend), status_code=202)

    @router.post("/backends/{name}/drain")
    async def drain(name: str) -> JSONResponse:
        find(name)
        return JSONResponse(describe(balancer.set_draining(name, True)))

    @router.post("/backends/{name}/undrain")
    async def undrain(name: str) -> JSONResponse:
        find(name)
        return JSONResponse(describe(balancer.set_draining(name, False)))

    @router.post("/reload")
    async def reload() -> JSONResponse:
        try:
            restart_needed = balancer.reload_from_source()
        except ConfigError as exc:
            raise InvalidRequest(f"configuration rejected, the old one stays: {exc}") from None
        return JSONResponse(
            {
                "reloaded": True,
                "backends": [b.name for b in balancer.registry.backends],
                "restart_needed_for": restart_needed,
            }
        )

    return router
