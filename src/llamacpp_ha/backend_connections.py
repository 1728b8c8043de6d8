"""HTTP/1.1 connections to backends for the proxied requests: a protocol of our own, pooled.

The proxied requests are the hot path, and aiohttp's client was a fifth of a request's CPU
here (its URL objects, header multidicts, tracing hooks and timers; then a `StreamReader` in
front of every body part). Here a connection is an asyncio protocol that feeds what arrives
to httptools' response parser (llhttp, the C parser uvicorn uses for our own side) and hands
each body part to the one reader waiting for it (`read()`), or, while a reader `pump()`s, to
its callback at once, so that a relayed stream wakes no task per chunk. Polls and model
loads are not hot and keep aiohttp (`transport.py`).

What it owns: connecting (within the connect timeout, over TLS when asked); writing a request;
reading the answer's status line, headers and body (`Content-Length`, chunked, or up to the
close); back-pressure (a reader that falls behind pauses the socket); and idle connections kept
for the next request to the same address, dropped when the backend closes them or after
`IDLE_S`, below the 5 s after which llama-server (cpp-httplib) closes them itself, so a request
is never written to a connection the backend is closing. What goes wrong is an `HttpFault`;
`transport.py` words it as ours.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import urlsplit

import httptools

# A backend's idle connection is reused for this long, then closed.
IDLE_S = 4.0
# A reader this far behind pauses the socket, so that a slow client's stream holds no more.
_HIGH_WATER = 64 * 1024


class HttpFault(Exception):
    """What went wrong, in plain words (`str()`), without the backend's name."""


class ConnectFailed(HttpFault):
    """Refused, unreachable, or the TLS handshake failed."""


class ConnectTimedOut(HttpFault):
    pass


class NoAnswer(HttpFault):
    """No status line and headers within the first-byte timeout."""


class ClosedEarly(HttpFault):
    """The backend closed the connection before the answer's headers."""


class BadResponse(HttpFault):
    """What the backend sent is not HTTP/1.1."""


class BodyBroken(HttpFault):
    """The connection failed, or was closed, before the body's end."""


class _Address:
    """Where one backend URL's requests go, and the first line and Host header they carry."""

    __slots__ = ("host", "key", "port", "request_line", "tls")

    def __init__(self, url: str, tls: ssl.SSLContext | bool) -> None:
        parts = urlsplit(url)
        secure = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if secure else 80)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.request_line = f" {target} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        self.tls: ssl.SSLContext | None = _context(tls) if secure else None
        self.key = (self.host, self.port, self.tls)


@functools.lru_cache(maxsize=4096)  # backends x endpoints: a request's URL is one of few
def _address(url: str, tls: ssl.SSLContext | bool) -> _Address:
    return _Address(url, tls)


@functools.cache
def _default_context(verify: bool) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _context(tls: ssl.SSLContext | bool) -> ssl.SSLContext:
    # What aiohttp's `ssl=` means (config.py): True verifies, False does not, or a context.
    return tls if isinstance(tls, ssl.SSLContext) else _default_context(tls)


class Response:
    """One answer whose headers have arrived: status, headers, and the body to `read()`."""

    __slots__ = ("_connection", "headers", "status")

    def __init__(self, connection: _Connection) -> None:
        self._connection: _Connection | None = connection
        self.status = connection.status
        self.headers = connection.headers

    async def read(self) -> bytes:
        """What has arrived of the body since the last read (waiting for some); b"" at its end."""
        if self._connection is None:
            raise BodyBroken("the response was closed")
        return await self._connection.read()

    async def pump(self, sink: Callable[[bytes], bool]) -> bool:
        """Hand the body to `sink` part by part as it arrives, from the connection's own
        callback, without waking the caller, until the body's end (True) or `sink` returns
        False (False: it took that part, and wants the caller to act before more comes).
        What `sink` raises, and the faults `read()` would raise, are raised here."""
        if self._connection is None:
            raise BodyBroken("the response was closed")
        return await self._connection.pump(sink)

    def release(self, *, reuse: bool = False) -> None:
        """Idempotent. `reuse` keeps the connection for another request, only once the body
        was read to its end; otherwise it is closed, so the backend stops its work."""
        if self._connection is not None:
            connection, self._connection = self._connection, None
            connection.done(reuse=reuse)


class Pool:
    """Idle connections per address, most recently used first."""

    def __init__(self, idle_s: float = IDLE_S) -> None:
        self._idle_s = idle_s
        self._idle: dict[Any, deque[_Connection]] = {}
        self._closed = False

    async def request(
        self,
        method: str,
        url: str,
        head: list[tuple[str, str]],
        body: bytes,
        *,
        tls: ssl.SSLContext | bool,
        connect_s: float,
        first_byte_s: float,
    ) -> Response:
        """Send the request (over an idle connection to the address if one is left) and wait
        for the answer's headers, all within `first_byte_s`, connecting within `connect_s`."""
        started = time.monotonic()
        address = _address(url, tls)
        connection = self._take(address.key, started)
        if connection is None:
            connection = await self._connect(address, connect_s, first_byte_s)
        try:
            connection.send(_request_head(method, address, head, len(body)), body)
            await connection.headers_arrived(started + first_byte_s, first_byte_s)
        except BaseException:
            connection.close()
            raise
        return Response(connection)

    def close(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            while idle:
                idle.pop().close()
        self._idle.clear()

    def _take(self, key: Any, now: float) -> _Connection | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        while idle and now - idle[-1].idle_since >= self._idle_s:
            idle.pop().close()  # the oldest, at the end: no timer needed to retire them
        while idle:
            connection = idle.popleft()
            if connection.open:  # not one whose end is under way
                return connection
        return None

    def _put(self, connection: _Connection) -> None:
        if self._closed:
            connection.close()
            return
        self._idle.setdefault(connection.key, deque()).appendleft(connection)

    def _forget(self, connection: _Connection) -> None:
        idle = self._idle.get(connection.key)
        if idle is not None and connection in idle:
            idle.remove(connection)

    async def _connect(
        self, address: _Address, connect_s: float, first_byte_s: float
    ) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(min(connect_s, first_byte_s)):
                _, connection = await loop.create_connection(
                    lambda: _Connection(self, address.key),
                    address.host,
                    address.port,
                    ssl=address.tls,
                    server_hostname=address.host if address.tls is not None else None,
                )
        except TimeoutError:
            if first_byte_s < connect_s:
                raise NoAnswer(f"no answer within {first_byte_s:g} s") from None
            raise ConnectTimedOut("connect timed out") from None
        except ssl.SSLError:
            raise ConnectFailed("TLS handshake failed") from None
        except OSError:
            raise ConnectFailed("connection refused") from None
        return connection


def _request_head(method: str, address: _Address, head: list[tuple[str, str]], size: int) -> bytes:
    lines = [method, address.request_line]
    for name, value in head:
        # What reaches here came through our own request parser or the configuration; a line
        # break would still split one header into two (request smuggling), so it is refused.
        if "\n" in value or "\r" in value or "\n" in name or "\r" in name:
            raise ValueError(f"header {name!r} holds a line break")
        lines.append(f"{name}: {value}\r\n")
    lines.append(f"Content-Length: {size}\r\n\r\n")
    return "".join(lines).encode("latin-1")


class _Connection(asyncio.Protocol):
    """One connection: the parser's callbacks fill the current answer; one reader waits."""

    def __init__(self, pool: Pool, key: Any) -> None:
        self._pool = pool
        self.key = key
        self._transport: asyncio.Transport | None = None
        # Kept: every asyncio.get_running_loop() is a getpid() system call before Python 3.12.
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[None] | None = None
        self._sink: Callable[[bytes], bool] | None = None  # while pump() waits
        self._sink_stopped = False  # the sink returned False
        self._sink_error: BaseException | None = None  # or raised this
        self.idle_since = 0.0
        self._active = False  # a request was sent and its answer is not done with
        self._paused = False
        self._new_answer()

    def _new_answer(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self._informational = False
        self._has_headers = False
        self._until_close = False  # no length and not chunked: the body ends with the connection
        self._body: list[bytes] = []
        self._buffered = 0
        self._complete = False
        self._keep_alive = False
        self._fault: HttpFault | None = None

    # The request's side ------------------------------------------------------------------

    @property
    def open(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    def send(self, head: bytes, body: bytes) -> None:
        assert not self._active, "a connection carries one request at a time"
        if self._transport is None:
            raise ClosedEarly("closed the connection before answering")
        self._active = True
        if len(body) <= _HIGH_WATER:
            self._transport.write(head + body)  # one segment for a small request
        else:
            self._transport.write(head)
            self._transport.write(body)

    async def headers_arrived(self, deadline: float, first_byte_s: float) -> None:
        """Wait for the answer's headers until `deadline` (time.monotonic()'s)."""
        # A timer of the connection's own, not an asyncio.timeout: a third of the cost.
        timer = self._loop.call_later(deadline - time.monotonic(), self._no_answer, first_byte_s)
        try:
            while not self._has_headers:
                if self._fault is not None:
                    raise self._fault
                await self._wait()
        finally:
            timer.cancel()

    def _no_answer(self, first_byte_s: float) -> None:
        if not self._has_headers and self._fault is None:
            self._fault = NoAnswer(f"no answer within {first_byte_s:g} s")
            self._wake()

    async def read(self) -> bytes:
        while not self._body:
            if self._fault is not None:
                raise self._fault
            if self._complete:
                return b""
            await self._wait()
        return self._take_body()

    async def pump(self, sink: Callable[[bytes], bool]) -> bool:
        while True:
            if self._body:
                if not sink(self._take_body()):
                    return False
                continue
            if self._fault is not None:
                raise self._fault
            if self._complete:
                return True
            self._sink = sink
            try:
                await self._wait()
            finally:
                self._sink = None
            if self._sink_error is not None:
                error, self._sink_error = self._sink_error, None
                raise error
            if self._sink_stopped:
                self._sink_stopped = False
                return False

    def _take_body(self) -> bytes:
        body = self._body
        data = body[0] if len(body) == 1 else b"".join(body)
        body.clear()
        self._buffered = 0
        if self._paused and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()
        return data

    def done(self, *, reuse: bool) -> None:
        if (
            reuse
            and self._complete
            and self._keep_alive
            and self._fault is None
            and not self._body
            and self.open
        ):
            self._active = False
            self._new_answer()
            self.idle_since = time.monotonic()
            self._pool._put(self)
        else:
            self.close()

    def close(self) -> None:
        if self._fault is None and not self._complete:
            self._fault = BodyBroken("the response was closed")
        self._wake()
        self._active = True  # never to be reused
        if self._transport is not None:
            self._transport.close()

    async def _wait(self) -> None:
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # asyncio's side ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport's subclasses, but have its methods.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self._active:  # nothing was asked: a backend that talks out of turn
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._failed(BadResponse("invalid HTTP response (an upgrade)"))
        except httptools.HttpParserError as exc:
            self._failed(BadResponse(f"invalid HTTP response ({exc})"))

    def eof_received(self) -> bool | None:
        return None  # close: a backend's half-closed connection is of no further use

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if not self._active:
            self._pool._forget(self)  # idle: the backend closed it
            return
        if self._fault is None and not self._complete:
            if self._has_headers and self._until_close:
                self._complete = True
            elif not self._has_headers:
                self._fault = ClosedEarly("closed the connection before answering")
            else:
                self._fault = BodyBroken(type(exc).__name__ if exc else "closed mid-body")
        self._wake()

    def _failed(self, fault: HttpFault) -> None:
        self._fault = fault
        self._wake()
        self._active = True
        if self._transport is not None:
            self._transport.close()

    # httptools' callbacks ----------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        key, text = name.decode("latin-1").lower(), value.decode("latin-1")
        seen = self.headers.get(key)
        self.headers[key] = text if seen is None else f"{seen}, {text}"

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:  # 100 Continue and the like: the answer is still to come
            self._informational = True
            self.headers = {}
            return
        self.status = status
        self._keep_alive = self._parser.should_keep_alive()
        self._until_close = (
            "content-length" not in self.headers
            and "chunked" not in self.headers.get("transfer-encoding", "").lower()
            and status not in (204, 304)
        )
        self._has_headers = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        sink = self._sink
        if sink is not None and not self._body:
            # pump(): the part goes on at once, and the reader sleeps on.
            try:
                if sink(body):
                    return
                self._sink_stopped = True
            except BaseException as exc:  # the reader's to raise, not the event loop's
                self._sink_error = exc
            self._sink = None
            self._wake()
            return
        self._body.append(body)
        self._buffered += len(body)
        if self._buffered >= _HIGH_WATER and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        self._complete = True
        self._wake()
