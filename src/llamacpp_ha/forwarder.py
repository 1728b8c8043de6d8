"""Sending a request to a backend and relaying its answer; the only module that sees aiohttp.

`Forwarder` opens upstream requests and reads their bodies, translating every aiohttp and
timeout exception into an `UpstreamError` at this one boundary. `RelayResponse` is the ASGI
response that owns one proxied exchange from the queue to the last byte: the slot it claims
is released in its `finally`, on every path (success, backend error, client disconnect,
cancellation), and awaited.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Protocol

import aiohttp
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from .errors import BadGateway, GatewayTimeout, ProxyError, UpstreamError
from .policies import RoutingRequest
from .registry import BackendState
from .scheduler import Lease, Scheduler

log = logging.getLogger("llamacpp_ha.forwarder")

# Not forwarded in either direction (RFC 9110 7.6.1), plus what we set ourselves.
_DROPPED_RESPONSE_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "date",
        "server",
        "access-control-allow-origin",
    }
)
_CHUNK_BYTES = 64 * 1024
MAX_ATTEMPTS = 3


@dataclass(frozen=True)
class Timeouts:
    connect_s: float
    first_byte_s: float
    idle_s: float


class Forwarder:
    """Opens requests to backends over one shared aiohttp session."""

    def __init__(self, timeouts: Timeouts) -> None:
        self.timeouts = timeouts
        self._session: aiohttp.ClientSession | None = None

    def start(self, session: aiohttp.ClientSession) -> None:
        self._session = session

    async def open(
        self,
        backend: BackendState,
        method: str,
        path: str,
        body: bytes,
        headers: Mapping[str, str],
    ) -> aiohttp.ClientResponse:
        """Send the request and wait for the status line and headers."""
        assert self._session is not None, "Forwarder.start() was not called"
        outbound = dict(headers)
        if backend.config.api_key:
            outbound["Authorization"] = f"Bearer {backend.config.api_key}"
        name = backend.name
        try:
            async with asyncio.timeout(self.timeouts.first_byte_s):
                return await self._session.request(
                    method,
                    backend.url + path,
                    data=body,
                    headers=outbound,
                    timeout=aiohttp.ClientTimeout(
                        total=None, sock_connect=self.timeouts.connect_s, sock_read=None
                    ),
                    auto_decompress=False,
                )
        except aiohttp.ConnectionTimeoutError:
            raise GatewayTimeout(f"backend {name}: connect timed out", unreachable=True) from None
        except TimeoutError:
            raise GatewayTimeout(
                f"backend {name}: no answer within {self.timeouts.first_byte_s:g} s"
            ) from None
        except aiohttp.ClientConnectorError:
            raise BadGateway(f"backend {name}: connection refused", unreachable=True) from None
        except aiohttp.ServerDisconnectedError:
            raise BadGateway(f"backend {name}: closed the connection before answering") from None
        except aiohttp.ClientResponseError as exc:
            raise BadGateway(f"backend {name}: invalid HTTP response ({exc.message})") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise BadGateway(f"backend {name}: {type(exc).__name__}") from None

    async def chunks(
        self, backend: BackendState, resp: aiohttp.ClientResponse
    ) -> AsyncIterator[bytes]:
        """The body as it arrives; each chunk must come within the idle timeout."""
        stream = resp.content.iter_chunked(_CHUNK_BYTES)
        while True:
            try:
                async with asyncio.timeout(self.timeouts.idle_s):
                    chunk = await anext(stream, b"")
            except TimeoutError:
                raise GatewayTimeout(
                    f"backend {backend.name}: stream idle for {self.timeouts.idle_s:g} s"
                ) from None
            except (aiohttp.ClientError, OSError) as exc:
                raise BadGateway(
                    f"backend {backend.name}: stream broken ({type(exc).__name__})"
                ) from None
            if not chunk:
                return
            yield chunk

    async def read(self, backend: BackendState, resp: aiohttp.ClientResponse) -> bytes:
        return b"".join([chunk async for chunk in self.chunks(backend, resp)])


def may_retry(error: UpstreamError, attempt: int, bytes_sent: int) -> bool:
    """The one retry rule: another backend only while nothing has reached the client."""
    return bytes_sent == 0 and attempt < MAX_ATTEMPTS


@dataclass
class ExchangeResult:
    """What one proxied request did, for stats and logs."""

    backend: str | None = None
    status: int = 0
    queue_wait_s: float = 0.0
    ttfb_s: float | None = None
    total_s: float = 0.0
    attempts: int = 0
    client_disconnected: bool = False
    error: str | None = None


class ExchangeHooks(Protocol):
    """What an exchange tells the rest of the balancer (implemented by `proxy.Balancer`)."""

    def backend_unreachable(self, backend: BackendState, reason: str) -> None: ...

    def upstream_succeeded(self, backend: BackendState, routing: RoutingRequest) -> None: ...

    def exchange_finished(self, result: ExchangeResult) -> None: ...


class RelayResponse(Response):
    """Queue, send upstream (retrying before the first byte), relay, and release the slot."""

    def __init__(
        self,
        *,
        scheduler: Scheduler,
        forwarder: Forwarder,
        routing: RoutingRequest,
        method: str,
        path: str,
        body: bytes,
        headers: Mapping[str, str],
        queue_timeout_s: float,
        hooks: ExchangeHooks,
        started_at: float,
    ) -> None:
        super().__init__()
        self._scheduler = scheduler
        self._forwarder = forwarder
        self._routing = routing
        self._method = method
        self._path = path
        self._body = body
        self._request_headers = headers
        self._queue_timeout_s = queue_timeout_s
        self._hooks = hooks
        self._started_at = started_at
        self.result = ExchangeResult()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        relay = loop.create_task(self._relay(send))
        # The client may leave while we queue, wait for the backend, or stream: whichever
        # comes first, leaving cancels the relay, whose finally closes upstream and releases.
        listen = loop.create_task(_wait_for_disconnect(receive))
        try:
            await asyncio.wait({relay, listen}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not relay.done():
                self.result.client_disconnected = True
                relay.cancel()
            listen.cancel()
            await asyncio.gather(listen, return_exceptions=True)
            await asyncio.gather(relay, return_exceptions=True)
            self.result.total_s = time.monotonic() - self._started_at
            self._hooks.exchange_finished(self.result)
        if not relay.cancelled() and relay.exception() is not None:
            raise relay.exception()  # type: ignore[misc]

    async def _connect(self) -> tuple[Lease, aiohttp.ClientResponse]:
        routing = self._routing
        deadline = time.monotonic() + self._queue_timeout_s
        while True:
            self.result.attempts += 1
            lease = await self._scheduler.acquire(
                routing,
                timeout_s=max(0.001, deadline - time.monotonic()),
                retry=self.result.attempts > 1,
            )
            self.result.queue_wait_s += lease.queue_wait_s
            self.result.backend = lease.backend.name
            try:
                resp = await self._forwarder.open(
                    lease.backend, self._method, self._path, self._body, self._request_headers
                )
            except BaseException as exc:
                await lease.release()
                if not isinstance(exc, UpstreamError):
                    raise
                if exc.unreachable:
                    self._hooks.backend_unreachable(lease.backend, exc.message)
                if not may_retry(exc, self.result.attempts, bytes_sent=0):
                    raise
                log.info("retrying on another backend: %s", exc.message)
                routing = routing.excluding(lease.backend.name)
                continue
            return lease, resp

    async def _relay(self, send: Send) -> None:
        lease: Lease | None = None
        resp: aiohttp.ClientResponse | None = None
        started = False
        try:
            lease, resp = await self._connect()
            backend = lease.backend
            self.result.status = resp.status
            headers = _response_headers(resp.headers)
            if resp.content_type == "text/event-stream":
                headers.append((b"x-accel-buffering", b"no"))
                await send(
                    {"type": "http.response.start", "status": resp.status, "headers": headers}
                )
                started = True
                async for chunk in self._forwarder.chunks(backend, resp):
                    if self.result.ttfb_s is None:
                        self.result.ttfb_s = time.monotonic() - self._started_at
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await self._upstream_complete(lease, resp)
                await send({"type": "http.response.body", "body": b""})
            else:
                body = await self._forwarder.read(backend, resp)
                await self._upstream_complete(lease, resp)
                headers.append((b"content-length", str(len(body)).encode()))
                await send(
                    {"type": "http.response.start", "status": resp.status, "headers": headers}
                )
                started = True
                self.result.ttfb_s = time.monotonic() - self._started_at
                await send({"type": "http.response.body", "body": body})
        except ProxyError as exc:
            self.result.error = exc.message
            if not started:
                self.result.status = exc.status
                await send_error(send, exc)
            else:
                # Headers are gone; the client must still learn the stream did not end well,
                # so it gets an error event and never the final `data: [DONE]`.
                event = b"data: " + exc.body_bytes() + b"\n\n"
                await send({"type": "http.response.body", "body": event, "more_body": False})
        finally:
            if resp is not None:
                # close(), not release(): an unfinished response's connection must be dropped
                # so llama-server stops generating and frees its slot.
                resp.close()
            if lease is not None:
                await lease.release()

    async def _upstream_complete(self, lease: Lease, resp: aiohttp.ClientResponse) -> None:
        # The backend is done: free its slot and remember the conversation now, before the
        # last bytes reach the client, who may send its next turn the moment they arrive.
        resp.release()
        await lease.release()
        if resp.status == 200:
            self._hooks.upstream_succeeded(lease.backend, self._routing)


async def send_error(send: Send, error: ProxyError) -> None:
    body = error.body_bytes()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers().items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _response_headers(upstream: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    return [
        (k.lower().encode("latin-1"), v.encode("latin-1"))
        for k, v in upstream.items()
        if k.lower() not in _DROPPED_RESPONSE_HEADERS
    ]


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            return
