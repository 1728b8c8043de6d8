"""The process: uvicorn serving the app, with a drain before uvicorn's own shutdown."""

from __future__ import annotations

import socket

import uvicorn
from fastapi import FastAPI

from .config import ProxyConfig
from .proxy import Balancer


class Server(uvicorn.Server):
    """On SIGTERM or SIGINT: queued requests get 503 at once, streams in flight get
    `shutdown_grace_s` to finish and are then cut with an error event, and the process exits 0.
    """

    def __init__(self, app: FastAPI, config: ProxyConfig, **uvicorn_options: object) -> None:
        # uvicorn's own grace only has to outlast ours: by then every exchange has ended.
        super().__init__(
            uvicorn.Config(
                app,
                host=config.host,
                port=config.port,
                log_level=config.log_level,
                access_log=False,
                server_header=False,
                lifespan="on",
                timeout_graceful_shutdown=int(config.shutdown_grace_s) + 5,
                **uvicorn_options,  # type: ignore[arg-type]
            )
        )
        self.balancer: Balancer = app.state.balancer
        self._grace_s = config.shutdown_grace_s

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # Stop listening first, so nothing new arrives while we drain.
        for server in self.servers:
            server.close()
        await self.balancer.drain(self._grace_s)
        await super().shutdown(sockets)
