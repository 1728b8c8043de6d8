"""`--workers N`: N balancer processes on one machine, one port, one shared state.

One Python process is bound by one core; on a bigger machine, workers multiply what the
balancer can relay. The parent takes the port and forks the workers; each listens on it with
`SO_REUSEPORT`, so the kernel spreads connections among them. Each is a replica of its own in
shared state (`state_url`, required), so together they never overfill a backend and route as
one. The
parent only supervises: it passes SIGTERM, SIGINT and SIGHUP on to every worker, starts again
a worker that died, and exits once all have ended.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess

from . import logs
from .config import ProxyConfig

log = logging.getLogger("llamacpp_ha.workers")

# A worker that dies sooner than this after its start is not started again at once.
_MIN_LIFETIME_S = 5.0


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to `port` that others (the workers) may bind too."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def run_workers(
    config: ProxyConfig,
    source: Callable[[], ProxyConfig] | None,
    serve_one: Callable[[ProxyConfig, Callable[[], ProxyConfig] | None, socket.socket], int],
) -> int:
    """Fork `config.workers` processes serving on one socket; 0 once all have ended."""
    logs.configure(config.log_level, config.log_format)
    # Held, never listened on: the port is ours (or the error is now) while workers come and go.
    held = bind(config.host, config.port)
    config = config.model_copy(update={"port": held.getsockname()[1]})
    # Forked, not spawned: the workers start from the configuration as it is, read once.
    context = multiprocessing.get_context("fork")
    stopping = False
    workers: dict[int, tuple[BaseProcess, float]] = {}

    def start(n: int) -> None:
        process = context.Process(
            target=_worker, args=(config, source, n, serve_one), name=f"worker-{n}"
        )
        process.start()
        workers[n] = (process, time.monotonic())

    def forward(signum: int, frame: object) -> None:
        nonlocal stopping
        if signum != signal.SIGHUP:
            stopping = True
        for process, _ in workers.values():
            if process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    for n in range(config.workers):
        start(n)
    log.warning("%d workers serve on %s:%d", config.workers, config.host, config.port)
    while workers:
        for n, (process, started_at) in list(workers.items()):
            process.join(timeout=0.2)
            if process.exitcode is None:
                continue
            del workers[n]
            if stopping or process.exitcode == 0:
                continue
            log.error("worker %d exited with status %s; starting it again", n, process.exitcode)
            if time.monotonic() - started_at < _MIN_LIFETIME_S:
                time.sleep(_MIN_LIFETIME_S)
            if not stopping:
                start(n)
    held.close()
    return 0


def _worker(
    config: ProxyConfig,
    source: Callable[[], ProxyConfig] | None,
    n: int,
    serve_one: Callable[[ProxyConfig, Callable[[], ProxyConfig] | None, socket.socket], int],
) -> None:
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_DFL)
    # Until its server reloads on it: a reload passed on during a worker's start is moot.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if config.replica_id is not None:
        name = f"{config.replica_id}-{n}"
        config = config.model_copy(update={"replica_id": name})
        if source is not None:
            read = source
            source = lambda: read().model_copy(update={"replica_id": name})  # noqa: E731
    os.environ["LLAMACPP_HA_WORKER"] = str(n)  # SIGHUP reached every worker: none announces it
    raise SystemExit(serve_one(config, source, bind(config.host, config.port)))
