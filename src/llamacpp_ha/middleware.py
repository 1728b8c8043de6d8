"""Client authentication: `Authorization: Bearer KEY` (or Anthropic's `x-api-key: KEY`)."""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import Unauthorized
from .forwarder import send_error

EXEMPT_PATHS = frozenset({"/monitor", "/monitor/data", "/health"})


class ApiKeyMiddleware:
    """Rejects requests without a configured key with 401; a pure ASGI middleware, so it
    never buffers a streamed response or hides a client disconnect from the endpoint."""

    def __init__(self, app: ASGIApp, keys: Iterable[str]) -> None:
        self.app = app
        self._keys = [key.encode() for key in keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._keys or scope["path"] in EXEMPT_PATHS:
            await self.app(scope, receive, send)
            return
        error = self._check(scope)
        if error is not None:
            await send_error(send, error)
            return
        await self.app(scope, receive, send)

    def _check(self, scope: Scope) -> Unauthorized | None:
        presented = [
            value for name, value in scope["headers"] if name in (b"authorization", b"x-api-key")
        ]
        if not presented:
            return Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        if len(presented) > 1:
            return Unauthorized("send exactly one Authorization or x-api-key header")
        value = presented[0]
        scheme, _, token = value.partition(b" ")
        if scheme.lower() == b"bearer":
            value = token.strip()
        elif dict(scope["headers"]).get(b"authorization") is not None:
            return Unauthorized("malformed Authorization header: expected 'Bearer <key>'")
        if not self._matches(value):
            return Unauthorized("invalid API key")
        return None

    def _matches(self, presented: bytes) -> bool:
        # Compare against every key, always, so the time taken says nothing about which
        # key (or which prefix) came close.
        found = False
        for key in self._keys:
            found |= hmac.compare_digest(presented, key)
        return found
