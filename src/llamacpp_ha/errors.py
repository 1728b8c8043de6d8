"""Every error a client can receive, as one tree.

    ProxyError                      any error answered with an OpenAI-style JSON body
    ├── InvalidRequest              400 invalid_request_error
    ├── Unauthorized                401 authentication_error
    ├── Forbidden                   403 a client key on an admin endpoint
    ├── NotFound                    404 not_found_error
    │   └── ModelNotFound           404 model_not_found
    ├── RequestTimeout              408 the client sent its body too slowly
    ├── PayloadTooLarge             413 request_too_large
    ├── UnsupportedMediaType        415 unsupported_media_type
    ├── HeadersTooLarge             431 request_headers_too_large
    ├── TooManyRequests             429 + Retry-After: a per-key limit
    ├── NoCapacity                  503 + Retry-After: we cannot serve it now
    │   ├── QueueFull               the queue holds --max-queue requests
    │   ├── QueueTimeout            waited --queue-timeout seconds for a slot
    │   ├── NoHealthyBackend        no backend for this model is ready
    │   ├── ModelLoadFailed         loaded nowhere, and the server asked to load it could not
    │   ├── ShuttingDown            the balancer is draining for shutdown
    │   └── TooManyConnections      --max-connections are open (answered by connections.py)
    └── UpstreamError               the backend failed us
        ├── BadGateway              502 refused, reset, garbage, closed before answering
        └── GatewayTimeout          504 the backend did not answer in time

`transport.py` is the only place that turns aiohttp's exceptions, and our backend connections'
(`backend_connections.py`), into `UpstreamError`s.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import ClassVar

from starlette.types import Send


class ProxyError(Exception):
    """An error that is answered to the client as OpenAI-style JSON."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def body(self) -> dict[str, dict[str, str | int | None]]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code}}

    def body_bytes(self) -> bytes:
        return json.dumps(self.body()).encode()

    def headers(self) -> dict[str, str]:
        return {}


class InvalidRequest(ProxyError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class Unauthorized(ProxyError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class NotFound(ProxyError):
    status = 404
    type = "not_found_error"
    code = "not_found"


class MethodNotAllowed(ProxyError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"

    def headers(self) -> dict[str, str]:
        return {"Allow": "POST"}


class ModelNotFound(NotFound):
    type = "invalid_request_error"
    code = "model_not_found"


class RequestTimeout(ProxyError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class PayloadTooLarge(ProxyError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class UnsupportedMediaType(ProxyError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class HeadersTooLarge(ProxyError):
    status = 431
    type = "invalid_request_error"
    code = "request_headers_too_large"


class Forbidden(ProxyError):
    status = 403
    type = "permission_error"
    code = "admin_key_required"


class TooManyRequests(ProxyError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class NoCapacity(ProxyError):
    status = 503
    type = "server_error"
    code = "no_capacity"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class QueueFull(NoCapacity):
    code = "queue_full"


class QueueTimeout(NoCapacity):
    code = "queue_timeout"


class NoHealthyBackend(NoCapacity):
    code = "no_healthy_backend"


class ModelLoadFailed(NoCapacity):
    """The model was loaded nowhere, and the server asked to load it could not."""

    code = "model_load_failed"


class ShuttingDown(NoCapacity):
    code = "shutting_down"


class TooManyConnections(NoCapacity):
    code = "too_many_connections"


class UpstreamError(ProxyError):
    status = 502
    type = "server_error"
    code = "bad_gateway"

    def __init__(self, message: str, *, unreachable: bool = False) -> None:
        super().__init__(message)
        # True when no connection could be made at all: the backend is down, not just slow.
        self.unreachable = unreachable


class BadGateway(UpstreamError):
    pass


class GatewayTimeout(UpstreamError):
    status = 504
    code = "backend_timeout"


async def send_error(
    send: Send, error: ProxyError, extra_headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    """Answer with `error` on a raw ASGI `send`, for code that runs outside a route."""
    body = error.body_bytes()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers().items()]
    headers += extra_headers
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
