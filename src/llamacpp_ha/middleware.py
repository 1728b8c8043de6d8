"""Pure ASGI middleware: request context, then client and admin authentication.

Pure ASGI rather than Starlette's `BaseHTTPMiddleware`, so a streamed response is never
buffered and a client disconnect still reaches the endpoint.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import re
from collections.abc import Awaitable, Callable, Sequence
from secrets import token_hex
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .config import ClientKey, ProxyConfig
from .errors import Forbidden, HeadersTooLarge, ProxyError, Unauthorized, send_error
from .keyring import Keyring

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def state(scope: Scope) -> dict[str, Any]:
    """Per-request values shared by the middleware and the endpoints (Starlette's request.state)."""
    result: dict[str, Any] = scope.setdefault("state", {})
    return result


class HeaderRules:
    """Whose `X-Forwarded-For` to believe and how large headers may be; `update()` on reload."""

    def __init__(self, config: ProxyConfig) -> None:
        self.trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
        self.max_header_size = 0
        self.update(config)

    def update(self, config: ProxyConfig) -> None:
        self.trusted = tuple(ipaddress.ip_network(n, strict=False) for n in config.trusted_proxies)
        self.max_header_size = config.max_header_size


class RequestContextMiddleware:
    """Gives every request an id (returned as `X-Request-Id`), its client address as
    `X-Forwarded-For` would carry it, and a bound on the size of its headers."""

    def __init__(self, app: ASGIApp, rules: HeaderRules) -> None:
        self.app = app
        # Read on every request, so a reload takes effect at once.
        self._rules = rules

    # Not a coroutine function: it returns the next app's awaitable (or the error's), so that
    # no frame of its own stays suspended, resumed at every event of a stream and held for
    # as long as the stream lasts (~300 bytes each).
    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        if scope["type"] != "http":
            return self.app(scope, receive, send)
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        incoming_id = _header(headers, b"x-request-id")
        request_id = (
            # 128 random bits, as uuid4().hex, without building a UUID object per request.
            incoming_id if incoming_id and _REQUEST_ID.fullmatch(incoming_id) else token_hex(16)
        )
        context = state(scope)
        context["request_id"] = request_id
        context["method"] = scope["method"]
        context["forwarded_for"] = self._forwarded_for(scope, headers)
        id_header = (b"x-request-id", request_id.encode())
        max_size = self._rules.max_header_size
        if sum(len(k) + len(v) for k, v in headers) > max_size:
            error = HeadersTooLarge(f"request headers exceed {max_size} bytes")
            return send_error(send, error, [id_header])

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), id_header]
            await send(message)

        return self.app(scope, receive, send_with_id)

    def _forwarded_for(self, scope: Scope, headers: list[tuple[bytes, bytes]]) -> str:
        peer = scope["client"][0] if scope.get("client") else "unknown"
        claimed = _header(headers, b"x-forwarded-for")
        # A client's own X-Forwarded-For is believed only from a proxy we were told to trust.
        if claimed and self._is_trusted(peer):
            return f"{claimed}, {peer}"
        return str(peer)

    def _is_trusted(self, peer: str) -> bool:
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(address in network for network in self._rules.trusted)


class ApiKeyMiddleware:
    """Client keys for the API, admin keys for `/admin/` (and `/monitor` when so configured).

    A key is recognised by its SHA-256, compared with every configured digest in constant
    time, so neither the keys nor the time taken say which key came close.
    """

    OPEN_PATHS = frozenset({"/health"})
    MONITOR_PATHS = frozenset({"/monitor", "/monitor/data", "/metrics"})

    def __init__(
        self,
        app: ASGIApp,
        keyring: Keyring,
        on_reject: Callable[[str, int, str | None, dict[str, Any]], None],
    ) -> None:
        self.app = app
        # Read on every request, so a reload takes effect at once.
        self._keyring = keyring
        self._on_reject = on_reject

    # Returns the next app's awaitable, as RequestContextMiddleware does.
    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        if scope["type"] != "http":
            return self.app(scope, receive, send)
        path: str = scope["path"]
        try:
            keyring = self._keyring
            if path in self.MONITOR_PATHS and keyring.monitor_requires_admin:
                # A browser opening the page can only send Basic credentials: the admin key as
                # the password (any user name) is accepted here, and here only.
                state(scope)["admin_key"] = self._authenticate_admin(scope, allow_basic=True)
            elif path.startswith("/admin/"):
                state(scope)["admin_key"] = self._authenticate_admin(scope)
            elif path not in self.OPEN_PATHS and path not in self.MONITOR_PATHS and keyring.client:
                state(scope)["client_key"] = self._authenticate(scope, keyring.client)
        except ProxyError as error:
            self._on_reject(path, error.status, error.code, state(scope))
            return send_error(send, error)
        return self.app(scope, receive, send)

    def _authenticate_admin(self, scope: Scope, *, allow_basic: bool = False) -> ClientKey:
        keyring = self._keyring
        if not keyring.admin:
            raise Forbidden("admin endpoints are disabled: no admin key is configured")
        refused = _BasicChallenge if allow_basic else Unauthorized
        try:
            digest = _presented_digest(scope, allow_basic)
        except Unauthorized as error:
            raise refused(error.message) from None
        key = _find(digest, keyring.admin)
        if key is not None:
            return key
        if keyring.client and _find(digest, keyring.client) is not None:
            raise Forbidden("this endpoint needs an admin key")
        raise refused("invalid API key")

    @staticmethod
    def _authenticate(
        scope: Scope, keys: Sequence[ClientKey], *, allow_basic: bool = False
    ) -> ClientKey:
        key = _find(_presented_digest(scope, allow_basic), keys)
        if key is None:
            raise Unauthorized("invalid API key")
        return key


class _BasicChallenge(Unauthorized):
    """Asks a browser for credentials (the admin key as the password)."""

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Basic realm="llamacpp-ha monitor"'}


def _presented_digest(scope: Scope, allow_basic: bool = False) -> bytes:
    presented = [v for k, v in scope["headers"] if k in (b"authorization", b"x-api-key")]
    if not presented:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    if len(presented) > 1:
        raise Unauthorized("send exactly one Authorization or x-api-key header")
    value = presented[0]
    if _header(scope["headers"], b"authorization") is not None:
        scheme, _, token = value.partition(b" ")
        if allow_basic and scheme.lower() == b"basic":
            try:
                _, _, password = base64.b64decode(token.strip(), validate=True).partition(b":")
            except ValueError:
                raise Unauthorized("malformed Basic credentials") from None
            return hashlib.sha256(password).digest()
        if scheme.lower() != b"bearer" or not token.strip():
            raise Unauthorized("malformed Authorization header: expected 'Bearer <key>'")
        value = token.strip()
    return hashlib.sha256(value).digest()


def _find(digest: bytes, keys: Sequence[ClientKey]) -> ClientKey | None:
    found = None
    for key in keys:  # every key, always: the time taken must not depend on which matched
        if hmac.compare_digest(digest, key.digest):
            found = key
    return found


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None
