"""`RelayResponse`: the ASGI side of one exchange.

It admits the exchange and releases it in one `try/finally`, on every path (success, backend
error, client disconnect, cancellation, shutdown), awaited. In between it sends what the
exchange gives it: the status and headers, then the body: a stream's events written to the
client's connection as the backend's connection delivers them (`EventStream.pump`), and through
ASGI's `send`, within the write timeout, whenever the client is behind; it watches for the
client leaving and for an abort (shutdown after its grace period).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from starlette.types import Message, Receive, Scope, Send

from .connections import ON_DISCONNECT, WRITE_CHUNK
from .errors import GatewayTimeout, ProxyError, UpstreamError, send_error
from .exchange import Answer, Exchange

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


_WRITE = "write"  # the client's taking of a chunk, in the exchange's watchdog
_DEADLINE = "deadline"  # the whole request's, in the exchange's watchdog

_CLIENT_LEFT = "client left"
_ABORTED = "aborted"


class _ClientTooSlow(Exception):
    pass


class RelayResponse:
    """Admit, find an answer, relay it, release: an ASGI app for one request."""

    # A plain slotted class, not a Starlette Response: nothing here is a Response's, and its
    # instance dict and headers were ~0.5 KiB of every open stream.
    __slots__ = (
        "_abort",
        "_cut",
        "_response_started",
        "_task",
        "_write_chunk",
        "_write_timeout_s",
        "exchange",
    )

    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange
        self._write_timeout_s = exchange.limits.write_timeout_s
        self._response_started = False
        self._abort: ProxyError | None = None
        self._task: asyncio.Task[None] | None = None  # the task that relays and sends
        # Why the relay was cut short, once it was: _CLIENT_LEFT or _ABORTED.
        self._cut: str | None = None
        # Our server's direct write of a streamed chunk (connections.py); None under another.
        self._write_chunk: Callable[[bytes], bool] | None = None

    @property
    def started(self) -> bool:
        """Whether the response's status line has been sent."""
        return self._response_started

    def abort(self, error: ProxyError) -> None:
        """End the exchange now with `error` (shutdown after its grace period)."""
        self._abort = error
        self._cut_short(_ABORTED)

    def _cut_short(self, why: str) -> None:
        # The relay runs in the ASGI task itself, not in a task of its own waited on beside the
        # listener and the abort: that task and the wait over three futures were ~2.3 KiB of
        # every open stream. So a cut cancels this task, and the cancellation is told apart
        # from one that comes from outside by `_cut`.
        if self._task is not None and self._cut is None:
            self._cut = why
            self._task.cancel()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        exchange, result = self.exchange, self.exchange.result
        try:
            await exchange.admit(on_abort=self.abort)
        except ProxyError as refused:  # a key over its limits: nothing was taken
            exchange.refused(refused)
            with contextlib.suppress(OSError):  # the client may be gone already
                await send_error(send, refused)
            return
        task = asyncio.current_task()
        assert task is not None
        # The client may leave while we queue, wait for the backend, or stream: leaving cuts
        # the relay, whose finally closes upstream. Our server says so by a callback
        # (connections.py); under another ASGI server a task waits for http.disconnect.
        extensions: dict[str, Any] = scope.get("extensions") or {}
        watch = extensions.get(ON_DISCONNECT)
        self._write_chunk = extensions.get(WRITE_CHUNK)
        listen: asyncio.Task[None] | None = None
        if watch is not None:
            watch(self._client_gone)
        else:
            listen = asyncio.get_running_loop().create_task(_wait_for_disconnect(receive))
            listen.add_done_callback(self._client_left)
        try:
            # Set before the first await since admit() put the exchange where an abort finds
            # it, so no abort goes unseen.
            self._task = task
            try:
                await self._relay(send)
            except asyncio.CancelledError:
                if self._cut is None:
                    raise  # from outside: the server's own shutdown
                task.uncancel()
            finally:
                self._task = None  # no cut from here on
                if listen is not None:
                    listen.remove_done_callback(self._client_left)
                    listen.cancel()
                elif watch is not None:
                    watch(None)
            if self._cut is not None:
                result.client_disconnected = self._cut == _CLIENT_LEFT
                # Only an exchange the abort actually cut is told why; one that had just
                # finished has already sent its last byte.
                if self._cut == _ABORTED and self._abort is not None:
                    self._task = task  # what a stuck send cancels
                    await self._send_failure(send, self._abort)
        finally:
            await exchange.release()
            # What refers back to us (the abort hook, the sending task) let go, so that the
            # exchange's objects are freed when it ends rather than by the cyclic collector.
            exchange.forget()
            self._task = None

    def _client_left(self, listen: asyncio.Task[None]) -> None:
        if not listen.cancelled():
            self._cut_short(_CLIENT_LEFT)

    def _client_gone(self) -> None:
        self._cut_short(_CLIENT_LEFT)

    async def _relay(self, send: Send) -> None:
        exchange, watchdog = self.exchange, self.exchange.watchdog
        task = self._task
        assert task is not None
        # The whole request's deadline is one more in the exchange's watchdog, not an
        # asyncio.timeout of its own (a timer handle and a context manager per request).
        watchdog.start(_DEADLINE, _loop_deadline(exchange.deadline), task.cancel)
        try:
            answer = await exchange.first_good_answer()
            await self._deliver(send, answer)
        except asyncio.CancelledError:
            if watchdog.expired != _DEADLINE or self._cut is not None:
                raise
            watchdog.expired = None
            task.uncancel()
            timeout_s = exchange.limits.request_timeout_s
            await self._send_failure(
                send, GatewayTimeout(f"request took longer than {timeout_s:g} s")
            )
        except _ClientTooSlow:
            exchange.result.client_disconnected = True
            exchange.result.error = "client did not read the response in time"
        except ProxyError as exc:
            exchange.failed(exc)
            await self._send_failure(send, exc)
        finally:
            watchdog.stop(_DEADLINE)
            await exchange.close_answer()

    async def _deliver(self, send: Send, answer: Answer) -> None:
        exchange, result = self.exchange, self.exchange.result
        result.status = answer.status
        headers = _response_headers(answer.upstream.headers)
        if answer.rest is None:
            await exchange.upstream_complete(answer)
            headers.append((b"content-length", str(len(answer.head)).encode()))
            await self._send_start(send, answer.status, headers)
            result.ttfb_s = time.monotonic() - exchange.request.started_at
            await self._send_body(send, answer.head, more=False)
            return
        headers.append((b"x-accel-buffering", b"no"))
        await self._send_start(send, answer.status, headers)
        result.ttfb_s = time.monotonic() - exchange.request.started_at
        # What the client has received (read by the exchange as it frames the events), so that
        # a backend dying mid-stream can be replaced by another that continues from there
        # (resume.py), unseen by the client.
        transcript = exchange.transcript if answer.status == 200 else None
        head, rewrite = answer.head, None
        # Each chunk written to the connection at once where it can be (nearly always), as it
        # arrives from the backend; through ASGI's send, within the write timeout, where the
        # client is behind (or under another ASGI server).
        write = self._write_chunk or _never
        while True:
            try:
                if not write(head):
                    await self._send_body(send, head, more=True)
                # The rest in whole events; once the backend is done, its slot is free.
                assert answer.rest is not None
                while (behind := await answer.rest.pump(write, rewrite)) is not None:
                    await self._send_body(send, behind, more=True)
                break
            except UpstreamError as broken:
                resumed = None
                if transcript is not None:
                    resumed = await exchange.resume(transcript, broken)
                if resumed is None:
                    raise
                assert transcript is not None
                answer, rewrite = resumed, transcript.rewrite
                head = transcript.rewrite(resumed.head)
        await self._send_body(send, b"", more=False)

    async def _send_start(
        self, send: Send, status: int, headers: list[tuple[bytes, bytes]]
    ) -> None:
        self._response_started = True
        await self._send(
            send, {"type": "http.response.start", "status": status, "headers": headers}
        )

    def _send_body(self, send: Send, body: bytes, *, more: bool) -> Awaitable[None]:
        # _send's coroutine itself, not one more wrapped around it for every chunk.
        return self._send(send, {"type": "http.response.body", "body": body, "more_body": more})

    async def _send(self, send: Send, message: Message) -> None:
        # A client that stops reading fills the socket buffer and then blocks this send: it
        # would hold its slot forever, so it is cut after the write timeout (the exchange's
        # watchdog cancels the send; nearly every send returns at once).
        watchdog, task = self.exchange.watchdog, self._task
        assert task is not None
        watchdog.start(_WRITE, watchdog.now() + self._write_timeout_s, task.cancel)
        try:
            await send(message)
        except asyncio.CancelledError:
            if watchdog.expired != _WRITE:
                raise
            watchdog.expired = None
            task.uncancel()
            raise _ClientTooSlow from None
        except OSError:  # the ASGI server reports a gone client this way
            raise _ClientTooSlow from None
        finally:
            watchdog.stop(_WRITE)

    async def _send_failure(self, send: Send, error: ProxyError) -> None:
        result = self.exchange.result
        result.error = error.message
        result.error_code = error.code
        result.status = error.status
        try:
            if not self._response_started:
                await send_error(send, error)
            else:
                # Headers are gone; the client must still learn the stream did not end well,
                # so it gets an error event and never the final `data: [DONE]`. For stats,
                # metrics and logs the exchange failed, whatever the status line said.
                result.mid_stream = True
                event = b"data: " + error.body_bytes() + b"\n\n"
                await self._send_body(send, event, more=False)
        except (_ClientTooSlow, OSError):
            result.client_disconnected = True


def _never(body: bytes) -> bool:
    return False


def _response_headers(upstream: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    return [
        (k.lower().encode("latin-1"), v.encode("latin-1"))
        for k, v in upstream.items()
        if k.lower() not in _DROPPED_RESPONSE_HEADERS
    ]


def _loop_deadline(monotonic_deadline: float) -> float:
    # asyncio's clock is time.monotonic() on every platform we run on, but say so once here.
    loop = asyncio.get_running_loop()
    return loop.time() + (monotonic_deadline - time.monotonic())


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            return
