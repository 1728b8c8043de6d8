"""The process: ``serve()`` runs uvicorn with the app, and drains before uvicorn shuts down."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import os
import signal
import socket
from collections.abc import Callable

import uvicorn
from fastapi import FastAPI

from . import logs
from .balancer import Balancer
from .config import ConfigError, ProxyConfig
from .connections import ConnectionGuard, raise_open_file_limit
from .proxy import create_app
from .workers import run_workers


class Server(uvicorn.Server):
    """On SIGTERM or SIGINT: queued requests get 503 at once, streams in flight get
    `shutdown_grace_s` to finish and are then cut with an error event, and the process exits 0.
    """

    def __init__(self, app: FastAPI, config: ProxyConfig, **uvicorn_options: object) -> None:
        balancer: Balancer = app.state.balancer
        self.connection_guard = ConnectionGuard.from_config(
            config, max_header_size=lambda: balancer.config.max_header_size
        )
        # uvicorn's own grace only has to outlast ours: by then every exchange has ended.
        super().__init__(
            uvicorn.Config(
                app,
                host=config.host,
                port=config.port,
                log_level=config.log_level,
                log_config=None,  # logging is ours (logs.configure), text or JSON
                # uvicorn would believe X-Forwarded-For from 127.0.0.1 and rewrite the client
                # address; the balancer decides whom to trust (trusted_proxies).
                proxy_headers=False,
                access_log=False,
                server_header=False,
                lifespan="on",
                timeout_graceful_shutdown=int(config.shutdown_grace_s) + 5,
                ssl_certfile=config.tls_certfile,
                ssl_keyfile=config.tls_keyfile,
                # httptools with bounds on request heads and connections (connections.py).
                http=self.connection_guard.protocol,
                **uvicorn_options,  # type: ignore[arg-type]
            )
        )
        self.balancer: Balancer = app.state.balancer

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self.connection_guard.fit_open_files(raise_open_file_limit())
        await super().startup(sockets)
        # SIGHUP reads the configuration again, as daemons have always done.
        with contextlib.suppress(NotImplementedError, RuntimeError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._reload)

    def _reload(self) -> None:
        # A worker's SIGHUP came from its parent, which signals every worker: none tells the
        # others. A lone process tells the other replicas (shared state), as /admin/reload does.
        announce = "LLAMACPP_HA_WORKER" not in os.environ
        with contextlib.suppress(ConfigError):  # logged by the balancer; the old one stays
            self.balancer.reload_from_source(announce=announce)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # Stop listening first, so nothing new arrives while we drain.
        for server in self.servers:
            server.close()
        # The grace in force now: a reload may have changed it since start.
        grace_s = self.balancer.config.shutdown_grace_s
        self.config.timeout_graceful_shutdown = int(grace_s) + 5
        await self.balancer.drain(grace_s)
        await super().shutdown(sockets)


def serve(
    config: ProxyConfig,
    source: Callable[[], ProxyConfig] | None = None,
    sock: socket.socket | None = None,
) -> int:
    """Serve the balancer until SIGTERM or SIGINT; the exit status (1 if it never started).
    `config.workers` > 1: that many processes on one socket (workers.py); `sock`: serve on it."""
    if config.workers > 1 and sock is None:
        return run_workers(config, source, serve)
    logs.configure(config.log_level, config.log_format)
    app = create_app(config)
    app.state.balancer.config_source = source
    server = Server(app, config)
    # What exists now (every module, the app, its configuration) lives as long as the process:
    # frozen, the cyclic collector stops walking it at each full collection. Those walks were
    # the 99th percentile of time to first token under load (+17 ms; +0.2 ms frozen, in the
    # overhead benchmark with 64 streams flowing), and about 5 % of the CPU per request.
    gc.collect()
    gc.freeze()
    # uvicorn handles SIGTERM/SIGINT itself (draining first), then raises the signal again
    # with the previous handler: make that a clean exit rather than death by signal.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=None if sock is None else [sock])
    return 0 if server.started else 1


def listen_error(host: str, port: int) -> str | None:
    """Why the balancer could not listen on host:port, one line naming the flag; None if it
    can. Called before anything is printed or started, so that a port in use is that line, not
    a banner followed by uvicorn's bind error.

    It binds as asyncio's `create_server` (which uvicorn calls) will: every address `host`
    resolves to, SO_REUSEADDR (a port in TIME_WAIT is free), IPV6_V6ONLY. Not SO_REUSEPORT:
    with it, the port of another `--workers` balancer would look free. Each socket is closed at
    once, bound but never listening, so nothing is held (no TIME_WAIT either) and `--workers`
    binds the port right after."""
    if port == 0:
        return None  # a free port is picked when listening
    try:
        addresses = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        return f"--host {host}: cannot resolve it ({exc.strerror})"
    for family, kind, proto, _, address in dict.fromkeys(addresses):
        shown = f"[{address[0]}]:{port}" if family == socket.AF_INET6 else f"{address[0]}:{port}"
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return f"--port {port}: address already in use ({shown})"
                return f"--host {host} --port {port}: cannot listen on {shown}: {exc.strerror}"
    return None


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)
