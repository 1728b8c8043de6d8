"""``SimBackend``: one simulated llama-server on a real socket, and its non-generating endpoints.

Every request is recorded (``RecordedRequest``) by one middleware, which also answers 503
"Loading model" on every endpoint but ``/sim/control`` while the model loads, as llama-server
does. The generating endpoints live in ``inference.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from llamacpp_sim import shapes
from llamacpp_sim.config import SimConfig
from llamacpp_sim.engine import Engine
from llamacpp_sim.faults import Fault
from llamacpp_sim.inference import Inference
from llamacpp_sim.recording import REC_KEY, RecordedRequest
from llamacpp_sim.shapes import error_body
from llamacpp_sim.stream import forever
from llamacpp_sim.template import TemplateError, render_chat
from llamacpp_sim.tokenizer import Tokenizer
from llamacpp_sim.wire import HEADERS, ApiError, json_response, maybe_json, read_json

CONTROL_PATH = "/sim/control"
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def is_loopback(remote: str | None) -> bool:
    if not remote:
        return False
    try:
        return ipaddress.ip_address(remote.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


class SimBackend:
    """A simulated llama-server: ``await start()``, use ``url``, ``await aclose()``."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.profile = config.resolved_profile()
        self.tokenizer = Tokenizer()
        self.engine = Engine.from_config(config)
        self.requests: list[RecordedRequest] = []
        self.created = int(time.time())
        self._fault: Fault | None = None
        self._fault_loading_until = 0.0
        self._loaded_at = 0.0
        self._runner: web.AppRunner | None = None
        self._port = config.port
        self._handlers: set[asyncio.Task[Any]] = set()
        self._inference = Inference(config, self.engine, self.tokenizer)

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        host = self.config.host
        if ":" in host:
            host = f"[{host}]"
        scheme = "https" if self.config.tls_certfile else "http"
        return f"{scheme}://{host}:{self._port}"

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def processing(self) -> int:
        return self.engine.processing

    @property
    def deferred(self) -> int:
        return self.engine.deferred

    @property
    def max_concurrent(self) -> int:
        return self.engine.max_concurrent

    @property
    def max_deferred(self) -> int:
        return self.engine.max_deferred

    @property
    def fault(self) -> Fault | None:
        return self._fault

    def set_fault(self, fault: Fault | None) -> None:
        self._fault = fault
        self._fault_loading_until = 0.0
        if fault is not None and fault.loading_s > 0:
            self._fault_loading_until = time.monotonic() + self.config.scaled(fault.loading_s)

    def is_loading(self) -> bool:
        now = time.monotonic()
        return now < self._loaded_at or now < self._fault_loading_until

    async def start(self) -> None:
        self._loaded_at = time.monotonic() + self.config.scaled(self.config.load_time_s)
        self.set_fault(self.config.fault)
        self.engine.start()
        app = web.Application(middlewares=[self._middleware], client_max_size=64 * 1024**2)
        app.add_routes(self._routes())
        app.add_routes(self._inference.routes())
        # handler_cancellation: a closed client connection cancels its handler at once, which
        # frees its slot as llama-server does when a socket write fails.
        runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0
        )
        await runner.setup()
        tls = None
        if self.config.tls_certfile:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(self.config.tls_certfile, self.config.tls_keyfile)
        site = web.TCPSite(runner, self.config.host, self.config.port, ssl_context=tls)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            await self.engine.aclose()
            raise
        self._runner = runner
        for address in runner.addresses:
            if isinstance(address, tuple):
                self._port = int(address[1])
                break

    async def aclose(self) -> None:
        for task in list(self._handlers):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for task in list(self._handlers):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.engine.aclose()

    async def __aenter__(self) -> SimBackend:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _routes(self) -> list[web.RouteDef]:
        return [
            web.get("/health", self._health),
            web.get("/v1/health", self._health),
            web.get("/props", self._props),
            web.get("/slots", self._slots),
            web.get("/models", self._models),
            web.get("/v1/models", self._models),
            web.get("/metrics", self._metrics),
            web.post("/tokenize", self._tokenize),
            web.post("/detokenize", self._detokenize),
            web.post("/apply-template", self._apply_template),
            web.get(CONTROL_PATH, self._control_get),
            web.post(CONTROL_PATH, self._control_post),
        ]

    @web.middleware
    async def _middleware(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        current = asyncio.current_task()
        if current is not None:
            self._handlers.add(current)
        rec = RecordedRequest(
            method=request.method,
            path=request.path_qs,
            headers=dict(request.headers),
            body=b"",
            json=None,
            arrived_at=time.monotonic(),
            fault=self._fault,
        )
        self.requests.append(rec)
        request[REC_KEY] = rec
        try:
            rec.body = await request.read()
            rec.json = maybe_json(rec.body)
            if request.path != CONTROL_PATH and self.is_loading():
                resp: web.StreamResponse = json_response(shapes.LOADING, 503)
            else:
                try:
                    resp = await handler(request)
                except ApiError as exc:
                    resp = json_response(exc.body(), exc.code)
                except web.HTTPNotFound:
                    resp = json_response(error_body(404, "File Not Found", "not_found_error"), 404)
                except web.HTTPMethodNotAllowed:
                    resp = json_response(
                        error_body(405, "Method Not Allowed", "invalid_request_error"), 405
                    )
            rec.status = resp.status
            if rec.outcome is None:
                rec.outcome = "error" if resp.status >= 400 else "completed"
            return resp
        except asyncio.CancelledError:
            if rec.outcome is None:
                rec.outcome = "client_closed"
            raise
        except ConnectionError:
            if rec.outcome is None:
                rec.outcome = "client_closed"
            # aiohttp ignores the ConnectionError this response raises on the dead transport.
            return web.Response(status=499)
        except Exception:
            if rec.outcome is None:
                rec.outcome = "error"
            raise
        finally:
            if current is not None:
                self._handlers.discard(current)
            rec.ended_at = time.monotonic()
            rec.done.set()

    async def _health(self, request: web.Request) -> web.StreamResponse:
        fault: Fault | None = request[REC_KEY].fault
        if fault is not None:
            if fault.hang_health:
                request[REC_KEY].outcome = "fault"
                await forever()
            if fault.health_delay_s > 0:
                await asyncio.sleep(self.config.scaled(fault.health_delay_s))
        return json_response({"status": "ok"})

    async def _props(self, request: web.Request) -> web.StreamResponse:
        return json_response(
            shapes.props(
                self.config.model,
                self.config.slots,
                self.config.n_ctx,
                self.config.slots_endpoint,
                f"models/{self.config.model}.gguf",
            )
        )

    async def _slots(self, request: web.Request) -> web.StreamResponse:
        if not self.config.slots_endpoint:
            raise ApiError(
                501,
                "This server does not support slots endpoint. Start it with `--slots`",
                "not_supported_error",
            )
        lie = self._fault is not None and self._fault.slots_lie
        entries = [shapes.slot_entry(s, lie) for s in self.engine.slots]
        wants_idle = request.query.get("fail_on_no_slot") not in (None, "", "0", "false")
        if wants_idle and all(e["is_processing"] for e in entries):
            raise ApiError(503, "no slot available", "unavailable_error")
        return json_response(entries)

    async def _models(self, request: web.Request) -> web.StreamResponse:
        return json_response(
            shapes.models(self.config.model, self.config.aliases, self.config.n_ctx, self.created)
        )

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        lie = self._fault is not None and self._fault.slots_lie
        text = shapes.metrics_text(
            self.engine.stats,
            processing=0 if lie else self.processing,
            deferred=0 if lie else self.deferred,
        )
        return web.Response(
            body=text.encode("utf-8"),
            headers={**HEADERS, "Content-Type": "text/plain; version=0.0.4"},
        )

    async def _tokenize(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        content = body.get("content", "")
        if not isinstance(content, str):
            raise ApiError(400, "'content' must be a string", "invalid_request_error")
        add_special = bool(body.get("add_special", False))
        tokens = self.tokenizer.tokenize(content, add_bos=add_special)
        if body.get("with_pieces"):
            return json_response(
                {"tokens": [{"id": t, "piece": self.tokenizer.piece(t)} for t in tokens]}
            )
        return json_response({"tokens": tokens})

    async def _detokenize(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        tokens = body.get("tokens", [])
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise ApiError(400, "'tokens' must be an array of integers", "invalid_request_error")
        return json_response({"content": self.tokenizer.detokenize(tokens)})

    async def _apply_template(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        try:
            return json_response({"prompt": render_chat(body.get("messages"))})
        except TemplateError as exc:
            raise ApiError(400, str(exc), "invalid_request_error") from exc

    async def _control_get(self, request: web.Request) -> web.StreamResponse:
        self._check_operator(request)
        return json_response(self._control_state())

    async def _control_post(self, request: web.Request) -> web.StreamResponse:
        self._check_operator(request)
        raw = await request.read()
        try:
            data = json.loads(raw) if raw.strip() else None
            fault = Fault.from_json(data)
        except ValueError as exc:
            raise ApiError(400, str(exc), "invalid_request_error") from exc
        self.set_fault(fault)
        return json_response(self._control_state())

    def _control_state(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "fault": self._fault.to_json() if self._fault is not None else None,
            "loading": self.is_loading(),
            "processing": self.processing,
            "deferred": self.deferred,
        }

    def _check_operator(self, request: web.Request) -> None:
        if not is_loopback(request.remote):
            raise ApiError(403, "the control endpoint answers loopback peers only", "forbidden")
