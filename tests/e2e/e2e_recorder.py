"""A recording reverse proxy in front of one real llama-server: the backend's view of traffic.

llama-server logs no requests, so to show what a backend *received* (and what it answered), the
balancer is pointed at this relay, which forwards every request to the real process and records
when it arrived and the status the backend gave. While the backend process is not listening,
the relay drops the connection without answering, as a dead backend would.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import aiohttp
from aiohttp import web

_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "transfer-encoding",
        "content-length",
        "content-encoding",
        "te",
        "trailer",
        "upgrade",
        "host",
    }
)


@dataclass(frozen=True)
class Exchange:
    at: float
    method: str
    path: str
    status: int | None


class Recorder:
    """Listens on 127.0.0.1:`port`, relays to 127.0.0.1:`target_port`, records exchanges."""

    def __init__(self, port: int, target_port: int) -> None:
        self.port = port
        self.target = f"http://127.0.0.1:{target_port}"
        self.exchanges: list[Exchange] = []
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=2)
        )
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._relay)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def aclose(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _relay(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        arrived = time.monotonic()
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        try:
            upstream = await self._session.request(
                request.method, self.target + request.path_qs, data=body, headers=headers
            )
        except aiohttp.ClientError:
            self.exchanges.append(Exchange(arrived, request.method, request.path, None))
            if request.transport is not None:
                request.transport.abort()
            raise web.HTTPBadGateway() from None
        self.exchanges.append(Exchange(arrived, request.method, request.path, upstream.status))
        async with upstream:
            response = web.StreamResponse(status=upstream.status)
            for key, value in upstream.headers.items():
                if key.lower() not in _HOP_BY_HOP:
                    response.headers[key] = value
            await response.prepare(request)
            with contextlib.suppress(aiohttp.ClientError, ConnectionResetError):
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
            await response.write_eof()
            return response
