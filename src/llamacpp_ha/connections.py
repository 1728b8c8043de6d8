"""Connections, below routing: what uvicorn's httptools protocol leaves unbounded.

- **Request head size.** httptools hands a header (or the URL) over only once it is complete and
  concatenates its pieces until then, so a client sending one endless header grows the process
  without bound, and quadratically in CPU. Here the bytes of a head still incomplete after a read
  are counted; past `max_header_size` the client gets `431` at once.

Refusals close gently: the answer is written, the write side shut, and what the client still
sends is read and dropped for `LINGER_S` (a lingering close), so that a client still sending its
request reads the answer instead of a connection reset.
"""

from __future__ import annotations

import asyncio
import logging
from asyncio import TimerHandle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from .config import ProxyConfig
from .errors import HeadersTooLarge, ProxyError

log = logging.getLogger("llamacpp_ha.connections")

LINGER_S = 2.0


@dataclass(frozen=True)
class ConnectionLimits:
    # Read for every request head, so that a reload applies it.
    max_header_size: Callable[[], int]


class ConnectionGuard:
    """The client connections one server holds, and the limits they are held to."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        guard = self

        class Protocol(GuardedHttpToolsProtocol):
            _guard = guard

        # What uvicorn's `http=` takes: a protocol class, here bound to this guard.
        self.protocol: type[GuardedHttpToolsProtocol] = Protocol

    @classmethod
    def from_config(
        cls, config: ProxyConfig, max_header_size: Callable[[], int]
    ) -> ConnectionGuard:
        return cls(ConnectionLimits(max_header_size=max_header_size))


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with a bounded request head."""

    _guard: ClassVar[ConnectionGuard]

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._refused = False
        # Between requests and while a head arrives; from on_message_complete to the next
        # on_headers_complete.
        self._in_head = True
        self._head_restarted = False  # the previous request ended within the current read
        self._head_bytes = 0
        self._linger_timer: TimerHandle | None = None

    # Connection ------------------------------------------------------------------------

    def connection_lost(self, exc: Exception | None) -> None:
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # lingering: what the client still sends is read and dropped
        head_at_start = self._in_head
        self._head_restarted = False
        super().data_received(data)
        if self._refused or self.transport.is_closing() or not self._in_head:
            return
        if head_at_start and not self._head_restarted:
            self._head_bytes += len(data)
        # Else the head began within this read, after the end of the previous request: where,
        # httptools does not say. Its bytes count from the next read on.
        limit = self._guard.limits.max_header_size()
        if self._head_bytes > limit:
            self._refuse(HeadersTooLarge(f"request headers exceed {limit} bytes"))

    # Parser callbacks ------------------------------------------------------------------

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True
        self._head_restarted = True
        self._head_bytes = 0

    # Refusals --------------------------------------------------------------------------

    def _refuse(self, error: ProxyError) -> None:
        self._refused = True
        self._unset_keepalive_if_required()
        if self.cycle is not None and not self.cycle.response_complete:
            # A response is still being sent on this connection: no room for another answer.
            self.transport.close()
            return
        peer = f"{self.client[0]}:{self.client[1]}" if self.client else "unknown"
        log.info("connection from %s refused: %d %s", peer, error.status, error.message)
        self.transport.write(_response(error, self.server_state.default_headers))
        if self.transport.can_write_eof():  # not over TLS
            self.transport.write_eof()
        self._linger_timer = self.loop.call_later(LINGER_S, self.transport.close)


def _response(error: ProxyError, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    body = error.body_bytes()
    headers = [
        *default_headers,
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        *((k.lower().encode(), v.encode()) for k, v in error.headers().items()),
    ]
    lines = [
        STATUS_LINE[error.status],
        *(name + b": " + value + b"\r\n" for name, value in headers),
    ]
    return b"".join([*lines, b"\r\n", body])
