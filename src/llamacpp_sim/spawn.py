"""``spawn()``: simulated llama-servers in a child process, listening when it returns.

The child runs ``python -m llamacpp_sim`` with the flags the keyword arguments name (as on the
command line, with units in the names: ``load_time_s`` is ``--load-time``); a per-backend
argument takes one value for all backends or a sequence with one value per backend. ``spawn()``
reads the child's ``listening on`` lines, the only thing it writes to stdout, and returns its
backends' names and URLs with the ``Popen``. A child that exits first, or that is not listening
within ``timeout_s``, raises ``SpawnError``.

A child process is what a test needs to SIGKILL or SIGSTOP a backend, and what the demo, the
benchmarks and the soak run beside the balancer. ``spawn()`` blocks until the child listens:
in a running event loop, ``await asyncio.to_thread(spawn, ...)``. POSIX only.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal, TypeAlias, TypeVar
from urllib.parse import urlsplit

from llamacpp_sim.faults import Fault

_T = TypeVar("_T", int, float, str)
PerBackend: TypeAlias = _T | Sequence[_T]
Mode = Literal["sim", "ticker"]

_LISTENING = re.compile(rb"backend (\S+) listening on (\S+)")


class SpawnError(RuntimeError):
    """The simulator exited, or did not listen in time; ``returncode`` is None in the latter."""

    def __init__(self, message: str, returncode: int | None) -> None:
        super().__init__(message)
        self.returncode = returncode


@dataclass(frozen=True)
class SpawnedBackend:
    """One backend of a spawned simulator, as its ``listening on`` line named it."""

    name: str
    url: str

    @property
    def port(self) -> int:
        return int(urlsplit(self.url).port or 0)


class SimProcess:
    """The child process ``spawn()`` started and the backends it serves; ``with`` stops it."""

    def __init__(
        self,
        popen: subprocess.Popen[bytes],
        backends: Sequence[SpawnedBackend],
        output: threading.Thread,
    ) -> None:
        self.popen = popen
        self.backends = tuple(backends)
        self._output = output

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def urls(self) -> list[str]:
        return [b.url for b in self.backends]

    @property
    def url(self) -> str:
        """The URL of the only backend."""
        return self._only().url

    @property
    def port(self) -> int:
        """The port of the only backend."""
        return self._only().port

    def url_of(self, name: str) -> str:
        for backend in self.backends:
            if backend.name == name:
                return backend.url
        raise KeyError(name)

    def _only(self) -> SpawnedBackend:
        if len(self.backends) != 1:
            raise ValueError(f"{len(self.backends)} backends in this process: use .backends")
        return self.backends[0]

    def send_signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def wait(self, timeout_s: float | None = None) -> int:
        """The exit status; TimeoutError if the child still runs after ``timeout_s``."""
        try:
            status = self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"the simulator still runs after {timeout_s:g} s") from None
        self._output.join(timeout=1)
        return status

    def kill(self) -> int:
        """SIGKILL (a stopped child too) and reap; the exit status. Idempotent."""
        self.send_signal(signal.SIGKILL)
        return self.wait()

    def stop(self, grace_s: float = 5.0) -> int:
        """SIGTERM, then SIGKILL after ``grace_s``; the exit status. Idempotent."""
        self.send_signal(signal.SIGTERM)
        self.send_signal(signal.SIGCONT)  # a stopped child acts on SIGTERM only once continued
        try:
            return self.wait(grace_s)
        except TimeoutError:
            return self.kill()

    def __enter__(self) -> SimProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def spawn(
    count: int | None = None,
    *,
    names: Sequence[str] | None = None,
    port: PerBackend[int] = 0,
    slots: PerBackend[int] | None = None,
    profile: PerBackend[str] | None = None,
    time_scale: PerBackend[float] | None = None,
    model: PerBackend[str] | None = None,
    n_ctx: PerBackend[int] | None = None,
    load_time_s: PerBackend[float] | None = None,
    cache_ram_mib: PerBackend[int] | None = None,
    cache_ram_tokens: PerBackend[int] | None = None,
    similarity: PerBackend[float] | None = None,
    cache_idle_slots: bool | None = None,
    kv_unified: bool | None = None,
    default_max_tokens: PerBackend[int] | None = None,
    aliases: Sequence[str] = (),
    slots_endpoint: bool = True,
    embeddings: bool = True,
    fault: Fault | None = None,
    mode: Mode = "sim",
    host: str = "127.0.0.1",
    log_path: Path | None = None,
    wrapper: Sequence[str] = (),
    new_session: bool = False,
    exit_with_parent: bool = False,
    timeout_s: float = 20.0,
) -> SimProcess:
    """Start ``count`` simulated backends (default: one per value of the per-backend lists) in
    a child process and return once each listens.

    A value left at None is the CLI's default; ``port=0`` (the default) picks free ports;
    ``slots=-1`` is llama-server's ``-np auto``. ``cache_ram_mib`` is ``--cache-ram`` (MiB);
    ``cache_ram_tokens`` the older bound in tokens.
    ``log_path``: the child's stdout and stderr go to this file (else stdout is discarded once
    read, and stderr is ours). ``wrapper``: a command prefix such as ``taskset -c 1``.
    ``new_session``: the child leads a process group of its own, out of reach of the terminal's
    Ctrl-C. ``exit_with_parent``: the child stops by itself once this process is gone, even
    SIGKILLed (``--parent-pid``); with a ``wrapper``, only one that execs (``taskset``, ``nice``).
    """
    per_backend = {
        "--port": port,
        "--slots": slots,
        "--profile": profile,
        "--time-scale": time_scale,
        "--model": model,
        "--n-ctx": n_ctx,
        "--load-time": load_time_s,
        "--cache-ram": cache_ram_mib,
        "--cache-ram-tokens": cache_ram_tokens,
        "--slot-prompt-similarity": similarity,
        "--default-max-tokens": default_max_tokens,
    }
    lengths = [
        len(v) for v in per_backend.values() if isinstance(v, Sequence) and not isinstance(v, str)
    ]
    if names is not None:
        lengths.append(len(names))
    n = count if count is not None else max(lengths, default=1)
    flags = ["--mode", mode, "--host", host, "--count", str(n)]
    if names is not None:
        flags += ["--name", ",".join(names)]
    for flag, value in per_backend.items():
        if value is not None:
            flags += [flag, _joined(value)]
    for alias in aliases:
        flags += ["--alias", alias]
    if not slots_endpoint:
        flags.append("--no-slots")
    if not embeddings:
        flags.append("--no-embeddings")
    if cache_idle_slots is not None:
        flags.append("--cache-idle-slots" if cache_idle_slots else "--no-cache-idle-slots")
    if kv_unified is not None:
        flags.append("--kv-unified" if kv_unified else "--no-kv-unified")
    if fault is not None:
        flags += ["--fault", json.dumps(fault.to_json())]
    if exit_with_parent:
        flags += ["--parent-pid", str(os.getpid())]
    command = [*wrapper, sys.executable, "-m", "llamacpp_sim", *flags]
    return _start(command, n, log_path, new_session, timeout_s)


def _joined(value: PerBackend[int] | PerBackend[float] | PerBackend[str]) -> str:
    if isinstance(value, Sequence) and not isinstance(value, str):
        return ",".join(str(v) for v in value)
    return str(value)


def _start(
    command: list[str], n: int, log_path: Path | None, new_session: bool, timeout_s: float
) -> SimProcess:
    log: IO[bytes] | None = None
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_bytes(b"")
        # Appending, both of us: the child writes its stderr here, we copy its stdout.
        log = open(log_path, "ab", buffering=0)  # noqa: SIM115 - closed by _copy_output
    try:
        popen = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            bufsize=0,
            start_new_session=new_session,
        )
    except BaseException:
        if log is not None:
            log.close()
        raise
    assert popen.stdout is not None
    try:
        backends = _read_listening(popen, n, timeout_s, log)
    except BaseException as exc:
        with contextlib.suppress(ProcessLookupError):
            popen.kill()
        popen.wait()
        popen.stdout.close()
        if log is not None:
            log.close()
        if isinstance(exc, SpawnError):
            raise SpawnError(_with_tail(str(exc), log_path), exc.returncode) from None
        raise
    # The child writes nothing more to stdout, but a full pipe would stall it if it ever did.
    output = threading.Thread(
        target=_copy_output,
        args=(popen.stdout, log),
        name=f"llamacpp-sim-{popen.pid}-stdout",
        daemon=True,
    )
    output.start()
    return SimProcess(popen, backends, output)


def _read_listening(
    popen: subprocess.Popen[bytes], n: int, timeout_s: float, log: IO[bytes] | None
) -> list[SpawnedBackend]:
    assert popen.stdout is not None
    fd = popen.stdout.fileno()
    deadline = time.monotonic() + timeout_s
    backends: list[SpawnedBackend] = []
    pending = b""
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while len(backends) < n:
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                raise SpawnError(
                    f"the simulator was not listening after {timeout_s:g} s "
                    f"({len(backends)} of {n} backends were)",
                    None,
                )
            if not selector.select(remaining_s):
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                try:
                    status = popen.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    raise SpawnError(
                        "the simulator closed its stdout before listening", None
                    ) from None
                raise SpawnError(
                    f"the simulator exited with status {status} before listening "
                    f"({len(backends)} of {n} backends were)",
                    status,
                )
            if log is not None:
                log.write(chunk)
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                found = _LISTENING.search(line)
                if found:
                    backends.append(SpawnedBackend(found[1].decode(), found[2].decode()))
    return backends


def _copy_output(stdout: IO[bytes], log: IO[bytes] | None) -> None:
    """The rest of the child's stdout into the log (or nowhere), until the child exits."""
    try:
        while chunk := stdout.read(65536):
            if log is not None:
                log.write(chunk)
    except (OSError, ValueError):
        pass
    finally:
        stdout.close()
        if log is not None:
            log.close()


def _with_tail(message: str, log_path: Path | None, n_lines: int = 15) -> str:
    if log_path is None:
        return message
    try:
        lines = log_path.read_text("utf-8", "replace").splitlines()
    except OSError:
        return message
    tail = "\n".join(lines[-n_lines:])
    return f"{message}; the end of {log_path}:\n{tail}" if tail else message
