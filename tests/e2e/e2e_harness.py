"""Real processes for the end-to-end suite: llama-server backends and the balancer in front.

Every process is started in its own session (so its whole group can be signalled), dies with
the test process (``PR_SET_PDEATHSIG``), and is stopped by whoever started it: a ``Fleet`` is a
context manager, and an ``atexit`` hook kills anything still alive, so a failing or interrupted
test leaves no orphan behind.

Nothing here is skipped: no binary, no model, a process that does not come up, each fails the
test with one line saying what to do.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "scripts" / "build-llama-server.sh"
MODEL_SCRIPT = REPO / "scripts" / "make-tiny-model.py"
BALANCER = Path(sys.executable).with_name("llamacpp-ha")
LOG_ROOT = REPO / "test-output" / "e2e"

BINARY_ENV = "LLAMACPP_HA_LLAMA_SERVER"
CHAT_ALIAS = "tiny-llama"
EMBED_ALIAS = "tiny-embed"

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_prctl = _libc.prctl if _libc is not None else None


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: if pytest itself is killed, so is the child.
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llamacpp-ha"


def pinned_version() -> str:
    """The llama.cpp source pin, read from the build script so it is written down once."""
    text = BUILD_SCRIPT.read_text()
    package = re.search(r'^LLAMA_PIN_PACKAGE="([^"]+)"', text, re.MULTILINE)
    version = re.search(r'^LLAMA_PIN_VERSION="([^"]+)"', text, re.MULTILINE)
    if package is None or version is None:
        pytest.fail(f"cannot read the llama.cpp pin from {BUILD_SCRIPT}", pytrace=False)
    return f"{package.group(1)}-{version.group(1)}"


def find_llama_server() -> Path:
    """The binary named by LLAMACPP_HA_LLAMA_SERVER, else the one the build script cached."""
    named = os.environ.get(BINARY_ENV)
    if named:
        path = Path(named)
        if not (path.is_file() and os.access(path, os.X_OK)):
            pytest.fail(f"{BINARY_ENV}={named} is not an executable file", pytrace=False)
        return path
    path = cache_root() / f"llama-server-{pinned_version()}" / "bin" / "llama-server"
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(
            f"no llama-server binary: run scripts/build-llama-server.sh (or set {BINARY_ENV})",
            pytrace=False,
        )
    return path


def make_model(size: str = "tiny") -> Path:
    """The random-weight GGUF, written once by scripts/make-tiny-model.py and cached."""
    result = subprocess.run(
        [sys.executable, str(MODEL_SCRIPT), "--size", size],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.fail(f"scripts/make-tiny-model.py failed: {reason}", pytrace=False)
    return Path(lines[-1])


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


_live: set[ManagedProcess] = set()


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_live):
        proc.kill()


class ManagedProcess:
    """One child process in its own process group, with its output in a log file."""

    def __init__(self, name: str, argv: Sequence[str], log_dir: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_dir / f"{name}.log"
        # The settings a test means are on the command line: none leak in from the environment.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMACPP_HA_")}
        self._popen: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    @property
    def pid(self) -> int:
        assert self._popen is not None, f"{self.name} was never started"
        return self._popen.pid

    @property
    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def start(self) -> None:
        assert not self.running, f"{self.name} is already running"
        self._log_file = self.log_path.open("ab")
        self._log_file.write(f"==== start {' '.join(self.argv)}\n".encode())
        self._log_file.flush()
        self._popen = subprocess.Popen(
            self.argv,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,  # only a prctl call: safe between fork and exec
        )
        _live.add(self)

    def signal(self, sig: int) -> None:
        """Send `sig` to the whole process group."""
        if self._popen is not None and self._popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._popen.pid, sig)

    def kill(self) -> None:
        """SIGKILL the group and reap it: what a crash looks like."""
        if self._popen is None:
            return
        self.signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._popen.wait(timeout=10)
        self._closed()

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM (after SIGCONT, in case it is stopped), then SIGKILL after `grace_s`."""
        if self._popen is None:
            return
        if self._popen.poll() is None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            try:
                self._popen.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self._popen.wait(timeout=10)
        self._closed()

    def _closed(self) -> None:
        _live.discard(self)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def wait_http_ok(self, url: str, timeout_s: float) -> None:
        """Wait until GET `url` answers 200; fail with the log's tail otherwise."""
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if not self.running:
                    pytest.fail(
                        f"{self.name} exited early; last log lines:\n{self.log_tail()}",
                        pytrace=False,
                    )
                try:
                    response = client.get(url)
                    if response.status_code == 200:
                        return
                    last = f"{response.status_code} {response.text[:200]}"
                except httpx.HTTPError as exc:
                    last = repr(exc)
                time.sleep(0.05)
        pytest.fail(
            f"{self.name}: {url} not 200 after {timeout_s} s ({last}); log:\n{self.log_tail()}",
            pytrace=False,
        )


class LlamaServer(ManagedProcess):
    """A real llama-server on 127.0.0.1:`port` (`-np 2 -c 2048 --metrics` unless told)."""

    def __init__(
        self,
        name: str,
        binary: Path,
        model: Path,
        log_dir: Path,
        *,
        alias: str = CHAT_ALIAS,
        slots: int = 2,
        ctx: int = 2048,
        extra_args: Sequence[str] = (),
        port: int | None = None,
        models_max: int = 1,
    ) -> None:
        self.port = port or free_port()
        self.slots = slots
        self.alias = alias
        # What the balancer is told to use; a relay in front of the process may replace it.
        self.balancer_url = self.url
        # A directory of models: router mode, each model loaded on demand, `models_max` at once.
        if model.is_dir():
            serving = ["--models-dir", str(model), "--models-max", str(models_max)]
        else:
            serving = ["--model", str(model), "--alias", alias]
        argv = [
            str(binary),
            *serving,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "-np",
            str(slots),
            "-c",
            str(ctx),
            "--metrics",
            "--threads",
            "1",
            *extra_args,
        ]
        super().__init__(name, argv, log_dir)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        self.wait_http_ok(f"{self.url}/health", timeout_s)


class Balancer(ManagedProcess):
    """The `llamacpp-ha` console script in front of `backends`."""

    def __init__(
        self,
        backend_urls: Sequence[str],
        log_dir: Path,
        *,
        extra_args: Sequence[str] = (),
        port: int | None = None,
    ) -> None:
        if not BALANCER.is_file():
            pytest.fail(f"{BALANCER} is missing: run `make venv` (pip install -e .)", pytrace=False)
        self.port = port or free_port()
        argv = [str(BALANCER), "--host", "127.0.0.1", "--port", str(self.port)]
        for url in backend_urls:
            argv += ["--backend", url]
        argv += ["--poll-interval", "0.2", *extra_args]
        super().__init__("balancer", argv, log_dir)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        self.wait_http_ok(f"{self.url}/health", timeout_s)


@dataclass
class Fleet:
    """Backends and a balancer, started together and always stopped together."""

    binary: Path
    model: Path
    log_dir: Path
    backends: list[LlamaServer] = field(default_factory=list)
    balancer: Balancer | None = None

    def add_backend(self, name: str, **kwargs: Any) -> LlamaServer:
        server = LlamaServer(
            name, self.binary, kwargs.pop("model", self.model), self.log_dir, **kwargs
        )
        self.backends.append(server)
        return server

    def start(
        self, balancer_args: Sequence[str] = (), *, not_yet: Sequence[LlamaServer] = ()
    ) -> Fleet:
        """Start the backends (but those in `not_yet`), then the balancer in front of all.

        If anything fails to come up, everything started so far is stopped before the failure
        propagates (pytest's `Failed` is a BaseException, which unittest's class cleanups miss).
        """
        try:
            return self._start(balancer_args, not_yet)
        except BaseException:
            self.close()
            raise

    def _start(self, balancer_args: Sequence[str], not_yet: Sequence[LlamaServer]) -> Fleet:
        for server in self.backends:
            if server not in not_yet:
                server.start()
        for server in self.backends:
            if server not in not_yet:
                server.wait_ready()
        self.balancer = Balancer(
            [s.balancer_url for s in self.backends], self.log_dir, extra_args=balancer_args
        )
        self.balancer.start()
        self.balancer.wait_ready()
        wait_monitor(
            self.balancer.url,
            lambda data: all(
                backend_entry(data, s)["state"] == "ready" for s in self.backends if s.running
            ),
            timeout_s=10,
            what="every backend ready in /monitor/data",
        )
        return self

    @property
    def url(self) -> str:
        assert self.balancer is not None
        return self.balancer.url

    def close(self) -> None:
        processes: list[ManagedProcess] = [*self.backends]
        if self.balancer is not None:
            processes.insert(0, self.balancer)
        for proc in processes:
            proc.stop()

    def logs(self) -> str:
        procs: list[ManagedProcess] = [*self.backends]
        if self.balancer is not None:
            procs.append(self.balancer)
        return "\n".join(f"--- {p.name} ({p.log_path})\n{p.log_tail()}" for p in procs)


@contextlib.contextmanager
def fleet(name: str, *, model_size: str = "tiny") -> Iterator[Fleet]:
    """A Fleet logging to test-output/e2e/`name`/ (emptied first, kept after for post-mortems).

    Backends are added by the caller, then `start()`.
    """
    log_dir = LOG_ROOT / re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    shutil.rmtree(log_dir, ignore_errors=True)
    log_dir.mkdir(parents=True)
    binary = find_llama_server()
    group = Fleet(binary, make_model(model_size), log_dir)
    try:
        yield group
    finally:
        group.close()


def backend_entry(monitor: dict[str, Any], server: LlamaServer) -> dict[str, Any]:
    """The /monitor/data entry of `server`, matched by its URL."""
    for entry in monitor.get("backends", []):
        if str(entry.get("url", "")).rstrip("/") == server.balancer_url:
            return dict(entry)
    raise AssertionError(f"{server.balancer_url} is not in /monitor/data: {monitor}")


def wait_monitor(
    balancer_url: str,
    predicate: Any,
    *,
    timeout_s: float,
    what: str,
) -> dict[str, Any]:
    """Poll /monitor/data (synchronously) until `predicate(data)` holds."""
    deadline = time.monotonic() + timeout_s
    data: dict[str, Any] = {}
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                data = client.get(f"{balancer_url}/monitor/data").json()
                with contextlib.suppress(AssertionError, KeyError, TypeError):
                    if predicate(data):
                        return data
            time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}; last: {data}")


async def await_monitor(
    client: httpx.AsyncClient,
    balancer_url: str,
    predicate: Any,
    *,
    timeout_s: float,
    what: str,
) -> dict[str, Any]:
    """Poll /monitor/data until `predicate(data)` holds (async)."""
    deadline = time.monotonic() + timeout_s
    data: dict[str, Any] = {}
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            data = (await client.get(f"{balancer_url}/monitor/data")).json()
            with contextlib.suppress(AssertionError, KeyError, TypeError):
                if predicate(data):
                    return data
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}; last: {data}")


async def busy_slots(client: httpx.AsyncClient, server: LlamaServer) -> int:
    """Slots the backend itself reports as processing (its own /slots, not ours)."""
    response = await client.get(f"{server.url}/slots")
    response.raise_for_status()
    return sum(1 for slot in response.json() if slot.get("is_processing"))


async def wait_idle(
    client: httpx.AsyncClient, servers: Sequence[LlamaServer], timeout_s: float
) -> None:
    """Wait until no running backend reports a busy slot (the leak check after each test)."""
    deadline = time.monotonic() + timeout_s
    while True:
        busy = {s.name: await busy_slots(client, s) for s in servers if s.running}
        if not any(busy.values()):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"slots still busy {timeout_s} s after the test: {busy}")
        await asyncio.sleep(0.05)


async def metric(client: httpx.AsyncClient, server: LlamaServer, name: str) -> float:
    """One value from the backend's Prometheus /metrics (`llamacpp:` prefix implied)."""
    response = await client.get(f"{server.url}/metrics")
    response.raise_for_status()
    match = re.search(rf"^llamacpp:{re.escape(name)}\s+(\S+)$", response.text, re.MULTILINE)
    if match is None:
        raise AssertionError(f"llamacpp:{name} not in {server.name}'s /metrics")
    return float(match.group(1))
