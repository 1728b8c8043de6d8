"""HTTP to backends: the only module that sees aiohttp, or our own connections' faults.

`Transport` owns both clients. `open()`, the proxied requests' hot path, goes over connections
of our own (`backend_connections.py`) and returns an `Upstream`, a type of ours (status,
headers, media type, the body as chunks); `fetch()`, what a poll or a model load needs (its
caller owns the timeout), goes through one aiohttp session. Every aiohttp, socket and
connection exception is translated into our error tree here (by `_translated()` and
`_fault()`), so nothing above this module knows which HTTP client runs underneath (after
httpx's `_transports/default.py`).
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import aiohttp

from .backend_connections import (
    ConnectFailed,
    ConnectTimedOut,
    HttpFault,
    NoAnswer,
    Pool,
    Response,
)
from .errors import BadGateway, GatewayTimeout, UpstreamError


@dataclass(frozen=True)
class Timeouts:
    connect_s: float
    first_byte_s: float
    idle_s: float


class Upstream(Protocol):
    """A backend's answer whose status line and headers have arrived."""

    @property
    def status(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    @property
    def media_type(self) -> str: ...

    async def read(self) -> bytes:
        """The body's next part, whatever has arrived (up to a bound); b"" at its end. Errors
        are `UpstreamError`s."""
        ...

    async def pump(self, sink: Callable[[bytes], bool]) -> bool:
        """The body's parts handed to `sink` as they arrive, without a wake-up of the caller
        for each, until the end (True) or until `sink` returns False (False). Errors as
        `read()`'s; what `sink` raises propagates."""
        ...

    def aclose(self, *, reuse: bool = False) -> None:
        """Idempotent. `reuse` keeps the connection, only once the body was read to its end;
        otherwise it is dropped, so llama-server notices and stops generating."""
        ...


class _translated:  # lower case: it reads as a function, `with _translated(...)`
    """aiohttp's and the socket's exceptions as ours. `phase` is what was under way: "open"
    (until the headers), "stream" (the body) or "poll" (plain words for operators).

    A class, not a generator-based context manager: a stream holds one for as long as it
    flows, and the generator's frame and manager were ~440 bytes of every open stream."""

    __slots__ = ("_backend", "_phase")

    def __init__(self, backend: str, phase: str) -> None:
        self._backend = backend
        self._phase = phase

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        if exc is not None:
            _translate(exc, self._backend, self._phase)


def _translate(exc: BaseException, backend: str, phase: str) -> None:
    """Raise ours for `exc` if it is aiohttp's or the socket's; else return (it propagates)."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        raise GatewayTimeout(f"backend {backend}: connect timed out", unreachable=True) from None
    if not isinstance(exc, aiohttp.ClientError | OSError):
        return
    unreachable = isinstance(exc, aiohttp.ClientConnectorError)
    if phase == "poll":
        words = _in_words(exc)
    elif phase == "stream":
        words = f"stream broken ({type(exc).__name__})"
    elif isinstance(exc, aiohttp.ClientConnectorError):
        words = "connection refused"
    elif isinstance(exc, aiohttp.ServerDisconnectedError):
        words = "closed the connection before answering"
    elif isinstance(exc, aiohttp.ClientResponseError):
        words = f"invalid HTTP response ({exc.message})"
    else:
        words = type(exc).__name__
    raise BadGateway(f"backend {backend}: {words}", unreachable=unreachable) from None


def _in_words(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError):
        return "TLS handshake failed"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "connection refused"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "connection closed without an answer"
    if isinstance(exc, aiohttp.ClientResponseError):
        return "invalid HTTP response"
    if isinstance(exc, aiohttp.ClientOSError):
        return "connection reset"
    return "request failed"


def _fault(fault: HttpFault, backend: str, phase: str) -> UpstreamError:
    """Ours for a fault of our own connections, in the words `_translate` uses for aiohttp's."""
    if isinstance(fault, ConnectTimedOut):
        return GatewayTimeout(f"backend {backend}: {fault}", unreachable=True)
    if isinstance(fault, NoAnswer):
        return GatewayTimeout(f"backend {backend}: {fault}")
    if phase == "stream":
        return BadGateway(f"backend {backend}: stream broken ({fault})")
    return BadGateway(f"backend {backend}: {fault}", unreachable=isinstance(fault, ConnectFailed))


class _PooledUpstream:
    __slots__ = ("_backend", "_response", "headers", "media_type", "status")

    def __init__(self, backend: str, response: Response) -> None:
        self._backend = backend
        self._response = response
        self.status = response.status
        self.headers: Mapping[str, str] = response.headers  # names in lower case
        media_type = response.headers.get("content-type", "application/octet-stream")
        self.media_type = media_type.partition(";")[0].strip().lower()

    async def read(self) -> bytes:
        try:
            return await self._response.read()
        except HttpFault as fault:
            raise _fault(fault, self._backend, "stream") from None

    async def pump(self, sink: Callable[[bytes], bool]) -> bool:
        try:
            return await self._response.pump(sink)
        except HttpFault as fault:
            raise _fault(fault, self._backend, "stream") from None

    def aclose(self, *, reuse: bool = False) -> None:
        self._response.release(reuse=reuse)


class Transport:
    """Our connections for the proxied requests, one aiohttp session for polls and loads."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._pool = Pool()

    async def start(self) -> None:
        # No connection limit: the slot accounting already bounds concurrency per backend,
        # and aiohttp's default of 100 would be a hidden second queue in front of it.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=0),
            timeout=aiohttp.ClientTimeout(total=None),
            # Only the headers the README lists reach a backend (and Host, Content-Length):
            # not aiohttp's own User-Agent or "Accept-Encoding: gzip, deflate".
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
        )

    async def aclose(self) -> None:
        self._pool.close()
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "Transport.start() was not called"
        return self._session

    async def open(
        self,
        backend: str,
        method: str,
        url: str,
        body: bytes,
        headers: Mapping[str, str],
        *,
        tls: ssl.SSLContext | bool,
        timeouts: Timeouts,
    ) -> Upstream:
        """Send the request and wait for the status line and headers."""
        try:
            response = await self._pool.request(
                method,
                url,
                list(headers.items()),
                body,
                tls=tls,
                connect_s=timeouts.connect_s,
                first_byte_s=timeouts.first_byte_s,
            )
        except HttpFault as fault:
            raise _fault(fault, backend, "open") from None
        except ValueError as exc:  # a header that cannot be sent as it is
            raise BadGateway(f"backend {backend}: {exc}") from None
        return _PooledUpstream(backend, response)

    async def fetch(
        self,
        backend: str,
        url: str,
        headers: Mapping[str, str],
        *,
        tls: ssl.SSLContext | bool,
        json_body: bytes | None = None,
    ) -> tuple[int, bytes]:
        """GET `url` (POST `json_body` when given): its status and its whole body (small
        answers only: a poll's, a model load's)."""
        method = "GET" if json_body is None else "POST"
        if json_body is not None:
            headers = {**headers, "Content-Type": "application/json"}
        with _translated(backend, "poll"):
            async with self.session.request(
                method, url, data=json_body, headers=dict(headers), ssl=tls
            ) as response:
                return response.status, await response.read()


def reason(error: UpstreamError) -> str:
    """What went wrong, in words, without the backend's name (for a poll's message)."""
    return error.message.split(": ", 1)[-1]
