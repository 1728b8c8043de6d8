"""``llamacpp-ha-sim``: serve N simulated llama-servers from one process until SIGINT/SIGTERM.

Every per-backend flag takes one value for all backends or a comma-separated list with one value
per backend: ``--count 3 --slots 4,2,1 --profile gpu-8b,gpu-8b,cpu-1b``. Backends listen on
consecutive ports from ``--port`` (``--port 0``: each picks a free port); each prints one line
``llamacpp-ha-sim: backend NAME listening on http://HOST:PORT (...)`` on stdout, and nothing
else is written there. The cache flags are llama-server's, with its defaults: ``--cache-ram``
(MiB), ``--cache-idle-slots``, ``--kv-unified``, ``--slot-prompt-similarity``; ``--slots auto``
is its ``-np auto`` (4 slots sharing one unified KV cache). ``--mode ticker`` serves the
benchmark's timestamping stand-in instead (``ticker.py``). ``--models m1,m2 --models-max 1``
serves each backend in router mode instead (``router.py``): those models, loaded on demand.
``--parent-pid PID`` stops it once PID is no longer its parent, so that a simulator whose
parent was killed outright does not hold its ports for good.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TypeVar

from llamacpp_sim.config import SimConfig
from llamacpp_sim.faults import Fault
from llamacpp_sim.profiles import PROFILES
from llamacpp_sim.router import SimRouter
from llamacpp_sim.server import SimBackend
from llamacpp_sim.ticker import TickerBackend

PROG = "llamacpp-ha-sim"
MODES = ("sim", "ticker")
T = TypeVar("T")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line naming the flag, not argparse's usage block.
        print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(2)


class _UsageError(Exception):
    pass


def build_parser() -> _Parser:
    p = _Parser(
        prog=PROG,
        description="Simulated llama.cpp llama-server backends. Per-backend flags take one "
        "value for all backends or a comma-separated list, one value per backend.",
    )
    p.add_argument(
        "--mode",
        choices=MODES,
        default="sim",
        help="sim (default), or ticker: timestamps as fast as possible, for overhead benchmarks "
        "(only --host --port --count --name --slots --model --n-ctx apply)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", default="8081", help="first port; 0 picks free ports (default 8081)")
    p.add_argument("--count", type=int, default=None, help="number of backends (default 1)")
    p.add_argument("--name", default=None, help="one name per backend (default sim-0, sim-1, ...)")
    p.add_argument(
        "--slots",
        default="2",
        help="slots per backend, or auto: 4 with a unified KV cache, as llama-server's -np auto "
        "(default 2)",
    )
    p.add_argument(
        "--profile",
        default="gpu-8b",
        help=f"speed profile: {', '.join(sorted(PROFILES))} (default gpu-8b)",
    )
    p.add_argument("--time-scale", default="1", help="run this many times faster (default 1)")
    p.add_argument("--model", default="sim-model", help="model alias (default sim-model)")
    p.add_argument(
        "--n-ctx",
        default="4096",
        help="context size per slot; with a unified KV cache, the context all slots share "
        "(default 4096)",
    )
    p.add_argument("--load-time", default="0", help="seconds answering 503 Loading model")
    p.add_argument(
        "--models",
        default=None,
        help="router mode: these models (comma-separated), loaded on demand, each with the "
        "backend's other settings (llama-server --models-dir)",
    )
    p.add_argument(
        "--models-max", type=int, default=4, help="router mode: models loaded at once (default 4)"
    )
    p.add_argument(
        "--model-load-time",
        type=float,
        default=0.5,
        help="router mode: model seconds one model takes to load (default 0.5)",
    )
    p.add_argument(
        "--models-fail", default="", help="router mode: models that fail to load (comma-separated)"
    )
    p.add_argument(
        "--cache-ram",
        "-cram",
        default="8192",
        help="host memory for saved slot states in MiB, -1 = no limit, 0 = off; the profile "
        "gives the bytes per token (default 8192, as llama-server)",
    )
    p.add_argument(
        "--cache-ram-tokens",
        default=None,
        help="the host cache bounded in tokens instead, 0 = off (the simulator's older "
        "--cache-ram); wins over --cache-ram",
    )
    p.add_argument(
        "--slot-prompt-similarity",
        "-sps",
        "--similarity",
        dest="similarity",
        default="0.1",
        help="how much of a prompt a slot's cache must match to be chosen for it, 0 = disabled "
        "(default 0.1)",
    )
    p.add_argument(
        "--cache-idle-slots",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="save idle slots to the host cache at each new task, and clear them with a unified "
        "KV cache (default on, all backends)",
    )
    p.add_argument(
        "--kv-unified",
        "-kvu",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="one KV cache shared by all slots (default: on only with --slots auto, as "
        "llama-server; all backends)",
    )
    p.add_argument(
        "--default-max-tokens", default="16", help="reply length without max_tokens (16)"
    )
    p.add_argument(
        "--alias", action="append", default=[], help="extra model alias (repeatable, all)"
    )
    p.add_argument("--no-slots", action="store_true", help="/slots answers 501 (all backends)")
    p.add_argument(
        "--no-embeddings", action="store_true", help="embeddings answer 501 (all backends)"
    )
    p.add_argument(
        "--fault", default=None, help="fault at start, JSON, e.g. '{\"error_500\": true}' (all)"
    )
    p.add_argument(
        "--parent-pid",
        type=int,
        default=None,
        help="stop, as on SIGTERM, once this process is no longer our parent (it died and we "
        "were handed to another); what spawn(exit_with_parent=True) passes",
    )
    return p


def _values(
    flag: str, raw: str, convert: Callable[[str], T], count: int | None
) -> tuple[list[T], int | None]:
    parts = [part.strip() for part in raw.split(",")]
    try:
        values = [convert(part) for part in parts]
    except ValueError as exc:
        raise _UsageError(f"argument {flag}: invalid value {raw!r} ({exc})") from None
    if len(values) > 1:
        if count is not None and count != len(values):
            raise _UsageError(f"argument {flag}: {len(values)} values given for {count} backends")
        count = len(values)
    return values, count


def _profile(value: str) -> str:
    if value not in PROFILES:
        raise ValueError(f"known profiles: {', '.join(sorted(PROFILES))}")
    return value


def _slots(value: str) -> int:
    if value in ("auto", "-1"):
        return -1
    return int(value)


def _name(value: str) -> str:
    if not value or any(c.isspace() for c in value):
        raise ValueError("a name is not empty and has no spaces")
    return value


def build_configs(args: argparse.Namespace) -> list[SimConfig]:
    count: int | None = args.count
    if count is not None and count < 1:
        raise _UsageError("argument --count: must be >= 1")
    columns: dict[str, tuple[str, str, Callable[[str], Any]]] = {
        "port": ("port", "--port", int),
        "slots": ("slots", "--slots", _slots),
        "profile": ("profile", "--profile", _profile),
        "time_scale": ("time_scale", "--time-scale", float),
        "model": ("model", "--model", str),
        "n_ctx": ("n_ctx", "--n-ctx", int),
        "load_time_s": ("load_time", "--load-time", float),
        "cache_ram_mib": ("cache_ram", "--cache-ram", int),
        "cache_ram_tokens": ("cache_ram_tokens", "--cache-ram-tokens", int),
        "similarity": ("similarity", "--slot-prompt-similarity", float),
        "default_max_tokens": ("default_max_tokens", "--default-max-tokens", int),
    }
    lists: dict[str, list[Any]] = {}
    for field, (dest, flag, convert) in columns.items():
        raw = getattr(args, dest)
        if raw is not None:
            lists[field], count = _values(flag, raw, convert, count)
    names: list[str] | None = None
    if args.name is not None:
        names, count = _values("--name", args.name, _name, count)
        if len(names) != (count or 1) or len(set(names)) != len(names):
            raise _UsageError("argument --name: one distinct name per backend")
    n = count or 1
    fault: Fault | None = None
    if args.fault is not None:
        try:
            fault = Fault.from_json(json.loads(args.fault))
        except ValueError as exc:
            raise _UsageError(f"argument --fault: {exc}") from None
    configs: list[SimConfig] = []
    for i in range(n):
        kwargs = {
            field: values[i] if len(values) > 1 else values[0] for field, values in lists.items()
        }
        if len(lists["port"]) == 1 and kwargs["port"] != 0:
            kwargs["port"] += i
        # llama-server: -np auto is 4 slots, and turns the unified KV cache on unless told.
        auto_slots = kwargs["slots"] == -1
        if auto_slots:
            kwargs["slots"] = 4
        kv_unified = args.kv_unified if args.kv_unified is not None else auto_slots
        try:
            configs.append(
                SimConfig(
                    host=args.host,
                    aliases=tuple(args.alias),
                    slots_endpoint=not args.no_slots,
                    embeddings=not args.no_embeddings,
                    fault=fault,
                    cache_idle_slots=args.cache_idle_slots,
                    kv_unified=kv_unified,
                    name=names[i] if names is not None else f"sim-{i}",
                    **kwargs,
                )
            )
        except ValueError as exc:
            field = str(exc).split(" ", 1)[0]
            flag = columns[field][1] if field in columns else "--" + field.replace("_", "-")
            raise _UsageError(f"argument {flag}: {exc} (backend sim-{i})") from None
    return configs


# How often a child started with --parent-pid looks for its parent.
_PARENT_POLL_S = 0.5


def _stop_event(parent_pid: int | None) -> tuple[asyncio.Event, asyncio.Task[None] | None]:
    """Set on SIGINT or SIGTERM, and once `parent_pid` is no longer our parent: a parent that
    was SIGKILLed cannot stop us, and a simulator left behind would hold its ports for good."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    if parent_pid is None:
        return stop, None

    async def watch() -> None:
        # Polled, as nothing signals it portably: an orphan is handed to init or a subreaper,
        # so getppid() changes; no signal or pipe has to reach us through a wrapper.
        while os.getppid() == parent_pid:  # noqa: ASYNC110
            await asyncio.sleep(_PARENT_POLL_S)
        print(f"{PROG}: parent {parent_pid} is gone; stopping", file=sys.stderr, flush=True)
        stop.set()

    return stop, asyncio.create_task(watch())


async def serve_routers(configs: Sequence[SimConfig], args: argparse.Namespace) -> int:
    """Router mode: each backend a SimRouter over `--models`."""
    stop, watcher = _stop_event(args.parent_pid)
    models = [m for m in args.models.split(",") if m]
    routers: list[SimRouter] = []
    try:
        for config in configs:
            router = SimRouter(
                models,
                config,
                models_max=args.models_max,
                load_time_s=args.model_load_time,
                fail=frozenset(m for m in args.models_fail.split(",") if m),
            )
            try:
                await router.start()
            except OSError as exc:
                print(f"{PROG}: error: {config.name}: cannot listen: {exc}", file=sys.stderr)
                return 1
            routers.append(router)
            detail = f"router, models={','.join(models)}, models_max={args.models_max}"
            print(f"{PROG}: backend {config.name} listening on {router.url} ({detail})", flush=True)
        await stop.wait()
        return 0
    finally:
        if watcher is not None:
            watcher.cancel()
        for router in reversed(routers):
            await router.aclose()


async def serve(
    configs: Sequence[SimConfig], mode: str = "sim", parent_pid: int | None = None
) -> int:
    stop, watcher = _stop_event(parent_pid)
    backends: list[SimBackend | TickerBackend] = []
    try:
        for config in configs:
            backend = TickerBackend(config) if mode == "ticker" else SimBackend(config)
            try:
                await backend.start()
            except OSError as exc:
                print(f"{PROG}: error: {config.name}: cannot listen: {exc}", file=sys.stderr)
                return 1
            backends.append(backend)
            if isinstance(backend, TickerBackend):
                detail = f"mode=ticker, slots={config.slots}, model={config.model}"
            else:
                detail = (
                    f"slots={config.slots}, profile={backend.profile.name}, "
                    f"time_scale={config.time_scale:g}, model={config.model}"
                )
            print(
                f"{PROG}: backend {config.name} listening on {backend.url} ({detail})", flush=True
            )
        await stop.wait()
        return 0
    finally:
        if watcher is not None:
            watcher.cancel()
        for backend in reversed(backends):
            await backend.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        configs = build_configs(args)
    except _UsageError as exc:
        parser.error(str(exc))
    if args.models:
        return asyncio.run(serve_routers(configs, args))
    return asyncio.run(serve(configs, args.mode, args.parent_pid))


if __name__ == "__main__":
    sys.exit(main())
