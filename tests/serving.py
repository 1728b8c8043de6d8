"""Real sockets for tests: the balancer served by uvicorn on port 0, in the test's own loop."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, Protocol

from fastapi import FastAPI

from llamacpp_ha.balancer import Balancer
from llamacpp_ha.config import build_config
from llamacpp_ha.proxy import create_app
from llamacpp_ha.registry import Health
from llamacpp_ha.server import Server
from llamacpp_sim import SimBackend, SimConfig
from sim_support import wait_until


def free_port() -> int:
    """A port free a moment ago, for a child process that must be told its port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Served:
    def __init__(self, app: FastAPI, url: str, server: Server) -> None:
        self.app = app
        self.url = url
        self.server = server
        self.balancer: Balancer = app.state.balancer


@asynccontextmanager
async def serve_app(app: FastAPI, send_buffer: int | None = None) -> AsyncIterator[Served]:
    """`send_buffer` sets SO_SNDBUF on the listener, which accepted sockets inherit (Linux)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if send_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    # The production server class (drain on shutdown, no proxy headers), on a socket of ours.
    server = Server(app, app.state.balancer.config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(10):
            while not server.started:
                if task.done():
                    task.result()
                await asyncio.sleep(0.01)
        yield Served(app, f"http://127.0.0.1:{port}", server)
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
        sock.close()


@asynccontextmanager
async def sims(*configs: SimConfig) -> AsyncIterator[list[SimBackend]]:
    backends = [SimBackend(c) for c in configs]
    try:
        for backend in backends:
            await backend.start()
        yield backends
    finally:
        for backend in backends:
            await backend.aclose()


class _HasURL(Protocol):
    """A backend to put the balancer in front of: a simulator, a fake llama-server."""

    @property
    def url(self) -> str: ...


@asynccontextmanager
async def balancer_for(
    fleet: Sequence[_HasURL],
    *,
    wait_ready: bool = True,
    send_buffer: int | None = None,
    **settings: Any,
) -> AsyncIterator[Served]:
    """The balancer in front of `fleet` (unless `backends` says otherwise), once every backend
    is ready in its registry."""
    config = {
        "backends": [b.url for b in fleet],
        "poll_interval_s": 0.1,
        "shutdown_grace_s": 2,
        **settings,
    }
    async with serve_app(create_app(build_config(config)), send_buffer) as served:
        if wait_ready:
            await wait_until(
                lambda: all(b.health is Health.READY for b in served.balancer.registry.backends)
            )
        yield served
        await assert_no_leaks(served.balancer)


async def assert_no_leaks(balancer: Balancer) -> None:
    """After a test: every slot is free and the queue is empty (allowing in-flight cleanup)."""
    try:
        await wait_until(
            lambda: (
                all(b.slots.in_flight == 0 for b in balancer.registry.backends)
                and len(balancer.queue) == 0
                and balancer.stats.in_flight == 0
            ),
            within_s=3,
        )
    except TimeoutError:
        slots = [(b.name, b.slots.in_flight) for b in balancer.registry.backends]
        queued, in_flight = len(balancer.queue), balancer.stats.in_flight
        raise AssertionError(
            f"leak: slots {slots}, queue {queued}, in flight {in_flight}"
        ) from None
