"""The balancers under test, each started as a child process in front of the same fleet.

Every contender listens on a free 127.0.0.1 port, is pinned to its own CPU (see ``run.py``) and
is configured the way its documentation recommends for streaming: nginx with keep-alive to the
upstreams and ``proxy_buffering off``; HAProxy with ``maxconn`` per server equal to its slots and
a ``timeout queue``; SGLang's router and LiteLLM with their own defaults apart from the policy.
``direct`` has no process: the client sends each session straight to one backend.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import importlib.util
import os
import secrets
import shutil
import subprocess
import sys
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bench import procs

SETUP_LOGS = Path(__file__).resolve().parent / ".venv" / "setup-logs"
STARTUP_TIMEOUT_S = 60.0


@dataclass
class Running:
    """A started contender: where to send requests and what to account."""

    base_url: str | None
    child: procs.Child | None = None
    headers: dict[str, str] = field(default_factory=dict)
    backend_urls: list[str] = field(default_factory=list)
    weights: list[int] = field(default_factory=list)

    def url_for(self, affinity_key: str) -> str:
        if self.base_url is not None:
            return self.base_url
        # direct: a fixed backend per session, spread in proportion to slots, so the client
        # alone plays the part of a sticky balancer with no hop, no queue and no load view.
        spots = [u for u, w in zip(self.backend_urls, self.weights, strict=True) for _ in range(w)]
        return spots[zlib.crc32(affinity_key.encode()) % len(spots)]

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()


@dataclass(frozen=True)
class Contender:
    """One balancer configuration."""

    key: str
    family: str
    label: str
    starter: Callable[[list[str], list[int], Path, str | None], Running]
    availability: Callable[[], str | None]
    version: Callable[[], str]

    def unavailable_reason(self) -> str | None:
        return self.availability()

    def start(
        self, urls: list[str], slots: list[int], log_dir: Path, cpu_list: str | None
    ) -> Running:
        return self.starter(urls, slots, log_dir, cpu_list)


# -- helpers ---------------------------------------------------------------------------------


def _which(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for folder in ("/usr/sbin", "/sbin"):
        candidate = Path(folder) / name
        if candidate.exists():
            return str(candidate)
    return None


def _setup_reason(name: str, default: str) -> str:
    log = SETUP_LOGS / f"{name}.log"
    if (SETUP_LOGS / f"{name}.failed").exists() and log.exists():
        lines = [ln for ln in log.read_text("utf-8", "replace").splitlines() if ln.strip()]
        errors = [ln for ln in lines if "ERROR" in ln or "E:" in ln] or lines[-2:]
        return f"{default}; bench/setup.sh failed: {errors[-1][:300]}"
    return default


def _pkg_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _command_version(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except OSError as exc:
        return f"unknown ({exc})"
    text = (done.stdout + done.stderr).strip().splitlines()
    # "HAProxy version 2.6.12-1+deb12u4 2026/10/17 - https://..." -> the part before " - ".
    return text[0].split(" - ")[0].strip() if text else "unknown"


def _git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() or "unknown"


def _host_port(url: str) -> str:
    return url.split("://", 1)[1].rstrip("/")


async def _poll_ready(
    child: procs.Child, check: Callable[[aiohttp.ClientSession], Awaitable[bool]], deadline: float
) -> bool:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while time.monotonic() < deadline and child.alive():
            try:
                if await check(session):
                    return True
            except (aiohttp.ClientError, TimeoutError, ValueError):
                pass
            await asyncio.sleep(0.1)
    return False


def _wait_ready(
    child: procs.Child, check: Callable[[aiohttp.ClientSession], Awaitable[bool]]
) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    ok = asyncio.run(_poll_ready(child, check, deadline))
    if not ok or not child.alive():
        tail = child.log_tail()
        child.stop()
        raise RuntimeError(f"{child.name} did not become ready:\n{tail}")


# -- direct ----------------------------------------------------------------------------------


def _start_direct(urls: list[str], slots: list[int], log_dir: Path, cpu: str | None) -> Running:
    return Running(base_url=None, backend_urls=list(urls), weights=list(slots))


# -- llamacpp-ha -----------------------------------------------------------------------------


# More command-line options for every llamacpp-ha contender (`run.py --ha-args`): to measure
# what a setting changes, on the same workloads.
HA_ARGS: list[str] = []


def _ha_starter(routing: str) -> Callable[[list[str], list[int], Path, str | None], Running]:
    def start(urls: list[str], slots: list[int], log_dir: Path, cpu: str | None) -> Running:
        port = procs.free_port()
        command = [sys.executable, "-m", "llamacpp_ha", "--host", "127.0.0.1"]
        command += ["--port", str(port), "--routing", routing, "--log-level", "warning"]
        command += HA_ARGS
        for url in urls:
            command += ["--backend", url]
        child = procs.spawn(f"llamacpp-ha-{routing}", procs.pinned(command, cpu), log_dir)
        base = f"http://127.0.0.1:{port}"

        async def ready(session: aiohttp.ClientSession) -> bool:
            async with session.get(base + "/monitor/data") as resp:
                data = await resp.json()
            states = [b.get("state") for b in data.get("backends", [])]
            return len(states) == len(urls) and all(s == "ready" for s in states)

        _wait_ready(child, ready)
        return Running(base_url=base, child=child)

    return start


def ha_policies() -> list[str]:
    """Every routing policy the installed llamacpp-ha offers, its default first."""
    from llamacpp_ha.policies import DEFAULT_POLICY, POLICIES

    return [DEFAULT_POLICY, *sorted(n for n in POLICIES if n != DEFAULT_POLICY)]


def ha_default_policy() -> str:
    from llamacpp_ha.policies import DEFAULT_POLICY

    return DEFAULT_POLICY


def _ha_version() -> str:
    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.find_spec("llamacpp_ha")
    origin = Path(spec.origin).resolve() if spec is not None and spec.origin else None
    where = f"git {_git_commit()}"
    if origin is None or root not in origin.parents:
        where += f", imported from {origin.parent if origin else '?'}"
    else:
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "src"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        if dirty:
            where += ", src/ modified"
    return f"{_pkg_version('llamacpp-ha')} ({where})"


# -- nginx -----------------------------------------------------------------------------------


def _nginx_starter(method: str) -> Callable[[list[str], list[int], Path, str | None], Running]:
    def start(urls: list[str], slots: list[int], log_dir: Path, cpu: str | None) -> Running:
        binary = _which("nginx")
        assert binary is not None
        port = procs.free_port()
        # Absolute: nginx resolves relative paths against its -p prefix, not our directory.
        prefix = (log_dir / f"nginx-{method}").resolve()
        for sub in ("tmp/body", "tmp/proxy", "tmp/fastcgi", "tmp/uwsgi", "tmp/scgi"):
            (prefix / sub).mkdir(parents=True, exist_ok=True)
        # weight = slots: a careful operator's round robin sends a 4-slot box twice the
        # traffic of a 2-slot box; least_conn divides active connections by the weight.
        servers = "\n".join(
            f"    server {_host_port(u)} weight={s};" for u, s in zip(urls, slots, strict=True)
        )
        balance = "least_conn;" if method == "least_conn" else ""
        conf = f"""
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {prefix}/tmp/body;
  proxy_temp_path {prefix}/tmp/proxy;
  fastcgi_temp_path {prefix}/tmp/fastcgi;
  uwsgi_temp_path {prefix}/tmp/uwsgi;
  scgi_temp_path {prefix}/tmp/scgi;
  client_max_body_size 64m;
  upstream fleet {{
    {balance}
{servers}
    keepalive 256;
  }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://fleet;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_request_buffering off;
      proxy_read_timeout 600s;
      proxy_send_timeout 600s;
    }}
  }}
}}
"""
        conf_path = prefix / "nginx.conf"
        conf_path.write_text(conf)
        command = [binary, "-p", str(prefix), "-c", str(conf_path), "-e", str(prefix / "err.log")]
        child = procs.spawn(f"nginx-{method}", procs.pinned(command, cpu), log_dir)
        base = f"http://127.0.0.1:{port}"
        _wait_ready(child, _tcp_open(port))
        return Running(base_url=base, child=child)

    return start


def _tcp_open(port: int) -> Callable[[aiohttp.ClientSession], Awaitable[bool]]:
    async def check(session: aiohttp.ClientSession) -> bool:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return False
        writer.close()
        await writer.wait_closed()
        return True

    return check


def _nginx_available() -> str | None:
    if _which("nginx") is None:
        return _setup_reason("nginx", "nginx is not installed (Debian package nginx)")
    return None


# -- HAProxy ---------------------------------------------------------------------------------


def _start_haproxy(urls: list[str], slots: list[int], log_dir: Path, cpu: str | None) -> Running:
    binary = _which("haproxy")
    assert binary is not None
    port = procs.free_port()
    servers = "\n".join(
        f"  server s{i} {_host_port(u)} maxconn {s}"
        for i, (u, s) in enumerate(zip(urls, slots, strict=True))
    )
    # maxconn per server = its slots turns HAProxy into a slot-aware FIFO: requests beyond the
    # slots wait in HAProxy's queue (up to `timeout queue`) for the first free server.
    conf = f"""
global
  maxconn 8192
  nbthread 1
defaults
  mode http
  timeout connect 5s
  timeout client 600s
  timeout server 600s
  timeout queue 60s
  option http-keep-alive
  option http-no-delay
frontend fe
  bind 127.0.0.1:{port}
  default_backend fleet
backend fleet
  balance leastconn
  http-reuse safe
{servers}
"""
    conf_path = log_dir / "haproxy.cfg"
    log_dir.mkdir(parents=True, exist_ok=True)
    conf_path.write_text(conf)
    command = [binary, "-db", "-f", str(conf_path)]
    child = procs.spawn("haproxy", procs.pinned(command, cpu), log_dir)
    _wait_ready(child, _tcp_open(port))
    return Running(base_url=f"http://127.0.0.1:{port}", child=child)


def _haproxy_available() -> str | None:
    if _which("haproxy") is None:
        return _setup_reason("haproxy", "haproxy is not installed (Debian package haproxy)")
    return None


# -- SGLang router ---------------------------------------------------------------------------


def _sglang_starter(policy: str) -> Callable[[list[str], list[int], Path, str | None], Running]:
    def start(urls: list[str], slots: list[int], log_dir: Path, cpu: str | None) -> Running:
        port = procs.free_port()
        metrics_port = procs.free_port()
        command = [sys.executable, "-m", "sglang_router.launch_router"]
        command += ["--host", "127.0.0.1", "--port", str(port), "--policy", policy]
        command += ["--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port)]
        command += ["--log-level", "warn", "--worker-urls", *urls]
        child = procs.spawn(f"sglang-{policy}", procs.pinned(command, cpu), log_dir)
        base = f"http://127.0.0.1:{port}"

        async def ready(session: aiohttp.ClientSession) -> bool:
            async with session.get(base + "/workers") as resp:
                data = await resp.json()
            workers = data.get("workers", [])
            return len(workers) == len(urls) and all(w.get("is_healthy") for w in workers)

        _wait_ready(child, ready)
        return Running(base_url=base, child=child)

    return start


def _sglang_available() -> str | None:
    if importlib.util.find_spec("sglang_router") is None:
        return _setup_reason(
            "sglang-router", "sglang-router is not installed in this environment (bench/.venv)"
        )
    return None


# -- LiteLLM ---------------------------------------------------------------------------------


def _litellm_binary() -> Path:
    return Path(sys.executable).parent / "litellm"


def _start_litellm(urls: list[str], slots: list[int], log_dir: Path, cpu: str | None) -> Running:
    port = procs.free_port()
    entries = "\n".join(
        f"""  - model_name: sim-model
    litellm_params:
      model: openai/sim-model
      api_base: {u}/v1
      api_key: none"""
        for u in urls
    )
    conf = f"""model_list:
{entries}
router_settings:
  routing_strategy: least-busy
litellm_settings:
  drop_params: true
"""
    log_dir.mkdir(parents=True, exist_ok=True)
    conf_path = log_dir / "litellm.yaml"
    conf_path.write_text(conf)
    # LiteLLM refuses to start without a master key; a random one per run, sent by the client.
    key = "sk-bench-" + secrets.token_hex(16)
    env = {
        "LITELLM_MASTER_KEY": key,
        # The bundled model price map instead of a download at start-up (no network here).
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_LOG": "ERROR",
        "NO_DOCS": "True",
    }
    command = [str(_litellm_binary()), "--config", str(conf_path), "--host", "127.0.0.1"]
    command += ["--port", str(port), "--num_workers", "1"]
    child = procs.spawn("litellm", procs.pinned(command, cpu), log_dir, env=env)
    base = f"http://127.0.0.1:{port}"

    async def ready(session: aiohttp.ClientSession) -> bool:
        async with session.get(base + "/health/liveliness") as resp:
            return resp.status == 200

    _wait_ready(child, ready)
    return Running(base_url=base, child=child, headers={"Authorization": f"Bearer {key}"})


def _litellm_available() -> str | None:
    if not _litellm_binary().exists() or importlib.util.find_spec("litellm") is None:
        return _setup_reason("litellm", "litellm[proxy] is not installed in this environment")
    return None


# -- the roster ------------------------------------------------------------------------------


def _always() -> str | None:
    return None


def roster() -> list[Contender]:
    nginx_v = lambda: _command_version([_which("nginx") or "nginx", "-v"])  # noqa: E731
    haproxy_v = lambda: _command_version([_which("haproxy") or "haproxy", "-v"])  # noqa: E731
    sglang_v = lambda: "sglang-router " + _pkg_version("sglang-router")  # noqa: E731
    litellm_v = lambda: "litellm " + _pkg_version("litellm")  # noqa: E731
    return [
        Contender("direct", "direct", "direct", _start_direct, _always, lambda: "-"),
        *(
            Contender(
                f"ha-{policy}",
                "llamacpp-ha",
                f"llamacpp-ha ({policy}{', default' if policy == default else ''})",
                _ha_starter(policy),
                _always,
                _ha_version,
            )
            for policy, default in [(p, ha_default_policy()) for p in ha_policies()]
        ),
        Contender(
            "nginx-rr",
            "nginx",
            "nginx (round robin)",
            _nginx_starter("round_robin"),
            _nginx_available,
            nginx_v,
        ),
        Contender(
            "nginx-lc",
            "nginx",
            "nginx (least_conn)",
            _nginx_starter("least_conn"),
            _nginx_available,
            nginx_v,
        ),
        Contender(
            "haproxy",
            "haproxy",
            "HAProxy (leastconn, maxconn=slots)",
            _start_haproxy,
            _haproxy_available,
            haproxy_v,
        ),
        Contender(
            "sglang-ca",
            "sglang-router",
            "SGLang router (cache_aware)",
            _sglang_starter("cache_aware"),
            _sglang_available,
            sglang_v,
        ),
        Contender(
            "sglang-rr",
            "sglang-router",
            "SGLang router (round_robin)",
            _sglang_starter("round_robin"),
            _sglang_available,
            sglang_v,
        ),
        Contender(
            "litellm",
            "litellm",
            "LiteLLM proxy (least-busy)",
            _start_litellm,
            _litellm_available,
            litellm_v,
        ),
    ]


def environment_python() -> str:
    return os.path.realpath(sys.executable)
