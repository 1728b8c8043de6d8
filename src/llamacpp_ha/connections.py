"""Connections, below routing: what uvicorn's httptools protocol leaves unbounded.

- **Request head size.** httptools hands a header (or the URL) over only once it is complete and
  concatenates its pieces until then, so a client sending one endless header grows the process
  without bound, and quadratically in CPU. Here the bytes of a head still incomplete after a read
  are counted; past `max_header_size` the client gets `431` at once.
- **Request head time.** The whole head must arrive within `header_timeout_s` of its first byte
  (slowloris), else `408`. The same clock runs on what a client still sends of a request body
  after its answer has been sent.
- **Idle connections.** A connection with no request in progress is closed after
  `keepalive_timeout_s` of silence. uvicorn arms that timer only after a response, so a
  connection that never sent a byte used to stay open for ever.
- **Open connections.** At most `max_connections`; one more is answered `503` + `Retry-After`
  and closed, so that file descriptors run out neither for clients nor for the backends'
  connections. uvicorn's `limit_concurrency` does not do this: it looks only when a request
  head is complete (an idle or trickling connection is never refused), counts connections and
  request tasks alike, and refuses requests on connections already open too.

- **The client leaving.** A request's scope carries `ON_DISCONNECT` in its `extensions`: a
  function that registers one callback for the connection's loss, so that a relay learns of it
  without a task parked in `receive()` for each open stream (~1.2 KiB of each).
- **A streamed body's chunks, written at once.** The scope also carries `WRITE_CHUNK`: a
  function that writes one chunk of a chunked response to the connection, as uvicorn's `send`
  would, without the ASGI message, the middlewares' `send` wrappers and uvicorn's coroutine
  around each (a relayed token is mostly that). It writes only when `send` would write at once;
  otherwise (a client that does not keep up, one gone, a response not chunked) it returns False
  and the chunk goes through `send`, which waits or drops it as ASGI says. Only middlewares that
  leave the body alone may sit between the two: ours only add headers.

Refusals close gently: the answer is written, the write side shut, and what the client still
sends is read and dropped for `LINGER_S` (a lingering close), so that a client still sending its
request reads the answer instead of a connection reset.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys
from asyncio import TimerHandle
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)
from uvicorn.server import ServerState

from .config import ProxyConfig
from .errors import (
    HeadersTooLarge,
    InvalidRequest,
    ProxyError,
    RequestTimeout,
    TooManyConnections,
)

log = logging.getLogger("llamacpp_ha.connections")

LINGER_S = 2.0
# Refused connections (beyond max_connections) that may linger at once; more are closed at once.
MAX_LINGERING = 64
# Descriptors kept for everything but client connections: backend connections (one per busy
# slot, plus the polls), the listening sockets, lingering refusals, logs.
RESERVED_FDS = 256
# The scope extension (ASGI `scope["extensions"]`) by which a request is told that its
# connection is gone: `scope["extensions"][ON_DISCONNECT](callback)`, `(None)` to stop.
ON_DISCONNECT = "llamacpp_ha.on_disconnect"
# The scope extension that writes a chunk of a streamed body directly:
# `scope["extensions"][WRITE_CHUNK](body)` is True once written, False if `send` must take it.
WRITE_CHUNK = "llamacpp_ha.write_chunk"


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int
    header_timeout_s: float
    keepalive_timeout_s: float
    # Read for every request head, so that a reload applies it.
    max_header_size: Callable[[], int]


class ConnectionGuard:
    """The client connections one server holds, and the limits they are held to."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.open = 0  # admitted connections, until they close
        self.lingering = 0  # refused connections, until they close
        self._refusing = False
        guard = self

        class Protocol(GuardedHttpToolsProtocol):
            _guard = guard

        # What uvicorn's `http=` takes: a protocol class, here bound to this guard.
        self.protocol: type[GuardedHttpToolsProtocol] = Protocol

    @classmethod
    def from_config(
        cls, config: ProxyConfig, max_header_size: Callable[[], int]
    ) -> ConnectionGuard:
        return cls(
            ConnectionLimits(
                max_connections=config.max_connections,
                header_timeout_s=config.header_timeout_s,
                keepalive_timeout_s=config.keepalive_timeout_s,
                max_header_size=max_header_size,
            )
        )

    def fit_open_files(self, open_files: int | None) -> None:
        """Keep `max_connections` within what `open_files` descriptors allow (None: no limit).

        Beyond it, accept() would fail with EMFILE, and connecting to the backends too.
        """
        if open_files is None:
            return
        room = connection_room(open_files)
        if room < self.limits.max_connections:
            log.warning(
                "max_connections %d does not fit in %d open files: at most %d client "
                "connections (raise the hard limit, e.g. LimitNOFILE= or ulimit -Hn)",
                self.limits.max_connections,
                open_files,
                room,
            )
            self.limits = dataclasses.replace(self.limits, max_connections=room)

    def admit(self) -> bool:
        if self.open >= self.limits.max_connections:
            if not self._refusing:
                self._refusing = True
                log.warning(
                    "max_connections (%d) reached: new connections get 503 until some close",
                    self.limits.max_connections,
                )
            return False
        self.open += 1
        return True

    def release(self) -> None:
        self.open -= 1
        # Below 90 % again: the next time the limit is reached is worth another line.
        if self._refusing and self.open < 0.9 * self.limits.max_connections:
            self._refusing = False


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with a bounded request head and bounded connections."""

    _guard: ClassVar[ConnectionGuard]
    # Ours in slots, not in the instance's dict: added to uvicorn's own attributes they grew
    # every connection's dict by 1.5 KiB (measured with tracemalloc, 400 streams open).
    __slots__ = (
        "_admitted",
        "_head_bytes",
        "_head_restarted",
        "_head_timer",
        "_header_timeout_s",
        "_in_head",
        "_linger_timer",
        "_lingering",
        "_message_begun",
        "_on_lost",
        "_refused",
    )

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        limits = self._guard.limits
        # uvicorn's own idle timer, armed after each response; uvicorn types it int, call_later
        # takes any number of seconds.
        self.timeout_keep_alive = limits.keepalive_timeout_s  # type: ignore[assignment]
        self._header_timeout_s = limits.header_timeout_s
        self._admitted = False
        self._lingering = False
        self._refused = False
        # Between requests and while a head arrives; from on_message_complete to the next
        # on_headers_complete.
        self._in_head = True
        self._head_restarted = False  # the previous request ended within the current read
        self._message_begun = False  # the head's first byte past any blank lines
        self._head_bytes = 0
        self._head_timer: TimerHandle | None = None
        self._linger_timer: TimerHandle | None = None
        self._on_lost: Callable[[], object] | None = None

    # Connection ------------------------------------------------------------------------

    def connection_made(  # type: ignore[override]
        self, transport: asyncio.Transport
    ) -> None:
        super().connection_made(transport)
        if not self._guard.admit():
            linger = self._guard.lingering < MAX_LINGERING
            if linger:
                self._lingering = True
                self._guard.lingering += 1
            self._refuse(TooManyConnections("too many open connections; retry later"), linger)
            return
        self._admitted = True
        # uvicorn arms its idle timer only after a response.
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._leave_guard()
        self._cancel_timers()
        super().connection_lost(exc)
        on_lost, self._on_lost = self._on_lost, None
        if on_lost is not None:
            on_lost()

    def _watch_loss(self, callback: Callable[[], object] | None) -> None:
        """`ON_DISCONNECT`: `callback` runs once when the connection is lost (soon, if it is
        already); None unregisters."""
        self._on_lost = callback
        if callback is not None and self.parser is None:  # connection_lost() has run
            self._on_lost = None
            self.loop.call_soon(callback)

    def handle_websocket_upgrade(self) -> None:
        # The connection leaves this protocol (and the count) for uvicorn's WebSocket one.
        self._leave_guard()
        self._cancel_timers()
        super().handle_websocket_upgrade()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # lingering: what the client still sends is read and dropped
        head_at_start = self._in_head
        self._head_restarted = False
        super().data_received(data)
        if self._refused or self.transport.is_closing():
            return
        whole_read_in_head = head_at_start and not self._head_restarted
        if not self._in_head:
            if self._answered_before_its_end():
                self._start_head_timer()
            return
        if not (whole_read_in_head or self._message_begun):
            return  # the read ended the previous request, and nothing more came
        self._start_head_timer()
        if whole_read_in_head:
            self._head_bytes += len(data)
        # Else the head began within this read, after the end of the previous request: where,
        # httptools does not say. Its bytes count from the next read on.
        limit = self._guard.limits.max_header_size()
        if self._head_bytes > limit:
            self._refuse(HeadersTooLarge(f"request headers exceed {limit} bytes"))

    # Parser callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._message_begun = True

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._cancel_head_timer()
        # Before the request's task is created (in uvicorn's on_headers_complete) and so
        # before the app sees its scope. ASGI's types want each extension's value a dict of
        # settings; ours is read only by relay.py, and a function spares a dict per request.
        extensions = self.scope.setdefault("extensions", {})
        extensions[ON_DISCONNECT] = self._watch_loss  # type: ignore[assignment]
        scope = self.scope
        super().on_headers_complete()
        # The request's own cycle, created just now (the task that runs the app has not run
        # yet). Not looked up at each write: with a pipelined request behind this one,
        # `self.cycle` is already the next request's.
        cycle = self.cycle
        if cycle is not None and cycle.scope is scope:  # not an upgrade to a WebSocket
            extensions[WRITE_CHUNK] = partial(_write_chunk, cycle)  # type: ignore[assignment]

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True
        self._head_restarted = True
        self._message_begun = False
        self._head_bytes = 0
        self._cancel_head_timer()
        if self._answered_before_its_end() and not self.transport.is_closing():
            # The rest of an answered request's body has arrived: the connection is idle from
            # now, and the bytes of that body have cancelled uvicorn's idle timer.
            self._unset_keepalive_if_required()
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

    # Refusals --------------------------------------------------------------------------

    def send_400_response(self, msg: str) -> None:
        # What the HTTP parser refuses gets an OpenAI-style body too, not uvicorn's plain text.
        del msg  # uvicorn's words, not ours
        self._refuse(InvalidRequest("the request is not valid HTTP/1.1"), linger=False)

    def _answered_before_its_end(self) -> bool:
        """A request whose answer is sent while its body still arrives."""
        return self.cycle is not None and self.cycle.response_complete

    def _too_slow(self) -> None:
        self._head_timer = None
        if self._in_head:
            self._refuse(
                RequestTimeout(f"request headers not received within {self._header_timeout_s:g} s")
            )
        else:
            self.transport.close()  # the rest of a body whose request was answered

    def _refuse(self, error: ProxyError, linger: bool = True) -> None:
        self._refused = True
        self._cancel_timers()
        if self.cycle is not None and not self.cycle.response_complete:
            # A response is still being sent on this connection: no room for another answer.
            self.transport.close()
            return
        if self._admitted:
            peer = f"{self.client[0]}:{self.client[1]}" if self.client else "unknown"
            log.info("connection from %s refused: %d %s", peer, error.status, error.message)
        self.transport.write(_response(error, self.server_state.default_headers))
        if not linger:
            self.transport.close()
            return
        if self.transport.can_write_eof():  # not over TLS
            self.transport.write_eof()
        self._linger_timer = self.loop.call_later(LINGER_S, self.transport.close)

    def _leave_guard(self) -> None:
        if self._admitted:
            self._admitted = False
            self._guard.release()
        if self._lingering:
            self._lingering = False
            self._guard.lingering -= 1

    def _start_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self._header_timeout_s, self._too_slow)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _cancel_timers(self) -> None:
        self._cancel_head_timer()
        self._unset_keepalive_if_required()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None


def _write_chunk(cycle: RequestResponseCycle, body: bytes) -> bool:
    """`WRITE_CHUNK`: what uvicorn's `send` does with a body chunk of a chunked response that is
    neither the last nor held back, with the same checks first (0.55, `httptools_impl.py`)."""
    if (
        not cycle.chunked_encoding  # not started, not chunked (Content-Length), or a HEAD
        or cycle.response_complete
        or cycle.disconnected
        or cycle.flow.write_paused  # send() waits for the client, within our write timeout
    ):
        return False
    if body:  # an empty chunk would end the body
        cycle.transport.write(b"%x\r\n%b\r\n" % (len(body), body))
    return True


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


def raise_open_file_limit() -> int | None:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; return the soft limit in force.

    None where there is no such limit (Windows). Never raises: a limit that cannot be raised
    is logged and kept.
    """
    if sys.platform == "win32":
        return None
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:  # macOS refuses RLIM_INFINITY, for one
            log.warning("open files: cannot raise the soft limit %d to %d: %s", soft, hard, exc)
    log.info("open files: soft limit %d, hard limit %d", soft, hard)
    return None if soft == resource.RLIM_INFINITY else soft


def connection_room(open_file_limit: int) -> int:
    """Client connections that fit in `open_file_limit` descriptors, with some kept back."""
    return max(1, open_file_limit - min(RESERVED_FDS, open_file_limit // 2))
