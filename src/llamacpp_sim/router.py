"""A simulated llama-server in router mode: several models, loaded on demand.

The pinned llama-server, started with `--models-dir` and no model, is a router: it lists every
model it can serve (`GET /models`, `GET /v1/models`, each with a `status`), loads one on
`POST /models/load` or on the first request that names it (autoload), at most `--models-max`
at once (evicting the least recently used idle model, never a busy one), and forwards each
request to its model's instance by the body's `model` (POST) or `?model=` (GET). `SimRouter`
does the same with one `SimBackend` per loaded model, each on a port of its own, and answers
with the shapes captured from the real one (`tests/llama-server-samples/router-*.txt`).
A model in `fail` does not load: its status turns `unloaded` with `failed` and exit code 1.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
from aiohttp import web

from llamacpp_sim.config import SimConfig
from llamacpp_sim.server import SimBackend

_HOP_HEADERS = {"connection", "transfer-encoding", "content-length", "keep-alive"}


@dataclass
class _Model:
    name: str
    status: str = "unloaded"  # loaded, loading, unloaded
    failed: bool = False
    instance: SimBackend | None = None
    in_flight: int = 0
    last_used: float = 0.0
    loaded: asyncio.Event = field(default_factory=asyncio.Event)


def _error(status: int, message: str, kind: str = "invalid_request_error") -> web.Response:
    body = {"error": {"code": status, "message": message, "type": kind}}
    return web.json_response(body, status=status)


class SimRouter:
    """`await start()`, use `url`, `await aclose()`; `config` is every instance's template."""

    def __init__(
        self,
        models: list[str],
        config: SimConfig,
        *,
        models_max: int = 4,
        load_time_s: float = 0.5,
        autoload: bool = True,
        fail: frozenset[str] = frozenset(),
    ) -> None:
        self.config = config
        self.models = {name: _Model(name) for name in models}
        self.models_max = models_max
        self.load_time_s = load_time_s
        self.autoload = autoload
        self.fail = fail
        self.loads: dict[str, int] = {name: 0 for name in models}  # loads started, per model
        # Per model, the most requests that ever waited inside one of its instances for a slot.
        self.max_deferred: dict[str, int] = {name: 0 for name in models}
        self.created = int(time.time())
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._port = config.port
        self._changed = asyncio.Condition()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self._port}"

    async def start(self) -> None:
        self._session = aiohttp.ClientSession()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.add_routes(
            [
                web.get("/health", self._health),
                web.get("/models", self._list),
                web.get("/v1/models", self._list),
                web.post("/models/load", self._load_endpoint),
                web.post("/models/unload", self._unload_endpoint),
                web.get("/props", self._props),
                web.get("/{path:.*}", self._get),
                web.post("/{path:.*}", self._post),
            ]
        )
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self._port)
        await site.start()
        self._port = self._runner.addresses[0][1]

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for model in self.models.values():
            if model.instance is not None:
                await model.instance.aclose()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    # What it lists -----------------------------------------------------------------------

    def _entry(self, model: _Model) -> dict[str, Any]:
        status: dict[str, Any] = {
            "value": model.status,
            "args": ["llama-server", "--alias", model.name],
            "preset": f"[{model.name}]\n",
        }
        if model.failed:
            status.update(failed=True, exit_code=1)
        return {
            "id": model.name,
            "aliases": [],
            "tags": [],
            "object": "model",
            "owned_by": "llamacpp",
            "created": self.created,
            "status": status,
            "architecture": {"input_modalities": ["text"], "output_modalities": ["text"]},
            "source": "models_dir",
            "can_remove": False,
        }

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _list(self, request: web.Request) -> web.Response:
        entries = [self._entry(m) for m in self.models.values()]
        return web.json_response({"data": entries, "object": "list"})

    async def _props(self, request: web.Request) -> web.StreamResponse:
        if "model" in request.query:
            return await self._get(request)
        return web.json_response(
            {
                "role": "router",
                "max_instances": self.models_max,
                "models_autoload": self.autoload,
                "model_alias": "llama-server",
                "model_path": "none",
                "default_generation_settings": {"params": None, "n_ctx": 0},
            }
        )

    # Loading -----------------------------------------------------------------------------

    def _running(self) -> list[_Model]:
        return [m for m in self.models.values() if m.status in ("loaded", "loading")]

    def _make_room(self) -> bool:
        """Room for one more model: evict the least recently used idle one if need be."""
        if not self.models_max or len(self._running()) < self.models_max:
            return True
        idle = [m for m in self._running() if m.status == "loaded" and m.in_flight == 0]
        if not idle:
            return False
        victim = min(idle, key=lambda m: m.last_used)
        self._spawn(self._unload(victim))
        victim.status = "unloaded"  # gives up its place at once, as the real router counts
        return True

    def _start_load(self, model: _Model) -> None:
        model.status, model.failed = "loading", False
        model.loaded.clear()
        self.loads[model.name] += 1
        self._spawn(self._load(model))

    async def _load(self, model: _Model) -> None:
        await asyncio.sleep(self.load_time_s / self.config.time_scale)
        if model.name in self.fail:
            model.status, model.failed = "unloaded", True
        else:
            instance = SimBackend(replace(self.config, model=model.name, port=0))
            await instance.start()
            model.instance, model.status = instance, "loaded"
            model.last_used = time.monotonic()
        model.loaded.set()
        async with self._changed:
            self._changed.notify_all()

    async def _unload(self, model: _Model) -> None:
        instance, model.instance = model.instance, None
        if instance is not None:
            self._note_deferred(model.name, instance)
            await instance.aclose()
        async with self._changed:
            self._changed.notify_all()

    def _note_deferred(self, name: str, instance: SimBackend) -> None:
        self.max_deferred[name] = max(self.max_deferred[name], instance.max_deferred)

    def peak_deferred(self) -> dict[str, int]:
        """`max_deferred` with the instances loaded now counted in."""
        for model in self.models.values():
            if model.instance is not None:
                self._note_deferred(model.name, model.instance)
        return dict(self.max_deferred)

    def _spawn(self, call: Any) -> None:
        task = asyncio.get_running_loop().create_task(call)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _load_endpoint(self, request: web.Request) -> web.Response:
        name = (await request.json()).get("model")
        model = self.models.get(name) if isinstance(name, str) else None
        if model is None:
            return _error(404, "model is not found", "not_found_error")
        if model.status in ("loaded", "loading"):
            return _error(400, "model is already running")
        if not self._make_room():
            return _error(500, "model limit reached, try again later", "server_error")
        self._start_load(model)
        return web.json_response({"success": True})

    async def _unload_endpoint(self, request: web.Request) -> web.Response:
        model = self.models.get((await request.json()).get("model"))
        if model is None:
            return _error(404, "model is not found", "not_found_error")
        model.status = "unloaded"
        self._spawn(self._unload(model))
        return web.json_response({"success": True})

    async def _ready(self, model: _Model, autoload: bool) -> web.Response | None:
        """Wait until `model` is loaded (loading it if allowed); an error answer otherwise."""
        if model.status == "loaded" and model.instance is not None:
            return None
        if not autoload and model.status != "loading":
            return _error(400, "model is not loaded")
        while model.status == "unloaded":
            if self._make_room():
                self._start_load(model)
                break
            async with self._changed:  # every model is busy: wait for one to be idle
                await self._changed.wait()
        await model.loaded.wait()
        if model.status != "loaded" or model.instance is None:
            return _error(500, f"model name={model.name} failed to load", "server_error")
        return None

    # Forwarding --------------------------------------------------------------------------

    async def _get(self, request: web.Request) -> web.StreamResponse:
        name = request.query.get("model")
        if name is None:
            return _error(400, "model name is missing from the request")
        model = self.models.get(name)
        if model is None:
            return _error(400, f"model '{name}' not found")
        autoload = request.query.get("autoload", "true" if self.autoload else "false") == "true"
        refused = await self._ready(model, autoload)
        if refused is not None:
            return refused
        query = {k: v for k, v in request.query.items() if k not in ("model", "autoload")}
        return await self._forward(request, model, query, b"")

    async def _post(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        try:
            name = json.loads(body).get("model")
        except (ValueError, AttributeError):
            name = None
        if not isinstance(name, str):
            return _error(400, "model name is missing from the request")
        model = self.models.get(name)
        if model is None:
            return _error(400, f"model '{name}' not found")
        refused = await self._ready(model, self.autoload)
        if refused is not None:
            return refused
        return await self._forward(request, model, dict(request.query), body)

    async def _forward(
        self, request: web.Request, model: _Model, query: dict[str, str], body: bytes
    ) -> web.StreamResponse:
        instance = model.instance
        assert instance is not None, "forwarded to a model that is not loaded"
        assert self._session is not None, "SimRouter.start() was not called"
        model.in_flight += 1
        model.last_used = time.monotonic()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        headers.pop("Host", None)
        try:
            async with self._session.request(
                request.method,
                instance.url + request.path,
                params=query,
                data=body,
                headers=headers,
            ) as upstream:
                response = web.StreamResponse(status=upstream.status)
                for key, value in upstream.headers.items():
                    if key.lower() not in _HOP_HEADERS:
                        response.headers[key] = value
                await response.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
                return response
        finally:
            model.in_flight -= 1
            model.last_used = time.monotonic()
            async with self._changed:
                self._changed.notify_all()
