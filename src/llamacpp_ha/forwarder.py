"""Sending a request to a backend and relaying its answer; the only module that sees aiohttp.

`Forwarder` opens upstream requests and reads their bodies, translating every aiohttp and
timeout exception into an `UpstreamError` at this one boundary. `RelayResponse` is the ASGI
response that owns one proxied exchange from the queue to the last byte: the slot it claims
is released in its `finally`, on every path (success, backend error, client disconnect,
cancellation, shutdown), and awaited.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import aiohttp
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from .config import ClientKey
from .errors import (
    BadGateway,
    GatewayTimeout,
    NoHealthyBackend,
    ProxyError,
    UpstreamError,
    send_error,
)
from .policies import RoutingRequest
from .registry import BackendState
from .retry import RETRYABLE_STATUSES, RetryBudget, may_retry
from .scheduler import Lease, Scheduler
from .usage import MARKERS, Usage, from_answer, from_sse

log = logging.getLogger("llamacpp_ha.forwarder")

# Not forwarded (RFC 9110 7.6.1: hop-by-hop), plus what the ASGI server sets itself.
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
        "x-accel-buffering",  # set once by us on streams
    }
)
_CHUNK_BYTES = 64 * 1024


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
                    ssl=backend.ssl,
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
        self, backend: BackendState, resp: aiohttp.ClientResponse, *, sse: bool = False
    ) -> AsyncIterator[bytes]:
        """The body as it arrives. Each chunk must come within the idle timeout; for SSE, a
        chunk of `:` comments only (keep-alives) does not count as the backend making progress.
        """
        stream = resp.content.iter_chunked(_CHUNK_BYTES)
        loop = asyncio.get_running_loop()
        idle_deadline = loop.time() + self.timeouts.idle_s
        while True:
            try:
                async with asyncio.timeout_at(idle_deadline):
                    chunk = await anext(stream, b"")
            except TimeoutError:
                raise GatewayTimeout(
                    f"backend {backend.name}: no data for {self.timeouts.idle_s:g} s"
                ) from None
            except (aiohttp.ClientError, OSError) as exc:
                raise BadGateway(
                    f"backend {backend.name}: stream broken ({type(exc).__name__})"
                ) from None
            if not chunk:
                return
            if not sse or _has_data(chunk):
                idle_deadline = loop.time() + self.timeouts.idle_s
            yield chunk

    async def read(self, backend: BackendState, resp: aiohttp.ClientResponse) -> bytes:
        return b"".join([chunk async for chunk in self.chunks(backend, resp)])


def _has_data(chunk: bytes) -> bool:
    return any(line and not line.startswith(b":") for line in chunk.splitlines())


@dataclass
class ExchangeResult:
    """What one proxied request did, for stats, metrics and the access log."""

    endpoint: str = ""
    model: str | None = None
    request_id: str | None = None
    key_id: str | None = None
    backend: str | None = None
    status: int = 0
    queue_wait_s: float = 0.0
    ttfb_s: float | None = None
    total_s: float = 0.0
    attempts: int = 0
    client_disconnected: bool = False
    error: str | None = None
    error_code: str | None = None
    mid_stream: bool = False  # the failure came after the response had started
    usage: Usage = field(default_factory=Usage)


@dataclass(frozen=True)
class ExchangeLimits:
    queue_timeout_s: float
    request_timeout_s: float
    write_timeout_s: float
    max_attempts: int


class ExchangeHooks(Protocol):
    """What an exchange tells the rest of the balancer (implemented by `proxy.Balancer`)."""

    retry_budget: RetryBudget

    def backend_failed(self, backend: BackendState, error: UpstreamError) -> None: ...

    def backend_loading(self, backend: BackendState) -> None: ...

    def upstream_succeeded(self, backend: BackendState, routing: RoutingRequest) -> None: ...

    def exchange_started(self, exchange: RelayResponse) -> None: ...

    def exchange_finished(self, exchange: RelayResponse) -> None: ...


class _ClientTooSlow(Exception):
    pass


class _RetryableAnswer(Exception):
    """The backend answered with a status that another backend may do better than."""

    def __init__(self, error: UpstreamError) -> None:
        self.error = error


class _Upstream:
    """One attempt on one backend: its slot, its response, and what has been read of it."""

    def __init__(self, lease: Lease) -> None:
        self.lease = lease
        self.resp: aiohttp.ClientResponse | None = None
        self.head = b""  # the whole body, or the first chunk of a stream
        self.rest: AsyncIterator[bytes] | None = None

    async def close(self, *, reuse: bool = False) -> None:
        """Idempotent; `reuse` only once the body has been read to its end."""
        if self.resp is not None:
            # close() on anything unfinished drops the connection, so llama-server notices
            # and stops generating; release() keeps a finished one for reuse.
            if reuse:
                self.resp.release()
            else:
                self.resp.close()
        await self.lease.release()


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
        limits: ExchangeLimits,
        hooks: ExchangeHooks,
        started_at: float,
        priority: int = 0,
        client_key: ClientKey | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__()
        self.client_key = client_key
        self._priority = priority
        self._scheduler = scheduler
        self._forwarder = forwarder
        self._routing = routing
        self._method = method
        self._path = path
        self._body = body
        self._request_headers = headers
        self._limits = limits
        self._hooks = hooks
        self._started_at = started_at
        self._deadline = started_at + limits.request_timeout_s
        self._response_started = False
        self._bytes_sent = 0
        self._abort: ProxyError | None = None
        self._aborted = asyncio.Event()
        self.result = ExchangeResult(
            endpoint=path,
            model=routing.model,
            request_id=request_id,
            key_id=client_key.id if client_key is not None else None,
        )

    def abort(self, error: ProxyError) -> None:
        """End the exchange now with `error` (shutdown after its grace period)."""
        self._abort = error
        self._aborted.set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._hooks.exchange_started(self)
        loop = asyncio.get_running_loop()
        relay = loop.create_task(self._relay(send))
        # The client may leave while we queue, wait for the backend, or stream: whichever
        # comes first, leaving cancels the relay, whose finally closes upstream and releases.
        listen = loop.create_task(_wait_for_disconnect(receive))
        aborted = loop.create_task(self._aborted.wait())
        try:
            await asyncio.wait({relay, listen, aborted}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            cut = not relay.done()
            if cut:
                self.result.client_disconnected = listen.done()
                relay.cancel()
            for task in (listen, aborted):
                task.cancel()
            await asyncio.gather(listen, aborted, relay, return_exceptions=True)
            # Only an exchange the abort actually cut is told why; one that had just finished
            # has already sent its last byte.
            if cut and self._abort is not None and not self.result.client_disconnected:
                await self._send_failure(send, self._abort)
            self.result.total_s = time.monotonic() - self._started_at
            self._hooks.exchange_finished(self)
        if not relay.cancelled() and relay.exception() is not None:
            raise relay.exception()  # type: ignore[misc]

    async def _relay(self, send: Send) -> None:
        upstream: _Upstream | None = None
        try:
            async with asyncio.timeout_at(_loop_deadline(self._deadline)):
                upstream = await self._prepare()
                await self._deliver(send, upstream)
        except TimeoutError:
            error = GatewayTimeout(f"request took longer than {self._limits.request_timeout_s:g} s")
            await self._send_failure(send, error)
        except _ClientTooSlow:
            self.result.client_disconnected = True
            self.result.error = "client did not read the response in time"
        except ProxyError as exc:
            if isinstance(exc, UpstreamError) and upstream is not None:
                self._hooks.backend_failed(upstream.lease.backend, exc)
            await self._send_failure(send, exc)
        finally:
            if upstream is not None:
                await upstream.close()

    async def _prepare(self) -> _Upstream:
        """Find a backend that starts a good answer: the retry loop, before any byte is sent."""
        routing = self._routing
        self._hooks.retry_budget.on_request()
        queue_deadline = time.monotonic() + self._limits.queue_timeout_s
        while True:
            self.result.attempts += 1
            lease = await self._scheduler.acquire(
                routing,
                timeout_s=max(0.001, min(queue_deadline, self._deadline) - time.monotonic()),
                retry=self.result.attempts > 1,
                priority=self._priority,
            )
            self.result.queue_wait_s += lease.queue_wait_s
            self.result.backend = lease.backend.name
            upstream = _Upstream(lease)
            try:
                await self._attempt(upstream)
                return upstream
            except _RetryableAnswer as answer:
                failure: UpstreamError = answer.error
                give_up = upstream  # if retrying is not allowed, its answer is the client's
            except BaseException as exc:
                await upstream.close()
                if not isinstance(exc, UpstreamError):
                    raise
                failure, give_up = exc, None
            backend = lease.backend
            if give_up is not None and give_up.resp is not None and give_up.resp.status == 503:
                self._hooks.backend_loading(backend)
            else:
                self._hooks.backend_failed(backend, failure)
            routing = routing.excluding(backend.name)
            retry = may_retry(
                bytes_sent=self._bytes_sent,
                attempts=self.result.attempts,
                max_attempts=self._limits.max_attempts,
                another_backend=self._scheduler.can_serve(routing),
                budget=self._hooks.retry_budget,
            )
            if not retry:
                if give_up is not None:
                    return give_up
                if failure.unreachable and not self._scheduler.can_serve(routing):
                    # Nothing reached any backend and none is left to try: the client may
                    # simply try again later, which is what 503 + Retry-After says.
                    raise NoHealthyBackend(failure.message) from None
                raise failure
            if give_up is not None:
                await give_up.close()
            log.info("retrying on another backend: %s", failure.message)

    async def _attempt(self, upstream: _Upstream) -> None:
        backend = upstream.lease.backend
        resp = upstream.resp = await self._forwarder.open(
            backend, self._method, self._path, self._body, self._request_headers
        )
        if resp.status in RETRYABLE_STATUSES:
            # Read the (small) error body so that, if no retry is allowed, it can be relayed.
            upstream.head = await self._forwarder.read(backend, resp)
            raise _RetryableAnswer(BadGateway(f"backend {backend.name} answered {resp.status}"))
        if resp.content_type == "text/event-stream":
            upstream.rest = self._forwarder.chunks(backend, resp, sse=True)
            upstream.head = await anext(upstream.rest, b"")
            if resp.status == 200 and not _starts_like_sse(upstream.head):
                raise BadGateway(f"backend {backend.name}: the stream is not server-sent events")
        else:
            upstream.head = await self._forwarder.read(backend, resp)
            if resp.status == 200 and resp.content_type == "application/json":
                try:
                    answer = json.loads(upstream.head)
                except ValueError:
                    raise BadGateway(f"backend {backend.name}: invalid JSON") from None
                self.result.usage = from_answer(answer)

    async def _deliver(self, send: Send, upstream: _Upstream) -> None:
        resp = upstream.resp
        assert resp is not None
        self.result.status = resp.status
        headers = _response_headers(resp.headers)
        if upstream.rest is None:
            await self._upstream_complete(upstream)
            headers.append((b"content-length", str(len(upstream.head)).encode()))
            await self._send_start(send, resp.status, headers)
            self.result.ttfb_s = time.monotonic() - self._started_at
            await self._send_body(send, upstream.head, more=False)
            return
        headers.append((b"x-accel-buffering", b"no"))
        await self._send_start(send, resp.status, headers)
        self.result.ttfb_s = time.monotonic() - self._started_at
        await self._send_body(send, upstream.head, more=True)
        counted = previous = upstream.head
        async for chunk in upstream.rest:
            if any(marker in chunk for marker in MARKERS):
                # With the chunk before it, in case the event was split across reads.
                counted = previous + chunk
            previous = chunk
            await self._send_body(send, chunk, more=True)
        self.result.usage = from_sse(counted)
        await self._upstream_complete(upstream)
        await self._send_body(send, b"", more=False)

    async def _upstream_complete(self, upstream: _Upstream) -> None:
        # The backend is done: free its slot and remember the conversation now, before the
        # last bytes reach the client, who may send its next turn the moment they arrive.
        assert upstream.resp is not None
        status, backend = upstream.resp.status, upstream.lease.backend
        await upstream.close(reuse=True)
        if status >= 500 and status not in RETRYABLE_STATUSES:  # those were reported already
            self._hooks.backend_failed(backend, UpstreamError(f"backend {backend.name}: {status}"))
        else:
            self._hooks.upstream_succeeded(backend, self._routing)

    async def _send_start(
        self, send: Send, status: int, headers: list[tuple[bytes, bytes]]
    ) -> None:
        self._response_started = True
        await self._send(
            send, {"type": "http.response.start", "status": status, "headers": headers}
        )

    async def _send_body(self, send: Send, body: bytes, *, more: bool) -> None:
        self._bytes_sent += len(body)
        await self._send(send, {"type": "http.response.body", "body": body, "more_body": more})

    async def _send(self, send: Send, message: Message) -> None:
        # A client that stops reading fills the socket buffer and then blocks this send: it
        # would hold its slot forever, so it is cut after the write timeout.
        try:
            async with asyncio.timeout(self._limits.write_timeout_s):
                await send(message)
        except TimeoutError:
            raise _ClientTooSlow from None
        except OSError:  # the ASGI server reports a gone client this way
            raise _ClientTooSlow from None

    async def _send_failure(self, send: Send, error: ProxyError) -> None:
        self.result.error = error.message
        self.result.error_code = error.code
        try:
            if not self._response_started:
                self.result.status = error.status
                await send_error(send, error)
            else:
                # Headers are gone; the client must still learn the stream did not end well,
                # so it gets an error event and never the final `data: [DONE]`. For stats,
                # metrics and logs the exchange failed, whatever the status line said.
                self.result.status = error.status
                self.result.mid_stream = True
                event = b"data: " + error.body_bytes() + b"\n\n"
                await self._send_body(send, event, more=False)
        except (_ClientTooSlow, OSError):
            self.result.client_disconnected = True


def _response_headers(upstream: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    return [
        (k.lower().encode("latin-1"), v.encode("latin-1"))
        for k, v in upstream.items()
        if k.lower() not in _DROPPED_RESPONSE_HEADERS
    ]


def _starts_like_sse(chunk: bytes) -> bool:
    first_line = chunk.lstrip(b"\r\n").split(b"\n", 1)[0]
    return first_line.startswith((b"data:", b"event:", b":", b"id:", b"retry:"))


def _loop_deadline(monotonic_deadline: float) -> float:
    # asyncio's clock is time.monotonic() on every platform we run on, but say so once here.
    loop = asyncio.get_running_loop()
    return loop.time() + (monotonic_deadline - time.monotonic())


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            return
