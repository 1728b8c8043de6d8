"""One proxied request, from admission to release: what it holds and how it finds its answer.

An `Exchange` is admitted (the key's concurrency, the count of requests in flight) and released
(the slot and the upstream connection too) by the one `try/finally` of `RelayResponse`, which
owns the ASGI side; nothing between admission and that block can raise. In between, it queues
for a slot, opens the request upstream through the transport, retrying on another backend as
the one rule in `attempts.py` allows, and reads the answer's head: the whole body of a JSON
answer, the first chunk of a stream. The relay then sends what this gives it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

import orjson

from .attempts import RETRYABLE_STATUSES, RetryableAnswer, RetryBudget, RetryRule
from .attempts import first_good_answer as _first_good_answer
from .config import ClientKey
from .errors import BadGateway, GatewayTimeout, ProxyError, UpstreamError
from .exchange_result import ExchangeResult
from .limits import KeyLimits
from .policies import RoutingRequest
from .registry import BackendState
from .resume import Transcript
from .scheduler import Lease, Scheduler
from .sse import END_BY_PATH, BadStream, EventFramer
from .transport import Timeouts, Transport, Upstream
from .usage import Usage, from_answer
from .watchdog import Watchdog


@dataclass(frozen=True)
class ExchangeLimits:
    queue_timeout_s: float
    request_timeout_s: float
    write_timeout_s: float
    max_attempts: int
    max_resumes: int = 1  # a broken stream continued on another backend, at most this often


@dataclass(frozen=True)
class ProxiedRequest:
    """A request that passed every check and may be queued: what the endpoint read of it."""

    method: str
    path: str
    body: bytes
    headers: Mapping[str, str]
    # Parsed once by the endpoint and kept, so the exchange may change it at send time.
    payload: dict[str, Any]
    routing: RoutingRequest
    started_at: float
    client_key: ClientKey | None = None
    request_id: str | None = None

    @property
    def priority(self) -> int:
        return self.client_key.priority if self.client_key is not None else 0


class ExchangeRecorder(Protocol):
    def started(self) -> None: ...

    def finished(self, result: ExchangeResult) -> None: ...

    def answered_early(
        self, endpoint: str, status: int, code: str | None, context: Mapping[str, Any]
    ) -> None: ...


class ExchangeHooks(Protocol):
    """What an exchange needs from the rest of the balancer (implemented by `Balancer`)."""

    @property
    def scheduler(self) -> Scheduler: ...

    @property
    def transport(self) -> Transport: ...

    @property
    def timeouts(self) -> Timeouts: ...

    @property
    def limits(self) -> ExchangeLimits: ...

    @property
    def retry_budget(self) -> RetryBudget: ...

    @property
    def key_limits(self) -> KeyLimits: ...

    @property
    def live(self) -> LiveExchanges: ...

    @property
    def recorder(self) -> ExchangeRecorder: ...

    def backend_failed(self, backend: BackendState, error: UpstreamError) -> None: ...

    def backend_loading(self, backend: BackendState) -> None: ...

    def upstream_succeeded(
        self, backend: BackendState, routing: RoutingRequest, lease: Lease, usage: Usage | None
    ) -> None:
        """The backend answered; `usage` is what it did, None when it computed nothing."""
        ...


class LiveExchanges:
    """The exchanges admitted and not yet released; shutdown waits for them or cuts them."""

    def __init__(self) -> None:
        self._live: set[Exchange] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    def __len__(self) -> int:
        return len(self._live)

    def __iter__(self) -> Iterator[Exchange]:
        return iter(list(self._live))

    def add(self, exchange: Exchange) -> None:
        self._live.add(exchange)
        self._idle.clear()

    def discard(self, exchange: Exchange) -> None:
        self._live.discard(exchange)
        if not self._live:
            self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()


class Answer:
    """A backend's answer, started and not yet relayed, with the slot it holds."""

    def __init__(self, lease: Lease, upstream: Upstream) -> None:
        self.lease = lease
        self.upstream = upstream
        self.head = b""  # the whole body, or a stream's first whole events
        self.rest: EventStream | None = None  # the rest of a stream, in whole events
        self.events: EventFramer | None = None

    @property
    def backend_name(self) -> str:
        return self.lease.backend_name

    @property
    def status(self) -> int:
        return self.upstream.status

    async def aclose(self, *, reuse: bool = False) -> None:
        """Idempotent; `reuse` only once the body has been read to its end."""
        self.upstream.aclose(reuse=reuse)
        await self.lease.release()


class Exchange:
    """One proxied request: admitted, answered by the first good backend, released."""

    def __init__(self, request: ProxiedRequest, hooks: ExchangeHooks) -> None:
        self.request = request
        self._hooks = hooks
        # Read once: a reload changes what later requests get, not this one.
        self.limits = hooks.limits
        self._timeouts = hooks.timeouts
        self.deadline = request.started_at + self.limits.request_timeout_s
        self.answer: Answer | None = None
        self._watchdog: Watchdog | None = None
        # What the client receives of a stream, for a resume (resume.py): read from each event
        # as the stream's first answer is framed, before it is sent.
        self.transcript: Transcript | None = None
        self._admitted = False
        self._key_ticket: str | None = None
        self._on_abort: Callable[[ProxyError], None] | None = None
        self.result = ExchangeResult(
            endpoint=request.path,
            model=request.routing.model,
            request_id=request.request_id,
            key_id=request.client_key.id if request.client_key is not None else None,
        )

    # Admission and release -----------------------------------------------------------------

    async def admit(self, on_abort: Callable[[ProxyError], None]) -> None:
        """Take the key's concurrency and count the request, or raise with nothing taken.

        `on_abort` is how the owner of the exchange is told to end it now (`abort()`).
        """
        if self.request.client_key is not None:
            # 429 when over; the ticket is what shared state holds for it (several replicas).
            self._key_ticket = await self._hooks.key_limits.admit(self.request.client_key)
        self._on_abort = on_abort
        self._admitted = True
        self._hooks.live.add(self)
        self._hooks.recorder.started()

    def abort(self, error: ProxyError) -> None:
        """End the exchange now with `error` (shutdown after its grace period)."""
        if self._on_abort is not None:
            self._on_abort(error)

    def refused(self, error: ProxyError) -> None:
        """Admission said no: the request never started, and is counted as answered early."""
        context = {
            "request_id": self.request.request_id,
            "client_key": self.request.client_key,
            "method": self.request.method,
        }
        self._hooks.recorder.answered_early(self.request.path, error.status, error.code, context)

    async def close_answer(self) -> None:
        if self.answer is not None:
            await self.answer.aclose()

    async def release(self) -> None:
        """Everything admit() and the attempts took; idempotent, and whole even if cancelled."""
        try:
            if self._watchdog is not None:
                self._watchdog.close()
            await self.close_answer()
        finally:
            if self._admitted:
                self._admitted = False
                if self.request.client_key is not None:
                    self._hooks.key_limits.release(self.request.client_key, self._key_ticket)
                self._hooks.live.discard(self)
                self.result.total_s = time.monotonic() - self.request.started_at
                self._hooks.recorder.finished(self.result)

    def forget(self) -> None:
        """After `release()`: drop what holds references back to this exchange (the owner's
        abort hook, the answer and its stream's generator, the watchdog's actions), so that
        reference counting frees it all at once."""
        self._on_abort = None
        if self.answer is not None:
            self.answer.rest = None
            self.answer = None
        self.transcript = None
        self._watchdog = None

    # Finding an answer ---------------------------------------------------------------------

    async def first_good_answer(self) -> Answer:
        """Queue, open upstream and read the head, retrying before any byte is relayed."""
        routing = self.request.routing
        scheduler = self._hooks.scheduler
        queue_deadline = time.monotonic() + self.limits.queue_timeout_s

        async def acquire(tried: frozenset[str]) -> Lease:
            self.result.attempts += 1
            queued_at = time.monotonic()
            try:
                lease = await scheduler.acquire(
                    _excluding(routing, tried),
                    timeout_s=max(0.001, min(queue_deadline, self.deadline) - queued_at),
                    retry=bool(tried),  # a retry has already waited its turn once: to the front
                    priority=self.request.priority,
                )
            except BaseException:
                # Refused (full, timed out, shutting down) or cancelled: it still waited.
                self.result.queue_wait_s += time.monotonic() - queued_at
                raise
            self.result.queue_wait_s += lease.queue_wait_s
            self.result.backend = lease.backend.name
            return lease

        rule = RetryRule(
            max_attempts=self.limits.max_attempts,
            budget=self._hooks.retry_budget,
            can_serve=lambda tried: scheduler.can_serve(_excluding(routing, tried)),
        )
        self.answer = await _first_good_answer(acquire, self._open, rule)
        return self.answer

    @property
    def watchdog(self) -> Watchdog:
        """The exchange's one timer for the deadlines that move with every chunk."""
        if self._watchdog is None:
            self._watchdog = Watchdog()
        return self._watchdog

    def _observer(self) -> Transcript | None:
        """What reads a good stream's events for a resume: the first answer's only, and only
        when it could be continued at all."""
        if self.transcript is not None and self.transcript.resumed:
            return None  # a continuation: its events are rewritten, not read again
        # A new one for each attempt: only the answer that is relayed counts.
        self.transcript = Transcript(self.request.path, self.request.payload)
        if self.transcript.blocker is not None or self.limits.max_resumes < 1:
            return None
        return self.transcript

    async def resume(self, transcript: Transcript, error: UpstreamError) -> Answer | None:
        """The stream broke after `transcript`: its continuation from another backend, or None
        when it may not be continued (the reason is the result's)."""
        why = transcript.why_not(self.limits.max_resumes)
        if why is None and not self._hooks.retry_budget.try_spend():
            why = "the retry budget is spent"
        if why is not None:
            self.result.resume_refused = why
            return None
        failed = self.answer
        self.failed(error)
        await self.close_answer()
        self.answer = None
        transcript.resuming()
        tried = frozenset({failed.backend_name}) if failed is not None else frozenset()
        routing = _excluding(self.request.routing, tried)
        self.result.attempts += 1
        try:
            lease = await self._hooks.scheduler.acquire(
                routing,
                timeout_s=max(0.001, self.deadline - time.monotonic()),
                retry=True,
                priority=self.request.priority,
            )
            self.answer = await self._open(lease, transcript.continuation())
        except ProxyError as exc:
            self.result.resume_refused = f"the continuation failed: {exc.message}"
            return None
        if self.answer.status != 200 or self.answer.rest is None:
            self.result.resume_refused = f"the continuation answered {self.answer.status}"
            await self.close_answer()
            return None
        self.result.resumed += 1
        self.result.backend = lease.backend.name
        return self.answer

    async def _open(self, lease: Lease, body: bytes | None = None) -> Answer:
        """One attempt: an answer worth relaying, or an UpstreamError already reported."""
        backend = lease.backend
        headers = dict(self.request.headers)
        if backend.config.api_key:
            headers["Authorization"] = f"Bearer {backend.config.api_key}"
        if body is None:
            body = self.request.body
        if lease.claim.slot_id is not None:  # pinned: the slot that holds its prompt, idle
            body = orjson.dumps({**orjson.loads(body), "id_slot": lease.claim.slot_id})
        try:
            upstream = await self._hooks.transport.open(
                backend.name,
                self.request.method,
                backend.url + self.request.path,
                body,
                headers,
                tls=backend.ssl,
                timeouts=self._timeouts,
            )
        except BaseException as exc:
            await lease.release()
            if isinstance(exc, UpstreamError):
                self._hooks.backend_failed(backend, exc)
            raise
        answer = Answer(lease, upstream)
        try:
            await self._read_head(answer)
        except RetryableAnswer as retryable:
            if answer.status == 503:
                self._hooks.backend_loading(backend)
            else:
                self._hooks.backend_failed(backend, retryable)
            raise
        except BaseException as exc:
            await answer.aclose()
            if isinstance(exc, UpstreamError):
                self._hooks.backend_failed(backend, exc)
            raise
        return answer

    async def _read_head(self, answer: Answer) -> None:
        name, upstream = answer.backend_name, answer.upstream
        if upstream.status in RETRYABLE_STATUSES:
            # Read the (small) error body so that, if no retry is allowed, it can be relayed.
            answer.head = await self._read_all(name, upstream)
            raise RetryableAnswer(f"backend {name} answered {upstream.status}", answer)
        if upstream.media_type == "text/event-stream":
            end, observe = None, None
            if upstream.status == 200:
                end, observe = END_BY_PATH.get(self.request.path), self._observer()
            answer.events = EventFramer(end, observe)
            reader = self._reader(name, upstream, sse=True)
            answer.rest = EventStream(self, answer, answer.events, reader)
            answer.head = await answer.rest.next()
            return
        answer.head = await self._read_all(name, upstream)
        if upstream.status == 200 and upstream.media_type == "application/json":
            try:
                parsed = _json(answer.head)
            except ValueError:
                raise BadGateway(f"backend {name}: invalid JSON") from None
            self.result.usage = from_answer(parsed)

    # Reading the answer --------------------------------------------------------------------

    def _reader(self, name: str, upstream: Upstream, *, sse: bool) -> _BodyReader:
        return _BodyReader(name, upstream, self.watchdog, self._timeouts.idle_s, sse=sse)

    async def _read_all(self, name: str, upstream: Upstream) -> bytes:
        read, parts = self._reader(name, upstream, sse=False).read, []
        while chunk := await read():
            parts.append(chunk)
        return b"".join(parts)

    async def upstream_complete(self, answer: Answer) -> None:
        # The backend is done: free its slot and remember the conversation now, before the
        # last bytes reach the client, who may send its next turn the moment they arrive.
        status, lease = answer.status, answer.lease
        backend = lease.backend
        await answer.aclose(reuse=True)
        if status >= 500 and status not in RETRYABLE_STATUSES:  # those were reported already
            self._hooks.backend_failed(backend, UpstreamError(f"backend {backend.name}: {status}"))
        else:
            # A 4xx is the client's mistake: the backend is fine, but it computed nothing.
            usage = self.result.usage if status < 400 else None
            self._hooks.upstream_succeeded(backend, self.request.routing, lease, usage)

    def failed(self, error: ProxyError) -> None:
        """The relay failed after an answer was found: the backend's fault if upstream."""
        if isinstance(error, UpstreamError) and self.answer is not None:
            self._hooks.backend_failed(self.answer.lease.backend, error)


class EventStream:
    """A stream's body in whole events: pulled (`next()`, its first events) or pushed
    (`pump()`, the rest). It ends only if the stream ended as it promised, and then the
    upstream is complete (before the last events are relayed)."""

    __slots__ = (
        "_answer",
        "_done",
        "_emit",
        "_exchange",
        "_framer",
        "_opening",
        "_reader",
        "_refused",
        "_rewrite",
    )

    def __init__(
        self, exchange: Exchange, answer: Answer, framer: EventFramer, reader: _BodyReader
    ) -> None:
        self._exchange = exchange
        self._answer = answer
        self._framer = framer
        self._reader = reader
        # The body's first bytes, until they are known to be SSE (a 200 only).
        self._opening: bytes | None = b"" if answer.status == 200 else None
        self._done = False
        # While pump() runs: where the events go, what changes them first, and what was refused.
        self._emit: Callable[[bytes], bool] | None = None
        self._rewrite: Callable[[bytes], bytes] | None = None
        self._refused: bytes | None = None

    async def next(self) -> bytes:
        """The next whole events; b"" once the stream is over."""
        while not self._done:
            if self._framer.fault is not None:
                await self._finish()  # raises: after a broken event, nothing more is read
            chunk = await self._reader.read()
            if not chunk:
                await self._finish()
                break
            events = self._feed(chunk)
            if events:
                return events
        return b""

    async def pump(
        self,
        emit: Callable[[bytes], bool],
        rewrite: Callable[[bytes], bytes] | None = None,
    ) -> bytes | None:
        """The rest, handed to `emit` whole events at a time as they arrive, from the backend
        connection's own callback (no wake-up of the relay's task for each), each first passed
        through `rewrite` when given (a continuation's). None at the stream's end; if `emit`
        returned False, the events it did not take, to be sent before this is called again."""
        if not self._done and self._framer.fault is None:
            self._refused = None
            self._emit, self._rewrite = emit, rewrite
            try:
                await self._reader.pump(self._take)
            finally:
                self._emit = self._rewrite = None
            if self._refused is not None:
                return self._refused
        await self._finish()
        return None

    def _take(self, chunk: bytes) -> bool:
        # Called for every chunk of every stream: the framer at once once the opening is known.
        framer = self._framer
        events = framer.feed(chunk) if self._opening is None else self._feed(chunk)
        if events and self._rewrite is not None:
            events = self._rewrite(events)
        if events and not self._emit(events):  # type: ignore[misc]
            self._refused = events
            return False
        return framer.fault is None  # after a broken event, nothing more is read

    def _feed(self, chunk: bytes) -> bytes:
        if self._opening is not None:
            opening = self._opening + chunk
            if not _could_be_sse(opening):
                name = self._answer.backend_name
                raise BadGateway(f"backend {name}: the stream is not server-sent events")
            # find(), not `in`: see EventFramer.feed
            self._opening = None if opening.find(b"\n") >= 0 else opening
        return self._framer.feed(chunk)

    async def _finish(self) -> None:
        if self._done:
            return
        self._done = True
        try:
            self._framer.finish()
        except BadStream as exc:
            raise BadGateway(f"backend {self._answer.backend_name}: {exc}") from None
        self._exchange.result.usage = self._framer.usage
        await self._exchange.upstream_complete(self._answer)


_IDLE = "idle"  # the backend's silence, in the exchange's watchdog


class _BodyReader:
    """A backend's body, read part by part, each part within the idle timeout of the last that
    made progress; for SSE, a part of `:` comments only (keep-alives) is not progress.

    An object with a coroutine rather than an async generator: one fewer layer between a
    chunk's arrival and its relay, and no generator frame held for as long as the stream."""

    __slots__ = ("_idle_s", "_name", "_sse", "_until", "_upstream", "_watchdog")

    def __init__(
        self, name: str, upstream: Upstream, watchdog: Watchdog, idle_s: float, *, sse: bool
    ) -> None:
        self._name = name
        self._upstream = upstream
        self._watchdog = watchdog
        self._idle_s = idle_s
        self._sse = sse
        self._until = watchdog.now() + idle_s

    def _silent(self) -> None:  # the read under way fails: the connection is gone
        self._upstream.aclose(reuse=False)

    async def pump(self, take: Callable[[bytes], bool]) -> bool:
        """The body's parts to `take` as they arrive (`Upstream.pump`), within the idle
        timeout of the last that made progress."""
        watchdog, clock, idle_s, sse = self._watchdog, self._watchdog.clock, self._idle_s, self._sse
        deadline = watchdog.start(_IDLE, self._until, self._silent)

        def progress(chunk: bytes) -> bool:
            # The first byte decides nearly always: a field's name, or the rest of one.
            if chunk and (not sse or chunk[0] not in _NOT_A_FIELD or _has_data(chunk)):
                deadline.when = clock() + idle_s  # later: the watchdog re-arms when it fires
            return take(chunk)

        try:
            ended = await self._upstream.pump(progress)
        except UpstreamError:
            if watchdog.expired != _IDLE:
                raise
            ended = True
        finally:
            self._until = deadline.when
            watchdog.stop(_IDLE)
        if watchdog.expired == _IDLE:
            raise GatewayTimeout(f"backend {self._name}: no data for {self._idle_s:g} s")
        return ended

    async def read(self) -> bytes:
        """The next part; b"" at the body's end."""
        watchdog = self._watchdog
        watchdog.start(_IDLE, self._until, self._silent)
        try:
            chunk = await self._upstream.read()
        except UpstreamError:
            if watchdog.expired != _IDLE:
                raise
            chunk = b""
        finally:
            watchdog.stop(_IDLE)
        if watchdog.expired == _IDLE:
            raise GatewayTimeout(f"backend {self._name}: no data for {self._idle_s:g} s")
        if chunk and (not self._sse or _has_data(chunk)):
            self._until = watchdog.now() + self._idle_s
        return chunk


def _json(body: bytes) -> Any:
    """orjson, several times faster; json for what orjson refuses and json takes (NaN, integers
    beyond 64 bits), so that an answer is judged as before."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return json.loads(body)


def _excluding(routing: RoutingRequest, tried: frozenset[str]) -> RoutingRequest:
    return replace(routing, exclude=routing.exclude | tried) if tried else routing


# The first bytes of a part that may hold no field: a comment, or a line's end.
_NOT_A_FIELD = frozenset(b":\n\r")


def _has_data(chunk: bytes) -> bool:
    if chunk[0] not in _NOT_A_FIELD:
        return True  # its first line is a field, or the rest of one: the usual case, at once
    return any(line and not line.startswith(b":") for line in chunk.splitlines())


_SSE_FIELDS = (b"data:", b"event:", b":", b"id:", b"retry:")


def _could_be_sse(opening: bytes) -> bool:
    """Whether the first bytes of a body may begin server-sent events (they may be few)."""
    first_line = opening.lstrip(b"\r\n").split(b"\n", 1)[0]
    return any(first_line.startswith(f) or f.startswith(first_line) for f in _SSE_FIELDS)
